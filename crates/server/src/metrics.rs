//! Prometheus metrics: the catalogue of every metric Ferry exports (name, type, help, labels, buckets) in one
//! place, the in-process registry that records them, and the text exposition served at `GET /metrics`.
//!
//! Names carry the `ferry_` prefix and a unit (`_seconds`, `_bytes`, `_total`). Labels are bounded: model and
//! version come from the repository (a request for an unknown model is recorded with an empty model label), protocol
//! and outcome from fixed lists; never a request id or a raw URL.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;
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
    IN_FLIGHT,
    QUEUE_DEPTH,
    MODEL_STATE,
    LOAD_DURATION,
    LOAD_FAILURES,
    ROLLOUT_DECISIONS,
    ROLLOUT_STATE,
    ROLLOUT_WEIGHT,
    SHADOW_REQUESTS,
    SHADOW_AGREEMENT,
    SHADOW_DIFFERENCE,
    CPU,
    RSS,
    FDS,
    THREADS,
    START_TIME,
    BUILD_INFO,
];

/// Bucket bounds for durations, in seconds: geometric from 50 µs to 10 s.
pub const DURATION_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];
/// Bucket bounds for batch sizes: powers of two.
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

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

/// One labelled family of counters or histograms.
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
        *self
            .series
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(labels)
            .or_insert(0) += n;
    }
}

impl Family<Histogram> {
    fn observe(&self, labels: Vec<String>, bounds: &[f64], v: f64) {
        self.series
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(labels)
            .or_insert_with(|| Histogram::new(bounds.len()))
            .observe(bounds, v);
    }
}

/// The registry every front door and scheduler records into.
#[derive(Debug)]
pub struct Metrics {
    requests: Family<u64>,
    request_duration: Family<Histogram>,
    queue_duration: Family<Histogram>,
    compute_duration: Family<Histogram>,
    batch_size: Family<Histogram>,
    request_bytes: Family<u64>,
    load_duration: Family<Histogram>,
    load_failures: Family<u64>,
    rollout_decisions: Family<u64>,
    shadow_requests: Family<u64>,
    shadow_compared: Mutex<BTreeMap<Vec<String>, crate::shadow::Agreement>>,
    in_flight: AtomicI64,
    started: SystemTime,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            requests: Family::default(),
            request_duration: Family::default(),
            queue_duration: Family::default(),
            compute_duration: Family::default(),
            batch_size: Family::default(),
            request_bytes: Family::default(),
            load_duration: Family::default(),
            load_failures: Family::default(),
            rollout_decisions: Family::default(),
            shadow_requests: Family::default(),
            shadow_compared: Mutex::new(BTreeMap::new()),
            in_flight: AtomicI64::new(0),
            started: SystemTime::now(),
        }
    }
}

/// A request being handled: counted in flight until dropped, and recorded by [`RequestRecord::finish`].
#[derive(Debug)]
pub struct RequestRecord<'a> {
    metrics: &'a Metrics,
    protocol: &'static str,
    started: Instant,
    model: String,
    version: String,
    timing: Option<[(&'static str, String); 3]>,
}

impl Drop for RequestRecord<'_> {
    fn drop(&mut self) {
        self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl RequestRecord<'_> {
    /// Labels the request with the model it turned out to be for. Call it only with names from the repository, so
    /// label values stay bounded.
    pub fn model(&mut self, model: &str, version: Option<u64>) {
        self.model = model.to_string();
        self.version = version.map(|v| v.to_string()).unwrap_or_default();
    }

    /// Keeps a successful prediction's timing, for the response headers (`x-queue-time-us` and friends).
    pub fn timing(&mut self, prediction: &crate::infer::Prediction) {
        self.timing = Some(prediction.timing_headers());
    }

    /// The timing headers kept by [`RequestRecord::timing`], if any.
    pub fn timing_headers(&self) -> Option<&[(&'static str, String); 3]> {
        self.timing.as_ref()
    }

    /// Counts the request body.
    pub fn body_bytes(&self, n: usize) {
        self.metrics
            .request_bytes
            .add(vec![self.model.clone(), self.protocol.into()], n as u64);
    }

    /// Records the outcome (`success` or an error kind's label) and the latency.
    pub fn finish(self, outcome: &str) {
        let m = self.metrics;
        m.requests.add(
            vec![
                self.model.clone(),
                self.version.clone(),
                self.protocol.into(),
                outcome.into(),
            ],
            1,
        );
        m.request_duration.observe(
            vec![
                self.model.clone(),
                self.version.clone(),
                self.protocol.into(),
            ],
            DURATION_BUCKETS,
            self.started.elapsed().as_secs_f64(),
        );
    }
}

impl Metrics {
    /// Starts recording one inference request on `protocol` (`rest_kserve`, `rest_tfserving`, `grpc_kserve`,
    /// `grpc_tfserving`).
    pub fn request(&self, protocol: &'static str) -> RequestRecord<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        RequestRecord {
            metrics: self,
            protocol,
            started: Instant::now(),
            model: String::new(),
            version: String::new(),
            timing: None,
        }
    }

    /// Records one batch: its size, each request's wait, and the engine time.
    pub fn batch(&self, model: &str, version: u64, waits: &[Duration], compute: Duration) {
        let labels = vec![model.to_string(), version.to_string()];
        self.batch_size
            .observe(labels.clone(), BATCH_BUCKETS, waits.len() as f64);
        for w in waits {
            self.queue_duration
                .observe(labels.clone(), DURATION_BUCKETS, w.as_secs_f64());
        }
        self.compute_duration
            .observe(labels, DURATION_BUCKETS, compute.as_secs_f64());
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
        agreement: &crate::shadow::Agreement,
    ) {
        self.shadow_compared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(vec![
                model.to_string(),
                version.to_string(),
                output.to_string(),
            ])
            .or_default()
            .add(agreement);
    }

    /// The Prometheus text exposition (format 0.0.4). `versions` lists (model, version, state, queue depth) at the
    /// moment of the scrape.
    pub fn render(
        &self,
        versions: &[(String, u64, &'static str, Option<usize>)],
        drift: &[(String, u64, Vec<crate::drift::FeatureDrift>)],
        payload: Option<(u64, u64)>,
        rollouts: &[(String, u64, &'static str, f64)],
    ) -> String {
        let mut out = String::with_capacity(8192);
        let header = |out: &mut String, d: &MetricDef| {
            let _ = writeln!(
                out,
                "# HELP {} {}\n# TYPE {} {}",
                d.name, d.help, d.name, d.kind
            );
        };
        let counters = |out: &mut String, d: &MetricDef, f: &Family<u64>| {
            header(out, d);
            for (labels, v) in f.series.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                let _ = writeln!(out, "{}{} {v}", d.name, label_text(d.labels, labels, None));
            }
        };
        let histograms =
            |out: &mut String, d: &MetricDef, f: &Family<Histogram>, bounds: &[f64]| {
                header(out, d);
                for (labels, h) in f.series.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                    let mut cumulative = 0;
                    for (b, c) in bounds.iter().zip(&h.counts) {
                        cumulative += c;
                        let _ = writeln!(
                            out,
                            "{}_bucket{} {cumulative}",
                            d.name,
                            label_text(d.labels, labels, Some(&b.to_string()))
                        );
                    }
                    let _ = writeln!(
                        out,
                        "{}_bucket{} {}",
                        d.name,
                        label_text(d.labels, labels, Some("+Inf")),
                        h.count
                    );
                    let _ = writeln!(
                        out,
                        "{}_sum{} {}",
                        d.name,
                        label_text(d.labels, labels, None),
                        h.sum
                    );
                    let _ = writeln!(
                        out,
                        "{}_count{} {}",
                        d.name,
                        label_text(d.labels, labels, None),
                        h.count
                    );
                }
            };
        counters(&mut out, &REQUESTS, &self.requests);
        histograms(
            &mut out,
            &REQUEST_DURATION,
            &self.request_duration,
            DURATION_BUCKETS,
        );
        histograms(
            &mut out,
            &QUEUE_DURATION,
            &self.queue_duration,
            DURATION_BUCKETS,
        );
        histograms(
            &mut out,
            &COMPUTE_DURATION,
            &self.compute_duration,
            DURATION_BUCKETS,
        );
        histograms(&mut out, &BATCH_SIZE, &self.batch_size, BATCH_BUCKETS);
        counters(&mut out, &REQUEST_BYTES, &self.request_bytes);
        header(&mut out, &IN_FLIGHT);
        let _ = writeln!(
            out,
            "{} {}",
            IN_FLIGHT.name,
            self.in_flight.load(Ordering::Relaxed)
        );
        header(&mut out, &QUEUE_DEPTH);
        for (model, version, _, depth) in versions {
            if let Some(depth) = depth {
                let _ = writeln!(
                    out,
                    "{}{} {depth}",
                    QUEUE_DEPTH.name,
                    label_text(
                        QUEUE_DEPTH.labels,
                        &[model.clone(), version.to_string()],
                        None
                    )
                );
            }
        }
        header(&mut out, &MODEL_STATE);
        for (model, version, state, _) in versions {
            let labels = [model.clone(), version.to_string(), (*state).to_string()];
            let _ = writeln!(
                out,
                "{}{} 1",
                MODEL_STATE.name,
                label_text(MODEL_STATE.labels, &labels, None)
            );
        }
        histograms(
            &mut out,
            &LOAD_DURATION,
            &self.load_duration,
            DURATION_BUCKETS,
        );
        counters(&mut out, &LOAD_FAILURES, &self.load_failures);
        for (d, value) in [
            (
                &DRIFT_PSI,
                (|f: &crate::drift::FeatureDrift| f.psi) as fn(&crate::drift::FeatureDrift) -> f64,
            ),
            (&DRIFT_KS, |f| f.ks),
        ] {
            header(&mut out, d);
            for (model, version, features) in drift {
                for f in features {
                    let labels = [model.clone(), version.to_string(), f.name.clone()];
                    let _ = writeln!(
                        out,
                        "{}{} {}",
                        d.name,
                        label_text(d.labels, &labels, None),
                        value(f)
                    );
                }
            }
        }
        counters(&mut out, &ROLLOUT_DECISIONS, &self.rollout_decisions);
        header(&mut out, &ROLLOUT_STATE);
        for (model, version, state, _) in rollouts {
            let labels = [model.clone(), version.to_string(), (*state).to_string()];
            let _ = writeln!(
                out,
                "{}{} 1",
                ROLLOUT_STATE.name,
                label_text(ROLLOUT_STATE.labels, &labels, None)
            );
        }
        header(&mut out, &ROLLOUT_WEIGHT);
        for (model, version, _, weight) in rollouts {
            let labels = [model.clone(), version.to_string()];
            let _ = writeln!(
                out,
                "{}{} {weight}",
                ROLLOUT_WEIGHT.name,
                label_text(ROLLOUT_WEIGHT.labels, &labels, None)
            );
        }
        counters(&mut out, &SHADOW_REQUESTS, &self.shadow_requests);
        {
            let compared = self
                .shadow_compared
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for (d, pick) in [
                (
                    &SHADOW_AGREEMENT,
                    (|a: &crate::shadow::Agreement| a.agreement_ratio())
                        as fn(&crate::shadow::Agreement) -> Option<f64>,
                ),
                (&SHADOW_DIFFERENCE, |a| a.mean_absolute_difference()),
            ] {
                header(&mut out, d);
                for (labels, a) in compared.iter() {
                    if let Some(v) = pick(a) {
                        let _ =
                            writeln!(out, "{}{} {v}", d.name, label_text(d.labels, labels, None));
                    }
                }
            }
        }
        header(&mut out, &PAYLOAD_RECORDS);
        if let Some((queued, dropped)) = payload {
            let _ = writeln!(
                out,
                "{}{{outcome=\"queued\"}} {queued}",
                PAYLOAD_RECORDS.name
            );
            let _ = writeln!(
                out,
                "{}{{outcome=\"dropped\"}} {dropped}",
                PAYLOAD_RECORDS.name
            );
        }
        let process = process_stats();
        for (d, v) in [
            (&CPU, process.cpu_seconds),
            (&RSS, process.rss_bytes),
            (&FDS, process.fds),
            (&THREADS, process.threads),
        ] {
            if let Some(v) = v {
                header(&mut out, d);
                let _ = writeln!(out, "{} {v}", d.name);
            }
        }
        header(&mut out, &START_TIME);
        let start = self
            .started
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let _ = writeln!(out, "{} {start}", START_TIME.name);
        header(&mut out, &BUILD_INFO);
        let _ = writeln!(
            out,
            "{}{} 1",
            BUILD_INFO.name,
            label_text(
                BUILD_INFO.labels,
                &[env!("CARGO_PKG_VERSION").to_string()],
                None
            )
        );
        out
    }
}

/// `{a="x",b="y"}` with values escaped as the text format requires; `le` appended for histogram buckets.
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

    #[test]
    fn exposition_has_counters_histograms_and_escaped_labels() {
        let m = Metrics::default();
        let mut r = m.request("rest_kserve");
        r.model("iris", Some(1));
        r.finish("success");
        let mut r = m.request("rest_kserve");
        r.model("we\"ird", None);
        r.finish("not_found");
        m.batch(
            "iris",
            1,
            &[Duration::from_micros(80), Duration::from_micros(120)],
            Duration::from_micros(300),
        );
        let drift = vec![(
            "iris".to_string(),
            1,
            vec![crate::drift::FeatureDrift {
                name: "f0".into(),
                psi: 0.5,
                ks: 0.25,
                drifted: true,
            }],
        )];
        let text = m.render(
            &[("iris".into(), 1, "READY", Some(0))],
            &drift,
            Some((3, 1)),
            &[("iris".into(), 2, "running", 25.0)],
        );
        assert!(text.contains("ferry_payload_log_records_total{outcome=\"dropped\"} 1"));
        assert!(text
            .contains("ferry_rollout_candidate_weight_percent{model=\"iris\",version=\"2\"} 25"));
        assert!(
            text.contains("ferry_rollout_state{model=\"iris\",version=\"2\",state=\"running\"} 1")
        );
        assert!(text
            .contains("ferry_feature_drift_psi{model=\"iris\",version=\"1\",feature=\"f0\"} 0.5"));
        assert!(text.contains("ferry_requests_total{model=\"iris\",version=\"1\",protocol=\"rest_kserve\",outcome=\"success\"} 1"), "{text}");
        assert!(text.contains("ferry_requests_total{model=\"we\\\"ird\",version=\"\",protocol=\"rest_kserve\",outcome=\"not_found\"} 1"));
        assert!(text.contains("ferry_batch_size_bucket{model=\"iris\",version=\"1\",le=\"2\"} 1"));
        assert!(text.contains("ferry_batch_size_bucket{model=\"iris\",version=\"1\",le=\"1\"} 0"));
        assert!(text.contains("ferry_queue_duration_seconds_count{model=\"iris\",version=\"1\"} 2"));
        assert!(text.contains("ferry_model_state{model=\"iris\",version=\"1\",state=\"READY\"} 1"));
        assert!(text.contains("ferry_requests_in_flight 0"));
        assert!(text.contains("process_resident_memory_bytes "));
        for d in ALL {
            assert!(
                text.contains(&format!("# TYPE {} {}", d.name, d.kind)),
                "{} missing",
                d.name
            );
        }
    }
}
