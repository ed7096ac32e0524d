//! Triton's generate extension for language models: `POST /v2/models/{m}[/versions/{v}]/generate` answers
//! `{"model_name", "model_version", "text_output"}`, and `.../generate_stream` sends one server-sent event per piece
//! of text in the same shape (an error mid-stream is an event `{"error": ...}`, as Triton sends it).
//!
//! The body is Triton's: `text_input` (the prompt, raw: no chat template) and the sampling settings either at the
//! top level (as TensorRT-LLM's models take them: `max_tokens`, `temperature`, `top_p`, `top_k`, `seed`,
//! `stop_words`/`stop`) or in `parameters` (as vLLM's backend takes them). `text_output` holds the generated text
//! only, not the prompt.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::AppState;
use crate::error::{ErrorKind, InferError};
use crate::infer::{Infer, VersionSelector};
use crate::llm::{self, Clock};
use ferry_llm::{Event, Params, Sampling};

/// The generate routes.
pub fn routes() -> axum::Router<AppState> {
    use axum::routing::post;
    axum::Router::new()
        .route(
            "/v2/models/{model}/generate",
            post(|s, p: Path<String>, h, b| generate(s, p.0, None, h, b, false)),
        )
        .route(
            "/v2/models/{model}/generate_stream",
            post(|s, p: Path<String>, h, b| generate(s, p.0, None, h, b, true)),
        )
        .route(
            "/v2/models/{model}/versions/{version}/generate",
            post(|s, p: Path<(String, String)>, h, b| {
                generate(s, p.0 .0, Some(p.0 .1), h, b, false)
            }),
        )
        .route(
            "/v2/models/{model}/versions/{version}/generate_stream",
            post(|s, p: Path<(String, String)>, h, b| {
                generate(s, p.0 .0, Some(p.0 .1), h, b, true)
            }),
        )
}

async fn generate(
    State(state): State<AppState>,
    model: String,
    version: Option<String>,
    headers: HeaderMap,
    super::AdmittedBody(body): super::AdmittedBody,
    stream: bool,
) -> Response {
    let infer = &state.infer;
    let mut call = infer.call(crate::infer::Protocol::GenerateRest);
    let result = run(
        infer,
        &mut call,
        &model,
        version.as_deref(),
        &headers,
        body,
        stream,
    )
    .await;
    super::finish(call, result)
}

fn number<T: TryFrom<i64>>(
    fields: &Map<String, Value>,
    key: &str,
) -> Result<Option<T>, InferError> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_i64()
            .and_then(|n| T::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| InferError::invalid(format!("`{key}` must be a whole number in range"))),
    }
}

fn float(fields: &Map<String, Value>, key: &str) -> Result<Option<f32>, InferError> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(|f| Some(f as f32))
            .ok_or_else(|| InferError::invalid(format!("`{key}` must be a number"))),
    }
}

/// The sampling settings from the body's top level and its `parameters` (which wins).
fn params(body: &Map<String, Value>) -> Result<Params, InferError> {
    let mut fields = body.clone();
    if let Some(p) = body.get("parameters") {
        let Value::Object(p) = p else {
            return Err(InferError::invalid("`parameters` must be an object"));
        };
        fields.extend(p.clone());
    }
    let temperature = float(&fields, "temperature")?.unwrap_or(0.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(InferError::invalid(format!(
            "temperature must be between 0 and 2, got {temperature}"
        )));
    }
    let top_p = float(&fields, "top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(InferError::invalid(format!(
            "top_p must be above 0 and at most 1, got {top_p}"
        )));
    }
    let top_k = number::<i64>(&fields, "top_k")?.unwrap_or(0).max(0);
    let mut stop = Vec::new();
    for key in ["stop", "stop_words"] {
        match fields.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s.is_empty() => {}
            Some(Value::String(s)) => stop.push(s.clone()),
            Some(Value::Array(v)) => {
                for s in v {
                    stop.push(
                        s.as_str()
                            .ok_or_else(|| {
                                InferError::invalid(format!("`{key}` must hold strings"))
                            })?
                            .to_owned(),
                    );
                }
            }
            Some(_) => {
                return Err(InferError::invalid(format!(
                    "`{key}` must be a string or a list of strings"
                )))
            }
        }
    }
    if stop.len() > 4 || stop.iter().any(|s| s.len() > 256) {
        return Err(InferError::invalid(
            "at most 4 stop strings of at most 256 bytes each",
        ));
    }
    Ok(Params {
        max_tokens: number::<u32>(&fields, "max_tokens")?,
        sampling: Sampling {
            temperature,
            top_p,
            top_k: u32::try_from(top_k).map_err(|_| InferError::invalid("top_k is too large"))?,
            seed: number::<i64>(&fields, "seed")?.map(|s| s as u64),
        },
        stop,
        logprobs: None,
    })
}

async fn run(
    infer: &Infer,
    call: &mut crate::infer::Call<'_>,
    model: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Result<Bytes, InferError>,
    stream: bool,
) -> Result<Response, InferError> {
    let body = body?;
    infer.limits.scan_json(&body)?;
    let selector = match version {
        None => Ok(VersionSelector::Latest),
        Some(v) => crate::repository::parse_version(v)
            .map(VersionSelector::Specific)
            .ok_or_else(|| InferError::invalid(format!("version `{v}` is not a positive integer"))),
    };
    let loaded = call.resolve(model, selector, super::route_key(headers), body.len())?;
    let fields: Map<String, Value> = serde_json::from_slice(&body).map_err(|e| {
        InferError::invalid(format!(
            "invalid request body (a JSON object is expected): {e}"
        ))
    })?;
    drop(body);
    let engine = llm::llm_of(&loaded)?.clone();
    let prompt = match fields.get("text_input") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(v)) if v.len() == 1 && v[0].is_string() => {
            v[0].as_str().unwrap_or_default().to_owned()
        }
        Some(_) => return Err(InferError::invalid("`text_input` must be a string")),
        None => return Err(InferError::invalid("the body has no `text_input`")),
    };
    let params = params(&fields)?;
    let tokens = {
        let engine = engine.clone();
        tokio::task::spawn_blocking(move || engine.tokenize(&prompt, true))
            .await
            .map_err(|_| InferError::new(ErrorKind::Internal, "tokenizing failed"))?
            .map_err(llm::error)?
    };
    let clock = Clock::start(&infer.store, &loaded);
    let generation = engine.generate(tokens, params).map_err(llm::error)?;
    let (name, number) = (loaded.model.clone(), loaded.version.to_string());
    if !stream {
        let mut clock = clock;
        let out = llm::collect(generation, loaded.scheduler.series(), &mut clock).await?;
        return Ok(Json(
            json!({"model_name": name, "model_version": number, "text_output": out.text}),
        )
        .into_response());
    }
    // The stream holds its version (`loaded`), so a reload that retires it waits for the answer.
    let state = (generation, loaded, clock, false);
    let events = futures_util::stream::unfold(
        state,
        move |(mut generation, loaded, mut clock, ended)| {
            let (name, number) = (name.clone(), number.clone());
            async move {
                if ended {
                    return None;
                }
                let event = |v: Value| format!("data: {v}\n\n");
                let (out, ended) = loop {
                    let next = match super::next_event(&mut generation.events).await {
                        super::Next::Event(next) => next,
                        super::Next::Heartbeat => {
                            let out =
                                String::from_utf8_lossy(super::HEARTBEAT_COMMENT).into_owned();
                            break (out, false);
                        }
                    };
                    match next {
                        Some(Event::Token { text, .. }) => {
                            clock.token(loaded.scheduler.series());
                            if text.is_empty() {
                                continue;
                            }
                            break (
                                event(
                                    json!({"model_name": name, "model_version": number, "text_output": text}),
                                ),
                                false,
                            );
                        }
                        Some(Event::Done {
                            text,
                            prompt_tokens,
                            completion_tokens,
                            ..
                        }) => {
                            clock.done(loaded.scheduler.series(), prompt_tokens, completion_tokens);
                            if text.is_empty() {
                                return None;
                            }
                            break (
                                event(
                                    json!({"model_name": name, "model_version": number, "text_output": text}),
                                ),
                                true,
                            );
                        }
                        Some(Event::Failed(e)) => {
                            clock.observe(true);
                            break (event(json!({"error": e})), true);
                        }
                        None => {
                            clock.observe(true);
                            break (event(json!({"error": "the model stopped"})), true);
                        }
                    }
                };
                Some((
                    Ok::<Bytes, Infallible>(Bytes::from(out)),
                    (generation, loaded, clock, ended),
                ))
            }
        },
    );
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, "text/event-stream"),
            (axum::http::header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(events),
    )
        .into_response())
}
