//! The catalogue of metric names: every metric Ferry exports is declared here, with its help text, so `/metrics`
//! can be reviewed in one place. Names carry the `ferry_` prefix and a unit; labels are bounded
//! (model, version, protocol, outcome), never a request id.
//!
//! The Prometheus endpoint itself is part of the monitoring work; until it lands only the catalogue exists.

/// A metric's name, type and help text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricDef {
    /// The exported name.
    pub name: &'static str,
    /// `counter`, `gauge` or `histogram`.
    pub kind: &'static str,
    /// The help text.
    pub help: &'static str,
}

/// Inference requests by model, protocol and outcome.
pub const REQUESTS: MetricDef = MetricDef {
    name: "ferry_requests_total",
    kind: "counter",
    help: "Inference requests, by model, version, protocol and outcome",
};

/// End-to-end request latency.
pub const REQUEST_DURATION: MetricDef = MetricDef {
    name: "ferry_request_duration_seconds",
    kind: "histogram",
    help: "Time from request received to response ready, by model and protocol",
};

/// Every metric in the catalogue.
pub const ALL: &[MetricDef] = &[REQUESTS, REQUEST_DURATION];
