//! Prometheus metrics, served by the admin listener at `/metrics`.
//!
//! The registry outlives every snapshot: a reload keeps counting into the same series, because
//! a series is found by its labels. Labels are route, upstream, target and plugin names from the
//! manifest, methods from a fixed list and status classes, never a raw path or header, so the
//! number of series is bounded by the manifest.
//!
//! Handles for a route's or a plugin's series are looked up when a snapshot is built
//! ([`RouteMetrics`], [`PluginMetrics`]), so a request pays for atomic increments only, not for
//! hashing labels into a locked map; the one exception is a request counter's first use per
//! method and status class, which is then kept.

use std::sync::OnceLock;
use std::time::Duration;

use http::{Method, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::runtime::{FailureKind, Phase};

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The route label of requests no route took (404, 405).
pub const NO_ROUTE: &str = "(none)";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: &'static str,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabels {
    upstream: String,
    target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginPhaseLabels {
    plugin: String,
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    plugin: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FreshLabels {
    plugin: String,
    made: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency buckets from 100 µs to about 26 s: plugin calls sit at the bottom, slow upstreams at
/// the top.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 19))
}

/// The process's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: HistogramFamily<RouteLabels>,
    upstream_duration: HistogramFamily<TargetLabels>,
    plugin_duration: HistogramFamily<PluginPhaseLabels>,
    plugin_failures: Family<FailureLabels, Counter>,
    plugin_fresh_instances: Family<FreshLabels, Counter>,
    open_connections: Gauge,
    reloads: Family<ResultLabels, Counter>,
    target_healthy: Family<TargetLabels, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("wasmgate");
        let requests = Family::default();
        registry.register(
            "requests",
            "Requests answered, by route, method and status class",
            requests.clone(),
        );
        let request_duration =
            HistogramFamily::new_with_constructor(latency_histogram as fn() -> _);
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival to its response head, by route",
            request_duration.clone(),
        );
        let upstream_duration =
            HistogramFamily::new_with_constructor(latency_histogram as fn() -> _);
        registry.register(
            "upstream_duration_seconds",
            "Time from sending a request upstream to its response head, by upstream and target",
            upstream_duration.clone(),
        );
        let plugin_duration = HistogramFamily::new_with_constructor(latency_histogram as fn() -> _);
        registry.register(
            "plugin_duration_seconds",
            "Plugin invocation time (instantiation included in the request phase), by plugin and phase; only the phases a plugin asks for are called",
            plugin_duration.clone(),
        );
        let plugin_failures = Family::default();
        registry.register(
            "plugin_failures",
            "Plugin failures, by plugin and kind",
            plugin_failures.clone(),
        );
        let plugin_fresh_instances = Family::default();
        registry.register(
            "plugin_fresh_instances",
            "Fresh instances requests took from a plugin's pre-initialised image (isolation: per-request), by plugin and when each was made: ahead (after an earlier response) or on_request (while the request waited)",
            plugin_fresh_instances.clone(),
        );
        let open_connections = Gauge::default();
        registry.register(
            "open_connections",
            "Client connections open now",
            open_connections.clone(),
        );
        let reloads = Family::default();
        registry.register(
            "reloads",
            "Manifest reloads, by result (success or failure)",
            reloads.clone(),
        );
        let target_healthy = Family::default();
        registry.register(
            "upstream_target_healthy",
            "1 when an upstream target receives traffic, 0 when it is held out",
            target_healthy.clone(),
        );
        Metrics {
            registry,
            requests,
            request_duration,
            upstream_duration,
            plugin_duration,
            plugin_failures,
            plugin_fresh_instances,
            open_connections,
            reloads,
            target_healthy,
        }
    }

    /// The registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(8 << 10);
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }

    /// The series of one route.
    pub fn route(&self, route: &str) -> RouteMetrics {
        RouteMetrics {
            name: route.to_string(),
            requests: self.requests.clone(),
            by_method_and_class: Default::default(),
            duration: self.request_duration.get_or_create_owned(&RouteLabels {
                route: route.into(),
            }),
        }
    }

    /// The series of one plugin.
    pub fn plugin(&self, plugin: &str) -> PluginMetrics {
        let phase = |phase: &'static str| {
            self.plugin_duration
                .get_or_create_owned(&PluginPhaseLabels {
                    plugin: plugin.into(),
                    phase,
                })
        };
        PluginMetrics {
            name: plugin.to_string(),
            request: phase("request"),
            response: phase("response"),
            complete: phase("complete"),
            failures: self.plugin_failures.clone(),
            fresh: ["ahead", "on_request"].map(|made| {
                self.plugin_fresh_instances
                    .get_or_create_owned(&FreshLabels {
                        plugin: plugin.into(),
                        made,
                    })
            }),
        }
    }

    /// The upstream-duration series of one target, and its health gauge.
    pub fn target(&self, upstream: &str, target: &str) -> (Histogram, Gauge) {
        let labels = TargetLabels {
            upstream: upstream.into(),
            target: target.into(),
        };
        (
            self.upstream_duration.get_or_create_owned(&labels),
            self.target_healthy.get_or_create_owned(&labels),
        )
    }

    /// A client connection opened; the guard closes it.
    pub fn connection(&self) -> ConnectionGuard {
        self.open_connections.inc();
        ConnectionGuard(self.open_connections.clone())
    }

    /// Counts a reload attempt.
    pub fn reloaded(&self, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// Counts a request that no route took.
    pub fn unrouted(&self, method: &Method, status: StatusCode) {
        self.requests
            .get_or_create(&RequestLabels {
                route: NO_ROUTE.into(),
                method: method_label(method).1,
                class: class_label(status).1,
            })
            .inc();
    }
}

/// Decrements the open-connection gauge when dropped.
#[derive(Debug)]
pub struct ConnectionGuard(Gauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "other",
];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn method_label(method: &Method) -> (usize, &'static str) {
    let i = METHODS[..9]
        .iter()
        .position(|m| *m == method.as_str())
        .unwrap_or(9);
    (i, METHODS[i])
}

fn class_label(status: StatusCode) -> (usize, &'static str) {
    let i = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
    (i, CLASSES[i])
}

/// A route's series.
pub struct RouteMetrics {
    name: String,
    requests: Family<RequestLabels, Counter>,
    by_method_and_class: [[OnceLock<Counter>; 5]; 10],
    duration: Histogram,
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteMetrics")
            .field("route", &self.name)
            .finish_non_exhaustive()
    }
}

impl RouteMetrics {
    /// Counts a response head sent and how long it took.
    pub fn answered(&self, method: &Method, status: StatusCode, elapsed: Duration) {
        let (m, method) = method_label(method);
        let (c, class) = class_label(status);
        self.by_method_and_class[m][c]
            .get_or_init(|| {
                self.requests.get_or_create_owned(&RequestLabels {
                    route: self.name.clone(),
                    method,
                    class,
                })
            })
            .inc();
        self.duration.observe(elapsed.as_secs_f64());
    }
}

/// A plugin's series.
pub struct PluginMetrics {
    name: String,
    request: Histogram,
    response: Histogram,
    complete: Histogram,
    failures: Family<FailureLabels, Counter>,
    /// Fresh instances taken from an image: made ahead, made on the request's path.
    fresh: [Counter; 2],
}

impl std::fmt::Debug for PluginMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginMetrics")
            .field("plugin", &self.name)
            .finish_non_exhaustive()
    }
}

impl PluginMetrics {
    /// Records one invocation's duration. Configure time is part of the request phase, where
    /// a request pays for it.
    pub fn invoked(&self, phase: Phase, elapsed: Duration) {
        let histogram = match phase {
            Phase::Configure | Phase::Request => &self.request,
            Phase::Response => &self.response,
            Phase::Complete => &self.complete,
        };
        histogram.observe(elapsed.as_secs_f64());
    }

    /// Counts a fresh instance a request took from the plugin's image: `ahead` when it was made
    /// before the request asked for it.
    pub fn fresh_instance(&self, ahead: bool) {
        self.fresh[usize::from(!ahead)].inc();
    }

    /// Counts a failure.
    pub fn failed(&self, kind: FailureKind) {
        self.failures
            .get_or_create(&FailureLabels {
                plugin: self.name.clone(),
                kind: kind.as_str(),
            })
            .inc();
    }
}
