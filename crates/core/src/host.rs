//! Hosts: the machines of the pool, their capacity and what is allocated.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::accel::Accel;
use crate::error::ValidationError;
use crate::names::HostName;
use crate::network::Ipv4Net;
use crate::resources::Resources;

/// How far a host's physical resources may be promised.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Overcommit {
    /// vCPUs per physical CPU.
    pub cpu: f64,
    /// Memory promised per byte of usable memory.
    pub memory: f64,
    /// Disk promised per byte of the data directory's file system.
    pub disk: f64,
}

impl Default for Overcommit {
    fn default() -> Self {
        Self {
            cpu: 4.0,
            memory: 1.0,
            disk: 2.0,
        }
    }
}

impl Overcommit {
    /// Checks the ratios are in a sane range.
    pub fn validate(&self) -> Result<(), ValidationError> {
        for (field, v) in [
            ("cpu", self.cpu),
            ("memory", self.memory),
            ("disk", self.disk),
        ] {
            if !(0.1..=64.0).contains(&v) {
                return Err(ValidationError::new(
                    format!("overcommit.{field}"),
                    format!("{v} is out of range; allowed: 0.1 to 64"),
                ));
            }
        }
        Ok(())
    }
}

/// A host's physical resources and what VMs may be given of them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Capacity {
    /// Physical CPUs, memory (after the host's reserve) and data-disk size.
    pub physical: Resources,
    /// Overcommit ratios applied.
    pub overcommit: Overcommit,
    /// What VMs may be given in total: physical times overcommit.
    pub allocatable: Resources,
}

impl Capacity {
    /// Capacity from physical resources and ratios.
    pub fn new(physical: Resources, overcommit: Overcommit) -> Self {
        let scale = |v: f64, r: f64| (v * r).floor();
        Self {
            physical,
            overcommit,
            allocatable: Resources {
                vcpus: scale(f64::from(physical.vcpus), overcommit.cpu) as u32,
                memory_mib: scale(physical.memory_mib as f64, overcommit.memory) as u64,
                disk_gib: scale(physical.disk_gib as f64, overcommit.disk) as u64,
            },
        }
    }
}

/// The administrative and liveness state of a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HostState {
    /// Takes new VMs.
    Ready,
    /// Runs its VMs but takes no new ones.
    Cordoned,
    /// Its VMs are being moved away.
    Draining,
    /// Empty and out of service.
    Maintenance,
    /// Its agent's lease expired.
    Unreachable,
}

impl fmt::Display for HostState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ready => "ready",
            Self::Cordoned => "cordoned",
            Self::Draining => "draining",
            Self::Maintenance => "maintenance",
            Self::Unreachable => "unreachable",
        })
    }
}

/// A host as its agent registers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Host {
    /// Unique name.
    pub name: HostName,
    /// The address other hosts reach it at.
    pub address: String,
    /// Its resources.
    pub capacity: Capacity,
    /// The accelerator its VMs run with.
    pub accel: Accel,
    /// Why that accelerator was chosen.
    pub accel_reason: String,
    /// QEMU's version.
    pub qemu_version: String,
    /// Skyvisor's version of the agent.
    pub agent_version: String,
    /// The VM subnet served from this host's bridge.
    pub subnet: Ipv4Net,
    /// The host's own, cluster-unique address on the VM network (cluster
    /// overlay only): other hosts and VMs reach it there, and traffic it
    /// forwards into the VM network comes from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub bridge_address: Option<std::net::Ipv4Addr>,
    /// The agent's own HTTP endpoint (console logs, image cache, migration).
    pub agent_url: Option<String>,
    /// Free bytes on the file system of the agent's data directory, as last
    /// measured.
    pub disk_free_bytes: u64,
    /// Where its replica server for volumes listens (`host:port`); none if
    /// the host holds no volume replicas.
    #[serde(default)]
    pub replica_addr: Option<String>,
    /// When the agent started.
    pub started_at: DateTime<Utc>,
    /// The container runtime it runs containers with (`crun 1.8.1, cgroup
    /// v1`); none if it runs none (see `containers_unavailable`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_runtime: Option<String>,
    /// Why it runs no containers (no runtime installed, cgroups it cannot
    /// use), as its agent found at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub containers_unavailable: Option<String>,
}

/// A host as the API shows it: registration, state and what is allocated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostView {
    /// What the agent registered.
    pub host: Host,
    /// Ready, cordoned, unreachable...
    pub state: HostState,
    /// Resources promised to VMs bound to it.
    pub allocated: Resources,
    /// Allocatable minus allocated.
    pub free: Resources,
    /// Number of VMs bound to it.
    pub instances: u32,
}
