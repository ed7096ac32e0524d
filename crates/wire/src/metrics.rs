//! The metric catalogue: every name, type, help text, label set and bucket list Ferry exports (Triton's
//! `nv_inference_*` families too). The server records and renders them; `ferry top` reads them back by these names.

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
/// Tokens per text request.
pub const TEXT_REQUEST_TOKENS: MetricDef = def(
    "ferry_text_request_tokens",
    "histogram",
    "Tokens per request to a text model (all its texts, special tokens included)",
    &["model", "version"],
);
/// Tokens per engine run of a text model.
pub const TEXT_BATCH_TOKENS: MetricDef = def(
    "ferry_text_batch_tokens",
    "histogram",
    "Tokens per engine run of a text model, padding included (texts x the run's longest text)",
    &["model", "version"],
);
/// Text tokens run, and padding.
pub const TEXT_TOKENS: MetricDef = def(
    "ferry_text_tokens_total",
    "counter",
    "Token positions run by a text model's engine: kind=\"text\" for the texts' own tokens, kind=\"padding\" for padding (the padding share is padding / all)",
    &["model", "version", "kind"],
);
/// Tokenizing time per request.
pub const TOKENIZE_DURATION: MetricDef = def(
    "ferry_text_tokenize_duration_seconds",
    "histogram",
    "Time to tokenize one request's texts",
    &["model", "version"],
);
/// Time to the first generated token.
pub const LLM_TIME_TO_FIRST_TOKEN: MetricDef = def(
    "ferry_llm_time_to_first_token_seconds",
    "histogram",
    "Language models: time from a request's arrival to its first generated token (queueing and prompt processing)",
    &["model", "version"],
);
/// Time between generated tokens.
pub const LLM_INTER_TOKEN: MetricDef = def(
    "ferry_llm_inter_token_seconds",
    "histogram",
    "Language models: time between two generated tokens of one answer",
    &["model", "version"],
);
/// Whole answers.
pub const LLM_REQUEST_DURATION: MetricDef = def(
    "ferry_llm_request_duration_seconds",
    "histogram",
    "Language models: time from a request's arrival to its last token (streamed or not)",
    &["model", "version"],
);
/// Prompt and generated tokens.
pub const LLM_TOKENS: MetricDef = def(
    "ferry_llm_tokens_total",
    "counter",
    "Language models: tokens of finished answers, kind=\"prompt\" or kind=\"generated\"",
    &["model", "version", "kind"],
);
/// Running and waiting sequences.
pub const LLM_SEQUENCES: MetricDef = def(
    "ferry_llm_sequences",
    "gauge",
    "Language models: sequences in the running batch (state=\"running\") and requests waiting for room (state=\"waiting\")",
    &["model", "version", "state"],
);
/// KV cache use.
pub const LLM_KV_CACHE_TOKENS: MetricDef = def(
    "ferry_llm_kv_cache_tokens",
    "gauge",
    "Language models: KV-cache cells holding tokens (kind=\"used\"), reserved by running sequences (prompt + max_tokens, kind=\"reserved\"), and the budget (kind=\"budget\", max_total_tokens)",
    &["model", "version", "kind"],
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
/// Global feature importance: mean absolute attribution, summed over the explained outputs.
pub const FEATURE_IMPORTANCE: MetricDef = def(
    "ferry_feature_importance",
    "gauge",
    "Mean absolute attribution of a feature (summed over the explained outputs), over the background sample or the recent live rows, as of the last importance computation",
    &["model", "version", "feature", "source"],
);
/// Drift attribution: how much a feature moved the mean prediction of the recent live rows away from the background's.
pub const DRIFT_ATTRIBUTION: MetricDef = def(
    "ferry_feature_drift_attribution",
    "gauge",
    "Absolute mean attribution of a feature over the recent live rows (summed over the explained outputs): its share of the shift of the mean prediction from the background's",
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
    FEATURE_IMPORTANCE,
    DRIFT_ATTRIBUTION,
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
pub const DURATION_BUCKETS_NS: &[u64] = &[
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
/// [`BATCH_BUCKETS`] as integers, the unit the request path records in.
pub const BATCH_BUCKETS_INT: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256];
/// Token count buckets (text requests and runs).
pub const TOKEN_BUCKETS: &[f64] = &[
    8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0,
    65536.0,
];
/// [`TOKEN_BUCKETS`] as integers.
pub const TOKEN_BUCKETS_INT: &[u64] = &[
    8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536,
];
