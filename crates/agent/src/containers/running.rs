//! A running container as the supervisor drives it: its events (its end,
//! out-of-memory kills), stop and kill, live resize; what only a VM can
//! do is refused as unsupported.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use skyvisor_core::{ExitReason, MigrationPhase, MigrationProgress, Resources, SnapshotProgress};
use tokio::process::Child;
use tokio::sync::watch;

use super::cgroups::{ContainerCounters, read_oom_kills};
use super::{limits, runtime_cmd, unmount_root};
use crate::hypervisor::{
    CheckpointOutcome, CheckpointPlan, HvError, IncomingPlan, LaunchVolume, OutgoingControl,
    OutgoingOutcome, OutgoingPlan, Vm, VmEvent, VmExit,
};

/// What a running container is known by.
pub(super) struct Handle {
    pub(super) runtime: PathBuf,
    pub(super) state_root: PathBuf,
    pub(super) cid: String,
    pub(super) pid: i32,
    pub(super) merged: PathBuf,
    pub(super) io_weight: bool,
    /// The agent asked it to stop: its exit is a shutdown, not a failure.
    pub(super) term_sent: AtomicBool,
    /// The cgroup file counting its out-of-memory kills.
    pub(super) oom_counter: PathBuf,
    /// The host's cgroups are v2.
    pub(super) cgroup_v2: bool,
}

/// How the container's end is learnt.
pub(super) enum Watched {
    /// The runtime's monitor process, this agent's child: gives the status.
    Child(Child),
    /// The container's init, left by an earlier agent: only that it ended.
    Pidfd(OwnedFd),
}

/// How a container ended, as the watcher saw it.
#[derive(Debug, Clone)]
struct Ended {
    /// The exit status, when known.
    code: Option<i32>,
}

/// A running container, as the supervisor drives it.
pub(crate) struct ContainerVm {
    handle: Arc<Handle>,
    ended: watch::Receiver<Option<Ended>>,
    /// Out-of-memory kills in its cgroup, as counted so far.
    oom: tokio::sync::mpsc::UnboundedReceiver<u64>,
    /// The shutdown event was given; next comes the exit.
    shutdown_given: bool,
}

/// How often a container's out-of-memory kill count is read.
const OOM_POLL: Duration = Duration::from_secs(1);

impl ContainerVm {
    pub(super) fn watch(handle: Arc<Handle>, watched: Watched) -> Self {
        let (tx, rx) = watch::channel(None);
        let (oom_tx, oom) = tokio::sync::mpsc::unbounded_channel();
        let counter = handle.oom_counter.clone();
        let mut alive = rx.clone();
        tokio::spawn(async move {
            let mut seen = read_oom_kills(&counter).await.unwrap_or(0);
            loop {
                tokio::select! {
                    _ = alive.changed() => return,
                    () = tokio::time::sleep(OOM_POLL) => {}
                }
                if let Some(n) = read_oom_kills(&counter).await
                    && n > seen
                {
                    seen = n;
                    if oom_tx.send(n).is_err() {
                        return;
                    }
                }
            }
        });
        let h = handle.clone();
        tokio::spawn(async move {
            let code = match watched {
                Watched::Child(mut child) => child.wait().await.ok().and_then(|s| s.code()),
                Watched::Pidfd(fd) => {
                    // A pidfd turns readable when its process ends: one
                    // blocking wait per container an earlier agent left.
                    let _ = tokio::task::spawn_blocking(move || {
                        use std::os::fd::AsFd;
                        let mut fds = [nix::poll::PollFd::new(
                            fd.as_fd(),
                            nix::poll::PollFlags::POLLIN,
                        )];
                        while let Err(nix::errno::Errno::EINTR) =
                            nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE)
                        {
                        }
                    })
                    .await;
                    None
                }
            };
            // Its runtime state and root mount go with it; the writable
            // layer stays for the next start.
            let _ = runtime_cmd(&h.runtime, &h.state_root, &["delete", "--force", &h.cid]).await;
            unmount_root(&h.merged).await;
            let _ = tx.send(Some(Ended { code }));
        });
        Self {
            handle,
            ended: rx,
            oom,
            shutdown_given: false,
        }
    }

    async fn kill_with(&self, signal: &str) -> Result<(), HvError> {
        runtime_cmd(
            &self.handle.runtime,
            &self.handle.state_root,
            &["kill", &self.handle.cid, signal],
        )
        .await
        .map(drop)
        .map_err(HvError::Control)
    }
}

fn unsupported(op: &'static str) -> HvError {
    HvError::Unsupported {
        op,
        kind: "containers",
    }
}

#[async_trait]
impl Vm for ContainerVm {
    fn pid(&self) -> Option<u32> {
        u32::try_from(self.handle.pid).ok()
    }

    fn counters(&self) -> Option<Arc<dyn crate::hypervisor::VmCounters>> {
        let cid = &self.handle.cid;
        let (cpu, memory) = if self.handle.cgroup_v2 {
            let dir = format!("/sys/fs/cgroup/skyvisor/{cid}");
            (format!("{dir}/cpu.stat"), format!("{dir}/memory.stat"))
        } else {
            (
                format!("/sys/fs/cgroup/cpuacct/skyvisor/{cid}/cpuacct.usage"),
                format!("/sys/fs/cgroup/memory/skyvisor/{cid}/memory.stat"),
            )
        };
        Some(Arc::new(ContainerCounters {
            cpu: PathBuf::from(cpu),
            memory: PathBuf::from(memory),
            v2: self.handle.cgroup_v2,
        }))
    }

    async fn next_event(&mut self) -> VmEvent {
        let ended = loop {
            if let Some(e) = self.ended.borrow_and_update().clone() {
                break e;
            }
            tokio::select! {
                changed = self.ended.changed() => {
                    if changed.is_err() {
                        break Ended { code: None };
                    }
                }
                Some(kills) = self.oom.recv() => return VmEvent::OutOfMemory { kills },
            }
        };
        let asked = self.handle.term_sent.load(Ordering::SeqCst);
        // Its init ended by itself with success, or as asked: the guest's
        // own shutdown, which the supervisor sees first, as for a VM.
        if !self.shutdown_given && (asked || ended.code == Some(0)) {
            self.shutdown_given = true;
            return VmEvent::GuestShutdown;
        }
        let (reason, detail) = match ended.code {
            Some(0) => (ExitReason::GuestShutdown, "its init exited".to_string()),
            _ if asked => (ExitReason::Requested, "stopped".to_string()),
            // crun gives 128 + N for a container killed by signal N.
            Some(c) if c > 128 => (ExitReason::Killed, format!("killed by signal {}", c - 128)),
            Some(c) => (
                ExitReason::Crashed,
                format!("its init exited with status {c}"),
            ),
            None => (
                ExitReason::Vanished,
                "its init ended while an earlier agent watched it".to_string(),
            ),
        };
        VmEvent::Exited(VmExit { reason, detail })
    }

    async fn powerdown(&self) -> Result<(), HvError> {
        self.handle.term_sent.store(true, Ordering::SeqCst);
        self.kill_with("TERM").await
    }

    async fn resize_live(&self, resources: Resources) -> Result<bool, HvError> {
        let json = skyvisor_container::resources_json(&limits(resources, self.handle.io_weight))
            .map_err(|e| HvError::Control(e.to_string()))?;
        let file = tempfile::NamedTempFile::new()
            .map_err(|e| HvError::Control(format!("writing the new limits: {e}")))?;
        std::fs::write(file.path(), json)
            .map_err(|e| HvError::Control(format!("writing the new limits: {e}")))?;
        let path = file.path().to_string_lossy().into_owned();
        runtime_cmd(
            &self.handle.runtime,
            &self.handle.state_root,
            &["update", "--resources", &path, &self.handle.cid],
        )
        .await
        .map_err(HvError::Control)?;
        Ok(true)
    }

    async fn reset_and_resume(&self) -> Result<(), HvError> {
        Err(unsupported("reset"))
    }

    async fn quit(&self) -> Result<(), HvError> {
        self.handle.term_sent.store(true, Ordering::SeqCst);
        self.kill_with("KILL").await
    }

    fn kill(&self) {
        self.handle.term_sent.store(true, Ordering::SeqCst);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.handle.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    async fn checkpoint(
        &self,
        _plan: &CheckpointPlan,
        _progress: &mut (dyn FnMut(SnapshotProgress) + Send),
    ) -> Result<CheckpointOutcome, HvError> {
        Err(unsupported("a checkpoint"))
    }

    async fn recover_checkpoint(&self) -> Result<(), HvError> {
        Ok(())
    }

    async fn set_link(&self, _up: bool) -> Result<(), HvError> {
        Err(unsupported("unplugging the network"))
    }

    async fn guest_request(&self, _line: &str) -> Result<String, HvError> {
        Err(unsupported("the guest channel"))
    }

    async fn attach_disk(&self, _disk: &LaunchVolume) -> Result<(), HvError> {
        Err(unsupported("attaching a volume"))
    }

    async fn detach_disk(&self, _disk_id: &str, _timeout: Duration) -> Result<(), HvError> {
        Err(unsupported("detaching a volume"))
    }

    async fn migrate_out(
        &self,
        _plan: &OutgoingPlan,
        control: &mut dyn OutgoingControl,
    ) -> Result<OutgoingOutcome, HvError> {
        let _ = control
            .progress(MigrationPhase::Preparing, &MigrationProgress::default())
            .await;
        Err(unsupported("live migration"))
    }

    async fn resume_after_migration(&self) -> Result<(), HvError> {
        Ok(())
    }

    async fn prepare_incoming(&self, _plan: &IncomingPlan) -> Result<(), HvError> {
        Err(unsupported("live migration"))
    }

    async fn finish_incoming(&self, _timeout: Duration) -> Result<(), HvError> {
        Err(unsupported("live migration"))
    }
}
