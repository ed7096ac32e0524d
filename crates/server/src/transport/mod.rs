//! Transport: how requests reach the protocol adapters and the management API. Listeners (TLS, HTTP/1 for REST,
//! metrics and management, HTTP/2 for gRPC), the REST listener's direct inference path, bearer tokens and their
//! rate limits, the REST and gRPC routers, the management API, the serve configuration and the server lifecycle.
//!
//! The top layer: it may use every other folder, and none uses it.

pub mod admin;
pub mod auth;
pub mod config;
pub mod front;
pub mod http;
pub mod idle;
pub mod listen;
pub mod parse_errors;
