//! Keeping the served models in step with the repository: the startup load, polling (`--model-control-mode poll`),
//! and explicit loads and unloads (the management API). The canary controller that drives rollouts is in
//! [`crate::core::canary`].
//!
//! One rule makes updates safe: a version is prepared aside (fetched, checked against its sha256, loaded, warmed
//! up) while the versions already serving keep serving; only a version that is ready replaces anything, in one
//! swap under the table's lock. A version that fails never takes traffic; under a `latest` policy the policy is
//! applied to the versions that loaded, so a broken new version leaves the current one serving. A version taken
//! out of service is marked UNLOADING and removed once its in-flight requests have finished.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_engine::{EngineError, EngineOptions, OrtEngine};

use crate::core::model_config::ModelConfig;
use crate::core::reconcile::{self, Retire, Versions};
use crate::core::repository::{LoadError, LoadedVersion, ModelStore, VersionSlot, VersionState};
use crate::core::rollout::{Live, RolloutPlan};
use crate::core::source::{Listing, ModelListing, Repository, SourceError};

/// How the served models follow the repository (Triton's `--model-control-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlMode {
    /// Load everything at startup; never look again.
    None,
    /// Load everything at startup and apply changes found by polling.
    Poll,
    /// Load only what the management API (or `--load-model`) asks for.
    Explicit,
}

impl ControlMode {
    /// The lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            ControlMode::None => "none",
            ControlMode::Poll => "poll",
            ControlMode::Explicit => "explicit",
        }
    }
}

/// One row of the repository index (Triton's `POST /v2/repository/index`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IndexEntry {
    /// The model name.
    pub name: String,
    /// The version, when the model has one in the table.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub version: String,
    /// Its state (`READY`, `LOADING`, `UNAVAILABLE`, `UNLOADING`).
    pub state: String,
    /// Why it is not ready.
    pub reason: String,
}

/// What the manager remembers of a model between scans.
#[derive(Debug, Default, Clone)]
struct Known {
    config_text: Option<Option<Result<String, String>>>,
    config: Option<Arc<ModelConfig>>,
    config_error: Option<String>,
    rollout_text: Option<Option<Result<String, String>>>,
    /// The versions serving, failed and stale, by the fingerprints of their files.
    versions: Versions,
}

#[derive(Debug, Default)]
struct State {
    known: BTreeMap<String, Known>,
    /// Models loaded on request (explicit mode).
    explicit: BTreeSet<String>,
}

/// Applies the repository to the model table.
pub struct Manager {
    pub(super) repo: Repository,
    pub(super) store: Arc<ModelStore>,
    engine: Result<OrtEngine, EngineError>,
    defaults: EngineOptions,
    pub(super) metrics: Arc<crate::metrics::Metrics>,
    mode: ControlMode,
    drain_timeout: Duration,
    integrity: Arc<crate::core::integrity::IntegrityPolicy>,
    state: tokio::sync::Mutex<State>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("repo", &self.repo)
            .field("mode", &self.mode)
            .finish()
    }
}

/// Why a management call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManageError {
    /// The repository has no such model.
    #[error("{0}")]
    NotFound(String),
    /// The call is not allowed in this mode, or the model failed.
    #[error("{0}")]
    Refused(String),
}

/// Why the startup load failed.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The repository cannot be listed.
    #[error(transparent)]
    Scan(#[from] SourceError),
    /// `--load-model` names a model the repository does not have.
    #[error("--load-model {0}: no such model in the repository")]
    NoSuchModel(String),
}

impl Manager {
    /// A manager over `repo` feeding `store`.
    pub fn new(
        repo: Repository,
        store: Arc<ModelStore>,
        engine: Result<OrtEngine, EngineError>,
        defaults: EngineOptions,
        metrics: Arc<crate::metrics::Metrics>,
        mode: ControlMode,
        drain_timeout: Duration,
    ) -> Manager {
        Manager {
            repo,
            store,
            engine,
            defaults,
            metrics,
            mode,
            drain_timeout,
            integrity: Arc::new(crate::core::integrity::IntegrityPolicy::default()),
            state: tokio::sync::Mutex::new(State::default()),
        }
    }

    /// Checks versions with this policy (trusted signing keys, model size limit) before they load.
    pub fn with_integrity(mut self, integrity: crate::core::integrity::IntegrityPolicy) -> Manager {
        self.integrity = Arc::new(integrity);
        self
    }

    /// The repository.
    pub fn repository(&self) -> &Repository {
        &self.repo
    }

    /// The control mode.
    pub fn mode(&self) -> ControlMode {
        self.mode
    }

    /// The startup load: every model (modes `none` and `poll`) or the models named in `initial` (`explicit`).
    /// Fails only when the repository cannot be listed.
    pub async fn startup(&self, initial: &[String]) -> Result<(), StartupError> {
        let listing = self.repo.scan().await?;
        let mut state = self.state.lock().await;
        if self.mode == ControlMode::Explicit {
            for name in initial {
                if !listing.contains_key(name) {
                    return Err(StartupError::NoSuchModel(name.clone()));
                }
                state.explicit.insert(name.clone());
            }
        }
        self.reconcile(&mut state, &listing).await;
        Ok(())
    }

    /// Scans the repository once and applies what changed (poll mode).
    pub async fn poll(&self) -> Result<(), SourceError> {
        let listing = self.repo.scan().await?;
        let mut state = self.state.lock().await;
        self.reconcile(&mut state, &listing).await;
        Ok(())
    }

    /// Loads (or reloads) one model from the repository (explicit mode); returns once it is ready or has failed.
    pub async fn load(&self, name: &str) -> Result<(), ManageError> {
        if self.mode != ControlMode::Explicit {
            return Err(ManageError::Refused(format!(
                "explicit model load / unload is not allowed when the model control mode is {}",
                self.mode.name()
            )));
        }
        let listing = self
            .repo
            .scan()
            .await
            .map_err(|e| ManageError::Refused(e.to_string()))?;
        if !listing.contains_key(name) {
            return Err(ManageError::NotFound(format!(
                "failed to load '{name}': no such model in the repository"
            )));
        }
        let mut state = self.state.lock().await;
        state.explicit.insert(name.to_string());
        self.reconcile(&mut state, &listing).await;
        drop(state);
        let ready = self
            .store
            .with_model(name, |r| {
                r.versions.values().any(|s| s.state == VersionState::Ready)
            })
            .unwrap_or(false);
        if ready {
            Ok(())
        } else {
            let reasons = self
                .store
                .with_model(name, |r| {
                    r.versions
                        .iter()
                        .filter_map(|(v, s)| match &s.state {
                            VersionState::Unavailable(why) => Some(format!("version {v}: {why}")),
                            _ => None,
                        })
                        .collect::<Vec<_>>()
                        .join("; ")
                })
                .unwrap_or_default();
            Err(ManageError::Refused(format!(
                "failed to load '{name}': {}",
                if reasons.is_empty() {
                    self.store
                        .with_model(name, |r| r.layout.clone())
                        .flatten()
                        .map_or("it has no version to serve".to_string(), |layout| {
                            format!("it has no version to serve: {layout}")
                        })
                } else {
                    reasons
                }
            )))
        }
    }

    /// Unloads every version of a model (explicit mode); in-flight requests finish first.
    pub async fn unload(&self, name: &str) -> Result<(), ManageError> {
        if self.mode != ControlMode::Explicit {
            return Err(ManageError::Refused(format!(
                "explicit model load / unload is not allowed when the model control mode is {}",
                self.mode.name()
            )));
        }
        let mut state = self.state.lock().await;
        if !state.explicit.remove(name) && !self.store.contains(name) {
            return Err(ManageError::NotFound(format!(
                "failed to unload '{name}': it is not loaded"
            )));
        }
        state.known.remove(name);
        self.remove_model(name);
        Ok(())
    }

    /// The repository index: every model in the repository or the table, with its versions' states.
    pub async fn index(&self, ready_only: bool) -> Result<Vec<IndexEntry>, SourceError> {
        let listing = self.repo.scan().await?;
        let mut names: BTreeSet<String> = listing.keys().cloned().collect();
        names.extend(self.store.model_names());
        let mut out = Vec::new();
        for name in names {
            let rows = self
                .store
                .with_model(&name, |r| {
                    r.versions
                        .iter()
                        .map(|(v, s)| IndexEntry {
                            name: name.clone(),
                            version: v.to_string(),
                            state: s.state.name().to_string(),
                            reason: match &s.state {
                                VersionState::Unavailable(why) => why.clone(),
                                _ => String::new(),
                            },
                        })
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            if rows.is_empty() {
                if !ready_only {
                    let layout = listing.get(&name).and_then(|l| l.layout.clone());
                    out.push(IndexEntry {
                        name: name.clone(),
                        version: String::new(),
                        state: "UNAVAILABLE".into(),
                        reason: layout.unwrap_or_else(|| "unloaded".into()),
                    });
                }
                continue;
            }
            out.extend(
                rows.into_iter()
                    .filter(|r| !ready_only || r.state == "READY"),
            );
        }
        Ok(out)
    }

    /// Polls every `every` until `stop` turns true.
    pub async fn run_poller(
        self: Arc<Self>,
        every: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        while super::sleep_unless_stopped(every, &mut stop).await {
            if let Err(e) = self.poll().await {
                tracing::warn!(error = %e, "repository poll failed; serving what is loaded");
            }
        }
    }

    async fn reconcile(&self, state: &mut State, listing: &Listing) {
        let in_scope = |name: &str| match self.mode {
            ControlMode::Explicit => state.explicit.contains(name),
            _ => true,
        };
        // Models gone from the repository (or no longer wanted) leave the table.
        let gone: Vec<String> = state
            .known
            .keys()
            .filter(|n| !listing.contains_key(*n) || !in_scope(n))
            .cloned()
            .collect();
        for name in gone {
            tracing::info!(model = %name, "model removed from the repository: unloading");
            state.known.remove(&name);
            self.remove_model(&name);
        }
        let work: Vec<(String, ModelListing, Known)> = listing
            .iter()
            .filter(|(name, _)| in_scope(name))
            .map(|(name, entry)| {
                (
                    name.clone(),
                    entry.clone(),
                    state.known.remove(name).unwrap_or_default(),
                )
            })
            .collect();
        let done = futures_util::future::join_all(work.into_iter().map(
            |(name, entry, known)| async move {
                let known = self.reconcile_model(&name, &entry, known).await;
                (name, known)
            },
        ))
        .await;
        state.known.extend(done);
    }

    async fn reconcile_model(&self, name: &str, entry: &ModelListing, mut known: Known) -> Known {
        // The configuration: a broken change keeps the previous one.
        if known.config_text.as_ref() != Some(&entry.config) {
            let parsed = match &entry.config {
                None => Ok(ModelConfig::defaults(&self.defaults)),
                Some(Ok(text)) => ModelConfig::parse(text, &self.defaults)
                    .map_err(|e| format!("config.toml: {e}")),
                Some(Err(e)) => Err(e.clone()),
            };
            match parsed {
                Ok(config) => {
                    if known.config.is_some() {
                        tracing::info!(model = name, "config.toml changed: applying it");
                    }
                    known.config = Some(Arc::new(config));
                    known.config_error = None;
                }
                Err(e) => {
                    if known.config.is_some() {
                        tracing::warn!(model = name, error = %e, "config.toml change refused; the previous configuration stays");
                    }
                    known.config_error = Some(e);
                }
            }
            known.config_text = Some(entry.config.clone());
        }
        let Some(config) = known.config.clone() else {
            // A new model whose configuration cannot be read: its versions are reported with the reason.
            let defaults = Arc::new(ModelConfig::defaults(&self.defaults));
            let present: Vec<u64> = entry.versions.keys().copied().collect();
            let reason = known.config_error.clone().unwrap_or_default();
            self.store.ensure_model(name, defaults.clone());
            self.store
                .update(name, |r| r.layout.clone_from(&entry.layout));
            for v in defaults.version_policy.select(&present) {
                self.store.set_version(
                    name,
                    v,
                    VersionSlot {
                        state: VersionState::Unavailable(reason.clone()),
                        loaded: None,
                    },
                );
            }
            return known;
        };
        self.store.ensure_model(name, config.clone());
        let reload_all = self
            .store
            .update(name, |r| {
                r.layout.clone_from(&entry.layout);
                let reload = r.config.needs_reload(&config);
                if r.config.max_concurrent_requests != config.max_concurrent_requests {
                    r.permits = config
                        .max_concurrent_requests
                        .map(|n| Arc::new(tokio::sync::Semaphore::new(n)));
                }
                r.config = config.clone();
                reload
            })
            .unwrap_or(false);
        if reload_all && !known.versions.loaded.is_empty() {
            tracing::info!(
                model = name,
                "the new configuration changes how versions load: reloading them"
            );
            known.versions.stale = known.versions.loaded.keys().copied().collect();
            known.versions.failed.clear();
        }

        // The rollout plan.
        if known.rollout_text.as_ref() != Some(&entry.rollout) {
            match &entry.rollout {
                None => {
                    self.store.update(name, |r| r.rollout = None);
                }
                Some(Ok(text)) => match RolloutPlan::parse(text) {
                    Ok(plan) => {
                        self.store.update(name, |r| match &r.rollout {
                            Some(live) if live.same_rollout(&plan) => live.adopt(plan),
                            _ => {
                                tracing::info!(
                                    model = name,
                                    candidate = plan.candidate,
                                    stable = plan.stable,
                                    state = plan.state.name(),
                                    "rollout plan found"
                                );
                                r.rollout = Some(Arc::new(Live::new(plan)));
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(model = name, error = %e, "rollout plan refused; the previous one (if any) stays")
                    }
                },
                Some(Err(e)) => {
                    tracing::warn!(model = name, error = %e, "cannot read the rollout plan")
                }
            }
            known.rollout_text = Some(entry.rollout.clone());
        }
        let plan = self
            .store
            .with_model(name, |r| r.rollout.as_ref().map(|l| l.plan()))
            .flatten();
        let present: Vec<u64> = entry.versions.keys().copied().collect();
        let pins = reconcile::pins(
            plan.as_ref(),
            config.shadow.as_ref().map(|s| s.version),
            &present,
        );

        // Versions: load what the policy (applied to versions that can load) wants, then retire the rest.
        known
            .versions
            .failed
            .retain(|v, fp| entry.versions.get(v) == Some(fp));
        let wanted = loop {
            let (wanted, to_load) = reconcile::wanted_versions(
                &entry.versions,
                &config.version_policy,
                &pins,
                &known.versions,
            );
            if to_load.is_empty() {
                break wanted;
            }
            for v in &to_load {
                let serving = self
                    .store
                    .with_model(name, |r| {
                        r.versions
                            .get(v)
                            .is_some_and(|s| s.state == VersionState::Ready)
                    })
                    .unwrap_or(false);
                if !serving {
                    self.store.set_version(
                        name,
                        *v,
                        VersionSlot {
                            state: VersionState::Loading,
                            loaded: None,
                        },
                    );
                }
            }
            let config = &config;
            let results = futures_util::future::join_all(
                to_load
                    .iter()
                    .map(|v| async move { (*v, self.load_one(name, *v, config).await) }),
            )
            .await;
            for (v, result) in results {
                let fp = entry.versions[&v].clone();
                match result {
                    Ok(loaded) => {
                        self.store.set_version(
                            name,
                            v,
                            VersionSlot {
                                state: VersionState::Ready,
                                loaded: Some(loaded),
                            },
                        );
                        known.versions.loaded.insert(v, fp);
                        known.versions.stale.remove(&v);
                    }
                    Err(reason) => {
                        known.versions.failed.insert(v, fp);
                        let was_stale = known.versions.stale.remove(&v);
                        if was_stale && known.versions.loaded.contains_key(&v) {
                            tracing::warn!(model = name, version = v, %reason, "a serving version failed to load under the new configuration; it keeps serving as loaded before");
                        } else if known.versions.loaded.contains_key(&v) {
                            tracing::warn!(model = name, version = v, %reason, "changed files of a serving version failed to load; the previous files keep serving");
                        } else {
                            self.store.set_version(
                                name,
                                v,
                                VersionSlot {
                                    state: VersionState::Unavailable(reason.to_string()),
                                    loaded: None,
                                },
                            );
                        }
                    }
                }
            }
        };
        // Retire what is no longer wanted; keep reporting failures of versions still present.
        let slots: Vec<(u64, VersionState)> = self
            .store
            .with_model(name, |r| {
                r.versions
                    .iter()
                    .map(|(v, s)| (*v, s.state.clone()))
                    .collect()
            })
            .unwrap_or_default();
        for (v, slot_state) in slots {
            if wanted.contains(&v) {
                continue;
            }
            let failed = known.versions.failed.contains_key(&v) && entry.versions.contains_key(&v);
            match reconcile::retire(&slot_state, failed) {
                Retire::Unload => {
                    known.versions.loaded.remove(&v);
                    self.unload_version(name, v);
                }
                Retire::Keep => {}
                Retire::Remove => {
                    self.store.update(name, |r| r.versions.remove(&v));
                }
            }
        }
        known.versions.loaded.retain(|v, _| wanted.contains(v));
        known.versions.stale.retain(|v| wanted.contains(v));
        // A version loaded only to receive shadow copies never takes unversioned traffic.
        let hidden = reconcile::hidden_shadow(pins.shadow_only, &config.version_policy, &present);
        self.store.update(name, |r| r.shadow_only = hidden);
        known
    }

    async fn load_one(
        &self,
        name: &str,
        version: u64,
        config: &Arc<ModelConfig>,
    ) -> Result<Arc<LoadedVersion>, LoadError> {
        let started = Instant::now();
        let result = async {
            let dir = self
                .repo
                .fetch_version_within(name, version, self.integrity.max_model_bytes)
                .await?;
            let (engine, cfg, integrity) =
                (self.engine.clone(), config.clone(), self.integrity.clone());
            let model = name.to_string();
            tokio::task::spawn_blocking(move || {
                crate::core::repository::prepare(&dir, (&model, version), &cfg, &engine, &integrity)
            })
            .await
            .unwrap_or_else(|e| Err(LoadError::Panicked(e)))
        }
        .await;
        self.metrics.load(name, started.elapsed(), result.is_ok());
        let prepared = result?;
        Ok(Arc::new(crate::core::repository::activate(
            name,
            version,
            prepared,
            config,
            &self.metrics,
        )))
    }

    /// Takes a version out of service: UNLOADING now, removed once its in-flight requests are done.
    fn unload_version(&self, name: &str, version: u64) {
        let taken = self
            .store
            .update(name, |r| {
                r.versions.get_mut(&version).and_then(|slot| {
                    slot.state = VersionState::Unloading;
                    slot.loaded.take()
                })
            })
            .flatten();
        tracing::info!(
            model = name,
            version,
            state = "UNLOADING",
            "model version state changed"
        );
        let (store, name, timeout) = (self.store.clone(), name.to_string(), self.drain_timeout);
        tokio::spawn(async move {
            let started = Instant::now();
            if let Some(loaded) = taken {
                while Arc::strong_count(&loaded) > 1 && started.elapsed() < timeout {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let removed = store
                .update(&name, |r| {
                    if r.versions
                        .get(&version)
                        .is_some_and(|s| s.state == VersionState::Unloading)
                    {
                        r.versions.remove(&version);
                        true
                    } else {
                        false
                    }
                })
                .unwrap_or(false);
            if removed {
                tracing::info!(model = %name, version, "model version unloaded");
            }
        });
    }

    fn remove_model(&self, name: &str) {
        let versions: Vec<u64> = self
            .store
            .with_model(name, |r| r.versions.keys().copied().collect())
            .unwrap_or_default();
        for v in versions {
            self.unload_version(name, v);
        }
        // New requests see the model gone at once; in-flight ones hold their version until they finish.
        self.store.remove_model(name);
    }
}
