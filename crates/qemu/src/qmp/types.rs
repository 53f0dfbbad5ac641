//! Hand-written QMP types for the commands and events Skyvisor uses.
//!
//! Only the fields we read or send are here; unknown fields in QEMU's
//! answers are ignored and unknown enum values are kept as `Other(String)`,
//! so a newer QEMU never breaks decoding. No I/O happens in this module.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Declares a QAPI string enum that keeps values it does not know.
macro_rules! qapi_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $s:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(from = "String", into = "String")]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
            /// A value this version of Skyvisor does not know.
            Other(String),
        }

        impl $name {
            /// QEMU's name for the value.
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => $s,)*
                    Self::Other(s) => s,
                }
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                match s.as_str() {
                    $($s => Self::$variant,)*
                    _ => Self::Other(s),
                }
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self::from(s.to_owned())
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.as_str().to_owned()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

qapi_enum! {
    /// QEMU's run state (`query-status`).
    RunState {
        /// Stopped in the debugger.
        Debug => "debug",
        /// Waiting for an incoming migration.
        Inmigrate => "inmigrate",
        /// Stopped by an emulation error.
        InternalError => "internal-error",
        /// Stopped on a disk I/O error.
        IoError => "io-error",
        /// Paused by `stop`.
        Paused => "paused",
        /// Paused on the source after a completed migration.
        Postmigrate => "postmigrate",
        /// Paused before ever running (`-S`).
        Prelaunch => "prelaunch",
        /// Finishing a migration.
        FinishMigrate => "finish-migrate",
        /// Restoring a snapshot.
        RestoreVm => "restore-vm",
        /// Running.
        Running => "running",
        /// Saving a snapshot.
        SaveVm => "save-vm",
        /// The guest shut down (paused because of `-action shutdown=pause`).
        Shutdown => "shutdown",
        /// Suspended to RAM.
        Suspended => "suspended",
        /// Stopped by the watchdog.
        Watchdog => "watchdog",
        /// The guest panicked.
        GuestPanicked => "guest-panicked",
        /// COLO fault tolerance.
        Colo => "colo",
    }
}

qapi_enum! {
    /// Why QEMU shut down or reset (`SHUTDOWN` and `RESET` events).
    ShutdownCause {
        /// No reason given.
        None => "none",
        /// An error on the host.
        HostError => "host-error",
        /// QMP `quit`.
        HostQmpQuit => "host-qmp-quit",
        /// QMP `system_reset`.
        HostQmpSystemReset => "host-qmp-system-reset",
        /// QEMU got SIGTERM, SIGINT or SIGHUP.
        HostSignal => "host-signal",
        /// The UI asked.
        HostUi => "host-ui",
        /// The guest powered off.
        GuestShutdown => "guest-shutdown",
        /// The guest rebooted.
        GuestReset => "guest-reset",
        /// The guest panicked.
        GuestPanic => "guest-panic",
        /// A device reset the machine.
        SubsystemReset => "subsystem-reset",
        /// A snapshot was loaded.
        SnapshotLoad => "snapshot-load",
    }
}

qapi_enum! {
    /// The state of a migration.
    MigrationStatus {
        /// None started.
        None => "none",
        /// Connecting.
        Setup => "setup",
        /// Being cancelled.
        Cancelling => "cancelling",
        /// Cancelled.
        Cancelled => "cancelled",
        /// Copying RAM.
        Active => "active",
        /// Post-copy running.
        PostcopyActive => "postcopy-active",
        /// Post-copy paused on a network failure.
        PostcopyPaused => "postcopy-paused",
        /// Post-copy recovery setting up.
        PostcopyRecoverSetup => "postcopy-recover-setup",
        /// Post-copy recovering.
        PostcopyRecover => "postcopy-recover",
        /// Done: the destination has the VM.
        Completed => "completed",
        /// Failed; the source still has the VM.
        Failed => "failed",
        /// COLO.
        Colo => "colo",
        /// Paused before switchover (capability `pause-before-switchover`).
        PreSwitchover => "pre-switchover",
        /// Copying device state.
        Device => "device",
        /// Waiting for devices to unplug.
        WaitUnplug => "wait-unplug",
    }
}

impl MigrationStatus {
    /// The migration is over, one way or the other.
    pub fn is_finished(&self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

qapi_enum! {
    /// A migration capability (`migrate-set-capabilities`).
    MigrationCapability {
        /// Compress repeated page updates.
        Xbzrle => "xbzrle",
        /// Throttle the guest's CPUs if it dirties memory faster than we copy.
        AutoConverge => "auto-converge",
        /// Send `MIGRATION` events.
        Events => "events",
        /// Allow switching to post-copy.
        PostcopyRam => "postcopy-ram",
        /// The destination can talk back.
        ReturnPath => "return-path",
        /// Pause in `pre-switchover` until `migrate-continue`.
        PauseBeforeSwitchover => "pause-before-switchover",
        /// Several parallel channels.
        Multifd => "multifd",
        /// Activate block devices only when the destination starts.
        LateBlockActivate => "late-block-activate",
        /// Refuse a destination whose UUID differs.
        ValidateUuid => "validate-uuid",
        /// Send pages without copying them.
        ZeroCopySend => "zero-copy-send",
        /// Write each RAM page at a fixed offset of a `file:` target, so a
        /// page re-sent by a later pass overwrites itself and zero pages
        /// leave holes: the file never holds more than the guest's RAM.
        MappedRam => "mapped-ram",
    }
}

qapi_enum! {
    /// The state of a job (`query-block-jobs`, `JOB_STATUS_CHANGE`).
    JobStatus {
        /// Created.
        Created => "created",
        /// Running.
        Running => "running",
        /// Paused.
        Paused => "paused",
        /// Ready to complete (mirror: source and target in sync).
        Ready => "ready",
        /// Paused while ready.
        Standby => "standby",
        /// Waiting for its transaction.
        Waiting => "waiting",
        /// Waiting for `job-finalize`.
        Pending => "pending",
        /// Finalizing.
        Aborting => "aborting",
        /// Done, waiting for `job-dismiss`.
        Concluded => "concluded",
        /// Gone.
        Null => "null",
    }
}

/// One entry of `query-jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobInfo {
    /// The job id.
    pub id: String,
    /// The job type, e.g. `backup`.
    #[serde(rename = "type")]
    pub job_type: String,
    /// Its state.
    pub status: JobStatus,
    /// Work done (bytes for block jobs).
    #[serde(default)]
    pub current_progress: u64,
    /// Work to do.
    #[serde(default)]
    pub total_progress: u64,
    /// Why it failed, once concluded with an error.
    #[serde(default)]
    pub error: Option<String>,
}

/// `blockdev-backup`: a point-in-time copy of a node into another, with
/// copy-before-write from the moment the job starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevBackup {
    /// The job's id.
    pub job_id: String,
    /// The source node.
    pub device: String,
    /// The target node (already added with `blockdev-add`).
    pub target: String,
    /// What to copy.
    pub sync: MirrorSync,
    /// Keep the job after it ends until `job-dismiss`, so its result can be
    /// read.
    pub auto_dismiss: bool,
}

/// `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    /// The guest's CPUs run.
    pub running: bool,
    /// The run state.
    pub status: RunState,
}

/// `query-version`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VersionInfo {
    /// The version triple.
    pub qemu: VersionTriple,
    /// The distribution's package version, e.g. `Debian 1:10.0.2+ds-2`.
    #[serde(default)]
    pub package: String,
}

/// A QEMU version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
pub struct VersionTriple {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Micro.
    pub micro: u32,
}

impl fmt::Display for VersionTriple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// `query-migrate`. Times are milliseconds; sizes bytes.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// The state; absent before any migration.
    pub status: Option<MigrationStatus>,
    /// RAM transfer counters.
    pub ram: Option<RamStats>,
    /// Time since the migration started (or its total, when finished).
    pub total_time: Option<u64>,
    /// The estimated pause if it switched over now.
    pub expected_downtime: Option<u64>,
    /// The real pause, once completed.
    pub downtime: Option<u64>,
    /// Time spent setting up.
    pub setup_time: Option<u64>,
    /// How much the guest's CPUs are throttled (auto-converge), percent.
    pub cpu_throttle_percentage: Option<u64>,
    /// Why it failed.
    pub error_desc: Option<String>,
}

/// RAM counters of a migration.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RamStats {
    /// Bytes sent.
    pub transferred: u64,
    /// Bytes still to send.
    pub remaining: u64,
    /// Guest RAM size.
    pub total: u64,
    /// Pages the guest dirties per second.
    #[serde(default)]
    pub dirty_pages_rate: u64,
    /// Throughput in megabits per second.
    #[serde(default)]
    pub mbps: f64,
    /// How many times the dirty bitmap was synced (≈ passes).
    #[serde(default)]
    pub dirty_sync_count: u64,
    /// Page size.
    #[serde(default)]
    pub page_size: u64,
}

/// `migrate-set-parameters`: only the set fields are sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationParameters {
    /// Bandwidth cap in bytes per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// Longest allowed pause at switchover, milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<u64>,
    /// Number of multifd channels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_channels: Option<u32>,
    /// Initial auto-converge throttle, percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_initial: Option<u32>,
    /// Auto-converge throttle step, percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_increment: Option<u32>,
    /// Bandwidth available for the final switchover, bytes per second (for
    /// QEMU's downtime estimate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub avail_switchover_bandwidth: Option<u64>,
}

/// Which part of a disk `blockdev-mirror` copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MirrorSync {
    /// Everything, including backing files.
    Full,
    /// Only the top image.
    Top,
    /// Only new writes.
    None,
}

/// `blockdev-mirror`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevMirror {
    /// The job's id.
    pub job_id: String,
    /// The source node.
    pub device: String,
    /// The target node (already added with `blockdev-add`).
    pub target: String,
    /// What to copy.
    pub sync: MirrorSync,
    /// Speed cap in bytes per second, 0 for none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed: Option<u64>,
    /// `write-blocking` makes guest writes wait for the target too, so the
    /// job converges under load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy_mode: Option<String>,
}

/// One entry of `query-block-jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockJobInfo {
    /// The job type, e.g. `mirror`.
    #[serde(rename = "type")]
    pub job_type: String,
    /// The job id.
    pub device: String,
    /// Work to do (bytes).
    pub len: u64,
    /// Work done.
    pub offset: u64,
    /// Ready to complete.
    pub ready: bool,
    /// The job's state.
    pub status: JobStatus,
    /// Paused.
    #[serde(default)]
    pub paused: bool,
    /// Speed cap.
    #[serde(default)]
    pub speed: u64,
    /// The error, if it failed.
    pub error: Option<String>,
}

/// `announce-self` timing (QEMU's defaults with [`Default`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AnnounceParameters {
    /// Delay before the first round, ms.
    pub initial: u64,
    /// Longest delay between rounds, ms.
    pub max: u64,
    /// Number of rounds.
    pub rounds: u64,
    /// Delay increase per round, ms.
    pub step: u64,
}

impl Default for AnnounceParameters {
    fn default() -> Self {
        Self {
            initial: 50,
            max: 550,
            rounds: 5,
            step: 100,
        }
    }
}

/// Where QEMU's NBD server listens (`nbd-server-start`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdListen {
    /// TCP.
    Inet {
        /// Address to bind.
        host: String,
        /// Port.
        port: u16,
    },
    /// A unix socket.
    Unix {
        /// Its path.
        path: PathBuf,
    },
}

impl NbdListen {
    /// QMP's legacy `SocketAddressLegacy` form that `nbd-server-start` takes.
    pub(crate) fn to_legacy_json(&self) -> Value {
        match self {
            Self::Inet { host, port } => {
                json!({"type": "inet", "data": {"host": host, "port": port.to_string()}})
            }
            Self::Unix { path } => {
                json!({"type": "unix", "data": {"path": path.to_string_lossy()}})
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_enum_values_are_kept() {
        let s: StatusInfo =
            serde_json::from_value(json!({"running": false, "status": "brand-new"}))
                .expect("decode");
        assert_eq!(s.status, RunState::Other("brand-new".into()));
        assert_eq!(s.status.to_string(), "brand-new");
        let s: StatusInfo =
            serde_json::from_value(json!({"running": true, "status": "running", "x": 1}))
                .expect("decode");
        assert_eq!(s.status, RunState::Running);
    }

    #[test]
    fn migration_info_decodes_qemu_answers() {
        let v = json!({
            "status": "active", "setup-time": 3, "total-time": 1200, "expected-downtime": 300,
            "ram": {"transferred": 1000, "remaining": 200, "total": 4096, "duplicate": 1,
                     "normal": 2, "normal-bytes": 8192, "dirty-pages-rate": 10, "mbps": 812.5,
                     "dirty-sync-count": 2, "postcopy-requests": 0, "page-size": 4096,
                     "multifd-bytes": 0, "pages-per-second": 5, "precopy-bytes": 1000,
                     "downtime-bytes": 0, "postcopy-bytes": 0, "dirty-sync-missed-zero-copy": 0}
        });
        let m: MigrationInfo = serde_json::from_value(v).expect("decode");
        assert_eq!(m.status, Some(MigrationStatus::Active));
        let ram = m.ram.expect("ram");
        assert_eq!(
            (ram.transferred, ram.remaining, ram.total),
            (1000, 200, 4096)
        );
        assert_eq!(m.expected_downtime, Some(300));
        let none: MigrationInfo = serde_json::from_value(json!({})).expect("decode");
        assert_eq!(none.status, None);
    }

    #[test]
    fn parameters_send_only_what_is_set() {
        let p = MigrationParameters {
            downtime_limit: Some(300),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&p).expect("encode"),
            json!({"downtime-limit": 300})
        );
    }
}

/// One entry of `query-blockstats`: a block device's I/O counters.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockStatsEntry {
    /// The legacy drive name (empty for `-blockdev` drives).
    #[serde(default)]
    pub device: String,
    /// The guest device's QOM path, e.g.
    /// `/machine/peripheral/vd0/virtio-backend`.
    #[serde(default)]
    pub qdev: Option<String>,
    /// The block node's name.
    #[serde(default)]
    pub node_name: Option<String>,
    /// The counters.
    pub stats: BlockDeviceStats,
}

/// The counters of `query-blockstats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct BlockDeviceStats {
    /// Bytes read.
    pub rd_bytes: u64,
    /// Bytes written.
    pub wr_bytes: u64,
    /// Read operations.
    pub rd_operations: u64,
    /// Write operations.
    pub wr_operations: u64,
    /// Flush operations.
    pub flush_operations: u64,
    /// Time spent reading, nanoseconds.
    pub rd_total_time_ns: u64,
    /// Time spent writing, nanoseconds.
    pub wr_total_time_ns: u64,
    /// Time spent flushing, nanoseconds.
    pub flush_total_time_ns: u64,
}

/// One entry of `query-cpus-fast`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CpuInfoFast {
    /// The vCPU's index.
    pub cpu_index: u32,
    /// The host thread that runs it.
    pub thread_id: u32,
}
