//! Skyvisor's domain model: typed names and ids, instances, images, hosts,
//! instance types and the request/response types of the REST API.
//!
//! This crate is shared by the server, the host agent and the CLI, so it holds
//! data and validation only. It must never do I/O, talk to QEMU or the store.

pub mod accel;
pub mod api;
pub mod auth;
pub mod cluster;
pub mod dns;
pub mod error;
pub mod event;
pub mod exec_stream;
pub mod exposition;
pub mod firewall;
pub mod group;
pub mod ha;
pub mod host;
pub mod image;
pub mod instance;
pub mod keypair;
pub mod keys;
pub mod labels;
pub mod lb;
pub mod migration;
pub mod names;
pub mod network;
pub mod resources;
pub mod snapshot;
pub mod top;
pub mod usage;
pub mod volume;

pub use accel::{Accel, AccelMode};
pub use error::ValidationError;
pub use event::{Event, EventKind, EventResult, EventSize, EventStored, ObjectKind};
pub use firewall::{HostFirewall, Protocol, SecurityGroup, SecurityRule};
pub use ha::{
    FailoverOutcome, FailoverRecord, HaPolicy, HearingReport, Protection, ProtectionState,
};
pub use host::{Capacity, Host, HostState, HostView, Overcommit};
pub use image::{Image, ImageFile, ImageKind, ImageSource, ImageState};
pub use instance::{
    CloudInitReport, ExitReason, ExitRecord, GuestConfig, GuestKey, Instance, InstanceId,
    InstanceKind, InstancePhase, InstanceSpec, InstanceStatus, PowerState, RestartPolicy,
};
pub use migration::{
    Migration, MigrationId, MigrationPhase, MigrationProgress, MigrationReason, MigrationRequest,
    MigrationResult,
};
pub use names::{
    GroupName, HostName, IdentityName, ImageName, ImageRef, InstanceName, InstanceRef, ProjectName,
    Scoped, ServerName, TypeName, VolumeName, VolumeRef,
};
pub use network::{Ipv4Net, MacAddr, Network, NetworkAttachment};
pub use resources::{InstanceType, Resources};
pub use snapshot::{
    CheckpointSchedule, CloneSource, RestoreRequest, Snapshot, SnapshotKind, SnapshotName,
    SnapshotOrigin, SnapshotProgress, SnapshotState,
};
pub use volume::{
    InstanceVolume, MembershipView, ReplicaState, ReplicaView, Volume, VolumeAttachment,
    VolumeHealth, VolumeId, VolumePhase, VolumeRedundancy, VolumeRuntime, VolumeSnapshot,
    VolumeSpec, VolumeStatus,
};

/// The version of Skyvisor this crate was built as; agents of another
/// version are refused by the server.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
