//! The one inference path every protocol shares: resolve a version, validate inputs against its signature,
//! run the engine off the async runtime under a deadline, select outputs.
//!
//! Protocol adapters only decode into [`NamedTensor`]s and encode what comes back; all checks live here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_model::{NamedTensor, TensorSpec};

pub use crate::codec::limits::{
    element_cost, memory_cost, Budget, JsonScan, JsonStrings, Limits, EXPANSION_FACTOR,
    EXPANSION_FLOOR,
};
use crate::core::repository::{validate_name, LoadedVersion, ModelStore, VersionState};
use crate::error::{ErrorKind, InferError};
pub use crate::metrics::Protocol;

/// The largest dimension a tensor may have (2³¹ − 1, as ONNX Runtime and most clients assume).
const MAX_DIMENSION: usize = i32::MAX as usize;

/// Which version of a model a request wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionSelector {
    /// The highest READY version.
    Latest,
    /// Exactly this version.
    Specific(u64),
    /// The version a label in `config.toml` points at.
    Label(String),
}

/// Whether the server is live and ready, shared by the health endpoints and shutdown.
#[derive(Debug, Default)]
pub struct Health {
    loaded: AtomicBool,
    draining: AtomicBool,
}

impl Health {
    /// Records that the startup load has finished.
    pub fn set_loaded(&self) {
        self.loaded.store(true, Ordering::SeqCst);
    }

    /// Records that shutdown has begun: readiness turns false at once.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Ready: the startup load has finished and shutdown has not begun.
    pub fn is_ready(&self) -> bool {
        self.loaded.load(Ordering::SeqCst) && !self.draining.load(Ordering::SeqCst)
    }
}

/// Inputs that have been checked against a version's signature; only [`Infer::validate`] makes one.
#[derive(Debug)]
pub struct ValidRequest {
    version: Arc<LoadedVersion>,
    inputs: Vec<NamedTensor>,
    outputs: Option<Vec<String>>,
    id: Option<String>,
}

impl ValidRequest {
    /// Attaches the client's request id (kept in the payload log).
    pub fn with_id(mut self, id: Option<String>) -> ValidRequest {
        self.id = id.filter(|i| !i.is_empty());
        self
    }
}

/// What [`Infer::predict`] gives back: the outputs and where the time went.
#[derive(Debug)]
pub struct Prediction {
    /// The selected outputs, in the order asked for (signature order when none were named).
    pub outputs: Vec<NamedTensor>,
    /// Where the time went.
    pub timing: Timing,
}

/// Where a prediction's time went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Time spent waiting in the version's queue.
    pub queue: Duration,
    /// Engine time of the batch the request ran in.
    pub compute: Duration,
    /// Time from submitting to the queue to the answer.
    pub total: Duration,
}

impl Timing {
    /// The timing as response headers (microseconds): `x-queue-time-us`, `x-compute-time-us`, `x-total-time-us`.
    pub fn headers(&self) -> [(&'static str, String); 3] {
        [
            ("x-queue-time-us", self.queue.as_micros().to_string()),
            ("x-compute-time-us", self.compute.as_micros().to_string()),
            ("x-total-time-us", self.total.as_micros().to_string()),
        ]
    }
}

/// One inference request as a protocol adapter hands it to the core, from its first byte to its answer: the core
/// resolves the version, records the request's metrics (in flight, bytes, latency, outcome by protocol), validates
/// and runs the prediction (with its rollout arm, shadow copy, drift windows and payload log), and keeps its timing.
/// The adapter only decodes its wire format between [`Call::resolve`] and [`Call::predict`], encodes the outputs,
/// and ends the call with [`Call::finish`].
///
/// Recording takes no lock and no allocation once the version is resolved (a call that fails before that is counted
/// under the model it named, on the labelled path).
#[derive(Debug)]
pub struct Call<'a> {
    infer: &'a Infer,
    record: crate::metrics::RequestRecord<'a>,
    named: Option<&'a str>,
    version: Option<Arc<LoadedVersion>>,
    timing: Option<Timing>,
}

impl<'a> Call<'a> {
    /// The model the request names, as soon as the adapter knows it: a failure before [`Call::resolve`] (an unread
    /// body, a bad header) is then counted under that model, when the repository knows it.
    pub fn named(&mut self, model: &'a str) {
        self.named = Some(model);
    }

    /// Finds the version the request is for: `selector` is the version it asks for, or why the adapter could not
    /// read one. During a canary rollout an unversioned request goes by `route_key` (a routing header or request
    /// id). Counts the request's `request_bytes` in the version's series; a failure is counted under `model` when
    /// the repository knows it.
    pub fn resolve(
        &mut self,
        model: &str,
        selector: Result<VersionSelector, InferError>,
        route_key: Option<&str>,
        request_bytes: usize,
    ) -> Result<Arc<LoadedVersion>, InferError> {
        match selector.and_then(|s| self.infer.resolve_routed(model, &s, route_key)) {
            Ok(version) => {
                self.record.version(version.scheduler.series());
                self.record.body_bytes(request_bytes);
                self.version = Some(version.clone());
                Ok(version)
            }
            Err(e) => {
                self.label(model);
                Err(e)
            }
        }
    }

    /// Validates the decoded inputs (and the outputs asked for, in the order wanted; all in signature order when
    /// `None`) against the resolved version's signature, runs them under the earlier of `--request-timeout` and the
    /// client's `deadline`, and gives back the outputs. `id` is the client's request id, kept in the payload log.
    pub async fn predict(
        &mut self,
        inputs: Vec<NamedTensor>,
        outputs: Option<Vec<String>>,
        id: Option<String>,
        deadline: Option<Instant>,
    ) -> Result<Vec<NamedTensor>, InferError> {
        let Some(version) = self.version.clone() else {
            tracing::error!("a protocol adapter called Call::predict before Call::resolve");
            return Err(InferError::new(ErrorKind::Internal, "inference failed"));
        };
        if version.text.is_some() && crate::text::is_text_request(&inputs) {
            let (outputs, timing) =
                crate::text::predict_text_tensors(self.infer, &version, inputs, outputs, deadline)
                    .await?;
            self.record.timing(timing.queue, timing.compute);
            self.timing = Some(timing);
            return Ok(outputs);
        }
        let valid = Infer::validate(version, inputs, outputs)?.with_id(id);
        let Prediction { outputs, timing } = self.infer.predict(valid, deadline).await?;
        self.record.timing(timing.queue, timing.compute);
        self.timing = Some(timing);
        Ok(outputs)
    }

    /// Runs tokenized texts on the resolved version, a text model (see [`crate::text`]), under the earlier of
    /// `--request-timeout` and the client's `deadline`, and gives back one FP32 output: `[texts, width]` pooled, or
    /// every token's vector (`[tokens, width]`) as `output` asks.
    pub async fn predict_texts(
        &mut self,
        texts: Vec<ferry_text::Tokens>,
        output: crate::batching::TextOutput,
        deadline: Option<Instant>,
    ) -> Result<Vec<NamedTensor>, InferError> {
        let Some(version) = self.version.clone() else {
            tracing::error!("a protocol adapter called Call::predict_texts before Call::resolve");
            return Err(InferError::new(ErrorKind::Internal, "inference failed"));
        };
        let Prediction { outputs, timing } = self
            .infer
            .predict_texts(&version, texts, output, deadline)
            .await?;
        self.record.timing(timing.queue, timing.compute);
        self.timing = Some(timing);
        Ok(outputs)
    }

    /// The earlier of `--request-timeout` from now and the client's `deadline`: what bounds work done before the
    /// call queues (tokenizing).
    pub fn deadline(&self, client: Option<Instant>) -> Instant {
        self.infer.deadline(Instant::now(), client)
    }

    /// The per-request limits the adapter's decoder checks.
    pub fn limits(&self) -> &'a Limits {
        &self.infer.limits
    }

    /// Counts the encoded answer's bytes (a REST body, a gRPC message).
    pub fn response_bytes(&self, n: usize) {
        self.record.response_bytes(n);
    }

    /// Ends the call: records its outcome and latency, and gives back the prediction's timing for the answer's
    /// headers when it succeeded.
    pub fn finish(mut self, outcome: Result<(), ErrorKind>) -> Option<Timing> {
        if outcome.is_err() && !self.record.has_version() {
            if let Some(model) = self.named {
                self.label(model);
            }
        }
        match outcome {
            Ok(()) => {
                self.record.finish(crate::metrics::Outcome::Success);
                self.timing
            }
            Err(kind) => {
                self.record.finish(crate::metrics::Outcome::Failed(kind));
                None
            }
        }
    }

    /// Labels a request that never reached a version with the model it named, when the repository knows that model
    /// (so unknown names sent by clients never become label values).
    fn label(&mut self, model: &str) {
        if self.infer.store.contains(model) {
            self.record.model(model, None);
        }
    }
}

/// The shared handle on models and the inference path.
#[derive(Debug, Clone)]
pub struct Infer {
    /// The model table.
    pub store: Arc<ModelStore>,
    /// Readiness.
    pub health: Arc<Health>,
    /// The metrics registry.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The payload log, when on.
    pub payload: Option<Arc<crate::core::payload_log::PayloadLogger>>,
    timeout: Duration,
    /// Per-request limits.
    pub limits: Limits,
    shadow_permits: Arc<tokio::sync::Semaphore>,
    shadow_counter: Arc<std::sync::atomic::AtomicU64>,
}

impl Infer {
    /// A handle over `store` that gives each inference at most `timeout`.
    pub fn new(
        store: Arc<ModelStore>,
        health: Arc<Health>,
        metrics: Arc<crate::metrics::Metrics>,
        timeout: Duration,
    ) -> Infer {
        Infer {
            store,
            health,
            metrics,
            payload: None,
            timeout,
            limits: Limits::default(),
            shadow_permits: Arc::new(tokio::sync::Semaphore::new(
                crate::metrics::shadow::MAX_IN_FLIGHT,
            )),
            shadow_counter: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }

    /// Logs a sample of inferences to `logger`.
    pub fn with_payload_log(mut self, logger: crate::core::payload_log::PayloadLogger) -> Infer {
        self.payload = Some(Arc::new(logger));
        self
    }

    /// Starts one inference request that came in by `protocol` (see [`Call`]).
    pub fn call(&self, protocol: crate::metrics::Protocol) -> Call<'_> {
        Call {
            infer: self,
            record: self.metrics.request(protocol),
            named: None,
            version: None,
            timing: None,
        }
    }

    /// The versions a metadata answer lists: every READY version of the model when no version was named, else the
    /// one resolved.
    pub fn metadata_versions(
        &self,
        selector: &VersionSelector,
        loaded: &LoadedVersion,
    ) -> Vec<String> {
        match selector {
            VersionSelector::Latest => self
                .store
                .with_model(&loaded.model, |record| {
                    record
                        .versions
                        .iter()
                        .filter(|(_, s)| s.state == VersionState::Ready)
                        .map(|(v, _)| v.to_string())
                        .collect()
                })
                .unwrap_or_default(),
            _ => vec![loaded.version.to_string()],
        }
    }

    /// The states of a model's versions, newest first: all of them, or only the one `selector` names (a label
    /// resolves to its version). For TF Serving's status APIs, with its error wording.
    pub fn version_states(
        &self,
        model: &str,
        selector: &VersionSelector,
    ) -> Result<Vec<(u64, VersionState)>, InferError> {
        validate_name(model)?;
        let not_found =
            || InferError::not_found(format!("Could not find any versions of model {model}"));
        let (wanted, states) = self
            .store
            .with_model(model, |record| {
                let wanted = match selector {
                    VersionSelector::Latest => None,
                    VersionSelector::Specific(v) => Some(*v),
                    VersionSelector::Label(l) => Some(record.label(l).ok_or_else(|| {
                        InferError::invalid(format!("Unrecognized servable version label: {l}"))
                    })?),
                };
                let states: Vec<(u64, VersionState)> = record
                    .versions
                    .iter()
                    .rev()
                    .filter(|(v, _)| wanted.is_none_or(|w| w == **v))
                    .map(|(v, slot)| (*v, slot.state.clone()))
                    .collect();
                Ok::<_, InferError>((wanted, states))
            })
            .ok_or_else(not_found)??;
        if states.is_empty() {
            return Err(match wanted {
                Some(v) => {
                    InferError::not_found(format!("Could not find version {v} of model {model}"))
                }
                None => not_found(),
            });
        }
        Ok(states)
    }

    /// The drift report of every loaded version that has a baseline, for the metrics exposition.
    pub fn drift_for_metrics(&self) -> Vec<(String, u64, crate::metrics::drift::Report)> {
        let mut out = Vec::new();
        for name in self.store.model_names() {
            if let Some(record) = self.store.model(&name) {
                for (v, slot) in &record.versions {
                    if let Some(drift) = slot.loaded.as_ref().and_then(|l| l.drift.as_ref()) {
                        out.push((name.clone(), *v, drift.report()));
                    }
                }
            }
        }
        out
    }

    /// The last feature importance of every loaded version that has one, for the metrics exposition.
    pub fn importance_for_metrics(
        &self,
    ) -> Vec<(String, u64, Arc<crate::metrics::ImportanceFigures>)> {
        let mut out = Vec::new();
        for name in self.store.model_names() {
            if let Some(record) = self.store.model(&name) {
                for (v, slot) in &record.versions {
                    let figures = slot
                        .loaded
                        .as_ref()
                        .and_then(|l| l.explainer.as_ref())
                        .and_then(|e| e.last());
                    if let Some(f) = figures {
                        out.push((name.clone(), *v, f));
                    }
                }
            }
        }
        out
    }

    /// The state of every version, with its queue depth when loaded, for the metrics exposition.
    pub fn versions_for_metrics(&self) -> Vec<(String, u64, &'static str, Option<usize>)> {
        let mut out = Vec::new();
        for name in self.store.model_names() {
            if let Some(record) = self.store.model(&name) {
                for (v, slot) in &record.versions {
                    out.push((
                        name.clone(),
                        *v,
                        slot.state.name(),
                        slot.loaded.as_ref().map(|l| l.scheduler.queue_len()),
                    ));
                }
            }
        }
        out
    }

    /// Every model's canary rollout as (model, candidate, state, candidate weight), for the metrics exposition.
    pub fn rollouts_for_metrics(&self) -> Vec<(String, u64, &'static str, f64)> {
        let mut out = Vec::new();
        for name in self.store.model_names() {
            if let Some(Some(live)) = self.store.with_model(&name, |r| r.rollout.clone()) {
                let plan = live.plan();
                out.push((name, plan.candidate, plan.state.name(), live.weight()));
            }
        }
        out
    }

    /// Finds the version a request is for, or says why it cannot be served.
    pub fn resolve(
        &self,
        model: &str,
        selector: &VersionSelector,
    ) -> Result<Arc<LoadedVersion>, InferError> {
        self.resolve_routed(model, selector, None)
    }

    /// [`Infer::resolve`] for an inference request: during a canary rollout, a request that names no version goes
    /// to the candidate or the stable version by the rollout's weight, sticky per `route_key` (a routing header or
    /// request id) when there is one.
    pub fn resolve_routed(
        &self,
        model: &str,
        selector: &VersionSelector,
        route_key: Option<&str>,
    ) -> Result<Arc<LoadedVersion>, InferError> {
        validate_name(model)?;
        let key = route_key
            .filter(|k| !k.is_empty())
            .map(crate::core::rollout::key_hash);
        self.store
            .with_model(model, |record| resolve_in(record, model, selector, key))
            .unwrap_or_else(|| Err(InferError::not_found(format!("model `{model}` not found"))))
    }

    /// Checks inputs (names, types, shapes) and requested outputs against the version's signature.
    pub fn validate(
        version: Arc<LoadedVersion>,
        mut inputs: Vec<NamedTensor>,
        outputs: Option<Vec<String>>,
    ) -> Result<ValidRequest, InferError> {
        let sig = &version.tensor_signature;
        for (i, input) in inputs.iter().enumerate() {
            // Even a tensor with no elements must not carry dimensions whose product overflows: strides and
            // batch splits multiply them.
            let shape = &input.tensor.shape;
            if let Some(d) = shape.iter().find(|d| **d > MAX_DIMENSION) {
                return Err(InferError::invalid(format!(
                    "input `{}`: dimension {d} is too large",
                    input.name
                )));
            }
            if shape
                .iter()
                .try_fold(1usize, |acc, d| acc.checked_mul((*d).max(1)))
                .is_none()
            {
                return Err(InferError::invalid(format!(
                    "input `{}`: shape {shape:?} is too large",
                    input.name
                )));
            }
            if inputs[..i].iter().any(|other| other.name == input.name) {
                return Err(InferError::invalid(format!(
                    "input `{}` is given more than once",
                    input.name
                )));
            }
            let spec = sig.input(&input.name).ok_or_else(|| {
                InferError::invalid(format!(
                    "unknown input `{}`; the model takes {}",
                    input.name,
                    describe(&sig.inputs)
                ))
            })?;
            if spec.dtype != input.tensor.dtype() {
                return Err(InferError::invalid(format!(
                    "input `{}`: expected datatype {}, got {}",
                    input.name,
                    spec.dtype,
                    input.tensor.dtype()
                )));
            }
            if !spec.accepts_shape(&input.tensor.shape) {
                return Err(InferError::invalid(format!(
                    "input `{}`: expected shape {:?}, got {:?}",
                    input.name,
                    spec.display_shape(),
                    input.tensor.shape
                )));
            }
        }
        if let Some(missing) = sig
            .inputs
            .iter()
            .find(|s| !inputs.iter().any(|i| i.name == s.name))
        {
            return Err(InferError::invalid(format!(
                "missing input `{}` ({}, shape {:?})",
                missing.name,
                missing.dtype,
                missing.display_shape()
            )));
        }
        if let Some(requested) = &outputs {
            for name in requested {
                if sig.output(name).is_none() {
                    return Err(InferError::invalid(format!(
                        "unknown output `{name}`; the model gives {}",
                        describe(&sig.outputs)
                    )));
                }
            }
        }
        // Feed the engine in signature order, whatever order the request used.
        inputs.sort_by_key(|i| sig.inputs.iter().position(|s| s.name == i.name));
        Ok(ValidRequest {
            version,
            inputs,
            outputs,
            id: None,
        })
    }

    /// Queues a validated request on its version's scheduler and awaits the answer, at most until the earlier of
    /// `--request-timeout` and the client's own `deadline`.
    pub async fn predict(
        &self,
        request: ValidRequest,
        deadline: Option<Instant>,
    ) -> Result<Prediction, InferError> {
        let ValidRequest {
            version,
            inputs,
            outputs,
            id,
        } = request;
        self.limits.check(&inputs)?;
        // One look at the model's record: its rollout (to count this request for its arm), shadow settings and
        // concurrency limit.
        let (rollout, shadow, permits) = self
            .store
            .with_model(&version.model, |r| {
                (
                    r.rollout.clone(),
                    r.config.shadow.clone(),
                    r.permits.clone(),
                )
            })
            .unwrap_or_default();
        let _permit = match permits {
            None => None,
            Some(p) => Some(p.try_acquire_owned().map_err(|_| {
                InferError::new(
                    ErrorKind::Overloaded,
                    format!(
                        "model `{}` is at its limit of concurrent requests (max_concurrent_requests)",
                        version.model
                    ),
                )
            })?),
        };
        let shadow = shadow
            .filter(|s| s.version != version.version && self.shadow_sampled(s.fraction))
            .map(|s| (s.version, inputs.clone()));
        // Only sampled requests pay for the copy the payload log needs.
        let logged = self
            .payload
            .as_ref()
            .filter(|p| p.sample())
            .map(|p| (p.clone(), inputs.clone()));
        let start = Instant::now();
        let ours = start
            .checked_add(self.timeout)
            .unwrap_or(start + Duration::from_secs(86_400 * 365));
        let client_deadline = deadline.is_some_and(|d| d < ours);
        let deadline = deadline.map_or(ours, |d| d.min(ours));
        // A sampled request feeds the drift windows: its inputs now, its outputs once answered.
        let drift = version.drift.as_ref().filter(|d| d.observe(&inputs));
        let answer = self.run(&version, inputs, start, deadline).await;
        if let Some(live) = &rollout {
            if let Some(arm) = live.arm(version.version) {
                // Only the version's own failures count against it: engine errors, unavailability, and running
                // past the server's own timeout (not a deadline the client chose, nor a full queue).
                let server_error = answer.as_ref().is_err_and(|e| match e.kind {
                    ErrorKind::Internal | ErrorKind::Unavailable => true,
                    ErrorKind::DeadlineExceeded => !client_deadline,
                    _ => false,
                });
                arm.observe(start.elapsed(), server_error);
            }
        }
        let crate::core::batching::Answered {
            outputs: all,
            queue,
            compute,
        } = answer?;
        if let Some(drift) = drift {
            drift.observe_outputs(&all);
        }
        if let Some((target, inputs)) = shadow {
            self.spawn_shadow(&version, target, inputs, &all);
        }
        let outputs = match outputs {
            None => all,
            Some(names) => {
                let mut all = all;
                names
                    .iter()
                    .filter_map(|n| {
                        all.iter()
                            .position(|o| &o.name == n)
                            .map(|i| all.swap_remove(i))
                    })
                    .collect()
            }
        };
        if let Some((logger, inputs)) = logged {
            logger.log(crate::core::payload_log::PayloadRecord {
                model: version.model.clone(),
                version: version.version,
                id,
                latency: start.elapsed(),
                inputs,
                outputs: outputs.clone(),
            });
        }
        Ok(Prediction {
            outputs,
            timing: Timing {
                queue,
                compute,
                total: start.elapsed(),
            },
        })
    }
}

impl Infer {
    /// Queues inputs on a version and awaits the answer under `deadline`.
    async fn run(
        &self,
        version: &Arc<LoadedVersion>,
        inputs: Vec<NamedTensor>,
        start: Instant,
        deadline: Instant,
    ) -> Result<crate::core::batching::Answered, InferError> {
        let receiver = version.scheduler.submit(inputs, Some(deadline))?;
        self.await_answer(version, receiver, start, deadline).await
    }

    /// The earlier of `--request-timeout` from `start` and the client's own deadline.
    pub(crate) fn deadline(&self, start: Instant, client: Option<Instant>) -> Instant {
        let ours = start
            .checked_add(self.timeout)
            .unwrap_or(start + Duration::from_secs(86_400 * 365));
        client.map_or(ours, |d| d.min(ours))
    }

    /// Awaits a queued request's answer under `deadline`.
    pub(crate) async fn await_answer(
        &self,
        version: &Arc<LoadedVersion>,
        receiver: tokio::sync::oneshot::Receiver<crate::batching::Answer>,
        start: Instant,
        deadline: Instant,
    ) -> Result<crate::batching::Answered, InferError> {
        let late = || {
            let budget = deadline.saturating_duration_since(start).as_millis();
            InferError::new(
                ErrorKind::DeadlineExceeded,
                format!("inference did not finish within {budget} ms"),
            )
        };
        match tokio::time::timeout_at(deadline.into(), receiver).await {
            Err(_) => Err(late()),
            Ok(Err(_)) => {
                tracing::error!(model = %version.model, version = version.version, "inference task ended without an answer");
                Err(InferError::new(ErrorKind::Internal, "inference failed"))
            }
            Ok(Ok(Err(e))) if e.kind == ErrorKind::DeadlineExceeded => Err(late()),
            Ok(Ok(answer)) => answer.inspect_err(|e| {
                if e.kind == ErrorKind::Internal {
                    tracing::warn!(model = %version.model, version = version.version, error = %e, "inference failed");
                }
            }),
        }
    }

    /// Whether this request is one of the `fraction` copied to the shadow version (evenly spread, deterministic).
    fn shadow_sampled(&self, fraction: f64) -> bool {
        if fraction >= 1.0 {
            return true;
        }
        if fraction <= 0.0 {
            return false;
        }
        let n = self.shadow_counter.fetch_add(1, Ordering::Relaxed);
        ((n + 1) as f64 * fraction).floor() > (n as f64 * fraction).floor()
    }

    /// Runs a copy of a request on the shadow version after the live answer, off the client's path.
    fn spawn_shadow(
        &self,
        live: &Arc<LoadedVersion>,
        target: u64,
        inputs: Vec<NamedTensor>,
        answer: &[NamedTensor],
    ) {
        let model = live.model.clone();
        let Ok(shadow) = self.resolve(&model, &VersionSelector::Specific(target)) else {
            self.metrics.shadow_request(&model, target, "dropped");
            return;
        };
        if shadow.signature.inputs != live.signature.inputs {
            self.metrics.shadow_request(&model, target, "failed");
            return;
        }
        let Ok(permit) = self.shadow_permits.clone().try_acquire_owned() else {
            self.metrics.shadow_request(&model, target, "dropped");
            return;
        };
        let expected = answer.to_vec();
        let me = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let start = Instant::now();
            let deadline = start + me.timeout.min(Duration::from_secs(60));
            match me.run(&shadow, inputs, start, deadline).await {
                Ok(answered) => {
                    for (output, agreement) in
                        crate::metrics::shadow::compare(&expected, &answered.outputs)
                    {
                        me.metrics
                            .shadow_compared(&model, target, &output, &agreement);
                    }
                    me.metrics.shadow_request(&model, target, "compared");
                }
                Err(e) if e.kind == ErrorKind::Overloaded => {
                    me.metrics.shadow_request(&model, target, "dropped")
                }
                Err(_) => me.metrics.shadow_request(&model, target, "failed"),
            }
        });
    }
}

/// Finds the version `selector` names in one model's record (the body of [`Infer::resolve`], run under the store's
/// read lock).
fn resolve_in(
    record: &crate::core::repository::ModelRecord,
    model: &str,
    selector: &VersionSelector,
    key: Option<u64>,
) -> Result<Arc<LoadedVersion>, InferError> {
    let ready = |v: u64| {
        record
            .versions
            .get(&v)
            .filter(|s| s.state == VersionState::Ready)
            .and_then(|s| s.loaded.clone())
    };
    let version = match selector {
        VersionSelector::Latest => {
            use crate::core::rollout::{unversioned_target, Route};
            let route = record.rollout.as_ref().map(|live| {
                let (candidate, stable, state, to_candidate) = live.choose(key);
                Route {
                    candidate,
                    stable,
                    state,
                    to_candidate,
                }
            });
            let versions: Vec<u64> = record.versions.keys().copied().collect();
            // Any ready version can answer its rollout arm; a shadow-only one takes no other traffic.
            let chosen = unversioned_target(
                route,
                &versions,
                |v| ready(v).is_some(),
                |v| ready(v).is_some() && Some(v) != record.shadow_only,
            );
            if let Some(loaded) = chosen.and_then(ready) {
                return Ok(loaded);
            }
            let reasons: Vec<String> = record
                .versions
                .iter()
                .rev()
                .map(|(v, s)| match &s.state {
                    VersionState::Unavailable(r) => format!("version {v} is unavailable: {r}"),
                    other => format!("version {v} is {}", other.name()),
                })
                .collect();
            return Err(InferError::unavailable(if reasons.is_empty() {
                match &record.layout {
                    Some(layout) => format!("model `{model}` has no version to serve: {layout}"),
                    None => format!("model `{model}` has no version to serve"),
                }
            } else {
                format!(
                    "model `{model}` has no ready version ({})",
                    reasons.join("; ")
                )
            }));
        }
        VersionSelector::Specific(v) => *v,
        VersionSelector::Label(label) => record.label(label).ok_or_else(|| {
            // TF Serving answers an unknown label as INVALID_ARGUMENT; so does Ferry, on every route.
            InferError::invalid(format!("model `{model}` has no version label `{label}`"))
        })?,
    };
    let slot = record.versions.get(&version).ok_or_else(|| {
        InferError::not_found(format!("model `{model}` has no version {version}"))
    })?;
    match (&slot.state, &slot.loaded) {
        (VersionState::Ready, Some(loaded)) => Ok(loaded.clone()),
        (VersionState::Unavailable(reason), _) => Err(InferError::unavailable(format!(
            "version {version} of model `{model}` is unavailable: {reason}"
        ))),
        (state, _) => Err(InferError::unavailable(format!(
            "version {version} of model `{model}` is not ready ({})",
            state.name()
        ))),
    }
}

fn describe(specs: &[TensorSpec]) -> String {
    specs
        .iter()
        .map(|s| format!("`{}`", s.name))
        .collect::<Vec<_>>()
        .join(", ")
}
