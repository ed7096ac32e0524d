//! Warm-up: a version runs before it takes traffic, so the first client request does not pay for lazy
//! initialisation and a model that cannot run at all never goes live.
//!
//! Requests recorded in `<version>/warmup/*.json` (KServe v2 JSON inference requests) run in name order, and any
//! failure keeps the version out of service, with the failure as its reason. Without that directory, one request
//! of zeros shaped by the signature (dynamic dimensions as 1) runs instead; since zeros are not real inputs (an
//! audio model may need more than one sample), its failure is logged, not fatal.

use std::path::Path;

use ferry_engine::Backend;
use ferry_model::{DataType, NamedTensor, Signature, Tensor, TensorData};

/// The most recorded warm-up requests read from one version.
const MAX_REQUESTS: usize = 64;
/// The largest recorded warm-up request read.
const MAX_REQUEST_BYTES: u64 = 16 << 20;

/// Why a version's recorded warm-up keeps it out of service (its text is the version's UNAVAILABLE reason).
#[derive(Debug, thiserror::Error)]
pub enum WarmupError {
    /// The `warmup/` directory cannot be listed.
    #[error("cannot read warmup/: {0}")]
    ReadDir(#[source] std::io::Error),
    /// More recorded requests than are run.
    #[error("warmup/ has {0} requests; at most {MAX_REQUESTS} are run", MAX_REQUESTS = MAX_REQUESTS)]
    TooMany(usize),
    /// One recorded request failed.
    #[error("warm-up request warmup/{name} failed: {why}")]
    Request {
        /// The file's name.
        name: String,
        /// Why.
        why: RequestError,
    },
}

/// Why one recorded warm-up request failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The file cannot be read.
    #[error("{0}")]
    Io(std::io::Error),
    /// The file is larger than `MAX_REQUEST_BYTES`.
    #[error("it is larger than {MAX_REQUEST_BYTES} bytes", MAX_REQUEST_BYTES = MAX_REQUEST_BYTES)]
    TooLarge,
    /// The file is not a KServe v2 JSON request.
    #[error("{0}")]
    Decode(crate::error::InferError),
    /// The request does not fit the model's signature.
    #[error("input `{0}` is missing")]
    Missing(String),
    /// An input whose type or shape the model does not take.
    #[error("input `{name}` does not match the model ({dtype} {shape:?})")]
    Mismatch {
        /// The input.
        name: String,
        /// The model's type for it.
        dtype: DataType,
        /// The model's shape for it.
        shape: Vec<i64>,
    },
    /// Inputs the model does not take.
    #[error("it has inputs the model does not take")]
    Extra,
    /// The engine failed on it.
    #[error("{0}")]
    Predict(ferry_engine::EngineError),
}

/// Runs a version's warm-up requests through its backend.
pub fn run(dir: &Path, signature: &Signature, backend: &dyn Backend) -> Result<(), WarmupError> {
    let warmup = dir.join("warmup");
    if warmup.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(&warmup)
            .map_err(WarmupError::ReadDir)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        if files.len() > MAX_REQUESTS {
            return Err(WarmupError::TooMany(files.len()));
        }
        for file in files {
            let name = file
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let fail = |why: RequestError| WarmupError::Request {
                name: name.clone(),
                why,
            };
            let size = std::fs::metadata(&file)
                .map_err(|e| fail(RequestError::Io(e)))?
                .len();
            if size > MAX_REQUEST_BYTES {
                return Err(fail(RequestError::TooLarge));
            }
            let body = std::fs::read(&file).map_err(|e| fail(RequestError::Io(e)))?;
            let inputs = crate::codec::kserve::decode_json_inputs(&body)
                .map_err(|e| fail(RequestError::Decode(e)))?;
            let inputs = conform(signature, inputs).map_err(fail)?;
            backend
                .predict(inputs)
                .map_err(|e| fail(RequestError::Predict(e)))?;
        }
        return Ok(());
    }
    let Some(inputs) = synthetic(signature) else {
        tracing::debug!("no warm-up: an input has no known rank");
        return Ok(());
    };
    if let Err(e) = backend.predict(inputs) {
        tracing::warn!(error = %e, "warm-up with zeros shaped by the signature failed (not fatal: record real requests in <version>/warmup/ to make warm-up a gate)");
    }
    Ok(())
}

/// Checks recorded inputs against the signature (the engine takes only checked inputs) and orders them.
fn conform(
    signature: &Signature,
    mut inputs: Vec<NamedTensor>,
) -> Result<Vec<NamedTensor>, RequestError> {
    for spec in &signature.inputs {
        let Some(input) = inputs.iter().find(|i| i.name == spec.name) else {
            return Err(RequestError::Missing(spec.name.clone()));
        };
        if input.tensor.dtype() != spec.dtype || !spec.accepts_shape(&input.tensor.shape) {
            return Err(RequestError::Mismatch {
                name: spec.name.clone(),
                dtype: spec.dtype,
                shape: spec.display_shape(),
            });
        }
    }
    if inputs.len() != signature.inputs.len() {
        return Err(RequestError::Extra);
    }
    inputs.sort_by_key(|i| signature.inputs.iter().position(|s| s.name == i.name));
    Ok(inputs)
}

/// One request of zeros (empty strings) for every input, dynamic dimensions set to 1.
fn synthetic(signature: &Signature) -> Option<Vec<NamedTensor>> {
    signature
        .inputs
        .iter()
        .map(|spec| {
            let shape: Vec<usize> = spec
                .shape
                .as_ref()?
                .iter()
                .map(|d| if *d < 0 { 1 } else { *d as usize })
                .collect();
            let n: usize = shape.iter().product();
            if n > 1 << 24 {
                return None;
            }
            let data = zeros(spec.dtype, n)?;
            Some(NamedTensor::new(
                spec.name.clone(),
                Tensor::new(shape, data).ok()?,
            ))
        })
        .collect()
}

fn zeros(dtype: DataType, n: usize) -> Option<TensorData> {
    match dtype.element_size() {
        Some(size) => TensorData::from_le_bytes(dtype, &vec![0u8; n * size]),
        None => Some(TensorData::Bytes(std::iter::repeat_n(b"", n).collect())),
    }
}
