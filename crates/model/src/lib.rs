//! Ferry's model vocabulary: tensors, data types, signatures and the ONNX protobuf subset Ferry writes.
//!
//! # Brief overview
//! - [`Tensor`] and [`TensorData`]: the neutral, row-major tensor every protocol decodes into and every engine consumes.
//! - [`DataType`]: element types with their KServe v2, TensorFlow and ONNX names.
//! - [`Signature`] and [`TensorSpec`]: a model's inputs and outputs.
//! - [`onnx`]: protobuf messages and a [`onnx::GraphBuilder`] for writing standard ONNX files.
//! - [`hf`]: Hugging Face checkpoints of the BERT family (`config.json` + safetensors) turned into ONNX graphs.
//!
//! This crate knows nothing of async runtimes, HTTP or engines.

pub mod external;
pub mod hf;
pub mod onnx;
mod signature;
mod strings;
mod tensor;

pub use signature::{Signature, TensorSpec, ValueKind};
pub use strings::ByteStrings;
pub use tensor::{element_count, DataType, NamedTensor, ShapeMismatch, Tensor, TensorData};
