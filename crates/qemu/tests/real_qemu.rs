//! The driver against real QEMU under TCG: lifecycle, failures users see,
//! re-attaching after the owner dies, live migration and the boot probe.
//!
//! Tests run one at a time (one lock) since the machine has two cores, and
//! every QEMU started is SIGKILLed by a guard, even when a test fails.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde_json::{Value, json};
use skyvisor_core::image::DiskFormat;
use skyvisor_core::{Accel, MacAddr};
use skyvisor_qemu::qmp::{
    EventKind, MigrationCapability, MigrationStatus, RunState, ShutdownCause, ShutdownInfo,
};
use skyvisor_qemu::{
    Boot, CacheMode, DiskConfig, DiskSource, Incoming, NbdServer, NicConfig, PROBE_MARKER,
    ProbeOutcome, ProcessExit, QemuError, QemuVm, VmConfig, attach, files, launch,
    probe_accel_boot, qemu_version,
};
use tokio::time::Instant;

const QEMU: &str = "qemu-system-x86_64";
/// Generous: TCG on two busy cores.
const DEADLINE: Duration = Duration::from_secs(120);

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner)
}

fn run<F: std::future::Future>(f: F) -> F::Output {
    let _serial = one_at_a_time();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// SIGKILLs the QEMUs it knows of when dropped (test cleanup, also on panic).
#[derive(Default)]
struct Reaper(Vec<i32>);

impl Reaper {
    fn watch(&mut self, vm: &QemuVm) {
        self.0.push(vm.pid());
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in &self.0 {
            if let Some(p) = rustix::process::Pid::from_raw(*pid) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
    }
}

fn config(dir: &Path, name: &str) -> VmConfig {
    let mut c = VmConfig::new(name, uuid::Uuid::new_v4(), dir.join(name), Accel::Tcg);
    c.qemu_binary = QEMU.into();
    c.memory_mib = 128;
    c.start_timeout = DEADLINE;
    c
}

async fn until<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn status(vm: &QemuVm) -> RunState {
    vm.qmp().query_status().await.expect("query-status").status
}

#[test]
fn lifecycle_pause_run_reset_quit() {
    run(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut reaper = Reaper::default();
        let mut cfg = config(dir.path(), "life");
        cfg.sandbox = true;
        let vm = launch(&cfg).await.expect("launch");
        reaper.watch(&vm);
        assert!(vm.spawned());
        let pidfile = fs::read_to_string(cfg.run_dir.join(files::PIDFILE)).expect("pidfile");
        assert_eq!(pidfile.trim(), vm.pid().to_string());

        let st = vm.qmp().query_status().await.expect("status");
        assert_eq!(
            (st.running, st.status),
            (false, RunState::Prelaunch),
            "starts paused (-S)"
        );

        let mut events = vm.qmp().events();
        vm.qmp().cont().await.expect("cont");
        assert_eq!(
            events.recv().await.expect("event").kind(),
            EventKind::Resume
        );
        assert_eq!(status(&vm).await, RunState::Running);

        vm.qmp().stop().await.expect("stop");
        assert_eq!(events.recv().await.expect("event").kind(), EventKind::Stop);
        assert_eq!(status(&vm).await, RunState::Paused);
        vm.qmp().cont().await.expect("cont");

        vm.qmp().system_reset().await.expect("reset");
        let reset = events
            .wait_for(|e| e.name == "RESET")
            .await
            .expect("reset event");
        assert_eq!(
            reset.kind(),
            EventKind::Reset(ShutdownInfo {
                guest: false,
                reason: ShutdownCause::HostQmpSystemReset
            })
        );
        assert_eq!(status(&vm).await, RunState::Running);
        assert!(vm.exited().is_none());

        vm.qmp().quit().await.expect("quit");
        let exit = tokio::time::timeout(DEADLINE, vm.wait_exit())
            .await
            .expect("exits");
        assert_eq!(exit.status, ProcessExit::Code(0));
        assert_eq!(
            exit.shutdown,
            Some(ShutdownInfo {
                guest: false,
                reason: ShutdownCause::HostQmpQuit
            })
        );
        assert_eq!(vm.exited(), Some(exit.clone()));
        assert!(!vm.qmp().is_connected());
        assert!(exit.to_string().contains("host-qmp-quit"), "{exit}");
    });
}

#[test]
fn start_failure_shows_qemus_complaint() {
    run(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = config(dir.path(), "nokernel");
        let missing = dir.path().join("no-such-vmlinuz");
        cfg.boot = Boot::Kernel {
            kernel: missing.clone(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
        };
        let started = Instant::now();
        match launch(&cfg).await {
            Err(e @ QemuError::StartFailed { .. }) => {
                let QemuError::StartFailed {
                    status,
                    stderr_tail,
                } = &e
                else {
                    unreachable!()
                };
                assert_eq!(*status, ProcessExit::Code(1));
                assert!(
                    stderr_tail.contains("could not open kernel file"),
                    "{stderr_tail}"
                );
                assert!(
                    stderr_tail.contains(missing.to_str().expect("utf-8")),
                    "{stderr_tail}"
                );
                assert!(
                    !stderr_tail.contains("--- skyvisor"),
                    "our header is not QEMU's complaint"
                );
                let msg = e.to_string();
                assert!(
                    msg.starts_with("QEMU exited during startup (exit code 1): "),
                    "{msg}"
                );
            }
            other => panic!("expected StartFailed, got {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "failure is reported at once"
        );

        // A bad option: QEMU's complaint again, and only this run's.
        cfg.boot = Boot::Firmware;
        cfg.machine = "no-such-machine".into();
        match launch(&cfg).await {
            Err(QemuError::StartFailed { stderr_tail, .. }) => {
                assert!(stderr_tail.contains("no-such-machine"), "{stderr_tail}");
                assert!(
                    !stderr_tail.contains("could not open kernel"),
                    "{stderr_tail}"
                );
            }
            other => panic!("expected StartFailed, got {other:?}"),
        }
    });
}

#[test]
fn missing_binary_is_named() {
    run(async {
        let dir = tempfile::tempdir().expect("tempdir");
        for binary in ["/nonexistent/qemu-system-x86_64", "no-such-qemu-binary"] {
            let mut cfg = config(dir.path(), "nobin");
            cfg.qemu_binary = binary.into();
            match launch(&cfg).await {
                Err(QemuError::BinaryNotFound { path }) => assert_eq!(path, PathBuf::from(binary)),
                other => panic!("expected BinaryNotFound, got {other:?}"),
            }
        }
        let e = qemu_version(Path::new("/nonexistent/qemu"))
            .await
            .expect_err("missing");
        assert!(matches!(e, QemuError::BinaryNotFound { .. }));
    });
}

#[test]
fn version_matches_qmp_greeting() {
    run(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut reaper = Reaper::default();
        let v = qemu_version(Path::new(QEMU)).await.expect("version");
        let vm = launch(&config(dir.path(), "ver")).await.expect("launch");
        reaper.watch(&vm);
        assert_eq!(v, vm.qmp().greeting().version.to_string());
        assert_eq!(
            v,
            vm.qmp()
                .query_version()
                .await
                .expect("query-version")
                .qemu
                .to_string()
        );
        vm.kill().expect("kill");
    });
}

#[test]
fn sigkill_is_reported_as_the_signal() {
    run(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut reaper = Reaper::default();
        let vm = launch(&config(dir.path(), "killme")).await.expect("launch");
        reaper.watch(&vm);
        vm.qmp().cont().await.expect("cont");
        vm.kill().expect("kill");
        let exit = tokio::time::timeout(DEADLINE, vm.wait_exit())
            .await
            .expect("exits");
        assert_eq!(exit.status, ProcessExit::Signal(9));
        assert_eq!(exit.shutdown, None);
        assert!(exit.to_string().contains("killed by SIGKILL"), "{exit}");
        vm.kill().expect("killing a dead QEMU is fine");
    });
}

#[test]
fn reattach_after_the_owner_lets_go() {
    run(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut reaper = Reaper::default();
        let cfg = config(dir.path(), "reattach");
        let vm = launch(&cfg).await.expect("launch");
        reaper.watch(&vm);
        let pid = vm.pid();
        vm.qmp().cont().await.expect("cont");

        // While it runs, nobody may start a second QEMU in its directory.
        match launch(&cfg).await {
            Err(QemuError::AlreadyRunning { pid: p, .. }) => assert_eq!(p, pid),
            other => panic!("expected AlreadyRunning, got {other:?}"),
        }

        drop(vm); // the agent "exits"
        let vm = attach(&cfg.run_dir).await.expect("attach");
        assert_eq!(vm.pid(), pid);
        assert!(!vm.spawned());
        assert_eq!(status(&vm).await, RunState::Running, "QEMU kept running");

        // Killed from outside: seen through the pidfd, status unknown.
        let p = rustix::process::Pid::from_raw(pid).expect("pid");
        rustix::process::kill_process(p, rustix::process::Signal::KILL).expect("kill");
        let exit = tokio::time::timeout(DEADLINE, vm.wait_exit())
            .await
            .expect("exit seen");
        assert_eq!(exit.status, ProcessExit::Unknown);
        drop(vm);

        match attach(&cfg.run_dir).await {
            Err(QemuError::NotRunning { reason, .. }) => assert!(
                reason.contains("exited") || reason.contains("pidfile"),
                "{reason}"
            ),
            other => panic!("expected NotRunning, got {other:?}"),
        }
        // A pidfile naming some other live process.
        let other = dir.path().join("other");
        fs::create_dir_all(&other).expect("mkdir");
        fs::write(
            other.join(files::PIDFILE),
            format!("{}\n", std::process::id()),
        )
        .expect("write");
        assert!(matches!(
            attach(&other).await,
            Err(QemuError::PidMismatch { .. })
        ));
        let empty = dir.path().join("empty");
        fs::create_dir_all(&empty).expect("mkdir");
        assert!(matches!(
            attach(&empty).await,
            Err(QemuError::NotRunning { .. })
        ));
    });
}

const SPAWNER_ENV: &str = "SKYVISOR_QEMU_TEST_SPAWNER_RUN_DIR";

/// Starts QEMU from a child process that then exits at once, as a crashing
/// agent would, and finds QEMU still there. The test binary plays the
/// child when it finds the run directory in its environment.
#[test]
fn qemu_survives_its_spawner() {
    if let Ok(run_dir) = std::env::var(SPAWNER_ENV) {
        let run_dir = PathBuf::from(run_dir);
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let vm = rt
            .block_on(launch(&config(run_dir.parent().expect("parent"), "orphan")))
            .expect("launch in the spawner");
        println!("QEMU_PID={}", vm.pid());
        let _ = std::io::stdout().flush();
        // Die without any cleanup.
        std::process::exit(0);
    }
    run(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut reaper = Reaper::default();
        let run_dir = dir.path().join("orphan");
        let out = tokio::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "qemu_survives_its_spawner",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(SPAWNER_ENV, &run_dir)
            .output()
            .await
            .expect("run spawner");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let pid: i32 = stdout
            .lines()
            .find_map(|l| l.split_once("QEMU_PID="))
            .and_then(|(_, p)| p.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "spawner did not report a pid: {stdout} {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        reaper.0.push(pid);
        assert!(out.status.success(), "spawner failed: {:?}", out.status);

        let vm = attach(&run_dir).await.expect("attach to the orphan");
        assert_eq!(vm.pid(), pid);
        assert_eq!(status(&vm).await, RunState::Prelaunch);
        // Its own session, so the spawner's terminal signals never reach it.
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .expect("stat")
            .1
            .split_whitespace()
            .collect();
        assert_eq!(fields[3], pid.to_string(), "session id is its own pid");

        vm.qmp().quit().await.expect("quit");
        let exit = tokio::time::timeout(DEADLINE, vm.wait_exit())
            .await
            .expect("exit");
        assert_eq!(exit.status, ProcessExit::Unknown);
        assert_eq!(
            exit.shutdown.map(|s| s.reason),
            Some(ShutdownCause::HostQmpQuit)
        );
    });
}

#[test]
fn live_migration_over_a_unix_socket() {
    run(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut reaper = Reaper::default();
        let mut a_cfg = config(dir.path(), "mig-a");
        a_cfg.guest_channel = true;
        let mut b_cfg = a_cfg.clone();
        b_cfg.run_dir = dir.path().join("mig-b");
        b_cfg.incoming = Some(Incoming::Defer);

        let a = launch(&a_cfg).await.expect("launch source");
        reaper.watch(&a);
        let b = launch(&b_cfg).await.expect("launch destination");
        reaper.watch(&b);
        assert_eq!(status(&b).await, RunState::Inmigrate);
        a.qmp().cont().await.expect("cont source");

        let caps = [(MigrationCapability::Events, true)];
        a.qmp()
            .migrate_set_capabilities(&caps)
            .await
            .expect("caps a");
        b.qmp()
            .migrate_set_capabilities(&caps)
            .await
            .expect("caps b");
        let mut b_events = b.qmp().events();
        let uri = format!("unix:{}", dir.path().join("migrate.sock").display());
        b.qmp()
            .migrate_incoming(&uri)
            .await
            .expect("migrate-incoming");
        a.qmp().migrate(&uri).await.expect("migrate");

        let info = until("migration to finish", async || {
            let info = a.qmp().query_migrate().await.expect("query-migrate");
            info.status
                .as_ref()
                .is_some_and(MigrationStatus::is_finished)
                .then_some(info)
        })
        .await;
        assert_eq!(info.status, Some(MigrationStatus::Completed), "{info:?}");
        let ram = info.ram.clone().expect("ram stats");
        assert!(ram.total >= 128 << 20, "{ram:?}");
        assert!(ram.transferred > 0 && ram.remaining == 0, "{ram:?}");
        assert!(
            info.total_time.is_some() && info.downtime.is_some(),
            "{info:?}"
        );

        let done = b_events
            .wait_for(|e| {
                e.kind()
                    == EventKind::Migration {
                        status: MigrationStatus::Completed,
                    }
            })
            .await;
        assert!(done.is_some(), "destination saw the migration complete");
        assert_eq!(status(&a).await, RunState::Postmigrate);
        // The destination was started with -S, so it waits for the owner.
        let b_status = until("destination to leave inmigrate", async || {
            let s = status(&b).await;
            (s != RunState::Inmigrate).then_some(s)
        })
        .await;
        assert_eq!(b_status, RunState::Paused);
        b.qmp().cont().await.expect("cont destination");
        assert_eq!(status(&b).await, RunState::Running);
        b.qmp()
            .announce_self(&Default::default())
            .await
            .expect("announce");

        a.qmp().quit().await.expect("quit source");
        b.qmp().quit().await.expect("quit destination");
        for vm in [&a, &b] {
            let exit = tokio::time::timeout(DEADLINE, vm.wait_exit())
                .await
                .expect("exit");
            assert_eq!(exit.status, ProcessExit::Code(0));
        }
    });
}

/// Disks of every kind, a NIC on a real tap, the guest channel and the
/// sandbox: QEMU accepts the command line and shows the devices; disks hot
/// plug through the same JSON.
#[test]
fn devices_are_accepted_by_qemu() {
    run(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut reaper = Reaper::default();
        let qcow = dir.path().join("root.qcow2");
        let raw = dir.path().join("seed.raw");
        let vol = dir.path().join("vol.raw");
        let hot = dir.path().join("hot.qcow2");
        for (path, fmt) in [
            (&qcow, "qcow2"),
            (&raw, "raw"),
            (&vol, "raw"),
            (&hot, "qcow2"),
        ] {
            let st = Command::new("qemu-img")
                .args(["create", "-q", "-f", fmt])
                .arg(path)
                .arg("16M")
                .status()
                .expect("qemu-img");
            assert!(st.success());
        }
        let nbd_sock = dir.path().join("nbd.sock");
        let mut nbd = KillOnDrop(
            Command::new("qemu-nbd")
                .args([
                    "--persistent",
                    "--shared=4",
                    "--format=raw",
                    "--export-name=vol",
                ])
                .arg(format!("--socket={}", nbd_sock.display()))
                .arg(&vol)
                .spawn()
                .expect("qemu-nbd"),
        );
        // Connectable, not just bound.
        until("qemu-nbd to listen", async || {
            std::os::unix::net::UnixStream::connect(&nbd_sock)
                .ok()
                .map(drop)
        })
        .await;
        let tap = Tap::create();

        let mut cfg = config(dir.path(), "devices");
        cfg.sandbox = true;
        cfg.guest_channel = true;
        cfg.disks = vec![
            DiskConfig {
                id: "root".into(),
                source: DiskSource::File {
                    path: qcow.clone(),
                    format: DiskFormat::Qcow2,
                },
                read_only: false,
                cache: CacheMode::None,
            },
            DiskConfig {
                id: "seed".into(),
                source: DiskSource::File {
                    path: raw.clone(),
                    format: DiskFormat::Raw,
                },
                read_only: true,
                cache: CacheMode::Writethrough,
            },
            DiskConfig {
                id: "vol".into(),
                source: DiskSource::Nbd {
                    server: NbdServer::Unix {
                        path: nbd_sock.clone(),
                    },
                    export: "vol".into(),
                    reconnect_delay_secs: Some(5),
                },
                read_only: false,
                cache: CacheMode::Writeback,
            },
        ];
        cfg.nics = vec![NicConfig {
            id: "net0".into(),
            ifname: tap.name.clone(),
            mac: MacAddr::derived_from(b"devices"),
            vhost: false,
            fd: None,
        }];
        let vm = launch(&cfg).await.expect("launch with devices");
        reaper.watch(&vm);
        assert!(
            cfg.run_dir.join(files::GUEST_SOCKET).exists(),
            "guest channel socket"
        );
        assert!(
            cfg.run_dir.join(files::CONSOLE_SOCKET).exists(),
            "console socket"
        );

        let blocks = vm
            .qmp()
            .execute("query-block", Value::Null)
            .await
            .expect("query-block");
        let devices: Vec<(String, bool)> = blocks
            .as_array()
            .expect("list")
            .iter()
            .map(|b| {
                let qdev = b["qdev"].as_str().unwrap_or_default().to_owned();
                (qdev, b["inserted"]["ro"].as_bool().unwrap_or_default())
            })
            .collect();
        for want in ["root", "seed", "vol"] {
            assert!(
                devices.iter().any(|(q, _)| q.contains(want)),
                "{want} missing from {devices:?}"
            );
        }
        assert!(
            devices.iter().any(|(q, ro)| q.contains("seed") && *ro),
            "seed is read-only: {devices:?}"
        );
        let nics = vm
            .qmp()
            .human_monitor_command("info network")
            .await
            .expect("info network");
        assert!(nics.contains(&tap.name), "{nics}");

        // Hot plug a disk with the same JSON as the command line.
        let extra = DiskConfig {
            id: "hot".into(),
            source: DiskSource::File {
                path: hot.clone(),
                format: DiskFormat::Qcow2,
            },
            read_only: false,
            cache: CacheMode::Writeback,
        };
        vm.qmp()
            .blockdev_add(extra.blockdev_json().expect("json"))
            .await
            .expect("blockdev-add");
        vm.qmp()
            .device_add(extra.device_json(false))
            .await
            .expect("device_add");
        let blocks = vm
            .qmp()
            .execute("query-block", Value::Null)
            .await
            .expect("query-block");
        assert!(blocks.to_string().contains("hot"), "{blocks}");
        let e = vm
            .qmp()
            .blockdev_del("hot")
            .await
            .expect_err("in use by the device");
        assert!(e.to_string().contains("blockdev-del"), "{e}");
        let spare = DiskConfig {
            id: "spare".into(),
            ..extra.clone()
        };
        let spare_src = dir.path().join("spare.qcow2");
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&spare_src)
            .arg("1M")
            .status()
            .expect("qemu-img");
        assert!(st.success());
        let spare = DiskConfig {
            source: DiskSource::File {
                path: spare_src,
                format: DiskFormat::Qcow2,
            },
            ..spare
        };
        vm.qmp()
            .blockdev_add(spare.blockdev_json().expect("json"))
            .await
            .expect("add spare");
        vm.qmp()
            .blockdev_del("spare")
            .await
            .expect("remove unused node");

        // QEMU serves a disk over NBD (block-export-add) and a real client reads it.
        let export_sock = dir.path().join("export.sock");
        vm.qmp()
            .nbd_server_start(&skyvisor_qemu::qmp::NbdListen::Unix {
                path: export_sock.clone(),
            })
            .await
            .expect("nbd-server-start");
        vm.qmp()
            .nbd_server_add("root", "root-export", false)
            .await
            .expect("export");
        let size = Command::new("qemu-img")
            .args(["info", "--output=json", "--image-opts"])
            .arg(format!(
                "driver=nbd,server.type=unix,server.path={},export=root-export",
                export_sock.display()
            ))
            .output()
            .expect("qemu-img info");
        let info: Value = serde_json::from_slice(&size.stdout).unwrap_or(json!({}));
        assert_eq!(
            info["virtual-size"],
            16 << 20,
            "{}",
            String::from_utf8_lossy(&size.stderr)
        );
        vm.qmp()
            .nbd_server_remove("root-export")
            .await
            .expect("remove export");
        vm.qmp().nbd_server_stop().await.expect("nbd-server-stop");

        vm.qmp().quit().await.expect("quit");
        let exit = tokio::time::timeout(DEADLINE, vm.wait_exit())
            .await
            .expect("exit");
        assert_eq!(exit.status, ProcessExit::Code(0));
        nbd.0.kill().ok();
    });
}

#[test]
fn probe_boots_a_guest_under_tcg() {
    run(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = host_kernel();
        let initrd = dir.path().join("probe.cpio");
        fs::write(&initrd, probe_initramfs()).expect("initramfs");

        let out = probe_accel_boot(
            Path::new(QEMU),
            &kernel,
            Some(&initrd),
            "quiet",
            Accel::Tcg,
            DEADLINE,
        )
        .await
        .expect("probe");
        match out {
            ProbeOutcome::Booted { after } => assert!(after < DEADLINE),
            other => panic!("expected Booted, got {other:?}"),
        }

        // Far too short for a boot under TCG.
        let out = probe_accel_boot(
            Path::new(QEMU),
            &kernel,
            Some(&initrd),
            "",
            Accel::Tcg,
            Duration::from_millis(300),
        )
        .await
        .expect("probe");
        assert!(matches!(out, ProbeOutcome::TimedOut { .. }), "{out:?}");

        let out = probe_accel_boot(
            Path::new(QEMU),
            &dir.path().join("missing"),
            None,
            "",
            Accel::Tcg,
            DEADLINE,
        )
        .await
        .expect("probe");
        match out {
            ProbeOutcome::Failed { status, stderr, .. } => {
                assert_eq!(status, ProcessExit::Code(1));
                assert!(stderr.contains("could not open kernel file"), "{stderr}");
            }
            other => panic!("expected Failed, got {other:?}"),
        }

        // The guest runs but never prints the marker (it powers off): Failed,
        // with its console output to tell why.
        let quiet = dir.path().join("silent.cpio");
        fs::write(&quiet, initramfs("#!/bin/busybox sh\n/bin/busybox echo guest-up-no-marker\n/bin/busybox poweroff -f\n")).expect("initramfs");
        let out = probe_accel_boot(
            Path::new(QEMU),
            &kernel,
            Some(&quiet),
            "",
            Accel::Tcg,
            DEADLINE,
        )
        .await
        .expect("probe");
        match out {
            ProbeOutcome::Failed { serial_tail, .. } => {
                assert!(serial_tail.contains("guest-up-no-marker"), "{serial_tail}")
            }
            other => panic!("expected Failed, got {other:?}"),
        }

        // No probe QEMU is left behind.
        let left = Command::new("pgrep")
            .args(["-f", dir.path().to_str().expect("utf-8")])
            .output()
            .expect("pgrep");
        assert!(
            left.stdout.is_empty(),
            "probe QEMUs left: {}",
            String::from_utf8_lossy(&left.stdout)
        );
    });
}

/// The tap's carrier: on while some open file is attached to it.
fn carrier(tap: &str) -> String {
    fs::read_to_string(format!("/sys/class/net/{tap}/carrier"))
        .expect("carrier")
        .trim()
        .to_owned()
}

#[test]
fn a_tap_file_handed_to_the_next_qemu_keeps_the_tap_attached() {
    run(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut reaper = Reaper::default();
        let tap = Tap::create();
        let st = Command::new("ip")
            .args(["link", "set", &tap.name, "up"])
            .status()
            .expect("ip link");
        assert!(st.success());
        let nic = NicConfig {
            id: "net0".into(),
            ifname: tap.name.clone(),
            mac: MacAddr::derived_from(b"handover"),
            vhost: false,
            fd: None,
        };
        let mut first = config(dir.path(), "first");
        first.nics = vec![nic.clone()];
        let vm = launch(&first).await.expect("launch the first QEMU");
        reaper.watch(&vm);
        assert_eq!(carrier(&tap.name), "1", "QEMU attached the tap");
        assert!(
            vm.tap_file("svqt-none").expect("look up").is_none(),
            "no file of another tap"
        );
        let held = vm
            .tap_file(&tap.name)
            .expect("look up")
            .expect("QEMU's tap file");

        vm.qmp().quit().await.expect("quit");
        tokio::time::timeout(DEADLINE, vm.wait_exit())
            .await
            .expect("exits");
        assert_eq!(
            carrier(&tap.name),
            "1",
            "the held file keeps the tap attached with no QEMU"
        );

        let mut second = config(dir.path(), "second");
        second.nics = vec![NicConfig {
            fd: Some(std::os::fd::AsRawFd::as_raw_fd(&held)),
            ..nic
        }];
        let next = launch(&second).await.expect("launch with the held file");
        reaper.watch(&next);
        drop(held);
        let nics = next
            .qmp()
            .human_monitor_command("info network")
            .await
            .expect("info network");
        assert!(nics.contains("type=tap,fd="), "{nics}");
        assert_eq!(
            carrier(&tap.name),
            "1",
            "the second QEMU holds the file we let go"
        );
        next.qmp().quit().await.expect("quit");
        tokio::time::timeout(DEADLINE, next.wait_exit())
            .await
            .expect("exits");
        assert_eq!(carrier(&tap.name), "0", "no file is left attached");
    });
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A tap device for the test, removed on drop.
struct Tap {
    name: String,
}

impl Tap {
    fn create() -> Self {
        let name = format!("svqt{}", std::process::id() % 100_000);
        let st = Command::new("ip")
            .args(["tuntap", "add", "dev", &name, "mode", "tap"])
            .status()
            .expect("ip tuntap");
        assert!(st.success(), "cannot create tap {name}");
        Self { name }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .status();
    }
}

/// The guest kernel and busybox, fetched the way the product fetches them
/// (the image pipeline's Debian packages, cached under `target/test-cache`):
/// a fresh host has no kernel in `/boot` and no busybox.
fn guest_parts() -> &'static skyvisor_image::GuestParts {
    static PARTS: std::sync::OnceLock<skyvisor_image::GuestParts> = std::sync::OnceLock::new();
    PARTS.get_or_init(|| {
        let cache = std::env::var_os("SKYVISOR_TEST_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/test-cache")
            });
        // Its own thread: callers may be inside a runtime already.
        std::thread::spawn(move || {
            tokio::runtime::Runtime::new()
                .expect("runtime")
                .block_on(skyvisor_image::guest_parts(&cache))
        })
        .join()
        .expect("fetching thread")
        .expect("the guest kernel and busybox from Debian packages")
    })
}

fn host_kernel() -> PathBuf {
    guest_parts().kernel.clone()
}

/// A busybox initramfs that prints the probe marker when asked.
fn probe_initramfs() -> Vec<u8> {
    initramfs(&format!(
        "#!/bin/busybox sh\n\
         /bin/busybox mount -t proc proc /proc\n\
         if /bin/busybox grep -q sv.probe=1 /proc/cmdline; then /bin/busybox echo {PROBE_MARKER}; fi\n\
         /bin/busybox poweroff -f\n"
    ))
}

/// A newc cpio archive with busybox and `init`.
fn initramfs(init: &str) -> Vec<u8> {
    let busybox = fs::read(&guest_parts().busybox).expect("busybox");
    let mut out = Vec::new();
    let entries: [(&str, u32, &[u8]); 4] = [
        ("bin", 0o040755, b""),
        ("proc", 0o040755, b""),
        ("bin/busybox", 0o100755, &busybox),
        ("init", 0o100755, init.as_bytes()),
    ];
    for (ino, (name, mode, data)) in entries.iter().enumerate() {
        cpio_entry(&mut out, ino + 1, name, *mode, data);
    }
    cpio_entry(&mut out, 0, "TRAILER!!!", 0, b"");
    out
}

fn cpio_entry(out: &mut Vec<u8>, ino: usize, name: &str, mode: u32, data: &[u8]) {
    let nlink = if mode & 0o040000 != 0 { 2 } else { 1 };
    let fields = [
        ino,
        mode as usize,
        0,
        0,
        nlink,
        0,
        data.len(),
        0,
        0,
        0,
        0,
        name.len() + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}
