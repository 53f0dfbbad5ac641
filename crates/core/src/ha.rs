//! High availability: an instance's HA policy, the hosts' reports of which
//! peers they hear (the second signal, beside the lease, before a host is
//! declared dead) and the record of every failover and refusal.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{HostName, InstanceName, ValidationError};

/// What happens to an instance when its host dies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum HaPolicy {
    /// Nothing: it stays down until its host returns.
    #[default]
    Off,
    /// It is restarted on another host, once its host is fenced. Needs a
    /// replicated root disk.
    Restart,
}

impl FromStr for HaPolicy {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(Self::Off),
            "restart" => Ok(Self::Restart),
            other => Err(ValidationError::new(
                "ha",
                format!("unknown HA policy {other:?}; allowed: restart, off"),
            )),
        }
    }
}

impl fmt::Display for HaPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::Restart => "restart",
        })
    }
}

/// What a host's agent last heard from its peers, written under its lease
/// (`hosts/heard/<host>`). A host another live host still hears is not
/// declared dead, whatever its lease says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HearingReport {
    /// The reporting host.
    pub host: HostName,
    /// When it wrote this report.
    pub at: DateTime<Utc>,
    /// The peers whose probes reached it within the last lease TTL.
    pub heard: Vec<HostName>,
}

/// How a failover of one instance ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum FailoverOutcome {
    /// Rebound to another host, which starts it.
    Restarted,
    /// Not restarted (the reason says why): not protected, no host can
    /// take it, or its volumes' replicas are gone.
    Refused,
}

/// One failover (or refusal to fail over) of one instance, kept under
/// `failovers/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FailoverRecord {
    /// Unique, ordered by time.
    pub id: String,
    /// The instance.
    pub instance: InstanceName,
    /// The instance's project.
    #[serde(default = "crate::auth::default_project")]
    #[schema(value_type = String)]
    pub project: crate::ProjectName,
    /// The host that died.
    pub from_host: HostName,
    /// Where it was restarted, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_host: Option<HostName>,
    /// Restarted or refused.
    pub outcome: FailoverOutcome,
    /// Why (for a refusal), or how the target was chosen.
    pub reason: String,
    /// When the leader first saw the host's lease gone.
    pub lease_lost_at: DateTime<Utc>,
    /// When the host was declared dead (lease expiry plus the safety
    /// margin, with no live host still hearing it): its agent has fenced
    /// itself by then.
    pub declared_dead_at: DateTime<Utc>,
    /// When the instance was rebound to its new host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebound_at: Option<DateTime<Utc>>,
}

/// Whether an instance would be restarted elsewhere if its host died now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProtectionState {
    /// It would be restarted on another host with all its data.
    Protected,
    /// It is protected, but something stands in the way now (see the
    /// reasons): a replica of its root disk is not in sync, or no other
    /// host has room for it.
    Weakened,
    /// It would stay down until its host returns.
    Unprotected,
}

impl fmt::Display for ProtectionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Protected => "protected",
            Self::Weakened => "weakened",
            Self::Unprotected => "unprotected",
        })
    }
}

/// An instance's HA protection as it stands, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Protection {
    /// The state.
    pub state: ProtectionState,
    /// Why it is unprotected or weakened (empty when protected).
    pub reasons: Vec<String>,
}
