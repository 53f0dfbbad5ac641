//! [`Hypervisor`] on QEMU, through the `skyvisor-qemu` driver.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use skyvisor_core::image::DiskFormat;
use skyvisor_core::{ExitReason, SnapshotProgress};
use skyvisor_qemu::checkpoint::{self, DiskCapture, SavePlan};
use skyvisor_qemu::qmp::{EventKind, EventStreamError, MigrationStatus, RunState, ShutdownCause};
use skyvisor_qemu::{
    Boot, CacheMode, DiskConfig, DiskSource, ExitInfo, Incoming, NbdServer, NicConfig, ProcessExit,
    QemuVm, VmConfig, files,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::hypervisor::{
    CheckpointOutcome, CheckpointPlan, HvError, Hypervisor, LaunchBoot, LaunchVolume, Vm, VmEvent,
    VmExit, VmLaunch,
};

/// The block node of the root disk (its disk id in [`QemuHypervisor::config`]).
const ROOT_NODE: &str = "root";
/// Caps the write rate of checkpoints (bytes per second), to leave the
/// host's disk to its VMs; unset, checkpoints write as fast as they can.
pub const MAX_BANDWIDTH_ENV: &str = "SKYVISOR_CHECKPOINT_MAX_BANDWIDTH";
/// The NIC's id.
const NIC_ID: &str = "net0";
/// How long loading a saved memory file may take.
const LOAD_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the guest gets to answer on its control channel.
const GUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long QEMU keeps retrying a lost connection to the agent's NBD server
/// (an agent restart) before failing the guest's I/O.
const NBD_RECONNECT_SECS: u32 = 60;

/// QEMU's disk for a volume served by the agent's NBD server.
pub fn volume_disk(v: &LaunchVolume) -> DiskConfig {
    DiskConfig {
        id: v.disk_id.clone(),
        source: DiskSource::Nbd {
            server: NbdServer::Unix {
                path: v.socket.clone(),
            },
            export: v.export.clone(),
            reconnect_delay_secs: Some(NBD_RECONNECT_SECS),
        },
        read_only: false,
        // The guest sees a write cache and flushes it: FLUSH and FUA reach
        // every in-sync replica.
        cache: CacheMode::Writeback,
    }
}

/// Runs VMs as QEMU processes.
pub struct QemuHypervisor {
    /// The QEMU binary.
    pub binary: PathBuf,
}

impl QemuHypervisor {
    /// QEMU's configuration for a launch.
    pub fn config(&self, l: &VmLaunch) -> VmConfig {
        let mut cfg = VmConfig::new(&l.name, l.instance.0, &l.run_dir, l.accel);
        cfg.qemu_binary = self.binary.clone();
        cfg.vcpus = l.resources.vcpus;
        cfg.memory_mib = l.resources.memory_mib;
        cfg.boot = match &l.boot {
            LaunchBoot::Kernel {
                kernel,
                initrd,
                cmdline,
            } => Boot::Kernel {
                kernel: kernel.clone(),
                initrd: initrd.clone(),
                cmdline: cmdline.clone(),
            },
            LaunchBoot::Firmware => Boot::Firmware,
        };
        // Data volumes are hot-plugged before the guest runs (see
        // `launch`), with their serial numbers.
        cfg.disks = vec![match l.root_volume() {
            Some(v) => volume_disk(v),
            None => DiskConfig {
                id: "root".into(),
                source: DiskSource::File {
                    path: l.root_disk.clone(),
                    format: DiskFormat::Qcow2,
                },
                read_only: false,
                // Host page cache with guest flushes honoured: safe, and works
                // on file systems without O_DIRECT (tmpfs).
                cache: CacheMode::Writeback,
            },
        }];
        cfg.nics = vec![NicConfig {
            id: NIC_ID.into(),
            ifname: l.tap.clone(),
            mac: l.mac,
            vhost: l.accel == skyvisor_core::Accel::Kvm && Path::new("/dev/vhost-net").exists(),
        }];
        cfg.guest_channel = l.guest_channel;
        if l.incoming.is_some() {
            cfg.incoming = Some(Incoming::Defer);
        }
        cfg
    }
}

/// What a QEMU exit means for the restart policy.
fn classify(info: &ExitInfo) -> VmExit {
    let reason = match (&info.shutdown, info.status) {
        (Some(s), _) if s.reason == ShutdownCause::HostQmpQuit => ExitReason::Requested,
        (Some(s), _) if s.reason == ShutdownCause::GuestShutdown => ExitReason::GuestShutdown,
        (Some(s), _) if s.reason == ShutdownCause::HostSignal => ExitReason::Killed,
        (_, ProcessExit::Signal(_)) => ExitReason::Killed,
        (_, ProcessExit::Code(_)) => ExitReason::Crashed,
        (_, ProcessExit::Unknown) => ExitReason::Vanished,
    };
    VmExit {
        reason,
        detail: info.to_string(),
    }
}

struct QemuVmHandle {
    vm: QemuVm,
    rx: mpsc::UnboundedReceiver<VmEvent>,
    exited: Option<VmExit>,
    forwarder: tokio::task::JoinHandle<()>,
}

impl QemuVmHandle {
    fn new(vm: QemuVm) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut events = vm.qmp().events();
        let mut exit = vm.exit_watch();
        let forwarder = tokio::spawn(async move {
            loop {
                tokio::select! {
                    ev = events.recv() => match ev {
                        Ok(e) => match e.kind() {
                            EventKind::Shutdown(s) if s.guest => {
                                let _ = tx.send(VmEvent::GuestShutdown);
                            }
                            EventKind::Reset(_) => {
                                let _ = tx.send(VmEvent::Reset);
                            }
                            _ => {}
                        },
                        Err(EventStreamError::Lagged { missed }) => {
                            debug!(missed, "QMP events missed");
                        }
                        // QMP closed: the exit watch tells how it ended.
                        Err(EventStreamError::Closed) => {
                            let info = exit.wait_for(Option::is_some).await.ok().and_then(|i| i.clone());
                            if let Some(info) = info {
                                let _ = tx.send(VmEvent::Exited(classify(&info)));
                            }
                            return;
                        }
                    },
                    changed = exit.changed() => {
                        let info = exit.borrow().clone();
                        if let Some(info) = info {
                            let _ = tx.send(VmEvent::Exited(classify(&info)));
                            return;
                        }
                        if changed.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Self {
            vm,
            rx,
            exited: None,
            forwarder,
        }
    }
}

impl Drop for QemuVmHandle {
    fn drop(&mut self) {
        self.forwarder.abort();
    }
}

fn control(e: impl std::fmt::Display) -> HvError {
    HvError::Control(e.to_string())
}

#[async_trait]
impl Vm for QemuVmHandle {
    fn pid(&self) -> Option<u32> {
        u32::try_from(self.vm.pid()).ok()
    }

    async fn next_event(&mut self) -> VmEvent {
        if let Some(e) = &self.exited {
            return VmEvent::Exited(e.clone());
        }
        let event = match self.rx.recv().await {
            Some(e) => e,
            None => VmEvent::Exited(match self.vm.exited() {
                Some(info) => classify(&info),
                None => VmExit {
                    reason: ExitReason::Vanished,
                    detail: "lost track of the QEMU process".into(),
                },
            }),
        };
        if let VmEvent::Exited(e) = &event {
            self.exited = Some(e.clone());
        }
        event
    }

    async fn powerdown(&self) -> Result<(), HvError> {
        self.vm.qmp().system_powerdown().await.map_err(control)
    }

    async fn reset_and_resume(&self) -> Result<(), HvError> {
        self.vm.qmp().system_reset().await.map_err(control)?;
        self.vm.qmp().cont().await.map_err(control)
    }

    async fn quit(&self) -> Result<(), HvError> {
        self.vm.qmp().quit().await.map_err(control)
    }

    fn kill(&self) {
        let _ = self.vm.kill();
    }

    async fn checkpoint(
        &self,
        plan: &CheckpointPlan,
        progress: &mut (dyn FnMut(SnapshotProgress) + Send),
    ) -> Result<CheckpointOutcome, HvError> {
        let mut save = SavePlan::new(&plan.memory_file);
        save.max_bandwidth = std::env::var(MAX_BANDWIDTH_ENV)
            .ok()
            .and_then(|v| v.parse().ok());
        save.disk = Some(DiskCapture {
            node: ROOT_NODE.into(),
            target_file: plan.disk_target.clone(),
            target_node: "svckpt".into(),
            job_id: "svckpt".into(),
        });
        let report = checkpoint::save(self.vm.qmp(), &save, |info| {
            if let Some(ram) = &info.ram {
                progress(SnapshotProgress {
                    ram_transferred: ram.transferred,
                    ram_remaining: ram.remaining,
                    ram_total: ram.total,
                });
            }
        })
        .await
        .map_err(control)?;
        Ok(CheckpointOutcome {
            paused: report.paused,
            paused_at: report.paused_at,
            total: report.total,
        })
    }

    async fn recover_checkpoint(&self) -> Result<(), HvError> {
        let qmp = self.vm.qmp();
        let info = qmp.query_migrate().await.map_err(control)?;
        if matches!(
            info.status,
            Some(MigrationStatus::Active | MigrationStatus::Setup | MigrationStatus::Device)
        ) {
            info!(
                pid = self.vm.pid(),
                "cancelling a checkpoint the previous agent left running"
            );
            qmp.migrate_cancel().await.map_err(control)?;
            // The cancel completes asynchronously; wait a little for it.
            for _ in 0..100 {
                match qmp.query_migrate().await.map_err(control)?.status {
                    Some(s) if s.is_finished() => break,
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }
        if let Ok(jobs) = qmp.query_jobs().await {
            for j in jobs.iter().filter(|j| j.id == "svckpt") {
                let _ = qmp.job_cancel(&j.id).await;
                let _ = qmp.job_dismiss(&j.id).await;
            }
        }
        let _ = qmp.blockdev_del("svckpt").await;
        let status = qmp.query_status().await.map_err(control)?;
        if status.status == RunState::Postmigrate {
            info!(
                pid = self.vm.pid(),
                "resuming a guest a checkpoint left paused"
            );
            qmp.cont().await.map_err(control)?;
        }
        Ok(())
    }

    async fn set_link(&self, up: bool) -> Result<(), HvError> {
        self.vm.qmp().set_link(NIC_ID, up).await.map_err(control)
    }

    async fn guest_request(&self, line: &str) -> Result<String, HvError> {
        let path = self.vm.run_dir().join(files::GUEST_SOCKET);
        let exchange = async {
            let mut stream = tokio::net::UnixStream::connect(&path).await?;
            stream.write_all(format!("{line}\n").as_bytes()).await?;
            let mut reader = BufReader::new(stream);
            let mut answer = String::new();
            reader.read_line(&mut answer).await?;
            Ok::<_, std::io::Error>(answer.trim().to_string())
        };
        match tokio::time::timeout(GUEST_TIMEOUT, exchange).await {
            Ok(Ok(a)) if !a.is_empty() => Ok(a),
            Ok(Ok(_)) => Err(HvError::Control(
                "the guest closed its control channel without answering".into(),
            )),
            Ok(Err(e)) => Err(HvError::Control(format!(
                "guest control channel {}: {e}",
                path.display()
            ))),
            Err(_) => Err(HvError::Control(format!(
                "the guest did not answer on its control channel within {GUEST_TIMEOUT:?}"
            ))),
        }
    }
    async fn attach_disk(&self, disk: &LaunchVolume) -> Result<(), HvError> {
        plug(&self.vm, disk).await
    }

    async fn detach_disk(&self, disk_id: &str, timeout: Duration) -> Result<(), HvError> {
        let qmp = self.vm.qmp();
        // Subscribe first so the event cannot slip by.
        let mut events = qmp.events();
        match qmp.device_del(disk_id).await {
            Ok(()) => {
                let gone = events.wait_for(|e| {
                    matches!(e.kind(), EventKind::DeviceDeleted { device: Some(d), .. } if d == disk_id)
                });
                if tokio::time::timeout(timeout, gone).await.is_err() {
                    return Err(HvError::Control(format!(
                        "the guest did not release disk {disk_id} within {}s",
                        timeout.as_secs()
                    )));
                }
            }
            // Already gone (an earlier attempt got this far).
            Err(e) if e.to_string().contains("not found") => {}
            Err(e) => return Err(control(e)),
        }
        match qmp.blockdev_del(disk_id).await {
            Err(e) if !e.to_string().contains("not found") => Err(control(e)),
            _ => Ok(()),
        }
    }
}

/// Adds a volume disk to a running or paused VM: its NBD block node, then
/// the virtio-blk device; undoes the node if the device fails.
async fn plug(vm: &QemuVm, disk: &LaunchVolume) -> Result<(), HvError> {
    let cfg = volume_disk(disk);
    let node = cfg.blockdev_json().map_err(control)?;
    vm.qmp().blockdev_add(node).await.map_err(control)?;
    let mut device = cfg.device_json(false);
    if let Some(obj) = device.as_object_mut() {
        obj.insert(
            "serial".into(),
            serde_json::Value::from(disk.serial.clone()),
        );
    }
    if let Err(e) = vm.qmp().device_add(device).await {
        let _ = vm.qmp().blockdev_del(&disk.disk_id).await;
        return Err(control(e));
    }
    Ok(())
}

#[async_trait]
impl Hypervisor for QemuHypervisor {
    async fn launch(&self, launch: &VmLaunch) -> Result<Box<dyn Vm>, HvError> {
        let cfg = self.config(launch);
        let vm = skyvisor_qemu::launch(&cfg)
            .await
            .map_err(|e| HvError::StartFailed(e.to_string()))?;
        // Subscribe before the guest runs so no event is missed.
        let handle = QemuVmHandle::new(vm);
        if let Some(memory) = &launch.incoming {
            match checkpoint::load(handle.vm.qmp(), memory, LOAD_TIMEOUT).await {
                Ok(took) => {
                    debug!(took_ms = took.as_millis() as u64, "memory loaded");
                }
                Err(e) => {
                    let _ = handle.vm.kill();
                    return Err(HvError::StartFailed(format!(
                        "restoring memory from {}: {e}",
                        memory.display()
                    )));
                }
            }
        }
        if launch.link_down
            && let Err(e) = handle.vm.qmp().set_link(NIC_ID, false).await
        {
            let _ = handle.vm.kill();
            return Err(HvError::StartFailed(format!(
                "could not unplug the NIC: {e}"
            )));
        }
        for v in launch.volumes.iter().filter(|v| !v.root) {
            if let Err(e) = plug(&handle.vm, v).await {
                let _ = handle.vm.kill();
                return Err(HvError::StartFailed(format!(
                    "could not attach volume {}: {e}",
                    v.name
                )));
            }
        }
        if let Err(e) = handle.vm.qmp().cont().await {
            let _ = handle.vm.kill();
            return Err(HvError::StartFailed(format!(
                "could not start the guest: {e}"
            )));
        }
        Ok(Box::new(handle))
    }

    async fn attach(&self, run_dir: &Path) -> Option<Box<dyn Vm>> {
        match skyvisor_qemu::attach(run_dir).await {
            Ok(vm) => Some(Box::new(QemuVmHandle::new(vm))),
            Err(e) => {
                debug!(run_dir = %run_dir.display(), error = %e, "no VM to re-attach to");
                None
            }
        }
    }
}
