//! A VM's life: create, serve, keep disk state across stop/start, resize,
//! reboot, delete without a trace.

use std::time::Duration;

use crate::harness::{Cloud, alive, guest_call, guest_json, wait_until};

#[test]
fn create_serves_page_and_keeps_disk_across_stop_start() {
    let cloud = Cloud::start();
    // The test's own clock around each command bounds how long the VM
    // ran; metering must fall inside those bounds.
    let t0 = std::time::Instant::now();
    let ip = cloud.create_vm("web", &["--type", "micro"]);
    let t1 = std::time::Instant::now();

    // The guest's page names it.
    let id = guest_json(ip, "/identity");
    assert_eq!(id["name"], "web");
    let inst = cloud.instance("web");
    assert_eq!(id["id"], inst["spec"]["id"]);
    assert_eq!(inst["status"]["phase"], "running");
    assert_eq!(inst["status"]["guest_ready"], true);
    assert_eq!(inst["status"]["accel"], "tcg");
    let (status, page) = crate::harness::http(
        "GET",
        &format!("http://{ip}/"),
        None,
        Duration::from_secs(10),
    )
    .expect("page");
    assert_eq!(status, 200);
    assert!(page.contains("web"), "{page}");

    // The host can reach the service; the list shows it.
    let list = cloud.sv_ok(&["vm", "list"]);
    assert!(
        list.contains("web") && list.contains(&ip.to_string()),
        "{list}"
    );

    // State on the VM's disk survives stop/start.
    for want in 1..=3 {
        let v = guest_call(ip, "POST", "/counter/increment", None);
        assert_eq!(v["value"], want);
    }
    let boot_before = guest_json(ip, "/identity")["boot_id"].clone();
    let t2 = std::time::Instant::now();
    let stopped = cloud.sv_json(&["vm", "stop", "web"]);
    let t3 = std::time::Instant::now();
    assert_eq!(stopped["status"]["phase"], "stopped");
    assert_eq!(
        stopped["status"]["last_exit"]["detail"],
        "shut down gracefully (asked through the ACPI power button)",
        "{stopped}"
    );
    assert!(cloud.qemu_pids().is_empty(), "QEMU still runs after stop");
    let t4 = std::time::Instant::now();
    cloud.sv_ok(&["vm", "start", "web", "--wait"]);
    let t5 = std::time::Instant::now();
    // The server and agent are killed and started again midway: the VM
    // runs on, and its run is metered as one (the restarted agent's report
    // of it writes the same event again, not a second one).
    let mut cloud = cloud;
    cloud.kill_up();
    cloud.spawn_up();
    cloud.wait_ready();
    let after = guest_json(ip, "/counter");
    assert_eq!(after["value"], 3, "the counter on disk was lost");
    assert_ne!(
        guest_json(ip, "/identity")["boot_id"],
        boot_before,
        "no new boot"
    );
    let shown = cloud.instance("web");
    assert_eq!(shown["status"]["boot_count"], 2);

    // The event record tells the same story, in order: what was asked (by
    // whom) and what the agent saw happen (by the system).
    let events = cloud.sv_json(&["event", "list", "--vm", "web"]);
    let events = events.as_array().cloned().unwrap_or_default();
    let story: Vec<(String, bool)> = events
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap_or_default().to_string(),
                e["identity"].is_string(),
            )
        })
        .collect();
    let want = [
        ("created", true),
        ("started", false),
        ("stop-requested", true),
        ("stopped", false),
        ("start-requested", true),
        ("started", false),
    ];
    assert_eq!(
        story,
        want.map(|(k, by)| (k.to_string(), by)).to_vec(),
        "{events:?}"
    );
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(events[1]["host"], inst["spec"]["host"]);

    // Usage is metered from that record: the time it ran, to the
    // millisecond, and no more than the time since it was created.
    let t6 = std::time::Instant::now();
    let usage = cloud.sv_json(&["usage"]);
    let t7 = std::time::Instant::now();
    let ran = usage["lines"]
        .as_array()
        .and_then(|l| {
            l.iter()
                .find(|x| x["meter"] == "instance-running" && x["instance_type"] == "micro")
        })
        .and_then(|x| x["quantity"].as_str()?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no running micro in {usage}"));
    let created: chrono::DateTime<chrono::Utc> =
        events[0]["at"].as_str().expect("at").parse().expect("time");
    let since = (chrono::Utc::now() - created).num_milliseconds() as f64 / 1000.0;
    assert!(
        ran > 0.0 && ran < since,
        "ran {ran} s of {since} s: {usage}"
    );
    // Surely running from create's return to stop's call and from start's
    // return to the usage query; at most from create's call to stop's
    // return and from start's call to the answer. One second of slack per
    // transition (the agent times them).
    let surely = ((t2 - t1) + (t6 - t5)).as_secs_f64();
    let at_most = ((t3 - t0) + (t7 - t4)).as_secs_f64();
    assert!(
        ran >= surely - 2.0 && ran <= at_most + 2.0,
        "metered {ran:.3} s running; the test saw between {surely:.3} and {at_most:.3} s"
    );
    let csv = cloud.sv_ok(&["invoice", "--csv"]);
    assert!(
        csv.starts_with("description,quantity,unit,unit_price,amount,currency")
            && csv.contains("micro instance running")
            && csv.lines().last().is_some_and(|l| l.starts_with("total,")),
        "{csv}"
    );
}

#[test]
fn reboot_resize_and_delete_leaves_no_trace() {
    let cloud = Cloud::start();
    let ip = cloud.create_vm("app", &["--type", "nano"]);
    let pid = cloud.instance("app")["status"]["pid"]
        .as_u64()
        .expect("pid") as u32;
    let mem_before = guest_json(ip, "/identity")["memory_kib"]
        .as_u64()
        .expect("memory_kib");
    assert!(
        mem_before < 128 * 1024,
        "nano should have < 128 MiB: {mem_before}"
    );

    // Reboot: a new boot in the same QEMU process, the disk kept.
    guest_call(ip, "POST", "/counter/increment", None);
    let boot1 = guest_json(ip, "/identity")["boot_id"].clone();
    cloud.sv_ok(&["vm", "reboot", "app", "--wait"]);
    let boot2 = guest_json(ip, "/identity")["boot_id"].clone();
    assert_ne!(boot1, boot2, "reboot did not boot again");
    assert_eq!(
        cloud.instance("app")["status"]["pid"].as_u64(),
        Some(u64::from(pid))
    );
    assert_eq!(guest_json(ip, "/counter")["value"], 1);

    // Resize up while running: restarted with more memory, disk kept.
    let resized = cloud.sv_json(&["vm", "resize", "app", "--type", "micro", "--wait"]);
    assert_eq!(resized["spec"]["resources"]["memory_mib"], 256);
    let mem_after = guest_json(ip, "/identity")["memory_kib"]
        .as_u64()
        .expect("memory_kib");
    assert!(
        mem_after > mem_before + 100 * 1024,
        "memory {mem_before} -> {mem_after}"
    );
    assert_eq!(guest_json(ip, "/counter")["value"], 1);
    assert_eq!(cloud.instance("app")["spec"]["instance_type"], "micro");

    // The guest sends 8 MiB (a 4 MiB file, fetched twice): its network
    // egress, which is metered when it is deleted.
    let blob = "x".repeat(4 << 20);
    let url = format!("http://{ip}/files/blob");
    let (status, body) =
        crate::harness::http("PUT", &url, Some(&blob), Duration::from_secs(120)).expect("put");
    assert!((200..300).contains(&status), "{status} {body}");
    for _ in 0..2 {
        let (status, body) =
            crate::harness::http("GET", &url, None, Duration::from_secs(120)).expect("get");
        assert_eq!((status, body.len()), (200, blob.len()));
    }

    // Delete: record, disk, tap, process and address all gone.
    let inst = cloud.instance("app");
    let id = inst["spec"]["id"].as_str().expect("id").replace('-', "");
    let new_pid = inst["status"]["pid"].as_u64().expect("pid") as u32;
    let tap = format!("svt{}", &id[..8]);
    assert!(std::path::Path::new(&format!("/sys/class/net/{tap}")).exists());
    let err = cloud.sv_err(&["vm", "delete", "app"]);
    assert!(err.contains("stop it first"), "{err}");
    cloud.sv_ok(&["vm", "delete", "app", "--force"]);
    let (status, body) = cloud.api("GET", "/v1/instances/app", None);
    assert_eq!(status, 404, "{body}");
    assert!(!alive(new_pid), "QEMU survived delete");
    assert!(
        !std::path::Path::new(&format!("/sys/class/net/{tap}")).exists(),
        "tap left"
    );
    assert!(
        !cloud.data_dir.join("agent/vms").join(&id).exists(),
        "VM files left"
    );
    // Its last bytes were reported before its tap went: at least the 8 MiB,
    // counted once (the rest is the guest's DHCP, ARP and other answers).
    let usage = cloud.sv_json(&["usage"]);
    let sent = usage["lines"]
        .as_array()
        .and_then(|l| l.iter().find(|x| x["meter"] == "network-egress"))
        .and_then(|x| x["quantity"].as_str()?.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no network egress in {usage}"));
    assert!(
        (8 << 20..12 << 20).contains(&sent),
        "metered {sent} bytes of egress for 8 MiB sent: {usage}"
    );
    let host = cloud.sv_json(&["host", "show"]);
    assert_eq!(host["instances"], 0);
    assert_eq!(host["allocated"]["memory_mib"], 0);
    // The address is free again: the next VM gets it.
    let again = cloud.sv_json(&["vm", "create", "app2", "--type", "nano", "--no-start"]);
    assert_eq!(crate::harness::ip_of(&again), ip);
    wait_until("app2 stopped", Duration::from_secs(30), || {
        (cloud.instance("app2")["status"]["phase"] == "stopped").then_some(())
    });
}
