//! `skyvisor vm top` and `skyvisor host top`: live tables of VMs and hosts,
//! refreshed in place, computed from two samples of the agents' counters
//! (the numbers `/metrics` serves).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;
use skyvisor_core::top::{HostSample, TopSamples, VmSample};

use crate::client::Client;
use crate::output::{self, OutputFormat, table};

/// One VM's rates over an interval.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VmRates {
    /// Its name.
    pub name: String,
    /// Its host.
    pub host: String,
    /// Its type.
    pub instance_type: String,
    /// Its phase.
    pub phase: String,
    /// vCPUs it was given.
    pub vcpus: u32,
    /// Cores' worth of CPU its vCPUs used (0 to vcpus).
    pub cpu_cores: f64,
    /// Resident memory of its QEMU, MiB.
    pub memory_mib: f64,
    /// Memory it was given, MiB.
    pub memory_given_mib: f64,
    /// Disk reads, bytes per second.
    pub disk_read_bps: f64,
    /// Disk writes, bytes per second.
    pub disk_write_bps: f64,
    /// Network received, bytes per second.
    pub net_rx_bps: f64,
    /// Network sent, bytes per second.
    pub net_tx_bps: f64,
}

/// One host's rates over an interval.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HostRates {
    /// The host.
    pub host: String,
    /// Busy share of all its CPUs, percent.
    pub cpu_percent: f64,
    /// Its CPUs.
    pub cpus: u32,
    /// Memory in use, MiB.
    pub memory_used_mib: f64,
    /// Memory, MiB.
    pub memory_total_mib: f64,
    /// Disk in use, GiB.
    pub disk_used_gib: f64,
    /// Disk, GiB.
    pub disk_total_gib: f64,
    /// Network received, bytes per second.
    pub net_rx_bps: f64,
    /// Network sent, bytes per second.
    pub net_tx_bps: f64,
    /// VMs running.
    pub vms_running: u32,
    /// vCPUs promised / offered.
    pub vcpus: String,
}

fn rate(a: u64, b: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        return 0.0;
    }
    b.saturating_sub(a) as f64 / secs
}

/// The VMs' rates between two samples (a VM absent from either, or
/// restarted in between, shows what can be known).
pub fn vm_rates(before: &[VmSample], after: &[VmSample]) -> Vec<VmRates> {
    let prev: HashMap<&str, &VmSample> = before.iter().map(|v| (v.name.as_str(), v)).collect();
    after
        .iter()
        .map(|b| {
            let a = prev.get(b.name.as_str()).copied();
            let secs = a.map_or(0.0, |a| (b.at - a.at).num_milliseconds() as f64 / 1000.0);
            let cpu = match (a.and_then(|a| a.vcpu_seconds), b.vcpu_seconds) {
                (Some(x), Some(y)) if secs > 0.0 && y >= x => (y - x) / secs,
                _ => 0.0,
            };
            let r = |f: fn(&VmSample) -> u64| a.map_or(0.0, |a| rate(f(a), f(b), secs));
            VmRates {
                name: b.name.clone(),
                host: b.host.to_string(),
                instance_type: b.instance_type.clone(),
                phase: b.phase.to_string(),
                vcpus: b.vcpus,
                cpu_cores: cpu,
                memory_mib: b.rss_bytes.unwrap_or(0) as f64 / 1048576.0,
                memory_given_mib: b.memory_bytes as f64 / 1048576.0,
                disk_read_bps: r(|v| v.disk_read_bytes),
                disk_write_bps: r(|v| v.disk_write_bytes),
                net_rx_bps: r(|v| v.net_rx_bytes),
                net_tx_bps: r(|v| v.net_tx_bytes),
            }
        })
        .collect()
}

/// The hosts' rates between two samples.
pub fn host_rates(before: &[HostSample], after: &[HostSample]) -> Vec<HostRates> {
    let prev: HashMap<&str, &HostSample> = before.iter().map(|h| (h.host.as_str(), h)).collect();
    after
        .iter()
        .map(|b| {
            let a = prev.get(b.host.as_str()).copied();
            let secs = a.map_or(0.0, |a| (b.at - a.at).num_milliseconds() as f64 / 1000.0);
            let cpu = a.map_or(0.0, |a| {
                let total = b.cpu_total_seconds - a.cpu_total_seconds;
                if total > 0.0 {
                    100.0 * (b.cpu_busy_seconds - a.cpu_busy_seconds) / total
                } else {
                    0.0
                }
            });
            HostRates {
                host: b.host.to_string(),
                cpu_percent: cpu,
                cpus: b.cpus,
                memory_used_mib: b
                    .memory_total_bytes
                    .saturating_sub(b.memory_available_bytes)
                    as f64
                    / 1048576.0,
                memory_total_mib: b.memory_total_bytes as f64 / 1048576.0,
                disk_used_gib: b.disk_total_bytes.saturating_sub(b.disk_free_bytes) as f64
                    / 1073741824.0,
                disk_total_gib: b.disk_total_bytes as f64 / 1073741824.0,
                net_rx_bps: a.map_or(0.0, |a| rate(a.net_rx_bytes, b.net_rx_bytes, secs)),
                net_tx_bps: a.map_or(0.0, |a| rate(a.net_tx_bytes, b.net_tx_bytes, secs)),
                vms_running: b.vms_running,
                vcpus: format!("{}/{}", b.allocated_vcpus, b.capacity_vcpus),
            }
        })
        .collect()
}

fn kib(bps: f64) -> String {
    format!("{:.1}", bps / 1024.0)
}

/// What `vm top` and `host top` share: how often, and whether once.
pub struct TopArgs {
    /// Seconds between samples.
    pub interval: f64,
    /// Print one table (after one interval) and exit.
    pub once: bool,
}

async fn watch<T: Serialize>(
    client: &Client,
    format: OutputFormat,
    args: &TopArgs,
    path: &str,
    rates: impl Fn(&TopSamples, &TopSamples) -> Vec<T>,
    print: impl Fn(&[T]),
) -> Result<()> {
    let interval = Duration::from_secs_f64(args.interval.clamp(0.2, 3600.0));
    let mut before: TopSamples = client.get(path).await?;
    let live = !args.once && format == OutputFormat::Table && std::io::stdout().is_terminal();
    loop {
        tokio::time::sleep(interval).await;
        let after: TopSamples = client.get(path).await?;
        let rows = rates(&before, &after);
        if live {
            // Clear the screen and draw again in place.
            print!("\x1b[2J\x1b[H");
        }
        output::print(format, &rows, |rows| print(rows));
        for u in &after.unreachable {
            eprintln!("not answering: {u}");
        }
        if args.once {
            return Ok(());
        }
        before = after;
    }
}

/// `skyvisor vm top`.
pub async fn vm_top(client: &Client, format: OutputFormat, args: TopArgs) -> Result<()> {
    watch(
        client,
        format,
        &args,
        "/v1/top/instances",
        |a, b| vm_rates(&a.vms, &b.vms),
        |rows| {
            let mut t = table(&[
                "NAME",
                "HOST",
                "TYPE",
                "PHASE",
                "CPU",
                "MEMORY MiB",
                "DISK R/W KiB/s",
                "NET RX/TX KiB/s",
            ]);
            for r in rows {
                t.add_row(vec![
                    r.name.clone(),
                    r.host.clone(),
                    r.instance_type.clone(),
                    r.phase.clone(),
                    format!(
                        "{:.0}% of {} vCPU",
                        100.0 * r.cpu_cores / f64::from(r.vcpus.max(1)),
                        r.vcpus
                    ),
                    format!("{:.0} / {:.0}", r.memory_mib, r.memory_given_mib),
                    format!("{} / {}", kib(r.disk_read_bps), kib(r.disk_write_bps)),
                    format!("{} / {}", kib(r.net_rx_bps), kib(r.net_tx_bps)),
                ]);
            }
            println!("{t}");
        },
    )
    .await
}

/// `skyvisor host top`.
pub async fn host_top(client: &Client, format: OutputFormat, args: TopArgs) -> Result<()> {
    watch(
        client,
        format,
        &args,
        "/v1/top/hosts",
        |a, b| host_rates(&a.hosts, &b.hosts),
        |rows| {
            let mut t = table(&[
                "HOST",
                "CPU",
                "MEMORY MiB",
                "DISK GiB",
                "NET RX/TX KiB/s",
                "VMS",
                "VCPUS",
            ]);
            for r in rows {
                t.add_row(vec![
                    r.host.clone(),
                    format!("{:.0}% of {}", r.cpu_percent, r.cpus),
                    format!("{:.0} / {:.0}", r.memory_used_mib, r.memory_total_mib),
                    format!("{:.1} / {:.1}", r.disk_used_gib, r.disk_total_gib),
                    format!("{} / {}", kib(r.net_rx_bps), kib(r.net_tx_bps)),
                    r.vms_running.to_string(),
                    r.vcpus.clone(),
                ]);
            }
            println!("{t}");
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration as D, Utc};
    use skyvisor_core::instance::InstancePhase;

    fn vm(at: chrono::DateTime<Utc>, cpu: f64, written: u64) -> VmSample {
        VmSample {
            id: None,
            project: skyvisor_core::ProjectName::new("web").expect("p"),
            name: "a".into(),
            host: skyvisor_core::HostName::new("h1").expect("h"),
            instance_type: "micro".into(),
            phase: InstancePhase::Running,
            vcpus: 2,
            memory_bytes: 256 << 20,
            vcpu_seconds: Some(cpu),
            rss_bytes: Some(100 << 20),
            disk_read_bytes: 0,
            disk_write_bytes: written,
            net_rx_bytes: 0,
            net_tx_bytes: 0,
            at,
        }
    }

    #[test]
    fn rates_come_from_two_samples() {
        let t0 = Utc::now();
        let r = vm_rates(&[vm(t0, 10.0, 0)], &[vm(t0 + D::seconds(2), 13.0, 4096)]);
        assert_eq!(r.len(), 1);
        assert!((r[0].cpu_cores - 1.5).abs() < 1e-9, "{r:?}");
        assert!((r[0].disk_write_bps - 2048.0).abs() < 1e-9, "{r:?}");
        // A VM restarted in between (its counters went back) shows no CPU
        // rather than a negative one.
        let r = vm_rates(&[vm(t0, 10.0, 0)], &[vm(t0 + D::seconds(2), 1.0, 0)]);
        assert_eq!(r[0].cpu_cores, 0.0);
    }
}
