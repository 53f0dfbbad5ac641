//! Live migration: the record of one move of a running VM between hosts,
//! its phases and the figures it reports, and the request an instance's
//! spec carries while it moves.
//!
//! A migration runs in exactly one direction through its phases; once
//! finished (completed, failed or cancelled) its record never changes
//! again. The VM runs in exactly one place at every step: on the source
//! until the switchover is committed to the store, on the destination after.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{HostName, InstanceId, InstanceName};

/// A migration's id.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[schema(value_type = String, format = "uuid")]
pub struct MigrationId(pub Uuid);

impl MigrationId {
    /// A new random id.
    pub fn random() -> Self {
        Self(Uuid::new_v4())
    }

    /// Parses the textual form; `None` if it is not a UUID.
    pub fn parse(s: &str) -> Option<Self> {
        Uuid::parse_str(s).ok().map(Self)
    }
}

impl fmt::Display for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationPhase {
    /// Recorded; the source host has not picked it up yet.
    Pending,
    /// The destination starts an empty VM waiting for the state.
    Preparing,
    /// The disk is being copied to the destination.
    CopyingDisk,
    /// Memory is being copied while the VM runs (the disk stays in sync).
    Transferring,
    /// The VM is paused for the last pages and the handover.
    SwitchingOver,
    /// The VM runs on the destination.
    Completed,
    /// It failed; the VM runs on the source.
    Failed,
    /// It was cancelled; the VM runs on the source.
    Cancelled,
}

impl MigrationPhase {
    /// Completed, failed or cancelled: nothing will change any more.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Preparing => "preparing",
            Self::CopyingDisk => "copying-disk",
            Self::Transferring => "transferring",
            Self::SwitchingOver => "switching-over",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for MigrationPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a migration was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MigrationReason {
    /// A user asked for it (`vm migrate`).
    #[default]
    Manual,
    /// Its host is being drained.
    Drain,
    /// Load balancing (`host rebalance`).
    Rebalance,
}

impl fmt::Display for MigrationReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Manual => "manual",
            Self::Drain => "drain",
            Self::Rebalance => "rebalance",
        })
    }
}

/// How far a migration has got. Sizes are bytes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationProgress {
    /// Disk bytes copied.
    pub disk_copied: u64,
    /// Disk bytes to copy (the allocated part of the VM's disk).
    pub disk_total: u64,
    /// Memory bytes sent (all passes).
    pub ram_transferred: u64,
    /// Memory bytes still to send.
    pub ram_remaining: u64,
    /// The guest's memory size.
    pub ram_total: u64,
    /// Bytes per second the guest dirties.
    pub dirty_rate: u64,
    /// Throughput, megabits per second.
    pub mbps: f64,
    /// Memory pass (1: the first full copy; later ones send dirtied pages).
    pub iteration: u64,
    /// The pause if it switched over now, milliseconds.
    pub expected_downtime_ms: u64,
    /// How much the guest's CPUs are slowed to converge, percent.
    pub throttle_percent: u64,
}

/// What a completed migration measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationResult {
    /// From the source picking it up to the VM running on the destination.
    pub total_ms: u64,
    /// The downtime QEMU reports (its own stop-and-copy).
    pub qemu_downtime_ms: u64,
    /// The guest's real pause: from the source's stop to the destination's
    /// resume, including the handover.
    pub pause_ms: u64,
    /// Memory bytes sent.
    pub ram_transferred: u64,
    /// Disk bytes copied.
    pub disk_copied: u64,
    /// Whether the memory stream and the disk mirror went over mutual TLS
    /// with the cluster's certificates.
    #[serde(default)]
    pub encrypted: bool,
    /// Frames for the guest that reached its old tap while it was paused
    /// and were sent on to the destination (a plain QEMU migration drops
    /// them).
    #[serde(default)]
    pub held_frames: u64,
}

/// One migration, as the store keeps it (`migrations/record/<id>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Migration {
    /// Its id.
    pub id: MigrationId,
    /// The VM.
    pub instance: InstanceName,
    /// The VM's project.
    #[serde(default = "crate::auth::default_project")]
    #[schema(value_type = String)]
    pub project: crate::ProjectName,
    /// The VM's id.
    pub instance_id: InstanceId,
    /// Where it runs now (or ran).
    pub source: HostName,
    /// Where it goes.
    pub destination: HostName,
    /// Why.
    pub reason: MigrationReason,
    /// Where the migration is.
    pub phase: MigrationPhase,
    /// The latest progress figures.
    #[serde(default)]
    pub progress: MigrationProgress,
    /// The final figures, once completed and the guest runs at the
    /// destination (a moment after the phase says `completed`).
    #[serde(default)]
    pub result: Option<MigrationResult>,
    /// Why it failed or was cancelled.
    #[serde(default)]
    pub error: Option<String>,
    /// When it was requested.
    pub created_at: DateTime<Utc>,
    /// The last change.
    pub updated_at: DateTime<Utc>,
    /// When it finished.
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
}

impl Migration {
    /// The VM that moves.
    pub fn instance_ref(&self) -> crate::InstanceRef {
        crate::InstanceRef::new(self.project.clone(), self.instance.clone())
    }

    /// Moves to `phase`, stamping the times.
    pub fn set_phase(&mut self, phase: MigrationPhase) {
        self.phase = phase;
        self.updated_at = Utc::now();
        if phase.is_finished() {
            self.finished_at = Some(self.updated_at);
        }
    }
}

/// What an instance's spec carries while it moves: the agent of its source
/// host acts on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MigrationRequest {
    /// The migration's record.
    pub id: MigrationId,
    /// Where the VM goes.
    pub destination: HostName,
    /// Bandwidth cap, MiB per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth_mib_s: Option<u64>,
    /// Streams without TLS (asked for explicitly).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_terminal_phases_are_finished() {
        use MigrationPhase::*;
        for p in [Pending, Preparing, CopyingDisk, Transferring, SwitchingOver] {
            assert!(!p.is_finished(), "{p}");
        }
        for p in [Completed, Failed, Cancelled] {
            assert!(p.is_finished(), "{p}");
        }
        assert_eq!(
            serde_json::to_value(CopyingDisk).expect("encode"),
            serde_json::json!("copying-disk")
        );
    }

    #[test]
    fn ids_round_trip_through_text() {
        let id = MigrationId::random();
        assert_eq!(MigrationId::parse(&id.to_string()), Some(id));
        assert_eq!(MigrationId::parse("nope"), None);
    }
}
