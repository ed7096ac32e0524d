//! The engine-neutral interface: [`Backend`], its options and its errors.

use ferry_model::{NamedTensor, Signature};

/// A model version ready to run.
///
/// Implementations are prepared once at load time; `predict` may be called from many threads at once. What every
/// implementation must do is written once, in the conformance suite (`crates/engine/tests/conformance.rs`), and
/// run over each of them.
pub trait Backend: Send + Sync {
    /// The inputs and outputs, as the model declares them: graph order, `-1` for dynamic dimensions.
    fn signature(&self) -> &Signature;

    /// Runs the model and returns every output, in signature order. Inputs may come in any order; a missing,
    /// unknown or repeated input, or one whose type or shape the signature refuses, is
    /// [`EngineError::InvalidInput`] (implementations check with [`check_inputs`]).
    fn predict(&self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, EngineError>;

    /// The engine's name, for logs and metadata (`onnxruntime`).
    fn engine_name(&self) -> &'static str;
}

/// How much ONNX Runtime may rewrite the graph when it prepares a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OptimizationLevel {
    /// No rewrites: the graph runs as written. Use it for models an optimization breaks.
    Disable,
    /// Constant folding and redundant-node elimination.
    Basic,
    /// Basic plus operator fusions.
    Extended,
    /// Everything, including layout changes.
    #[default]
    All,
}

/// A graph optimization level that is none of `disable`, `basic`, `extended` or `all`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown graph optimization level `{0}` (expected disable, basic, extended or all)")]
pub struct UnknownOptimizationLevel(pub String);

impl std::str::FromStr for OptimizationLevel {
    type Err = UnknownOptimizationLevel;

    fn from_str(s: &str) -> Result<OptimizationLevel, UnknownOptimizationLevel> {
        match s {
            "disable" => Ok(OptimizationLevel::Disable),
            "basic" => Ok(OptimizationLevel::Basic),
            "extended" => Ok(OptimizationLevel::Extended),
            "all" => Ok(OptimizationLevel::All),
            other => Err(UnknownOptimizationLevel(other.to_string())),
        }
    }
}

/// What a backend is built with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineOptions {
    /// Threads one inference may use. One is fastest on small machines: scale with concurrent requests instead.
    pub intra_op_threads: usize,
    /// How many copies of the session run side by side (each serves one request at a time).
    pub instances: usize,
    /// Graph optimization level.
    pub optimization: OptimizationLevel,
    /// Whether ONNX Runtime lays weights out anew for its kernels when a session is made (pre-packing: faster
    /// runs, but each session holds its own packed copy of those weights). `None`: on for self-contained models,
    /// off for models with external data, whose weights then stay in their memory-mapped files, shared by every
    /// session of the version.
    pub prepack_weights: Option<bool>,
    /// Whether ONNX Runtime's CPU memory arena keeps the run's intermediate tensors for reuse. On, a session keeps its
    /// largest run's tensors for its life (bounded for text models, whose batches `max_batch_tokens` bounds); off,
    /// they go back to the C allocator after each run, which with Ferry's allocator settings maps and unmaps every
    /// tensor of 128 KiB or more (a third of a transformer's CPU time in the kernel). `None`: off.
    pub memory_arena: Option<bool>,
}

impl Default for EngineOptions {
    fn default() -> EngineOptions {
        EngineOptions {
            intra_op_threads: 1,
            instances: 2,
            optimization: OptimizationLevel::All,
            prepack_weights: None,
            memory_arena: None,
        }
    }
}

/// What can go wrong in an engine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The engine library could not be found or loaded.
    #[error("{0}")]
    Library(String),
    /// The model could not be prepared (corrupt file, unsupported operator, bad graph).
    #[error("model failed to load: {0}")]
    Load(String),
    /// The model uses an input or output type Ferry cannot carry.
    #[error("model is not servable: {0}")]
    Unsupported(String),
    /// An input was well-formed but the engine refused it.
    #[error("{0}")]
    InvalidInput(String),
    /// The engine failed while running the model.
    #[error("inference failed: {0}")]
    Run(String),
    /// The engine has no room for the request now (a language model's waiting queue is full).
    #[error("{reason}")]
    Busy {
        /// Why, in words the client can act on.
        reason: String,
        /// When room is likely, in seconds.
        retry_after_secs: u32,
    },
    /// The engine is stopping (its model is being unloaded).
    #[error("{0}")]
    Stopping(String),
}

/// `inputs` in signature order, once each checked against `signature`: every input present once, none unknown,
/// element types equal and shapes accepted ([`ferry_model::TensorSpec::accepts_shape`]). Otherwise
/// [`EngineError::InvalidInput`] naming the input. Callers that validated already (the server does, with its own
/// wording) pay a few comparisons per input.
pub fn check_inputs(
    signature: &Signature,
    mut inputs: Vec<NamedTensor>,
) -> Result<Vec<NamedTensor>, EngineError> {
    let invalid = |m: String| Err(EngineError::InvalidInput(m));
    for (i, input) in inputs.iter().enumerate() {
        let name = &input.name;
        if inputs[..i].iter().any(|other| &other.name == name) {
            return invalid(format!("input `{name}` is given more than once"));
        }
        let Some(spec) = signature.input(name) else {
            return invalid(format!("unknown input `{name}`"));
        };
        let dtype = input.tensor.dtype();
        if spec.dtype != dtype {
            return invalid(format!(
                "input `{name}`: expected datatype {}, got {dtype}",
                spec.dtype
            ));
        }
        if !spec.accepts_shape(&input.tensor.shape) {
            return invalid(format!(
                "input `{name}`: expected shape {:?}, got {:?}",
                spec.display_shape(),
                input.tensor.shape
            ));
        }
    }
    if let Some(missing) = signature
        .inputs
        .iter()
        .find(|s| !inputs.iter().any(|i| i.name == s.name))
    {
        return invalid(format!("missing input `{}`", missing.name));
    }
    inputs.sort_by_key(|i| signature.inputs.iter().position(|s| s.name == i.name));
    Ok(inputs)
}
