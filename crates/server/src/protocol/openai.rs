//! OpenAI's embeddings API, as its reference defines it, so the `openai` client works unchanged:
//! `POST /v1/embeddings` (`input` as a string, a list of strings, a list of token ids or a list of such lists;
//! `model`; `encoding_format` `float` or `base64`; `dimensions`) and `GET /v1/models`. Errors are OpenAI's
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use super::AppState;
use crate::error::{ErrorKind, InferError};
use crate::infer::{Infer, VersionSelector};
use crate::text::{self, TextInput};
use ferry_text::{Task, Tokens};

/// OpenAI's routes.
pub fn routes() -> axum::Router<AppState> {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        // KServe's prefix for its OpenAI routes: here `/openai/v1/models/{model}` (OpenAI's "retrieve model") can
        // exist, which plain `/v1/models/{model}` cannot, being TF Serving's model status.
        .route("/openai/v1/embeddings", post(embeddings))
        .route("/openai/v1/models", get(models))
        .route("/openai/v1/models/{model}", get(model))
        .merge(super::openai_llm::routes())
}

/// `GET /openai/v1/models/{model}`: one model, when it has a ready version.
async fn model(
    State(state): State<AppState>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    match state.infer.resolve(&name, &VersionSelector::Latest) {
        Ok(_) => Json(json!({"id": name, "object": "model", "created": 0, "owned_by": "ferry"}))
            .into_response(),
        Err(_) => error_response(
            &InferError::not_found(format!("The model `{name}` does not exist")),
            Some("model"),
        ),
    }
}

/// An error in OpenAI's shape; `param` names the request field at fault when there is one.
pub(crate) fn error_response(e: &InferError, param: Option<&str>) -> Response {
    let (kind, code) = match e.kind {
        ErrorKind::InvalidArgument | ErrorKind::PayloadTooLarge => {
            ("invalid_request_error", Value::Null)
        }
        ErrorKind::NotFound => ("invalid_request_error", json!("model_not_found")),
        ErrorKind::Unauthenticated => ("invalid_request_error", json!("invalid_api_key")),
        ErrorKind::PermissionDenied => ("invalid_request_error", Value::Null),
        ErrorKind::Overloaded => ("rate_limit_exceeded", Value::Null),
        _ => ("server_error", Value::Null),
    };
    let mut response = (
        e.kind.status(),
        Json(json!({"error": {"message": e.message, "type": kind, "param": param, "code": code}})),
    )
        .into_response();
    if matches!(e.kind, ErrorKind::Unavailable | ErrorKind::Overloaded) {
        response
            .headers_mut()
            .insert(axum::http::header::RETRY_AFTER, e.retry_after_header());
    }
    response
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<String>),
    Ids(Vec<u32>),
    ManyIds(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize, Default, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum EncodingFormat {
    #[default]
    Float,
    Base64,
}

/// The request with `input` left unparsed until the model (and so its maximum length) is known, and the number of
/// values in it checked: a list of a million empty strings is refused before it becomes a million `String`s.
#[derive(Debug, Deserialize)]
struct EmbeddingsRequest<'a> {
    #[serde(borrow)]
    input: &'a serde_json::value::RawValue,
    model: String,
    #[serde(default)]
    encoding_format: Option<EncodingFormat>,
    #[serde(default)]
    dimensions: Option<usize>,
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
}

/// `GET /v1/models`: every model with a ready version.
async fn models(State(state): State<AppState>) -> Response {
    let infer = &state.infer;
    let data: Vec<Value> = infer
        .store
        .model_names()
        .into_iter()
        .filter(|m| infer.resolve(m, &VersionSelector::Latest).is_ok())
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "ferry"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// `POST /v1/embeddings`.
async fn embeddings(
    State(state): State<AppState>,
    headers: HeaderMap,
    super::AdmittedBody(body): super::AdmittedBody,
) -> Response {
    let infer = &state.infer;
    let mut call = infer.call(crate::infer::Protocol::OpenaiRest);
    let result = run(infer, &mut call, &headers, body).await;
    super::finish_rendered(
        call,
        result.map_err(|(e, param)| (e.kind, error_response(&e, param))),
    )
}

/// An error and the request field at fault.
pub(crate) type Failure = (InferError, Option<&'static str>);

/// The latest version of the model a request names, with OpenAI's wording when there is none.
pub(crate) fn resolve(
    call: &mut crate::infer::Call<'_>,
    model: &str,
    headers: &HeaderMap,
    body_bytes: usize,
) -> Result<std::sync::Arc<crate::repository::LoadedVersion>, Failure> {
    call.resolve(
        model,
        Ok(VersionSelector::Latest),
        super::route_key(headers),
        body_bytes,
    )
    .map_err(|e| match e.kind {
        ErrorKind::NotFound => (
            InferError::not_found(format!("The model `{model}` does not exist")),
            Some("model"),
        ),
        _ => (e, Some("model")),
    })
}

async fn run(
    infer: &Infer,
    call: &mut crate::infer::Call<'_>,
    headers: &HeaderMap,
    body: Result<Bytes, InferError>,
) -> Result<Response, Failure> {
    let body = body.map_err(|e| (e, None))?;
    infer.limits.scan_json(&body).map_err(|e| (e, None))?;
    let req: EmbeddingsRequest = serde_json::from_slice(&body).map_err(|e| {
        (
            InferError::invalid(format!("invalid request body: {e}")),
            None,
        )
    })?;
    let version = resolve(call, &req.model, headers, body.len())?;
    let allowance = crate::infer::Budget::for_request(body.len()).total();
    let text = text::text_of(&version)
        .map_err(|e| (e, Some("model")))?
        .clone();
    if text.settings().task != Task::Embedding {
        return Err((
            InferError::invalid(format!("model `{}` is not an embedding model", req.model)),
            Some("model"),
        ));
    }
    if req.dimensions == Some(0) {
        return Err((
            InferError::invalid("`dimensions` must be at least 1"),
            Some("dimensions"),
        ));
    }
    // Strings: one value each; token ids: up to the maximum length each.
    let values = infer
        .limits
        .scan_json(req.input.get().as_bytes())
        .map_err(|e| (e, None))?
        .values;
    let max_rows = infer.limits.max_rows;
    if values > max_rows.saturating_mul(text.settings().max_length + 1) {
        return Err(too_many(values, max_rows));
    }
    let input: Input = serde_json::from_str(req.input.get()).map_err(|_| {
        (
            InferError::invalid("`input` must be a string, a list of strings, a list of token ids or a list of such lists"),
            Some("input"),
        )
    })?;
    let (format, dimensions, model) = (
        req.encoding_format.unwrap_or_default(),
        req.dimensions,
        req.model,
    );
    drop(body);
    let empty = || {
        (
            InferError::invalid("`input` cannot be an empty string or list"),
            Some("input"),
        )
    };
    let deadline = super::client_deadline(headers).map_err(|e| (e, None))?;
    let until = infer.deadline(std::time::Instant::now(), deadline);
    let tokens: Vec<Tokens> = match input {
        Input::One(s) => match text::prompted(&text, None, vec![s]) {
            Ok(v) => {
                let inputs = v.into_iter().map(TextInput::Single).collect();
                text::tokenize(&version, inputs, None, allowance, until).await
            }
            Err(e) => Err(e),
        },
        Input::Many(v) => {
            if v.len() > max_rows {
                return Err(too_many(v.len(), max_rows));
            }
            if v.is_empty() {
                return Err(empty());
            }
            match text::prompted(&text, None, v) {
                Ok(v) => {
                    let inputs = v.into_iter().map(TextInput::Single).collect();
                    text::tokenize(&version, inputs, None, allowance, until).await
                }
                Err(e) => Err(e),
            }
        }
        Input::Ids(ids) => ids_to_tokens(&text, vec![ids]),
        Input::ManyIds(lists) => {
            if lists.len() > max_rows {
                return Err(too_many(lists.len(), max_rows));
            }
            if lists.is_empty() {
                return Err(empty());
            }
            ids_to_tokens(&text, lists)
        }
    }
    .map_err(|e| (e, Some("input")))?;
    let prompt_tokens: usize = tokens.iter().map(Tokens::len).sum();
    let outputs = call
        .predict_texts(tokens, crate::batching::TextOutput::Pooled, deadline)
        .await
        .map_err(|e| (e, None))?;
    let (rows, width) = text::rows(&outputs).map_err(|e| (e, None))?;
    // Serialized from f32 (shortest form), not through serde_json's f64 values.
    #[derive(serde::Serialize)]
    #[serde(untagged)]
    enum Vector {
        Float(Vec<f32>),
        Base64(String),
    }
    #[derive(serde::Serialize)]
    struct Item {
        object: &'static str,
        index: usize,
        embedding: Vector,
    }
    let data: Vec<Item> = rows
        .chunks_exact(width.max(1))
        .enumerate()
        .map(|(index, row)| {
            let v = text::embedding(row, dimensions, true);
            let embedding = match format {
                EncodingFormat::Float => Vector::Float(v),
                EncodingFormat::Base64 => {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    Vector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
            };
            Item {
                object: "embedding",
                index,
                embedding,
            }
        })
        .collect();
    #[derive(serde::Serialize)]
    struct Usage {
        prompt_tokens: usize,
        total_tokens: usize,
    }
    #[derive(serde::Serialize)]
    struct Answer {
        object: &'static str,
        data: Vec<Item>,
        model: String,
        usage: Usage,
    }
    let response = Json(Answer {
        object: "list",
        data,
        model,
        usage: Usage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
    })
    .into_response();
    Ok(response)
}

fn too_many(n: usize, max: usize) -> Failure {
    (
        InferError::invalid(format!(
            "{n} inputs in one request; at most {max} are allowed (--max-rows-per-request)"
        )),
        Some("input"),
    )
}

/// Token ids sent instead of text: taken as the model's input as they are (no special tokens added), checked against
/// the vocabulary and the maximum length.
fn ids_to_tokens(
    text: &ferry_text::TextModel,
    lists: Vec<Vec<u32>>,
) -> Result<Vec<Tokens>, InferError> {
    let vocab = text.vocab_size();
    let max = text.settings().max_length;
    lists
        .into_iter()
        .enumerate()
        .map(|(i, ids)| {
            if ids.is_empty() {
                return Err(InferError::invalid(format!("input {i}: an input is empty")));
            }
            if ids.len() > max {
                return Err(InferError::invalid(format!(
                    "input {i}: {} tokens, more than the model's maximum of {max}",
                    ids.len()
                )));
            }
            if let Some(bad) = ids.iter().find(|id| **id as usize >= vocab) {
                return Err(InferError::invalid(format!(
                    "input {i}: token id {bad} is not in the vocabulary of {vocab} tokens"
                )));
            }
            Ok(Tokens {
                ids,
                type_ids: Vec::new(),
            })
        })
        .collect()
}
