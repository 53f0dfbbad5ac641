//! Prometheus metrics of the control plane, served at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a request metric.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// HTTP method.
    pub method: String,
    /// The route's path template (`/v1/instances/{name}`), never the path
    /// itself: names do not become labels.
    pub route: String,
    /// Status code.
    pub status: u16,
}

/// Labels of a request duration.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// HTTP method.
    pub method: String,
    /// The route's path template.
    pub route: String,
}

/// Labels of an outcome (failovers).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `restarted` or `refused`.
    pub outcome: String,
}

/// Labels of a store operation.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreOpLabels {
    /// `get`, `list`, `txn`, `watch`, `grant_lease`, `keep_alive`...
    pub op: String,
    /// `ok` or `error`.
    pub result: String,
}

/// Buckets of store operations: 50 µs to about 13 s.
pub fn store_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 19))
}

/// Buckets of API request durations: 0.5 ms to about 33 s.
fn request_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_5, 2.0, 17))
}

/// The control plane's metrics.
pub struct Metrics {
    registry: Registry,
    /// Requests served, by method, route and status.
    pub requests: Family<RequestLabels, Counter>,
    /// How long requests took, by method and route.
    pub request_seconds: Family<RouteLabels, Histogram, fn() -> Histogram>,
    /// Placement latency in seconds.
    pub placement_seconds: Histogram,
    /// Latency of the store transaction that creates an instance, seconds.
    pub create_commit_seconds: Histogram,
    /// Failovers this server decided as leader, by outcome.
    pub failovers: Family<OutcomeLabels, Counter>,
    /// From a host's lease lost to its VM rebound elsewhere, seconds.
    pub failover_seconds: Histogram,
    /// Store operations of this server, by operation and result.
    pub store_op_seconds: Family<StoreOpLabels, Histogram, fn() -> Histogram>,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("skyvisor");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("api_requests", "API requests served", requests.clone());
        let request_seconds =
            Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                request_histogram,
            );
        registry.register_with_unit(
            "api_request_duration",
            "Time to serve an API request, from routing to the response",
            prometheus_client::registry::Unit::Seconds,
            request_seconds.clone(),
        );
        // Fine buckets (±12%) from 1 µs to about a minute, so percentiles
        // read from them are meaningful.
        let placement_seconds = Histogram::new(exponential_buckets(0.000_001, 1.25, 80));
        registry.register(
            "placement_seconds",
            "Time to choose a host for a VM",
            placement_seconds.clone(),
        );
        let create_commit_seconds = Histogram::new(exponential_buckets(0.000_001, 1.25, 80));
        registry.register(
            "create_commit_seconds",
            "Time to commit a new instance to the store",
            create_commit_seconds.clone(),
        );
        let failovers = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "failovers",
            "VMs of dead hosts restarted elsewhere (restarted) or left down (refused), decided by this server as leader",
            failovers.clone(),
        );
        let failover_seconds = Histogram::new(exponential_buckets(0.25, 1.5, 20));
        registry.register_with_unit(
            "failover_duration",
            "From a dead host's lease lost to its VM rebound to another host",
            prometheus_client::registry::Unit::Seconds,
            failover_seconds.clone(),
        );
        let store_op_seconds =
            Family::<StoreOpLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                store_histogram,
            );
        registry.register_with_unit(
            "store_operation_duration",
            "Time of the store operations this server makes",
            prometheus_client::registry::Unit::Seconds,
            store_op_seconds.clone(),
        );
        Self {
            registry,
            requests,
            request_seconds,
            placement_seconds,
            create_commit_seconds,
            failovers,
            failover_seconds,
            store_op_seconds,
        }
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// An observer for [`skyvisor_store::ObservedStore`] that records into
/// `family`.
pub fn store_observer(
    family: Family<StoreOpLabels, Histogram, fn() -> Histogram>,
) -> skyvisor_store::Observer {
    std::sync::Arc::new(move |op, took, ok| {
        family
            .get_or_create(&StoreOpLabels {
                op: op.to_string(),
                result: if ok { "ok" } else { "error" }.to_string(),
            })
            .observe(took.as_secs_f64());
    })
}
