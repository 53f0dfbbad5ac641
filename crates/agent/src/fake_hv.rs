//! A simulated hypervisor: VMs are entries in memory that "run" at once.
//! For unit tests of the supervisor and for control-plane benchmarks with
//! thousands of simulated hosts; never the proof that a feature works.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use skyvisor_core::{ExitReason, MigrationPhase, MigrationProgress, SnapshotProgress};
use tokio::sync::mpsc;

use crate::hypervisor::{
    CheckpointOutcome, CheckpointPlan, HvError, Hypervisor, IncomingPlan, LaunchVolume,
    OutgoingControl, OutgoingOutcome, OutgoingPlan, Vm, VmEvent, VmExit, VmLaunch,
};

type Registry = Arc<Mutex<HashMap<PathBuf, mpsc::UnboundedSender<VmEvent>>>>;
type Disks = Arc<Mutex<HashMap<PathBuf, Vec<String>>>>;

/// Simulated VMs, keyed by run directory.
#[derive(Default, Clone)]
pub struct FakeHypervisor {
    running: Registry,
    launches: Arc<Mutex<Vec<VmLaunch>>>,
    fail_next: Arc<Mutex<Option<String>>>,
    disks: Disks,
}

impl FakeHypervisor {
    /// No VMs yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every launch so far, in order.
    pub fn launches(&self) -> Vec<VmLaunch> {
        lock(&self.launches).clone()
    }

    /// Number of VMs running now.
    pub fn running(&self) -> usize {
        lock(&self.running).len()
    }

    /// The ids of the volume disks plugged into the VM in `run_dir`
    /// (at launch or hot), in order.
    pub fn disks(&self, run_dir: &Path) -> Vec<String> {
        lock(&self.disks).get(run_dir).cloned().unwrap_or_default()
    }

    /// Makes the next launch fail with `message`.
    pub fn fail_next_launch(&self, message: &str) {
        *lock(&self.fail_next) = Some(message.to_string());
    }

    /// Simulates the VM in `run_dir` crashing (as if killed by SIGKILL).
    pub fn crash(&self, run_dir: &Path) -> bool {
        match lock(&self.running).remove(run_dir) {
            Some(tx) => tx
                .send(VmEvent::Exited(VmExit {
                    reason: ExitReason::Killed,
                    detail: "killed by signal 9 (SIGKILL)".into(),
                }))
                .is_ok(),
            None => false,
        }
    }

    /// Simulates the guest in `run_dir` powering itself off.
    pub fn guest_shutdown(&self, run_dir: &Path) -> bool {
        lock(&self.running)
            .get(run_dir)
            .is_some_and(|tx| tx.send(VmEvent::GuestShutdown).is_ok())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct FakeVm {
    run_dir: PathBuf,
    registry: Registry,
    tx: mpsc::UnboundedSender<VmEvent>,
    rx: mpsc::UnboundedReceiver<VmEvent>,
    exited: Option<VmExit>,
    disks: Disks,
}

impl FakeVm {
    fn exit(&self, reason: ExitReason) {
        lock(&self.registry).remove(&self.run_dir);
        let _ = self.tx.send(VmEvent::Exited(VmExit {
            reason,
            detail: "exited".into(),
        }));
    }
}

#[async_trait]
impl Vm for FakeVm {
    fn pid(&self) -> Option<u32> {
        None
    }

    async fn next_event(&mut self) -> VmEvent {
        if let Some(e) = &self.exited {
            return VmEvent::Exited(e.clone());
        }
        match self.rx.recv().await {
            Some(VmEvent::Exited(e)) => {
                self.exited = Some(e.clone());
                VmEvent::Exited(e)
            }
            Some(other) => other,
            // Unreachable while we hold a sender; treat as vanished.
            None => VmEvent::Exited(VmExit {
                reason: ExitReason::Vanished,
                detail: "fake VM channel closed".into(),
            }),
        }
    }

    async fn powerdown(&self) -> Result<(), HvError> {
        // A simulated guest obeys the power button at once.
        let _ = self.tx.send(VmEvent::GuestShutdown);
        Ok(())
    }

    async fn reset_and_resume(&self) -> Result<(), HvError> {
        let _ = self.tx.send(VmEvent::Reset);
        Ok(())
    }

    async fn quit(&self) -> Result<(), HvError> {
        self.exit(ExitReason::Requested);
        Ok(())
    }

    fn kill(&self) {
        self.exit(ExitReason::Killed);
    }

    async fn checkpoint(
        &self,
        plan: &CheckpointPlan,
        progress: &mut (dyn FnMut(SnapshotProgress) + Send),
    ) -> Result<CheckpointOutcome, HvError> {
        // Simulated: tiny files so the agent's publish steps have something
        // to verify and move.
        let write = |p: &std::path::Path, b: &[u8]| {
            std::fs::write(p, b).map_err(|e| HvError::Control(format!("{}: {e}", p.display())))
        };
        write(&plan.memory_file, b"fake memory")?;
        progress(SnapshotProgress {
            ram_transferred: 11,
            ram_remaining: 0,
            ram_total: 11,
        });
        Ok(CheckpointOutcome {
            paused: std::time::Duration::from_millis(1),
            paused_at: std::time::SystemTime::now(),
            total: std::time::Duration::from_millis(1),
        })
    }

    async fn recover_checkpoint(&self) -> Result<(), HvError> {
        Ok(())
    }

    async fn set_link(&self, _up: bool) -> Result<(), HvError> {
        Ok(())
    }

    async fn guest_request(&self, _line: &str) -> Result<String, HvError> {
        Ok(r#"{"ok":true}"#.into())
    }
    async fn attach_disk(&self, disk: &LaunchVolume) -> Result<(), HvError> {
        let mut disks = lock(&self.disks);
        let list = disks.entry(self.run_dir.clone()).or_default();
        if list.contains(&disk.disk_id) {
            return Err(HvError::Control(format!("disk {} exists", disk.disk_id)));
        }
        list.push(disk.disk_id.clone());
        Ok(())
    }

    async fn detach_disk(&self, disk_id: &str, _timeout: Duration) -> Result<(), HvError> {
        if let Some(list) = lock(&self.disks).get_mut(&self.run_dir) {
            list.retain(|d| d != disk_id);
        }
        Ok(())
    }

    async fn migrate_out(
        &self,
        _plan: &OutgoingPlan,
        control: &mut dyn OutgoingControl,
    ) -> Result<OutgoingOutcome, HvError> {
        // Simulated: one progress report, then the switchover.
        let p = MigrationProgress {
            ram_transferred: 1 << 20,
            ram_total: 1 << 20,
            iteration: 1,
            ..Default::default()
        };
        if !control.progress(MigrationPhase::Transferring, &p).await {
            return Err(HvError::Control("the migration was cancelled".into()));
        }
        control.switch_network().await.map_err(HvError::Control)?;
        Ok(OutgoingOutcome {
            stopped_at: std::time::Instant::now(),
            qemu_downtime_ms: 1,
            ram_transferred: 1 << 20,
            disk_copied: 0,
        })
    }

    async fn resume_after_migration(&self) -> Result<(), HvError> {
        Ok(())
    }

    async fn prepare_incoming(&self, _plan: &IncomingPlan) -> Result<(), HvError> {
        Ok(())
    }

    async fn finish_incoming(&self, _timeout: Duration) -> Result<(), HvError> {
        Ok(())
    }
}

#[async_trait]
impl Hypervisor for FakeHypervisor {
    async fn launch(&self, launch: &VmLaunch) -> Result<Box<dyn Vm>, HvError> {
        if let Some(msg) = lock(&self.fail_next).take() {
            return Err(HvError::StartFailed(msg));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.running).insert(launch.run_dir.clone(), tx.clone());
        lock(&self.launches).push(launch.clone());
        lock(&self.disks).insert(
            launch.run_dir.clone(),
            launch.volumes.iter().map(|v| v.disk_id.clone()).collect(),
        );
        Ok(Box::new(FakeVm {
            run_dir: launch.run_dir.clone(),
            registry: self.running.clone(),
            tx,
            rx,
            exited: None,
            disks: self.disks.clone(),
        }))
    }

    async fn attach(&self, _run_dir: &Path) -> Option<Box<dyn Vm>> {
        // Simulated VMs do not outlive their agent.
        None
    }
}
