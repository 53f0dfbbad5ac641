//! Checkpoints with real guests: a restore continues the guest from the
//! checkpoint (RAM, processes, uptime) and drops later disk writes; a clone
//! answers on its own address with its parent's RAM; bad requests and
//! faults (full disk, QEMU or the daemon dying mid-save) leave the VM
//! running and the earlier snapshots intact, and never list a partial one.
//! In a cluster the same holds for a VM whose root disk is a replicated
//! volume, and its clone gets a replicated root volume of its own.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::harness::{Cloud, CloudOptions, alive, guest_call, guest_json, http, ip_of, wait_until};
use crate::testbed::{TestBed, vm_ip};

fn pid_of(cloud: &Cloud, name: &str) -> u32 {
    cloud.instance(name)["status"]["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("{name} has no pid")) as u32
}

fn uptime(ip: Ipv4Addr) -> f64 {
    guest_json(ip, "/uptime")["uptime_secs"]
        .as_f64()
        .expect("uptime")
}

fn ram_counter(ip: Ipv4Addr) -> u64 {
    guest_json(ip, "/ram/counter")["value"]
        .as_u64()
        .expect("counter")
}

/// A random value only the guest's RAM will hold.
fn random_token() -> String {
    format!("ram-{:016x}", rand_u64())
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    u64::from_le_bytes(b)
}

fn file_status(ip: Ipv4Addr, name: &str) -> u16 {
    http(
        "GET",
        &format!("http://{ip}/files/{name}"),
        None,
        Duration::from_secs(10),
    )
    .expect("guest reachable")
    .0
}

fn snapshot_json(cloud: &Cloud, vm: &str, snap: &str) -> Value {
    let (status, v) = cloud.api("GET", &format!("/v1/instances/{vm}/snapshots/{snap}"), None);
    assert_eq!(status, 200, "snapshot {vm}/{snap}: {v}");
    v
}

/// Reads a tap's carrier every half millisecond until dropped: how often
/// it was read and how often it was down (no file attached: frames for
/// the guest dropped).
struct CarrierWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<(u32, u32)>>,
}

impl CarrierWatch {
    fn start(tap: &str) -> Self {
        let path = format!("/sys/class/net/{tap}/carrier");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut reads, mut down) = (0, 0);
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let up = std::fs::read_to_string(&path).is_ok_and(|c| c.trim() == "1");
                reads += 1;
                down += u32::from(!up);
                std::thread::sleep(Duration::from_micros(500));
            }
            (reads, down)
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops watching: (reads, reads that found the carrier down).
    fn finish(mut self) -> (u32, u32) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or((0, 0))
    }
}

fn tap_of(cloud: &Cloud, vm: &str) -> String {
    let id: skyvisor_core::InstanceId =
        serde_json::from_value(cloud.instance(vm)["spec"]["id"].clone()).expect("id");
    skyvisor_net::tap_name(&id)
}

fn snapshots_dir(cloud: &Cloud, vm: &str) -> PathBuf {
    let id = cloud.instance(vm)["spec"]["id"]
        .as_str()
        .expect("id")
        .replace('-', "");
    cloud.data_dir.join("agent/snapshots").join(id)
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".tmp-"))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until a snapshot is saving (its request was taken up).
fn wait_saving(cloud: &Cloud, vm: &str, snap: &str) {
    wait_until(
        &format!("{vm}/{snap} saving"),
        Duration::from_secs(30),
        || (snapshot_json(cloud, vm, snap)["state"] == "saving").then_some(()),
    );
}

fn wait_settled(cloud: &Cloud, vm: &str, snap: &str) -> Value {
    wait_until(
        &format!("{vm}/{snap} settled"),
        Duration::from_secs(120),
        || {
            let v = snapshot_json(cloud, vm, snap);
            matches!(v["state"].as_str(), Some("ready" | "failed")).then_some(v)
        },
    )
}

#[test]
fn restore_continues_from_the_checkpoint_and_forgets_later_writes() {
    let cloud = Cloud::start();
    let ip = cloud.create_vm("keeper", &["--type", "nano"]);
    let token = random_token();
    guest_call(ip, "PUT", "/ram", Some(&token));
    guest_call(ip, "PUT", "/files/before.txt", Some("on disk before"));
    let boot = guest_json(ip, "/identity")["boot_id"].clone();
    let up_before = uptime(ip);
    let counter_before = ram_counter(ip);

    let snap = cloud.sv_json(&["vm", "snapshot", "create", "keeper", "s1"]);
    assert_eq!(snap["state"], "ready", "{snap}");
    assert_eq!(snap["kind"], "full");
    let paused = snap["paused_ms"].as_u64().expect("paused_ms");
    assert!(paused < 1000, "paused {paused} ms");
    let memory = snap["memory_bytes"].as_u64().expect("memory_bytes");
    // Its storage is metered from the moment it was ready, at its size.
    let events = cloud.sv_json(&["event", "list"]);
    let ready = events
        .as_array()
        .and_then(|l| {
            l.iter()
                .find(|e| e["object"] == "snapshot" && e["name"] == "keeper/s1")
        })
        .unwrap_or_else(|| panic!("no event of snapshot keeper/s1: {events}"));
    assert_eq!(ready["kind"], "ready", "{ready}");
    assert_eq!(
        ready["stored"]["bytes"].as_u64(),
        Some(memory + snap["disk_bytes"].as_u64().expect("disk_bytes")),
        "{ready}"
    );
    assert!(
        memory > 1 << 20 && memory <= 128 << 20,
        "memory file of a 128 MiB guest is {memory} bytes"
    );
    let up_at_snapshot = uptime(ip);
    let counter_at_snapshot = ram_counter(ip);
    let files = snapshots_dir(&cloud, "keeper").join("s1");
    for f in ["memory", "disk.qcow2", "meta.json"] {
        assert!(
            files.join(f).is_file(),
            "{f} missing in {}",
            files.display()
        );
    }

    // Life goes on after the checkpoint: RAM, disk and time move.
    guest_call(ip, "PUT", "/ram", Some("changed after the snapshot"));
    guest_call(ip, "PUT", "/files/after.txt", Some("written after"));
    wait_until("uptime to move on", Duration::from_secs(30), || {
        (uptime(ip) > up_at_snapshot + 3.0).then_some(())
    });
    let up_before_restore = uptime(ip);
    let counter_before_restore = ram_counter(ip);
    let pid = pid_of(&cloud, "keeper");

    let carrier = CarrierWatch::start(&tap_of(&cloud, "keeper"));
    let restored = cloud.sv_json(&["vm", "restore", "keeper", "s1", "--wait"]);
    let (reads, down) = carrier.finish();
    // The old QEMU's tap file is handed to the new one: the tap never
    // loses its carrier, so frames sent meanwhile wait in it.
    assert!(reads > 20, "the carrier was read only {reads} times");
    assert_eq!(
        down, 0,
        "the tap lost its carrier during the restore ({down} of {reads} reads)"
    );
    assert_eq!(restored["status"]["restored_from"], "s1");
    assert_eq!(
        restored["status"]["boot_count"], 1,
        "a restore is not a boot"
    );
    assert!(!alive(pid), "the old QEMU still runs");

    // The guest is the one from the checkpoint: same boot, RAM as it was,
    // its processes' counters and its clock continuing from there.
    assert_eq!(guest_json(ip, "/identity")["boot_id"], boot, "it rebooted");
    assert_eq!(guest_json(ip, "/ram")["value"], token.as_str());
    let up_after = uptime(ip);
    assert!(
        up_after >= up_before && up_after < up_before_restore,
        "uptime {up_after} should continue from the checkpoint ({up_at_snapshot}), not from zero nor from {up_before_restore}"
    );
    let counter_after = ram_counter(ip);
    assert!(
        counter_after >= counter_before && counter_after < counter_before_restore,
        "RAM counter {counter_after}: at checkpoint {counter_at_snapshot}, before restore {counter_before_restore}"
    );
    // The disk is the checkpoint's too.
    assert_eq!(file_status(ip, "after.txt"), 404, "a later write survived");
    assert_eq!(file_status(ip, "before.txt"), 200);

    // Listed with its size and pause; shown; deleted with its files.
    let list = cloud.sv_ok(&["vm", "snapshot", "list", "keeper"]);
    assert!(
        list.contains("s1") && list.contains("ready") && list.contains("MiB"),
        "{list}"
    );
    let shown = cloud.sv_ok(&["vm", "snapshot", "show", "keeper", "s1"]);
    assert!(
        shown.contains("vm paused") && shown.contains("memory file"),
        "{shown}"
    );
    cloud.sv_ok(&["vm", "snapshot", "delete", "keeper", "s1"]);
    let (status, _) = cloud.api("GET", "/v1/instances/keeper/snapshots/s1", None);
    assert_eq!(status, 404);
    assert!(!files.exists(), "snapshot files left");

    // A stopped VM gets a disk-only snapshot; restoring it brings the disk
    // back and the VM boots from it when started.
    cloud.sv_ok(&["vm", "stop", "keeper"]);
    let cold = cloud.sv_json(&["vm", "snapshot", "create", "keeper", "cold"]);
    assert_eq!(cold["kind"], "disk-only", "{cold}");
    assert_eq!(cold["memory_bytes"], 0);
    cloud.sv_ok(&["vm", "start", "keeper", "--wait"]);
    guest_call(ip, "PUT", "/files/later.txt", Some("x"));
    cloud.sv_ok(&["vm", "stop", "keeper"]);
    let r = cloud.sv_json(&["vm", "restore", "keeper", "cold", "--wait"]);
    assert_eq!(r["status"]["phase"], "stopped", "{r}");
    cloud.sv_ok(&["vm", "start", "keeper", "--wait"]);
    assert_eq!(file_status(ip, "later.txt"), 404);
    assert_eq!(file_status(ip, "before.txt"), 200);
}

#[test]
fn clone_answers_on_its_own_address_with_its_parents_ram() {
    let cloud = Cloud::start();
    let parent_ip = cloud.create_vm("parent", &["--type", "nano"]);
    let token = random_token();
    guest_call(parent_ip, "PUT", "/ram", Some(&token));
    let parent_boot = guest_json(parent_ip, "/identity")["boot_id"].clone();
    cloud.sv_json(&["vm", "snapshot", "create", "parent", "golden"]);

    let clone = cloud.sv_json(&[
        "vm",
        "create",
        "child",
        "--from-snapshot",
        "parent/golden",
        "--wait",
    ]);
    let child_ip = ip_of(&clone);
    assert_ne!(child_ip, parent_ip);
    let parent = cloud.instance("parent");
    assert_ne!(
        clone["spec"]["network"]["mac"],
        parent["spec"]["network"]["mac"]
    );
    assert_eq!(clone["spec"]["resources"], parent["spec"]["resources"]);

    // The clone woke up as its parent (same RAM, same boot) and then took
    // its own name, id and address.
    let id = guest_json(child_ip, "/identity");
    assert_eq!(id["name"], "child");
    assert_eq!(id["id"], clone["spec"]["id"]);
    assert_eq!(id["ip"], child_ip.to_string());
    assert_eq!(
        id["boot_id"], parent_boot,
        "a clone continues its parent's boot"
    );
    assert_eq!(guest_json(child_ip, "/ram")["value"], token.as_str());
    // Both answer, each as itself.
    guest_call(child_ip, "PUT", "/ram", Some("child's own"));
    assert_eq!(guest_json(parent_ip, "/ram")["value"], token.as_str());
    assert_eq!(guest_json(parent_ip, "/identity")["name"], "parent");
    assert_eq!(guest_json(child_ip, "/ram")["value"], "child's own");
    // The host reaches the clone's address at the clone's MAC.
    let neigh = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["neigh", "show", &child_ip.to_string()])
            .output()
            .expect("ip neigh")
            .stdout,
    )
    .to_string();
    let mac = clone["spec"]["network"]["mac"].as_str().expect("mac");
    assert!(neigh.contains(mac), "neighbour entry {neigh:?} lacks {mac}");

    // Deleting the parent keeps its snapshots by default.
    let files = snapshots_dir(&cloud, "parent").join("golden");
    cloud.sv_ok(&["vm", "delete", "parent", "--force"]);
    let kept = snapshot_json(&cloud, "parent", "golden");
    assert_eq!(kept["state"], "ready");
    assert!(files.join("memory").is_file());
    // ...and `--with-snapshots` deletes them.
    cloud.sv_json(&["vm", "snapshot", "create", "child", "c1"]);
    let child_files = snapshots_dir(&cloud, "child");
    cloud.sv_ok(&["vm", "delete", "child", "--force", "--with-snapshots"]);
    wait_until("child's snapshots gone", Duration::from_secs(30), || {
        let (_, v) = cloud.api("GET", "/v1/instances/child/snapshots", None);
        (v.as_array().is_some_and(Vec::is_empty) && !child_files.exists()).then_some(())
    });
}

#[test]
fn bad_requests_are_refused_and_the_vm_runs_on() {
    let cloud = Cloud::start();
    let ip = cloud.create_vm("steady", &["--type", "nano"]);
    let boot = guest_json(ip, "/identity")["boot_id"].clone();
    let pid = pid_of(&cloud, "steady");

    let err = cloud.sv_err(&["vm", "snapshot", "create", "ghost"]);
    assert!(err.contains("\"ghost\" not found"), "{err}");
    let err = cloud.sv_err(&["vm", "snapshot", "create", "steady", "Bad_Name"]);
    assert!(err.contains("snapshot name"), "{err}");
    let err = cloud.sv_err(&["vm", "restore", "steady", "nope"]);
    assert!(err.contains("no snapshot \"nope\""), "{err}");
    let err = cloud.sv_err(&["vm", "create", "twin", "--from-snapshot", "steady/nope"]);
    assert!(err.contains("no snapshot \"nope\""), "{err}");

    cloud.sv_json(&["vm", "snapshot", "create", "steady", "s1"]);
    let err = cloud.sv_err(&["vm", "snapshot", "create", "steady", "s1"]);
    assert!(err.contains("already has a snapshot named \"s1\""), "{err}");

    // A never-started VM has no disk to snapshot: a clear failure.
    cloud.sv_json(&["vm", "create", "blank", "--type", "nano", "--no-start"]);
    let err = cloud.sv_err(&["vm", "snapshot", "create", "blank", "b1"]);
    assert!(err.contains("has no disk yet"), "{err}");

    // The refusals left the VM alone.
    assert_eq!(pid_of(&cloud, "steady"), pid);
    assert_eq!(guest_json(ip, "/identity")["boot_id"], boot);

    // A snapshot of an earlier VM of the same name (kept after its delete)
    // is refused; under another VM's name it is simply not there.
    cloud.sv_ok(&["vm", "start", "blank", "--wait"]);
    cloud.sv_json(&["vm", "snapshot", "create", "blank", "b2"]);
    cloud.sv_ok(&["vm", "delete", "blank", "--force"]);
    cloud.sv_json(&["vm", "create", "blank", "--type", "nano", "--no-start"]);
    let err = cloud.sv_err(&["vm", "restore", "blank", "b2"]);
    assert!(err.contains("belongs to another VM"), "{err}");
    let err = cloud.sv_err(&["vm", "restore", "steady", "b2"]);
    assert!(err.contains("no snapshot \"b2\""), "{err}");

    // The wrong size: stopped, resized, then restored to a smaller snapshot.
    cloud.sv_ok(&["vm", "stop", "steady"]);
    cloud.sv_ok(&["vm", "resize", "steady", "--type", "micro"]);
    let err = cloud.sv_err(&["vm", "restore", "steady", "s1"]);
    assert!(
        err.contains("needs instance type nano") && err.contains("resize it first"),
        "{err}"
    );
    cloud.sv_ok(&["vm", "resize", "steady", "--type", "nano"]);
    cloud.sv_ok(&["vm", "start", "steady", "--wait"]);
    // None of it touched the snapshot, which still restores.
    let r = cloud.sv_json(&["vm", "restore", "steady", "s1", "--wait"]);
    assert_eq!(r["status"]["restored_from"], "s1");
    assert_eq!(guest_json(ip, "/identity")["boot_id"], boot);
}

/// A tmpfs mounted over a directory for the length of a test.
struct TinyDisk(PathBuf);

impl TinyDisk {
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("mount");
        assert!(out.status.success(), "mount: {out:?}");
        Self(dir.to_owned())
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

#[test]
fn a_full_disk_fails_the_save_and_the_vm_runs_on() {
    let cloud = Cloud::start();
    let ip = cloud.create_vm("full", &["--type", "nano"]);
    let boot = guest_json(ip, "/identity")["boot_id"].clone();
    let pid = pid_of(&cloud, "full");
    let dir = snapshots_dir(&cloud, "full");
    let tiny = TinyDisk::mount(&dir, "16m");

    let err = cloud.sv_err(&["vm", "snapshot", "create", "full", "big"]);
    assert!(err.contains("No space left on device"), "{err}");
    let failed = snapshot_json(&cloud, "full", "big");
    assert_eq!(failed["state"], "failed");
    assert_eq!(failed["memory_bytes"], 0);
    assert!(
        leftovers(&dir).is_empty(),
        "temporary files left: {:?}",
        leftovers(&dir)
    );
    assert!(
        !dir.join("big").exists(),
        "a partial snapshot was published"
    );
    let (_, list) = cloud.api("GET", "/v1/instances/full/snapshots", None);
    assert!(
        list.as_array()
            .expect("list")
            .iter()
            .all(|s| s["state"] != "ready"),
        "{list}"
    );
    // The guest never noticed.
    assert_eq!(pid_of(&cloud, "full"), pid);
    assert_eq!(guest_json(ip, "/identity")["boot_id"], boot);
    guest_call(ip, "PUT", "/ram", Some("still here"));
    assert_eq!(cloud.instance("full")["status"]["phase"], "running");

    // With room again, the next one works.
    drop(tiny);
    let ok = cloud.sv_json(&["vm", "snapshot", "create", "full", "roomy"]);
    assert_eq!(ok["state"], "ready");
}

#[test]
fn interrupted_saves_leave_earlier_snapshots_intact() {
    // Slow saves (16 MiB/s) so that they can be interrupted half-way.
    let mut cloud = Cloud::start_with(CloudOptions {
        extra_env: vec![(
            "SKYVISOR_CHECKPOINT_MAX_BANDWIDTH".into(),
            (16u64 << 20).to_string(),
        )],
        ..Default::default()
    });
    let ip = cloud.create_vm("fragile", &["--type", "nano"]);
    let token = random_token();
    guest_call(ip, "PUT", "/ram", Some(&token));
    let good = cloud.sv_json(&["vm", "snapshot", "create", "fragile", "good"]);
    assert_eq!(good["state"], "ready");
    let dir = snapshots_dir(&cloud, "fragile");
    let good_size = std::fs::metadata(dir.join("good/memory"))
        .expect("memory file")
        .len();
    guest_call(ip, "PUT", "/ram", Some("after good"));

    // The daemon dies mid-save and comes back: the save is marked failed,
    // its files removed, and the guest runs on in the same QEMU.
    let pid = pid_of(&cloud, "fragile");
    cloud.sv_ok(&["vm", "snapshot", "create", "fragile", "cut", "--no-wait"]);
    wait_saving(&cloud, "fragile", "cut");
    cloud.kill_up();
    cloud.spawn_up();
    cloud.wait_ready();
    let cut = wait_settled(&cloud, "fragile", "cut");
    assert_eq!(cut["state"], "failed", "{cut}");
    assert!(
        cut["message"]
            .as_str()
            .unwrap_or("")
            .contains("agent restarted"),
        "{cut}"
    );
    wait_until("the guest running again", Duration::from_secs(60), || {
        let (status, v) = http(
            "GET",
            &format!("http://{ip}/ram"),
            None,
            Duration::from_secs(2),
        )
        .ok()?;
        (status == 200 && v.contains("after good")).then_some(())
    });
    assert_eq!(pid_of(&cloud, "fragile"), pid, "the VM was restarted");

    // QEMU dies mid-save: the save fails, the VM is restarted by its
    // restart policy, and the good snapshot still restores.
    cloud.sv_ok(&["vm", "snapshot", "create", "fragile", "crash", "--no-wait"]);
    wait_saving(&cloud, "fragile", "crash");
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill QEMU");
    let crash = wait_settled(&cloud, "fragile", "crash");
    assert_eq!(crash["state"], "failed", "{crash}");
    assert!(
        leftovers(&dir).is_empty(),
        "temporary files left: {:?}",
        leftovers(&dir)
    );
    assert!(!dir.join("crash").exists() && !dir.join("cut").exists());
    wait_until("restarted by policy", Duration::from_secs(120), || {
        let v = cloud.instance("fragile");
        (v["status"]["phase"] == "running" && v["status"]["guest_ready"] == true).then_some(())
    });
    assert_eq!(snapshot_json(&cloud, "fragile", "good")["state"], "ready");
    assert_eq!(
        std::fs::metadata(dir.join("good/memory"))
            .expect("memory file")
            .len(),
        good_size
    );
    cloud.sv_json(&["vm", "restore", "fragile", "good", "--wait"]);
    assert_eq!(guest_json(ip, "/ram")["value"], token.as_str());
}

#[test]
fn a_schedule_takes_checkpoints_and_prunes_only_its_own() {
    let cloud = Cloud::start();
    cloud.create_vm(
        "cron",
        &["--type", "nano", "--checkpoint-every", "5s", "--keep", "2"],
    );
    cloud.sv_json(&["vm", "snapshot", "create", "cron", "manual"]);
    let scheduled = |list: &Value| -> Vec<Value> {
        list.as_array()
            .expect("list")
            .iter()
            .filter(|s| s["origin"] == "scheduled")
            .cloned()
            .collect()
    };
    // Wait for a third scheduled checkpoint and the pruning it triggers.
    let mut seen = std::collections::BTreeSet::new();
    wait_until(
        "three scheduled checkpoints",
        Duration::from_secs(90),
        || {
            let (_, list) = cloud.api("GET", "/v1/instances/cron/snapshots", None);
            for s in scheduled(&list) {
                seen.insert(s["name"].as_str().unwrap_or("").to_string());
            }
            let ready: Vec<Value> = scheduled(&list)
                .into_iter()
                .filter(|s| s["state"] == "ready" && s["deleting"] == false)
                .collect();
            (seen.len() >= 3 && ready.len() == 2).then_some(())
        },
    );
    let (_, list) = cloud.api("GET", "/v1/instances/cron/snapshots", None);
    assert_eq!(
        list.as_array()
            .expect("list")
            .iter()
            .filter(|s| s["name"] == "manual" && s["state"] == "ready")
            .count(),
        1,
        "the manual snapshot was pruned: {list}"
    );
    for s in scheduled(&list) {
        assert_eq!(s["kind"], "full", "{s}");
    }
    let shown = cloud.sv_json(&["vm", "update", "cron", "--checkpoint-every", "off"]);
    assert!(shown["spec"]["checkpoint_schedule"].is_null(), "{shown}");
    let files = snapshots_dir(&cloud, "cron");
    cloud.sv_ok(&["vm", "delete", "cron", "--force", "--with-snapshots"]);
    wait_until("all snapshots gone", Duration::from_secs(60), || {
        let (_, v) = cloud.api("GET", "/v1/instances/cron/snapshots", None);
        (v.as_array().is_some_and(Vec::is_empty) && !files.exists()).then_some(())
    });
}

/// Counter kept on a VM's disk.
fn disk_counter(ip: Ipv4Addr) -> u64 {
    guest_json(ip, "/counter")["value"]
        .as_u64()
        .expect("counter")
}

#[test]
fn volume_backed_vm_checkpoints_restore_and_clone() {
    let bed = TestBed::start(2, 1);
    // In a cluster the root disk is a 2-replica volume by default.
    let created = bed.create_vm("ck", &["--type", "nano"]);
    let ip = vm_ip(&created);
    let root = &created["spec"]["volumes"][0];
    assert_eq!(root["name"], "ck-disk", "{created}");
    assert_eq!(root["root"], true, "{created}");
    for _ in 0..3 {
        guest_call(ip, "POST", "/counter/increment", None);
    }
    guest_call(ip, "PUT", "/ram", Some("ram-at-s1"));
    let boot = guest_json(ip, "/identity")["boot_id"].clone();

    // A live checkpoint: memory plus the root volume as it was at the pause.
    let s1 = bed.sv_json(&["vm", "snapshot", "create", "ck", "s1"]);
    assert_eq!(s1["state"], "ready", "{s1}");
    assert_eq!(s1["kind"], "full", "{s1}");
    assert!(s1["paused_ms"].as_u64().expect("paused_ms") < 1000, "{s1}");
    assert!(s1["disk_bytes"].as_u64().expect("disk_bytes") > 0, "{s1}");

    // Later writes, to disk and RAM, then back to s1.
    for _ in 0..2 {
        guest_call(ip, "POST", "/counter/increment", None);
    }
    guest_call(ip, "PUT", "/ram", Some("ram-later"));
    assert_eq!(disk_counter(ip), 5);
    let restored = bed.sv_json(&["vm", "restore", "ck", "s1", "--wait"]);
    assert_eq!(restored["status"]["restored_from"], "s1", "{restored}");
    assert_eq!(guest_json(ip, "/identity")["boot_id"], boot, "it rebooted");
    assert_eq!(guest_json(ip, "/ram")["value"], "ram-at-s1");
    assert_eq!(disk_counter(ip), 3, "the volume was not put back");
    // Both replicas hold the restored volume: writes go on and reach both.
    assert_eq!(
        guest_call(ip, "POST", "/counter/increment", None)["value"],
        4
    );
    let vol = bed.sv_json(&["volume", "show", "ck-disk"]);
    assert_eq!(vol["health"], "healthy", "{vol}");

    // A clone gets a root volume of its own, filled from the snapshot, and
    // continues the parent's RAM on its own address.
    let clone = bed.create_vm("ck2", &["--from-snapshot", "ck/s1"]);
    let clone_ip = vm_ip(&clone);
    assert_ne!(clone_ip, ip);
    assert_eq!(clone["spec"]["volumes"][0]["name"], "ck2-disk", "{clone}");
    assert_eq!(clone["spec"]["ha"], "restart", "{clone}");
    let cv = bed.sv_json(&["volume", "show", "ck2-disk"]);
    assert_eq!(cv["spec"]["replicas"], 2, "{cv}");
    assert_eq!(guest_json(clone_ip, "/identity")["name"], "ck2");
    assert_eq!(guest_json(clone_ip, "/ram")["value"], "ram-at-s1");
    assert_eq!(disk_counter(clone_ip), 3);
    // Each writes its own disk.
    guest_call(clone_ip, "POST", "/counter/increment", None);
    guest_call(clone_ip, "POST", "/counter/increment", None);
    assert_eq!(disk_counter(clone_ip), 5);
    assert_eq!(disk_counter(ip), 4);

    // A stopped VM gets a disk-only snapshot of its volume; restoring it
    // brings the volume back and the VM boots from it.
    bed.sv_ok(&["vm", "stop", "ck"]);
    let cold = bed.sv_json(&["vm", "snapshot", "create", "ck", "cold"]);
    assert_eq!(cold["kind"], "disk-only", "{cold}");
    assert_eq!(cold["state"], "ready", "{cold}");
    wait_until(
        "the stopped VM's volume released",
        Duration::from_secs(30),
        || {
            bed.sv_json(&["volume", "show", "ck-disk"])["primary"]
                .is_null()
                .then_some(())
        },
    );
    bed.sv_ok(&["vm", "start", "ck", "--wait", "--timeout", "300"]);
    assert_eq!(
        guest_call(ip, "POST", "/counter/increment", None)["value"],
        5
    );
    bed.sv_ok(&["vm", "stop", "ck"]);
    let r = bed.sv_json(&["vm", "restore", "ck", "cold", "--wait"]);
    assert_eq!(r["status"]["phase"], "stopped", "{r}");
    bed.sv_ok(&["vm", "start", "ck", "--wait", "--timeout", "300"]);
    assert_eq!(disk_counter(ip), 4, "the disk-only restore did not take");
}
