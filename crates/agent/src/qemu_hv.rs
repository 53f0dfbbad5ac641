//! [`Hypervisor`] on QEMU, through the `skyvisor-qemu` driver.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use skyvisor_core::ExitReason;
use skyvisor_core::image::DiskFormat;
use skyvisor_qemu::qmp::{EventKind, EventStreamError, ShutdownCause};
use skyvisor_qemu::{
    Boot, CacheMode, DiskConfig, DiskSource, ExitInfo, NicConfig, ProcessExit, QemuVm, VmConfig,
};
use tokio::sync::mpsc;
use tracing::debug;

use crate::hypervisor::{HvError, Hypervisor, LaunchBoot, Vm, VmEvent, VmExit, VmLaunch};

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
        cfg.disks = vec![DiskConfig {
            id: "root".into(),
            source: DiskSource::File {
                path: l.root_disk.clone(),
                format: DiskFormat::Qcow2,
            },
            read_only: false,
            // Host page cache with guest flushes honoured: safe, and works
            // on file systems without O_DIRECT (tmpfs).
            cache: CacheMode::Writeback,
        }];
        cfg.nics = vec![NicConfig {
            id: "net0".into(),
            ifname: l.tap.clone(),
            mac: l.mac,
            vhost: l.accel == skyvisor_core::Accel::Kvm && Path::new("/dev/vhost-net").exists(),
        }];
        cfg.guest_channel = l.guest_channel;
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
