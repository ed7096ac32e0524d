//! Ferry's training side: from a CSV file to a servable ONNX model with its `ferry.json`.
//!
//! # Brief overview
//! - [`data`]: [`load_csv`] reads a CSV file into a [`Dataset`] (numeric features, a numeric or label target, a
//!   sha256 of the bytes) and [`split`] makes seeded, stratified train/validation splits.
//! - [`network`]: the one model all families share (dense layers and an output head) with its losses and exact
//!   gradients; [`optim`]: gradient descent, SGD, momentum, Adam and the learning-rate schedule.
//! - [`fit()`]: the training loop with early stopping, turning [`TrainOptions`] into a [`Trained`] model.
//! - [`export`]: the ONNX graph (standardization folded in) and the `ferry.json` metadata, written to a
//!   directory or published as the next version in a model repository.
//! - [`background`]: the seeded sample of training rows kept with a version as `background.csv` (the reference
//!   rows of feature attributions), and [`read_background`], which reads and checks one.
//! - [`evaluate`](mod@evaluate): runs an exported model through the serving engine and scores it ([`metrics`]).
//! - [`gate`]: the retraining gate, a candidate and the live version scored on the same seeded holdout rows.
//! - [`payload`]: training rows from the server's payload logs joined with labels by request id.
//! - [`search`]: grid and random hyper-parameter search scored by k-fold cross-validation.
//! - [`quantize`]: post-training int8 quantization of Gemm/MatMul weights, compared with the float model.
//!
//! This crate knows nothing of async runtimes, HTTP or the command line.

pub mod background;
pub mod data;
mod error;
pub mod evaluate;
pub mod export;
pub mod fit;
pub mod gate;
pub mod metrics;
pub mod network;
pub mod optim;
pub mod payload;
pub mod quantize;
pub mod search;
pub mod stats;

pub use background::{read_background, Background};
pub use data::{load_csv, split, CsvSource, Dataset, Impute, LoadOptions};
pub use error::TrainError;
pub use fit::{fit, HyperParameters, ModelKind, Task, TrainOptions, Trained};
