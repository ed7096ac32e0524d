//! Language models from GGUF files: llama.cpp decodes, the model's own chat template builds prompts, and one
//! engine thread per model runs every sequence in a continuous batch.
//!
//! # Brief overview
//! - [`Llm::load`]: the GGUF file (through llama.cpp, `llama-cpp-2`), its metadata ([`Info`]), its chat template
//!   ([`ChatTemplate`], Jinja through minijinja) and tokenizer (the GGUF's, or a `tokenizer.json` beside it), and
//!   the engine thread.
//! - [`Llm::generate`]: a prompt's tokens and [`Params`] in, a stream of [`Event`]s out. Refused at once when the
//!   prompt is longer than the context ([`LlmError::PromptTooLong`]) or the waiting queue is full
//!   ([`LlmError::Busy`]).
//! - The engine (`engine.rs`): sequences join and leave the running batch at every decoding step, prompts are
//!   processed in chunks between decoding steps, every admitted sequence has its KV cells reserved (prompt plus
//!   `max_tokens`) within the budget `max_total_tokens`, and a sequence whose receiver is gone is freed at the
//!   next step.
//!
//! This crate knows nothing of HTTP or protocols; it uses tokio's channels only as plain channels.

mod engine;
mod sampler;
mod stream;
mod template;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use engine::{Event, Finish, Generation, Logprob, Params, Stats};
pub use sampler::Sampling;
pub use template::{ChatTemplate, Message};

/// Why a model could not be loaded or a request not started.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// The GGUF file or its settings could not be loaded.
    #[error("language model: {0}")]
    Load(String),
    /// The chat template is missing or broken.
    #[error("chat template: {0}")]
    Template(String),
    /// The chat template refused the messages (its `raise_exception`).
    #[error("the messages are refused by the model's chat template: {0}")]
    BadMessages(String),
    /// The prompt does not fit the context.
    #[error(
        "the prompt has {prompt} tokens; this model's context length is {context} tokens{detail}"
    )]
    PromptTooLong {
        /// Prompt tokens.
        prompt: usize,
        /// The context length.
        context: usize,
        /// What else took room (`max_tokens`), or nothing.
        detail: String,
    },
    /// A parameter is out of range.
    #[error("{0}")]
    InvalidParams(String),
    /// Too many requests already wait.
    #[error("{waiting} requests are already waiting for this model; retry in about {retry_after_secs} s")]
    Busy {
        /// Requests waiting.
        waiting: usize,
        /// When a place is likely to be free: the waiting requests (and this one) at the rate sequences finished
        /// lately; 1 s before any has finished.
        retry_after_secs: u32,
    },
    /// The engine thread has stopped (the model is being unloaded).
    #[error("the model is shutting down")]
    Stopped,
}

/// Limits of one loaded model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The KV-cache budget in tokens, shared by all running sequences (llama.cpp's context size).
    pub max_total_tokens: u32,
    /// Sequences decoded together at most.
    pub max_sequences: u32,
    /// Requests that may wait for room; more get [`LlmError::Busy`].
    pub max_waiting: usize,
    /// The largest `max_tokens` a request may have (and the default when it gives none).
    pub max_new_tokens: u32,
    /// Prompt tokens processed per step, shared by the sequences being prefilled (decoding sequences go first).
    pub prefill_chunk: u32,
    /// llama.cpp's threads.
    pub threads: u32,
    /// The context length, when smaller than the model's own.
    pub context_length: Option<u32>,
    /// Keys and values cached in F32 instead of llama.cpp's F16 (twice the memory; logits equal to a float
    /// reference to 1e-5 instead of 1e-3).
    pub kv_cache_f32: bool,
}

impl Default for Settings {
    fn default() -> Settings {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        Settings {
            max_total_tokens: 16_384,
            max_sequences: 32,
            max_waiting: 256,
            max_new_tokens: 1024,
            prefill_chunk: 64,
            threads,
            context_length: None,
            kv_cache_f32: false,
        }
    }
}

/// What a model is, from its GGUF metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// `general.architecture` (`llama`, `qwen2`, ...).
    pub architecture: String,
    /// `general.name`, when present.
    pub name: Option<String>,
    /// Tokens a sequence may hold (prompt and answer): the model's trained context or the configured one,
    /// whichever is smaller, and never more than the KV budget.
    pub context_length: usize,
    /// The model's own trained context.
    pub trained_context_length: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Parameters.
    pub parameters: u64,
    /// Bytes of weights.
    pub size_bytes: u64,
    /// Where the tokenizer comes from: `gguf` or `tokenizer.json`.
    pub tokenizer: &'static str,
}

/// A loaded language model and its engine thread.
pub struct Llm {
    info: Info,
    template: Option<ChatTemplate>,
    tokenizer: Tokenizer,
    engine: engine::Handle,
    settings: Settings,
}

impl std::fmt::Debug for Llm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llm")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

enum Tokenizer {
    Gguf,
    Json(Box<tokenizers::Tokenizer>),
}

impl Llm {
    /// Loads `dir/model.gguf` (and `dir/tokenizer.json` when present) and starts its engine thread.
    pub fn load(dir: &Path, settings: Settings) -> Result<Llm, LlmError> {
        settings
            .check()
            .map_err(|e| LlmError::Load(e.to_string()))?;
        let path: PathBuf = dir.join("model.gguf");
        let tokenizer = match dir.join("tokenizer.json") {
            p if p.is_file() => Tokenizer::Json(Box::new(
                tokenizers::Tokenizer::from_file(&p)
                    .map_err(|e| LlmError::Load(format!("tokenizer.json: {e}")))?,
            )),
            _ => Tokenizer::Gguf,
        };
        let (engine, loaded) = engine::start(&path, &settings)?;
        let template = match loaded.chat_template {
            Some(src) => Some(ChatTemplate::new(
                &src,
                loaded.bos_text.clone(),
                loaded.eos_text.clone(),
            )?),
            None => None,
        };
        let trained = loaded.trained_context as usize;
        let mut context = trained.min(settings.max_total_tokens as usize);
        if let Some(c) = settings.context_length {
            context = context.min(c as usize);
        }
        let info = Info {
            architecture: loaded.architecture,
            name: loaded.name,
            context_length: context,
            trained_context_length: trained,
            vocab_size: loaded.vocab_size,
            parameters: loaded.parameters,
            size_bytes: loaded.size_bytes,
            tokenizer: match tokenizer {
                Tokenizer::Gguf => "gguf",
                Tokenizer::Json(_) => "tokenizer.json",
            },
        };
        engine.set_context(context);
        Ok(Llm {
            info,
            template,
            tokenizer,
            engine,
            settings,
        })
    }

    /// What the model is.
    pub fn info(&self) -> &Info {
        &self.info
    }

    /// The limits it was loaded with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Whether the model has a chat template (chat requests need one).
    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// The prompt for a conversation, through the model's chat template.
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<String, LlmError> {
        match &self.template {
            Some(t) => t.render(messages, true),
            None => Err(LlmError::Template(
                "this model has no chat template; use completions".into(),
            )),
        }
    }

    /// Token ids of `text`. `special`: the text is a rendered template, whose special tokens (`<|im_start|>`)
    /// are parsed as such; otherwise they are plain text. The model's BOS token is added when it asks for one.
    pub fn tokenize(&self, text: &str, special: bool) -> Result<Vec<u32>, LlmError> {
        match &self.tokenizer {
            Tokenizer::Gguf => Ok(self.engine.tokenize(text, special)),
            Tokenizer::Json(t) => t
                .encode_fast(text, true)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| LlmError::InvalidParams(format!("tokenizer: {e}"))),
        }
    }

    /// Starts generating from `prompt`.
    pub fn generate(&self, prompt: Vec<u32>, params: Params) -> Result<Generation, LlmError> {
        self.engine.submit(prompt, params, &self.settings)
    }

    /// Running and waiting sequences and KV use, now.
    pub fn stats(&self) -> Stats {
        self.engine.stats()
    }
}

impl Settings {
    /// Refuses values llama.cpp cannot take or this crate does not allow, naming the field.
    pub fn check(&self) -> Result<(), SettingsError> {
        let s = self;
        if s.max_total_tokens < 16 || s.max_total_tokens > 1 << 22 {
            return Err(SettingsError::MaxTotalTokens);
        }
        if s.max_sequences == 0 || s.max_sequences > 256 {
            return Err(SettingsError::MaxSequences);
        }
        if s.prefill_chunk < 16 || s.prefill_chunk > 8192 {
            return Err(SettingsError::PrefillChunk);
        }
        if s.threads == 0 || s.threads > 256 {
            return Err(SettingsError::Threads);
        }
        if s.max_new_tokens == 0 {
            return Err(SettingsError::MaxNewTokens);
        }
        if s.max_waiting == 0 {
            return Err(SettingsError::MaxWaiting);
        }
        Ok(())
    }
}

/// A [`Settings`] field out of its range; each message starts with the field's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// `max_total_tokens` outside 16..=4194304.
    #[error("max_total_tokens must be between 16 and 4194304")]
    MaxTotalTokens,
    /// `max_sequences` outside 1..=256.
    #[error("max_sequences must be between 1 and 256 (llama.cpp's limit)")]
    MaxSequences,
    /// `prefill_chunk` outside 16..=8192.
    #[error("prefill_chunk must be between 16 and 8192")]
    PrefillChunk,
    /// `threads` outside 1..=256.
    #[error("threads must be between 1 and 256")]
    Threads,
    /// `max_new_tokens` of 0.
    #[error("max_new_tokens must be at least 1")]
    MaxNewTokens,
    /// `max_waiting` of 0.
    #[error("max_waiting must be at least 1")]
    MaxWaiting,
}

/// Shared so the server can hold it beside its other engines.
pub type SharedLlm = Arc<Llm>;
