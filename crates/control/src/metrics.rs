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
        Self {
            registry,
            requests,
            request_seconds,
            placement_seconds,
            create_commit_seconds,
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
