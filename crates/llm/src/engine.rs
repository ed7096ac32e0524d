//! The engine thread: one llama.cpp context per model, every sequence in one continuous batch.
//!
//! Each step (one `llama_decode`): every decoding sequence adds its last token, then prompts being processed add
//! up to `prefill_chunk` tokens between them, oldest first, so a long prompt is spread over several steps and
//! never stalls the streams already decoding. Sequences are admitted from a bounded FIFO queue when a sequence
//! slot is free and their reservation (prompt + `max_tokens` KV cells) fits `max_total_tokens`, so a running
//! sequence never runs out of cache; they leave when they finish or when their receiver is dropped (the client
//! went away), and their cells are freed before the next step.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use parking_lot::{Condvar, Mutex};
use tokio::sync::mpsc;

use crate::sampler::{self, Sampler, Sampling};
use crate::stream::{Released, TextStream};
use crate::{LlmError, Settings};

/// What a request asks of generation.
#[derive(Debug, Clone, Default)]
pub struct Params {
    /// Tokens to generate at most; `None` is as many as the context and `max_new_tokens` allow.
    pub max_tokens: Option<u32>,
    /// How tokens are chosen.
    pub sampling: Sampling,
    /// Texts that end the answer (not included in it).
    pub stop: Vec<String>,
    /// Log-probabilities: `Some(n)` gives the chosen token's and the `n` most likely tokens' at each step.
    pub logprobs: Option<u32>,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The model's end token or a stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
}

impl Finish {
    /// OpenAI's `finish_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// The log-probability of a generated token, and of the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Logprob {
    /// The token's text (lossy where it is part of a UTF-8 character) and bytes.
    pub token: String,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Its log-probability under the model (the log-softmax of the raw logits).
    pub logprob: f32,
    /// The most likely tokens at this step, most likely first: text, bytes, log-probability.
    pub top: Vec<(String, Vec<u8>, f32)>,
}

/// What the engine sends about one sequence.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A generated token: the text it released (empty while a character or a possible stop string is
    /// incomplete) and, when asked, its log-probabilities.
    Token {
        /// Text released by this token.
        text: String,
        /// Log-probabilities, when the request asked.
        logprob: Option<Logprob>,
    },
    /// The sequence ended: the last text held back, why, and the counts.
    Done {
        /// Text released at the end (held for a stop string that did not come).
        text: String,
        /// Why.
        finish: Finish,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Generated tokens (the end token included when it came).
        completion_tokens: usize,
    },
    /// The engine failed on this sequence.
    Failed(String),
}

/// A started request: its events, and what was decided for it.
#[derive(Debug)]
pub struct Generation {
    /// Events in order, ending with `Done` or `Failed`. Dropping the receiver cancels the sequence.
    pub events: mpsc::UnboundedReceiver<Event>,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// The `max_tokens` applied.
    pub max_tokens: usize,
}

/// The engine's state, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Sequences in the running batch.
    pub running: usize,
    /// Requests waiting for room.
    pub waiting: usize,
    /// KV cells holding tokens now.
    pub kv_used_tokens: usize,
    /// KV cells reserved by running sequences (prompt + `max_tokens` each).
    pub kv_reserved_tokens: usize,
    /// The budget.
    pub kv_budget_tokens: usize,
}

/// A request waiting for room.
struct Pending {
    prompt: Vec<u32>,
    max_tokens: usize,
    params: Params,
    events: mpsc::UnboundedSender<Event>,
}

struct Shared {
    queue: Mutex<VecDeque<Pending>>,
    wake: Condvar,
    stop: AtomicBool,
    running: AtomicUsize,
    kv_used: AtomicUsize,
    kv_reserved: AtomicUsize,
    context: AtomicUsize,
    /// When the last sequences left the running batch (finished, failed or dropped), oldest first.
    departures: Mutex<Departures>,
}

/// When sequences left the running batch lately: the rate they leave at tells a refused client when to retry.
#[derive(Debug, Default)]
pub(crate) struct Departures(VecDeque<std::time::Instant>);

impl Departures {
    /// Departures remembered.
    const KEPT: usize = 64;

    fn record(&mut self, at: std::time::Instant) {
        if self.0.len() == Self::KEPT {
            self.0.pop_front();
        }
        self.0.push_back(at);
    }

    /// Seconds until `ahead` more sequences have left at the recent rate (at least 1, at most 600); 1 without two
    /// departures to measure a rate from, or when the last one is older than the span they cover (the engine was
    /// idle, so the rate says nothing).
    pub(crate) fn retry_after_secs(&self, ahead: usize, now: std::time::Instant) -> u32 {
        let (Some(first), Some(last)) = (self.0.front(), self.0.back()) else {
            return 1;
        };
        let span = last.duration_since(*first).as_secs_f64();
        if self.0.len() < 2 || span <= 0.0 || now.duration_since(*last).as_secs_f64() > span {
            return 1;
        }
        let rate = (self.0.len() - 1) as f64 / span;
        (ahead as f64 / rate).ceil().clamp(1.0, 600.0) as u32
    }
}

/// The server side of the engine thread.
pub(crate) struct Handle {
    shared: Arc<Shared>,
    model: Arc<LlamaModel>,
    thread: Option<JoinHandle<()>>,
    budget: usize,
}

/// What loading read from the model.
pub(crate) struct Loaded {
    pub architecture: String,
    pub name: Option<String>,
    pub trained_context: u32,
    pub vocab_size: usize,
    pub parameters: u64,
    pub size_bytes: u64,
    pub chat_template: Option<String>,
    pub bos_text: String,
    pub eos_text: String,
}

/// llama.cpp's process-wide state, made once; its log goes to `tracing` at debug level.
fn backend() -> Result<&'static LlamaBackend, LlmError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| LlmError::Load(format!("llama.cpp did not start: {e}")))
}

pub(crate) fn start(path: &Path, settings: &Settings) -> Result<(Handle, Loaded), LlmError> {
    let backend = backend()?;
    if !path.is_file() {
        return Err(LlmError::Load(format!("{} is not a file", path.display())));
    }
    let model = LlamaModel::load_from_file(backend, path, &LlamaModelParams::default())
        .map_err(|e| LlmError::Load(format!("llama.cpp could not load {}: {e}", path.display())))?;
    let model = Arc::new(model);
    let meta = |key: &str| model.meta_val_str(key).ok();
    let token_text = |t: LlamaToken| {
        String::from_utf8_lossy(&model.vocab().token_to_piece(t, true, None)).into_owned()
    };
    let vocab = model.vocab();
    let loaded = Loaded {
        architecture: meta("general.architecture").unwrap_or_else(|| "unknown".into()),
        name: meta("general.name"),
        trained_context: model.n_ctx_train(),
        vocab_size: usize::try_from(model.n_vocab()).unwrap_or(0),
        parameters: model.n_params(),
        size_bytes: model.size(),
        chat_template: model
            .chat_template(None)
            .ok()
            .and_then(|t| t.to_string().ok()),
        bos_text: token_text(vocab.bos()),
        eos_text: token_text(vocab.eos()),
    };
    let shared = Arc::new(Shared {
        queue: Mutex::new(VecDeque::new()),
        wake: Condvar::new(),
        stop: AtomicBool::new(false),
        running: AtomicUsize::new(0),
        kv_used: AtomicUsize::new(0),
        kv_reserved: AtomicUsize::new(0),
        context: AtomicUsize::new(loaded.trained_context as usize),
        departures: Mutex::new(Departures::default()),
    });
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = {
        let shared = shared.clone();
        let model = model.clone();
        let settings = settings.clone();
        std::thread::Builder::new()
            .name("ferry-llm".into())
            .spawn(move || run(&shared, &model, &settings, backend, &ready_tx))
            .map_err(|e| LlmError::Load(format!("could not start the engine thread: {e}")))?
    };
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = thread.join();
            return Err(e);
        }
        Err(_) => {
            let _ = thread.join();
            return Err(LlmError::Load(
                "the engine thread ended while loading".into(),
            ));
        }
    }
    let budget = settings.max_total_tokens as usize;
    Ok((
        Handle {
            shared,
            model,
            thread: Some(thread),
            budget,
        },
        loaded,
    ))
}

impl Handle {
    pub(crate) fn set_context(&self, context: usize) {
        self.shared.context.store(context, Ordering::Relaxed);
    }

    pub(crate) fn tokenize(&self, text: &str, special: bool) -> Vec<u32> {
        let vocab = self.model.vocab();
        vocab
            .tokenize(text.as_bytes(), true, special)
            .into_iter()
            .map(|t| t.0 as u32)
            .collect()
    }

    pub(crate) fn submit(
        &self,
        prompt: Vec<u32>,
        params: Params,
        settings: &Settings,
    ) -> Result<Generation, LlmError> {
        let context = self.shared.context.load(Ordering::Relaxed);
        let vocab = usize::try_from(self.model.n_vocab()).unwrap_or(0);
        if prompt.is_empty() {
            return Err(LlmError::InvalidParams("the prompt is empty".into()));
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(LlmError::InvalidParams(format!(
                "token {bad} is not in the vocabulary of {vocab} tokens"
            )));
        }
        if prompt.len() >= context {
            return Err(LlmError::PromptTooLong {
                prompt: prompt.len(),
                context,
                detail: String::new(),
            });
        }
        let cap = settings.max_new_tokens as usize;
        let max_tokens = match params.max_tokens {
            Some(0) => return Err(LlmError::InvalidParams("max_tokens must be at least 1".into())),
            Some(n) if n as usize > cap => {
                return Err(LlmError::InvalidParams(format!(
                    "max_tokens is too large: {n}; this server allows at most {cap} generated tokens per request"
                )))
            }
            Some(n) if prompt.len() + n as usize > context => {
                return Err(LlmError::PromptTooLong {
                    prompt: prompt.len(),
                    context,
                    detail: format!(
                        ", and {} tokens were asked for ({} in the prompt, {n} for the completion)",
                        prompt.len() + n as usize,
                        prompt.len()
                    ),
                })
            }
            Some(n) => n as usize,
            None => cap.min(context - prompt.len()),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let prompt_tokens = prompt.len();
        {
            let mut queue = self.shared.queue.lock();
            if self.shared.stop.load(Ordering::Relaxed) {
                return Err(LlmError::Stopped);
            }
            if queue.len() >= settings.max_waiting {
                let retry_after_secs = self
                    .shared
                    .departures
                    .lock()
                    .retry_after_secs(queue.len() + 1, std::time::Instant::now());
                return Err(LlmError::Busy {
                    waiting: queue.len(),
                    retry_after_secs,
                });
            }
            queue.push_back(Pending {
                prompt,
                max_tokens,
                params,
                events: tx,
            });
        }
        self.shared.wake.notify_one();
        Ok(Generation {
            events: rx,
            prompt_tokens,
            max_tokens,
        })
    }

    pub(crate) fn stats(&self) -> Stats {
        Stats {
            running: self.shared.running.load(Ordering::Relaxed),
            waiting: self.shared.queue.lock().len(),
            kv_used_tokens: self.shared.kv_used.load(Ordering::Relaxed),
            kv_reserved_tokens: self.shared.kv_reserved.load(Ordering::Relaxed),
            kv_budget_tokens: self.budget,
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        {
            let _queue = self.shared.queue.lock();
            self.shared.stop.store(true, Ordering::Relaxed);
        }
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One admitted sequence.
struct Seq {
    id: i32,
    prompt: Vec<u32>,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// Tokens in the cache (the next token's position).
    pos: usize,
    /// The token to feed next, once decoding.
    last: u32,
    generated: usize,
    max_tokens: usize,
    reserve: usize,
    sampler: Sampler,
    text: TextStream,
    logprobs: Option<u32>,
    events: mpsc::UnboundedSender<Event>,
}

impl Seq {
    fn decoding(&self) -> bool {
        self.prefilled == self.prompt.len()
    }
}

fn run(
    shared: &Shared,
    model: &LlamaModel,
    settings: &Settings,
    backend: &LlamaBackend,
    ready: &std::sync::mpsc::Sender<Result<(), LlmError>>,
) {
    let step_tokens = settings.prefill_chunk + settings.max_sequences;
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(settings.max_total_tokens))
        .with_n_batch(step_tokens)
        .with_n_ubatch(step_tokens)
        .with_n_seq_max(settings.max_sequences)
        .with_n_threads(settings.threads as i32)
        .with_n_threads_batch(settings.threads as i32)
        .with_kv_unified(true)
        // Flash attention off (llama.h: LLAMA_FLASH_ATTN_TYPE_DISABLED = 0), as llama-cpp-python has it: with
        // llama.cpp's `auto`, greedy answers differed from llama.cpp's in the first 16 tokens on half the prompts tried.
        .with_flash_attention_policy(0);
    let params = if settings.kv_cache_f32 {
        params
            .with_type_k(KvCacheType::F32)
            .with_type_v(KvCacheType::F32)
    } else {
        params
    };
    let mut ctx = match model.new_context(backend, params) {
        Ok(ctx) => ctx,
        Err(e) => {
            let _ = ready.send(Err(LlmError::Load(format!(
                "llama.cpp could not make a context: {e}"
            ))));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let vocab = model.vocab();
    let mut batch = LlamaBatch::new(step_tokens as usize, 1);
    let mut free_ids: Vec<i32> = (0..settings.max_sequences as i32).rev().collect();
    let mut seqs: Vec<Seq> = Vec::new();
    let mut reserved = 0usize;
    let budget = settings.max_total_tokens as usize;
    // (index in `seqs`, index in the batch) of the sequences whose logits this step gives.
    let mut sample_at: Vec<(usize, i32)> = Vec::new();
    loop {
        {
            let mut queue = shared.queue.lock();
            loop {
                if shared.stop.load(Ordering::Relaxed) {
                    for p in queue.drain(..) {
                        let _ = p
                            .events
                            .send(Event::Failed("the model was unloaded".into()));
                    }
                    for s in &seqs {
                        let _ = s
                            .events
                            .send(Event::Failed("the model was unloaded".into()));
                    }
                    return;
                }
                queue.retain(|p| !p.events.is_closed());
                while let Some(front) = queue.front() {
                    let reserve = front.prompt.len() + front.max_tokens;
                    let Some(&id) = free_ids.last() else { break };
                    if reserved + reserve > budget {
                        break;
                    }
                    free_ids.pop();
                    reserved += reserve;
                    let p = queue.pop_front().expect("front exists");
                    seqs.push(Seq {
                        id,
                        prefilled: 0,
                        pos: 0,
                        last: 0,
                        generated: 0,
                        max_tokens: p.max_tokens,
                        reserve,
                        sampler: Sampler::new(p.params.sampling),
                        text: TextStream::new(p.params.stop),
                        logprobs: p.params.logprobs,
                        events: p.events,
                        prompt: p.prompt,
                    });
                }
                if !seqs.is_empty() {
                    break;
                }
                shared.running.store(0, Ordering::Relaxed);
                shared.kv_used.store(0, Ordering::Relaxed);
                shared.kv_reserved.store(0, Ordering::Relaxed);
                shared.wake.wait(&mut queue);
            }
        }
        // Sequences whose client went away leave before the step.
        seqs.retain(|s| {
            if s.events.is_closed() {
                let _ = ctx.clear_kv_cache_seq(Some(s.id as u32), None, None);
                free_ids.push(s.id);
                reserved -= s.reserve;
                shared.departures.lock().record(std::time::Instant::now());
                false
            } else {
                true
            }
        });
        shared.running.store(seqs.len(), Ordering::Relaxed);
        shared.kv_reserved.store(reserved, Ordering::Relaxed);
        shared
            .kv_used
            .store(seqs.iter().map(|s| s.pos).sum(), Ordering::Relaxed);
        if seqs.is_empty() {
            continue;
        }
        batch.clear();
        sample_at.clear();
        for (i, s) in seqs.iter_mut().enumerate() {
            if s.decoding() {
                add(&mut batch, s.last, s.pos, s.id, true);
                sample_at.push((i, batch.n_tokens() - 1));
                s.pos += 1;
            }
        }
        let mut room = settings.prefill_chunk as usize;
        for (i, s) in seqs.iter_mut().enumerate() {
            if room == 0 {
                break;
            }
            if s.decoding() {
                continue;
            }
            let n = room.min(s.prompt.len() - s.prefilled);
            for k in 0..n {
                let at = s.prefilled + k;
                let last = at + 1 == s.prompt.len();
                add(&mut batch, s.prompt[at], at, s.id, last);
                if last {
                    sample_at.push((i, batch.n_tokens() - 1));
                }
            }
            s.prefilled += n;
            s.pos += n;
            room -= n;
        }
        if let Err(e) = ctx.decode(&mut batch) {
            // Not expected (every sequence's cells are reserved): fail this step's sequences and free them.
            tracing::error!(error = %e, "llama.cpp decode failed");
            for s in seqs.drain(..) {
                let _ = s
                    .events
                    .send(Event::Failed(format!("llama.cpp failed to decode: {e}")));
                let _ = ctx.clear_kv_cache_seq(Some(s.id as u32), None, None);
                free_ids.push(s.id);
                reserved -= s.reserve;
            }
            continue;
        }
        let mut finished: Vec<usize> = Vec::new();
        for &(i, at) in &sample_at {
            let s = &mut seqs[i];
            let logits = ctx.get_logits_ith(at);
            let token = s.sampler.sample(logits);
            let logprob = s.logprobs.map(|top| {
                let (lp, best) = sampler::logprobs(logits, token, top as usize);
                let piece = |t: u32| vocab.token_to_piece(LlamaToken(t as i32), true, None);
                let bytes = piece(token);
                Logprob {
                    token: String::from_utf8_lossy(&bytes).into_owned(),
                    bytes,
                    logprob: lp,
                    top: best
                        .into_iter()
                        .map(|(t, lp)| {
                            let b = piece(t);
                            (String::from_utf8_lossy(&b).into_owned(), b, lp)
                        })
                        .collect(),
                }
            });
            s.generated += 1;
            s.last = token;
            let end = vocab.is_eog(LlamaToken(token as i32));
            let mut finish = None;
            let text = if end {
                finish = Some(Finish::Stop);
                String::new()
            } else {
                match s
                    .text
                    .push(&vocab.token_to_piece(LlamaToken(token as i32), false, None))
                {
                    Released::Text(t) => t,
                    Released::Stopped(t) => {
                        finish = Some(Finish::Stop);
                        t
                    }
                }
            };
            if finish.is_none() && s.generated >= s.max_tokens {
                finish = Some(Finish::Length);
            }
            let _ = s.events.send(Event::Token { text, logprob });
            if let Some(finish) = finish {
                let text = if end || matches!(finish, Finish::Length) {
                    s.text.finish()
                } else {
                    String::new()
                };
                let _ = s.events.send(Event::Done {
                    text,
                    finish,
                    prompt_tokens: s.prompt.len(),
                    completion_tokens: s.generated,
                });
                finished.push(i);
            }
        }
        finished.sort_unstable();
        let now = std::time::Instant::now();
        for i in finished.into_iter().rev() {
            let s = seqs.remove(i);
            let _ = ctx.clear_kv_cache_seq(Some(s.id as u32), None, None);
            free_ids.push(s.id);
            reserved -= s.reserve;
            shared.departures.lock().record(now);
        }
    }
}

fn add(batch: &mut LlamaBatch, token: u32, pos: usize, seq: i32, logits: bool) {
    // The batch holds `prefill_chunk + max_sequences` tokens and a step adds at most that many.
    batch
        .add(LlamaToken(token as i32), pos as i32, &[seq], logits)
        .expect("the step fits the batch");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn retry_after_follows_the_rate_sequences_leave_at() {
        let t0 = Instant::now();
        let mut d = Departures::default();
        // Nothing measured yet: 1 s.
        assert_eq!(d.retry_after_secs(10, t0), 1);
        d.record(t0);
        assert_eq!(d.retry_after_secs(10, t0), 1);
        // Five departures over 2 s: 2 per second, so 17 ahead take 9 s (rounded up).
        for k in 1..=4 {
            d.record(t0 + Duration::from_millis(500 * k));
        }
        assert_eq!(d.retry_after_secs(17, t0 + Duration::from_secs(2)), 9);
        assert_eq!(d.retry_after_secs(1, t0 + Duration::from_secs(2)), 1);
        // Bounded above.
        assert_eq!(
            d.retry_after_secs(100_000, t0 + Duration::from_secs(2)),
            600
        );
        // Idle for longer than the departures span: the rate is stale.
        assert_eq!(d.retry_after_secs(17, t0 + Duration::from_secs(5)), 1);
        // Only the last 64 count.
        for k in 0..100 {
            d.record(t0 + Duration::from_secs(10) + Duration::from_millis(100 * k));
        }
        assert_eq!(d.0.len(), Departures::KEPT);
        assert_eq!(d.retry_after_secs(20, t0 + Duration::from_secs(20)), 2);
    }
}
