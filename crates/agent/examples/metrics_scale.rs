//! How much a metrics scrape costs an agent with many VMs: `N` simulated
//! VMs (default 500), each a real process to read in `/proc` (this one,
//! with one vCPU thread) and QMP counters that answer at once with two
//! disks. Prints the wall time and this process's CPU time per scrape.
//!
//! `cargo run --release -p skyvisor-agent --example metrics_scale -- [N] [SCRAPES]`

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use chrono::Utc;
use skyvisor_agent::hypervisor::{DiskCounters, HvError, VmCounters};
use skyvisor_agent::metrics::AgentMetrics;
use skyvisor_core::{
    HostName, ImageName, InstanceId, InstanceName, InstancePhase, InstanceSpec, InstanceStatus,
    MacAddr, NetworkAttachment, PowerState, Resources, RestartPolicy,
};

/// Counters that answer at once, as an idle QEMU's QMP nearly does.
struct Simulated;

#[async_trait]
impl VmCounters for Simulated {
    async fn disks(&self) -> Result<Vec<(String, DiskCounters)>, HvError> {
        let c = DiskCounters {
            read_bytes: 1 << 30,
            write_bytes: 1 << 29,
            reads: 10_000,
            writes: 5_000,
            flushes: 100,
            read_ns: 1_000_000_000,
            write_ns: 2_000_000_000,
            flush_ns: 10_000_000,
        };
        Ok(vec![("root".into(), c), ("vol-data".into(), c)])
    }

    async fn vcpu_threads(&self) -> Result<Vec<u32>, HvError> {
        Ok(vec![std::process::id()])
    }
}

fn spec(i: usize) -> InstanceSpec {
    let id = InstanceId::random();
    InstanceSpec {
        kind: Default::default(),
        security_groups: Vec::new(),
        labels: Default::default(),
        project: skyvisor_core::auth::default_project(),
        name: InstanceName::new(format!("vm-{i}")).expect("name"),
        id,
        image: ImageName::new("debian-12").expect("image"),
        instance_type: None,
        resources: Resources {
            vcpus: 1,
            memory_mib: 256,
            disk_gib: 4,
        },
        power: PowerState::Running,
        restart_policy: RestartPolicy::OnFailure,
        host: HostName::new("h1").expect("host"),
        network: NetworkAttachment {
            vni: None,
            network: "default".into(),
            ip: "10.9.0.2".parse().expect("ip"),
            prefix_len: 24,
            gateway: "10.9.0.1".parse().expect("gw"),
            mac: MacAddr::derived_from(id.0.as_bytes()),
        },
        reboot_generation: 0,
        stop_timeout_secs: 5,
        force_stop: false,
        deleting: false,
        generation: 1,
        created_at: Utc::now(),
        restore: None,
        migration: None,
        clone_of: None,
        checkpoint_schedule: None,
        spread_group: None,
        group: None,
        accel: None,
        volumes: vec![],
        ha: Default::default(),
        ha_priority: 0,
        guest: Default::default(),
    }
}

/// This process's CPU seconds (user + system).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<f64> = rest
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // After the state field: utime and stime are the 12th and 13th numbers.
    (f.get(10).copied().unwrap_or(0.0) + f.get(11).copied().unwrap_or(0.0)) / 100.0
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let vms: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(500);
    let scrapes: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(50);
    let metrics = AgentMetrics::new("h1", std::env::temp_dir(), 64, 256 << 30);
    let mut status = InstanceStatus::pending();
    status.phase = InstancePhase::Running;
    status.pid = Some(std::process::id());
    for i in 0..vms {
        metrics.observe(&spec(i), &status, Some(Arc::new(Simulated)));
    }
    // One scrape to warm up (vCPU threads are asked once per process).
    let bytes = metrics.scrape().await.len();
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let mut walls = Vec::with_capacity(scrapes);
    for _ in 0..scrapes {
        let t = Instant::now();
        std::hint::black_box(metrics.scrape().await);
        walls.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let total = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    walls.sort_by(f64::total_cmp);
    let median = walls[walls.len() / 2];
    let max = walls[walls.len() - 1];
    println!(
        "{vms} simulated VMs, {scrapes} scrapes: wall median {median:.1} ms, max {max:.1} ms; \
         CPU {:.1} ms per scrape; {:.0} KiB per scrape; {:.2} s in all",
        cpu * 1000.0 / scrapes as f64,
        bytes as f64 / 1024.0,
        total
    );
}
