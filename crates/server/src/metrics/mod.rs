//! Prometheus metrics: the catalogue of every metric Ferry exports (name, type, help, labels, buckets) in one
//! place, the in-process registry that records them, and the exposition served at `GET /metrics`, in the
//! Prometheus text format (0.0.4) or, when the scraper asks for it, in OpenMetrics 1.0.0.
//!
//! Names carry the `ferry_` prefix and a unit (`_seconds`, `_bytes`, `_total`). Labels are bounded: model and
//! version come from the repository (a request for an unknown model is recorded with an empty model label), protocol
//! and outcome from fixed lists; never a request id or a raw URL.
//!
//! The request path records into atomics only: every loaded version has a [`VersionSeries`] (made once, when its
//! scheduler starts, and kept for the life of the process so counters never go back), and a request that resolved to
//! a version adds to its counters and histogram buckets without a lock or an allocation. Requests that never reached a
//! version (an unknown model, no ready version) take a slower path through labelled maps behind a mutex.
//!
//! With `--metrics-compat triton` the page also carries Triton's `nv_inference_*` families, with Triton's names,
//! labels (`model`, `version`) and units (cumulative microseconds), computed from the same series.
//!
//! The folder also holds what the page reports beyond counters: [`drift`] (per-version drift windows and their
//! PSI/KS reports) and [`shadow`] (how a shadow version's outputs agree with the live ones). It uses only
//! [`crate::error`].

pub mod drift;
pub mod shadow;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::error::{ErrorKind, InferError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A metric's catalogue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricDef {
    /// The exported name.
    pub name: &'static str,
    /// `counter`, `gauge` or `histogram`.
    pub kind: &'static str,
    /// The help text.
    pub help: &'static str,
    /// The label names, in order.
    pub labels: &'static [&'static str],
}

const fn def(
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
) -> MetricDef {
    MetricDef {
        name,
        kind,
        help,
        labels,
    }
}

/// Inference requests by outcome (`success` or an error kind such as `invalid_argument`).
pub const REQUESTS: MetricDef = def(
    "ferry_requests_total",
    "counter",
    "Inference requests, by model, version, protocol and outcome",
    &["model", "version", "protocol", "outcome"],
);
/// End-to-end request latency.
pub const REQUEST_DURATION: MetricDef = def(
    "ferry_request_duration_seconds",
    "histogram",
    "Time from request received to response ready, by model, version and protocol",
    &["model", "version", "protocol"],
);
/// Time spent waiting in a version's queue.
pub const QUEUE_DURATION: MetricDef = def(
    "ferry_queue_duration_seconds",
    "histogram",
    "Time a request waited in its model version's queue",
    &["model", "version"],
);
/// Engine time per batch.
pub const COMPUTE_DURATION: MetricDef = def(
    "ferry_compute_duration_seconds",
    "histogram",
    "Engine time per batch (inputs joined, run, outputs split)",
    &["model", "version"],
);
/// Requests per batch.
pub const BATCH_SIZE: MetricDef = def(
    "ferry_batch_size",
    "histogram",
    "Requests per batch run by the engine",
    &["model", "version"],
);
/// Request body bytes.
pub const REQUEST_BYTES: MetricDef = def(
    "ferry_request_bytes_total",
    "counter",
    "Inference request body bytes received, by model and protocol",
    &["model", "protocol"],
);
/// Response body bytes.
pub const RESPONSE_BYTES: MetricDef = def(
    "ferry_response_bytes_total",
    "counter",
    "Inference response body bytes sent (gRPC: encoded message bytes), by model and protocol",
    &["model", "protocol"],
);
/// Requests being handled right now.
pub const IN_FLIGHT: MetricDef = def(
    "ferry_requests_in_flight",
    "gauge",
    "Inference requests being handled now",
    &[],
);
/// Requests waiting per version.
pub const QUEUE_DEPTH: MetricDef = def(
    "ferry_queue_depth",
    "gauge",
    "Requests waiting in a model version's queue",
    &["model", "version"],
);
/// Version states.
pub const MODEL_STATE: MetricDef = def(
    "ferry_model_state",
    "gauge",
    "1 for the current state of each model version (LOADING, READY, UNAVAILABLE, UNLOADING)",
    &["model", "version", "state"],
);
/// Model load time.
pub const LOAD_DURATION: MetricDef = def(
    "ferry_model_load_duration_seconds",
    "histogram",
    "Time to prepare a model version, successful or not",
    &["model"],
);
/// Failed loads.
pub const LOAD_FAILURES: MetricDef = def(
    "ferry_model_load_failures_total",
    "counter",
    "Model versions that failed to load",
    &["model"],
);
/// Feature drift, PSI.
pub const DRIFT_PSI: MetricDef = def(
    "ferry_feature_drift_psi",
    "gauge",
    "Population stability index of a feature's recent inputs against the training data",
    &["model", "version", "feature"],
);
/// Feature drift, KS.
pub const DRIFT_KS: MetricDef = def(
    "ferry_feature_drift_ks",
    "gauge",
    "Kolmogorov-Smirnov statistic of a feature's recent inputs against the training data",
    &["model", "version", "feature"],
);
/// Prediction drift, PSI.
pub const PREDICTION_DRIFT_PSI: MetricDef = def(
    "ferry_prediction_drift_psi",
    "gauge",
    "Population stability index of an output's recent predictions against the model's predictions on its training data",
    &["model", "version", "output"],
);
/// Prediction drift, KS (numeric outputs only).
pub const PREDICTION_DRIFT_KS: MetricDef = def(
    "ferry_prediction_drift_ks",
    "gauge",
    "Kolmogorov-Smirnov statistic of a numeric output's recent predictions against the model's predictions on its training data",
    &["model", "version", "output"],
);
/// Payload log records.
pub const PAYLOAD_RECORDS: MetricDef = def(
    "ferry_payload_log_records_total",
    "counter",
    "Sampled payload records handed to the log writer (queued) or dropped because it fell behind",
    &["outcome"],
);
/// Canary rollout decisions.
pub const ROLLOUT_DECISIONS: MetricDef = def(
    "ferry_rollout_decisions_total",
    "counter",
    "Canary rollout decisions taken by this replica (step_passed, promoted, rolled_back)",
    &["model", "decision"],
);
/// Canary rollout state.
pub const ROLLOUT_STATE: MetricDef = def(
    "ferry_rollout_state",
    "gauge",
    "1 for the current state of each model's canary rollout (running, promoted, rolled_back), by candidate version",
    &["model", "version", "state"],
);
/// Canary traffic share.
pub const ROLLOUT_WEIGHT: MetricDef = def(
    "ferry_rollout_candidate_weight_percent",
    "gauge",
    "The candidate version's share of the model's unversioned traffic, in percent",
    &["model", "version"],
);
/// Shadow requests.
pub const SHADOW_REQUESTS: MetricDef = def(
    "ferry_shadow_requests_total",
    "counter",
    "Copies of live requests sent to a shadow version, by outcome (compared, failed, dropped)",
    &["model", "version", "outcome"],
);
/// Shadow agreement.
pub const SHADOW_AGREEMENT: MetricDef = def(
    "ferry_shadow_agreement_ratio",
    "gauge",
    "Share of a non-float output's elements on which the shadow version agreed with the live answer",
    &["model", "version", "output"],
);
/// Shadow difference.
pub const SHADOW_DIFFERENCE: MetricDef = def(
    "ferry_shadow_mean_absolute_difference",
    "gauge",
    "Mean absolute difference between a float output of the shadow version and the live answer",
    &["model", "version", "output"],
);
/// Process CPU time.
pub const CPU: MetricDef = def(
    "process_cpu_seconds_total",
    "counter",
    "User and system CPU time of the process",
    &[],
);
/// Resident memory.
pub const RSS: MetricDef = def(
    "process_resident_memory_bytes",
    "gauge",
    "Resident memory of the process",
    &[],
);
/// Open file descriptors.
pub const FDS: MetricDef = def("process_open_fds", "gauge", "Open file descriptors", &[]);
/// Threads.
pub const THREADS: MetricDef = def(
    "process_threads",
    "gauge",
    "Operating-system threads of the process",
    &[],
);
/// Start time.
pub const START_TIME: MetricDef = def(
    "process_start_time_seconds",
    "gauge",
    "Start time of the process since the Unix epoch",
    &[],
);
/// Build information.
pub const BUILD_INFO: MetricDef = def(
    "ferry_build_info",
    "gauge",
    "Always 1; the version label says which build runs",
    &["version"],
);

/// Every metric in the catalogue, in exposition order.
pub const ALL: &[MetricDef] = &[
    REQUESTS,
    REQUEST_DURATION,
    QUEUE_DURATION,
    COMPUTE_DURATION,
    BATCH_SIZE,
    REQUEST_BYTES,
    RESPONSE_BYTES,
    IN_FLIGHT,
    QUEUE_DEPTH,
    MODEL_STATE,
    LOAD_DURATION,
    LOAD_FAILURES,
    DRIFT_PSI,
    DRIFT_KS,
    PREDICTION_DRIFT_PSI,
    PREDICTION_DRIFT_KS,
    ROLLOUT_DECISIONS,
    ROLLOUT_STATE,
    ROLLOUT_WEIGHT,
    SHADOW_REQUESTS,
    SHADOW_AGREEMENT,
    SHADOW_DIFFERENCE,
    PAYLOAD_RECORDS,
    CPU,
    RSS,
    FDS,
    THREADS,
    START_TIME,
    BUILD_INFO,
];

/// Triton's successful requests (`--metrics-compat triton`).
pub const NV_SUCCESS: MetricDef = def(
    "nv_inference_request_success",
    "counter",
    "Number of successful inference requests, all batch sizes",
    &["model", "version"],
);
/// Triton's failed requests.
pub const NV_FAILURE: MetricDef = def(
    "nv_inference_request_failure",
    "counter",
    "Number of failed inference requests, all batch sizes",
    &["model", "version"],
);
/// Triton's inference count (rows).
pub const NV_COUNT: MetricDef = def(
    "nv_inference_count",
    "counter",
    "Number of inferences performed (does not include cached requests)",
    &["model", "version"],
);
/// Triton's execution count (batches).
pub const NV_EXEC_COUNT: MetricDef = def(
    "nv_inference_exec_count",
    "counter",
    "Number of model executions performed (does not include cached requests)",
    &["model", "version"],
);
/// Triton's cumulative request time.
pub const NV_REQUEST_DURATION: MetricDef = def(
    "nv_inference_request_duration_us",
    "counter",
    "Cumulative inference request duration in microseconds (includes cached requests)",
    &["model", "version"],
);
/// Triton's cumulative queue time.
pub const NV_QUEUE_DURATION: MetricDef = def(
    "nv_inference_queue_duration_us",
    "counter",
    "Cumulative inference queuing duration in microseconds (includes cached requests)",
    &["model", "version"],
);
/// Triton's cumulative compute time.
pub const NV_COMPUTE_INFER_DURATION: MetricDef = def(
    "nv_inference_compute_infer_duration_us",
    "counter",
    "Cumulative compute inference duration in microseconds (does not include cached requests)",
    &["model", "version"],
);
/// Triton's pending requests.
pub const NV_PENDING: MetricDef = def(
    "nv_inference_pending_request_count",
    "gauge",
    "Instantaneous number of pending requests awaiting execution per-model.",
    &["model", "version"],
);

/// Triton's families, emitted with `--metrics-compat triton`, in exposition order.
pub const TRITON: &[MetricDef] = &[
    NV_SUCCESS,
    NV_FAILURE,
    NV_COUNT,
    NV_EXEC_COUNT,
    NV_REQUEST_DURATION,
    NV_QUEUE_DURATION,
    NV_COMPUTE_INFER_DURATION,
    NV_PENDING,
];

/// Bucket bounds for durations, in seconds: geometric from 50 µs to 10 s.
pub const DURATION_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];
/// [`DURATION_BUCKETS`] in nanoseconds, the unit the request path records in.
const DURATION_BUCKETS_NS: &[u64] = &[
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];
/// Bucket bounds for batch sizes: powers of two.
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
const BATCH_BUCKETS_INT: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256];

/// The protocol a request came in by: the `protocol` label's values. A new front door adds a variant here (and to
/// [`Protocol::ALL`]); its requests are then counted without a lock like the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// KServe v2 over REST.
    KserveRest,
    /// TF Serving over REST.
    TfservingRest,
    /// KServe v2 over gRPC.
    KserveGrpc,
    /// TF Serving over gRPC.
    TfservingGrpc,
}

impl Protocol {
    /// Every protocol, in declaration order (`ALL[p as usize] == p`).
    pub const ALL: [Protocol; 4] = [
        Protocol::KserveRest,
        Protocol::TfservingRest,
        Protocol::KserveGrpc,
        Protocol::TfservingGrpc,
    ];

    /// The `protocol` label value.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::KserveRest => "rest_kserve",
            Protocol::TfservingRest => "rest_tfserving",
            Protocol::KserveGrpc => "grpc_kserve",
            Protocol::TfservingGrpc => "grpc_tfserving",
        }
    }
}

/// How a request ended: the `outcome` label's values are `success` and the error kinds' labels, derived from
/// [`ErrorKind`], so a new kind is a new outcome with nothing else to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered.
    Success,
    /// Failed with this kind of error.
    Failed(ErrorKind),
}

impl Outcome {
    /// Every outcome: `success`, then the error kinds in [`ErrorKind::ALL`]'s order (`ALL[o.index()] == o`).
    pub const ALL: [Outcome; ErrorKind::ALL.len() + 1] = {
        let mut all = [Outcome::Success; ErrorKind::ALL.len() + 1];
        let mut i = 0;
        while i < ErrorKind::ALL.len() {
            all[i + 1] = Outcome::Failed(ErrorKind::ALL[i]);
            i += 1;
        }
        all
    };

    /// The outcome of a result.
    pub fn of<T>(result: &Result<T, InferError>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(e) => Outcome::Failed(e.kind),
        }
    }

    /// Its place in [`Outcome::ALL`].
    fn index(self) -> usize {
        match self {
            Outcome::Success => 0,
            Outcome::Failed(kind) => kind as usize + 1,
        }
    }

    /// The `outcome` label value.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failed(kind) => kind.label(),
        }
    }
}

/// What the registry records and what the page shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsOptions {
    /// Record requests and batches (`--no-metrics` turns it off; the page then shows only states, loads, drift and
    /// process figures).
    pub enabled: bool,
    /// Also emit Triton's `nv_inference_*` families (`--metrics-compat triton`).
    pub triton: bool,
}

impl Default for MetricsOptions {
    fn default() -> MetricsOptions {
        MetricsOptions {
            enabled: true,
            triton: false,
        }
    }
}

/// The two exposition formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format, version 0.0.4.
    Prometheus,
    /// OpenMetrics 1.0.0.
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics when it accepts `application/openmetrics-text` at least
    /// as much as `text/plain`, else the Prometheus text format.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Prometheus;
        };
        let (mut open, mut text) = (0.0f64, 0.0f64);
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let mut q = 1.0;
            for p in parts {
                if let Some(v) = p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")) {
                    q = v.trim().parse::<f64>().unwrap_or(0.0);
                }
            }
            match media.as_str() {
                "application/openmetrics-text" => open = open.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if open > 0.0 && open >= text {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }

    /// The `Content-Type` of a page in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// A histogram of floats, for the labelled (locked) path.
#[derive(Debug, Clone)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(buckets: usize) -> Histogram {
        Histogram {
            counts: vec![0; buckets],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, bounds: &[f64], v: f64) {
        if let Some(i) = bounds.iter().position(|b| v <= *b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }
}

/// A histogram of integers (nanoseconds, batch sizes) recorded with atomics: one counter per bucket plus one past the
/// last bound, so `_count` and the `+Inf` bucket are the same sum and always agree.
#[derive(Debug)]
struct AtomicHistogram {
    bounds: &'static [u64],
    /// The bounds as the `le` label writes them, in the exported unit.
    le: &'static [f64],
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
}

impl AtomicHistogram {
    fn new(bounds: &'static [u64], le: &'static [f64]) -> AtomicHistogram {
        AtomicHistogram {
            bounds,
            le,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    fn observe(&self, v: u64) {
        let i = self.bounds.partition_point(|b| *b < v);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(v, Ordering::Relaxed);
    }

    /// Per-bucket counts (the last one past every bound) and the sum.
    fn snapshot(&self) -> (Vec<u64>, u64) {
        (
            self.buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            self.sum.load(Ordering::Relaxed),
        )
    }
}

/// One protocol's counters within a version.
#[derive(Debug)]
struct ProtocolSeries {
    outcomes: [AtomicU64; Outcome::ALL.len()],
    duration: AtomicHistogram,
    request_bytes: AtomicU64,
    response_bytes: AtomicU64,
}

impl ProtocolSeries {
    fn new() -> ProtocolSeries {
        ProtocolSeries {
            outcomes: std::array::from_fn(|_| AtomicU64::new(0)),
            duration: AtomicHistogram::new(DURATION_BUCKETS_NS, DURATION_BUCKETS),
            request_bytes: AtomicU64::new(0),
            response_bytes: AtomicU64::new(0),
        }
    }
}

/// Everything recorded for one model version. Made once per (model, version) and kept for the life of the process,
/// so its counters only grow; its scheduler and the requests that resolve to it record into it without a lock.
#[derive(Debug)]
pub struct VersionSeries {
    model: String,
    version: u64,
    enabled: bool,
    protocols: [ProtocolSeries; Protocol::ALL.len()],
    queue: AtomicHistogram,
    compute: AtomicHistogram,
    batch_size: AtomicHistogram,
    /// Rows run by the engine (Triton's inference count).
    rows: AtomicU64,
    /// Cumulative microseconds of successful requests: end to end, queued, computing (Triton's counters).
    success_request_us: AtomicU64,
    success_queue_us: AtomicU64,
    success_compute_us: AtomicU64,
}

impl VersionSeries {
    fn new(model: &str, version: u64, enabled: bool) -> VersionSeries {
        VersionSeries {
            model: model.to_string(),
            version,
            enabled,
            protocols: std::array::from_fn(|_| ProtocolSeries::new()),
            queue: AtomicHistogram::new(DURATION_BUCKETS_NS, DURATION_BUCKETS),
            compute: AtomicHistogram::new(DURATION_BUCKETS_NS, DURATION_BUCKETS),
            batch_size: AtomicHistogram::new(BATCH_BUCKETS_INT, BATCH_BUCKETS),
            rows: AtomicU64::new(0),
            success_request_us: AtomicU64::new(0),
            success_queue_us: AtomicU64::new(0),
            success_compute_us: AtomicU64::new(0),
        }
    }

    /// Records one batch run by the engine: its size, each request's wait, the engine time and the rows it held.
    pub fn batch(&self, waits: &[Duration], compute: Duration, rows: usize) {
        if !self.enabled {
            return;
        }
        self.batch_size.observe(waits.len() as u64);
        for w in waits {
            self.queue.observe(nanos(*w));
        }
        self.compute.observe(nanos(compute));
        self.rows.fetch_add(rows as u64, Ordering::Relaxed);
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// One labelled family of counters or histograms (the locked path).
#[derive(Debug)]
struct Family<V> {
    series: Mutex<BTreeMap<Vec<String>, V>>,
}

impl<V> Default for Family<V> {
    fn default() -> Family<V> {
        Family {
            series: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Family<u64> {
    fn add(&self, labels: Vec<String>, n: u64) {
        *self.series.lock().entry(labels).or_insert(0) += n;
    }
}

impl Family<Histogram> {
    fn observe(&self, labels: Vec<String>, bounds: &[f64], v: f64) {
        self.series
            .lock()
            .entry(labels)
            .or_insert_with(|| Histogram::new(bounds.len()))
            .observe(bounds, v);
    }
}

/// The registry every front door and scheduler records into.
#[derive(Debug)]
pub struct Metrics {
    options: MetricsOptions,
    versions: RwLock<BTreeMap<(String, u64), Arc<VersionSeries>>>,
    /// Requests that never resolved to a version (or whose protocol or outcome is not in the fixed lists).
    requests: Family<u64>,
    request_duration: Family<Histogram>,
    load_duration: Family<Histogram>,
    load_failures: Family<u64>,
    rollout_decisions: Family<u64>,
    shadow_requests: Family<u64>,
    shadow_compared: Mutex<BTreeMap<Vec<String>, crate::metrics::shadow::Agreement>>,
    in_flight: AtomicI64,
    started: SystemTime,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new(MetricsOptions::default())
    }
}

/// A request being handled: counted in flight until dropped, and recorded by [`RequestRecord::finish`].
#[derive(Debug)]
pub struct RequestRecord<'a> {
    metrics: &'a Metrics,
    protocol: Protocol,
    started: Instant,
    /// The version it resolved to: the lock-free path.
    series: Option<Arc<VersionSeries>>,
    /// Labels for the locked path, when it never resolved to a version.
    model: String,
    version: String,
    queue_compute: Option<(Duration, Duration)>,
}

impl Drop for RequestRecord<'_> {
    fn drop(&mut self) {
        if self.metrics.options.enabled {
            self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl RequestRecord<'_> {
    /// Labels the request with a model name (no version resolved yet). Call it only with names from the repository,
    /// so label values stay bounded.
    pub fn model(&mut self, model: &str, version: Option<u64>) {
        self.model = model.to_string();
        self.version = version.map(|v| v.to_string()).unwrap_or_default();
    }

    /// Labels the request with the version it resolved to: from here on it records into that version's series.
    pub fn version(&mut self, series: &Arc<VersionSeries>) {
        self.series = Some(series.clone());
    }

    /// Whether the request has been labelled with a version.
    pub fn has_version(&self) -> bool {
        self.series.is_some()
    }

    /// Keeps a successful prediction's queue and engine times, counted with its latency (Triton's counters).
    pub fn timing(&mut self, queue: Duration, compute: Duration) {
        self.queue_compute = Some((queue, compute));
    }

    fn protocol_series(&self) -> Option<&ProtocolSeries> {
        let s = self.series.as_ref().filter(|s| s.enabled)?;
        Some(&s.protocols[self.protocol as usize])
    }

    /// Counts the request body.
    pub fn body_bytes(&self, n: usize) {
        if let Some(p) = self.protocol_series() {
            p.request_bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Counts the response body (gRPC: the encoded response message).
    pub fn response_bytes(&self, n: usize) {
        if let Some(p) = self.protocol_series() {
            p.response_bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Records the outcome and the latency.
    pub fn finish(self, outcome: Outcome) {
        let m = self.metrics;
        if !m.options.enabled {
            return;
        }
        let elapsed = self.started.elapsed();
        if let Some(p) = self.protocol_series() {
            let o = outcome.index();
            p.outcomes[o].fetch_add(1, Ordering::Relaxed);
            p.duration.observe(nanos(elapsed));
            if o == 0 {
                let s = self
                    .series
                    .as_ref()
                    .expect("a protocol series has a version");
                s.success_request_us
                    .fetch_add(micros(elapsed), Ordering::Relaxed);
                if let Some((queue, compute)) = self.queue_compute {
                    s.success_queue_us
                        .fetch_add(micros(queue), Ordering::Relaxed);
                    s.success_compute_us
                        .fetch_add(micros(compute), Ordering::Relaxed);
                }
            }
            return;
        }
        let (model, version) = match &self.series {
            Some(s) => (s.model.clone(), s.version.to_string()),
            None => (self.model.clone(), self.version.clone()),
        };
        m.requests.add(
            vec![
                model.clone(),
                version.clone(),
                self.protocol.label().into(),
                outcome.label().into(),
            ],
            1,
        );
        m.request_duration.observe(
            vec![model, version, self.protocol.label().into()],
            DURATION_BUCKETS,
            elapsed.as_secs_f64(),
        );
    }
}

/// What the page shows of the moment of the scrape, gathered from the model table.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// (model, version, state, queue depth when loaded) of every version.
    pub versions: Vec<(String, u64, &'static str, Option<usize>)>,
    /// (model, version, drift report) of every loaded version with a baseline.
    pub drift: Vec<(String, u64, crate::metrics::drift::Report)>,
    /// The payload log's (queued, dropped) records, when it is on.
    pub payload: Option<(u64, u64)>,
    /// (model, candidate, state, candidate weight) of every canary rollout.
    pub rollouts: Vec<(String, u64, &'static str, f64)>,
}

impl Metrics {
    /// A registry with these options.
    pub fn new(options: MetricsOptions) -> Metrics {
        Metrics {
            options,
            versions: RwLock::new(BTreeMap::new()),
            requests: Family::default(),
            request_duration: Family::default(),
            load_duration: Family::default(),
            load_failures: Family::default(),
            rollout_decisions: Family::default(),
            shadow_requests: Family::default(),
            shadow_compared: Mutex::new(BTreeMap::new()),
            in_flight: AtomicI64::new(0),
            started: SystemTime::now(),
        }
    }

    /// The options it was made with.
    pub fn options(&self) -> MetricsOptions {
        self.options
    }

    /// The series of one model version, made on first use and kept (a reloaded version records into the same one).
    pub fn version_series(&self, model: &str, version: u64) -> Arc<VersionSeries> {
        let key = (model.to_string(), version);
        if let Some(s) = self.versions.read().get(&key) {
            return s.clone();
        }
        self.versions
            .write()
            .entry(key)
            .or_insert_with(|| Arc::new(VersionSeries::new(model, version, self.options.enabled)))
            .clone()
    }

    /// Inference requests being handled now; `None` when requests are not recorded (`--no-metrics`).
    pub fn requests_in_flight(&self) -> Option<i64> {
        self.options
            .enabled
            .then(|| self.in_flight.load(Ordering::Relaxed))
    }

    /// Starts recording one inference request on `protocol`.
    pub fn request(&self, protocol: Protocol) -> RequestRecord<'_> {
        if self.options.enabled {
            self.in_flight.fetch_add(1, Ordering::Relaxed);
        }
        RequestRecord {
            metrics: self,
            protocol,
            started: Instant::now(),
            series: None,
            model: String::new(),
            version: String::new(),
            queue_compute: None,
        }
    }

    /// Records a model version load.
    pub fn load(&self, model: &str, took: Duration, ok: bool) {
        self.load_duration.observe(
            vec![model.to_string()],
            DURATION_BUCKETS,
            took.as_secs_f64(),
        );
        if !ok {
            self.load_failures.add(vec![model.to_string()], 1);
        }
    }

    /// Counts a canary rollout decision.
    pub fn rollout_decision(&self, model: &str, decision: &str) {
        self.rollout_decisions
            .add(vec![model.to_string(), decision.to_string()], 1);
    }

    /// Counts a shadow copy's outcome (`compared`, `failed`, `dropped`).
    pub fn shadow_request(&self, model: &str, version: u64, outcome: &str) {
        self.shadow_requests.add(
            vec![model.to_string(), version.to_string(), outcome.to_string()],
            1,
        );
    }

    /// Adds a shadow comparison of one output.
    pub fn shadow_compared(
        &self,
        model: &str,
        version: u64,
        output: &str,
        agreement: &crate::metrics::shadow::Agreement,
    ) {
        self.shadow_compared
            .lock()
            .entry(vec![
                model.to_string(),
                version.to_string(),
                output.to_string(),
            ])
            .or_default()
            .add(agreement);
    }

    /// The exposition in `format`, with the figures of the moment in `now`.
    pub fn render(&self, now: &Snapshot, format: Format) -> String {
        let mut out = Page {
            text: String::with_capacity(16384),
            format,
        };
        let series: Vec<Arc<VersionSeries>> = self.versions.read().values().cloned().collect();

        // Requests by outcome: the lock-free series, then the labelled path.
        out.header(&REQUESTS);
        for s in &series {
            for (p, ps) in Protocol::ALL.iter().zip(&s.protocols) {
                for (o, n) in Outcome::ALL.iter().zip(&ps.outcomes) {
                    let n = n.load(Ordering::Relaxed);
                    if n > 0 {
                        let labels = [
                            s.model.clone(),
                            s.version.to_string(),
                            p.label().to_string(),
                            o.label().to_string(),
                        ];
                        out.sample(REQUESTS.name, REQUESTS.labels, &labels, None, n);
                    }
                }
            }
        }
        out.counters(&REQUESTS, &self.requests, false);

        out.header(&REQUEST_DURATION);
        for s in &series {
            for (p, ps) in Protocol::ALL.iter().zip(&s.protocols) {
                let labels = [
                    s.model.clone(),
                    s.version.to_string(),
                    p.label().to_string(),
                ];
                out.atomic_histogram(&REQUEST_DURATION, &labels, &ps.duration, 1e-9);
            }
        }
        out.histograms(
            &REQUEST_DURATION,
            &self.request_duration,
            DURATION_BUCKETS,
            false,
        );

        for (d, pick) in [
            (
                &QUEUE_DURATION,
                (|s: &VersionSeries| &s.queue) as fn(&VersionSeries) -> &AtomicHistogram,
            ),
            (&COMPUTE_DURATION, |s| &s.compute),
            (&BATCH_SIZE, |s| &s.batch_size),
        ] {
            out.header(d);
            let scale = if d.name == BATCH_SIZE.name { 1.0 } else { 1e-9 };
            for s in &series {
                let labels = [s.model.clone(), s.version.to_string()];
                out.atomic_histogram(d, &labels, pick(s), scale);
            }
        }

        for (d, pick) in [
            (
                &REQUEST_BYTES,
                (|p: &ProtocolSeries| &p.request_bytes) as fn(&ProtocolSeries) -> &AtomicU64,
            ),
            (&RESPONSE_BYTES, |p| &p.response_bytes),
        ] {
            out.header(d);
            let mut by_model: BTreeMap<(&str, &str), u64> = BTreeMap::new();
            for s in &series {
                for (p, ps) in Protocol::ALL.iter().zip(&s.protocols) {
                    let n = pick(ps).load(Ordering::Relaxed);
                    if n > 0 {
                        *by_model.entry((s.model.as_str(), p.label())).or_default() += n;
                    }
                }
            }
            for ((model, protocol), n) in by_model {
                out.sample(
                    d.name,
                    d.labels,
                    &[model.to_string(), protocol.to_string()],
                    None,
                    n,
                );
            }
        }

        out.header(&IN_FLIGHT);
        out.sample(
            IN_FLIGHT.name,
            &[],
            &[],
            None,
            self.in_flight.load(Ordering::Relaxed),
        );
        out.header(&QUEUE_DEPTH);
        for (model, version, _, depth) in &now.versions {
            if let Some(depth) = depth {
                let labels = [model.clone(), version.to_string()];
                out.sample(QUEUE_DEPTH.name, QUEUE_DEPTH.labels, &labels, None, depth);
            }
        }
        out.header(&MODEL_STATE);
        for (model, version, state, _) in &now.versions {
            let labels = [model.clone(), version.to_string(), (*state).to_string()];
            out.sample(MODEL_STATE.name, MODEL_STATE.labels, &labels, None, 1);
        }
        out.histograms(&LOAD_DURATION, &self.load_duration, DURATION_BUCKETS, true);
        out.counters(&LOAD_FAILURES, &self.load_failures, true);

        for (d, value) in [
            (
                &DRIFT_PSI,
                (|f: &crate::metrics::drift::FeatureDrift| f.psi)
                    as fn(&crate::metrics::drift::FeatureDrift) -> f64,
            ),
            (&DRIFT_KS, |f| f.ks),
        ] {
            out.header(d);
            for (model, version, report) in &now.drift {
                for f in &report.features {
                    let labels = [model.clone(), version.to_string(), f.name.clone()];
                    out.sample(d.name, d.labels, &labels, None, Float(value(f)));
                }
            }
        }
        for (d, value) in [
            (
                &PREDICTION_DRIFT_PSI,
                (|p: &crate::metrics::drift::PredictionDrift| Some(p.psi))
                    as fn(&crate::metrics::drift::PredictionDrift) -> Option<f64>,
            ),
            (&PREDICTION_DRIFT_KS, |p| p.ks),
        ] {
            out.header(d);
            for (model, version, report) in &now.drift {
                for p in &report.predictions {
                    if let Some(v) = value(p) {
                        let labels = [model.clone(), version.to_string(), p.output.clone()];
                        out.sample(d.name, d.labels, &labels, None, Float(v));
                    }
                }
            }
        }

        out.counters(&ROLLOUT_DECISIONS, &self.rollout_decisions, true);
        out.header(&ROLLOUT_STATE);
        for (model, version, state, _) in &now.rollouts {
            let labels = [model.clone(), version.to_string(), (*state).to_string()];
            out.sample(ROLLOUT_STATE.name, ROLLOUT_STATE.labels, &labels, None, 1);
        }
        out.header(&ROLLOUT_WEIGHT);
        for (model, version, _, weight) in &now.rollouts {
            let labels = [model.clone(), version.to_string()];
            out.sample(
                ROLLOUT_WEIGHT.name,
                ROLLOUT_WEIGHT.labels,
                &labels,
                None,
                Float(*weight),
            );
        }
        out.counters(&SHADOW_REQUESTS, &self.shadow_requests, true);
        {
            let compared = self.shadow_compared.lock();
            for (d, pick) in [
                (
                    &SHADOW_AGREEMENT,
                    (|a: &crate::metrics::shadow::Agreement| a.agreement_ratio())
                        as fn(&crate::metrics::shadow::Agreement) -> Option<f64>,
                ),
                (&SHADOW_DIFFERENCE, |a| a.mean_absolute_difference()),
            ] {
                out.header(d);
                for (labels, a) in compared.iter() {
                    if let Some(v) = pick(a) {
                        out.sample(d.name, d.labels, labels, None, Float(v));
                    }
                }
            }
        }
        out.header(&PAYLOAD_RECORDS);
        if let Some((queued, dropped)) = now.payload {
            for (outcome, n) in [("queued", queued), ("dropped", dropped)] {
                out.sample(
                    PAYLOAD_RECORDS.name,
                    PAYLOAD_RECORDS.labels,
                    &[outcome.to_string()],
                    None,
                    n,
                );
            }
        }
        let process = process_stats();
        for (d, v) in [
            (&CPU, process.cpu_seconds),
            (&RSS, process.rss_bytes),
            (&FDS, process.fds),
            (&THREADS, process.threads),
        ] {
            if let Some(v) = v {
                out.header(d);
                out.sample(d.name, &[], &[], None, Float(v));
            }
        }
        out.header(&START_TIME);
        let start = self
            .started
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        out.sample(START_TIME.name, &[], &[], None, Float(start));
        out.header(&BUILD_INFO);
        out.sample(
            BUILD_INFO.name,
            BUILD_INFO.labels,
            &[env!("CARGO_PKG_VERSION").to_string()],
            None,
            1,
        );
        if self.options.triton {
            self.render_triton(&mut out, &series, now);
        }
        if format == Format::OpenMetrics {
            out.text.push_str("# EOF\n");
        }
        out.text
    }

    /// Triton's families, from the same series: counts over every protocol, durations as cumulative microseconds of
    /// successful requests (as Triton reports them), pending requests from the queue depth.
    fn render_triton(&self, out: &mut Page, series: &[Arc<VersionSeries>], now: &Snapshot) {
        let sum = |s: &VersionSeries, pick: &dyn Fn(&ProtocolSeries) -> u64| -> u64 {
            s.protocols.iter().map(pick).sum()
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        type Value<'a> = &'a dyn Fn(&VersionSeries) -> u64;
        let families: [(&MetricDef, Value<'_>); 7] = [
            (&NV_SUCCESS, &|s| sum(s, &|p| load(&p.outcomes[0]))),
            (&NV_FAILURE, &|s| {
                sum(s, &|p| p.outcomes[1..].iter().map(load).sum())
            }),
            (&NV_COUNT, &|s| load(&s.rows)),
            (&NV_EXEC_COUNT, &|s| s.batch_size.snapshot().0.iter().sum()),
            (&NV_REQUEST_DURATION, &|s| load(&s.success_request_us)),
            (&NV_QUEUE_DURATION, &|s| load(&s.success_queue_us)),
            (&NV_COMPUTE_INFER_DURATION, &|s| load(&s.success_compute_us)),
        ];
        for (d, value) in families {
            out.header(d);
            for s in series {
                let labels = [s.model.clone(), s.version.to_string()];
                out.sample(d.name, d.labels, &labels, None, value(s));
            }
        }
        out.header(&NV_PENDING);
        for (model, version, _, depth) in &now.versions {
            if let Some(depth) = depth {
                let labels = [model.clone(), version.to_string()];
                out.sample(NV_PENDING.name, NV_PENDING.labels, &labels, None, depth);
            }
        }
    }
}

/// A float sample value, written as both formats require (`+Inf`, `-Inf`, `NaN`).
struct Float(f64);

impl std::fmt::Display for Float {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            v if v.is_nan() => f.write_str("NaN"),
            v if v == f64::INFINITY => f.write_str("+Inf"),
            v if v == f64::NEG_INFINITY => f.write_str("-Inf"),
            v => write!(f, "{v}"),
        }
    }
}

/// The page being written, in one of the two formats.
struct Page {
    text: String,
    format: Format,
}

impl Page {
    /// `# HELP`, `# TYPE` (and, in OpenMetrics, `# UNIT`) of a family. OpenMetrics names a counter's family
    /// without `_total` (its samples keep it) and an info family without `_info`; a counter whose name lacks `_total`
    /// (Triton's) is typed `unknown` there, so its samples keep exactly the names dashboards query.
    fn header(&mut self, d: &MetricDef) {
        let (family, kind) = match self.format {
            Format::Prometheus => (d.name, d.kind),
            Format::OpenMetrics => match d.kind {
                "counter" => match d.name.strip_suffix("_total") {
                    Some(family) => (family, "counter"),
                    None => (d.name, "unknown"),
                },
                "gauge" => match d.name.strip_suffix("_info") {
                    Some(family) => (family, "info"),
                    None => (d.name, "gauge"),
                },
                other => (d.name, other),
            },
        };
        let _ = writeln!(
            self.text,
            "# HELP {family} {}\n# TYPE {family} {kind}",
            d.help
        );
        if self.format == Format::OpenMetrics {
            if let Some(unit) = ["seconds", "bytes"]
                .into_iter()
                .find(|u| family.ends_with(&format!("_{u}")))
            {
                let _ = writeln!(self.text, "# UNIT {family} {unit}");
            }
        }
    }

    fn sample(
        &mut self,
        name: &str,
        names: &[&str],
        values: &[String],
        le: Option<&str>,
        value: impl std::fmt::Display,
    ) {
        let _ = writeln!(self.text, "{name}{} {value}", label_text(names, values, le));
    }

    fn counters(&mut self, d: &MetricDef, f: &Family<u64>, with_header: bool) {
        if with_header {
            self.header(d);
        }
        for (labels, v) in f.series.lock().iter() {
            self.sample(d.name, d.labels, labels, None, v);
        }
    }

    fn histogram_lines(
        &mut self,
        d: &MetricDef,
        labels: &[String],
        bounds: impl Iterator<Item = String>,
        counts: &[u64],
        sum: impl std::fmt::Display,
    ) {
        let (bucket, count, sum_name) = (
            format!("{}_bucket", d.name),
            format!("{}_count", d.name),
            format!("{}_sum", d.name),
        );
        let mut cumulative = 0;
        for (b, c) in bounds.zip(counts) {
            cumulative += c;
            self.sample(&bucket, d.labels, labels, Some(&b), cumulative);
        }
        let total: u64 = counts.iter().sum();
        self.sample(&bucket, d.labels, labels, Some("+Inf"), total);
        self.sample(&sum_name, d.labels, labels, None, sum);
        self.sample(&count, d.labels, labels, None, total);
    }

    fn histograms(
        &mut self,
        d: &MetricDef,
        f: &Family<Histogram>,
        bounds: &[f64],
        with_header: bool,
    ) {
        if with_header {
            self.header(d);
        }
        for (labels, h) in f.series.lock().iter() {
            // Values past the last bound are only in the count: give them their own slot so `+Inf` is the sum.
            let mut counts = h.counts.clone();
            counts.push(h.count - h.counts.iter().sum::<u64>());
            self.histogram_lines(
                d,
                labels,
                bounds.iter().map(|b| b.to_string()),
                &counts,
                Float(h.sum),
            );
        }
    }

    /// A lock-free histogram's lines, when it has observed anything; `scale` turns its unit into the exported one.
    fn atomic_histogram(
        &mut self,
        d: &MetricDef,
        labels: &[String],
        h: &AtomicHistogram,
        scale: f64,
    ) {
        let (counts, sum) = h.snapshot();
        if counts.iter().all(|c| *c == 0) {
            return;
        }
        let bounds = h.le.iter().map(f64::to_string);
        self.histogram_lines(d, labels, bounds, &counts, Float(sum as f64 * scale));
    }
}

/// `{a="x",b="y"}` with values escaped as both formats require; `le` appended for histogram buckets.
fn label_text(names: &[&str], values: &[String], le: Option<&str>) -> String {
    let mut parts: Vec<String> = names
        .iter()
        .zip(values)
        .map(|(n, v)| {
            format!(
                "{n}=\"{}\"",
                v.replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n")
            )
        })
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

#[derive(Debug, Default)]
struct ProcessStats {
    cpu_seconds: Option<f64>,
    rss_bytes: Option<f64>,
    fds: Option<f64>,
    threads: Option<f64>,
}

/// Reads the process's own figures from /proc (Linux); absent elsewhere.
fn process_stats() -> ProcessStats {
    let mut p = ProcessStats::default();
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name (which may contain spaces) start after the last ')'.
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of the full line, 12 and 13 after the state field here.
            if let (Some(u), Some(s)) = (
                fields.get(11).and_then(|v| v.parse::<f64>().ok()),
                fields.get(12).and_then(|v| v.parse::<f64>().ok()),
            ) {
                // Linux reports clock ticks at USER_HZ, which is 100 on every supported architecture.
                p.cpu_seconds = Some((u + s) / 100.0);
            }
        }
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        for line in status.lines() {
            let value = |l: &str| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            };
            if line.starts_with("VmRSS:") {
                p.rss_bytes = value(line).map(|kb| kb * 1024.0);
            } else if line.starts_with("Threads:") {
                p.threads = value(line);
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        p.fds = Some(dir.count() as f64);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_metrics(options: MetricsOptions) -> (Metrics, Snapshot) {
        let m = Metrics::new(options);
        let iris = m.version_series("iris", 1);
        let mut r = m.request(Protocol::KserveRest);
        r.version(&iris);
        r.body_bytes(100);
        r.response_bytes(40);
        r.finish(Outcome::Success);
        let mut r = m.request(Protocol::KserveGrpc);
        r.version(&iris);
        r.finish(Outcome::Failed(ErrorKind::InvalidArgument));
        let mut r = m.request(Protocol::KserveRest);
        r.model("we\"ird", None);
        r.finish(Outcome::Failed(ErrorKind::NotFound));
        iris.batch(
            &[Duration::from_micros(80), Duration::from_micros(120)],
            Duration::from_micros(300),
            5,
        );
        let drift = vec![(
            "iris".to_string(),
            1,
            crate::metrics::drift::Report {
                features: vec![crate::metrics::drift::FeatureDrift {
                    name: "f0".into(),
                    psi: 0.5,
                    ks: 0.25,
                    drifted: true,
                }],
                status: None,
                predictions: vec![crate::metrics::drift::PredictionDrift {
                    output: "label".into(),
                    kind: "categorical",
                    window_rows: 10,
                    classes: Vec::new(),
                    psi: 0.75,
                    ks: None,
                    drifted: true,
                }],
            },
        )];
        let now = Snapshot {
            versions: vec![("iris".into(), 1, "READY", Some(3))],
            drift,
            payload: Some((3, 1)),
            rollouts: vec![("iris".into(), 2, "running", 25.0)],
        };
        (m, now)
    }

    #[test]
    fn outcomes_are_success_then_every_error_kind() {
        let labels: Vec<&str> = Outcome::ALL.iter().map(|o| o.label()).collect();
        assert_eq!(
            labels,
            [
                "success",
                "invalid_argument",
                "not_found",
                "payload_too_large",
                "unavailable",
                "overloaded",
                "deadline_exceeded",
                "unimplemented",
                "internal",
                "unauthenticated",
                "permission_denied",
            ]
        );
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(o.index(), i);
        }
        for (i, p) in Protocol::ALL.iter().enumerate() {
            assert_eq!(*p as usize, i);
        }
    }

    #[test]
    fn exposition_has_counters_histograms_and_escaped_labels() {
        let (m, now) = sample_metrics(MetricsOptions::default());
        let text = m.render(&now, Format::Prometheus);
        for line in [
            "ferry_payload_log_records_total{outcome=\"dropped\"} 1",
            "ferry_rollout_candidate_weight_percent{model=\"iris\",version=\"2\"} 25",
            "ferry_rollout_state{model=\"iris\",version=\"2\",state=\"running\"} 1",
            "ferry_feature_drift_psi{model=\"iris\",version=\"1\",feature=\"f0\"} 0.5",
            "ferry_prediction_drift_psi{model=\"iris\",version=\"1\",output=\"label\"} 0.75",
            "ferry_requests_total{model=\"iris\",version=\"1\",protocol=\"rest_kserve\",outcome=\"success\"} 1",
            "ferry_requests_total{model=\"iris\",version=\"1\",protocol=\"grpc_kserve\",outcome=\"invalid_argument\"} 1",
            "ferry_requests_total{model=\"we\\\"ird\",version=\"\",protocol=\"rest_kserve\",outcome=\"not_found\"} 1",
            "ferry_request_duration_seconds_count{model=\"iris\",version=\"1\",protocol=\"rest_kserve\"} 1",
            "ferry_request_bytes_total{model=\"iris\",protocol=\"rest_kserve\"} 100",
            "ferry_response_bytes_total{model=\"iris\",protocol=\"rest_kserve\"} 40",
            "ferry_batch_size_bucket{model=\"iris\",version=\"1\",le=\"2\"} 1",
            "ferry_batch_size_bucket{model=\"iris\",version=\"1\",le=\"1\"} 0",
            "ferry_queue_duration_seconds_bucket{model=\"iris\",version=\"1\",le=\"0.0001\"} 1",
            "ferry_queue_duration_seconds_count{model=\"iris\",version=\"1\"} 2",
            "ferry_queue_depth{model=\"iris\",version=\"1\"} 3",
            "ferry_model_state{model=\"iris\",version=\"1\",state=\"READY\"} 1",
            "ferry_requests_in_flight 0",
        ] {
            assert!(text.contains(&format!("{line}\n")), "{line} missing from\n{text}");
        }
        assert!(text.contains("process_resident_memory_bytes "));
        assert!(
            !text.contains("nv_inference"),
            "Triton's families only when asked"
        );
        assert!(!text.contains("# EOF"));
        for d in ALL {
            assert!(
                text.contains(&format!("# TYPE {} {}\n", d.name, d.kind)),
                "{} missing",
                d.name
            );
        }
    }

    #[test]
    fn openmetrics_names_counter_families_without_total_and_ends_with_eof() {
        let (m, now) = sample_metrics(MetricsOptions {
            enabled: true,
            triton: true,
        });
        let text = m.render(&now, Format::OpenMetrics);
        assert!(text.ends_with("# EOF\n"));
        assert!(text.contains("# TYPE ferry_requests counter\n"));
        assert!(text.contains("# HELP ferry_requests Inference requests"));
        assert!(text.contains("ferry_requests_total{model=\"iris\""));
        assert!(
            text.contains("# TYPE ferry_request_bytes counter\n# UNIT ferry_request_bytes bytes\n")
        );
        assert!(text.contains("# UNIT ferry_request_duration_seconds seconds\n"));
        assert!(text.contains("# TYPE ferry_build info\n"));
        assert!(
            text.contains("# TYPE process_cpu_seconds counter\n")
                || !text.contains("process_cpu_seconds_total")
        );
        // Triton's counters keep their exact names as `unknown` families.
        assert!(text.contains("# TYPE nv_inference_request_success unknown\n"));
        assert!(!text.contains("# TYPE ferry_requests_total"));
        assert_eq!(text.matches("# EOF").count(), 1);
    }

    #[test]
    fn triton_families_follow_tritons_names_and_units() {
        let (m, now) = sample_metrics(MetricsOptions {
            enabled: true,
            triton: true,
        });
        let text = m.render(&now, Format::Prometheus);
        for line in [
            "# TYPE nv_inference_request_success counter",
            "nv_inference_request_success{model=\"iris\",version=\"1\"} 1",
            "nv_inference_request_failure{model=\"iris\",version=\"1\"} 1",
            "nv_inference_count{model=\"iris\",version=\"1\"} 5",
            "nv_inference_exec_count{model=\"iris\",version=\"1\"} 1",
            "nv_inference_pending_request_count{model=\"iris\",version=\"1\"} 3",
            "# TYPE nv_inference_pending_request_count gauge",
        ] {
            assert!(
                text.contains(&format!("{line}\n")),
                "{line} missing from\n{text}"
            );
        }
        for d in TRITON {
            assert!(text.contains(&format!("# TYPE {} {}\n", d.name, d.kind)));
        }
    }

    #[test]
    fn disabled_metrics_record_nothing() {
        let m = Metrics::new(MetricsOptions {
            enabled: false,
            triton: false,
        });
        let s = m.version_series("iris", 1);
        let mut r = m.request(Protocol::KserveRest);
        r.version(&s);
        r.body_bytes(10);
        r.finish(Outcome::Success);
        s.batch(&[Duration::from_micros(1)], Duration::from_micros(1), 1);
        let text = m.render(&Snapshot::default(), Format::Prometheus);
        assert!(!text.contains("ferry_requests_total{"), "{text}");
        assert!(!text.contains("ferry_batch_size_bucket"), "{text}");
        assert!(text.contains("ferry_requests_in_flight 0"));
    }

    #[test]
    fn negotiation_prefers_openmetrics_only_when_asked() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(None), Format::Prometheus);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Prometheus);
        assert_eq!(Format::negotiate(Some("text/plain")), Format::Prometheus);
        assert_eq!(
            Format::negotiate(Some("text/plain;q=0.9, application/openmetrics-text;q=0.5")),
            Format::Prometheus
        );
        assert_eq!(
            Format::negotiate(Some(
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            )),
            Format::OpenMetrics
        );
    }

    #[test]
    fn duration_buckets_in_nanoseconds_match_seconds() {
        assert_eq!(DURATION_BUCKETS.len(), DURATION_BUCKETS_NS.len());
        for (s, ns) in DURATION_BUCKETS.iter().zip(DURATION_BUCKETS_NS) {
            assert_eq!((s * 1e9).round() as u64, *ns);
        }
        let h = AtomicHistogram::new(DURATION_BUCKETS_NS, DURATION_BUCKETS);
        h.observe(50_000);
        h.observe(50_001);
        h.observe(20_000_000_000);
        let (counts, sum) = h.snapshot();
        assert_eq!((counts[0], counts[1], counts[17]), (1, 1, 1));
        assert_eq!(sum, 20_000_100_001);
    }
}
