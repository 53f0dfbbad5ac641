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
    /// Its id (none from agents older than this field): a new instance of
    /// an old one's name is another instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<crate::InstanceId>,
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

/// How often agents keep a sample for the metric history.
pub const HISTORY_STEP_SECONDS: u64 = 15;

/// The longest history agents keep and serve, minutes.
pub const HISTORY_MINUTES: u64 = 60;

/// One instance's rates over one step of its history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InstanceMetricPoint {
    /// The end of the step.
    pub at: DateTime<Utc>,
    /// CPU its vCPUs used, percent of one CPU (200 = two CPUs busy).
    pub cpu_percent: f64,
    /// Memory its process held (resident) at the end of the step, bytes.
    pub memory_bytes: u64,
    /// Disk reads, bytes per second.
    pub disk_read_bps: f64,
    /// Disk writes, bytes per second.
    pub disk_write_bps: f64,
    /// Received, bytes per second.
    pub net_rx_bps: f64,
    /// Sent, bytes per second.
    pub net_tx_bps: f64,
}

/// One host's rates over one step of its history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostMetricPoint {
    /// The end of the step.
    pub at: DateTime<Utc>,
    /// CPU busy, percent of the whole host (100 = every CPU busy).
    pub cpu_percent: f64,
    /// Memory in use (not available to new work), bytes.
    pub memory_used_bytes: u64,
    /// Memory, bytes.
    pub memory_total_bytes: u64,
    /// Received on the host's own devices, bytes per second.
    pub net_rx_bps: f64,
    /// Sent, bytes per second.
    pub net_tx_bps: f64,
    /// VMs running at the end of the step.
    pub vms_running: u32,
}

/// `GET /v1/instances/{name}/metrics`: an instance's recent history, as
/// its current host recorded it (oldest first; a step is missing where
/// the instance did not run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InstanceMetrics {
    /// The host whose record this is.
    pub host: HostName,
    /// Seconds between points.
    pub step_seconds: u64,
    /// The points.
    pub points: Vec<InstanceMetricPoint>,
}

/// `GET /v1/hosts/{name}/metrics`: a host's recent history (oldest first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostMetrics {
    /// The host.
    pub host: HostName,
    /// Seconds between points.
    pub step_seconds: u64,
    /// The points.
    pub points: Vec<HostMetricPoint>,
}

/// Seconds between two instants, if the second is later.
fn seconds_between(a: DateTime<Utc>, b: DateTime<Utc>) -> Option<f64> {
    let s = (b - a).num_milliseconds() as f64 / 1000.0;
    (s > 0.0).then_some(s)
}

/// A counter's rate per second between two readings (none if it went
/// back: the process restarted in between).
fn rate(before: u64, after: u64, secs: f64) -> Option<f64> {
    after.checked_sub(before).map(|d| d as f64 / secs)
}

impl InstanceMetricPoint {
    /// The rates between two samples of one instance; none when they do
    /// not make a step (not in order, or its process restarted between).
    pub fn between(before: &VmSample, after: &VmSample) -> Option<Self> {
        let secs = seconds_between(before.at, after.at)?;
        let cpu = after.vcpu_seconds? - before.vcpu_seconds?;
        if cpu < 0.0 {
            return None;
        }
        Some(Self {
            at: after.at,
            cpu_percent: cpu / secs * 100.0,
            memory_bytes: after.rss_bytes.unwrap_or(0),
            disk_read_bps: rate(before.disk_read_bytes, after.disk_read_bytes, secs)?,
            disk_write_bps: rate(before.disk_write_bytes, after.disk_write_bytes, secs)?,
            net_rx_bps: rate(before.net_rx_bytes, after.net_rx_bytes, secs)?,
            net_tx_bps: rate(before.net_tx_bytes, after.net_tx_bytes, secs)?,
        })
    }
}

impl HostMetricPoint {
    /// The rates between two samples of one host.
    pub fn between(before: &HostSample, after: &HostSample) -> Option<Self> {
        let secs = seconds_between(before.at, after.at)?;
        let total = after.cpu_total_seconds - before.cpu_total_seconds;
        let busy = after.cpu_busy_seconds - before.cpu_busy_seconds;
        let cpu_percent = if total > 0.0 {
            (busy / total * 100.0).clamp(0.0, 100.0)
        } else {
            0.0
        };
        Some(Self {
            at: after.at,
            cpu_percent,
            memory_used_bytes: after
                .memory_total_bytes
                .saturating_sub(after.memory_available_bytes),
            memory_total_bytes: after.memory_total_bytes,
            net_rx_bps: rate(before.net_rx_bytes, after.net_rx_bytes, secs).unwrap_or(0.0),
            net_tx_bps: rate(before.net_tx_bytes, after.net_tx_bytes, secs).unwrap_or(0.0),
            vms_running: after.vms_running,
        })
    }
}

#[cfg(test)]
mod history_tests {
    use super::*;

    fn vm(at_secs: i64, cpu: Option<f64>, written: u64) -> VmSample {
        VmSample {
            id: None,
            project: ProjectName::new("p").expect("test value"),
            name: "web".into(),
            host: HostName::new("h1").expect("test value"),
            instance_type: "nano".into(),
            phase: InstancePhase::Running,
            vcpus: 2,
            memory_bytes: 1 << 30,
            vcpu_seconds: cpu,
            rss_bytes: Some(100 << 20),
            disk_read_bytes: 0,
            disk_write_bytes: written,
            net_rx_bytes: 10,
            net_tx_bytes: 10,
            at: DateTime::from_timestamp(at_secs, 0).expect("test value"),
        }
    }

    #[test]
    fn an_instance_point_is_the_rates_between_two_samples() {
        let p = InstanceMetricPoint::between(&vm(0, Some(1.0), 0), &vm(10, Some(16.0), 40960))
            .expect("test value");
        assert_eq!(p.cpu_percent, 150.0);
        assert_eq!(p.disk_write_bps, 4096.0);
        assert_eq!(p.net_rx_bps, 0.0);
        assert_eq!(p.memory_bytes, 100 << 20);
    }

    #[test]
    fn a_restart_or_a_stopped_instance_makes_no_point() {
        // Counters went back: the process restarted.
        assert!(
            InstanceMetricPoint::between(&vm(0, Some(9.0), 0), &vm(10, Some(1.0), 0)).is_none()
        );
        assert!(
            InstanceMetricPoint::between(&vm(0, Some(1.0), 100), &vm(10, Some(2.0), 0)).is_none()
        );
        // Not running: no CPU counter.
        assert!(InstanceMetricPoint::between(&vm(0, None, 0), &vm(10, None, 0)).is_none());
        // Out of order.
        assert!(
            InstanceMetricPoint::between(&vm(10, Some(1.0), 0), &vm(0, Some(2.0), 0)).is_none()
        );
    }

    #[test]
    fn a_host_point_is_busy_over_total() {
        let h = |at: i64, busy: f64, total: f64| HostSample {
            host: HostName::new("h1").expect("test value"),
            cpus: 2,
            cpu_busy_seconds: busy,
            cpu_total_seconds: total,
            memory_total_bytes: 1000,
            memory_available_bytes: 250,
            disk_total_bytes: 0,
            disk_free_bytes: 0,
            net_rx_bytes: 0,
            net_tx_bytes: 0,
            vms_running: 3,
            capacity_vcpus: 2,
            allocated_vcpus: 2,
            at: DateTime::from_timestamp(at, 0).expect("test value"),
        };
        let p =
            HostMetricPoint::between(&h(0, 10.0, 100.0), &h(10, 15.0, 120.0)).expect("test value");
        assert_eq!(p.cpu_percent, 25.0);
        assert_eq!(p.memory_used_bytes, 750);
        assert_eq!(p.vms_running, 3);
    }
}
