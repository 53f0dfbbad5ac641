//! Faults: a killed QEMU is detected and restarted by policy; a restarted
//! daemon re-attaches to running VMs without rebooting them.

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::harness::{Cloud, alive, guest_json, wait_until};

fn pid_of(cloud: &Cloud, name: &str) -> u32 {
    cloud.instance(name)["status"]["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("{name} has no pid")) as u32
}

#[test]
fn killed_qemu_is_detected_and_restarted_by_policy() {
    let cloud = Cloud::start();
    let ip_always = cloud.create_vm("always", &["--type", "nano", "--restart", "always"]);
    let ip_never = cloud.create_vm("never", &["--type", "nano", "--restart", "never"]);
    let boot = guest_json(ip_always, "/identity")["boot_id"].clone();

    let victim = pid_of(&cloud, "always");
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).expect("kill");
    let back = wait_until(
        "the always VM back with a new QEMU",
        Duration::from_secs(180),
        || {
            let v = cloud.instance("always");
            let s = &v["status"];
            (s["phase"] == "running"
                && s["guest_ready"] == true
                && s["pid"].as_u64() != Some(u64::from(victim)))
            .then_some(v)
        },
    );
    assert_eq!(back["status"]["restart_count"], 1);
    assert_eq!(back["status"]["last_exit"]["reason"], "killed");
    assert!(
        back["status"]["last_exit"]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("SIGKILL"),
        "{back}"
    );
    assert_ne!(guest_json(ip_always, "/identity")["boot_id"], boot);

    let victim = pid_of(&cloud, "never");
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).expect("kill");
    let failed = wait_until(
        "the never VM marked failed",
        Duration::from_secs(60),
        || {
            let v = cloud.instance("never");
            (v["status"]["phase"] == "failed").then_some(v)
        },
    );
    assert_eq!(failed["status"]["last_exit"]["reason"], "killed");
    assert_eq!(failed["status"]["restart_count"], 0);
    assert!(cloud.qemu_pids().len() == 1, "only the always VM runs");
    // It stays down: not restarted behind the user's back.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(cloud.instance("never")["status"]["phase"], "failed");
    // An explicit start brings it back.
    cloud.sv_ok(&["vm", "start", "never", "--wait"]);
    assert_eq!(guest_json(ip_never, "/identity")["name"], "never");

    // A guest that powers itself off is not a failure: stopped, not failed.
    let (status, _) = crate::harness::http(
        "POST",
        &format!("http://{ip_never}/poweroff"),
        None,
        Duration::from_secs(10),
    )
    .expect("poweroff");
    assert_eq!(status, 200);
    let off = wait_until(
        "the guest's own poweroff recorded",
        Duration::from_secs(60),
        || {
            let v = cloud.instance("never");
            (v["status"]["phase"] == "stopped").then_some(v)
        },
    );
    assert_eq!(off["status"]["last_exit"]["reason"], "guest-shutdown");
    assert_eq!(off["spec"]["power"], "running", "the user's wish is kept");
}

#[test]
fn daemon_restart_keeps_vms_running_without_reboot() {
    let mut cloud = Cloud::start();
    let ip = cloud.create_vm("steady", &["--type", "nano"]);
    let pid = pid_of(&cloud, "steady");
    let boot = guest_json(ip, "/identity")["boot_id"].clone();
    let up1 = guest_json(ip, "/uptime")["uptime_secs"]
        .as_f64()
        .expect("uptime");
    guest_call_ram(ip, "kept-in-ram");

    // A crash of the daemon: SIGKILL, no chance to clean up.
    cloud.kill_up();
    assert!(alive(pid), "QEMU died with the daemon");
    let during = guest_json(ip, "/uptime")["uptime_secs"]
        .as_f64()
        .expect("uptime");
    assert!(during >= up1);
    cloud.spawn_up();
    cloud.wait_ready();

    let v = wait_until("re-attached status", Duration::from_secs(60), || {
        let v = cloud.instance("steady");
        (v["status"]["phase"] == "running" && v["status"]["guest_ready"] == true).then_some(v)
    });
    assert_eq!(
        v["status"]["pid"].as_u64(),
        Some(u64::from(pid)),
        "a new QEMU was started"
    );
    assert_eq!(v["status"]["boot_count"], 1, "the VM was rebooted");
    assert_eq!(guest_json(ip, "/identity")["boot_id"], boot);
    let up2 = guest_json(ip, "/uptime")["uptime_secs"]
        .as_f64()
        .expect("uptime");
    assert!(up2 > during, "uptime went back: {during} -> {up2}");
    assert_eq!(guest_json(ip, "/ram")["value"], "kept-in-ram");

    // The re-attached VM is fully managed: stop works.
    let stopped = cloud.sv_json(&["vm", "stop", "steady"]);
    assert_eq!(stopped["status"]["phase"], "stopped");
    assert!(!alive(pid));
}

fn guest_call_ram(ip: std::net::Ipv4Addr, value: &str) {
    crate::harness::guest_call(ip, "PUT", "/ram", Some(value));
    assert_eq!(guest_json(ip, "/ram")["value"], value);
}
