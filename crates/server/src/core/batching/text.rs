//! Text batches: the tokenized texts of every request in a batch are sorted by length and cut into runs that waste
//! little padding, each run padded to its own longest text (never to the model's maximum), run on the engine, and
//! read back as one row per text: a pooled embedding, or a classifier's scores.

use std::time::{Duration, Instant};

use ferry_engine::Backend;
use ferry_model::{NamedTensor, Tensor, TensorData};
use ferry_text::{Pooling, Tokens};

use super::{queue, Answered, Entry, Job, TextOutput, Work};
use crate::error::{ErrorKind, InferError};

/// How a text model's graph is fed and read.
#[derive(Debug, Clone)]
pub struct Runner {
    /// The graph's token-id input.
    pub input_ids: String,
    /// Its attention-mask input, when it has one.
    pub attention_mask: Option<String>,
    /// Its token-type input, when it has one.
    pub token_type_ids: Option<String>,
    /// The output read back: `[texts, tokens, width]` (pooled here) or `[texts, width]` (taken as is).
    pub output: String,
    /// How a 3-D output is pooled; `None` refuses 3-D outputs (classifiers).
    pub pooling: Option<Pooling>,
    /// The output holding every token's vector (`[texts, tokens, width]`) and its width, when the model has one
    /// whose width the graph states: what TEI's `/embed_all` answers.
    pub token_output: Option<(String, usize)>,
    /// The id padding is filled with (masked out, so any valid id does).
    pub pad_id: u32,
}

/// The name of the one output a text answer carries.
pub const OUTPUT: &str = "output";

/// Below this many padded tokens a run is cheap whatever its padding: one engine call costs more than the waste.
const SMALL_RUN: usize = 512;

/// Groups texts (given sorted by length, as `lens`) into consecutive runs of at most `max_rows` texts and
/// `max_tokens` padded tokens, starting a new run when padding would exceed a quarter of a run that is not small.
pub fn plan_runs(
    lens: &[usize],
    max_rows: usize,
    max_tokens: usize,
) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let mut start = 0;
    let mut real = 0;
    for (i, len) in lens.iter().enumerate() {
        let n = i - start + 1;
        let padded = n * len;
        let fits = n <= max_rows.max(1)
            && padded <= max_tokens
            && (padded <= SMALL_RUN || (padded - (real + len)) * 4 <= padded);
        if i > start && !fits {
            runs.push(start..i);
            start = i;
            real = 0;
        }
        real += len;
    }
    if start < lens.len() {
        runs.push(start..lens.len());
    }
    runs
}

/// Where a text batch runs: the model's inputs and outputs, the engine, and how many threads may take its runs (this
/// one and the idle workers', whose sessions they borrow from the engine's pool).
#[derive(Clone, Copy)]
pub(super) struct Engine<'a> {
    pub runner: &'a Runner,
    pub backend: &'a dyn Backend,
    pub parallel: usize,
}

/// Runs a batch of text entries and answers each: one `[texts, width]` FP32 output per request. Runs go shortest
/// first, on up to `parallel` threads (the backend's session pool bounds how many run at once), and a request is
/// answered as soon as its last text has run: a short request that shares a batch with long ones does not wait for
/// them.
pub(super) fn run_batch(
    engine: Engine<'_>,
    limits: &queue::Limits,
    series: &crate::metrics::VersionSeries,
    batch: Vec<Entry<Job>>,
    waits: &[Duration],
    record: &(dyn Fn() + Sync),
) {
    let Engine {
        runner,
        backend,
        parallel,
    } = engine;
    let started = Instant::now();
    let (works, mut responders): (Vec<Work>, Vec<_>) = batch
        .into_iter()
        .map(|e| (e.item.work, Some(e.item.respond)))
        .unzip();
    let texts: Vec<&[Tokens]> = works
        .iter()
        .map(|w| match w {
            Work::Texts(t, _) => t.as_slice(),
            Work::Tensors(_) => &[],
        })
        .collect();
    let per_token: Vec<bool> = works
        .iter()
        .map(|w| matches!(w, Work::Texts(_, TextOutput::Tokens { .. })))
        .collect();
    // Every text of the batch as (request, index), shortest first.
    let mut order: Vec<(usize, usize)> = texts
        .iter()
        .enumerate()
        .flat_map(|(j, t)| (0..t.len()).map(move |i| (j, i)))
        .collect();
    order.sort_by_key(|(j, i)| texts[*j][*i].len());
    let lens: Vec<usize> = order.iter().map(|(j, i)| texts[*j][*i].len()).collect();
    let rows: Vec<Vec<Option<Vec<f32>>>> = texts.iter().map(|t| vec![None; t.len()]).collect();
    let left: Vec<usize> = texts.iter().map(|t| t.len()).collect();
    let failed: Vec<Option<InferError>> = texts.iter().map(|_| None).collect();
    let answer = |j: usize, rows: Vec<Option<Vec<f32>>>, failed: Option<InferError>| match failed {
        Some(e) => Err(e),
        None => collect(rows, per_token[j].then_some(texts[j])).map(|output| Answered {
            outputs: vec![output],
            queue: waits.get(j).copied().unwrap_or_default(),
            compute: started.elapsed(),
        }),
    };
    let runs = plan_runs(&lens, limits.max_batch_size, limits.max_batch_tokens);
    let total = runs.len();
    // Runs are taken in order (shortest first) by `parallel` threads, this one and helpers using the sessions of
    // idle workers: a lone request of many texts uses every idle core, not one.
    struct Progress {
        rows: Vec<Vec<Option<Vec<f32>>>>,
        left: Vec<usize>,
        failed: Vec<Option<InferError>>,
        done: usize,
        recorded: bool,
    }
    let progress = parking_lot::Mutex::new(Progress {
        rows,
        left,
        failed,
        done: 0,
        recorded: false,
    });
    let waiting = parking_lot::Mutex::new(&mut responders);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let take_runs = || loop {
        let r = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(run) = runs.get(r) else { return };
        let members = &order[run.clone()];
        let seqs: Vec<&Tokens> = members.iter().map(|(j, i)| &texts[*j][*i]).collect();
        let longest = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        series.text_run(seqs.iter().map(|s| s.len()).sum(), longest * seqs.len());
        let whole: Vec<bool> = members.iter().map(|(j, _)| per_token[*j]).collect();
        let out = run_once(runner, backend, &seqs, &whole);
        let mut p = progress.lock();
        match out {
            Ok(out) => {
                for ((j, i), row) in members.iter().zip(out) {
                    p.rows[*j][*i] = Some(row);
                }
            }
            Err(e) => {
                for (j, _) in members {
                    p.failed[*j] = Some(e.clone());
                }
            }
        }
        p.done += 1;
        // The batch is recorded before the last run's requests are answered (a lone request scraping `/metrics`
        // after its answer sees its batch counted); requests answered earlier may be ahead of the count.
        if p.done == total {
            record();
            p.recorded = true;
        }
        for (j, _) in members {
            p.left[*j] -= 1;
            if p.left[*j] == 0 {
                let done = (std::mem::take(&mut p.rows[*j]), p.failed[*j].take());
                if let Some(respond) = waiting.lock()[*j].take() {
                    let _ = respond.send(answer(*j, done.0, done.1));
                }
            }
        }
    };
    let helpers = parallel.clamp(1, total.max(1)) - 1;
    if helpers == 0 {
        take_runs();
    } else {
        std::thread::scope(|scope| {
            for _ in 0..helpers {
                scope.spawn(take_runs);
            }
            take_runs();
        });
    }
    let Progress {
        mut rows,
        mut failed,
        recorded,
        ..
    } = progress.into_inner();
    let _ = waiting.into_inner();
    if !recorded {
        record();
    }
    // Requests with no texts (none reach here; answered for completeness).
    for (j, respond) in responders.iter_mut().enumerate() {
        if let Some(respond) = respond.take() {
            let _ = respond.send(answer(j, std::mem::take(&mut rows[j]), failed[j].take()));
        }
    }
}

/// One request's rows as a `[texts, width]` tensor, or, for a request of every token's vector (`tokens` gives its
/// texts), its texts' token vectors one after another as `[tokens, width]`.
fn collect(
    rows: Vec<Option<Vec<f32>>>,
    tokens: Option<&[Tokens]>,
) -> Result<NamedTensor, InferError> {
    let n = match tokens {
        Some(texts) => texts.iter().map(Tokens::len).sum(),
        None => rows.len(),
    };
    let mut data = Vec::with_capacity(rows.iter().flatten().map(Vec::len).sum());
    for row in rows {
        let row =
            row.ok_or_else(|| InferError::new(ErrorKind::Internal, "a text got no answer"))?;
        data.extend_from_slice(&row);
    }
    let width = data.len().checked_div(n).unwrap_or(0);
    let tensor = Tensor::new(vec![n, width], TensorData::F32(data))
        .map_err(|e| InferError::new(ErrorKind::Internal, e.to_string()))?;
    Ok(NamedTensor::new(OUTPUT, tensor))
}

/// Runs `seqs` on the engine as one padded batch and reads one row per text (pooled, or a classifier's scores):
/// for callers outside the queue (token attributions).
pub fn run_direct(
    runner: &Runner,
    backend: &dyn Backend,
    seqs: &[&Tokens],
) -> Result<Vec<Vec<f32>>, InferError> {
    run_once(runner, backend, seqs, &vec![false; seqs.len()])
}

/// Pads `seqs` to the longest, runs the engine once, and reads one row per text: pooled, or (where `per_token` says)
/// the text's token vectors one after another, padding left out.
fn run_once(
    runner: &Runner,
    backend: &dyn Backend,
    seqs: &[&Tokens],
    per_token: &[bool],
) -> Result<Vec<Vec<f32>>, InferError> {
    let n = seqs.len();
    let len = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut ids = vec![i64::from(runner.pad_id); n * len];
    let mut mask = vec![0i64; n * len];
    let mut types = vec![0i64; n * len];
    for (r, s) in seqs.iter().enumerate() {
        for (k, id) in s.ids.iter().enumerate() {
            ids[r * len + k] = i64::from(*id);
            mask[r * len + k] = 1;
            types[r * len + k] = i64::from(s.type_id(k));
        }
    }
    let internal =
        |e: ferry_model::ShapeMismatch| InferError::new(ErrorKind::Internal, e.to_string());
    let tensor = |name: &str, data| {
        Tensor::new(vec![n, len], TensorData::I64(data))
            .map(|t| NamedTensor::new(name, t))
            .map_err(internal)
    };
    let mut inputs = vec![tensor(&runner.input_ids, ids)?];
    if let Some(name) = &runner.attention_mask {
        inputs.push(tensor(name, mask.clone())?);
    }
    if let Some(name) = &runner.token_type_ids {
        inputs.push(tensor(name, types)?);
    }
    let outputs = backend.predict(inputs).map_err(InferError::from)?;
    let pooled = if per_token.iter().all(|t| *t) {
        None
    } else {
        Some(read(&outputs, &runner.output, n, len)?)
    };
    let tokens = match (per_token.iter().any(|t| *t), &runner.token_output) {
        (false, _) => None,
        (true, Some((name, _))) => Some(read(&outputs, name, n, len)?),
        (true, None) => {
            return Err(InferError::new(
                ErrorKind::Internal,
                "the model has no per-token output",
            ))
        }
    };
    let mut rows = Vec::with_capacity(n);
    for (r, s) in seqs.iter().enumerate() {
        let row = match (per_token.get(r).copied().unwrap_or(false), &pooled, &tokens) {
            (
                true,
                _,
                Some(Read {
                    values,
                    shape: [_, _, width],
                }),
            ) => {
                let stride = len * width;
                values[r * stride..r * stride + s.len() * width].to_vec()
            }
            (
                false,
                Some(Read {
                    values,
                    shape: [_, width],
                }),
                _,
            ) => values[r * width..(r + 1) * width].to_vec(),
            (
                false,
                Some(Read {
                    values,
                    shape: [_, _, width],
                }),
                _,
            ) => {
                let stride = len * width;
                let vectors = &values[r * stride..(r + 1) * stride];
                match runner.pooling {
                    Some(pooling) => ferry_text::pool(pooling, vectors, *width, s.len()),
                    None => {
                        return Err(InferError::new(
                            ErrorKind::Internal,
                            format!(
                                "output `{}` is per token and the model has no pooling",
                                runner.output
                            ),
                        ))
                    }
                }
            }
            _ => {
                return Err(InferError::new(
                    ErrorKind::Internal,
                    "a text's output was not read",
                ))
            }
        };
        rows.push(row);
    }
    Ok(rows)
}

/// An FP32 output read back: `[texts, width]` or `[texts, tokens, width]` (its shape checked against the run).
struct Read<'a> {
    values: &'a [f32],
    shape: &'a [usize],
}

/// Reads output `name` of a run of `n` texts padded to `len` tokens.
fn read<'a>(
    outputs: &'a [NamedTensor],
    name: &str,
    n: usize,
    len: usize,
) -> Result<Read<'a>, InferError> {
    let internal = |m: String| InferError::new(ErrorKind::Internal, m);
    let out = outputs
        .iter()
        .find(|o| o.name == name)
        .ok_or_else(|| internal(format!("the model gave no output `{name}`")))?;
    let TensorData::F32(values) = &out.tensor.data else {
        return Err(internal(format!(
            "output `{name}` is {}, not FP32",
            out.tensor.dtype()
        )));
    };
    let shape = out.tensor.shape.as_slice();
    let fits = match shape {
        [rows, width] => *rows == n && values.len() == n * width,
        [rows, tokens, width] => *rows == n && *tokens == len && values.len() == n * len * width,
        _ => false,
    };
    if !fits {
        return Err(internal(format!(
            "output `{name}` has shape {shape:?} for {n} texts of {len} tokens"
        )));
    }
    Ok(Read { values, shape })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An engine giving each text `[first id, tokens]`, that sees at each call which of `watched` were answered.
    struct Watching {
        signature: ferry_model::Signature,
        watched: parking_lot::Mutex<Vec<tokio::sync::oneshot::Receiver<super::super::Answer>>>,
        seen: parking_lot::Mutex<Vec<Vec<bool>>>,
    }

    impl Backend for Watching {
        fn signature(&self) -> &ferry_model::Signature {
            &self.signature
        }
        fn predict(
            &self,
            inputs: Vec<NamedTensor>,
        ) -> Result<Vec<NamedTensor>, ferry_engine::EngineError> {
            let answered = self
                .watched
                .lock()
                .iter_mut()
                .map(|r| !r.is_empty())
                .collect();
            self.seen.lock().push(answered);
            let t = &inputs[0].tensor;
            let (n, len) = (t.shape[0], t.shape[1]);
            let TensorData::I64(ids) = &t.data else {
                unreachable!()
            };
            let data = (0..n)
                .flat_map(|r| [ids[r * len] as f32, len as f32])
                .collect();
            Ok(vec![NamedTensor::new(
                "out",
                Tensor::new(vec![n, 2], TensorData::F32(data)).unwrap(),
            )])
        }
        fn engine_name(&self) -> &'static str {
            "watching"
        }
    }

    /// A queued request of texts of the given lengths (each text repeats its length as its ids), and its receiver.
    fn job(
        lens: &[usize],
    ) -> (
        Entry<Job>,
        tokio::sync::oneshot::Receiver<super::super::Answer>,
    ) {
        let (respond, receiver) = tokio::sync::oneshot::channel();
        let texts = lens
            .iter()
            .map(|n| Tokens {
                ids: vec![*n as u32; *n],
                type_ids: Vec::new(),
            })
            .collect();
        let entry = Entry {
            item: Job {
                work: Work::Texts(texts, TextOutput::Pooled),
                respond,
            },
            rows: lens.len(),
            tokens: lens.iter().sum(),
            key: Vec::new(),
            enqueued: Instant::now(),
            deadline: None,
            solo: false,
        };
        (entry, receiver)
    }

    /// A model reading `ids` and answering `out`, and batches of at most two texts.
    fn runner_and_limits() -> (Runner, queue::Limits) {
        let runner = Runner {
            input_ids: "ids".into(),
            attention_mask: None,
            token_type_ids: None,
            output: "out".into(),
            pooling: None,
            token_output: None,
            pad_id: 0,
        };
        let limits = queue::Limits {
            max_batch_size: 2,
            max_queue_delay: Duration::ZERO,
            preferred_batch_sizes: Vec::new(),
            max_queue_size: 8,
            max_batch_tokens: 16_384,
        };
        (runner, limits)
    }

    #[test]
    fn a_short_request_is_answered_before_the_long_runs_of_its_batch() {
        // A long request (two runs of 2 texts: the row limit is 2) then a short one.
        let (long, long_rx) = job(&[300, 300, 310, 310]);
        let (short, short_rx) = job(&[3]);
        let backend = Watching {
            signature: Default::default(),
            watched: parking_lot::Mutex::new(vec![short_rx, long_rx]),
            seen: Default::default(),
        };
        let (runner, limits) = runner_and_limits();
        let metrics = crate::metrics::Metrics::new(crate::metrics::MetricsOptions::default());
        let engine = Engine {
            runner: &runner,
            backend: &backend,
            parallel: 1,
        };
        run_batch(
            engine,
            &limits,
            &metrics.version_series("m", 1),
            vec![long, short],
            &[Duration::ZERO; 2],
            &|| {},
        );
        // Runs: [3], [300, 300], [310, 310]: the short text runs first and is answered at once.
        let seen = backend.seen.lock().clone();
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[0], [false, false]);
        assert_eq!(
            seen[1],
            [true, false],
            "the short request waited for the long runs"
        );
        let mut watched = backend.watched.lock();
        let short = watched[0].try_recv().unwrap().unwrap();
        let long = watched[1].try_recv().unwrap().unwrap();
        let values = |a: &super::super::Answered| match &a.outputs[0].tensor.data {
            TensorData::F32(v) => v.clone(),
            _ => unreachable!(),
        };
        assert_eq!(values(&short), [3.0, 3.0]);
        // Each request's rows in its own order, padded per run.
        assert_eq!(
            values(&long),
            [300.0, 300.0, 300.0, 300.0, 310.0, 310.0, 310.0, 310.0]
        );
    }

    #[test]
    fn runs_group_similar_lengths_within_the_limits() {
        // Short texts share one run whatever their padding (it is small); long ones split where padding would
        // exceed a quarter.
        assert_eq!(plan_runs(&[3, 5, 9], 64, 16_384), vec![0..3]);
        assert_eq!(
            plan_runs(&[100, 110, 120, 300, 310], 64, 16_384),
            vec![0..3, 3..5]
        );
        // The token and row limits cut runs too.
        assert_eq!(plan_runs(&[100, 100, 100], 64, 250), vec![0..2, 2..3]);
        assert_eq!(plan_runs(&[4, 4, 4], 2, 16_384), vec![0..2, 2..3]);
        // A text over the token budget still runs, alone.
        assert_eq!(plan_runs(&[900], 64, 512), vec![0..1]);
        assert!(plan_runs(&[], 64, 512).is_empty());
    }

    /// An engine that answers each text with its first id, slowly, and counts the calls running at once.
    #[derive(Default)]
    struct Counting {
        signature: ferry_model::Signature,
        running: std::sync::atomic::AtomicUsize,
        most: std::sync::atomic::AtomicUsize,
    }

    impl Backend for Counting {
        fn signature(&self) -> &ferry_model::Signature {
            &self.signature
        }
        fn predict(
            &self,
            inputs: Vec<NamedTensor>,
        ) -> Result<Vec<NamedTensor>, ferry_engine::EngineError> {
            use std::sync::atomic::Ordering::SeqCst;
            let now = self.running.fetch_add(1, SeqCst) + 1;
            self.most.fetch_max(now, SeqCst);
            std::thread::sleep(Duration::from_millis(100));
            self.running.fetch_sub(1, SeqCst);
            let t = &inputs[0].tensor;
            let (n, len) = (t.shape[0], t.shape[1]);
            let TensorData::I64(ids) = &t.data else {
                unreachable!()
            };
            let data = (0..n).map(|r| ids[r * len] as f32).collect();
            Ok(vec![NamedTensor::new(
                "out",
                Tensor::new(vec![n, 1], TensorData::F32(data)).unwrap(),
            )])
        }
        fn engine_name(&self) -> &'static str {
            "counting"
        }
    }

    #[test]
    fn a_lone_request_of_many_texts_runs_on_every_idle_session() {
        for parallel in [1, 2, 3] {
            // Eight texts of different lengths, two per run: four runs.
            let lens = [5usize, 9, 3, 7, 4, 8, 6, 2];
            let (entry, mut receiver) = job(&lens);
            let backend = Counting::default();
            let (runner, limits) = runner_and_limits();
            let metrics = crate::metrics::Metrics::new(crate::metrics::MetricsOptions::default());
            let recorded = std::sync::atomic::AtomicUsize::new(0);
            let engine = Engine {
                runner: &runner,
                backend: &backend,
                parallel,
            };
            run_batch(
                engine,
                &limits,
                &metrics.version_series("m", 1),
                vec![entry],
                &[Duration::ZERO],
                &|| {
                    recorded.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                },
            );
            // Every text gets its own row back, in the request's order, whatever ran where.
            let answer = receiver.try_recv().unwrap().unwrap();
            let TensorData::F32(rows) = &answer.outputs[0].tensor.data else {
                unreachable!()
            };
            let want: Vec<f32> = lens.iter().map(|n| *n as f32).collect();
            assert_eq!(rows, &want);
            assert_eq!(recorded.load(std::sync::atomic::Ordering::SeqCst), 1);
            // At most `parallel` runs at once, and as many as allowed when there are runs for them (four here).
            let most = backend.most.load(std::sync::atomic::Ordering::SeqCst);
            assert_eq!(most, parallel, "parallel = {parallel}");
        }
    }
}
