//! Skyvisor's QEMU driver: the one crate that speaks to QEMU.
//!
//! - [`VmConfig`] describes a VM and turns into QEMU's command line.
//! - [`launch`] starts QEMU (paused, in its own session, outliving the
//!   caller); [`attach`] finds it again after a restart; [`QemuVm`] watches
//!   it exit and holds its [`Qmp`] session.
//! - [`qmp`] is a small QMP client with typed helpers and an event stream.
//! - [`checkpoint`] saves a running VM's memory and a point-in-time disk
//!   copy, and loads saved memory into a new QEMU.
//! - [`guest_agent`] talks to the QEMU guest agent inside a guest.
//! - [`host`] tells QEMU's version and whether an accelerator really boots.
//! - `fake` (feature `fake`) is a fake QMP server for tests.
//!
//! It knows nothing of clusters, instances or the store: it must never
//! import them. Callers own the policy (restart, migrate, stop); this crate
//! only does what it is told and reports what QEMU did.

pub mod checkpoint;
pub mod config;
pub mod error;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
pub mod guest_agent;
pub mod host;
pub mod process;
pub mod qmp;

pub use config::{
    Boot, CacheMode, DiskConfig, DiskSource, GUEST_CHANNEL_NAME, Incoming, NbdServer, NicConfig,
    VmConfig, default_cpu_model, files,
};
pub use error::{ConfigError, QemuError, QmpError};
pub use guest_agent::{GuestAgent, GuestAgentError, GuestInterface};
pub use host::{PROBE_MARKER, ProbeOutcome, kvm_device_usable, probe_accel_boot, qemu_version};
pub use process::{ExitInfo, ProcessExit, QemuVm, attach, attach_with, launch};
pub use qmp::{EventKind, EventStream, Qmp, QmpEvent, QmpOptions};
