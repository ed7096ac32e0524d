//! Dynamic batching and backpressure for one model version.
//!
//! Every request for a version goes through its [`Scheduler`]: a bounded queue ([`queue::State`], the pure policy)
//! drained by `instances` worker threads, one per engine session (TEI's `BackendThread`, TGI's queue actor). A worker
//! that is free locks the queue, asks the policy for a batch, and runs it; so batches grow exactly while every worker
//! is busy. A batch's inputs are concatenated along the first dimension, the engine runs once, outputs are split
//! back by rows and each request's oneshot is answered. With `max_batch_size` 0 or 1 every request runs alone
//! through the same queue, which still gives backpressure: a full queue is refused at once (429), and work whose
//! deadline passed or whose client left is dropped before it reaches the engine.
//!
//! Workers are plain OS threads blocked on a condition variable, not tasks on the async runtime: inference never
//! runs on the runtime, and a request crosses threads only twice (handler to worker, worker to handler).

pub mod queue;
pub mod text;

use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use std::time::Instant;

use ferry_engine::Backend;
use ferry_model::{NamedTensor, Tensor, TensorData};

use tokio::sync::oneshot;

use crate::error::{ErrorKind, InferError};
use queue::{Decision, Entry, Limits, State};

/// A successful answer: the outputs, how long the request waited in the queue, and the engine time of the batch
/// it ran in.
#[derive(Debug)]
pub struct Answered {
    /// The outputs, in signature order.
    pub outputs: Vec<NamedTensor>,
    /// Time from entering the queue to the start of its batch.
    pub queue: std::time::Duration,
    /// Engine time of its batch (joining, running, splitting).
    pub compute: std::time::Duration,
}

/// The answer to one queued request.
pub type Answer = Result<Answered, InferError>;

/// One queued request.
#[derive(Debug)]
pub struct Job {
    work: Work,
    respond: oneshot::Sender<Answer>,
}

/// What a request brings: tensors, or tokenized texts that the worker pads into a batch.
#[derive(Debug)]
enum Work {
    Tensors(Vec<NamedTensor>),
    Texts(Vec<ferry_text::Tokens>, TextOutput),
}

/// What a text request gets back for each of its texts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextOutput {
    /// One row per text: its pooled embedding, or a classifier's scores (`[texts, width]`).
    Pooled,
    /// Every token's vector before pooling, the texts one after another (`[tokens of all texts, width]`); TEI's
    /// `/embed_all`. Only for models with a per-token output of a stated width; refused before it queues when the
    /// answer would hold more than `max_values` numbers.
    Tokens {
        /// The most numbers the answer may hold.
        max_values: usize,
    },
}

impl Work {
    fn tensors(&mut self) -> Vec<NamedTensor> {
        match self {
            Work::Tensors(t) => std::mem::take(t),
            Work::Texts(..) => Vec::new(),
        }
    }
}

struct Shared {
    state: Mutex<State<Job>>,
    wake: Condvar,
    backend: Arc<dyn Backend>,
    batchable: bool,
    label: String,
    /// The version's metric series: batches record into it without a lock.
    series: Arc<crate::metrics::VersionSeries>,
    closed: std::sync::atomic::AtomicBool,
    /// Workers waiting on `wake`, changed and read only under `state`'s lock: a request that finds none asleep
    /// skips the wake-up (a system call) because a busy worker will take it when its batch is done.
    sleeping: std::sync::atomic::AtomicUsize,
    /// How text batches are padded and read back, for a text model.
    text: Option<text::Runner>,
    limits: Limits,
}

/// The queue and workers of one model version. Dropping it stops the workers once the queue is empty.
pub struct Scheduler {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("model", &self.shared.label)
            .field("batchable", &self.shared.batchable)
            .finish()
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.shared
            .closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.shared.wake.notify_all();
    }
}

/// Whether a backend can take several requests stacked along the first dimension: every input and output has a
/// dynamic first dimension.
pub fn can_batch(sig: &ferry_model::Signature) -> bool {
    let dynamic_first =
        |s: &ferry_model::TensorSpec| s.shape.as_ref().is_some_and(|d| d.first() == Some(&-1));
    !sig.inputs.is_empty()
        && sig.inputs.iter().all(dynamic_first)
        && sig.outputs.iter().all(dynamic_first)
}

impl Scheduler {
    /// Starts the workers of one version: `instances` threads, as many as the engine has sessions, so that many
    /// batches run at once. Batching is turned off when the model cannot batch.
    pub fn start(
        backend: Arc<dyn Backend>,
        signature: &ferry_model::Signature,
        mut limits: Limits,
        instances: usize,
        model: (String, u64),
        metrics: Arc<crate::metrics::Metrics>,
        text: Option<text::Runner>,
    ) -> Scheduler {
        let label = format!("{}/{}", model.0, model.1);
        let batchable = can_batch(signature);
        if limits.max_batch_size > 1 && !batchable {
            tracing::warn!(model = %label, "dynamic batching is off: the model's inputs and outputs need a dynamic first dimension");
            limits.max_batch_size = 1;
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(limits.clone())),
            text,
            limits,
            wake: Condvar::new(),
            backend,
            batchable,
            label,
            series: metrics.version_series(&model.0, model.1),
            closed: std::sync::atomic::AtomicBool::new(false),
            sleeping: std::sync::atomic::AtomicUsize::new(0),
        });
        for i in 0..instances.max(1) {
            let shared = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("ferry-worker-{}-{i}", shared.label))
                .spawn(move || worker(&shared));
            if let Err(e) = spawned {
                // With at least one worker the version still serves; with none, requests time out with 504.
                tracing::error!(error = %e, "cannot start a worker thread");
            }
        }
        Scheduler { shared }
    }

    /// Queues validated inputs; the receiver gets the answer. Refused at once when the queue is full.
    pub fn submit(
        &self,
        inputs: Vec<NamedTensor>,
        deadline: Option<Instant>,
    ) -> Result<oneshot::Receiver<Answer>, InferError> {
        let (respond, receiver) = oneshot::channel();
        let first = |i: &NamedTensor| i.tensor.shape.first().copied();
        let rows = if self.shared.batchable {
            inputs.first().and_then(first).unwrap_or(1)
        } else {
            1
        };
        // Inputs that disagree on the first dimension (possible with broadcasting models) cannot be split by rows.
        let solo = self.shared.batchable && inputs.iter().any(|i| first(i) != Some(rows));
        let key = inputs
            .iter()
            .map(|i| {
                (
                    i.tensor.dtype(),
                    i.tensor.shape.get(1..).unwrap_or(&[]).to_vec(),
                )
            })
            .collect();
        let entry = Entry {
            item: Job {
                work: Work::Tensors(inputs),
                respond,
            },
            rows,
            tokens: 0,
            key,
            enqueued: Instant::now(),
            deadline,
            solo,
        };
        self.push(entry)?;
        Ok(receiver)
    }

    /// How a text model's graph is fed and read, for a text model's scheduler.
    pub fn text_runner(&self) -> Option<&text::Runner> {
        self.shared.text.as_ref()
    }

    /// Queues tokenized texts of a text model; the answer holds one row per text (its pooled embedding or its
    /// scores) in one output. Refused at once when the queue is full.
    pub fn submit_texts(
        &self,
        texts: Vec<ferry_text::Tokens>,
        output: TextOutput,
        deadline: Option<Instant>,
    ) -> Result<oneshot::Receiver<Answer>, InferError> {
        if self.shared.text.is_none() {
            return Err(InferError::invalid(format!(
                "model `{}` is not a text model",
                self.shared.label
            )));
        }
        if let (TextOutput::Tokens { max_values }, Some(runner)) = (output, &self.shared.text) {
            let Some((_, width)) = &runner.token_output else {
                return Err(InferError::invalid(format!(
                    "model `{}` gives no per-token vectors (its graph has no `token_embeddings` or \
                     `last_hidden_state` output of a stated width)",
                    self.shared.label
                )));
            };
            let tokens: usize = texts.iter().map(ferry_text::Tokens::len).sum();
            let values = tokens.saturating_mul(*width);
            if values > max_values {
                return Err(InferError::invalid(format!(
                    "the answer would hold {tokens} token vectors of {width} numbers ({values}); a request of this \
                     size may get at most {max_values}: split the request"
                )));
            }
        }
        let (respond, receiver) = oneshot::channel();
        let entry = Entry {
            rows: texts.len(),
            tokens: texts.iter().map(ferry_text::Tokens::len).sum(),
            item: Job {
                work: Work::Texts(texts, output),
                respond,
            },
            key: Vec::new(),
            enqueued: Instant::now(),
            deadline,
            solo: false,
        };
        self.push(entry)?;
        Ok(receiver)
    }

    fn push(&self, entry: Entry<Job>) -> Result<(), InferError> {
        let mut state = self.shared.state.lock();
        let refused = match state.push(entry) {
            Ok(()) => false,
            Err((_, entry)) => {
                // Before refusing, drop entries whose clients have gone (they may have timed out while the engine
                // was busy), then try once more.
                let gone = state.remove_stale(Instant::now(), |job| !job.respond.is_closed());
                let refused = state.push(entry).is_err();
                for e in gone {
                    let _ = e.item.respond.send(Err(late_in_queue()));
                }
                refused
            }
        };
        let asleep = self
            .shared
            .sleeping
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0;
        drop(state);
        if refused {
            return Err(InferError::new(
                ErrorKind::Overloaded,
                format!(
                    "model `{}` is overloaded: its queue is full, retry later",
                    self.shared.label
                ),
            ));
        }
        if asleep {
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    /// The version's metric series, for requests to record into.
    pub fn series(&self) -> &Arc<crate::metrics::VersionSeries> {
        &self.shared.series
    }

    /// Answers every queued request with 503 "server shutting down" (when the shutdown grace period ran out) and
    /// returns how many there were. Batches already running are left to finish.
    pub fn cut(&self) -> usize {
        let mut state = self.shared.state.lock();
        let queued = state.remove_stale(Instant::now(), |_| false);
        drop(state);
        let n = queued.len();
        for e in queued {
            let _ = e
                .item
                .respond
                .send(Err(InferError::unavailable("server shutting down")));
        }
        n
    }

    /// How many requests wait.
    pub fn queue_len(&self) -> usize {
        self.shared.state.lock().len()
    }
}

/// The answer to a request whose deadline passed while it waited.
fn late_in_queue() -> InferError {
    InferError::new(
        ErrorKind::DeadlineExceeded,
        "the request's deadline passed while it waited in the queue",
    )
}

/// One worker thread: take a batch when the policy says so, run it, repeat; exit once closed and empty.
fn worker(shared: &Shared) {
    let mut state = shared.state.lock();
    loop {
        let now = Instant::now();
        for e in state.remove_stale(now, |job| !job.respond.is_closed()) {
            // Whoever is still waiting past the deadline hears why; a client that left hears nothing.
            let _ = e.item.respond.send(Err(late_in_queue()));
        }
        match state.next_batch(now) {
            Decision::Batch(batch, reason) => {
                drop(state);
                tracing::trace!(model = %shared.label, size = batch.len(), ?reason, "batch cut");
                let waits: Vec<_> = batch
                    .iter()
                    .map(|e| now.saturating_duration_since(e.enqueued))
                    .collect();
                let rows: usize = batch.iter().map(|e| e.rows).sum();
                let started = Instant::now();
                // A panic inside the engine must not take the worker with it: its requests get an error (their
                // oneshots are dropped) and the worker goes on.
                // The batch is recorded before its requests are answered, so a client that scrapes `/metrics`
                // after its answer sees its batch counted.
                let record = || shared.series.batch(&waits, started.elapsed(), rows);
                let ran =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &shared.text {
                        Some(runner) if batch[0].key.is_empty() => text::run_batch(
                            text::Engine {
                                runner,
                                backend: shared.backend.as_ref(),
                                // This worker, and the idle ones whose sessions its runs may borrow.
                                parallel: 1 + shared
                                    .sleeping
                                    .load(std::sync::atomic::Ordering::Relaxed),
                            },
                            &shared.limits,
                            &shared.series,
                            batch,
                            &waits,
                            &record,
                        ),
                        _ => run_batch(shared.backend.as_ref(), batch, &waits, &record),
                    }));
                if ran.is_err() {
                    tracing::error!(model = %shared.label, "the engine panicked while running a batch");
                    record();
                }
                state = shared.state.lock();
            }
            Decision::Idle => {
                if shared.closed.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                shared
                    .sleeping
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                shared.wake.wait(&mut state);
                shared
                    .sleeping
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
            Decision::WaitUntil(at) => {
                let wait = at.saturating_duration_since(now);
                shared
                    .sleeping
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                shared.wake.wait_for(&mut state, wait);
                shared
                    .sleeping
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

/// Runs one batch on the engine and answers every request in it (`waits[i]` is how long request `i` queued);
/// `record` runs once the engine is done, before any answer goes out.
fn run_batch(
    backend: &dyn Backend,
    mut batch: Vec<Entry<Job>>,
    waits: &[std::time::Duration],
    record: &dyn Fn(),
) {
    let started = Instant::now();
    let answered = |outputs, queue| Answered {
        outputs,
        queue,
        compute: started.elapsed(),
    };
    if batch.len() == 1 {
        let mut e = batch.pop().expect("one entry");
        let answer = backend
            .predict(e.item.work.tensors())
            .map_err(InferError::from);
        record();
        let _ = e.item.respond.send(answer.map(|o| answered(o, waits[0])));
        return;
    }
    let rows: Vec<usize> = batch.iter().map(|e| e.rows).collect();
    let total: usize = rows.iter().sum();
    let mut jobs: Vec<Job> = batch.into_iter().map(|e| e.item).collect();
    let answer = concat_inputs(&jobs, total)
        .and_then(|inputs| backend.predict(inputs).map_err(InferError::from));
    // Each request's own inputs stay until the batch has succeeded, in case it must be re-run request by request.
    let originals: Vec<Vec<NamedTensor>> = jobs.iter_mut().map(|j| j.work.tensors()).collect();
    match answer.and_then(|outputs| split_outputs(outputs, &rows, total)) {
        Ok(parts) => {
            record();
            for ((job, part), wait) in jobs.into_iter().zip(parts).zip(waits) {
                let _ = job.respond.send(Ok(answered(part, *wait)));
            }
        }
        Err(e) => {
            // One request's bad data must not fail its neighbours: answer each request from its own run.
            tracing::debug!(error = %e, "batch failed; running its requests one by one");
            let answers: Vec<_> = originals
                .into_iter()
                .map(|inputs| backend.predict(inputs).map_err(InferError::from))
                .collect();
            record();
            for ((job, answer), wait) in jobs.into_iter().zip(answers).zip(waits) {
                let _ = job.respond.send(answer.map(|o| answered(o, *wait)));
            }
        }
    }
}

fn concat_inputs(jobs: &[Job], total: usize) -> Result<Vec<NamedTensor>, InferError> {
    let tensors: Vec<&[NamedTensor]> = jobs
        .iter()
        .map(|j| match &j.work {
            Work::Tensors(t) => t.as_slice(),
            Work::Texts(..) => &[],
        })
        .collect();
    let count = tensors[0].len();
    let mut inputs = Vec::with_capacity(count);
    for i in 0..count {
        let parts: Vec<&TensorData> = tensors.iter().map(|t| &t[i].tensor.data).collect();
        let data = TensorData::concat(&parts)
            .expect("entries in one batch share input types (same batch key)");
        let mut shape = tensors[0][i].tensor.shape.clone();
        shape[0] = total;
        let tensor = Tensor::new(shape, data)
            .map_err(|e| InferError::new(ErrorKind::Internal, e.to_string()))?;
        inputs.push(NamedTensor::new(tensors[0][i].name.clone(), tensor));
    }
    Ok(inputs)
}

/// Splits each output's rows back to the requests, in order.
fn split_outputs(
    outputs: Vec<NamedTensor>,
    rows: &[usize],
    total: usize,
) -> Result<Vec<Vec<NamedTensor>>, InferError> {
    let mut parts: Vec<Vec<NamedTensor>> = rows
        .iter()
        .map(|_| Vec::with_capacity(outputs.len()))
        .collect();
    for out in outputs {
        if out.tensor.shape.first() != Some(&total) {
            return Err(InferError::new(
                ErrorKind::Internal,
                format!(
                    "output `{}` has shape {:?}, which cannot be split into {total} batched rows",
                    out.name, out.tensor.shape
                ),
            ));
        }
        let stride = ferry_model::element_count(&out.tensor.shape[1..]).ok_or_else(|| {
            InferError::new(
                ErrorKind::Internal,
                format!("output `{}` has an impossible shape", out.name),
            )
        })?;
        let mut start = 0;
        for (part, n) in parts.iter_mut().zip(rows) {
            let mut shape = out.tensor.shape.clone();
            shape[0] = *n;
            let data = out.tensor.data.slice(start * stride..(start + n) * stride);
            start += n;
            part.push(NamedTensor {
                name: out.name.clone(),
                tensor: Tensor { shape, data },
                keys: out.keys.clone(),
            });
        }
    }
    Ok(parts)
}
