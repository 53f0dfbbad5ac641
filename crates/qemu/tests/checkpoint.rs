//! Checkpoints against real QEMU under TCG (no guest OS: firmware only):
//! save while running with a point-in-time disk copy, load into a new QEMU,
//! and the refusals that must leave the VM as it was.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use skyvisor_core::Accel;
use skyvisor_core::image::DiskFormat;
use skyvisor_qemu::checkpoint::{self, CheckpointError, DiskCapture, SavePlan};
use skyvisor_qemu::qmp::RunState;
use skyvisor_qemu::{CacheMode, DiskConfig, DiskSource, Incoming, QemuVm, VmConfig, launch};

/// SIGKILLs the QEMUs it knows of when dropped (also when a test fails).
#[derive(Default)]
struct Reaper(Vec<i32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in &self.0 {
            if let Some(p) = rustix::process::Pid::from_raw(*pid) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
    }
}

fn qcow2(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg("64M")
        .output()
        .expect("qemu-img");
    assert!(out.status.success(), "{out:?}");
}

fn config(dir: &Path, name: &str, disk: &Path) -> VmConfig {
    let mut c = VmConfig::new(name, uuid::Uuid::new_v4(), dir.join(name), Accel::Tcg);
    c.memory_mib = 128;
    c.disks.push(DiskConfig {
        id: "root".into(),
        source: DiskSource::File {
            path: disk.to_owned(),
            format: DiskFormat::Qcow2,
        },
        read_only: false,
        cache: CacheMode::Writeback,
    });
    c
}

async fn status(vm: &QemuVm) -> RunState {
    vm.qmp().query_status().await.expect("query-status").status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_while_running_then_load_into_a_new_qemu() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut reaper = Reaper::default();
    let root = dir.path().join("root.qcow2");
    qcow2(&root);
    let a = launch(&config(dir.path(), "ck-a", &root))
        .await
        .expect("launch");
    reaper.0.push(a.pid());
    a.qmp().cont().await.expect("cont");

    // Saving needs a running VM and a new file; refusals leave it running.
    let memory = dir.path().join("memory");
    std::fs::write(&memory, b"taken").expect("write");
    let err = checkpoint::save(a.qmp(), &SavePlan::new(&memory), |_| {})
        .await
        .expect_err("existing file");
    assert!(err.to_string().contains("creating"), "{err}");
    assert_eq!(status(&a).await, RunState::Running);
    std::fs::remove_file(&memory).expect("rm");

    let target = dir.path().join("disk.qcow2");
    qcow2(&target);
    let mut plan = SavePlan::new(&memory);
    plan.disk = Some(DiskCapture {
        node: "root".into(),
        target_file: target.clone(),
        target_node: "ckpt".into(),
        job_id: "ckpt".into(),
        full: false,
    });
    let mut reports = 0;
    let report = checkpoint::save(a.qmp(), &plan, |_| reports += 1)
        .await
        .expect("save");
    assert!(reports >= 1, "no progress reported");
    assert!(report.paused < Duration::from_secs(2), "{report:?}");
    assert!(report.ram_transferred > 0, "{report:?}");
    assert_eq!(status(&a).await, RunState::Running, "left paused");
    assert!(a.qmp().query_jobs().await.expect("jobs").is_empty());
    let check = Command::new("qemu-img")
        .args(["check", "-q"])
        .arg(&target)
        .output()
        .expect("check");
    assert!(check.status.success(), "{check:?}");
    assert!(std::fs::metadata(&memory).expect("memory").len() > 0);

    // The same machine loads it and runs on.
    let mut b_cfg = config(dir.path(), "ck-b", &target);
    b_cfg.incoming = Some(Incoming::Defer);
    let b = launch(&b_cfg).await.expect("launch b");
    reaper.0.push(b.pid());
    checkpoint::load(b.qmp(), &memory, Duration::from_secs(120))
        .await
        .expect("load");
    b.qmp().cont().await.expect("cont b");
    assert_eq!(status(&b).await, RunState::Running);

    // A paused VM is not saved.
    b.qmp().stop().await.expect("stop");
    let err = checkpoint::save(b.qmp(), &SavePlan::new(dir.path().join("m2")), |_| {})
        .await
        .expect_err("paused");
    assert!(matches!(err, CheckpointError::NotRunning { .. }), "{err}");

    // A file that is not a checkpoint fails the load (QEMU exits).
    let mut c_cfg = config(dir.path(), "ck-c", &target);
    c_cfg.incoming = Some(Incoming::Defer);
    let c = launch(&c_cfg).await.expect("launch c");
    reaper.0.push(c.pid());
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![7u8; 8192]).expect("junk");
    let err = checkpoint::load(c.qmp(), &junk, Duration::from_secs(60))
        .await
        .expect_err("junk");
    assert!(matches!(err, CheckpointError::LoadFailed { .. }), "{err}");
}
