//! Records that make many hosts and servers one cluster: the live servers,
//! the leader, the cluster's version and what an agent needs to join.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::names::ServerName;

/// A live control-plane server, registered under a lease: the record
/// disappears when the server stops renewing it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ServerRecord {
    /// Unique name.
    pub name: ServerName,
    /// The URL of its API, as other servers, agents and users reach it.
    pub url: String,
    /// Its Skyvisor version.
    pub version: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
}

/// The value of the leader key: who leads and since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LeaderRecord {
    /// The leading server.
    pub name: ServerName,
    /// Its API URL.
    pub url: String,
    /// When it became leader.
    pub since: DateTime<Utc>,
}

/// The version every server and agent of the cluster must run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClusterVersion {
    /// The Skyvisor version.
    pub version: String,
    /// When it was set.
    pub set_at: DateTime<Utc>,
}

/// `GET /v1/cluster/join`: what an agent needs to join the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JoinInfo {
    /// The cluster's Skyvisor version.
    pub version: String,
    /// The store's endpoints (etcd client URLs).
    pub etcd_endpoints: Vec<String>,
    /// The key prefix the cluster uses in etcd.
    pub etcd_namespace: String,
    /// The API URLs of the live servers (image downloads, console).
    pub servers: Vec<String>,
}

/// Body of `POST /v1/cluster/join-tokens`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJoinTokenRequest {
    /// How long it may be used, in seconds (default 3600, at most 7 days).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 604800)]
    pub ttl_secs: Option<u64>,
}

/// A join token, shown once: good for one host's join before it expires.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JoinToken {
    /// What the agent sends (`skyvisor agent --join-token`).
    pub token: String,
    /// Its public id.
    pub id: String,
    /// When it stops working, if unused.
    pub expires_at: chrono::DateTime<chrono::Utc>,
}

/// The longest a join token may live.
pub const MAX_JOIN_TOKEN_SECS: u64 = 7 * 24 * 3600;

/// The value of a host's allocation marker: rewritten by every change of
/// what is allocated on the host, so that a placement decided on a stale
/// view fails its transaction instead of double-booking the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocMark {
    /// The instance whose placement or resize wrote it.
    pub instance: String,
    /// The server that wrote it.
    pub server: String,
}

/// Whether an agent or server of `version` may join a cluster of `cluster`:
/// only the exact same version may.
pub fn versions_compatible(version: &str, cluster: &str) -> bool {
    version == cluster
}
