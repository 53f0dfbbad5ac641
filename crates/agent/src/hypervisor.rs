//! The agent's view of a hypervisor: launch a VM, re-attach to one, and
//! receive what happens to it. [`crate::qemu_hv::QemuHypervisor`] is the
//! real one; [`crate::fake_hv::FakeHypervisor`] simulates VMs for tests and
//! control-plane benchmarks.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use skyvisor_core::{
    Accel, ExitReason, InstanceId, MacAddr, MigrationPhase, MigrationProgress, Resources,
    SnapshotProgress, VolumeId, VolumeName,
};
use thiserror::Error;

/// How a VM boots.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LaunchBoot {
    /// Direct kernel boot.
    Kernel {
        /// The kernel.
        kernel: PathBuf,
        /// The initrd.
        initrd: Option<PathBuf>,
        /// Its command line.
        cmdline: String,
    },
    /// Firmware boots the root disk.
    Firmware,
}

/// Everything needed to start one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmLaunch {
    /// The instance.
    pub instance: InstanceId,
    /// Its name.
    pub name: String,
    /// Where its sockets, pidfile and logs live.
    pub run_dir: PathBuf,
    /// The accelerator.
    pub accel: Accel,
    /// vCPUs and memory.
    pub resources: Resources,
    /// How it boots.
    pub boot: LaunchBoot,
    /// Its root disk (qcow2).
    pub root_disk: PathBuf,
    /// Its tap device.
    pub tap: String,
    /// Its MAC.
    pub mac: MacAddr,
    /// Whether to add the guest channel.
    pub guest_channel: bool,
    /// Whether to add the QEMU guest agent's channel.
    #[serde(default)]
    pub guest_agent: bool,
    /// The cloud-init seed drive to attach (read-only).
    #[serde(default)]
    pub seed: Option<PathBuf>,
    /// Continue from this saved memory file instead of booting.
    #[serde(default)]
    pub incoming: Option<PathBuf>,
    /// Start with the NIC's link down (a clone, until it has its own
    /// identity: its RAM still holds its parent's address).
    #[serde(default)]
    pub link_down: bool,
    /// Replicated volumes served over NBD: the root volume (instead of
    /// `root_disk`) and data volumes, in device order.
    #[serde(default)]
    pub volumes: Vec<LaunchVolume>,
    /// Start paused, waiting for a live migration's state (see
    /// [`Vm::prepare_incoming`]) instead of booting.
    #[serde(default)]
    pub migration_target: bool,
    /// The tap's open file, handed over from the VM's previous hypervisor
    /// process (see [`Vm::tap_file`]): the new one uses it instead of
    /// opening the tap. Not recorded: it means nothing to a later agent.
    #[serde(skip)]
    pub tap_file: Option<TapFile>,
}

/// An open file of a VM's tap device, shared between the agent and the
/// hypervisor processes it is handed to.
#[derive(Debug, Clone)]
pub struct TapFile(pub std::sync::Arc<std::os::fd::OwnedFd>);

impl TapFile {
    /// Its descriptor in this process.
    pub fn raw_fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.0.as_raw_fd()
    }
}

impl PartialEq for TapFile {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl VmLaunch {
    /// The root volume, if the VM boots from one.
    pub fn root_volume(&self) -> Option<&LaunchVolume> {
        self.volumes.iter().find(|v| v.root)
    }
}

/// A volume disk of a VM, served by the agent's NBD server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchVolume {
    /// The volume.
    pub name: VolumeName,
    /// Its id.
    pub id: VolumeId,
    /// The disk's QEMU node and device id.
    pub disk_id: String,
    /// Whether it is the VM's root disk.
    pub root: bool,
    /// The serial number the guest sees.
    pub serial: String,
    /// The NBD server's unix socket.
    pub socket: PathBuf,
    /// The export's name.
    pub export: String,
}

/// What a live checkpoint writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointPlan {
    /// The memory file to create.
    pub memory_file: PathBuf,
    /// An empty qcow2 to copy the root disk into, as it is at the instant
    /// the guest is paused: for a local disk with the disk's backing file
    /// (only the top layer is copied), for a root volume standalone.
    pub disk_target: PathBuf,
    /// The root disk is a volume: copy all of it, not only a top layer.
    pub whole_disk: bool,
}

/// What a live checkpoint did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointOutcome {
    /// How long the guest was paused.
    pub paused: Duration,
    /// When it was paused: the checkpoint's instant.
    pub paused_at: SystemTime,
    /// How long the whole checkpoint took.
    pub total: Duration,
}

/// Where the source sends a live migration's disk and memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingPlan {
    /// The destination's NBD export of the root disk, if the VM has a local
    /// root disk (mirrored while memory is copied).
    pub disk: Option<NbdTarget>,
    /// Where QEMU sends the memory stream.
    pub memory: StreamAddr,
    /// Switch over once the memory left to send takes at most this long at
    /// the measured throughput: the pause the guest will see, roughly.
    pub switchover_budget: Duration,
    /// Fail when no byte moved for this long (a cut network).
    pub stall_timeout: Duration,
    /// Fail when it has not converged by then.
    pub max_duration: Duration,
    /// Bandwidth cap, bytes per second; `None`: as fast as it goes.
    pub max_bandwidth: Option<u64>,
}

/// Where a migration stream goes, or where QEMU listens for one: TCP
/// straight to the other host, or a unix socket of the agent's, which
/// carries the stream to the other host's agent over mutual TLS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamAddr {
    /// TCP.
    Tcp {
        /// The address.
        host: String,
        /// The port.
        port: u16,
    },
    /// A unix socket.
    Unix(std::path::PathBuf),
}

impl StreamAddr {
    /// QEMU's migration URI for it (`tcp:H:P`, `unix:PATH`).
    pub fn migration_uri(&self) -> String {
        match self {
            Self::Tcp { host, port } => format!("tcp:{host}:{port}"),
            Self::Unix(path) => format!("unix:{}", path.display()),
        }
    }

    /// QMP's `SocketAddress` for it (what `blockdev-add` of an NBD client
    /// takes).
    pub fn socket_json(&self) -> serde_json::Value {
        match self {
            Self::Tcp { host, port } => {
                serde_json::json!({"type": "inet", "host": host, "port": port.to_string()})
            }
            Self::Unix(path) => serde_json::json!({"type": "unix", "path": path}),
        }
    }
}

/// An NBD export on another host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NbdTarget {
    /// Where it is served.
    pub server: StreamAddr,
    /// The export's name.
    pub export: String,
}

/// Where the destination of a live migration listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingPlan {
    /// Where QEMU listens for the memory stream.
    pub memory: StreamAddr,
    /// Where its NBD server listens (for the root disk's mirror), if it
    /// has one.
    pub nbd: Option<StreamAddr>,
}

/// The export name of a migrating VM's root disk on the destination.
pub const MIGRATION_EXPORT: &str = "svmig-root";

/// What the source's side of a live migration did.
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingOutcome {
    /// When the source's guest was stopped for the switchover.
    pub stopped_at: std::time::Instant,
    /// The downtime QEMU reports, milliseconds.
    pub qemu_downtime_ms: u64,
    /// Memory bytes sent.
    pub ram_transferred: u64,
    /// Disk bytes copied.
    pub disk_copied: u64,
}

/// The source's driver of a live migration reports progress through this
/// and has it switch the network once the guest is paused.
#[async_trait]
pub trait OutgoingControl: Send {
    /// New figures. Returns false to cancel the migration.
    async fn progress(&mut self, phase: MigrationPhase, progress: &MigrationProgress) -> bool;

    /// The guest is paused for the switchover (the hypervisor sends the
    /// last of its state): send its network traffic to the destination now.
    /// An error fails the migration.
    async fn switch_network(&mut self) -> Result<(), String>;

    /// The migration failed: break its streams to the destination, so that
    /// QEMU is not held by sends to a host that stopped answering.
    async fn unblock(&mut self);
}

/// Something that happened to a running VM.
#[derive(Debug, Clone, PartialEq)]
pub enum VmEvent {
    /// The guest powered itself off; the VM is paused, its process alive.
    GuestShutdown,
    /// The guest rebooted (or was reset).
    Reset,
    /// The process is gone.
    Exited(VmExit),
    /// The kernel killed processes inside for want of memory (a
    /// container at its limit): `kills` in its life so far.
    OutOfMemory {
        /// The count so far.
        kills: u64,
    },
}

/// How a VM's process ended.
#[derive(Debug, Clone, PartialEq)]
pub struct VmExit {
    /// Why.
    pub reason: ExitReason,
    /// The signal, status or the hypervisor's last error lines.
    pub detail: String,
}

/// What can go wrong driving a hypervisor.
#[derive(Debug, Error)]
pub enum HvError {
    /// The VM could not be started; the message says why (QEMU's own error).
    #[error("VM did not start: {0}")]
    StartFailed(String),
    /// A control command failed.
    #[error("VM control failed: {0}")]
    Control(String),
    /// The instance's kind cannot do this.
    #[error("{op} is not supported for {kind}")]
    Unsupported {
        /// What was asked.
        op: &'static str,
        /// Why not, as the instance's kind.
        kind: &'static str,
    },
}

/// One disk's I/O counters, as the hypervisor counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskCounters {
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Read requests.
    pub reads: u64,
    /// Write requests.
    pub writes: u64,
    /// Flush requests.
    pub flushes: u64,
    /// Time spent on reads, nanoseconds.
    pub read_ns: u64,
    /// Time spent on writes, nanoseconds.
    pub write_ns: u64,
    /// Time spent on flushes, nanoseconds.
    pub flush_ns: u64,
}

/// Counters of a running VM read on each metrics scrape, apart from its
/// supervisor (which owns the VM's handle).
#[async_trait]
pub trait VmCounters: Send + Sync {
    /// Each disk's counters, by the guest device's id.
    async fn disks(&self) -> Result<Vec<(String, DiskCounters)>, HvError>;
    /// The host threads that run the vCPUs.
    async fn vcpu_threads(&self) -> Result<Vec<u32>, HvError>;
    /// CPU time used in all, seconds, where the instance is counted as a
    /// whole (a container's cgroup) rather than by vCPU threads.
    async fn cpu_seconds(&self) -> Option<f64> {
        None
    }
    /// Memory in use, bytes, where it is counted as a whole (a
    /// container's anonymous memory) rather than as one process's RSS.
    async fn memory_bytes(&self) -> Option<u64> {
        None
    }
}

/// A running VM the agent owns.
#[async_trait]
pub trait Vm: Send + Sync {
    /// The hypervisor process id, if there is one.
    fn pid(&self) -> Option<u32>;

    /// Where its counters are read, if the hypervisor keeps any.
    fn counters(&self) -> Option<std::sync::Arc<dyn VmCounters>> {
        None
    }

    /// The next event. Cancel-safe: an event is never lost when the future
    /// is dropped. After `Exited`, it returns `Exited` again.
    async fn next_event(&mut self) -> VmEvent;

    /// Presses the ACPI power button.
    async fn powerdown(&self) -> Result<(), HvError>;

    /// Changes its vCPUs and memory while it runs, if its kind can;
    /// false if it cannot (a VM restarts with the new size).
    async fn resize_live(&self, _resources: Resources) -> Result<bool, HvError> {
        Ok(false)
    }

    /// Resets the VM and lets it run (used to reboot after a guest shutdown).
    async fn reset_and_resume(&self) -> Result<(), HvError>;

    /// Asks the hypervisor process to exit now.
    async fn quit(&self) -> Result<(), HvError>;

    /// A reference to the hypervisor process's open file of tap `tap`: while
    /// it is held, frames for the guest queue in the tap instead of being
    /// dropped. A restore hands it to the process that replaces this one; a
    /// live migration's source sends what queued during the pause on.
    /// `None` if the hypervisor has none or cannot share it.
    fn tap_file(&self, _tap: &str) -> Option<TapFile> {
        None
    }

    /// Kills the hypervisor process (last resort).
    fn kill(&self);

    /// Saves memory, CPU and device state to a file while the guest runs,
    /// and the root disk as it was at the instant the guest was paused;
    /// reports progress through `progress`. On failure the guest runs on.
    async fn checkpoint(
        &self,
        plan: &CheckpointPlan,
        progress: &mut (dyn FnMut(SnapshotProgress) + Send),
    ) -> Result<CheckpointOutcome, HvError>;

    /// After an agent restart: ends a checkpoint the previous agent left
    /// half done and resumes the guest if that left it paused.
    async fn recover_checkpoint(&self) -> Result<(), HvError>;

    /// Plugs or unplugs the VM's network cable.
    async fn set_link(&self, up: bool) -> Result<(), HvError>;

    /// Sends one request line to the guest's control channel and returns
    /// its answer line.
    async fn guest_request(&self, line: &str) -> Result<String, HvError>;
    /// Hot-plugs a volume disk into the VM.
    async fn attach_disk(&self, disk: &LaunchVolume) -> Result<(), HvError>;

    /// Hot-unplugs disk `disk_id`: asks the guest to release it, waits up to
    /// `timeout` until it has, then removes the disk's backend.
    async fn detach_disk(&self, disk_id: &str, timeout: Duration) -> Result<(), HvError>;

    /// Source side of a live migration: mirrors the root disk and copies
    /// memory to the destination while the guest runs, then pauses it and
    /// sends the rest. On success the guest is paused here and whole at the
    /// destination; on failure (or a cancel) the guest runs here again.
    async fn migrate_out(
        &self,
        plan: &OutgoingPlan,
        control: &mut dyn OutgoingControl,
    ) -> Result<OutgoingOutcome, HvError>;

    /// After a migration that completed but whose handover failed: lets
    /// the guest run here again.
    async fn resume_after_migration(&self) -> Result<(), HvError>;

    /// Destination side: listens for the root disk's mirror and the
    /// migration stream (a VM launched as a migration target).
    async fn prepare_incoming(&self, plan: &IncomingPlan) -> Result<(), HvError>;

    /// Destination side: waits until all of the migration's state arrived
    /// (the guest stays paused).
    async fn incoming_arrived(&self, _timeout: Duration) -> Result<(), HvError> {
        Ok(())
    }

    /// Destination side, after the handover is committed: waits until all
    /// state arrived, closes the disk export and lets the guest run, then
    /// has its NIC announce the new place.
    async fn finish_incoming(&self, timeout: Duration) -> Result<(), HvError>;
}

/// Starts and finds VMs.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// Starts a VM and lets it run.
    async fn launch(&self, launch: &VmLaunch) -> Result<Box<dyn Vm>, HvError>;

    /// Re-attaches to a VM left running by an earlier agent, if one runs
    /// in `run_dir`.
    async fn attach(&self, run_dir: &Path) -> Option<Box<dyn Vm>>;
}
