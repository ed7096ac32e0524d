//! Ferry's inference engines behind one [`Backend`] trait.
//!
//! # Brief overview
//! - [`Backend`]: a loaded model version that turns named input tensors into named output tensors.
//! - [`OrtEngine`]: ONNX Runtime, loaded at run time from `libonnxruntime` ([`find_onnxruntime`] says where from).
//! - `TractBackend` (with the `tract` feature): tract, the pure-Rust engine.
//! - [`EngineOptions`]: what every backend is built with (threads, instances, graph optimization).
//!
//! This crate knows nothing of async runtimes or protocols: callers run [`Backend::predict`] off their event loop.

mod backend;
mod library;
mod onnxruntime;
#[cfg(feature = "tract")]
mod tract;

pub use backend::{
    check_inputs, Backend, EngineError, EngineOptions, OptimizationLevel, UnknownOptimizationLevel,
};
pub use library::{find_onnxruntime, ENV_ORT_DYLIB_PATH};
pub use onnxruntime::{OrtBackend, OrtEngine};
#[cfg(feature = "tract")]
pub use tract::TractBackend;
