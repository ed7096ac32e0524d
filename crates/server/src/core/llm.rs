//! Language models: a version folder with a `model.gguf` (and no `model.onnx`) is served by [`ferry_llm`]
//! (llama.cpp, continuous batching).
//!
//! Such a version is a [`LoadedVersion`] like any other (versions, labels, canaries, signatures, metrics), with
//! `llm` set. The OpenAI and Triton generate adapters use `llm` directly; KServe v2 and TF Serving clients see a
//! tensor signature, `text_input` (BYTES, one prompt per element) in and `text_output` (BYTES) out, as Triton's
//! LLM backends name them, served by [`LlmBackend`] through the version's ordinary scheduler: each prompt is
//! completed greedily as raw text (no chat template), up to the model's `max_new_tokens`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_engine::{Backend, EngineError};
use ferry_llm::{Event, Finish, Llm, LlmError, Params, Sampling};
use ferry_model::{DataType, NamedTensor, Signature, Tensor, TensorData, TensorSpec, ValueKind};

use crate::error::{ErrorKind, InferError};
use crate::repository::LoadedVersion;

/// Whether `dir` holds a language model: a `model.gguf` and no `model.onnx`.
pub fn present(dir: &Path) -> bool {
    dir.join("model.gguf").is_file() && !dir.join("model.onnx").exists()
}

/// The language model of a resolved version, or a clear error for any other model.
pub fn llm_of(version: &LoadedVersion) -> Result<&Arc<Llm>, InferError> {
    version.llm.as_ref().ok_or_else(|| {
        InferError::invalid(format!(
            "model `{}` is not a language model (its version {} has no model.gguf)",
            version.model, version.version
        ))
    })
}

/// The error a client gets for a request the engine refused.
pub fn error(e: LlmError) -> InferError {
    match e {
        LlmError::Busy {
            retry_after_secs, ..
        } => {
            InferError::new(ErrorKind::Overloaded, e.to_string()).with_retry_after(retry_after_secs)
        }
        LlmError::Stopped => InferError::new(ErrorKind::Unavailable, e.to_string()),
        LlmError::Load(_) | LlmError::Template(_) => {
            InferError::new(ErrorKind::Internal, e.to_string())
        }
        LlmError::BadMessages(_) | LlmError::PromptTooLong { .. } | LlmError::InvalidParams(_) => {
            InferError::invalid(e.to_string())
        }
    }
}

/// Why a language model did not load (its text is the version's UNAVAILABLE reason).
#[derive(Debug, thiserror::Error)]
pub enum LlmLoadError {
    /// `config.toml`'s `[llm]` table is refused.
    #[error(transparent)]
    Config(#[from] crate::model_config::LlmConfigError),
    /// llama.cpp did not load the model, or its tokenizer failed.
    #[error(transparent)]
    Llm(#[from] LlmError),
    /// The warm-up generation was refused.
    #[error("warm-up: {0}")]
    Warmup(#[source] LlmError),
    /// The warm-up generation failed.
    #[error("warm-up failed: {0}")]
    WarmupFailed(String),
    /// The engine stopped during warm-up.
    #[error("warm-up: the engine stopped")]
    Stopped,
}

/// Loads the language model in `dir` with `config.toml`'s `[llm]` settings and warms it up (one token from a
/// short prompt). The caller has checked the file's size and signature.
pub(crate) fn load(
    dir: &Path,
    config: &crate::model_config::ModelConfig,
) -> Result<Arc<Llm>, LlmLoadError> {
    let settings = config.llm.settings()?;
    let started = Instant::now();
    let llm = Llm::load(dir, settings)?;
    let info = llm.info().clone();
    // Warm-up: the first decode allocates llama.cpp's compute buffers.
    let prompt = llm.tokenize("Hello", false)?;
    let params = Params {
        max_tokens: Some(1),
        sampling: Sampling {
            temperature: 0.0,
            ..Sampling::default()
        },
        ..Params::default()
    };
    let mut generation = llm.generate(prompt, params).map_err(LlmLoadError::Warmup)?;
    loop {
        match generation.events.blocking_recv() {
            Some(Event::Done { .. }) => break,
            Some(Event::Failed(e)) => return Err(LlmLoadError::WarmupFailed(e)),
            Some(Event::Token { .. }) => {}
            None => return Err(LlmLoadError::Stopped),
        }
    }
    tracing::info!(
        architecture = %info.architecture,
        name = info.name.as_deref().unwrap_or(""),
        parameters = info.parameters,
        context = info.context_length,
        tokenizer = info.tokenizer,
        chat_template = llm.has_chat_template(),
        seconds = started.elapsed().as_secs_f64(),
        "language model"
    );
    Ok(Arc::new(llm))
}

/// The tensor view of a language model for KServe v2 and TF Serving clients.
pub struct LlmBackend {
    llm: Arc<Llm>,
    signature: Signature,
}

impl LlmBackend {
    /// The backend over `llm`.
    pub fn new(llm: Arc<Llm>) -> LlmBackend {
        let spec = |name: &str| TensorSpec {
            name: name.into(),
            dtype: DataType::Bytes,
            shape: Some(vec![-1]),
            kind: ValueKind::Tensor,
        };
        LlmBackend {
            llm,
            signature: Signature {
                inputs: vec![spec("text_input")],
                outputs: vec![spec("text_output")],
            },
        }
    }
}

impl Backend for LlmBackend {
    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn predict(&self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, EngineError> {
        let inputs = ferry_engine::check_inputs(&self.signature, inputs)?;
        let TensorData::Bytes(prompts) = &inputs[0].tensor.data else {
            return Err(EngineError::InvalidInput("text_input must be BYTES".into()));
        };
        // Every prompt joins the running batch at once; the answers are collected in order.
        let mut running = Vec::with_capacity(prompts.len());
        for (i, prompt) in prompts.iter().enumerate() {
            let text = std::str::from_utf8(prompt)
                .map_err(|_| EngineError::InvalidInput(format!("text_input[{i}] is not UTF-8")))?;
            let tokens = self
                .llm
                .tokenize(text, true)
                .map_err(|e| EngineError::InvalidInput(e.to_string()))?;
            let params = Params {
                sampling: Sampling {
                    temperature: 0.0,
                    ..Sampling::default()
                },
                ..Params::default()
            };
            let generation = self.llm.generate(tokens, params).map_err(|e| match e {
                LlmError::Busy {
                    retry_after_secs, ..
                } => EngineError::Busy {
                    reason: e.to_string(),
                    retry_after_secs,
                },
                LlmError::Stopped => EngineError::Stopping(e.to_string()),
                other => EngineError::InvalidInput(format!("text_input[{i}]: {other}")),
            })?;
            running.push(generation);
        }
        let mut answers = Vec::with_capacity(running.len());
        for mut generation in running {
            let mut text = String::new();
            loop {
                match generation.events.blocking_recv() {
                    Some(Event::Token { text: t, .. }) => text.push_str(&t),
                    Some(Event::Done { text: t, .. }) => {
                        text.push_str(&t);
                        break;
                    }
                    Some(Event::Failed(e)) => return Err(EngineError::Run(e)),
                    None => return Err(EngineError::Run("the engine stopped".into())),
                }
            }
            answers.push(text.into_bytes());
        }
        let n = answers.len();
        let tensor = Tensor::new(vec![n], TensorData::Bytes(answers.into()))
            .map_err(|e| EngineError::Run(e.to_string()))?;
        Ok(vec![NamedTensor::new("text_output", tensor)])
    }

    fn engine_name(&self) -> &'static str {
        "llama.cpp"
    }
}

/// What one streamed or collected answer measured, for the version's metrics and, while a rollout runs, for its
/// arm's gate figures (the answer's whole time, and whether the engine failed it).
pub struct Clock {
    started: Instant,
    last: Option<Instant>,
    /// The model's rollout when there is one, and the version answering.
    rollout: Option<(Arc<crate::core::rollout::Live>, u64)>,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clock")
            .field("started", &self.started)
            .field("last", &self.last)
            .field("in_rollout", &self.rollout.is_some())
            .finish()
    }
}

impl Clock {
    /// Starts at the request's arrival, for an answer of `version` (its rollout, if any, is looked up in `store`).
    pub fn start(store: &crate::core::repository::ModelStore, version: &LoadedVersion) -> Clock {
        let rollout = store
            .with_model(&version.model, |r| r.rollout.clone())
            .flatten()
            .map(|live| (live, version.version));
        Clock {
            started: Instant::now(),
            last: None,
            rollout,
        }
    }

    /// Counts the answer in its rollout arm, if a rollout runs: a canary of a language model is judged on its
    /// answers as one of an ONNX model is on its predictions.
    pub fn observe(&self, failed: bool) {
        if let Some((live, version)) = &self.rollout {
            if let Some(arm) = live.arm(*version) {
                arm.observe(self.started.elapsed(), failed);
            }
        }
    }

    /// A token arrived: time to the first token, or the gap since the last.
    pub fn token(&mut self, series: &crate::metrics::VersionSeries) {
        let now = Instant::now();
        match self.last {
            None => series.llm_first_token(now - self.started),
            Some(last) => series.llm_token_gap(now - last),
        }
        self.last = Some(now);
    }

    /// The answer ended: its whole time and its token counts (and, in a rollout, one answer for its arm).
    pub fn done(&self, series: &crate::metrics::VersionSeries, prompt: usize, completion: usize) {
        series.llm_done(self.started.elapsed(), prompt, completion);
        self.observe(false);
    }

    /// Time since the request arrived.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// An answer collected whole (non-streaming requests).
#[derive(Debug, Default)]
pub struct Collected {
    /// Its text.
    pub text: String,
    /// Why it ended.
    pub finish: Option<Finish>,
    /// Prompt and generated tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Log-probabilities of each token, when asked.
    pub logprobs: Vec<ferry_llm::Logprob>,
}

/// Receives a whole answer, recording its timing in `series`.
pub async fn collect(
    mut generation: ferry_llm::Generation,
    series: &crate::metrics::VersionSeries,
    clock: &mut Clock,
) -> Result<Collected, InferError> {
    let mut out = Collected::default();
    loop {
        match generation.events.recv().await {
            Some(Event::Token { text, logprob }) => {
                clock.token(series);
                out.text.push_str(&text);
                out.logprobs.extend(logprob);
            }
            Some(Event::Done {
                text,
                finish,
                prompt_tokens,
                completion_tokens,
            }) => {
                out.text.push_str(&text);
                out.finish = Some(finish);
                out.prompt_tokens = prompt_tokens;
                out.completion_tokens = completion_tokens;
                clock.done(series, prompt_tokens, completion_tokens);
                return Ok(out);
            }
            Some(Event::Failed(e)) => {
                clock.observe(true);
                return Err(InferError::new(ErrorKind::Internal, e));
            }
            None => {
                clock.observe(true);
                return Err(InferError::new(ErrorKind::Unavailable, "the model stopped"));
            }
        }
    }
}
