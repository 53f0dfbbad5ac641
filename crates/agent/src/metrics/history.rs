//! The last hour of the host's and its instances' samples, for the web
//! console's charts (`/v1/instances/{name}/metrics`, `/v1/hosts/{name}/metrics`).
//! Kept in memory: an agent that restarts starts a new history, and an
//! instance's history stays with the host that recorded it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use skyvisor_core::top::{
    AgentSamples, HISTORY_MINUTES, HostMetricPoint, HostSample, InstanceMetricPoint, VmSample,
};
use skyvisor_core::{InstanceId, ProjectName};

/// Recent samples, oldest first.
#[derive(Default)]
pub struct History {
    inner: Mutex<Samples>,
}

#[derive(Default)]
struct Samples {
    host: VecDeque<HostSample>,
    /// By instance: a new instance of a deleted one's name starts afresh.
    instances: HashMap<InstanceKey, VecDeque<VmSample>>,
}

/// An instance's id, or its name for samples without one.
type InstanceKey = (Option<InstanceId>, ProjectName, String);

impl History {
    /// Adds one reading of everything, and forgets what is older than the
    /// history keeps.
    pub fn record(&self, s: &AgentSamples) {
        let oldest = s.host.at - keep();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        push(&mut inner.host, s.host.clone(), oldest, |x| x.at);
        for vm in &s.vms {
            let key = (vm.id, vm.project.clone(), vm.name.clone());
            push(
                inner.instances.entry(key).or_default(),
                vm.clone(),
                oldest,
                |x| x.at,
            );
        }
        // Instances gone from this host age out too.
        inner.instances.retain(|_, q| {
            q.retain(|x| x.at >= oldest);
            !q.is_empty()
        });
    }

    /// The host's points of the last `minutes`.
    pub fn host_points(&self, minutes: u64) -> Vec<HostMetricPoint> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        points(
            &inner.host,
            since(minutes),
            |x| x.at,
            HostMetricPoint::between,
        )
    }

    /// An instance's points of the last `minutes`.
    pub fn instance_points(
        &self,
        project: &ProjectName,
        name: &str,
        minutes: u64,
    ) -> Vec<InstanceMetricPoint> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        // The instance of that name now: the one sampled last.
        inner
            .instances
            .iter()
            .filter(|((_, p, n), _)| p == project && n == name)
            .filter_map(|(_, q)| q.back().map(|last| (last.at, q)))
            .max_by_key(|(at, _)| *at)
            .map(|(_, q)| points(q, since(minutes), |x| x.at, InstanceMetricPoint::between))
            .unwrap_or_default()
    }
}

/// How far back samples are kept: the history and one step before it (the
/// first point is a difference).
fn keep() -> chrono::Duration {
    chrono::Duration::minutes(HISTORY_MINUTES as i64) + chrono::Duration::seconds(60)
}

fn since(minutes: u64) -> DateTime<Utc> {
    Utc::now() - chrono::Duration::minutes(minutes.min(HISTORY_MINUTES) as i64)
}

fn push<T>(q: &mut VecDeque<T>, x: T, oldest: DateTime<Utc>, at: impl Fn(&T) -> DateTime<Utc>) {
    q.push_back(x);
    while q.front().is_some_and(|f| at(f) < oldest) {
        q.pop_front();
    }
}

/// The points between consecutive samples that end after `from`.
fn points<T, P>(
    q: &VecDeque<T>,
    from: DateTime<Utc>,
    at: impl Fn(&T) -> DateTime<Utc>,
    between: impl Fn(&T, &T) -> Option<P>,
) -> Vec<P> {
    q.iter()
        .zip(q.iter().skip(1))
        .filter(|(_, b)| at(b) >= from)
        .filter_map(|(a, b)| between(a, b))
        .collect()
}

/// Records a sample every `step` until the agent stops.
pub async fn run(metrics: Arc<super::AgentMetrics>, step: Duration) {
    let mut tick = tokio::time::interval(step);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Some(s) = metrics.samples().await {
            metrics.history.record(&s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skyvisor_core::top::HostSample;
    use skyvisor_core::{HostName, InstancePhase};

    fn reading(at: DateTime<Utc>, n: f64) -> AgentSamples {
        let host = HostName::new("h1").expect("test value");
        AgentSamples {
            host: HostSample {
                host: host.clone(),
                cpus: 2,
                cpu_busy_seconds: n,
                cpu_total_seconds: 4.0 * n,
                memory_total_bytes: 100,
                memory_available_bytes: 40,
                disk_total_bytes: 0,
                disk_free_bytes: 0,
                net_rx_bytes: 0,
                net_tx_bytes: 0,
                vms_running: 1,
                capacity_vcpus: 2,
                allocated_vcpus: 1,
                at,
            },
            vms: vec![VmSample {
                id: Some(InstanceId(uuid::Uuid::from_u128(1))),
                project: ProjectName::new("p").expect("test value"),
                name: "web".into(),
                host,
                instance_type: "nano".into(),
                phase: InstancePhase::Running,
                vcpus: 1,
                memory_bytes: 1 << 30,
                vcpu_seconds: Some(n),
                rss_bytes: Some(1),
                disk_read_bytes: 0,
                disk_write_bytes: 0,
                net_rx_bytes: 0,
                net_tx_bytes: 0,
                at,
            }],
            lb_connections: Default::default(),
        }
    }

    #[test]
    fn the_history_keeps_an_hour_and_serves_the_asked_part() {
        let h = History::default();
        let now = Utc::now();
        // Two hours of readings, a minute apart.
        for i in (0..=120).rev() {
            h.record(&reading(
                now - chrono::Duration::minutes(i),
                (120 - i) as f64 * 6.0,
            ));
        }
        let kept = h.inner.lock().expect("test value").host.len();
        assert!((60..=62).contains(&kept), "kept {kept}");
        let hour = h.host_points(60);
        assert!((59..=61).contains(&hour.len()), "{}", hour.len());
        assert!(hour.iter().all(|p| (p.cpu_percent - 25.0).abs() < 1e-9));
        assert_eq!(hour.last().expect("test value").memory_used_bytes, 60);
        let p = ProjectName::new("p").expect("test value");
        let ten = h.instance_points(&p, "web", 10);
        assert!((9..=11).contains(&ten.len()), "{}", ten.len());
        // 6 CPU seconds a minute = 10%.
        assert!(ten.iter().all(|x| (x.cpu_percent - 10.0).abs() < 1e-6));
        assert!(h.instance_points(&p, "other", 60).is_empty());
        // Asking for more than the history is the history.
        assert_eq!(h.host_points(600).len(), hour.len());
    }

    #[test]
    fn a_new_instance_of_an_old_name_has_its_own_history() {
        let h = History::default();
        let now = Utc::now();
        for i in 0..5 {
            h.record(&reading(now - chrono::Duration::minutes(20 - i), i as f64));
        }
        // Deleted, and another instance made with its name.
        for i in 0..2 {
            let mut r = reading(now - chrono::Duration::minutes(1 - i), 100.0 + i as f64);
            r.vms[0].id = Some(InstanceId(uuid::Uuid::from_u128(2)));
            h.record(&r);
        }
        let p = ProjectName::new("p").expect("test value");
        assert_eq!(h.instance_points(&p, "web", 60).len(), 1);
    }

    #[test]
    fn an_instance_that_left_ages_out() {
        let h = History::default();
        let now = Utc::now();
        h.record(&reading(now - chrono::Duration::minutes(200), 1.0));
        let mut later = reading(now, 2.0);
        later.vms.clear();
        h.record(&later);
        assert!(h.inner.lock().expect("test value").instances.is_empty());
    }
}
