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
//! The catalogue is in `catalogue.rs` (re-exported here), the registry and the request path's recording in this file,
//! and the exposition in `render.rs`.
//!
//! The folder also holds what the page reports beyond counters: [`drift`] (per-version drift windows and their
//! PSI/KS reports) and [`shadow`] (how a shadow version's outputs agree with the live ones). It uses only
//! [`crate::error`].

mod catalogue;
pub mod drift;
mod render;
pub mod shadow;

pub use catalogue::*;
pub use render::Format;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
    /// Text models: tokens per request, padded tokens per engine run, tokens run (the texts' own, and padding),
    /// tokenizing time.
    text_request_tokens: AtomicHistogram,
    text_batch_tokens: AtomicHistogram,
    text_tokens: AtomicU64,
    padding_tokens: AtomicU64,
    tokenize: AtomicHistogram,
    /// Language models: time to the first token, between tokens, to the last; tokens of finished answers; the
    /// engine whose gauges are read at each scrape (weak: the series outlives the version).
    llm_first_token: AtomicHistogram,
    llm_inter_token: AtomicHistogram,
    llm_request: AtomicHistogram,
    llm_prompt_tokens: AtomicU64,
    llm_generated_tokens: AtomicU64,
    llm: parking_lot::Mutex<Option<std::sync::Weak<ferry_llm::Llm>>>,
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
            text_request_tokens: AtomicHistogram::new(TOKEN_BUCKETS_INT, TOKEN_BUCKETS),
            text_batch_tokens: AtomicHistogram::new(TOKEN_BUCKETS_INT, TOKEN_BUCKETS),
            text_tokens: AtomicU64::new(0),
            padding_tokens: AtomicU64::new(0),
            tokenize: AtomicHistogram::new(DURATION_BUCKETS_NS, DURATION_BUCKETS),
            llm_first_token: AtomicHistogram::new(DURATION_BUCKETS_NS, DURATION_BUCKETS),
            llm_inter_token: AtomicHistogram::new(DURATION_BUCKETS_NS, DURATION_BUCKETS),
            llm_request: AtomicHistogram::new(DURATION_BUCKETS_NS, DURATION_BUCKETS),
            llm_prompt_tokens: AtomicU64::new(0),
            llm_generated_tokens: AtomicU64::new(0),
            llm: parking_lot::Mutex::new(None),
        }
    }

    /// Language models: the engine whose running, waiting and KV figures the scrape reads.
    pub fn set_llm(&self, llm: &std::sync::Arc<ferry_llm::Llm>) {
        *self.llm.lock() = Some(std::sync::Arc::downgrade(llm));
    }

    /// The engine's figures now, while it is loaded.
    pub(crate) fn llm_stats(&self) -> Option<ferry_llm::Stats> {
        self.llm
            .lock()
            .as_ref()
            .and_then(std::sync::Weak::upgrade)
            .map(|l| l.stats())
    }

    /// Language models: the first token of an answer came `took` after the request.
    pub fn llm_first_token(&self, took: Duration) {
        if self.enabled {
            self.llm_first_token.observe(nanos(took));
        }
    }

    /// Language models: a token came `gap` after the previous one of the same answer.
    pub fn llm_token_gap(&self, gap: Duration) {
        if self.enabled {
            self.llm_inter_token.observe(nanos(gap));
        }
    }

    /// Language models: an answer ended `took` after its request, with its token counts.
    pub fn llm_done(&self, took: Duration, prompt: usize, generated: usize) {
        if !self.enabled {
            return;
        }
        self.llm_request.observe(nanos(took));
        self.llm_prompt_tokens
            .fetch_add(prompt as u64, Ordering::Relaxed);
        self.llm_generated_tokens
            .fetch_add(generated as u64, Ordering::Relaxed);
    }

    /// Records one text request's tokenizing: its tokens and how long it took.
    pub fn text_request(&self, tokens: usize, took: Duration) {
        if !self.enabled {
            return;
        }
        self.text_request_tokens.observe(tokens as u64);
        self.tokenize.observe(nanos(took));
    }

    /// Records one engine run of a text model: `texts` tokens of the texts themselves, `padded` positions in all.
    pub fn text_run(&self, texts: usize, padded: usize) {
        if !self.enabled {
            return;
        }
        self.text_batch_tokens.observe(padded as u64);
        self.text_tokens.fetch_add(texts as u64, Ordering::Relaxed);
        self.padding_tokens
            .fetch_add(padded.saturating_sub(texts) as u64, Ordering::Relaxed);
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
    /// (model, version, figures) of every loaded version whose importance was computed.
    pub importance: Vec<(String, u64, std::sync::Arc<ImportanceFigures>)>,
}

/// A version's last feature importance, as its gauges show it: per feature, summed over the explained outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportanceFigures {
    /// Feature names.
    pub features: Vec<String>,
    /// Mean |attribution| over the background sample.
    pub background: Vec<f64>,
    /// Mean |attribution| over the recent live rows, when there were any.
    pub live: Option<Vec<f64>>,
    /// |mean attribution| over the recent live rows: each feature's part in the shift of the mean prediction.
    pub drift: Option<Vec<f64>>,
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

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
            importance: vec![(
                "iris".into(),
                1,
                std::sync::Arc::new(ImportanceFigures {
                    features: vec!["petal".into()],
                    background: vec![0.5],
                    live: Some(vec![0.75]),
                    drift: Some(vec![0.25]),
                }),
            )],
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
                "method_not_allowed",
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
