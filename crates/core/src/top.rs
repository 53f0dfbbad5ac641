//! Live counters of VMs and hosts for `skyvisor vm top` and `host top`:
//! the same numbers the agents' `/metrics` serve, as cumulative counters
//! with the instant they were read, so a client turns two samples into
//! rates.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::instance::InstancePhase;
use crate::names::{HostName, ProjectName};

/// One VM's counters at one instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmSample {
    /// Its project.
    pub project: ProjectName,
    /// Its name.
    pub name: String,
    /// Its host.
    pub host: HostName,
    /// Its type (`custom` for a custom size).
    pub instance_type: String,
    /// Its phase as its agent knows it.
    pub phase: InstancePhase,
    /// vCPUs it was given.
    pub vcpus: u32,
    /// Memory it was given, bytes.
    pub memory_bytes: u64,
    /// CPU seconds its vCPU threads used, since QEMU started (none while
    /// it does not run).
    pub vcpu_seconds: Option<f64>,
    /// Memory its QEMU process holds (resident), bytes.
    pub rss_bytes: Option<u64>,
    /// Bytes read from its disks.
    pub disk_read_bytes: u64,
    /// Bytes written to its disks.
    pub disk_write_bytes: u64,
    /// Bytes it received (its tap's transmit side).
    pub net_rx_bytes: u64,
    /// Bytes it sent.
    pub net_tx_bytes: u64,
    /// When these were read.
    pub at: DateTime<Utc>,
}

/// One host's counters at one instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostSample {
    /// The host.
    pub host: HostName,
    /// Its CPUs.
    pub cpus: u32,
    /// CPU seconds spent busy (not idle or waiting for I/O), all CPUs.
    pub cpu_busy_seconds: f64,
    /// CPU seconds in all, all CPUs.
    pub cpu_total_seconds: f64,
    /// Memory, bytes.
    pub memory_total_bytes: u64,
    /// Memory available to new work, bytes.
    pub memory_available_bytes: u64,
    /// The data directory's file system: size and free bytes.
    pub disk_total_bytes: u64,
    /// Free bytes on it.
    pub disk_free_bytes: u64,
    /// Bytes received on the host's own network devices.
    pub net_rx_bytes: u64,
    /// Bytes sent on them.
    pub net_tx_bytes: u64,
    /// VMs it runs.
    pub vms_running: u32,
    /// vCPUs it offers to VMs.
    pub capacity_vcpus: u32,
    /// vCPUs promised to its VMs.
    pub allocated_vcpus: u32,
    /// When these were read.
    pub at: DateTime<Utc>,
}

/// What an agent answers `GET /agent/v1/samples` with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AgentSamples {
    /// The host.
    pub host: HostSample,
    /// Its VMs.
    pub vms: Vec<VmSample>,
    /// Connections this host's datapath sent to a backend, per load
    /// balancer (`project/name`), since the agent started.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub lb_connections: std::collections::BTreeMap<String, u64>,
}

/// `GET /v1/top/instances` and `/v1/top/hosts`: samples, and the hosts
/// that did not answer in time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TopSamples {
    /// The VMs (of the request's project) or empty for hosts.
    pub vms: Vec<VmSample>,
    /// The hosts (for `/v1/top/hosts`) or empty.
    pub hosts: Vec<HostSample>,
    /// Hosts that did not answer, with why.
    pub unreachable: Vec<String>,
}
