//! The model repository on disk and the table of loaded versions.
//!
//! Layout (the one TF Serving and Triton users know): `<root>/<model>/<version>/model.onnx`, versions are
//! positive integers, an optional `<root>/<model>/config.toml` ([`ModelConfig`]) and an optional
//! `<root>/<model>/<version>/ferry.json` (feature names and class labels, written by `ferry train`).
//!
//! [`ModelStore`] owns the state of every version (LOADING, READY, UNAVAILABLE with its reason, UNLOADING).
//! Its lock is held only to read or swap entries, never across loading or inference.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use parking_lot::RwLock;

use ferry_engine::{Backend, EngineError, EngineOptions, OrtEngine};
use ferry_model::Signature;

use crate::model_config::{EngineChoice, ModelConfig};

/// The state of one model version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionState {
    /// Being prepared by the engine.
    Loading,
    /// Serving requests.
    Ready,
    /// Could not be loaded; the reason says why.
    Unavailable(String),
    /// Being taken out of service.
    Unloading,
}

impl VersionState {
    /// The upper-case name used by both APIs' status responses.
    pub fn name(&self) -> &'static str {
        match self {
            VersionState::Loading => "LOADING",
            VersionState::Ready => "READY",
            VersionState::Unavailable(_) => "UNAVAILABLE",
            VersionState::Unloading => "UNLOADING",
        }
    }
}

/// What `ferry.json` beside a model says about it (only the parts serving uses).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelMeta {
    /// Feature names, in the column order of the model's single input.
    pub features: Option<Vec<String>>,
    /// Class labels, in the column order of the probabilities output.
    pub classes: Option<Vec<String>>,
    /// Per-feature training histograms (`feature_stats`), the baseline for drift.
    pub baseline: Option<Vec<crate::drift::FeatureBaseline>>,
    /// The distribution of the model's predictions on its training rows (`prediction_stats`), the baseline for
    /// prediction drift.
    pub predictions: Option<Vec<crate::drift::PredictionBaseline>>,
    /// The sha256 `model.onnx` must have (`model_sha256`), checked before it loads.
    pub sha256: Option<String>,
}

/// A version that is ready: its engine backend and what it takes and gives.
pub struct LoadedVersion {
    /// The model name.
    pub model: String,
    /// The version number.
    pub version: u64,
    /// The signature clients see, after `config.toml` overrides: the graph's, or for a text model the text
    /// signature ([`crate::text::signature`]: raw text in, embeddings or scores out).
    pub signature: Signature,
    /// The graph's own signature after overrides, which tensor requests are checked against (equal to `signature`
    /// for models that are not text models; a text model also takes its tokenized tensors directly).
    pub tensor_signature: Signature,
    /// Feature names and class labels, when known.
    pub meta: ModelMeta,
    /// The prepared model.
    pub backend: Arc<dyn Backend>,
    /// Its queue and batcher; every request goes through it.
    pub scheduler: crate::batching::Scheduler,
    /// Its drift windows, when `ferry.json` has a training baseline that fits its single input or its outputs.
    pub drift: Option<crate::drift::Drift>,
    /// Its tokenizer and settings, for a text model (a `tokenizer.json` in the version folder).
    pub text: Option<Arc<ferry_text::TextModel>>,
    /// The language model, for a version with a `model.gguf` ([`crate::llm`]).
    pub llm: Option<Arc<ferry_llm::Llm>>,
    /// How its predictions are explained, for a model of one numeric `[rows, features]` input
    /// ([`crate::explain`]).
    pub explainer: Option<Arc<crate::explain::Explainer>>,
}

impl std::fmt::Debug for LoadedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedVersion")
            .field("model", &self.model)
            .field("version", &self.version)
            .finish()
    }
}

/// One version's slot in the table.
#[derive(Debug, Clone)]
pub struct VersionSlot {
    /// Its state.
    pub state: VersionState,
    /// The loaded version, when READY.
    pub loaded: Option<Arc<LoadedVersion>>,
}

/// One model's entry in the table.
#[derive(Debug, Clone)]
pub struct ModelRecord {
    /// The model's configuration (defaults when it has no `config.toml`, or when that file is broken).
    pub config: Arc<ModelConfig>,
    /// Its versions by number.
    pub versions: BTreeMap<u64, VersionSlot>,
    /// Version labels set through the management API; they take precedence over `config.toml`'s.
    pub api_labels: BTreeMap<String, u64>,
    /// The canary rollout this replica applies, when `rollout.json` has one.
    pub rollout: Option<Arc<crate::rollout::Live>>,
    /// Permits for the model's concurrent requests, when `max_concurrent_requests` is set.
    pub permits: Option<Arc<tokio::sync::Semaphore>>,
    /// A version loaded only as a shadow target: unversioned requests never resolve to it.
    pub shadow_only: Option<u64>,
    /// What is wrong with the model folder's layout, when the scan found no version to load.
    pub layout: Option<String>,
}

impl ModelRecord {
    /// A record with no versions yet.
    pub fn new(config: Arc<ModelConfig>) -> ModelRecord {
        ModelRecord {
            permits: config
                .max_concurrent_requests
                .map(|n| Arc::new(tokio::sync::Semaphore::new(n))),
            config,
            versions: BTreeMap::new(),
            api_labels: BTreeMap::new(),
            rollout: None,
            shadow_only: None,
            layout: None,
        }
    }

    /// The version a label points at (management API labels first, then `config.toml`'s).
    pub fn label(&self, label: &str) -> Option<u64> {
        self.api_labels
            .get(label)
            .or_else(|| self.config.labels.get(label))
            .copied()
    }

    /// Every label and its version.
    pub fn labels(&self) -> BTreeMap<String, u64> {
        let mut all = self.config.labels.clone();
        all.extend(self.api_labels.iter().map(|(k, v)| (k.clone(), *v)));
        all
    }
}

/// The table of models and their versions, shared by every front door.
#[derive(Debug, Default)]
pub struct ModelStore {
    models: RwLock<BTreeMap<String, ModelRecord>>,
}

impl ModelStore {
    /// A snapshot of one model's record.
    pub fn model(&self, name: &str) -> Option<ModelRecord> {
        self.models.read().get(name).cloned()
    }

    /// Runs `f` on one model's record under the read lock, without copying it.
    pub fn with_model<R>(&self, name: &str, f: impl FnOnce(&ModelRecord) -> R) -> Option<R> {
        self.models.read().get(name).map(f)
    }

    /// Whether the repository has a model of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.models.read().contains_key(name)
    }

    /// The names of all models.
    pub fn model_names(&self) -> Vec<String> {
        self.models.read().keys().cloned().collect()
    }

    /// Changes one model's record under the write lock.
    pub fn update<R>(&self, name: &str, f: impl FnOnce(&mut ModelRecord) -> R) -> Option<R> {
        self.models.write().get_mut(name).map(f)
    }

    /// Adds a model (with no versions) unless it is there.
    pub(crate) fn ensure_model(&self, name: &str, config: Arc<ModelConfig>) {
        self.models
            .write()
            .entry(name.to_string())
            .or_insert_with(|| ModelRecord::new(config));
    }

    /// Removes a model from the table.
    pub(crate) fn remove_model(&self, name: &str) {
        self.models.write().remove(name);
    }

    pub(crate) fn set_version(&self, name: &str, version: u64, slot: VersionSlot) {
        match &slot.state {
            VersionState::Unavailable(reason) => {
                tracing::warn!(model = name, version, state = slot.state.name(), %reason, "model version state changed")
            }
            state => tracing::info!(
                model = name,
                version,
                state = state.name(),
                "model version state changed"
            ),
        }
        let mut models = self.models.write();
        if let Some(record) = models.get_mut(name) {
            record.versions.insert(version, slot);
        }
    }

    /// Answers every request queued on any version with 503 "server shutting down" (when the shutdown grace period
    /// ran out); returns how many there were.
    pub fn cut_queues(&self) -> usize {
        let loaded: Vec<Arc<LoadedVersion>> = self
            .models
            .read()
            .values()
            .flat_map(|r| r.versions.values().filter_map(|s| s.loaded.clone()))
            .collect();
        loaded.iter().map(|l| l.scheduler.cut()).sum()
    }

    /// Marks every ready version as unloading (during shutdown), so status reports tell the truth.
    pub fn mark_all_unloading(&self) {
        let mut models = self.models.write();
        for record in models.values_mut() {
            for slot in record.versions.values_mut() {
                if slot.state == VersionState::Ready {
                    slot.state = VersionState::Unloading;
                }
            }
        }
    }
}

pub use ferry_repo::{parse_version, validate_name};

/// Starts a prepared version's scheduler and drift window: from here on it can take requests.
pub(crate) fn activate(
    name: &str,
    version: u64,
    parts: Prepared,
    config: &ModelConfig,
    metrics: &Arc<crate::metrics::Metrics>,
) -> LoadedVersion {
    let (text, runner) = match parts.text {
        Some((model, runner)) => (Some(model), Some(runner)),
        None => (None, None),
    };
    let (limits, instances) = if runner.is_some() {
        (config.text_batching(), config.engine_options.instances)
    } else if let Some(llm) = &parts.llm {
        // KServe and TF Serving requests to a language model: each scheduler thread waits on whole answers while
        // the engine batches every sequence, so a few threads, each taking what has queued, keep it fed.
        let mut limits = config.batching.clone();
        if !config.batch_size_given {
            limits.max_batch_size = llm.settings().max_sequences as usize;
            limits.max_queue_delay = std::time::Duration::ZERO;
        }
        (limits, config.engine_options.instances.max(4))
    } else {
        (config.batching.clone(), config.engine_options.instances)
    };
    let scheduler = crate::batching::Scheduler::start(
        parts.backend.clone(),
        &parts.signature,
        limits,
        instances,
        (name.to_string(), version),
        metrics.clone(),
        runner,
    );
    if let Some(llm) = &parts.llm {
        scheduler.series().set_llm(llm);
    }
    let drift = drift_window(&parts.signature, &parts.meta, config);
    LoadedVersion {
        model: name.to_string(),
        version,
        signature: match &text {
            Some(t) => crate::text::signature(t.settings(), &parts.signature),
            None => parts.signature.clone(),
        },
        tensor_signature: parts.signature,
        meta: parts.meta,
        backend: parts.backend,
        scheduler,
        drift,
        text,
        llm: parts.llm,
        explainer: parts.explainer,
    }
}

/// Why a version did not load. Its text is the reason shown in the version's UNAVAILABLE state (it reaches
/// clients: files are named relative to the version, never by where the repository lives).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The version's files could not be fetched from the repository.
    #[error(transparent)]
    Fetch(#[from] crate::source::SourceError),
    /// Loading panicked.
    #[error("loading panicked: {0}")]
    Panicked(#[source] tokio::task::JoinError),
    /// A Hugging Face checkpoint that could not be turned into ONNX.
    #[error("importing the Hugging Face checkpoint: {0}")]
    Import(#[source] ferry_model::hf::HfError),
    /// A size limit, a signature or a file read refused the version.
    #[error(transparent)]
    Integrity(#[from] crate::integrity::IntegrityError),
    /// `model.onnx` names external data outside the version, or keeps it where the engine cannot read it.
    #[error(transparent)]
    External(#[from] ferry_model::external::ExternalDataError),
    /// `ferry.json` cannot be read or is malformed.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// `model.onnx` whose sha256 is not the one `ferry.json` records.
    #[error(
        "model.onnx does not match its checksum: sha256 is {actual}, ferry.json says {expected}"
    )]
    Checksum {
        /// The file's sha256.
        actual: String,
        /// What `ferry.json` says.
        expected: String,
    },
    /// The engine refused the model.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// ONNX Runtime is needed but did not load.
    #[error("ONNX Runtime is not available: {0}")]
    NoOnnxRuntime(#[source] EngineError),
    /// `engine = "tract"` in a build without it.
    #[error("engine = \"tract\" needs a build with the `tract` feature; this build has ONNX Runtime only")]
    NoTract,
    /// `config.toml` overrides a tensor the model does not have.
    #[error("config.toml: {what}.{tensor}: the model has no such {}", &.what[..what.len() - 1])]
    NoSuchTensor {
        /// `inputs` or `outputs`.
        what: &'static str,
        /// The tensor named.
        tensor: String,
    },
    /// `config.toml` overrides a tensor's shape with one the model cannot take.
    #[error("config.toml: {what}.{tensor}.shape {shape:?}: {why}")]
    BadShape {
        /// `inputs` or `outputs`.
        what: &'static str,
        /// The tensor.
        tensor: String,
        /// The shape given.
        shape: Vec<i64>,
        /// Why it is refused.
        why: ShapeError,
    },
    /// A text model's tokenizer or settings.
    #[error(transparent)]
    Text(#[from] ferry_text::TextError),
    /// A text model's graph without `input_ids`.
    #[error("a text model's graph must take `input_ids`")]
    NoInputIds,
    /// A text model's graph with an input a tokenizer does not make.
    #[error("a text model's graph takes input_ids, attention_mask and token_type_ids, not `{0}`")]
    TextInput(String),
    /// A graph without outputs.
    #[error("the model has no outputs")]
    NoOutputs,
    /// A recorded warm-up request failed.
    #[error(transparent)]
    Warmup(#[from] crate::warmup::WarmupError),
    /// `model.gguf` cannot be read.
    #[error("cannot read {}: {source}", .path.display())]
    Gguf {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `model.gguf` over `--max-model-bytes`.
    #[error("model.gguf is {size} bytes, more than --max-model-bytes allows ({max})")]
    GgufTooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The language model did not load or warm up.
    #[error(transparent)]
    Llm(#[from] crate::llm::LlmLoadError),
}

/// Why a `config.toml` shape override does not fit the model's tensor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    /// A dimension below -1.
    #[error("dimensions are sizes or -1")]
    Dimension,
    /// Another rank than the model's.
    #[error("the model's rank is {0}")]
    Rank(usize),
    /// A size where the model fixes another.
    #[error("the model fixes a dimension at {0}")]
    Fixed(i64),
}

/// Why a version's `ferry.json` is refused.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The file exists but cannot be read.
    #[error("cannot read ferry.json: {0}")]
    Read(#[source] std::io::Error),
    /// Not JSON.
    #[error("ferry.json: {0}")]
    Json(#[source] serde_json::Error),
    /// A key that must hold a list.
    #[error("ferry.json: `{0}` must be a list")]
    NotAList(String),
    /// `model_sha256` that is not a string.
    #[error("ferry.json: `model_sha256` must be a hex string")]
    Sha256,
}

/// What loading a version produces before its scheduler starts.
pub(crate) struct Prepared {
    signature: Signature,
    meta: ModelMeta,
    backend: Arc<dyn Backend>,
    text: Option<(Arc<ferry_text::TextModel>, crate::batching::text::Runner)>,
    llm: Option<Arc<ferry_llm::Llm>>,
    explainer: Option<Arc<crate::explain::Explainer>>,
}

/// Loads a text model's tokenizer and settings and works out how its graph is fed: `input_ids` and, when the graph
/// takes them, `attention_mask` and `token_type_ids` (no other input); the output read is the pooled
/// `sentence_embedding` or the token vectors (`last_hidden_state`, `token_embeddings`) of an embedding model, a
/// classifier's `logits`, or else the first output.
fn text_model(
    dir: &Path,
    signature: &Signature,
    config: &ModelConfig,
) -> Result<(Arc<ferry_text::TextModel>, crate::batching::text::Runner), LoadError> {
    let model = ferry_text::TextModel::load(dir, &config.text)?;
    let settings = model.settings();
    let has = |n: &str| signature.input(n).is_some();
    if !has("input_ids") {
        return Err(LoadError::NoInputIds);
    }
    if let Some(other) = signature.inputs.iter().find(|i| {
        !matches!(
            i.name.as_str(),
            "input_ids" | "attention_mask" | "token_type_ids"
        )
    }) {
        return Err(LoadError::TextInput(other.name.clone()));
    }
    let wanted: &[&str] = match settings.task {
        ferry_text::Task::Embedding => &[
            "sentence_embedding",
            "last_hidden_state",
            "token_embeddings",
        ],
        ferry_text::Task::Classifier | ferry_text::Task::Reranker => &["logits"],
    };
    let output = wanted
        .iter()
        .find(|w| signature.output(w).is_some())
        .map(|w| w.to_string())
        .or_else(|| signature.outputs.first().map(|o| o.name.clone()))
        .ok_or(LoadError::NoOutputs)?;
    let runner = crate::batching::text::Runner {
        input_ids: "input_ids".into(),
        attention_mask: has("attention_mask").then(|| "attention_mask".into()),
        token_type_ids: has("token_type_ids").then(|| "token_type_ids".into()),
        output,
        pooling: (settings.task == ferry_text::Task::Embedding).then_some(settings.pooling),
        token_output: ["token_embeddings", "last_hidden_state"]
            .into_iter()
            .filter(|_| settings.task == ferry_text::Task::Embedding)
            .find_map(|w| match signature.output(w)?.shape.as_deref()? {
                [_, _, width] => Some((w.to_string(), usize::try_from(*width).ok()?)),
                _ => None,
            }),
        pad_id: settings.pad_id,
    };
    tracing::info!(
        task = settings.task.name(),
        max_length = settings.max_length,
        pooling = settings.pooling.name(),
        normalize = settings.normalize,
        output = %runner.output,
        "text model"
    );
    Ok((Arc::new(model), runner))
}

/// Prepares one version of `model`: reads it (refusing a `model.onnx` and its external data files over the size
/// limit before reading them), verifies its signature when keys are trusted (which covers the external data
/// files too), checks `model.onnx` against the sha256 in its `ferry.json`, loads it into its engine and warms it
/// up. Every check of `model.onnx` runs on the bytes the engine then loads; external data files are hashed
/// streaming from disk and then mapped by the engine from the same paths. The error is the reason shown in its
/// UNAVAILABLE state.
pub(crate) fn prepare(
    dir: &Path,
    (model, version): (&str, u64),
    config: &ModelConfig,
    onnxruntime: &Result<OrtEngine, EngineError>,
    integrity: &crate::integrity::IntegrityPolicy,
) -> Result<Prepared, LoadError> {
    if crate::llm::present(dir) {
        return prepare_llm(dir, (model, version), config, integrity);
    }
    let onnx = dir.join("model.onnx");
    let bytes = if !onnx.exists() && ferry_model::hf::is_checkpoint(|f| dir.join(f).is_file()) {
        // A Hugging Face checkpoint as the hub ships it: turned into ONNX here, in memory (its files are what the
        // signature covers).
        let started = std::time::Instant::now();
        let limit = integrity
            .max_model_bytes
            .min(ferry_model::hf::MAX_INLINE_WEIGHT_BYTES);
        let imported = ferry_model::hf::import_with_limit(dir, limit).map_err(LoadError::Import)?;
        tracing::info!(
            model,
            version,
            seconds = started.elapsed().as_secs_f64(),
            bytes = imported.onnx.len(),
            "imported a Hugging Face checkpoint"
        );
        imported.onnx
    } else {
        crate::integrity::read_model(&onnx, integrity.max_model_bytes)?
    };
    // Before anything else reads the data files (the signature hashes them): their locations must stay inside the
    // version directory and their sizes within the limit.
    let external = ferry_model::external::external_files(&bytes, Some(dir))?;
    crate::integrity::check_external_sizes(
        dir,
        bytes.len() as u64,
        &external,
        integrity.max_model_bytes,
    )?;
    let meta_bytes = read_meta_bytes(dir)?;
    let model_sha = std::cell::OnceCell::new();
    let model_sha = || model_sha.get_or_init(|| sha256_hex(&bytes)).clone();
    verify_signature(dir, (model, version), integrity, &|path| match path {
        "model.onnx" => Some(model_sha()),
        "ferry.json" => meta_bytes.as_deref().map(sha256_hex),
        _ => None,
    })?;
    let meta = parse_meta(meta_bytes.as_deref())?;
    if let Some(expected) = &meta.sha256 {
        let actual = model_sha();
        if !actual.eq_ignore_ascii_case(expected) {
            return Err(LoadError::Checksum {
                actual,
                expected: expected.clone(),
            });
        }
    }
    // A text model keeps ONNX Runtime's arena unless config.toml says otherwise: its batches are bounded in tokens,
    // and without the arena every activation is mapped and unmapped (bench/text_embeddings.py).
    let mut options = config.engine_options.clone();
    if options.memory_arena.is_none() && ferry_text::TextModel::present(dir) {
        options.memory_arena = Some(true);
    }
    let options = &options;
    // An engine loading from memory resolves external data against the folder it is given (never the working
    // directory); tract loads self-contained models only, and says so.
    let folder = (!external.is_empty()).then_some(dir);
    let backend: Arc<dyn Backend> = match (config.engine, onnxruntime) {
        (EngineChoice::Tract, _) => tract_backend(&bytes, dir, options)?,
        (EngineChoice::OnnxRuntime | EngineChoice::Auto, Ok(ort)) => {
            Arc::new(ort.load_with_external_data(&bytes, folder, options)?)
        }
        // Without ONNX Runtime, `auto` falls back to tract in builds that have it.
        (EngineChoice::Auto, Err(_)) if cfg!(feature = "tract") => {
            tract_backend(&bytes, dir, options)?
        }
        (_, Err(e)) => return Err(LoadError::NoOnnxRuntime(e.clone())),
    };
    let mut signature = backend.signature().clone();
    for (overrides, specs, what) in [
        (&config.inputs, &mut signature.inputs, "inputs"),
        (&config.outputs, &mut signature.outputs, "outputs"),
    ] {
        for (tensor, o) in overrides {
            let spec = specs
                .iter_mut()
                .find(|s| &s.name == tensor)
                .ok_or_else(|| LoadError::NoSuchTensor {
                    what,
                    tensor: tensor.clone(),
                })?;
            let bad = |why: ShapeError| LoadError::BadShape {
                what,
                tensor: tensor.clone(),
                shape: o.shape.clone(),
                why,
            };
            if o.shape.iter().any(|d| *d < -1) {
                return Err(bad(ShapeError::Dimension));
            }
            if let Some(model) = &spec.shape {
                if model.len() != o.shape.len() {
                    return Err(bad(ShapeError::Rank(model.len())));
                }
                // An override may fix a dynamic size, never contradict a fixed one.
                if let Some((m, _)) = model
                    .iter()
                    .zip(&o.shape)
                    .find(|(m, o)| **m >= 0 && **o >= 0 && m != o)
                {
                    return Err(bad(ShapeError::Fixed(*m)));
                }
            }
            spec.shape = Some(o.shape.clone());
        }
    }
    let text = if ferry_text::TextModel::present(dir) {
        Some(text_model(dir, &signature, config)?)
    } else {
        None
    };
    crate::warmup::run(dir, &signature, backend.as_ref())?;
    let explainer = if text.is_none() {
        crate::explain::Explainer::prepare(
            dir,
            &bytes,
            &signature,
            meta.features.as_deref(),
            config.explain.background.as_deref(),
        )
        .map(Arc::new)
    } else {
        None
    };
    Ok(Prepared {
        signature,
        meta,
        backend,
        text,
        llm: None,
        explainer,
    })
}

/// [`prepare`] for a language model (`model.gguf`): its size checked before anything reads it, its signature
/// verified when keys are trusted (every file hashed from disk, the GGUF included), then loaded by llama.cpp and
/// warmed up ([`crate::llm::load`]).
fn prepare_llm(
    dir: &Path,
    (model, version): (&str, u64),
    config: &ModelConfig,
    integrity: &crate::integrity::IntegrityPolicy,
) -> Result<Prepared, LoadError> {
    let gguf = dir.join("model.gguf");
    let size = match std::fs::metadata(&gguf) {
        Ok(m) => m.len(),
        Err(source) => return Err(LoadError::Gguf { path: gguf, source }),
    };
    if size > integrity.max_model_bytes {
        return Err(LoadError::GgufTooLarge {
            size,
            max: integrity.max_model_bytes,
        });
    }
    let meta_bytes = read_meta_bytes(dir)?;
    verify_signature(dir, (model, version), integrity, &|path| match path {
        "ferry.json" => meta_bytes.as_deref().map(sha256_hex),
        _ => None,
    })?;
    let meta = parse_meta(meta_bytes.as_deref())?;
    let llm = crate::llm::load(dir, config)?;
    let backend: Arc<dyn Backend> = Arc::new(crate::llm::LlmBackend::new(llm.clone()));
    Ok(Prepared {
        signature: backend.signature().clone(),
        meta,
        backend,
        text: None,
        llm: Some(llm),
        explainer: None,
    })
}

/// With trusted keys, checks the version's `ferry.sig` against every file in `dir` (`known` gives the hashes of
/// files already in memory; the others are hashed from disk).
fn verify_signature(
    dir: &Path,
    (model, version): (&str, u64),
    integrity: &crate::integrity::IntegrityPolicy,
    known: &dyn Fn(&str) -> Option<String>,
) -> Result<(), crate::integrity::IntegrityError> {
    if integrity.trusted_keys.is_empty() {
        return Ok(());
    }
    let files = crate::integrity::version_files(dir, known)?;
    let key =
        crate::integrity::verify_version(dir, model, version, &files, &integrity.trusted_keys)?;
    tracing::info!(model, version, key, "signature verified");
    Ok(())
}

pub use ferry_repo::sha256_hex;

/// Drift windows for a version: its input features when its single input is a `[rows, features]` float matrix
/// matching the feature baseline, and each output of the prediction baseline the signature has with one value per
/// row (`drift_sample_every = 0` turns both off).
fn drift_window(
    signature: &Signature,
    meta: &ModelMeta,
    config: &ModelConfig,
) -> Option<crate::drift::Drift> {
    let inputs = match (meta.baseline.clone(), signature.inputs.as_slice()) {
        (Some(baseline), [input])
            if input.dtype.is_float()
                && input
                    .shape
                    .as_ref()
                    .is_some_and(|s| s.len() == 2 && s[1] == baseline.len() as i64) =>
        {
            Some((baseline, input.name.clone()))
        }
        _ => None,
    };
    let predictions = meta
        .predictions
        .iter()
        .flatten()
        .filter(|p| {
            signature.output(&p.output).is_some_and(|o| {
                let one_per_row = o
                    .shape
                    .as_ref()
                    .is_none_or(|s| s.len() == 1 || (s.len() == 2 && s[1] == 1));
                let kind = match p.bins {
                    crate::drift::PredictionBins::Edges(_) => o.dtype.is_float(),
                    crate::drift::PredictionBins::Classes(_) => !o.dtype.is_float(),
                };
                one_per_row && kind
            })
        })
        .cloned()
        .collect();
    crate::drift::Drift::from_parts(
        inputs,
        predictions,
        config.drift_window,
        config.drift_sample_every,
    )
}

#[cfg(feature = "tract")]
fn tract_backend(
    bytes: &[u8],
    dir: &Path,
    options: &EngineOptions,
) -> Result<Arc<dyn Backend>, LoadError> {
    ferry_model::external::check_self_contained(bytes, Some(dir))?;
    Ok(Arc::new(ferry_engine::TractBackend::load(bytes, options)?))
}

#[cfg(not(feature = "tract"))]
fn tract_backend(_: &[u8], _: &Path, _: &EngineOptions) -> Result<Arc<dyn Backend>, LoadError> {
    Err(LoadError::NoTract)
}

/// The bytes of a version's `ferry.json`, when it has one.
fn read_meta_bytes(dir: &Path) -> Result<Option<Vec<u8>>, MetaError> {
    let path = dir.join("ferry.json");
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        // The reason reaches clients: name the file, not where the repository lives.
        Err(e) => Err(MetaError::Read(e)),
    }
}

fn parse_meta(bytes: Option<&[u8]>) -> Result<ModelMeta, MetaError> {
    let Some(bytes) = bytes else {
        return Ok(ModelMeta::default());
    };
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(MetaError::Json)?;
    let strings = |key: &str| -> Result<Option<Vec<String>>, MetaError> {
        match value.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::Array(items)) => Ok(Some(
                items
                    .iter()
                    .map(|i| match i {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect(),
            )),
            Some(_) => Err(MetaError::NotAList(key.to_string())),
        }
    };
    Ok(ModelMeta {
        features: strings("features")?,
        classes: strings("classes")?,
        baseline: crate::drift::FeatureBaseline::from_ferry_json(&value),
        predictions: crate::drift::PredictionBaseline::from_ferry_json(&value),
        sha256: match value.get("model_sha256") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) if s.is_empty() => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(MetaError::Sha256),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_escape_the_root_are_refused() {
        for bad in [
            "", "..", ".", "../x", "a/b", "/abs", "a\\b", ".hidden", "a b", "ü",
        ] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        for good in ["iris", "my-model_2", "v1.2"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn load_errors_read_as_the_reasons_they_replace() {
        assert_eq!(
            LoadError::NoSuchTensor {
                what: "inputs",
                tensor: "x".into()
            }
            .to_string(),
            "config.toml: inputs.x: the model has no such input"
        );
        assert_eq!(
            LoadError::BadShape {
                what: "outputs",
                tensor: "y".into(),
                shape: vec![-1, 3],
                why: ShapeError::Fixed(4),
            }
            .to_string(),
            "config.toml: outputs.y.shape [-1, 3]: the model fixes a dimension at 4"
        );
        assert_eq!(
            LoadError::from(crate::warmup::WarmupError::TooMany(65)).to_string(),
            "warmup/ has 65 requests; at most 64 are run"
        );
        assert_eq!(
            LoadError::from(crate::warmup::WarmupError::Request {
                name: "a.json".into(),
                why: crate::warmup::RequestError::Mismatch {
                    name: "x".into(),
                    dtype: ferry_model::DataType::F32,
                    shape: vec![-1, 4],
                },
            })
            .to_string(),
            "warm-up request warmup/a.json failed: input `x` does not match the model (FP32 [-1, 4])"
        );
        assert_eq!(
            LoadError::from(MetaError::NotAList("classes".into())).to_string(),
            "ferry.json: `classes` must be a list"
        );
        assert_eq!(
            LoadError::NoTract.to_string(),
            "engine = \"tract\" needs a build with the `tract` feature; this build has ONNX Runtime only"
        );
    }

    #[test]
    fn versions_are_positive_integers() {
        assert_eq!(parse_version("3"), Some(3));
        assert_eq!(parse_version("0"), None);
        assert_eq!(parse_version("-1"), None);
        assert_eq!(parse_version("1a"), None);
        assert_eq!(parse_version("+1"), None);
        assert_eq!(parse_version("99999999999999999999999"), None);
    }
}
