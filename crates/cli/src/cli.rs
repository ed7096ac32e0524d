//! The command line: every subcommand and flag, each flag also readable from a `FERRY_*` environment variable.
//! `ferry --help` and `ferry serve --help` are the manual.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use ferry_engine::{EngineOptions, OptimizationLevel};
use ferry_server::reload::ControlMode;
use ferry_server::ServeConfig;

/// Ferry carries ONNX models through production: train them, serve them over KServe v2 and TF Serving APIs (REST and
/// gRPC), and measure them.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about, long_about = None, args_override_self = true)]
pub struct Cli {
    /// A TOML configuration file. The table named after the command (`[serve]`, `[bench]`, ...) takes the same keys as
    /// that command's flags (`rest_port = 8501`); precedence is file < environment < flags.
    #[arg(long, env = "FERRY_CONFIG", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve every model in a repository over REST and gRPC (KServe v2 / Open Inference Protocol and TF Serving APIs).
    Serve(Box<ServeArgs>),
    /// Train a model on a CSV file by gradient descent and write it as ONNX with its ferry.json.
    Train(crate::train::TrainArgs),
    /// Score an exported model on a CSV file, running it through ONNX Runtime as `ferry serve` does.
    Evaluate(crate::evaluate::EvaluateArgs),
    /// Optimize a model: search hyper-parameters, or quantize its weights to int8.
    Optimize(crate::optimize::OptimizeArgs),
    /// Write a drift baseline (per-feature statistics of the training data) into a model's ferry.json, for models
    /// that `ferry train` did not make.
    Baseline(crate::baseline::BaselineArgs),
    /// Measure a KServe v2 server's throughput and latency (REST or gRPC, a concurrency sweep or a fixed rate).
    Bench(crate::bench::BenchArgs),
    /// Watch a running server in the terminal: per model and version, request rate, errors, p50/p99, batch size,
    /// queue depth and drift, from its /metrics page, refreshed every second.
    Top(crate::top::TopArgs),
    /// Canary rollouts: start one (a plan in the repository that servers follow), see where it stands, promote or
    /// roll it back.
    Rollout(crate::rollout::RolloutArgs),
    /// Train a candidate on new data, score it against the live version on a holdout, and publish it with a
    /// canary rollout only if it is better (exit status 3 when it is refused).
    Retrain(Box<crate::retrain::RetrainArgs>),
    /// Sign a model version with an Ed25519 key (writing its ferry.sig), or make a key; servers started with
    /// --trusted-key load only versions signed by a trusted key.
    Sign(crate::sign::SignArgs),
    /// Turn a model from another format into a servable version folder: `ferry import hf DIR --out VERSION_DIR`
    /// builds model.onnx from a Hugging Face BERT-family checkpoint (config.json + model.safetensors), no Python
    /// needed, and copies its tokenizer files beside it.
    Import(crate::import::ImportArgs),
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// `--model-control-mode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ControlModeArg {
    /// Load at startup only.
    None,
    /// Load at startup and apply repository changes found by polling.
    Poll,
    /// Load only what --load-model and the management API ask for.
    Explicit,
}

/// `--metrics-compat` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MetricsCompat {
    /// Triton Inference Server's `nv_inference_*` families.
    Triton,
}

/// Graph optimization levels, as flags spell them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OptLevelArg {
    /// No graph rewrites.
    Disable,
    /// Constant folding, redundant-node elimination.
    Basic,
    /// Basic plus fusions.
    Extended,
    /// Everything.
    All,
}

/// `ferry serve` flags.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The model repository: `<DIR>/<model>/<version>/model.onnx`, with an optional `<DIR>/<model>/config.toml`;
    /// or `s3://bucket/prefix` on S3-compatible storage (credentials and endpoint from the standard AWS_*
    /// variables, AWS_ENDPOINT_URL for a server other than AWS).
    #[arg(
        long,
        env = "FERRY_MODEL_REPOSITORY",
        value_name = "DIR|s3://BUCKET/PREFIX"
    )]
    pub model_repository: String,

    /// Where versions from an S3 repository are cached before they load (must be writable).
    #[arg(long, env = "FERRY_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// How served models follow the repository: `poll` applies changes found every --repository-poll-secs (new
    /// versions load aside and swap in, removed ones drain, config.toml changes apply); `none` loads once at
    /// startup; `explicit` loads only what --load-model and the management API ask for.
    #[arg(long, env = "FERRY_MODEL_CONTROL_MODE", value_enum, default_value_t = ControlModeArg::Poll)]
    pub model_control_mode: ControlModeArg,

    /// Seconds between repository scans in `poll` mode (fractions allowed).
    #[arg(long, env = "FERRY_REPOSITORY_POLL_SECS", default_value_t = 5.0)]
    pub repository_poll_secs: f64,

    /// In `explicit` mode, a model to load at startup (repeat the flag, or separate names with commas).
    #[arg(long, env = "FERRY_LOAD_MODEL", value_delimiter = ',')]
    pub load_model: Vec<String>,

    /// The management API's address (repository index, load, unload, labels, rollouts). Beyond loopback it
    /// requires --admin-token.
    #[arg(long, env = "FERRY_ADMIN_HOST", default_value = "127.0.0.1")]
    pub admin_host: IpAddr,

    /// The management API's port; 0 picks a free port (the log says which).
    #[arg(long, env = "FERRY_ADMIN_PORT", default_value_t = 8502)]
    pub admin_port: u16,

    /// Turn the management API off.
    #[arg(long, env = "FERRY_NO_ADMIN")]
    pub no_admin: bool,

    /// The token management calls must send as `Authorization: Bearer <token>`. Prefer the environment
    /// variable to the flag (flags show in process listings).
    #[arg(long, env = "FERRY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Serve every listener over TLS with this certificate chain (PEM); re-read when the file changes.
    #[arg(
        long,
        env = "FERRY_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// The TLS certificate's private key (PEM).
    #[arg(
        long,
        env = "FERRY_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,

    /// Require client certificates signed by these CA certificates (PEM): mutual TLS.
    #[arg(
        long,
        env = "FERRY_TLS_CLIENT_CA",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_client_ca: Option<PathBuf>,

    /// Tokens for the inference ports, as a TOML file of `[[token]]` tables (name, token or sha256, scopes,
    /// rate_limit). With any token configured, calls need `Authorization: Bearer <token>` with the right scope.
    #[arg(long, env = "FERRY_TOKENS_FILE", value_name = "FILE")]
    pub tokens_file: Option<PathBuf>,

    /// Tokens as `name:scope+scope:secret`, comma-separated (scopes: infer, read, admin). Prefer the environment
    /// variable to the flag.
    #[arg(long, env = "FERRY_TOKENS", hide_env_values = true)]
    pub tokens: Option<String>,

    /// Which endpoints answer without a token when tokens are on: `health`, `metrics`, both (the default), or
    /// `none`.
    #[arg(
        long,
        env = "FERRY_AUTH_OPEN",
        value_delimiter = ',',
        default_value = "health,metrics"
    )]
    pub auth_open: Vec<String>,

    /// Slow clients: request headers (and a TLS handshake) must arrive within this, and a request body may not
    /// pause longer than this between chunks.
    #[arg(long, env = "FERRY_CLIENT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub client_timeout: Duration,

    /// Rows (the first dimension) one input may have; more are refused with 400.
    #[arg(long, env = "FERRY_MAX_ROWS_PER_REQUEST", default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_rows_per_request: u64,

    /// Elements one input tensor may have; more are refused with 400.
    #[arg(long, env = "FERRY_MAX_TENSOR_ELEMENTS", default_value_t = 1 << 26, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_tensor_elements: u64,

    /// How deeply a JSON body may nest; deeper bodies are refused with 400 before they are parsed.
    #[arg(long, env = "FERRY_MAX_JSON_DEPTH", default_value_t = 64, value_parser = clap::value_parser!(u32).range(2..=1000))]
    pub max_json_depth: u32,

    /// The address to listen on.
    #[arg(long, env = "FERRY_HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,

    /// The REST port (KServe v2 under /v2, TF Serving under /v1). 0 picks a free port; the log says which.
    #[arg(long, env = "FERRY_REST_PORT", default_value_t = 8501)]
    pub rest_port: u16,

    /// The gRPC port (KServe v2 `inference.GRPCInferenceService`, TF Serving `PredictionService` and
    /// `ModelService`). 0 picks a free port; the log says which.
    #[arg(long, env = "FERRY_GRPC_PORT", default_value_t = 8500)]
    pub grpc_port: u16,

    /// Also serve `/metrics` on this port (it stays on the REST port too), for scrapers kept away from the
    /// inference port. 0 picks a free port; the log says which.
    #[arg(long, env = "FERRY_METRICS_PORT")]
    pub metrics_port: Option<u16>,

    /// Do not record requests and batches in metrics (`/metrics` still shows model states, loads, drift and process
    /// figures). For measuring what monitoring costs; drift is per model (`drift_sample_every = 0` in config.toml).
    #[arg(long, env = "FERRY_NO_METRICS")]
    pub no_metrics: bool,

    /// Also emit another server's metric families on `/metrics`, so its dashboards and autoscaling rules work
    /// unchanged: `triton` adds Triton's `nv_inference_*` counters and gauge (labels model and version).
    #[arg(long, env = "FERRY_METRICS_COMPAT", value_enum)]
    pub metrics_compat: Option<MetricsCompat>,

    /// Request bodies (and gRPC messages) larger than this many bytes are refused (413 / RESOURCE_EXHAUSTED).
    #[arg(long, env = "FERRY_MAX_REQUEST_BYTES", default_value_t = 64 << 20)]
    pub max_request_bytes: usize,

    /// REST requests handled at once; a request takes its place only once its body has arrived whole, and four times
    /// as many bodies are read at once (more wait, unread, in their connections). With --max-request-bytes this
    /// bounds the memory spent on request bodies. Health, readiness and /metrics never wait. gRPC allows 256 calls
    /// per connection.
    #[arg(long, env = "FERRY_MAX_CONCURRENT_REQUESTS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_requests: u32,

    /// The longest one inference may take before the client gets 504 (`500ms`, `30s`, `2m`); also the longest a
    /// whole REST request body may take to arrive (400 past it).
    #[arg(long, env = "FERRY_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// After SIGTERM or SIGINT, how long in-flight requests may take to finish before the process exits anyway
    /// (then queued requests get 503, the rest are cut, and the exit status is 1).
    /// Keep Kubernetes' terminationGracePeriodSeconds longer than this.
    #[arg(long, env = "FERRY_SHUTDOWN_GRACE_PERIOD", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace_period: Duration,

    /// Threads one inference may use. One is fastest on small machines: Ferry scales with concurrent requests.
    /// A model's config.toml `intra_op_threads` overrides it.
    #[arg(long, env = "FERRY_INTRA_OP_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub intra_op_threads: u16,

    /// Engine sessions per model version that run side by side; each takes one request at a time and holds its
    /// own copy of the model's working memory. A model's config.toml `instances` overrides it.
    #[arg(long, env = "FERRY_INSTANCES", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    pub instances: u16,

    /// How much ONNX Runtime may rewrite graphs at load. Lower it for a model an optimization breaks
    /// (or set `graph_optimization_level` in that model's config.toml).
    #[arg(long, env = "FERRY_GRAPH_OPTIMIZATION_LEVEL", value_enum, default_value_t = OptLevelArg::All)]
    pub graph_optimization_level: OptLevelArg,

    /// Load only model versions signed (`ferry sign`) by this Ed25519 public key file (repeat the flag, or separate
    /// files with commas); an unsigned or altered version is refused with the reason. Off unless given.
    #[arg(
        long,
        env = "FERRY_TRUSTED_KEYS",
        value_delimiter = ',',
        value_name = "PUB_FILE"
    )]
    pub trusted_key: Vec<PathBuf>,

    /// A model.onnx larger than this many bytes is refused before it is read (from S3, before it is fetched).
    #[arg(long, env = "FERRY_MAX_MODEL_BYTES", default_value_t = ferry_repo::integrity::DEFAULT_MAX_MODEL_BYTES, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_model_bytes: u64,

    /// The ONNX Runtime 1.32 library (`libonnxruntime.so.1.32.0`). Without it Ferry looks at $ORT_DYLIB_PATH, in
    /// `.ferry/lib` (where scripts/fetch-onnxruntime puts it) in the working directory or any folder above it or
    /// above its own binary, beside the binary (or in `lib/` next to it), and in an installed Python `onnxruntime`
    /// package.
    #[arg(long, env = "FERRY_ONNXRUNTIME_LIB", value_name = "FILE")]
    pub onnxruntime_lib: Option<PathBuf>,

    /// Log a sample of inferences (inputs, outputs, model, version, id, latency) to this file as JSON lines, rotated
    /// by size. Off unless given.
    #[arg(long, env = "FERRY_PAYLOAD_LOG", value_name = "FILE")]
    pub payload_log: Option<PathBuf>,

    /// The fraction of inferences the payload log keeps (0 to 1); one in every 1/rate, deterministically.
    #[arg(long, env = "FERRY_PAYLOAD_LOG_SAMPLE_RATE", default_value_t = 0.01)]
    pub payload_log_sample_rate: f64,

    /// Rotate the payload log when it reaches this many bytes.
    #[arg(long, env = "FERRY_PAYLOAD_LOG_MAX_BYTES", default_value_t = 100 << 20)]
    pub payload_log_max_bytes: u64,

    /// Rotated payload logs to keep (`FILE.1` is the newest).
    #[arg(long, env = "FERRY_PAYLOAD_LOG_KEEP", default_value_t = 5)]
    pub payload_log_keep: usize,

    /// Input or output names whose values the payload log replaces with "[redacted]", comma-separated.
    #[arg(long, env = "FERRY_PAYLOAD_LOG_REDACT", value_delimiter = ',')]
    pub payload_log_redact: Vec<String>,

    /// Log line format.
    #[arg(long, env = "FERRY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// What to log, as a tracing filter (`info`, `debug`, `ferry_server=debug,info`).
    #[arg(long, env = "FERRY_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

impl ServeArgs {
    /// The validated server configuration.
    pub fn into_config(self) -> anyhow::Result<ServeConfig> {
        anyhow::ensure!(
            self.model_repository.starts_with("s3://")
                || std::path::Path::new(&self.model_repository).is_dir(),
            "--model-repository {} is not a directory (or an s3://bucket/prefix URL)",
            self.model_repository
        );
        anyhow::ensure!(
            self.repository_poll_secs.is_finite()
                && (0.05..=86_400.0).contains(&self.repository_poll_secs),
            "--repository-poll-secs must be between 0.05 and 86400"
        );
        // The same bounds a model's config.toml has: a flag must not start thousands of engine threads either.
        let cores = ferry_server::model_config::machine_cores();
        let (threads, instances) = (
            usize::from(self.intra_op_threads),
            usize::from(self.instances),
        );
        anyhow::ensure!(
            threads <= 4 * cores && instances <= 4 * cores && threads * instances <= 8 * cores,
            "--intra-op-threads ({threads}) and --instances ({instances}) may each be at most {} (4 x this machine's \
             {cores} cores), and their product at most {}",
            4 * cores,
            8 * cores
        );
        for name in &self.load_model {
            ferry_repo::validate_name(name).map_err(|e| anyhow::anyhow!("--load-model: {e}"))?;
        }
        anyhow::ensure!(
            self.load_model.is_empty() || self.model_control_mode == ControlModeArg::Explicit,
            "--load-model only applies with --model-control-mode explicit"
        );
        let admin_token = self
            .admin_token
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        if let Some(bad) = self
            .auth_open
            .iter()
            .find(|o| !matches!(o.as_str(), "health" | "metrics" | "none"))
        {
            anyhow::bail!(
                "--auth-open: unknown endpoint `{bad}` (expected health, metrics or none)"
            );
        }
        let config = ServeConfig {
            model_repository: self.model_repository,
            cache_dir: self
                .cache_dir
                .unwrap_or_else(|| std::env::temp_dir().join("ferry-cache")),
            model_control_mode: match self.model_control_mode {
                ControlModeArg::None => ControlMode::None,
                ControlModeArg::Poll => ControlMode::Poll,
                ControlModeArg::Explicit => ControlMode::Explicit,
            },
            repository_poll: Duration::from_secs_f64(self.repository_poll_secs),
            load_models: self.load_model,
            admin: (!self.no_admin)
                .then(|| std::net::SocketAddr::new(self.admin_host, self.admin_port)),
            admin_token: admin_token.map(ferry_server::config::Secret),
            tls: match (self.tls_cert, self.tls_key) {
                (Some(cert), Some(key)) => Some(ferry_server::listen::TlsFiles {
                    cert,
                    key,
                    client_ca: self.tls_client_ca,
                }),
                _ => None,
            },
            tokens: {
                let mut tokens = match &self.tokens_file {
                    Some(path) => ferry_server::auth::read_tokens_file(path)
                        .map_err(|e| anyhow::anyhow!("--tokens-file {e}"))?,
                    None => Vec::new(),
                };
                if let Some(text) = &self.tokens {
                    tokens.extend(
                        ferry_server::auth::parse_tokens_env(text)
                            .map_err(|e| anyhow::anyhow!("--tokens (FERRY_TOKENS): {e}"))?,
                    );
                }
                tokens
            },
            open_health: self.auth_open.iter().any(|o| o == "health"),
            open_metrics: self.auth_open.iter().any(|o| o == "metrics"),
            client_timeout: self.client_timeout,
            limits: ferry_server::infer::Limits {
                max_rows: usize::try_from(self.max_rows_per_request).unwrap_or(usize::MAX),
                max_tensor_elements: usize::try_from(self.max_tensor_elements)
                    .unwrap_or(usize::MAX),
                max_json_depth: self.max_json_depth as usize,
            },
            host: self.host,
            rest_port: self.rest_port,
            grpc_port: self.grpc_port,
            metrics_port: self.metrics_port,
            metrics: ferry_server::metrics::MetricsOptions {
                enabled: !self.no_metrics,
                triton: self.metrics_compat == Some(MetricsCompat::Triton),
            },
            max_request_bytes: self.max_request_bytes,
            max_concurrent_requests: self.max_concurrent_requests as usize,
            request_timeout: self.request_timeout,
            shutdown_grace_period: self.shutdown_grace_period,
            engine: EngineOptions {
                intra_op_threads: usize::from(self.intra_op_threads),
                instances: usize::from(self.instances),
                optimization: match self.graph_optimization_level {
                    OptLevelArg::Disable => OptimizationLevel::Disable,
                    OptLevelArg::Basic => OptimizationLevel::Basic,
                    OptLevelArg::Extended => OptimizationLevel::Extended,
                    OptLevelArg::All => OptimizationLevel::All,
                },
                prepack_weights: None,
                memory_arena: None,
            },
            onnxruntime_lib: self.onnxruntime_lib,
            integrity: crate::sign::policy(&self.trusted_key, self.max_model_bytes)?,
            payload_log: match self.payload_log {
                None => None,
                Some(path) => {
                    anyhow::ensure!(
                        (0.0..=1.0).contains(&self.payload_log_sample_rate),
                        "--payload-log-sample-rate must be between 0 and 1"
                    );
                    Some(ferry_server::payload_log::PayloadLogConfig {
                        path,
                        sample_rate: self.payload_log_sample_rate,
                        max_bytes: self.payload_log_max_bytes.max(1024),
                        keep: self.payload_log_keep.max(1),
                        redact: self.payload_log_redact,
                    })
                }
            },
        };
        config.check_admin_exposure().map_err(anyhow::Error::msg)?;
        Ok(config)
    }
}

/// [`parse_duration`], where zero (`0`, `0s`, `0ms`) is allowed too and means none.
pub fn parse_duration_or_zero(text: &str) -> anyhow::Result<Duration> {
    if seconds(text)? == 0.0 {
        return Ok(Duration::ZERO);
    }
    parse_duration(text)
}

/// Parses `250ms`, `30s`, `2m` or a bare number of seconds.
pub fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let seconds = seconds(text)?;
    let text = text.trim();
    anyhow::ensure!(
        seconds > 0.0 && seconds.is_finite(),
        "`{text}` must be longer than zero"
    );
    // Anything past a day is a mistake (and far past it would overflow deadline arithmetic).
    anyhow::ensure!(seconds <= 86_400.0, "`{text}` is longer than a day");
    Ok(Duration::from_secs_f64(seconds))
}

/// The seconds a duration's text stands for, unchecked.
fn seconds(text: &str) -> anyhow::Result<f64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| anyhow::anyhow!("`{text}` is not a duration (try 500ms, 30s or 2m)"))?;
    match unit {
        "ms" => Ok(n / 1000.0),
        "" | "s" => Ok(n),
        "m" => Ok(n * 60.0),
        _ => anyhow::bail!("`{text}` has an unknown unit (use ms, s or m)"),
    }
}
