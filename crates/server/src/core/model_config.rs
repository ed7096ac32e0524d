//! A model's optional `config.toml`: which versions to serve, version labels, engine settings and
//! per-input/output shape overrides.
//!
//! ```toml
//! version_policy = { latest = 2 }     # or "all", or { specific = [1, 3] }
//! engine = "auto"                      # "auto" | "onnxruntime" | "tract"
//! graph_optimization_level = "all"     # "disable" | "basic" | "extended" | "all"
//! intra_op_threads = 1
//! instances = 2
//! prepack_weights = true               # re-laid weights: faster runs, a copy per instance (default: true, but
//!                                      # false for a model with external data, whose weights stay mapped, shared)
//! memory_arena = true                  # ONNX Runtime's arena: faster runs, keeps the largest run's tensors
//!                                      # (default: true for text models, whose batches are bounded in tokens)
//! max_batch_size = 32                  # dynamic batching: 0 (default) runs each request alone
//! max_queue_delay_us = 500             # how long the oldest request waits for others
//! preferred_batch_sizes = [8, 16]      # cut at once at these sizes
//! max_queue_size = 1024                # more waiting requests are refused with 429
//! drift_window = 2000                  # rows kept to compare with the training data (ferry.json)
//! drift_sample_every = 1               # sample one request in N for drift (0 turns drift off)
//! max_concurrent_requests = 64        # more at once are refused with 429 (default: only the queue bounds them)
//! max_batch_tokens = 16384             # text models: the most tokens in one batch (TEI's --max-batch-tokens)
//! [text]                             # text models: override what the folder's Hugging Face files say
//! max_length = 256                     # tokens of one text, special tokens included
//! truncation_side = "Right"            # or "Left": the side cut when a request asks to truncate
//! pooling = "mean"                     # "mean" | "cls" | "last_token" | "max"
//! normalize = true                     # L2-normalize embeddings unless the request says otherwise
//! prompts = { query = "query: " }      # named prompts put before texts (sentence-transformers' `prompts`)
//! default_prompt_name = "query"        # the prompt used when a request names none
//! [explain]                          # explanations
//! background = "reference.csv"         # the background sample's file in each version folder (default background.csv)
//! [llm]                              # language models (model.gguf): limits of generation
//! max_total_tokens = 16384             # the KV-cache budget in tokens, shared by running sequences
//! max_sequences = 32                   # sequences decoded together
//! max_waiting = 256                    # requests waiting for room; more are refused with 429
//! max_new_tokens = 1024                # the largest max_tokens a request may ask (and the default)
//! prefill_chunk = 64                   # prompt tokens processed per step, between decoding steps
//! context_length = 8192                # tokens per sequence (default: the model's, within the budget)
//! threads = 2                          # llama.cpp's threads (default: the machine's cores)
//! kv_cache = "f16"                     # or "f32": twice the memory, logits exact to a float reference
//! [shadow]                           # copy live requests to another version and compare its answers
//! version = 3
//! fraction = 1.0                       # the share of requests copied
//! [labels]
//! stable = 1
//! canary = 2
//! [inputs.features]
//! shape = [-1, 4]
//! ```

use std::collections::BTreeMap;

use ferry_engine::{EngineOptions, OptimizationLevel};
use serde::Deserialize;

/// Which of the versions on disk are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionPolicy {
    /// The `n` highest version numbers.
    Latest(usize),
    /// Every version.
    All,
    /// Exactly these versions.
    Specific(Vec<u64>),
}

impl VersionPolicy {
    /// The versions to serve among those present, highest first.
    pub fn select(&self, present: &[u64]) -> Vec<u64> {
        let mut sorted = present.to_vec();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        match self {
            VersionPolicy::Latest(n) => sorted.into_iter().take(*n).collect(),
            VersionPolicy::All => sorted,
            VersionPolicy::Specific(wanted) => {
                sorted.into_iter().filter(|v| wanted.contains(v)).collect()
            }
        }
    }
}

/// The engine a model runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// The best engine this build has for the model (ONNX Runtime).
    #[default]
    Auto,
    /// ONNX Runtime.
    OnnxRuntime,
    /// tract, the pure-Rust engine (only in builds with the `tract` feature).
    Tract,
}

/// A shape override for one input or output.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorOverride {
    /// The dimensions to use instead of the model's, `-1` for dynamic.
    pub shape: Vec<i64>,
}

/// The largest `max_batch_size` and `max_queue_size` a model may set (the default `--max-rows-per-request`).
pub const MAX_BATCH_OR_QUEUE: usize = 65_536;

/// The cores this process may use, which bound a model's threads and instances.
pub fn machine_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The parsed and checked `config.toml` of one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelConfig {
    /// Which versions are served.
    pub version_policy: VersionPolicy,
    /// Version labels (`stable = 3`).
    pub labels: BTreeMap<String, u64>,
    /// The engine.
    pub engine: EngineChoice,
    /// Engine options for this model.
    pub engine_options: EngineOptions,
    /// Input shape overrides by name.
    pub inputs: BTreeMap<String, TensorOverride>,
    /// Output shape overrides by name.
    pub outputs: BTreeMap<String, TensorOverride>,
    /// Dynamic batching and queue limits.
    pub batching: crate::core::batching::queue::Limits,
    /// Rows kept in the drift window.
    pub drift_window: usize,
    /// Sample one request in this many for drift (0: drift is off).
    pub drift_sample_every: u64,
    /// Shadow traffic, when on.
    pub shadow: Option<ShadowConfig>,
    /// Requests this model handles at once; more are refused with 429. `None`: no limit beyond its queue.
    pub max_concurrent_requests: Option<usize>,
    /// `[text]`: overrides of a text model's settings.
    pub text: ferry_text::Overrides,
    /// Whether `max_batch_size` was set (text models batch by default, tensor models do not).
    pub batch_size_given: bool,
    /// `[llm]`: a language model's limits.
    pub llm: LlmConfig,
    /// `[explain]`: where explanations take their background.
    pub explain: ExplainConfig,
}

/// `config.toml`'s `[explain]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplainConfig {
    /// The background file, a plain file name inside each version folder (default `background.csv`).
    pub background: Option<String>,
}

/// `config.toml`'s `[llm]` table: a language model's limits, each defaulting to [`ferry_llm::Settings`]'s.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmConfig {
    max_total_tokens: Option<u32>,
    max_sequences: Option<u32>,
    max_waiting: Option<usize>,
    max_new_tokens: Option<u32>,
    prefill_chunk: Option<u32>,
    context_length: Option<u32>,
    threads: Option<u32>,
    kv_cache: Option<KvCacheType>,
}

/// `[llm] kv_cache`: the element type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheType {
    /// llama.cpp's default.
    F16,
    /// Twice the memory, exact to a float reference.
    F32,
}

impl LlmConfig {
    /// The settings a language model loads with: these values over the defaults, bounded by this machine (at
    /// most twice its cores in threads).
    pub fn settings(&self) -> Result<ferry_llm::Settings, LlmConfigError> {
        let d = ferry_llm::Settings::default();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        let threads = self.threads.unwrap_or(d.threads);
        if threads == 0 || threads > 2 * cores {
            return Err(LlmConfigError::Threads {
                max: 2 * cores,
                got: threads,
            });
        }
        if let Some(0) = self.max_waiting {
            return Err(LlmConfigError::MaxWaitingZero);
        }
        if self.max_waiting.is_some_and(|n| n > 1 << 20) {
            return Err(LlmConfigError::MaxWaitingTooLarge);
        }
        if let Some(c) = self.context_length {
            if c < 16 {
                return Err(LlmConfigError::ContextLength(c));
            }
        }
        let settings = ferry_llm::Settings {
            max_total_tokens: self.max_total_tokens.unwrap_or(d.max_total_tokens),
            max_sequences: self.max_sequences.unwrap_or(d.max_sequences),
            max_waiting: self.max_waiting.unwrap_or(d.max_waiting),
            max_new_tokens: self.max_new_tokens.unwrap_or(d.max_new_tokens),
            prefill_chunk: self.prefill_chunk.unwrap_or(d.prefill_chunk),
            threads,
            context_length: self.context_length,
            kv_cache_f32: self.kv_cache == Some(KvCacheType::F32),
        };
        settings.check().map_err(LlmConfigError::Settings)?;
        Ok(settings)
    }
}

/// Why `config.toml`'s `[llm]` table is refused; each message starts with the key (`llm.threads`, ...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LlmConfigError {
    /// `llm.threads` of 0 or more than twice this machine's cores.
    #[error("llm.threads must be between 1 and {max} (twice this machine's cores), got {got}")]
    Threads {
        /// Twice this machine's cores.
        max: u32,
        /// The value given (or the default).
        got: u32,
    },
    /// `llm.max_waiting` of 0.
    #[error("llm.max_waiting must be at least 1")]
    MaxWaitingZero,
    /// `llm.max_waiting` above 1048576.
    #[error("llm.max_waiting must be at most 1048576")]
    MaxWaitingTooLarge,
    /// `llm.context_length` below 16.
    #[error("llm.context_length must be at least 16, got {0}")]
    ContextLength(u32),
    /// A value the language model crate refuses.
    #[error("llm.{0}")]
    Settings(#[source] ferry_llm::SettingsError),
}

/// Why `config.toml` is refused; each message names the offending key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Not TOML, or not the shape `config.toml` has: the parser's message and where (see [`ferry_repo::toml_error_position`]).
    #[error("{message}{at}")]
    Toml {
        /// The parser's message.
        message: String,
        /// " (line L, column C)", or "".
        at: String,
    },
    /// `version_policy` as a word other than "all".
    #[error(
        "version_policy: expected \"all\", {{ latest = N }} or {{ specific = [..] }}, got \"{0}\""
    )]
    PolicyWord(String),
    /// `version_policy.latest = 0`.
    #[error("version_policy.latest must be at least 1")]
    LatestZero,
    /// `version_policy.specific` empty or holding 0.
    #[error("version_policy.specific must list version numbers of 1 or more")]
    SpecificVersions,
    /// `version_policy` with both or neither of `latest` and `specific`.
    #[error("version_policy: give exactly one of `latest` or `specific`")]
    PolicyTable,
    /// An engine other than auto, onnxruntime or tract.
    #[error("engine: unknown engine `{0}` (expected auto, onnxruntime or tract)")]
    UnknownEngine(String),
    /// An unknown `graph_optimization_level`.
    #[error("graph_optimization_level: {0}")]
    Optimization(#[source] ferry_engine::UnknownOptimizationLevel),
    /// `intra_op_threads` of 0 or more than 4 x the cores.
    #[error("intra_op_threads must be between 1 and {} (4 x this machine's {cores} cores), got {got}", 4 * .cores)]
    IntraOpThreads {
        /// This machine's cores.
        cores: usize,
        /// The value given.
        got: usize,
    },
    /// `instances` of 0 or more than 4 x the cores.
    #[error("instances must be between 1 and {} (4 x this machine's {cores} cores), got {got}", 4 * .cores)]
    Instances {
        /// This machine's cores.
        cores: usize,
        /// The value given.
        got: usize,
    },
    /// More engine threads than 8 x the cores.
    #[error(
        "instances x intra_op_threads is {threads}; at most {} (8 x this machine's {cores} cores) engine threads \
         are allowed per model",
        8 * .cores
    )]
    EngineThreads {
        /// instances x intra_op_threads.
        threads: usize,
        /// This machine's cores.
        cores: usize,
    },
    /// A label naming version 0.
    #[error("labels.{0}: versions start at 1")]
    LabelVersion(String),
    /// `max_batch_size` above the limit.
    #[error("max_batch_size must be at most {MAX_BATCH_OR_QUEUE}, got {0}", MAX_BATCH_OR_QUEUE = MAX_BATCH_OR_QUEUE)]
    MaxBatchSize(usize),
    /// A preferred batch size of 0 or above `max_batch_size`.
    #[error("preferred_batch_sizes: {size} is not between 1 and max_batch_size ({max})")]
    PreferredBatchSize {
        /// The size given.
        size: usize,
        /// `max_batch_size`.
        max: usize,
    },
    /// `max_queue_size` of 0 or above the limit.
    #[error("max_queue_size must be between 1 and {MAX_BATCH_OR_QUEUE}, got {0}", MAX_BATCH_OR_QUEUE = MAX_BATCH_OR_QUEUE)]
    MaxQueueSize(usize),
    /// `max_batch_tokens` outside 1..=16777216.
    #[error("max_batch_tokens must be between 1 and 16777216, got {0}")]
    MaxBatchTokens(usize),
    /// `text.max_length` outside 1..=1048576.
    #[error("text.max_length must be between 1 and 1048576, got {0}")]
    TextMaxLength(usize),
    /// `drift_window` outside 1..=1000000.
    #[error("drift_window must be between 1 and 1000000 rows")]
    DriftWindow,
    /// `shadow.version = 0`.
    #[error("shadow.version: versions start at 1")]
    ShadowVersion,
    /// `explain.background` is not a plain file name.
    #[error("explain.background must be a file name inside the version folder (letters, digits, `-`, `_`, `.`), got `{}`", .0.escape_debug())]
    ExplainBackground(String),
    /// `shadow.fraction` outside 0..=1.
    #[error("shadow.fraction must be between 0 and 1")]
    ShadowFraction,
    /// `max_concurrent_requests` outside 1..=1048576.
    #[error("max_concurrent_requests must be between 1 and 1048576")]
    MaxConcurrentRequests,
    /// The `[llm]` table.
    #[error(transparent)]
    Llm(#[from] LlmConfigError),
}

/// How many texts a text model's batch holds when `config.toml` sets no `max_batch_size`.
pub const TEXT_BATCH_SIZE: usize = 64;

/// TEI's default `--max-batch-tokens`.
pub const DEFAULT_BATCH_TOKENS: usize = 16_384;

/// Shadow traffic: a copy of a share of live requests goes to another version, whose answers are compared with the
/// live ones and never returned.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowConfig {
    /// The version that receives the copies.
    pub version: u64,
    /// The share of requests copied, 0 to 1.
    #[serde(default = "one")]
    pub fraction: f64,
}

fn one() -> f64 {
    1.0
}

impl Eq for ShadowConfig {}

impl ModelConfig {
    /// Whether a version loaded under `self` must be loaded again under `other` (the engine, batching, shapes or
    /// drift settings differ); labels, version policy and shadow settings apply without reloading.
    pub fn needs_reload(&self, other: &ModelConfig) -> bool {
        self.engine != other.engine
            || self.engine_options != other.engine_options
            || self.inputs != other.inputs
            || self.outputs != other.outputs
            || self.batching != other.batching
            || self.drift_window != other.drift_window
            || self.drift_sample_every != other.drift_sample_every
            || self.text != other.text
            || self.llm != other.llm
            || self.explain != other.explain
    }

    /// The batching limits of a text model: as configured, but batching by default.
    pub fn text_batching(&self) -> crate::batching::queue::Limits {
        let mut limits = self.batching.clone();
        if !self.batch_size_given {
            limits.max_batch_size = TEXT_BATCH_SIZE;
        }
        limits
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    version_policy: Option<RawPolicy>,
    #[serde(default)]
    labels: BTreeMap<String, u64>,
    engine: Option<String>,
    graph_optimization_level: Option<String>,
    intra_op_threads: Option<usize>,
    instances: Option<usize>,
    prepack_weights: Option<bool>,
    memory_arena: Option<bool>,
    #[serde(default)]
    inputs: BTreeMap<String, TensorOverride>,
    #[serde(default)]
    outputs: BTreeMap<String, TensorOverride>,
    max_batch_size: Option<usize>,
    max_queue_delay_us: Option<u64>,
    #[serde(default)]
    preferred_batch_sizes: Vec<usize>,
    max_queue_size: Option<usize>,
    drift_window: Option<usize>,
    drift_sample_every: Option<u64>,
    shadow: Option<ShadowConfig>,
    max_concurrent_requests: Option<usize>,
    max_batch_tokens: Option<usize>,
    #[serde(default)]
    text: ferry_text::Overrides,
    #[serde(default)]
    llm: LlmConfig,
    #[serde(default)]
    explain: ExplainConfig,
}

/// The queue limits of a model without batching settings: no batching, at most 1024 waiting requests.
pub fn default_limits() -> crate::core::batching::queue::Limits {
    crate::core::batching::queue::Limits {
        max_batch_size: 1,
        max_queue_delay: std::time::Duration::from_micros(500),
        preferred_batch_sizes: Vec::new(),
        max_queue_size: 1024,
        max_batch_tokens: DEFAULT_BATCH_TOKENS,
    }
}

#[derive(Debug)]
enum RawPolicy {
    Word(String),
    Table(RawPolicyTable),
}

#[derive(Debug, Default)]
struct RawPolicyTable {
    latest: Option<usize>,
    specific: Option<Vec<u64>>,
}

/// The forms `version_policy` takes, for error messages.
const POLICY_FORMS: &str = "\"all\", { latest = N } or { specific = [..] }";

/// By hand rather than `untagged`, whose error names no key ("data did not match any variant").
impl<'de> Deserialize<'de> for RawPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Policy;
        impl<'de> serde::de::Visitor<'de> for Policy {
            type Value = RawPolicy;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "version_policy as {POLICY_FORMS}")
            }

            fn visit_str<E: serde::de::Error>(self, word: &str) -> Result<RawPolicy, E> {
                Ok(RawPolicy::Word(word.to_string()))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawPolicy, A::Error> {
                let mut table = RawPolicyTable::default();
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "latest" => table.latest = Some(map.next_value()?),
                        "specific" => table.specific = Some(map.next_value()?),
                        other => {
                            return Err(serde::de::Error::custom(format!(
                                "version_policy: unknown key `{other}` (expected {POLICY_FORMS})"
                            )))
                        }
                    }
                }
                Ok(RawPolicy::Table(table))
            }
        }
        deserializer.deserialize_any(Policy)
    }
}

impl ModelConfig {
    /// The configuration of a model without `config.toml`.
    pub fn defaults(engine: &EngineOptions) -> ModelConfig {
        ModelConfig {
            version_policy: VersionPolicy::Latest(1),
            labels: BTreeMap::new(),
            engine: EngineChoice::Auto,
            engine_options: engine.clone(),
            inputs: BTreeMap::new(),
            outputs: BTreeMap::new(),
            batching: default_limits(),
            drift_window: 2000,
            drift_sample_every: 1,
            shadow: None,
            max_concurrent_requests: None,
            text: ferry_text::Overrides::default(),
            batch_size_given: false,
            llm: LlmConfig::default(),
            explain: ExplainConfig::default(),
        }
    }

    /// Parses `config.toml` text; `engine` gives the server-wide defaults. Values beyond what this machine can run
    /// (threads and instances relative to its cores, batch and queue sizes) are refused, so a file can never make
    /// the engine start thousands of threads (ONNX Runtime crashed the process at `intra_op_threads = 100000`). Errors name the offending key.
    pub fn parse(text: &str, engine: &EngineOptions) -> Result<ModelConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Toml {
            message: e.message().to_string(),
            at: ferry_repo::toml_error_position(&e, text),
        })?;
        let version_policy = match raw.version_policy {
            None => VersionPolicy::Latest(1),
            Some(RawPolicy::Word(w)) if w == "all" => VersionPolicy::All,
            Some(RawPolicy::Word(w)) => return Err(ConfigError::PolicyWord(w)),
            Some(RawPolicy::Table(RawPolicyTable {
                latest: Some(0),
                specific: None,
            })) => return Err(ConfigError::LatestZero),
            Some(RawPolicy::Table(RawPolicyTable {
                latest: Some(n),
                specific: None,
            })) => VersionPolicy::Latest(n),
            Some(RawPolicy::Table(RawPolicyTable {
                latest: None,
                specific: Some(v),
            })) => {
                if v.is_empty() || v.contains(&0) {
                    return Err(ConfigError::SpecificVersions);
                }
                VersionPolicy::Specific(v)
            }
            Some(RawPolicy::Table(_)) => return Err(ConfigError::PolicyTable),
        };
        let engine_choice = match raw.engine.as_deref() {
            None | Some("auto") => EngineChoice::Auto,
            Some("onnxruntime") => EngineChoice::OnnxRuntime,
            Some("tract") => EngineChoice::Tract,
            Some(other) => return Err(ConfigError::UnknownEngine(other.to_string())),
        };
        let mut engine_options = engine.clone();
        if let Some(level) = raw.graph_optimization_level {
            engine_options.optimization = level
                .parse::<OptimizationLevel>()
                .map_err(ConfigError::Optimization)?;
        }
        let cores = machine_cores();
        if let Some(n) = raw.intra_op_threads {
            if n == 0 || n > 4 * cores {
                return Err(ConfigError::IntraOpThreads { cores, got: n });
            }
            engine_options.intra_op_threads = n;
        }
        if let Some(n) = raw.instances {
            if n == 0 || n > 4 * cores {
                return Err(ConfigError::Instances { cores, got: n });
            }
            engine_options.instances = n;
        }
        if let Some(prepack) = raw.prepack_weights {
            engine_options.prepack_weights = Some(prepack);
        }
        if let Some(arena) = raw.memory_arena {
            engine_options.memory_arena = Some(arena);
        }
        let threads = engine_options
            .instances
            .saturating_mul(engine_options.intra_op_threads.max(1));
        if threads > 8 * cores {
            return Err(ConfigError::EngineThreads { threads, cores });
        }
        for (label, version) in &raw.labels {
            if *version == 0 {
                return Err(ConfigError::LabelVersion(label.clone()));
            }
        }
        let mut batching = default_limits();
        if let Some(n) = raw.max_batch_size {
            if n > MAX_BATCH_OR_QUEUE {
                return Err(ConfigError::MaxBatchSize(n));
            }
            // 0 (Triton's spelling) and 1 both mean every request runs alone.
            batching.max_batch_size = n.max(1);
        }
        if let Some(us) = raw.max_queue_delay_us {
            batching.max_queue_delay = std::time::Duration::from_micros(us);
        }
        if let Some(bad) = raw
            .preferred_batch_sizes
            .iter()
            .find(|p| **p == 0 || **p > batching.max_batch_size)
        {
            return Err(ConfigError::PreferredBatchSize {
                size: *bad,
                max: batching.max_batch_size,
            });
        }
        batching.preferred_batch_sizes = raw.preferred_batch_sizes;
        if let Some(n) = raw.max_queue_size {
            if n == 0 || n > MAX_BATCH_OR_QUEUE {
                return Err(ConfigError::MaxQueueSize(n));
            }
            batching.max_queue_size = n;
        }
        if let Some(n) = raw.max_batch_tokens {
            if !(1..=1 << 24).contains(&n) {
                return Err(ConfigError::MaxBatchTokens(n));
            }
            batching.max_batch_tokens = n;
        }
        if let Some(n) = raw.text.max_length {
            if !(1..=1 << 20).contains(&n) {
                return Err(ConfigError::TextMaxLength(n));
            }
        }
        let drift_window = raw.drift_window.unwrap_or(2000);
        if drift_window == 0 || drift_window > 1_000_000 {
            return Err(ConfigError::DriftWindow);
        }
        // 0 turns drift off for the model.
        let drift_sample_every = raw.drift_sample_every.unwrap_or(1);
        if let Some(shadow) = &raw.shadow {
            if shadow.version == 0 {
                return Err(ConfigError::ShadowVersion);
            }
            if !(0.0..=1.0).contains(&shadow.fraction) {
                return Err(ConfigError::ShadowFraction);
            }
        }
        if let Some(n) = raw.max_concurrent_requests {
            if !(1..=1 << 20).contains(&n) {
                return Err(ConfigError::MaxConcurrentRequests);
            }
        }
        raw.llm.settings()?;
        if let Some(name) = &raw.explain.background {
            // A file of the version folder: a plain name, so it can never lead outside it.
            if ferry_repo::validate_name(name).is_err() {
                return Err(ConfigError::ExplainBackground(name.clone()));
            }
        }
        Ok(ModelConfig {
            explain: raw.explain,
            llm: raw.llm,
            batch_size_given: raw.max_batch_size.is_some(),
            text: raw.text,
            max_concurrent_requests: raw.max_concurrent_requests,
            shadow: raw.shadow,
            batching,
            drift_window,
            drift_sample_every,
            version_policy,
            labels: raw.labels,
            engine: engine_choice,
            engine_options,
            inputs: raw.inputs,
            outputs: raw.outputs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelConfig, ConfigError> {
        ModelConfig::parse(text, &EngineOptions::default())
    }

    #[test]
    fn the_explain_background_is_a_file_of_the_version_folder() {
        let c = parse("[explain]\nbackground = \"reference.csv\"\n").unwrap();
        assert_eq!(c.explain.background.as_deref(), Some("reference.csv"));
        for bad in ["../../etc/passwd", "/etc/passwd", "a/b.csv", ".hidden"] {
            let e = parse(&format!("[explain]\nbackground = \"{bad}\"\n")).unwrap_err();
            assert!(
                e.to_string().starts_with("explain.background must be"),
                "{bad}: {e}"
            );
        }
        assert!(parse("[explain]\nbackgrond = \"x.csv\"\n").is_err());
    }

    #[test]
    fn computed_limits_read_as_before() {
        assert_eq!(
            ConfigError::IntraOpThreads { cores: 2, got: 9 }.to_string(),
            "intra_op_threads must be between 1 and 8 (4 x this machine's 2 cores), got 9"
        );
        assert_eq!(
            ConfigError::EngineThreads {
                threads: 20,
                cores: 2
            }
            .to_string(),
            "instances x intra_op_threads is 20; at most 16 (8 x this machine's 2 cores) engine threads are allowed per model"
        );
        assert_eq!(
            ConfigError::PolicyWord("newest".into()).to_string(),
            "version_policy: expected \"all\", { latest = N } or { specific = [..] }, got \"newest\""
        );
        assert_eq!(
            ConfigError::MaxQueueSize(0).to_string(),
            "max_queue_size must be between 1 and 65536, got 0"
        );
        assert_eq!(
            ConfigError::from(LlmConfigError::Settings(
                ferry_llm::SettingsError::MaxWaiting
            ))
            .to_string(),
            "llm.max_waiting must be at least 1"
        );
    }

    #[test]
    fn thread_instance_batch_and_queue_values_are_bounded_by_the_machine() {
        let cores = machine_cores();
        for (text, key) in [
            (
                "intra_op_threads = 100000".to_string(),
                "intra_op_threads must be between 1 and",
            ),
            (
                format!("instances = {}", 4 * cores + 1),
                "instances must be between 1 and",
            ),
            (
                format!(
                    "intra_op_threads = {}\ninstances = {}",
                    4 * cores,
                    4 * cores
                ),
                "instances x intra_op_threads is",
            ),
            (
                "max_batch_size = 1000000".to_string(),
                "max_batch_size must be at most 65536",
            ),
            (
                "max_queue_size = 100000000".to_string(),
                "max_queue_size must be between 1 and 65536",
            ),
        ] {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.starts_with(key), "{text}: {e}");
        }
        let fine = parse(&format!("intra_op_threads = {cores}\ninstances = 2")).unwrap();
        assert_eq!(fine.engine_options.intra_op_threads, cores);
    }

    #[test]
    fn policies() {
        assert_eq!(parse("").unwrap().version_policy, VersionPolicy::Latest(1));
        assert_eq!(
            parse("version_policy = \"all\"").unwrap().version_policy,
            VersionPolicy::All
        );
        assert_eq!(
            parse("version_policy = { latest = 2 }")
                .unwrap()
                .version_policy,
            VersionPolicy::Latest(2)
        );
        assert_eq!(
            parse("version_policy = { specific = [1, 3] }")
                .unwrap()
                .version_policy,
            VersionPolicy::Specific(vec![1, 3])
        );
        assert_eq!(VersionPolicy::Latest(2).select(&[1, 5, 3]), vec![5, 3]);
        assert_eq!(
            VersionPolicy::Specific(vec![1, 9]).select(&[1, 5, 3]),
            vec![1]
        );
        assert_eq!(VersionPolicy::All.select(&[1, 5, 3]), vec![5, 3, 1]);
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("instancs = 2").unwrap_err().to_string();
        assert!(e.contains("instancs"), "{e}");
        let e = parse("version_policy = \"newest\"")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("version_policy"), "{e}");
        let e = parse("graph_optimization_level = \"max\"")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("graph_optimization_level"), "{e}");
        let e = parse("[labels]\nstable = \"x\"").unwrap_err().to_string();
        assert!(e.contains("(line 2, column 10)"), "{e}");
        // A key at the start of a line is on that line, not the one before.
        let e = parse("version_policy = \"all\"\ninstancs = 2")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("instancs") && e.ends_with("(line 2, column 1)"),
            "{e}"
        );
        let e = parse("engine = \"auto\"\n\nmax_batch_size = [\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("(line 3, column "), "{e}");
        let e = parse("engine = \"tensorrt\"").unwrap_err().to_string();
        assert!(e.starts_with("engine"), "{e}");
    }

    #[test]
    fn a_misspelt_policy_names_its_key_the_forms_and_the_line() {
        let e = parse("engine = \"auto\"\nversion_policy = { lastest = 1 }")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown key `lastest`")
                && e.contains("\"all\", { latest = N } or { specific = [..] }")
                && e.contains("line 2,"),
            "{e}"
        );
        let e = parse("version_policy = 3").unwrap_err().to_string();
        assert!(e.contains("{ latest = N }") && e.contains("line 1,"), "{e}");
        let e = parse("version_policy = { latest = 2, specific = [1] }")
            .unwrap_err()
            .to_string();
        assert!(e.contains("exactly one"), "{e}");
    }

    #[test]
    fn batching_settings() {
        let c = parse("max_batch_size = 16\nmax_queue_delay_us = 250\npreferred_batch_sizes = [4, 8]\nmax_queue_size = 64\n").unwrap();
        assert_eq!(c.batching.max_batch_size, 16);
        assert_eq!(
            c.batching.max_queue_delay,
            std::time::Duration::from_micros(250)
        );
        assert_eq!(c.batching.preferred_batch_sizes, vec![4, 8]);
        assert_eq!(c.batching.max_queue_size, 64);
        assert_eq!(
            parse("max_batch_size = 0").unwrap().batching.max_batch_size,
            1
        );
        assert!(parse("max_batch_size = 4\npreferred_batch_sizes = [8]")
            .unwrap_err()
            .to_string()
            .starts_with("preferred_batch_sizes"));
        assert!(parse("max_queue_size = 0")
            .unwrap_err()
            .to_string()
            .starts_with("max_queue_size"));
    }

    #[test]
    fn overrides_and_labels() {
        let c =
            parse("instances = 3\n[labels]\nstable = 2\n[inputs.x]\nshape = [-1, 4]\n").unwrap();
        assert_eq!(c.engine_options.instances, 3);
        assert_eq!(c.engine_options.prepack_weights, None);
        assert_eq!(c.labels["stable"], 2);
        assert_eq!(c.inputs["x"].shape, vec![-1, 4]);
        let c = parse("prepack_weights = false\n").unwrap();
        assert_eq!(c.engine_options.prepack_weights, Some(false));
        assert_eq!(c.engine_options.memory_arena, None);
        let c = parse("memory_arena = true\n").unwrap();
        assert_eq!(c.engine_options.memory_arena, Some(true));
    }
}
