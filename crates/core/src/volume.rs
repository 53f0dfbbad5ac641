//! Replicated block volumes: the spec the API writes, the status the
//! volume's controller agent writes, the attachment claim that keeps a
//! volume on one VM, the runtime view the agent serving it publishes, and
//! the API's request bodies and views.
//!
//! Who writes what (one writer per key):
//! - `volumes/spec/<name>` ([`VolumeSpec`]): the API;
//! - `volumes/status/<name>` ([`VolumeStatus`]): the volume's controller,
//!   the agent of the first live host in [`VolumeSpec::hosts`];
//! - `volumes/attachment/<name>` ([`VolumeAttachment`]): created by the API
//!   with the instance spec that uses the volume, removed by the agent once
//!   the VM no longer uses it (or by the instance's deletion);
//! - `volumes/runtime/<name>` ([`VolumeRuntime`]): the agent serving the
//!   volume to a VM, while it does;
//! - `volumes/membership/<id>`: the replication record of the data path
//!   (`skyvisor-volume`), changed only by compare-and-swap; this crate only
//!   reads it, as [`MembershipView`].
//!
//! Data and validation only: this module must never do I/O.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::ValidationError;
use crate::instance::InstanceId;
use crate::names::{HostName, InstanceName, VolumeName, validate_name};

/// Volume sizes are whole MiB.
pub const VOLUME_SIZE_UNIT: u64 = 1 << 20;
/// Smallest volume: 1 MiB.
pub const MIN_VOLUME_BYTES: u64 = VOLUME_SIZE_UNIT;
/// Largest volume: 64 TiB.
pub const MAX_VOLUME_BYTES: u64 = 64 << 40;
/// Most replicas a volume may have.
pub const MAX_REPLICAS: u32 = 3;
/// Replicas when the request does not say.
pub const DEFAULT_REPLICAS: u32 = 1;
/// Most volumes one VM may use (root included): virtio-blk devices vda..vdp.
pub const MAX_VOLUMES_PER_INSTANCE: usize = 16;

/// The unique, never reused id of a volume. Its 32 hex digits name the
/// volume in the data path (replica files, membership record, NBD export),
/// so a volume re-created under the same name never meets the old one's
/// leftovers.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(transparent)]
#[schema(value_type = String, format = "uuid")]
pub struct VolumeId(pub Uuid);

impl VolumeId {
    /// A new random id.
    pub fn random() -> Self {
        Self(Uuid::new_v4())
    }

    /// The id as the data path knows it: 32 lowercase hex digits.
    pub fn data_id(&self) -> String {
        self.0.simple().to_string()
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Checks a volume size: whole MiB, from 1 MiB to 64 TiB.
pub fn validate_size(field: &str, bytes: u64) -> Result<u64, ValidationError> {
    if !(MIN_VOLUME_BYTES..=MAX_VOLUME_BYTES).contains(&bytes) {
        let shown = if bytes >= 1 << 40 {
            format!("{} TiB", bytes >> 40)
        } else {
            format!("{bytes} bytes")
        };
        return Err(ValidationError::new(
            field,
            format!(
                "{shown} is out of range; allowed: 1 MiB to {} TiB",
                MAX_VOLUME_BYTES >> 40
            ),
        ));
    }
    if !bytes.is_multiple_of(VOLUME_SIZE_UNIT) {
        return Err(ValidationError::new(
            field,
            format!("{bytes} bytes is not a whole number of MiB; allowed: multiples of 1 MiB"),
        ));
    }
    Ok(bytes)
}

/// Checks a replica count and a minimum in-sync count against it.
pub fn validate_replicas(replicas: u32, min_in_sync: u32) -> Result<(), ValidationError> {
    if !(1..=MAX_REPLICAS).contains(&replicas) {
        return Err(ValidationError::new(
            "replicas",
            format!("{replicas} replicas is out of range; allowed: 1 to {MAX_REPLICAS}"),
        ));
    }
    if min_in_sync == 0 || min_in_sync > replicas {
        return Err(ValidationError::new(
            "min_in_sync",
            format!(
                "{min_in_sync} is out of range; allowed: 1 to the number of replicas ({replicas})"
            ),
        ));
    }
    Ok(())
}

/// Checks a volume snapshot's name (the rules of every name).
pub fn validate_snapshot_name(name: &str) -> Result<(), ValidationError> {
    validate_name("snapshot name", name)
}

/// The desired state of a volume, owned by the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VolumeSpec {
    /// Unique name.
    pub name: VolumeName,
    /// The project that owns it.
    #[serde(default = "crate::auth::default_project")]
    #[schema(value_type = String)]
    pub project: crate::ProjectName,
    /// Unique id, never reused.
    pub id: VolumeId,
    /// Size in bytes (whole MiB); growing raises it.
    pub size_bytes: u64,
    /// Number of replicas, each on its own host.
    pub replicas: u32,
    /// Writes fail with an I/O error rather than be acknowledged by fewer
    /// in-sync replicas than this.
    pub min_in_sync: u32,
    /// The hosts holding the replicas, chosen at creation.
    pub hosts: Vec<HostName>,
    /// Set once deletion was requested.
    pub deleting: bool,
    /// Bumped on every change.
    pub generation: u64,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// The VM whose root disk this volume was made as (in a cluster, by
    /// `vm create` without a root volume): it is deleted with that VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub owner: Option<crate::InstanceName>,
}

impl VolumeSpec {
    /// The volume as its project's name for it: what names it in the store.
    pub fn volume_ref(&self) -> crate::VolumeRef {
        crate::VolumeRef::new(self.project.clone(), self.name.clone())
    }

    /// The host whose agent controls the volume (creates, grows, deletes it
    /// and reports its status): the first of [`VolumeSpec::hosts`] that is
    /// alive. `None` while none is.
    pub fn controller(&self, alive: impl Fn(&HostName) -> bool) -> Option<&HostName> {
        self.hosts.iter().find(|h| alive(h))
    }
}

/// The lifecycle phase of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VolumePhase {
    /// Accepted; its replicas are being created.
    Creating,
    /// Usable.
    Available,
    /// Its replicas are being grown.
    Growing,
    /// Being deleted.
    Deleting,
    /// Could not be created; the message says why. Delete it.
    Failed,
}

impl fmt::Display for VolumePhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Creating => "creating",
            Self::Available => "available",
            Self::Growing => "growing",
            Self::Deleting => "deleting",
            Self::Failed => "failed",
        })
    }
}

/// The lifecycle status of a volume, written by its controller agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VolumeStatus {
    /// Phase.
    pub phase: VolumePhase,
    /// The size the replicas have now.
    pub size_bytes: u64,
    /// The last error or what it waits for, for people.
    pub message: Option<String>,
    /// The spec generation this status reflects.
    pub observed_generation: u64,
    /// When this status was written.
    pub updated_at: DateTime<Utc>,
}

impl VolumeStatus {
    /// The status of a volume no agent has acted on yet.
    pub fn creating() -> Self {
        Self {
            phase: VolumePhase::Creating,
            size_bytes: 0,
            message: None,
            observed_generation: 0,
            updated_at: Utc::now(),
        }
    }
}

/// The claim of a volume by the one VM that uses it: while it exists, no
/// other VM may attach the volume and the volume cannot be deleted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VolumeAttachment {
    /// The VM.
    pub instance: InstanceName,
    /// Its id (a re-created VM of the same name is another VM).
    pub instance_id: InstanceId,
    /// Whether the VM boots from it (its `vda`).
    pub root: bool,
    /// When it was attached.
    pub since: DateTime<Utc>,
}

/// A volume used by a VM, as the instance spec lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InstanceVolume {
    /// The volume.
    pub name: VolumeName,
    /// Its id.
    pub id: VolumeId,
    /// The VM boots from it (it is the VM's `vda`, instead of a local disk).
    pub root: bool,
}

/// How one replica is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicaState {
    /// Has every acknowledged write.
    InSync,
    /// Being brought up to date (only the regions it missed are copied).
    Resyncing,
    /// Missed writes; it will be resynced when a primary reaches it.
    OutOfSync,
    /// Its host cannot be reached.
    Unreachable,
}

impl fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::InSync => "in-sync",
            Self::Resyncing => "resyncing",
            Self::OutOfSync => "out-of-sync",
            Self::Unreachable => "unreachable",
        })
    }
}

/// One replica of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReplicaView {
    /// The host holding it.
    pub host: HostName,
    /// Its host's replica server.
    pub address: String,
    /// How it is doing.
    pub state: ReplicaState,
    /// While resyncing: bytes copied so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_done_bytes: Option<u64>,
    /// While resyncing: bytes to copy in all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_total_bytes: Option<u64>,
    /// Reads are served from it.
    #[serde(default)]
    pub read_source: bool,
    /// The last error seen on it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What the agent serving a volume to a VM reports about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VolumeRuntime {
    /// The serving host (the volume's primary).
    pub host: HostName,
    /// The VM it serves, if any (none for a snapshot taken while detached).
    pub instance: Option<InstanceName>,
    /// The replication epoch.
    pub epoch: u64,
    /// Writes are acknowledged (enough replicas are in sync).
    pub writable: bool,
    /// The replicas as the primary sees them.
    pub replicas: Vec<ReplicaView>,
    /// Bytes copied by resyncs since it started serving.
    pub resynced_bytes: u64,
    /// When this was written.
    pub updated_at: DateTime<Utc>,
}

/// One member of a [`MembershipView`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MemberView {
    /// The node (host name).
    pub node: String,
    /// Its replica server.
    pub addr: String,
    /// Whether it has every acknowledged write.
    pub in_sync: bool,
}

/// A read-only view of the data path's membership record
/// (`volumes/membership/<id>`): the fields the control plane shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MembershipView {
    /// Generation number of the in-sync set and primary.
    pub epoch: u64,
    /// The node serving the volume, if any.
    pub primary: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// Minimum in-sync replicas for writes.
    pub min_in_sync: u32,
    /// The replicas.
    pub replicas: Vec<MemberView>,
}

/// Overall health of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VolumeHealth {
    /// Every replica is in sync.
    Healthy,
    /// Some replica is out of sync, resyncing or unreachable; writes are
    /// still acknowledged by enough in-sync replicas.
    Degraded,
    /// Fewer in-sync replicas than the minimum are reachable: writes fail.
    Unavailable,
    /// It has no replicas yet (being created) or they are gone.
    None,
}

impl fmt::Display for VolumeHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Healthy => "healthy",
            Self::Degraded => "degraded",
            Self::Unavailable => "unavailable",
            Self::None => "-",
        })
    }
}

/// A volume as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Volume {
    /// What the user asked for.
    pub spec: VolumeSpec,
    /// What its controller reports.
    pub status: VolumeStatus,
    /// The VM using it, if any.
    pub attached_to: Option<VolumeAttachment>,
    /// Overall health.
    pub health: VolumeHealth,
    /// The replication epoch.
    pub epoch: u64,
    /// The host serving it now (where its VM runs), if any.
    pub primary: Option<HostName>,
    /// The replicas.
    pub replicas: Vec<ReplicaView>,
    /// Bytes copied by resyncs since the current primary started serving.
    pub resynced_bytes: u64,
    /// How many of the wanted replicas are in sync.
    pub redundancy: VolumeRedundancy,
}

/// How consistent a volume snapshot is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotConsistency {
    /// What the disk held at one instant, as after a power cut: the guest's
    /// file systems recover it with their journals.
    #[default]
    Crash,
    /// Taken while the guest's file systems were frozen through its guest
    /// agent: what a clean unmount would leave.
    FileSystem,
}

/// A snapshot of a volume: every in-sync replica copied at one instant
/// with I/O paused; with the guest's file systems frozen first when the
/// VM using it has a guest agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VolumeSnapshot {
    /// The volume.
    pub volume: VolumeName,
    /// The volume's id.
    pub volume_id: VolumeId,
    /// The snapshot's name, unique per volume.
    pub name: String,
    /// The volume's size when it was taken.
    pub size_bytes: u64,
    /// The replication epoch it was taken at.
    pub epoch: u64,
    /// The hosts holding a copy.
    pub hosts: Vec<HostName>,
    /// When it was taken.
    pub created_at: DateTime<Utc>,
    /// Whether the guest's file systems were frozen for it (records from
    /// before this field: crash-consistent).
    #[serde(default)]
    pub consistency: SnapshotConsistency,
}

/// Body of `POST /v1/volumes`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolumeRequest {
    /// Unique name (a DNS label).
    pub name: String,
    /// Size in bytes, a whole number of MiB.
    pub size_bytes: u64,
    /// Replicas on distinct hosts, 1 to 3 (default 1).
    #[serde(default)]
    pub replicas: Option<u32>,
    /// Writes fail below this many in-sync replicas (default 1).
    #[serde(default)]
    pub min_in_sync: Option<u32>,
}

/// Body of `POST /v1/volumes/{name}/grow`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrowVolumeRequest {
    /// The new size in bytes (larger than the current one, whole MiB).
    pub size_bytes: u64,
}

/// Body of `POST /v1/volumes/{name}/replicas`: add a replica (`to`),
/// remove one (`from`), or move one (both). The volume's agents make it
/// so: a new replica is copied in full and joins the in-sync set; a
/// replica leaves only once every wanted one is in sync.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeReplicasRequest {
    /// The host to hold a new replica; with neither field set nothing is
    /// done. Leave it out with `from` to remove a replica; give
    /// `"auto"` to let placement choose (most free disk first).
    #[serde(default)]
    pub to: Option<String>,
    /// The host whose replica goes.
    #[serde(default)]
    pub from: Option<String>,
}

/// How redundant a volume is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VolumeRedundancy {
    /// Replicas wanted (the spec's hosts).
    pub wanted: u32,
    /// Of those, in sync now.
    pub in_sync: u32,
    /// Wanted hosts whose replica is not in sync yet (being copied, behind
    /// or unreachable).
    pub pending: Vec<HostName>,
    /// Replicas no longer wanted, dropped once every wanted one is in sync.
    pub surplus: Vec<HostName>,
}

/// Body of `POST /v1/instances/{name}/volumes`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachVolumeRequest {
    /// The volume to attach.
    pub volume: String,
}

/// Body of `POST /v1/volumes/{name}/snapshots`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolumeSnapshotRequest {
    /// The snapshot's name, unique per volume.
    pub name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_whole_mib_in_range() {
        assert_eq!(validate_size("size", 10 << 30), Ok(10 << 30));
        assert!(validate_size("size", 0).is_err());
        assert!(validate_size("size", 4096).is_err());
        let e = validate_size("size", (1 << 30) + 4096).expect_err("not whole MiB");
        assert!(e.message.contains("whole number of MiB"), "{e}");
        assert!(validate_size("size", MAX_VOLUME_BYTES + VOLUME_SIZE_UNIT).is_err());
    }

    #[test]
    fn replica_counts() {
        assert!(validate_replicas(1, 1).is_ok());
        assert!(validate_replicas(3, 2).is_ok());
        assert_eq!(
            validate_replicas(4, 1).expect_err("too many").field,
            "replicas"
        );
        assert_eq!(validate_replicas(0, 1).expect_err("none").field, "replicas");
        assert_eq!(
            validate_replicas(2, 3).expect_err("min").field,
            "min_in_sync"
        );
        assert_eq!(
            validate_replicas(2, 0).expect_err("min").field,
            "min_in_sync"
        );
    }

    #[test]
    fn controller_is_first_live_host() {
        let h = |s: &str| HostName::new(s).expect("host");
        let spec = VolumeSpec {
            project: crate::auth::default_project(),
            name: VolumeName::new("v").expect("name"),
            id: VolumeId::random(),
            size_bytes: 1 << 30,
            replicas: 2,
            min_in_sync: 1,
            hosts: vec![h("a"), h("b")],
            deleting: false,
            generation: 1,
            created_at: Utc::now(),
            owner: None,
        };
        assert_eq!(spec.controller(|_| true), Some(&h("a")));
        assert_eq!(spec.controller(|x| x.as_str() == "b"), Some(&h("b")));
        assert_eq!(spec.controller(|_| false), None);
        assert_eq!(spec.id.data_id().len(), 32);
    }
}
