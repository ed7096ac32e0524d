//! The validated server configuration, built by the binary from flags, environment and file.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ferry_engine::EngineOptions;

/// A secret that never shows in logs (`Debug` prints `[redacted]`).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Everything `ferry serve` needs, already validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The model repository: a directory (`<root>/<model>/<version>/model.onnx`) or `s3://bucket/prefix`.
    pub model_repository: String,
    /// Where versions fetched from S3 are cached.
    pub cache_dir: PathBuf,
    /// How the served models follow the repository.
    pub model_control_mode: crate::core::reload::ControlMode,
    /// How often `poll` mode scans the repository.
    pub repository_poll: Duration,
    /// Models to load at startup in `explicit` mode.
    pub load_models: Vec<String>,
    /// The management API's address (Triton's repository extension, labels); `None` turns it off.
    pub admin: Option<std::net::SocketAddr>,
    /// The token the management API requires (`Authorization: Bearer`); required when it listens beyond loopback.
    pub admin_token: Option<Secret>,
    /// TLS for every listener, when on.
    pub tls: Option<crate::transport::listen::TlsFiles>,
    /// Tokens for the inference ports (none: nothing is checked).
    pub tokens: Vec<crate::transport::auth::TokenSpec>,
    /// Health endpoints answer without a token.
    pub open_health: bool,
    /// `/metrics` on the REST port answers without a token.
    pub open_metrics: bool,
    /// Headers (and a TLS handshake) must arrive within this, and a request body may pause at most this long.
    pub client_timeout: Duration,
    /// Per-request limits beyond the body size.
    pub limits: crate::codec::limits::Limits,
    /// The address to listen on.
    pub host: IpAddr,
    /// The REST port; 0 picks a free one.
    pub rest_port: u16,
    /// The gRPC port; 0 picks a free one.
    pub grpc_port: u16,
    /// A separate port for `/metrics` (it stays on the REST port too); 0 picks a free one.
    pub metrics_port: Option<u16>,
    /// Bodies larger than this are refused with 413.
    pub max_request_bytes: usize,
    /// Requests handled at once; more wait (unread) until one finishes, which bounds decoding memory.
    pub max_concurrent_requests: usize,
    /// A request that takes longer is answered with 504.
    pub request_timeout: Duration,
    /// How long in-flight requests may take to finish after SIGTERM before the process exits anyway.
    pub shutdown_grace_period: Duration,
    /// Engine settings for models whose `config.toml` does not override them.
    pub engine: EngineOptions,
    /// Where the ONNX Runtime library is, if given.
    pub onnxruntime_lib: Option<PathBuf>,
    /// Sampled payload logging, when on.
    pub payload_log: Option<crate::core::payload_log::PayloadLogConfig>,
    /// Trusted signing keys and the model size limit, checked before a model loads.
    pub integrity: crate::core::integrity::IntegrityPolicy,
    /// Whether requests are recorded in metrics, and whether Triton's families are emitted too.
    pub metrics: crate::metrics::MetricsOptions,
}

/// A management API that would listen beyond loopback with no token guarding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the management API would listen on {0}, beyond loopback, without a token: set --admin-token (or \
     FERRY_ADMIN_TOKEN), give a token the admin scope, or keep --admin-host on 127.0.0.1"
)]
pub struct UnguardedAdmin(pub std::net::SocketAddr);

impl ServeConfig {
    /// Refuses a management API beyond loopback that no token guards (neither `admin_token` nor a token with the
    /// admin scope). `ferry serve` checks it before it binds a port or loads anything; `Server::start` checks again.
    pub fn check_admin_exposure(&self) -> Result<(), UnguardedAdmin> {
        let Some(addr) = self.admin else {
            return Ok(());
        };
        let guarded = self.admin_token.is_some()
            || self
                .tokens
                .iter()
                .any(|t| t.scopes.contains(&crate::transport::auth::Scope::Admin));
        if addr.ip().is_loopback() || guarded {
            return Ok(());
        }
        Err(UnguardedAdmin(addr))
    }

    /// A configuration for tests: loopback, a free port, short timeouts.
    pub fn for_tests(model_repository: PathBuf) -> ServeConfig {
        ServeConfig {
            model_repository: model_repository.display().to_string(),
            cache_dir: std::env::temp_dir().join("ferry-cache"),
            model_control_mode: crate::core::reload::ControlMode::None,
            repository_poll: Duration::from_secs(5),
            load_models: Vec::new(),
            admin: None,
            admin_token: None,
            tls: None,
            tokens: Vec::new(),
            open_health: true,
            open_metrics: true,
            client_timeout: Duration::from_secs(10),
            limits: crate::codec::limits::Limits::default(),
            host: IpAddr::from([127, 0, 0, 1]),
            rest_port: 0,
            grpc_port: 0,
            metrics_port: None,
            max_request_bytes: 64 << 20,
            max_concurrent_requests: 1024,
            request_timeout: Duration::from_secs(30),
            shutdown_grace_period: Duration::from_secs(10),
            engine: EngineOptions {
                instances: 1,
                ..EngineOptions::default()
            },
            onnxruntime_lib: None,
            payload_log: None,
            integrity: crate::core::integrity::IntegrityPolicy::default(),
            metrics: crate::metrics::MetricsOptions::default(),
        }
    }
}
