//! High availability on the multi-host test bed (hosts as network
//! namespaces with real agents, real etcd, real TCG guests): a dead, hung
//! or cut-off host's protected VMs run again on other hosts with every
//! acknowledged write, never twice; an etcd outage alone stops nothing.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{alive, guest_call, guest_json, wait_until};
use crate::testbed::{LEASE_TTL, TestBed, TestBedOptions, vm_ip};

/// A protected VM `name` on a 2-replica root volume of its own; returns it
/// with `n` acknowledged counter increments written.
fn protected_vm(bed: &TestBed, name: &str, n: u64) -> (Value, u64) {
    let vol = format!("{name}-root");
    bed.sv_ok(&[
        "volume",
        "create",
        &vol,
        "--size",
        "256M",
        "--replicas",
        "2",
    ]);
    let v = bed.create_vm(name, &["--type", "nano", "--root-volume", &vol]);
    assert_eq!(v["spec"]["ha"], "restart", "{v}");
    let ip = vm_ip(&v);
    let mut acked = 0;
    for _ in 0..n {
        acked = guest_call(ip, "POST", "/counter/increment", None)["value"]
            .as_u64()
            .expect("counter");
    }
    (v, acked)
}

/// A VM's protection state and its first reason (empty if none).
fn protection(bed: &TestBed, vm: &str) -> (String, String) {
    let p = &bed.instance(vm)["protection"];
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (text(&p["state"]), text(&p["reasons"][0]))
}

/// Routes this machine's traffic to the VM network through a host other
/// than `h` (the one about to fail).
pub(crate) fn route_around(bed: &TestBed, h: u32) {
    let via = (1..=bed.hosts).find(|o| *o != h).expect("another host");
    bed.script_ok(&["vmnet-via", &via.to_string()]);
}

/// Waits until `name` runs on a host other than `not_on` with its service
/// answering from this machine; returns it.
pub(crate) fn running_elsewhere(bed: &TestBed, name: &str, not_on: u32) -> Value {
    wait_until(
        &format!("{name} running on a host other than h{not_on}"),
        Duration::from_secs(180),
        || {
            let v = bed.instance(name);
            // Its service answers here too (the network learned where the
            // VM is now), not only to its agent.
            (bed.host_of(&v) != not_on
                && v["status"]["phase"] == "running"
                && v["status"]["guest_ready"] == true
                && crate::harness::http(
                    "GET",
                    &format!("http://{}/health", vm_ip(&v)),
                    None,
                    Duration::from_secs(5),
                )
                .is_ok_and(|(status, _)| status == 200))
            .then_some(v)
        },
    )
}

/// Watches, from the moment a fault hit host `h`, when the VM's old QEMU
/// dies and when the VM is rebound elsewhere; asserts the first comes
/// first (the QEMU was fenced before anyone could start the VM).
fn fenced_before_rebound(bed: &TestBed, name: &str, h: u32, old_qemu: u32) {
    let hit = Instant::now();
    let mut died_at = None;
    let rebound_at = wait_until(&format!("{name} rebound"), Duration::from_secs(120), || {
        if died_at.is_none() && !alive(old_qemu) {
            died_at = Some(hit.elapsed());
        }
        (bed.host_of(&bed.instance(name)) != h).then(|| hit.elapsed())
    });
    let died_at = died_at.unwrap_or_else(|| {
        panic!("h{h}'s QEMU of {name} still ran when {name} was rebound after {rebound_at:?}")
    });
    eprintln!("{name}: old QEMU fenced after {died_at:?}, rebound after {rebound_at:?}");
    assert!(died_at < rebound_at);
}

fn boot_id(ip: Ipv4Addr) -> Value {
    guest_json(ip, "/uptime")["boot_id"].clone()
}

pub(crate) fn failovers(bed: &TestBed) -> Vec<Value> {
    bed.sv_json(&["failover", "list"])
        .as_array()
        .expect("failovers")
        .clone()
}

/// Every live QEMU of instance `v` on every host of the bed.
fn qemus_of(bed: &TestBed, v: &Value) -> Vec<u32> {
    let id = v["spec"]["id"].as_str().expect("id").replace('-', "");
    (1..=bed.hosts)
        .flat_map(|h| {
            let pidfile = bed.dir.join(format!("h{h}/agent/vms/{id}/qemu.pid"));
            std::fs::read_to_string(pidfile)
                .ok()
                .and_then(|t| t.trim().parse::<u32>().ok())
                .filter(|p| alive(*p) && qemu_cmdline_has(*p, &id))
        })
        .collect()
}

fn qemu_cmdline_has(pid: u32, id: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(id))
        .unwrap_or(false)
}

#[test]
fn a_killed_hosts_protected_vm_runs_elsewhere_with_every_acknowledged_write() {
    let bed = TestBed::start(3, 1);
    // The root disk made for the VM: a 2-replica volume; protected.
    let v = bed.create_vm("a", &["--type", "nano", "--disk-replicas", "2"]);
    assert_eq!(v["spec"]["ha"], "restart", "{v}");
    let disk = bed.sv_json(&["volume", "show", "a-disk"]);
    assert_eq!(disk["spec"]["replicas"], 2, "{disk}");
    assert_eq!(disk["spec"]["owner"], "a", "{disk}");
    let ip = vm_ip(&v);
    let mut acked = 0;
    for _ in 0..5 {
        acked = guest_call(ip, "POST", "/counter/increment", None)["value"]
            .as_u64()
            .expect("counter");
    }
    let h = bed.host_of(&v);
    let boot = boot_id(ip);
    // An unprotected VM (local disk) on the same host: refused, with why.
    for other in (1..=3).filter(|o| *o != h) {
        bed.sv_ok(&["host", "cordon", &format!("h{other}")]);
    }
    bed.create_vm("local", &["--type", "nano", "--local-disk"]);
    let (state, why) = protection(&bed, "a");
    assert_eq!(state, "weakened", "the others are cordoned: {why}");
    assert!(why.contains("no other host"), "{why}");
    for other in (1..=3).filter(|o| *o != h) {
        bed.sv_ok(&["host", "uncordon", &format!("h{other}")]);
    }
    let (state, why) = protection(&bed, "local");
    assert_eq!(state, "unprotected", "{why}");
    assert!(why.contains("local"), "{why}");
    let (state, why) = protection(&bed, "a");
    assert_eq!(state, "protected", "{why}");

    route_around(&bed, h);
    let killed = Instant::now();
    bed.script_ok(&["host-kill", &h.to_string()]);
    let moved = running_elsewhere(&bed, "a", h);
    eprintln!("a answers again after {:?}", killed.elapsed());
    assert_eq!(
        guest_json(ip, "/counter")["value"].as_u64(),
        Some(acked),
        "an acknowledged write was lost"
    );
    assert_ne!(boot_id(ip), boot, "a cold restart must report a new boot");
    assert_eq!(qemus_of(&bed, &moved).len(), 1, "one QEMU runs a");

    let records = failovers(&bed);
    let a = records
        .iter()
        .find(|r| r["instance"] == "a")
        .unwrap_or_else(|| panic!("no failover of a: {records:?}"));
    assert_eq!(a["outcome"], "restarted", "{a}");
    assert_eq!(a["from_host"], format!("h{h}"));
    // The event record has the failover, by the system, then the start on
    // the new host (what usage is metered from).
    let events = bed.sv_json(&["event", "list", "--vm", "a"]);
    let kinds: Vec<&str> = events
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["kind"].as_str()).collect())
        .unwrap_or_default();
    let over = kinds
        .iter()
        .position(|k| *k == "failed-over")
        .unwrap_or_else(|| panic!("no failed-over event: {events}"));
    assert!(kinds[over + 1..].contains(&"started"), "{events}");
    // The dead host's fencing is one cluster-wide event.
    let cluster = bed.sv_json(&["event", "list", "--cluster", "--limit", "1000"]);
    let fenced: Vec<&Value> = cluster
        .as_array()
        .map(|a| a.iter().filter(|e| e["kind"] == "fenced").collect())
        .unwrap_or_default();
    assert_eq!(fenced.len(), 1, "{cluster}");
    assert_eq!(fenced[0]["name"], format!("h{h}"), "{cluster}");
    let local = wait_until("the refusal for local", Duration::from_secs(30), || {
        failovers(&bed)
            .into_iter()
            .find(|r| r["instance"] == "local")
    });
    assert_eq!(local["outcome"], "refused", "{local}");
    assert!(
        local["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("ha off"),
        "{local}"
    );
    assert_eq!(bed.instance("local")["spec"]["host"], format!("h{h}"));

    // Deleting the VM deletes the root volume made for it.
    bed.sv_ok(&["vm", "delete", "a", "--force"]);
    wait_until("a-disk deleted with a", Duration::from_secs(120), || {
        (!bed
            .sv_at(&bed.urls(), &["volume", "show", "a-disk"])
            .status
            .success())
        .then_some(())
    });
    // Refusals: a local disk cannot be protected; replicas need a cluster's
    // sizes.
    let err = bed.sv_err(&["vm", "create", "x", "--local-disk", "--ha", "restart"]);
    assert!(err.contains("replicated root disk"), "{err}");
    let err = bed.sv_err(&["vm", "create", "x", "--disk-replicas", "4"]);
    assert!(err.contains("allowed: 1 to 3"), "{err}");
    assert!(
        bed.sv_json(&["vm", "list"])
            .as_array()
            .expect("list")
            .iter()
            .all(|v| v["spec"]["name"] != "x")
    );
    // By default a clustered VM's root disk is a 2-replica volume, and
    // the VM is protected.
    let d = bed.sv_json(&["vm", "create", "dflt", "--type", "nano", "--no-start"]);
    assert_eq!(d["spec"]["ha"], "restart", "{d}");
    let disk = bed.sv_json(&["volume", "show", "dflt-disk"]);
    assert_eq!(disk["spec"]["replicas"], 2, "{disk}");
    assert_eq!(disk["spec"]["owner"], "dflt", "{disk}");
}

#[test]
fn a_hung_agent_is_fenced_by_its_watchdog_before_the_vm_starts_elsewhere() {
    let bed = TestBed::start(3, 1);
    let (v, acked) = protected_vm(&bed, "b", 3);
    let ip = vm_ip(&v);
    let h = bed.host_of(&v);
    let old_qemu = v["status"]["pid"].as_u64().expect("pid") as u32;
    let epoch_before = bed.sv_json(&["volume", "show", "b-root"])["epoch"]
        .as_u64()
        .expect("epoch");
    let agent: i32 = std::fs::read_to_string(bed.dir.join(format!("agent{h}.pid")))
        .expect("agent pidfile")
        .trim()
        .parse()
        .expect("pid");
    let stop = |sig| nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent), sig);
    stop(nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    fenced_before_rebound(&bed, "b", h, old_qemu);
    let moved = running_elsewhere(&bed, "b", h);
    assert_eq!(guest_json(ip, "/counter")["value"].as_u64(), Some(acked));
    let epoch_after = bed.sv_json(&["volume", "show", "b-root"])["epoch"]
        .as_u64()
        .expect("epoch");
    assert!(epoch_after > epoch_before, "the takeover bumps the epoch");

    // The agent wakes up: it finds b bound elsewhere and runs nothing of it.
    stop(nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
    bed.wait_host_state(h, "ready", Duration::from_secs(60));
    assert_eq!(qemus_of(&bed, &moved).len(), 1, "exactly one QEMU runs b");
    assert_eq!(
        guest_call(ip, "POST", "/counter/increment", None)["value"].as_u64(),
        Some(acked + 1)
    );
}

#[test]
fn a_cut_off_host_fences_before_the_restart_and_rejoins() {
    let bed = TestBed::start(3, 1);
    let (v, acked) = protected_vm(&bed, "c", 2);
    let ip = vm_ip(&v);
    let h = bed.host_of(&v);
    let old_qemu = v["status"]["pid"].as_u64().expect("pid") as u32;
    route_around(&bed, h);
    bed.script_ok(&["host-cut", &h.to_string()]);
    fenced_before_rebound(&bed, "c", h, old_qemu);
    let moved = running_elsewhere(&bed, "c", h);
    assert_eq!(guest_json(ip, "/counter")["value"].as_u64(), Some(acked));

    bed.script_ok(&["host-restore", &h.to_string()]);
    bed.wait_host_state(h, "ready", Duration::from_secs(60));
    assert_eq!(qemus_of(&bed, &moved).len(), 1, "exactly one QEMU runs c");
    wait_until("c's volume healthy again", Duration::from_secs(120), || {
        (bed.sv_json(&["volume", "show", "c-root"])["health"] == "healthy").then_some(())
    });
}

#[test]
fn an_etcd_outage_with_every_host_connected_stops_nothing() {
    let bed = TestBed::start(3, 1);
    let (v, acked) = protected_vm(&bed, "d", 1);
    let ip = vm_ip(&v);
    let pid = v["status"]["pid"].as_u64().expect("pid") as u32;
    let boot = boot_id(ip);
    bed.script_ok(&["etcd-stop"]);
    // The outage itself is what is tested: twice the lease TTL.
    std::thread::sleep(Duration::from_secs(2 * LEASE_TTL + 1));
    assert!(alive(pid), "the VM was fenced during an etcd outage");
    assert_eq!(
        guest_call(ip, "POST", "/counter/increment", None)["value"].as_u64(),
        Some(acked + 1)
    );
    bed.script_ok(&["etcd-start"]);
    wait_until("the API back", Duration::from_secs(30), || {
        (bed.api("GET", "/v1/instances", None).0 == 200).then_some(())
    });
    for h in 1..=bed.hosts {
        bed.wait_host_state(h, "ready", Duration::from_secs(60));
    }
    // Give a wrongful failover the time it would need, then look.
    std::thread::sleep(Duration::from_secs(LEASE_TTL + 3));
    let now = bed.instance("d");
    assert_eq!(now["spec"]["host"], v["spec"]["host"], "d was failed over");
    assert_eq!(now["status"]["pid"].as_u64(), Some(pid as u64));
    assert_eq!(boot_id(ip), boot);
    assert!(failovers(&bed).is_empty(), "{:?}", failovers(&bed));
}

#[test]
fn a_failover_finishes_when_the_leader_dies_with_the_host() {
    let bed = TestBed::start(3, 2);
    let (_, info) = bed.api_on(1, "GET", "/v1/info", None);
    assert_eq!(info["leader"], "s1", "{info}");
    let (v, acked) = protected_vm(&bed, "e", 2);
    let ip = vm_ip(&v);
    let h = bed.host_of(&v);
    route_around(&bed, h);
    // The host and the leading server die together: the new leader must
    // see the host dead and fail its VM over.
    bed.script_ok(&["host-kill", &h.to_string()]);
    bed.script_ok(&["server-kill", "1"]);
    let moved = running_elsewhere(&bed, "e", h);
    assert_eq!(guest_json(ip, "/counter")["value"].as_u64(), Some(acked));
    assert_eq!(qemus_of(&bed, &moved).len(), 1, "one QEMU runs e");
    let (_, info) = bed.api_on(2, "GET", "/v1/info", None);
    assert_eq!(info["leader"], "s2", "{info}");
    let records = failovers(&bed);
    assert!(
        records
            .iter()
            .any(|r| r["instance"] == "e" && r["outcome"] == "restarted"),
        "{records:?}"
    );
}

/// The wanted replica set of a volume and how many are in sync.
fn redundancy(bed: &TestBed, volume: &str) -> (Vec<String>, Value) {
    let v = bed.sv_json(&["volume", "show", volume]);
    let hosts = v["spec"]["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .map(|h| h.as_str().expect("host").to_string())
        .collect();
    (hosts, v["redundancy"].clone())
}

#[test]
fn replicas_move_on_request_and_are_made_again_after_their_host_is_gone() {
    let bed = TestBed::start_with(
        3,
        1,
        TestBedOptions {
            server_args: vec![
                "--replica-grace".into(),
                "2".into(),
                "--ha-reserve-hosts".into(),
                "2".into(),
            ],
            ..Default::default()
        },
    );
    let v = bed.create_vm("r", &["--type", "nano"]);
    // Admission control keeps room for 2 of the 3 hosts failing: a second
    // protected VM as large as a whole host no longer fits in what one
    // host offers, although a host could run it; unprotected, it may.
    let cpus = bed
        .sv_json(&["host", "list"])
        .as_array()
        .expect("hosts")
        .iter()
        .map(|h| {
            h["host"]["capacity"]["allocatable"]["vcpus"]
                .as_u64()
                .expect("vcpus")
        })
        .min()
        .expect("a host");
    let err = bed.sv_err(&[
        "vm",
        "create",
        "big",
        "--vcpus",
        &cpus.to_string(),
        "--memory",
        "128M",
    ]);
    assert!(
        err.contains("admission control") && err.contains("--ha-reserve-hosts 2"),
        "{err}"
    );
    assert!(
        !bed.sv_at(&bed.urls(), &["volume", "show", "big-disk"])
            .status
            .success(),
        "a refused VM left its root volume"
    );
    let unprotected = bed.sv_json(&[
        "vm",
        "create",
        "big",
        "--vcpus",
        &cpus.to_string(),
        "--memory",
        "128M",
        "--ha",
        "off",
        "--no-start",
    ]);
    assert_eq!(unprotected["spec"]["ha"], "off", "{unprotected}");
    bed.sv_ok(&["vm", "delete", "big", "--force"]);
    let ip = vm_ip(&v);
    let vm_host = bed.host_of(&v);
    for _ in 0..3 {
        guest_call(ip, "POST", "/counter/increment", None);
    }
    let (hosts, _) = redundancy(&bed, "r-disk");
    assert_eq!(hosts.len(), 2, "{hosts:?}");
    let all: Vec<String> = (1..=3).map(|h| format!("h{h}")).collect();
    let free = all
        .iter()
        .find(|h| !hosts.contains(h))
        .expect("a host without a replica")
        .clone();
    let other = hosts
        .iter()
        .find(|h| **h != format!("h{vm_host}"))
        .expect("a replica away from the VM")
        .clone();

    // By hand, while the VM writes: the replica on `other` moves to `free`
    // (the CLI waits for the copy).
    let moved = bed.sv_json(&["volume", "replica", "move", "r-disk", &other, "--to", &free]);
    assert_eq!(moved["redundancy"]["in_sync"], 2, "{moved}");
    assert_eq!(
        moved["redundancy"]["surplus"],
        serde_json::json!([]),
        "{moved}"
    );
    let (hosts, _) = redundancy(&bed, "r-disk");
    assert!(
        hosts.contains(&free) && !hosts.contains(&other),
        "{hosts:?}"
    );
    let acked = guest_call(ip, "POST", "/counter/increment", None)["value"]
        .as_u64()
        .expect("counter");
    assert_eq!(acked, 4);
    let err = bed.sv_err(&["volume", "replica", "remove", "r-disk", &other]);
    assert!(err.contains("no replica on host"), "{err}");

    // Automatically: the host of the new replica dies; after the grace
    // period its replica is made again on the host left.
    let dead: u32 = free[1..].parse().expect("host number");
    assert_ne!(dead, vm_host);
    bed.script_ok(&["host-kill", &dead.to_string()]);
    // Until the copy is made, its protection is weakened, and says why.
    let why = wait_until("r's protection weakened", Duration::from_secs(60), || {
        let (state, why) = protection(&bed, "r");
        (state == "weakened").then_some(why)
    });
    assert!(why.contains("r-disk"), "{why}");
    let healed = wait_until(
        "the lost replica made again elsewhere and in sync",
        Duration::from_secs(180),
        || {
            let (hosts, r) = redundancy(&bed, "r-disk");
            (!hosts.contains(&free) && r["in_sync"] == 2).then_some(hosts)
        },
    );
    assert!(healed.contains(&other), "{healed:?}");
    assert_eq!(
        guest_json(ip, "/counter")["value"].as_u64(),
        Some(acked),
        "an acknowledged write was lost"
    );
    assert_eq!(bed.instance("r")["status"]["phase"], "running");
    assert_eq!(protection(&bed, "r").0, "protected");

    // A detached volume (no one serves it) gets a replica added too.
    bed.sv_ok(&["volume", "create", "d", "--size", "64M"]);
    let added = bed.sv_json(&["volume", "replica", "add", "d"]);
    assert_eq!(added["redundancy"]["wanted"], 2, "{added}");
    assert_eq!(added["redundancy"]["in_sync"], 2, "{added}");
    assert_eq!(added["health"], "healthy", "{added}");
}

/// The replica data files of volume `id` (dashes removed) under host `h`'s
/// data directory.
fn replica_files(bed: &TestBed, h: u32, id: &str) -> Vec<std::path::PathBuf> {
    fn walk(dir: &std::path::Path, id: &str, out: &mut Vec<std::path::PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, id, out);
            } else if p.file_name().is_some_and(|n| n == "data.img")
                && p.to_string_lossy().contains(id)
            {
                out.push(p);
            }
        }
    }
    let mut out = vec![];
    walk(&bed.dir.join(format!("h{h}")), id, &mut out);
    out
}

#[test]
fn a_disk_image_vm_boots_from_a_replicated_volume_filled_with_its_image() {
    let bed = TestBed::start(2, 1);
    // A disk image with marks at known places (it boots nothing: firmware
    // runs, which is all a disk image VM needs to count as running).
    let tmp = tempfile::tempdir().expect("tmp");
    let raw = tmp.path().join("img.raw");
    let marks: [(u64, &[u8]); 2] = [(0, b"SKYVISOR-FIRST-MIB"), (40 << 20, b"SKYVISOR-AT-40MIB")];
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::File::create(&raw).expect("raw");
        f.set_len(64 << 20).expect("size");
        for (at, mark) in marks {
            f.seek(SeekFrom::Start(at)).expect("seek");
            f.write_all(mark).expect("write");
        }
    }
    let qcow = tmp.path().join("img.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow)
        .status()
        .expect("qemu-img");
    assert!(st.success());
    let img = bed.sv_json(&[
        "image",
        "import",
        "marked",
        "--disk",
        qcow.to_str().expect("path"),
    ]);
    assert_eq!(img["kind"], "disk", "{img}");

    // In a cluster its root disk is a 2-replica volume, so it is protected.
    let v = bed.create_vm("fw", &["--image", "marked", "--type", "nano"]);
    assert_eq!(v["spec"]["volumes"][0]["name"], "fw-disk", "{v}");
    assert_eq!(v["spec"]["ha"], "restart", "{v}");
    let (state, why) = protection(&bed, "fw");
    assert_eq!(state, "protected", "{why}");
    let disk = bed.sv_json(&["volume", "show", "fw-disk"]);
    assert_eq!(disk["spec"]["replicas"], 2, "{disk}");
    let id = disk["spec"]["id"].as_str().expect("id").replace('-', "");

    // Both replicas hold the image's bytes where the image has them.
    bed.sv_ok(&["vm", "stop", "fw"]);
    wait_until("fw-disk released", Duration::from_secs(60), || {
        bed.sv_json(&["volume", "show", "fw-disk"])["primary"]
            .is_null()
            .then_some(())
    });
    for h in 1..=2 {
        let files = replica_files(&bed, h, &id);
        assert_eq!(files.len(), 1, "h{h}: {files:?}");
        let data = std::fs::read(&files[0]).expect("replica");
        for (at, mark) in marks {
            let at = at as usize;
            assert_eq!(
                &data[at..at + mark.len()],
                mark,
                "h{h}'s replica lacks the image's bytes at {at}"
            );
        }
    }

    // Its host dies: it runs again on the other, from its volume.
    bed.sv_ok(&["vm", "start", "fw", "--wait", "--timeout", "240"]);
    let h = bed.host_of(&bed.instance("fw"));
    route_around(&bed, h);
    bed.script_ok(&["host-kill", &h.to_string()]);
    let moved = wait_until(
        "fw running on the other host",
        Duration::from_secs(180),
        || {
            let v = bed.instance("fw");
            // Running as reported by the new host's agent, not the old
            // status left from before the failover.
            (bed.host_of(&v) != h
                && v["status"]["phase"] == "running"
                && v["status"]["host"] == v["spec"]["host"])
                .then_some(v)
        },
    );
    assert_eq!(qemus_of(&bed, &moved).len(), 1, "one QEMU runs fw");
}
