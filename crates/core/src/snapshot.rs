//! Snapshots (checkpoints) of instances: the record the API writes when a
//! user asks for one and the agent holding the files completes, the
//! restore and clone requests that point at one, and per-VM schedules.
//!
//! Data and validation only, like the rest of this crate.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ValidationError;
use crate::instance::InstanceId;
use crate::names::{HostName, ImageName, InstanceName, validate_name};
use crate::resources::Resources;

/// A snapshot's name, unique per instance: a DNS label like every name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, ToSchema)]
#[serde(transparent)]
#[schema(value_type = String)]
pub struct SnapshotName(String);

impl SnapshotName {
    /// Validates `value` and wraps it.
    pub fn new(value: impl Into<String>) -> Result<Self, ValidationError> {
        let value = value.into();
        validate_name("snapshot name", &value)?;
        Ok(Self(value))
    }

    /// A name from the time it is taken, e.g. `snap-20250101-120000`.
    pub fn at(prefix: &str, at: DateTime<Utc>) -> Result<Self, ValidationError> {
        Self::new(format!("{prefix}-{}", at.format("%Y%m%d-%H%M%S")))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SnapshotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for SnapshotName {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl<'de> Deserialize<'de> for SnapshotName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::new(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// Where a snapshot is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotState {
    /// Asked for; the agent has not started.
    Pending,
    /// Being written (to a temporary name).
    Saving,
    /// Complete, verified and usable.
    Ready,
    /// Could not be taken; no files are kept. The message says why.
    Failed,
}

impl fmt::Display for SnapshotState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pending => "pending",
            Self::Saving => "saving",
            Self::Ready => "ready",
            Self::Failed => "failed",
        })
    }
}

/// What a snapshot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotKind {
    /// Memory, CPU and device state, and the disk: a restore continues the
    /// running guest.
    Full,
    /// The disk only (the VM was stopped): a restore boots from it.
    DiskOnly,
}

/// Who asked for a snapshot. Schedules prune only their own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotOrigin {
    /// A user.
    #[default]
    Manual,
    /// The VM's checkpoint schedule.
    Scheduled,
}

/// How far a save has got.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotProgress {
    /// RAM bytes written so far.
    pub ram_transferred: u64,
    /// RAM bytes still to write (QEMU's estimate).
    pub ram_remaining: u64,
    /// The guest's RAM size.
    pub ram_total: u64,
}

/// A snapshot as the store and the API hold it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Snapshot {
    /// Its name, unique per instance.
    pub name: SnapshotName,
    /// The project of the instance it was taken of (it outlives the
    /// instance when kept).
    #[serde(default = "crate::auth::default_project")]
    #[schema(value_type = String)]
    pub project: crate::ProjectName,
    /// The instance it was taken of.
    pub instance: InstanceName,
    /// That instance's id: a re-created instance of the same name is another.
    pub instance_id: InstanceId,
    /// The host whose agent takes it and keeps its files.
    pub host: HostName,
    /// State.
    pub state: SnapshotState,
    /// What it holds, once known (the agent decides: full if the VM runs).
    pub kind: Option<SnapshotKind>,
    /// Who asked.
    #[serde(default)]
    pub origin: SnapshotOrigin,
    /// The image the instance was made from; a restore needs the same.
    pub image: ImageName,
    /// The instance's type when taken, if it had one.
    pub instance_type: Option<crate::names::TypeName>,
    /// The instance's size when taken; a restore needs the same vCPUs and memory.
    pub resources: Resources,
    /// When it was asked for.
    pub created_at: DateTime<Utc>,
    /// The instant it holds: when the guest was paused (or the disk copied).
    pub taken_at: Option<DateTime<Utc>>,
    /// How long the guest was paused, ms (0 for a disk-only snapshot).
    pub paused_ms: Option<u64>,
    /// How long taking it took, ms.
    pub duration_ms: Option<u64>,
    /// Bytes of the memory file on disk (allocated, not apparent, size).
    pub memory_bytes: u64,
    /// Bytes of the disk file on disk.
    pub disk_bytes: u64,
    /// Progress while saving.
    pub progress: Option<SnapshotProgress>,
    /// Set once deletion was asked for; the agent removes the files, then
    /// the record.
    #[serde(default)]
    pub deleting: bool,
    /// Why it failed, or other news for people.
    pub message: Option<String>,
    /// When the record was last written.
    pub updated_at: DateTime<Utc>,
}

impl Snapshot {
    /// The instance it was taken of.
    pub fn instance_ref(&self) -> crate::InstanceRef {
        crate::InstanceRef::new(self.project.clone(), self.instance.clone())
    }

    /// Total bytes on disk.
    pub fn size_bytes(&self) -> u64 {
        self.memory_bytes.saturating_add(self.disk_bytes)
    }
}

/// Asks an instance to go back to a snapshot. The agent acts when
/// `generation` is above the status's `observed_restore_generation`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RestoreRequest {
    /// The snapshot (of this instance).
    pub snapshot: SnapshotName,
    /// Bumped by each restore request.
    pub generation: u64,
}

/// Where a clone's first state comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CloneSource {
    /// The instance the snapshot was taken of.
    pub instance: InstanceName,
    /// The snapshot.
    pub snapshot: SnapshotName,
}

/// Checkpoints taken at a fixed interval while the VM runs; the oldest
/// scheduled ones beyond `keep` are deleted (manual ones never are).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CheckpointSchedule {
    /// Seconds between checkpoints.
    pub every_secs: u64,
    /// How many scheduled checkpoints to keep.
    pub keep: u32,
}

/// Shortest interval a schedule may have.
pub const MIN_CHECKPOINT_INTERVAL_SECS: u64 = 5;
/// Most scheduled checkpoints a VM may keep.
pub const MAX_CHECKPOINT_KEEP: u32 = 100;

impl CheckpointSchedule {
    /// Checks the interval and count.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.every_secs < MIN_CHECKPOINT_INTERVAL_SECS {
            return Err(ValidationError::new(
                "checkpoint_every",
                format!(
                    "{}s is too often; allowed: at least {MIN_CHECKPOINT_INTERVAL_SECS}s",
                    self.every_secs
                ),
            ));
        }
        if self.keep == 0 || self.keep > MAX_CHECKPOINT_KEEP {
            return Err(ValidationError::new(
                "keep",
                format!(
                    "{} is out of range; allowed: 1 to {MAX_CHECKPOINT_KEEP}",
                    self.keep
                ),
            ));
        }
        Ok(())
    }
}

/// Parses `VM/SNAPSHOT`, the way a clone names its source.
pub fn parse_snapshot_ref(s: &str) -> Result<CloneSource, ValidationError> {
    let (vm, snap) = s.split_once('/').ok_or_else(|| {
        ValidationError::new(
            "from_snapshot",
            format!("{s:?} is not VM/SNAPSHOT, e.g. web/snap-1"),
        )
    })?;
    Ok(CloneSource {
        instance: InstanceName::new(vm)?,
        snapshot: SnapshotName::new(snap)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_refs() {
        assert!(SnapshotName::new("before-upgrade").is_ok());
        assert!(SnapshotName::new("Bad_Name").is_err());
        let at = DateTime::parse_from_rfc3339("2025-01-02T03:04:05Z")
            .expect("time")
            .with_timezone(&Utc);
        assert_eq!(
            SnapshotName::at("auto", at).expect("name").as_str(),
            "auto-20250102-030405"
        );
        let r = parse_snapshot_ref("web/snap-1").expect("ref");
        assert_eq!(
            (r.instance.as_str(), r.snapshot.as_str()),
            ("web", "snap-1")
        );
        assert!(parse_snapshot_ref("web").is_err());
        assert!(parse_snapshot_ref("web/Snap").is_err());
        assert!(serde_json::from_str::<SnapshotName>("\"a b\"").is_err());
    }

    #[test]
    fn schedules_are_bounded() {
        let ok = CheckpointSchedule {
            every_secs: 600,
            keep: 5,
        };
        ok.validate().expect("valid");
        assert!(
            CheckpointSchedule {
                every_secs: 1,
                ..ok
            }
            .validate()
            .is_err()
        );
        assert!(CheckpointSchedule { keep: 0, ..ok }.validate().is_err());
    }
}
