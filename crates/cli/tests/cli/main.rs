//! The `ferry` binary as users run it, in one test binary: training, baselines, signing, retraining and rollouts.
//! Scoring runs ONNX Runtime: run through `scripts/test`, which sets `ORT_DYLIB_PATH`.

mod baseline;
mod common;
mod library;
mod retrain;
mod serve;
mod sign;
mod train;
