//! Ferry's serving layer: the model repository, the shared inference path and the protocol front doors.
//!
//! # Brief overview
//! The crate is in layers, one folder each; a folder uses only the ones listed before it (`scripts/check-layers`
//! holds it so):
//! - [`error`]: the one error table, mapping each failure kind to its status, gRPC code and metric label.
//! - [`codec`]: tensor data in JSON, the KServe v2 request decoder, and the limits and memory budget every decoder
//!   keeps.
//! - [`metrics`]: the metric catalogue, registry and Prometheus exposition, drift windows (PSI, KS) and shadow
//!   agreement.
//! - [`core`]: the model repository (sources, signatures, loading, reloads, rollouts), per-version batching, and
//!   [`core::infer::Infer`] with [`core::infer::Call`], the one path every protocol takes (resolve, record, validate,
//!   run, select outputs).
//! - [`protocol`]: KServe v2 (REST with the binary tensor extension, and gRPC) and TF Serving (REST and gRPC)
//!   adapters: each decodes, calls the core, and encodes.
//! - [`transport`]: listeners (TLS, HTTP/1, HTTP/2), the REST listener's direct path, bearer tokens, the REST and
//!   gRPC routers, the management API, the serve configuration and the server lifecycle (bind, serve, drain).
//!
//! This crate never runs inference on the async runtime: engines run on each version's worker threads.

pub mod codec;
pub mod core;
pub mod error;
pub mod metrics;
pub mod protocol;
pub mod transport;

// The modules' paths from before the layers had folders, kept for the CLI, the tests and the fuzz targets.
pub use crate::core::{
    batching, explain, infer, integrity, llm, model_config, payload_log, reload, repository,
    rollout, source, text, warmup,
};
pub use metrics::{drift, shadow};
pub use transport::{admin, auth, config, front, http, listen};

pub use transport::config::ServeConfig;
pub use transport::http::{app, shutdown_signal, AppState, Server};
