//! The `skyvisor_volume_*` families: per replicated volume this host
//! serves (labels `project`, `volume`, `host`), the I/O its primary served,
//! its replicas' states, resync progress and epoch.

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use skyvisor_core::ReplicaState;
use skyvisor_volume::{IoKindSnapshot, stats::LATENCY_BUCKETS};

use super::{Labels, counter, family, gauge, with};
use crate::volumes::ServedSample;

/// Every state a replica may be in, for the replica state set.
const REPLICA_STATES: [ReplicaState; 4] = [
    ReplicaState::InSync,
    ReplicaState::Resyncing,
    ReplicaState::OutOfSync,
    ReplicaState::Unreachable,
];

/// A histogram read at scrape time from counters kept elsewhere.
#[derive(Debug)]
struct ConstHistogram {
    sum: f64,
    count: u64,
    /// Upper bound and count of each bucket, not cumulative.
    buckets: Vec<(f64, u64)>,
}

impl ConstHistogram {
    fn latency(k: &IoKindSnapshot) -> Self {
        let bounds = LATENCY_BUCKETS.iter().copied().chain([f64::INFINITY]);
        Self {
            sum: k.seconds,
            count: k.ops,
            buckets: bounds.zip(k.buckets.iter().copied()).collect(),
        }
    }
}

impl EncodeMetric for ConstHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> std::fmt::Result {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

fn labels(host: &str, v: &ServedSample) -> Labels {
    vec![
        ("project".to_string(), v.name.project.to_string()),
        ("volume".to_string(), v.name.name.to_string()),
        ("host".to_string(), host.to_string()),
    ]
}

/// Writes the volume families for the volumes `host` serves.
pub(super) fn encode(
    enc: &mut DescriptorEncoder,
    host: &str,
    volumes: &[ServedSample],
) -> std::fmt::Result {
    let per_kind = |f: &dyn Fn(&IoKindSnapshot) -> u64| -> Vec<(Labels, _)> {
        volumes
            .iter()
            .flat_map(|v| {
                let l = labels(host, v);
                v.io.kinds
                    .iter()
                    .map(move |k| counter(with(&l, &[("op", k.kind.as_str())]), f(k)))
            })
            .collect()
    };
    family(
        enc,
        "volume_operations",
        "Requests the volume's primary served, by op (read, write, flush, discard), failed ones included",
        per_kind(&|k| k.ops),
    )?;
    family(
        enc,
        "volume_operation_errors",
        "Requests the volume's primary failed, by op",
        per_kind(&|k| k.errors),
    )?;
    family(
        enc,
        "volume_bytes",
        "Bytes the volume's primary read, wrote (to every in-sync replica) or discarded, by op",
        per_kind(&|k| k.bytes),
    )?;
    family(
        enc,
        "volume_operation_duration_seconds",
        "Latency of the volume's requests as the guest sees it (a write: until every in-sync replica has it), by op",
        volumes
            .iter()
            .flat_map(|v| {
                let l = labels(host, v);
                v.io.kinds.iter().map(move |k| {
                    (
                        with(&l, &[("op", k.kind.as_str())]),
                        ConstHistogram::latency(k),
                    )
                })
            })
            .collect(),
    )?;
    family(
        enc,
        "volume_size_bytes",
        "Size of the volume",
        volumes
            .iter()
            .map(|v| gauge(labels(host, v), v.size))
            .collect(),
    )?;
    family(
        enc,
        "volume_writable",
        "1 while the volume acknowledges writes (enough replicas are in sync)",
        volumes
            .iter()
            .map(|v| gauge(labels(host, v), i64::from(v.runtime.writable)))
            .collect(),
    )?;
    family(
        enc,
        "volume_epoch",
        "The volume's replication epoch; it grows whenever the in-sync set or the primary changes",
        volumes
            .iter()
            .map(|v| gauge(labels(host, v), v.runtime.epoch))
            .collect(),
    )?;
    family(
        enc,
        "volume_epoch_changes",
        "Epoch changes this host saw while it served the volume",
        volumes
            .iter()
            .map(|v| counter(labels(host, v), v.io.epoch_changes))
            .collect(),
    )?;
    family(
        enc,
        "volume_replica_state",
        "Each replica's state: 1 for the one it is in, 0 for the others",
        volumes
            .iter()
            .flat_map(|v| {
                let l = labels(host, v);
                v.runtime.replicas.iter().flat_map(move |r| {
                    let replica = r.host.to_string();
                    let l = l.clone();
                    REPLICA_STATES.iter().map(move |s| {
                        gauge(
                            with(&l, &[("replica", &replica), ("state", &s.to_string())]),
                            i64::from(r.state == *s),
                        )
                    })
                })
            })
            .collect(),
    )?;
    family(
        enc,
        "volume_replicas_in_sync",
        "Replicas that have every acknowledged write",
        volumes
            .iter()
            .map(|v| {
                let n = v
                    .runtime
                    .replicas
                    .iter()
                    .filter(|r| r.state == ReplicaState::InSync)
                    .count();
                gauge(labels(host, v), n as i64)
            })
            .collect(),
    )?;
    family(
        enc,
        "volume_resync_remaining_bytes",
        "Bytes the resyncs under way still have to copy",
        volumes
            .iter()
            .map(|v| {
                let left: u64 = v
                    .runtime
                    .replicas
                    .iter()
                    .filter_map(|r| {
                        Some(r.resync_total_bytes?.saturating_sub(r.resync_done_bytes?))
                    })
                    .sum();
                gauge(labels(host, v), left)
            })
            .collect(),
    )?;
    family(
        enc,
        "volume_resynced_bytes",
        "Bytes copied by completed resyncs since this host became the primary",
        volumes
            .iter()
            .map(|v| counter(labels(host, v), v.runtime.resynced_bytes))
            .collect(),
    )
}
