//! OpenAI's text generation APIs for language models, as its reference defines them, so the `openai` client works
//! unchanged: `POST /v1/chat/completions` (the model's own chat template) and `POST /v1/completions` (a raw
//! prompt), each streamed as server-sent events ending with `data: [DONE]` when `stream` is true, with `usage`,
//! `finish_reason`, `logprobs`, `stop`, `seed`, `temperature`, `top_p` and `top_k` (an extension vLLM and
//! llama.cpp also accept), and `stream_options.include_usage`. The same routes are served under KServe's
//! `/openai` prefix. Errors are OpenAI's `{"error": {...}}` (429 with `Retry-After` when the model's queue is full).
//!
//! A client that goes away (a closed connection) drops the response stream, and with it the sequence's receiver:
//! the engine frees the sequence at its next step.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::openai::error_response;
use super::AppState;
use crate::error::{ErrorKind, InferError};
use crate::infer::Infer;
use crate::llm::{self, Clock};
use crate::repository::LoadedVersion;
use ferry_llm::{Event, Generation, Logprob, Message, Params, Sampling};

/// The chat and completion routes, plain and under `/openai`.
pub fn routes() -> axum::Router<AppState> {
    use axum::routing::post;
    let chat = post(|s, h, b| answer(s, h, b, Kind::Chat));
    let completions = post(|s, h, b| answer(s, h, b, Kind::Completion));
    axum::Router::new()
        .route("/v1/chat/completions", chat.clone())
        .route("/v1/completions", completions.clone())
        .route("/openai/v1/chat/completions", chat)
        .route("/openai/v1/completions", completions)
}

use super::openai::Failure;

fn bad(message: impl Into<String>, param: &'static str) -> Failure {
    (InferError::invalid(message), Some(param))
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields chat and completions share.
#[derive(Debug, Deserialize)]
struct Common {
    model: String,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    seed: Option<i64>,
    stop: Option<Stop>,
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
}

impl Common {
    /// Checks the shared fields and turns them into the engine's parameters.
    fn params(&self, max_tokens: Option<u32>, logprobs: Option<u32>) -> Result<Params, Failure> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(bad("only n = 1 is supported", "n"));
        }
        for (value, name) in [
            (self.presence_penalty, "presence_penalty"),
            (self.frequency_penalty, "frequency_penalty"),
        ] {
            if value.is_some_and(|v| v != 0.0) {
                return Err(bad(format!("{name} is not supported (only 0)"), name));
            }
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(bad(
                format!("temperature must be between 0 and 2, got {temperature}"),
                "temperature",
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(bad(
                format!("top_p must be above 0 and at most 1, got {top_p}"),
                "top_p",
            ));
        }
        let top_k = match self.top_k {
            None => 0,
            Some(k) if k <= 0 => 0,
            Some(k) => u32::try_from(k).map_err(|_| bad("top_k is too large", "top_k"))?,
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > 4 {
            return Err(bad(
                format!("at most 4 stop sequences are allowed, got {}", stop.len()),
                "stop",
            ));
        }
        if stop.iter().any(|s| s.len() > 256) {
            return Err(bad("a stop sequence is longer than 256 bytes", "stop"));
        }
        Ok(Params {
            max_tokens,
            sampling: Sampling {
                temperature,
                top_p,
                top_k,
                seed: self.seed.map(|s| s as u64),
            },
            stop,
            logprobs,
        })
    }

    fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<u32>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    ManyIds(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
    logprobs: Option<u32>,
    #[serde(default)]
    echo: bool,
    suffix: Option<String>,
    best_of: Option<u32>,
    #[serde(flatten)]
    common: Common,
}

/// `POST /v1/chat/completions` (`Kind::Chat`) and `POST /v1/completions` (`Kind::Completion`).
async fn answer(
    State(state): State<AppState>,
    headers: HeaderMap,
    super::AdmittedBody(body): super::AdmittedBody,
    kind: Kind,
) -> Response {
    let infer = &state.infer;
    let mut call = infer.call(crate::infer::Protocol::OpenaiRest);
    let result = run(infer, &mut call, &headers, body, kind).await;
    super::finish_rendered(
        call,
        result.map_err(|(e, param)| (e.kind, error_response(&e, param))),
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// What the answer's chunks and body say about the request.
#[derive(Debug, Clone)]
struct Answering {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    /// Completions' `logprobs` (top n) or chat's `logprobs: true`.
    logprobs: bool,
}

async fn run(
    infer: &Infer,
    call: &mut crate::infer::Call<'_>,
    headers: &HeaderMap,
    body: Result<Bytes, InferError>,
    kind: Kind,
) -> Result<Response, Failure> {
    let body = body.map_err(|e| (e, None))?;
    infer.limits.scan_json(&body).map_err(|e| (e, None))?;
    let invalid = |e: serde_json::Error| {
        (
            InferError::invalid(format!("invalid request body: {e}")),
            None,
        )
    };
    let (common, prompt, max_tokens, logprobs) = match kind {
        Kind::Chat => {
            let req: ChatRequest = serde_json::from_slice(&body).map_err(invalid)?;
            if req.messages.is_empty() {
                return Err(bad("`messages` must not be empty", "messages"));
            }
            let messages = req
                .messages
                .into_iter()
                .map(|m| {
                    let content = match m.content {
                        None => String::new(),
                        Some(Content::Text(t)) => t,
                        Some(Content::Parts(parts)) => {
                            let mut text = String::new();
                            for p in parts {
                                match (p.kind.as_str(), p.text) {
                                    ("text", Some(t)) => text.push_str(&t),
                                    (other, _) => {
                                        return Err(bad(
                                            format!("content parts of type `{other}` are not supported (only text)"),
                                            "messages",
                                        ))
                                    }
                                }
                            }
                            text
                        }
                    };
                    Ok(Message { role: m.role, content })
                })
                .collect::<Result<Vec<_>, _>>()?;
            if req.top_logprobs.is_some_and(|n| n > 20) {
                return Err(bad("top_logprobs must be at most 20", "top_logprobs"));
            }
            if req.top_logprobs.is_some() && !req.logprobs {
                return Err(bad("top_logprobs needs logprobs: true", "top_logprobs"));
            }
            let logprobs = req.logprobs.then(|| req.top_logprobs.unwrap_or(0));
            let max_tokens = req.max_completion_tokens.or(req.common.max_tokens);
            (req.common, PromptIn::Chat(messages), max_tokens, logprobs)
        }
        Kind::Completion => {
            let req: CompletionRequest = serde_json::from_slice(&body).map_err(invalid)?;
            if req.echo {
                return Err(bad("echo is not supported", "echo"));
            }
            if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
                return Err(bad("suffix is not supported", "suffix"));
            }
            if req.best_of.is_some_and(|n| n != 1) {
                return Err(bad("only best_of = 1 is supported", "best_of"));
            }
            if req.logprobs.is_some_and(|n| n > 5) {
                return Err(bad("logprobs must be at most 5", "logprobs"));
            }
            let prompt = match req.prompt {
                Prompt::Text(t) => PromptIn::Text(t),
                Prompt::Texts(mut v) if v.len() == 1 => PromptIn::Text(v.remove(0)),
                Prompt::Ids(ids) => PromptIn::Ids(ids),
                Prompt::ManyIds(mut v) if v.len() == 1 => PromptIn::Ids(v.remove(0)),
                Prompt::Texts(_) | Prompt::ManyIds(_) => {
                    return Err(bad("only one prompt per request is supported", "prompt"))
                }
            };
            let max_tokens = req.common.max_tokens.or(Some(16));
            (req.common, prompt, max_tokens, req.logprobs)
        }
    };
    let version = super::openai::resolve(call, &common.model, headers, body.len())?;
    drop(body);
    let model = llm::llm_of(&version)
        .map_err(|e| (e, Some("model")))?
        .clone();
    let params = common.params(max_tokens, logprobs)?;
    let tokens = {
        let model = model.clone();
        let tokenize = move || match prompt {
            PromptIn::Chat(messages) => model
                .chat_prompt(&messages)
                .and_then(|p| model.tokenize(&p, true)),
            PromptIn::Text(t) => model.tokenize(&t, true),
            PromptIn::Ids(ids) => Ok(ids),
        };
        tokio::task::spawn_blocking(tokenize)
            .await
            .map_err(|_| {
                (
                    InferError::new(ErrorKind::Internal, "tokenizing failed"),
                    None,
                )
            })?
            .map_err(|e| {
                (
                    llm::error(e),
                    Some(if kind == Kind::Chat {
                        "messages"
                    } else {
                        "prompt"
                    }),
                )
            })?
    };
    let clock = Clock::start(&infer.store, &version);
    let generation = model.generate(tokens, params.clone()).map_err(|e| {
        let param = match &e {
            ferry_llm::LlmError::PromptTooLong { .. } => Some(if kind == Kind::Chat {
                "messages"
            } else {
                "prompt"
            }),
            ferry_llm::LlmError::InvalidParams(m) if m.contains("max_tokens") => Some("max_tokens"),
            _ => None,
        };
        (llm::error(e), param)
    })?;
    let answering = Answering {
        kind,
        id: format!(
            "{}-{}",
            if kind == Kind::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            request_id()
        ),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: common.model.clone(),
        include_usage: common.include_usage(),
        logprobs: params.logprobs.is_some(),
    };
    if common.stream {
        return Ok(stream(generation, version, clock, answering));
    }
    let series = version.scheduler.series().clone();
    let mut clock = clock;
    let out = llm::collect(generation, &series, &mut clock)
        .await
        .map_err(|e| (e, None))?;
    let finish = out.finish.map_or("stop", ferry_llm::Finish::as_str);
    let usage = json!({
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
        "total_tokens": out.prompt_tokens + out.completion_tokens,
    });
    let choice = match kind {
        Kind::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": out.text},
            "logprobs": if answering.logprobs { chat_logprobs(&out.logprobs) } else { Value::Null },
            "finish_reason": finish,
        }),
        Kind::Completion => json!({
            "index": 0,
            "text": out.text,
            "logprobs": if answering.logprobs { completion_logprobs(&out.logprobs, 0) } else { Value::Null },
            "finish_reason": finish,
        }),
    };
    let object = if kind == Kind::Chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    Ok(Json(json!({
        "id": answering.id,
        "object": object,
        "created": answering.created,
        "model": answering.model,
        "choices": [choice],
        "usage": usage,
        "system_fingerprint": Value::Null,
    }))
    .into_response())
}

enum PromptIn {
    Chat(Vec<Message>),
    Text(String),
    Ids(Vec<u32>),
}

/// A request id unique in the process: the clock and a counter.
fn request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!(
        "{:x}{:04x}",
        nanos,
        NEXT.fetch_add(1, Ordering::Relaxed) & 0xffff
    )
}

fn token_json(text: &str, bytes: &[u8], logprob: f32) -> Value {
    json!({"token": text, "logprob": logprob, "bytes": bytes})
}

/// Chat's `logprobs`: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`.
fn chat_logprobs(lps: &[Logprob]) -> Value {
    let content: Vec<Value> = lps
        .iter()
        .map(|lp| {
            let mut v = token_json(&lp.token, &lp.bytes, lp.logprob);
            v["top_logprobs"] = lp
                .top
                .iter()
                .map(|(t, b, l)| token_json(t, b, *l))
                .collect();
            v
        })
        .collect();
    json!({ "content": content })
}

/// Completions' `logprobs`: parallel lists of tokens, their log-probabilities, the top alternatives as
/// `{token: logprob}` and each token's offset in the text (from `offset`).
fn completion_logprobs(lps: &[Logprob], offset: usize) -> Value {
    let mut at = offset;
    let mut offsets = Vec::with_capacity(lps.len());
    for lp in lps {
        offsets.push(at);
        at += lp.token.len();
    }
    json!({
        "tokens": lps.iter().map(|l| l.token.as_str()).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|l| {
            l.top.iter().map(|(t, _, p)| (t.clone(), json!(p))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

/// The answer as server-sent events, one chunk per token that released text, the finish reason, the usage when
/// asked, then `data: [DONE]`. The stream holds its version, so a reload that retires it waits for the answer.
fn stream(
    generation: Generation,
    version: Arc<LoadedVersion>,
    clock: Clock,
    a: Answering,
) -> Response {
    struct State {
        generation: Generation,
        version: Arc<LoadedVersion>,
        clock: Clock,
        a: Answering,
        started: bool,
        ended: bool,
        text_at: usize,
    }
    let state = State {
        generation,
        version,
        clock,
        a,
        started: false,
        ended: false,
        text_at: 0,
    };
    let body = futures_util::stream::unfold(state, |mut st| async move {
        if st.ended {
            return None;
        }
        let mut out = String::new();
        if !st.started {
            st.started = true;
            if st.a.kind == Kind::Chat {
                push_chunk(
                    &mut out,
                    &st.a,
                    json!({"role": "assistant", "content": ""}),
                    Value::Null,
                    Value::Null,
                );
                return Some((Ok::<Bytes, Infallible>(Bytes::from(out)), st));
            }
        }
        let event = match super::next_event(&mut st.generation.events).await {
            super::Next::Event(event) => event,
            super::Next::Heartbeat => {
                return Some((Ok(Bytes::from_static(super::HEARTBEAT_COMMENT)), st))
            }
        };
        match event {
            Some(Event::Token { text, logprob }) => {
                st.clock.token(st.version.scheduler.series());
                if !text.is_empty() || logprob.is_some() {
                    let lps = logprob.map(|l| vec![l]).unwrap_or_default();
                    let logprobs = match (st.a.logprobs, st.a.kind) {
                        (false, _) => Value::Null,
                        (true, Kind::Chat) => chat_logprobs(&lps),
                        (true, Kind::Completion) => completion_logprobs(&lps, st.text_at),
                    };
                    st.text_at += text.len();
                    push_chunk(&mut out, &st.a, delta(&st.a, text), logprobs, Value::Null);
                }
            }
            Some(Event::Done {
                text,
                finish,
                prompt_tokens,
                completion_tokens,
            }) => {
                st.clock.done(
                    st.version.scheduler.series(),
                    prompt_tokens,
                    completion_tokens,
                );
                if !text.is_empty() {
                    push_chunk(
                        &mut out,
                        &st.a,
                        delta(&st.a, text),
                        Value::Null,
                        Value::Null,
                    );
                }
                let end = match st.a.kind {
                    Kind::Chat => json!({}),
                    Kind::Completion => json!(""),
                };
                push_chunk(&mut out, &st.a, end, Value::Null, json!(finish.as_str()));
                if st.a.include_usage {
                    let usage = json!({
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens,
                    });
                    let chunk = json!({
                        "id": st.a.id, "object": object(&st.a), "created": st.a.created, "model": st.a.model,
                        "choices": [], "usage": usage,
                    });
                    out.push_str(&format!("data: {chunk}\n\n"));
                }
                out.push_str("data: [DONE]\n\n");
                st.ended = true;
            }
            Some(Event::Failed(e)) => {
                st.clock.observe(true);
                let error = json!({"error": {"message": e, "type": "server_error", "param": null, "code": null}});
                out.push_str(&format!("data: {error}\n\n"));
                st.ended = true;
            }
            None => {
                st.clock.observe(true);
                let error = json!({"error": {"message": "the model stopped", "type": "server_error", "param": null, "code": null}});
                out.push_str(&format!("data: {error}\n\n"));
                st.ended = true;
            }
        }
        Some((Ok::<Bytes, Infallible>(Bytes::from(out)), st))
    });
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/event-stream"),
            (axum::http::header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

fn object(a: &Answering) -> &'static str {
    match a.kind {
        Kind::Chat => "chat.completion.chunk",
        Kind::Completion => "text_completion",
    }
}

fn delta(a: &Answering, text: String) -> Value {
    match a.kind {
        Kind::Chat => json!({ "content": text }),
        Kind::Completion => json!(text),
    }
}

/// One `data:` event: a chat chunk's `delta` or a completion chunk's `text`.
fn push_chunk(out: &mut String, a: &Answering, content: Value, logprobs: Value, finish: Value) {
    let choice = match a.kind {
        Kind::Chat => {
            json!({"index": 0, "delta": content, "logprobs": logprobs, "finish_reason": finish})
        }
        Kind::Completion => {
            json!({"index": 0, "text": content, "logprobs": logprobs, "finish_reason": finish})
        }
    };
    let mut chunk = json!({
        "id": a.id, "object": object(a), "created": a.created, "model": a.model, "choices": [choice],
        "system_fingerprint": Value::Null,
    });
    if a.include_usage {
        chunk["usage"] = Value::Null;
    }
    out.push_str("data: ");
    out.push_str(&chunk.to_string());
    out.push_str("\n\n");
}
