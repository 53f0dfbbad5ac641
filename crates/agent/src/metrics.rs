//! The agent's Prometheus metrics, served at `/metrics` (see
//! `docs/metrics.md` for every name): the host's CPU, memory, disk and
//! network use, its capacity and what its VMs are given, and per VM
//! (labels `project`, `vm`, `host`, `type`) vCPU and process CPU time,
//! memory in use, disk and network counters, phase and restarts; and per
//! replicated volume it serves, its I/O, replicas and epoch
//! ([`volumes`]).
//!
//! Nothing is sampled in the background: a scrape reads `/proc`, `/sys`
//! and each VM's QMP counters at that moment (the VMs at once, each with a
//! deadline), so the numbers are as fresh as the scrape and an idle agent
//! spends nothing on metrics. Supervisors keep the list of VMs current
//! through [`AgentMetrics::observe`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use skyvisor_core::{InstanceId, InstancePhase, InstanceSpec, InstanceStatus};

use crate::hypervisor::{DiskCounters, VmCounters};
use crate::volumes::{ServedSample, VolumeService};

pub mod history;
mod volumes;

/// A label set of one `result` or `outcome` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

/// Labels of a store operation.
#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct StoreOpLabels {
    op: String,
    result: String,
}

type Hist = prometheus_client::metrics::histogram::Histogram;

fn store_histogram() -> Hist {
    Hist::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.000_05, 2.0, 19,
    ))
}

/// What the agent counts as it goes (everything else is read at scrape).
struct Running {
    lease_renewals: prometheus_client::metrics::family::Family<
        ResultLabel,
        prometheus_client::metrics::counter::Counter,
    >,
    migrations: prometheus_client::metrics::family::Family<
        ResultLabel,
        prometheus_client::metrics::counter::Counter,
    >,
    migration_seconds: Hist,
    migration_pause_seconds: Hist,
    store_ops: prometheus_client::metrics::family::Family<StoreOpLabels, Hist, fn() -> Hist>,
    fence: std::sync::OnceLock<Arc<crate::fencing::Fence>>,
}

impl Running {
    fn new() -> Self {
        use prometheus_client::metrics::histogram::exponential_buckets;
        Self {
            lease_renewals: Default::default(),
            migrations: Default::default(),
            // 0.1 s to about 55 min.
            migration_seconds: Hist::new(exponential_buckets(0.1, 1.5, 26)),
            // 1 ms to about 16 s.
            migration_pause_seconds: Hist::new(exponential_buckets(0.001, 1.5, 24)),
            store_ops: prometheus_client::metrics::family::Family::new_with_constructor(
                store_histogram,
            ),
            fence: std::sync::OnceLock::new(),
        }
    }

    /// Registers the counters and, read now, the lease's health.
    fn register(&self, registry: &mut Registry) {
        use prometheus_client::registry::Unit;
        registry.register(
            "host_lease_renewals",
            "Renewals of the host's lease, by result (ok, failed, expired: a new lease was taken)",
            self.lease_renewals.clone(),
        );
        registry.register(
            "migrations",
            "Live migrations this host sent, by outcome (completed, stayed: the VM kept running here)",
            self.migrations.clone(),
        );
        registry.register_with_unit(
            "migration_duration",
            "Completed live migrations this host sent: from pick-up to running on the destination",
            Unit::Seconds,
            self.migration_seconds.clone(),
        );
        registry.register_with_unit(
            "migration_pause",
            "Completed live migrations this host sent: the guest's pause, from the source's stop to the destination's resume",
            Unit::Seconds,
            self.migration_pause_seconds.clone(),
        );
        registry.register_with_unit(
            "store_operation_duration",
            "Time of the store operations this agent makes",
            Unit::Seconds,
            self.store_ops.clone(),
        );
        if let Some(fence) = self.fence.get() {
            let age = fence
                .renewal_age()
                .map_or(f64::INFINITY, |a| a.as_secs_f64());
            registry.register_with_unit(
                "host_lease_renewal_age",
                "Time since the last successful renewal of the host's lease was sent; the host fences at host_fence_deadline_seconds",
                Unit::Seconds,
                ConstGauge::new(age),
            );
            registry.register_with_unit(
                "host_fence_deadline",
                "How long after its last renewal the host fences itself (a quarter TTL before its lease can expire)",
                Unit::Seconds,
                ConstGauge::new(fence.deadline().as_secs_f64()),
            );
            registry.register(
                "host_fenced",
                "1 while the host has fenced itself (killed its protected VMs and starts none)",
                ConstGauge::new(i64::from(fence.is_fenced())),
            );
        }
    }
}

/// How long one VM's QMP counters may take before a scrape goes on
/// without them.
const QMP_DEADLINE: Duration = Duration::from_millis(500);
/// Clock ticks per second of `/proc` CPU times (Linux's `USER_HZ`).
const TICKS: f64 = 100.0;

/// Labels as `(name, value)` pairs.
type Labels = Vec<(String, String)>;

/// What the metrics know of one local VM.
#[derive(Clone)]
struct VmEntry {
    labels: Labels,
    /// The VM (none only in the default entry).
    instance: Option<skyvisor_core::InstanceRef>,
    instance_type: String,
    vcpus: u32,
    memory_bytes: u64,
    phase: InstancePhase,
    restarts: u64,
    boots: u64,
    pid: Option<u32>,
    tap: String,
    counters: Option<Arc<dyn VmCounters>>,
}

/// The agent's metrics.
pub struct AgentMetrics {
    host: String,
    data_dir: PathBuf,
    capacity_vcpus: u32,
    capacity_memory_bytes: u64,
    started: std::time::SystemTime,
    vms: std::sync::Mutex<HashMap<InstanceId, VmEntry>>,
    /// vCPU threads by instance, with the pid they belong to.
    threads: std::sync::Mutex<HashMap<InstanceId, (u32, Vec<u32>)>>,
    scrapes: AtomicU64,
    /// Microseconds the previous scrape took.
    last_scrape_us: AtomicU64,
    running: Running,
    /// The host's volume service, when it serves volumes.
    volumes: std::sync::OnceLock<std::sync::Weak<VolumeService>>,
    /// The last hour of samples.
    pub history: history::History,
}

impl AgentMetrics {
    /// Metrics of host `host`, whose data (and VMs' disks) live in
    /// `data_dir`, with the capacity it offers.
    pub fn new(
        host: &str,
        data_dir: PathBuf,
        capacity_vcpus: u32,
        capacity_memory_bytes: u64,
    ) -> Self {
        Self {
            host: host.to_string(),
            data_dir,
            capacity_vcpus,
            capacity_memory_bytes,
            started: std::time::SystemTime::now(),
            vms: std::sync::Mutex::new(HashMap::new()),
            threads: std::sync::Mutex::new(HashMap::new()),
            scrapes: AtomicU64::new(0),
            last_scrape_us: AtomicU64::new(0),
            running: Running::new(),
            volumes: std::sync::OnceLock::new(),
            history: history::History::default(),
        }
    }

    /// The host's fence, whose lease health `/metrics` shows.
    pub fn set_fence(&self, fence: Arc<crate::fencing::Fence>) {
        let _ = self.running.fence.set(fence);
    }

    /// The host's volume service, whose served volumes `/metrics` shows.
    pub fn set_volumes(&self, volumes: &Arc<VolumeService>) {
        let _ = self.volumes.set(Arc::downgrade(volumes));
    }

    fn served_volumes(&self) -> Vec<ServedSample> {
        self.volumes
            .get()
            .and_then(std::sync::Weak::upgrade)
            .map(|v| v.served_samples())
            .unwrap_or_default()
    }

    /// Counts a renewal of the host's lease: `ok`, `failed` or `expired`.
    pub fn lease_renewal(&self, result: &str) {
        self.running
            .lease_renewals
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    /// Counts a live migration this host sent, with its figures when it
    /// completed.
    pub fn migration(&self, result: Option<&skyvisor_core::MigrationResult>) {
        let outcome = if result.is_some() {
            "completed"
        } else {
            "stayed"
        };
        self.running
            .migrations
            .get_or_create(&ResultLabel {
                result: outcome.to_string(),
            })
            .inc();
        if let Some(r) = result {
            self.running
                .migration_seconds
                .observe(r.total_ms as f64 / 1000.0);
            self.running
                .migration_pause_seconds
                .observe(r.pause_ms as f64 / 1000.0);
        }
    }

    /// An observer for [`skyvisor_store::ObservedStore`] that records the
    /// agent's store operations.
    pub fn store_observer(&self) -> skyvisor_store::Observer {
        let family = self.running.store_ops.clone();
        Arc::new(move |op, took, ok| {
            family
                .get_or_create(&StoreOpLabels {
                    op: op.to_string(),
                    result: if ok { "ok" } else { "error" }.to_string(),
                })
                .observe(took.as_secs_f64());
        })
    }

    fn vms(&self) -> std::sync::MutexGuard<'_, HashMap<InstanceId, VmEntry>> {
        // Plain data: a panicked writer leaves nothing half-done to fear.
        self.vms
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn threads(&self) -> std::sync::MutexGuard<'_, HashMap<InstanceId, (u32, Vec<u32>)>> {
        self.threads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records what a supervisor knows of its VM: its spec, its status and,
    /// while it runs, where its counters are.
    pub fn observe(
        &self,
        spec: &InstanceSpec,
        status: &InstanceStatus,
        counters: Option<Arc<dyn VmCounters>>,
    ) {
        let labels = vec![
            ("project".to_string(), spec.project.to_string()),
            ("vm".to_string(), spec.name.to_string()),
            ("host".to_string(), self.host.clone()),
            ("type".to_string(), spec.type_label()),
        ];
        let entry = VmEntry {
            labels,
            instance: Some(spec.instance_ref()),
            instance_type: spec.type_label(),
            vcpus: spec.resources.vcpus,
            memory_bytes: spec.resources.memory_mib * 1024 * 1024,
            phase: status.phase,
            restarts: status.restart_count,
            boots: status.boot_count,
            pid: status.pid,
            tap: skyvisor_net::tap_name(&spec.id),
            counters: counters.filter(|_| status.pid.is_some()),
        };
        self.vms().insert(spec.id, entry);
    }

    /// The VMs this host has, by id and name.
    pub fn instances(&self) -> Vec<(InstanceId, skyvisor_core::InstanceRef)> {
        self.vms()
            .iter()
            .filter_map(|(id, vm)| Some((*id, vm.instance.clone()?)))
            .collect()
    }

    /// Forgets a VM that is no longer this host's.
    pub fn forget(&self, id: &InstanceId) {
        self.vms().remove(id);
        self.threads().remove(id);
    }

    /// The vCPU threads of VM `id` running as `pid`, asked once per
    /// process.
    async fn vcpu_threads(&self, id: InstanceId, pid: u32, counters: &dyn VmCounters) -> Vec<u32> {
        if let Some((p, t)) = self.threads().get(&id)
            && *p == pid
        {
            return t.clone();
        }
        match tokio::time::timeout(QMP_DEADLINE, counters.vcpu_threads()).await {
            Ok(Ok(t)) => {
                self.threads().insert(id, (pid, t.clone()));
                t
            }
            _ => Vec::new(),
        }
    }

    /// Reads the VMs' and the host's numbers now (the VMs at once).
    async fn read_all(&self) -> (Vec<VmSample>, HostSample) {
        let vms: Vec<(InstanceId, VmEntry)> =
            self.vms().iter().map(|(k, v)| (*k, v.clone())).collect();
        let samples =
            futures::future::join_all(vms.into_iter().map(|(id, vm)| self.sample_vm(id, vm))).await;
        let host = tokio::task::spawn_blocking({
            let data_dir = self.data_dir.clone();
            move || HostSample::read(&data_dir)
        })
        .await
        .unwrap_or_default();
        (samples, host)
    }

    /// Reads every number now and encodes them (OpenMetrics text).
    pub async fn scrape(&self) -> String {
        let started = Instant::now();
        let (samples, host) = self.read_all().await;
        let snapshot = Snapshot {
            host_label: self.host.clone(),
            host,
            vms: samples,
            volumes: self.served_volumes(),
            capacity_vcpus: self.capacity_vcpus,
            capacity_memory_bytes: self.capacity_memory_bytes,
            started_unix: self
                .started
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            scrapes: self.scrapes.fetch_add(1, Ordering::Relaxed) + 1,
            last_scrape_seconds: self.last_scrape_us.load(Ordering::Relaxed) as f64 / 1e6,
        };
        let mut registry = Registry::with_prefix("skyvisor");
        registry.register_collector(Box::new(snapshot));
        self.running.register(&mut registry);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        self.last_scrape_us.store(
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        out
    }

    /// Every number now, as cumulative counters for `vm top` and `host
    /// top` (the same readings a scrape encodes); none if the host's name
    /// is not one (the agent checks it at start).
    pub async fn samples(&self) -> Option<skyvisor_core::top::AgentSamples> {
        use skyvisor_core::top::{AgentSamples, HostSample as HostView, VmSample as VmView};
        let at = chrono::Utc::now();
        let (samples, host) = self.read_all().await;
        let host_name = skyvisor_core::HostName::new(&self.host).ok()?;
        let cpu = |modes: &[&str]| -> f64 {
            host.cpu
                .iter()
                .filter(|(m, _)| modes.is_empty() || modes.contains(m))
                .map(|(_, v)| v)
                .sum()
        };
        let total = cpu(&[]);
        let idle = cpu(&["idle", "iowait"]);
        let host_view = HostView {
            host: host_name.clone(),
            cpus: host.cpus,
            cpu_busy_seconds: total - idle,
            cpu_total_seconds: total,
            memory_total_bytes: host.memory_total.unwrap_or(0),
            memory_available_bytes: host.memory_available.unwrap_or(0),
            disk_total_bytes: host.disk_total,
            disk_free_bytes: host.disk_free,
            net_rx_bytes: host.net.iter().map(|(_, c)| c.rx_bytes).sum(),
            net_tx_bytes: host.net.iter().map(|(_, c)| c.tx_bytes).sum(),
            vms_running: samples.iter().filter(|s| s.entry.pid.is_some()).count() as u32,
            capacity_vcpus: self.capacity_vcpus,
            allocated_vcpus: samples.iter().map(|s| s.entry.vcpus).sum(),
            at,
        };
        let vms = samples
            .into_iter()
            .filter_map(|s| {
                let instance = s.entry.instance.clone()?;
                Some(VmView {
                    id: s.id,
                    project: instance.project,
                    name: instance.name.to_string(),
                    host: host_name.clone(),
                    instance_type: s.entry.instance_type.clone(),
                    phase: s.entry.phase,
                    vcpus: s.entry.vcpus,
                    memory_bytes: s.entry.memory_bytes,
                    vcpu_seconds: s.vcpu_seconds,
                    rss_bytes: s.rss_bytes,
                    disk_read_bytes: s.disks.iter().map(|(_, d)| d.read_bytes).sum(),
                    disk_write_bytes: s.disks.iter().map(|(_, d)| d.write_bytes).sum(),
                    // The tap's transmit side is what the guest receives.
                    net_rx_bytes: s.net.map_or(0, |n| n.tx_bytes),
                    net_tx_bytes: s.net.map_or(0, |n| n.rx_bytes),
                    at,
                })
            })
            .collect();
        Some(AgentSamples {
            host: host_view,
            vms,
            lb_connections: Default::default(),
        })
    }

    async fn sample_vm(&self, id: InstanceId, vm: VmEntry) -> VmSample {
        let mut s = VmSample {
            id: Some(id),
            entry: vm.clone(),
            ..VmSample::default()
        };
        let Some(pid) = vm.pid else {
            return s;
        };
        if let Some(c) = &vm.counters {
            let threads = self.vcpu_threads(id, pid, c.as_ref()).await;
            s.vcpu_seconds = threads
                .iter()
                .filter_map(|t| cpu_seconds(&format!("/proc/{pid}/task/{t}/stat")))
                .reduce(|a, b| a + b);
            if let Ok(Ok(d)) = tokio::time::timeout(QMP_DEADLINE, c.disks()).await {
                s.disks = d;
            }
        }
        s.process_seconds = cpu_seconds(&format!("/proc/{pid}/stat"));
        s.rss_bytes = rss_bytes(pid);
        // A container is counted as a whole, by its cgroup.
        if let Some(c) = &vm.counters {
            if let Some(cpu) = c.cpu_seconds().await {
                s.vcpu_seconds = Some(cpu);
                s.process_seconds = Some(cpu);
            }
            if let Some(m) = c.memory_bytes().await {
                s.rss_bytes = Some(m);
            }
        }
        s.net = NetCounters::of_device(&vm.tap);
        s
    }
}

/// A VM's numbers at one scrape.
#[derive(Clone, Default)]
struct VmSample {
    id: Option<InstanceId>,
    entry: VmEntry,
    vcpu_seconds: Option<f64>,
    process_seconds: Option<f64>,
    rss_bytes: Option<u64>,
    disks: Vec<(String, DiskCounters)>,
    net: Option<NetCounters>,
}

impl Default for VmEntry {
    fn default() -> Self {
        Self {
            labels: Vec::new(),
            instance: None,
            instance_type: String::new(),
            vcpus: 0,
            memory_bytes: 0,
            phase: InstancePhase::Pending,
            restarts: 0,
            boots: 0,
            pid: None,
            tap: String::new(),
            counters: None,
        }
    }
}

/// A network device's counters (`/sys/class/net/DEV/statistics`), as the
/// device sees them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct NetCounters {
    rx_bytes: u64,
    tx_bytes: u64,
    rx_packets: u64,
    tx_packets: u64,
    rx_dropped: u64,
    tx_dropped: u64,
}

impl NetCounters {
    fn of_device(dev: &str) -> Option<Self> {
        let read = |name: &str| -> Option<u64> {
            std::fs::read_to_string(format!("/sys/class/net/{dev}/statistics/{name}"))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        Some(Self {
            rx_bytes: read("rx_bytes")?,
            tx_bytes: read("tx_bytes")?,
            rx_packets: read("rx_packets")?,
            tx_packets: read("tx_packets")?,
            rx_dropped: read("rx_dropped")?,
            tx_dropped: read("tx_dropped")?,
        })
    }
}

/// CPU seconds (user + system) of a `/proc/.../stat` file.
fn cpu_seconds(path: &str) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    parse_stat_cpu(&text)
}

/// User + system seconds from a `stat` line: fields 14 and 15, counted
/// after the command name (which may hold spaces, inside parentheses).
fn parse_stat_cpu(text: &str) -> Option<f64> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS)
}

/// Resident memory of a process, bytes.
fn rss_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_kib_field(&text, "VmRSS:").map(|k| k * 1024)
}

/// A `NAME: N kB` field of `/proc/.../status` or `/proc/meminfo`, KiB.
fn parse_kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The host's numbers at one scrape.
#[derive(Debug, Clone, Default)]
struct HostSample {
    /// CPU seconds by mode, all CPUs together.
    cpu: Vec<(&'static str, f64)>,
    cpus: u32,
    memory_total: Option<u64>,
    memory_available: Option<u64>,
    disk_total: u64,
    disk_free: u64,
    /// The host's own network devices (not VM taps, bridges or the
    /// overlay's): name and counters.
    net: Vec<(String, NetCounters)>,
}

impl HostSample {
    fn read(data_dir: &std::path::Path) -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let (disk_total, disk_free) = crate::host::disk_space(data_dir);
        let net = std::fs::read_dir("/sys/class/net")
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n != "lo" && !n.starts_with("sv"))
                    .filter_map(|n| NetCounters::of_device(&n).map(|c| (n, c)))
                    .collect()
            })
            .unwrap_or_default();
        let mut s = Self {
            cpus: stat
                .lines()
                .filter(|l| {
                    l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit)
                })
                .count() as u32,
            cpu: parse_cpu_modes(&stat),
            memory_total: parse_kib_field(&meminfo, "MemTotal:").map(|k| k * 1024),
            memory_available: parse_kib_field(&meminfo, "MemAvailable:").map(|k| k * 1024),
            disk_total,
            disk_free,
            net,
        };
        s.net.sort_by(|a, b| a.0.cmp(&b.0));
        s
    }
}

/// Seconds by mode from the first (`cpu `) line of `/proc/stat`.
fn parse_cpu_modes(stat: &str) -> Vec<(&'static str, f64)> {
    const MODES: [&str; 8] = [
        "user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal",
    ];
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return Vec::new();
    };
    line.split_whitespace()
        .skip(1)
        .zip(MODES)
        .filter_map(|(v, m)| Some((m, v.parse::<f64>().ok()? / TICKS)))
        .collect()
}

/// Everything one scrape read, encoded by the registry.
struct Snapshot {
    host_label: String,
    host: HostSample,
    vms: Vec<VmSample>,
    volumes: Vec<ServedSample>,
    capacity_vcpus: u32,
    capacity_memory_bytes: u64,
    started_unix: f64,
    scrapes: u64,
    last_scrape_seconds: f64,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Snapshot({} VMs)", self.vms.len())
    }
}

/// Writes one metric family: `samples` of one type, each with its labels.
fn family<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: Vec<(Labels, M)>,
) -> std::fmt::Result {
    let Some(first) = samples.first() else {
        return Ok(());
    };
    let mut m = enc.encode_descriptor(name, help, None, first.1.metric_type())?;
    for (labels, metric) in &samples {
        metric.encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn with(labels: &Labels, extra: &[(&str, &str)]) -> Labels {
    let mut l = labels.clone();
    l.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    l
}

fn gauge<N>(labels: Labels, v: N) -> (Labels, ConstGauge<N>) {
    (labels, ConstGauge::new(v))
}

fn counter<N>(labels: Labels, v: N) -> (Labels, ConstCounter<N>) {
    (labels, ConstCounter::new(v))
}

/// Every phase a VM may report, for the phase state set.
const PHASES: [InstancePhase; 7] = [
    InstancePhase::Pending,
    InstancePhase::Starting,
    InstancePhase::Running,
    InstancePhase::Stopping,
    InstancePhase::Stopped,
    InstancePhase::Failed,
    InstancePhase::Deleting,
];

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let host = vec![("host".to_string(), self.host_label.clone())];
        let h = &self.host;
        family(
            &mut enc,
            "host_cpu_seconds",
            "CPU time of the host, all CPUs together, by mode",
            h.cpu
                .iter()
                .map(|(m, v)| counter(with(&host, &[("mode", m)]), *v))
                .collect(),
        )?;
        family(
            &mut enc,
            "host_cpus",
            "CPUs the host's kernel sees",
            vec![gauge(host.clone(), i64::from(h.cpus))],
        )?;
        let mut memory = Vec::new();
        if let Some(t) = h.memory_total {
            memory.push(gauge(host.clone(), t));
        }
        family(&mut enc, "host_memory_bytes", "Memory of the host", memory)?;
        let mut available = Vec::new();
        if let Some(a) = h.memory_available {
            available.push(gauge(host.clone(), a));
        }
        family(
            &mut enc,
            "host_memory_available_bytes",
            "Memory the host could still give (MemAvailable)",
            available,
        )?;
        family(
            &mut enc,
            "host_disk_bytes",
            "Size of the file system holding the host's VM data",
            vec![gauge(host.clone(), h.disk_total)],
        )?;
        family(
            &mut enc,
            "host_disk_free_bytes",
            "Free space on the file system holding the host's VM data",
            vec![gauge(host.clone(), h.disk_free)],
        )?;
        let dev = |n: &str| with(&host, &[("device", n)]);
        family(
            &mut enc,
            "host_network_receive_bytes",
            "Bytes the host's own network devices received",
            h.net
                .iter()
                .map(|(n, c)| counter(dev(n), c.rx_bytes))
                .collect(),
        )?;
        family(
            &mut enc,
            "host_network_transmit_bytes",
            "Bytes the host's own network devices sent",
            h.net
                .iter()
                .map(|(n, c)| counter(dev(n), c.tx_bytes))
                .collect(),
        )?;
        family(
            &mut enc,
            "host_capacity_vcpus",
            "vCPUs the host offers to VMs (its overcommit applied)",
            vec![gauge(host.clone(), i64::from(self.capacity_vcpus))],
        )?;
        family(
            &mut enc,
            "host_capacity_memory_bytes",
            "Memory the host offers to VMs",
            vec![gauge(host.clone(), self.capacity_memory_bytes)],
        )?;
        let running: Vec<&VmSample> = self.vms.iter().filter(|v| v.entry.pid.is_some()).collect();
        family(
            &mut enc,
            "host_allocated_vcpus",
            "vCPUs given to the VMs running on the host",
            vec![gauge(
                host.clone(),
                running
                    .iter()
                    .map(|v| i64::from(v.entry.vcpus))
                    .sum::<i64>(),
            )],
        )?;
        family(
            &mut enc,
            "host_allocated_memory_bytes",
            "Memory given to the VMs running on the host",
            vec![gauge(
                host.clone(),
                running.iter().map(|v| v.entry.memory_bytes).sum::<u64>(),
            )],
        )?;
        family(
            &mut enc,
            "agent_up",
            "1 while the host's agent serves",
            vec![gauge(host.clone(), 1i64)],
        )?;
        family(
            &mut enc,
            "agent_start_time_seconds",
            "When the agent started, Unix time",
            vec![gauge(host.clone(), self.started_unix)],
        )?;
        family(
            &mut enc,
            "agent_scrapes",
            "Metrics scrapes the agent has served",
            vec![counter(host.clone(), self.scrapes)],
        )?;
        family(
            &mut enc,
            "agent_last_scrape_duration_seconds",
            "How long the agent's previous scrape took to read and encode",
            vec![gauge(host.clone(), self.last_scrape_seconds)],
        )?;

        // Per VM.
        let l = |v: &VmSample| v.entry.labels.clone();
        family(
            &mut enc,
            "vm_vcpus",
            "vCPUs the VM is given",
            self.vms
                .iter()
                .map(|v| gauge(l(v), i64::from(v.entry.vcpus)))
                .collect(),
        )?;
        family(
            &mut enc,
            "vm_memory_bytes",
            "Memory the VM is given",
            self.vms
                .iter()
                .map(|v| gauge(l(v), v.entry.memory_bytes))
                .collect(),
        )?;
        family(
            &mut enc,
            "vm_phase",
            "The VM's phase: 1 for the one it is in, 0 for the others",
            self.vms
                .iter()
                .flat_map(|v| {
                    PHASES.iter().map(move |p| {
                        gauge(
                            with(&v.entry.labels, &[("phase", &p.to_string())]),
                            i64::from(v.entry.phase == *p),
                        )
                    })
                })
                .collect(),
        )?;
        family(
            &mut enc,
            "vm_restarts",
            "Times the VM was restarted after it ended unasked",
            self.vms
                .iter()
                .map(|v| counter(l(v), v.entry.restarts))
                .collect(),
        )?;
        family(
            &mut enc,
            "vm_boots",
            "Times the VM's guest booted",
            self.vms
                .iter()
                .map(|v| counter(l(v), v.entry.boots))
                .collect(),
        )?;
        family(
            &mut enc,
            "vm_vcpu_seconds",
            "CPU time of the VM's vCPU threads (this hypervisor process)",
            self.vms
                .iter()
                .filter_map(|v| Some(counter(l(v), v.vcpu_seconds?)))
                .collect(),
        )?;
        family(
            &mut enc,
            "vm_process_cpu_seconds",
            "CPU time of the VM's whole hypervisor process (vCPUs, devices, I/O)",
            self.vms
                .iter()
                .filter_map(|v| Some(counter(l(v), v.process_seconds?)))
                .collect(),
        )?;
        family(
            &mut enc,
            "vm_memory_resident_bytes",
            "Memory the VM's hypervisor process holds (RSS)",
            self.vms
                .iter()
                .filter_map(|v| Some(gauge(l(v), v.rss_bytes?)))
                .collect(),
        )?;
        let disk =
            |v: &VmSample, f: fn(&DiskCounters) -> u64| -> Vec<(Labels, ConstCounter<u64>)> {
                v.disks
                    .iter()
                    .map(|(d, c)| counter(with(&v.entry.labels, &[("device", d)]), f(c)))
                    .collect()
            };
        let disk_seconds = |v: &VmSample,
                            f: fn(&DiskCounters) -> u64|
         -> Vec<(Labels, ConstCounter<f64>)> {
            v.disks
                .iter()
                .map(|(d, c)| counter(with(&v.entry.labels, &[("device", d)]), f(c) as f64 / 1e9))
                .collect()
        };
        type DiskFamily = (&'static str, &'static str, fn(&DiskCounters) -> u64);
        let disk_families: [DiskFamily; 5] = [
            ("vm_disk_read_bytes", "Bytes the VM read from a disk", |c| {
                c.read_bytes
            }),
            (
                "vm_disk_written_bytes",
                "Bytes the VM wrote to a disk",
                |c| c.write_bytes,
            ),
            (
                "vm_disk_reads",
                "Read requests the VM completed on a disk",
                |c| c.reads,
            ),
            (
                "vm_disk_writes",
                "Write requests the VM completed on a disk",
                |c| c.writes,
            ),
            (
                "vm_disk_flushes",
                "Flush requests the VM completed on a disk",
                |c| c.flushes,
            ),
        ];
        for (name, help, f) in disk_families {
            family(
                &mut enc,
                name,
                help,
                self.vms.iter().flat_map(|v| disk(v, f)).collect(),
            )?;
        }
        let time_families: [DiskFamily; 3] = [
            (
                "vm_disk_read_time_seconds",
                "Time the VM's disk reads took, summed (divide by reads for the mean latency)",
                |c| c.read_ns,
            ),
            (
                "vm_disk_write_time_seconds",
                "Time the VM's disk writes took, summed",
                |c| c.write_ns,
            ),
            (
                "vm_disk_flush_time_seconds",
                "Time the VM's disk flushes took, summed",
                |c| c.flush_ns,
            ),
        ];
        for (name, help, f) in time_families {
            family(
                &mut enc,
                name,
                help,
                self.vms.iter().flat_map(|v| disk_seconds(v, f)).collect(),
            )?;
        }
        // The tap's receive is the guest's transmit, and the other way.
        type NetFamily = (&'static str, &'static str, fn(&NetCounters) -> u64);
        let net_families: [NetFamily; 6] = [
            ("vm_network_transmit_bytes", "Bytes the VM sent", |c| {
                c.rx_bytes
            }),
            (
                "vm_network_receive_bytes",
                "Bytes delivered to the VM",
                |c| c.tx_bytes,
            ),
            ("vm_network_transmit_packets", "Packets the VM sent", |c| {
                c.rx_packets
            }),
            (
                "vm_network_receive_packets",
                "Packets delivered to the VM",
                |c| c.tx_packets,
            ),
            (
                "vm_network_transmit_dropped_packets",
                "Packets the VM sent that the host dropped",
                |c| c.rx_dropped,
            ),
            (
                "vm_network_receive_dropped_packets",
                "Packets for the VM that the host dropped",
                |c| c.tx_dropped,
            ),
        ];
        for (name, help, f) in net_families {
            family(
                &mut enc,
                name,
                help,
                self.vms
                    .iter()
                    .filter_map(|v| Some(counter(l(v), f(&v.net?))))
                    .collect(),
            )?;
        }
        volumes::encode(&mut enc, &self.host_label, &self.volumes)
    }
}

/// The `/metrics` route, for the API token of a cluster admin or a cluster
/// monitor (it names every project's VMs).
pub fn router(
    metrics: Arc<AgentMetrics>,
    directory: Arc<skyvisor_auth::Directory>,
) -> axum::Router {
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::response::IntoResponse;
    let serve = move |headers: HeaderMap| {
        let (metrics, directory) = (metrics.clone(), directory.clone());
        async move {
            let auth = headers
                .get(header::AUTHORIZATION)
                .map(|v| v.to_str().unwrap_or("\u{0}"));
            match directory.authenticate(auth).await {
                Err(e) => {
                    let status = if e.is_unauthenticated() {
                        StatusCode::UNAUTHORIZED
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    (status, format!("{e}\n")).into_response()
                }
                Ok(p) if !p.identity.may_read_metrics() => (
                    StatusCode::FORBIDDEN,
                    format!(
                        "/metrics needs a cluster admin or a cluster monitor; {} is neither\n",
                        p.identity.name
                    ),
                )
                    .into_response(),
                Ok(_) => {
                    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
                    let (content_type, body) =
                        skyvisor_core::exposition::negotiate(accept, metrics.scrape().await);
                    ([(header::CONTENT_TYPE, content_type)], body).into_response()
                }
            }
        }
    };
    axum::Router::new().route("/metrics", axum::routing::get(serve))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        let stat = "1234 (qemu system x86) S 1 2 3 4 5 6 7 8 9 10 250 150 0 0 20 0 5 0";
        assert_eq!(parse_stat_cpu(stat), Some(4.0));
        assert_eq!(parse_stat_cpu("garbage"), None);
        let status = "Name:\tqemu\nVmRSS:\t  2048 kB\n";
        assert_eq!(parse_kib_field(status, "VmRSS:"), Some(2048));
        let modes = parse_cpu_modes("cpu  100 0 50 1000 5 0 1 0 0 0\ncpu0 1 2 3 4\n");
        assert_eq!(modes[0], ("user", 1.0));
        assert_eq!(modes[3], ("idle", 10.0));
        assert_eq!(modes.len(), 8);
    }
}
