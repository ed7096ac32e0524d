//! Ferry's serving layer: the model repository, the shared inference path and the protocol front doors.
//!
//! # Brief overview
//! - [`repository`]: discovers `<root>/<model>/<version>/model.onnx`, loads versions in parallel, keeps their states.
//! - [`batching`]: per-version queues, dynamic batching and backpressure.
//! - [`infer`]: [`infer::Infer`], the one path every protocol takes (resolve, validate, run, select outputs).
//! - [`protocol`]: KServe v2 (REST with the binary tensor extension, and gRPC) and TF Serving (REST and gRPC)
//!   adapters.
//! - [`front`]: the REST listener's direct path for inference requests (everything else goes to the router).
//! - [`http`]: the REST and gRPC routers and the server lifecycle (bind, serve, drain on shutdown).
//! - [`drift`]: per-feature drift (PSI, KS) of live inputs against the training data.
//! - [`payload_log`]: sampled request/response logging as rotated JSON lines.
//! - [`integrity`]: signed versions (`ferry.sig`, Ed25519) and the model size limit, checked before a model loads.
//! - [`error`]: the one error table, mapping each failure kind to its status.
//! - [`metrics`]: the metric catalogue, registry and Prometheus exposition.
//!
//! This crate never runs inference on the async runtime: engines run on each version's worker threads.

pub mod admin;
pub mod auth;
pub mod batching;
pub mod config;
pub mod drift;
pub mod error;
pub mod front;
pub mod http;
pub mod infer;
pub mod integrity;
pub mod listen;
pub mod metrics;
pub mod model_config;
pub mod payload_log;
pub mod protocol;
pub mod reload;
pub mod repository;
pub mod rollout;
pub mod shadow;
pub mod source;
pub mod text;
pub mod warmup;

pub use config::ServeConfig;
pub use http::{app, shutdown_signal, AppState, Server};
