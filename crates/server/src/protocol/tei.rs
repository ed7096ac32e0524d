//! Hugging Face text-embeddings-inference (TEI)'s API, as its router defines it: `POST /embed`, `/predict`,
//! `/rerank`, `/tokenize`, `/decode` and `GET /info`, with TEI's request fields, response shapes and error bodies
//! (`{"error": ..., "error_type": ...}` with TEI's statuses: 422 for validation, 400 for empty inputs, 424 for
//! engine failures, 429 when overloaded).
//!
//! TEI serves one model; Ferry serves many. The same routes are served under `/models/{model}/` (so a TEI client
//! pointed at `http://host:port/models/minilm` works unchanged), and at the root they go to the model named by the
//! `x-model` header, or to the only text model when the repository has one.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::AppState;
use crate::error::{ErrorKind, InferError};
use crate::infer::{Infer, VersionSelector};
use crate::text::{self, TextInput};
use ferry_text::{Side, Task};

/// The header that names the model for the root routes.
pub const MODEL_HEADER: &str = "x-model";

/// TEI's error types, spelled as its router serializes them.
fn error_type(kind: ErrorKind) -> (&'static str, StatusCode) {
    match kind {
        ErrorKind::InvalidArgument => ("Validation", StatusCode::UNPROCESSABLE_ENTITY),
        ErrorKind::Overloaded => ("Overloaded", StatusCode::TOO_MANY_REQUESTS),
        ErrorKind::Unavailable => ("Unhealthy", StatusCode::SERVICE_UNAVAILABLE),
        ErrorKind::Internal => ("Backend", StatusCode::FAILED_DEPENDENCY),
        // Outside TEI's table (model addressing, limits, tokens, deadlines): Ferry's own status.
        other => ("Validation", other.status()),
    }
}

/// An error as TEI answers it.
fn error_response(e: &InferError) -> Response {
    let (kind, status) = error_type(e.kind);
    (
        status,
        Json(json!({"error": e.message, "error_type": kind})),
    )
        .into_response()
}

/// TEI's 400 for empty inputs.
fn empty(what: &str) -> InferError {
    InferError::new(
        ErrorKind::InvalidArgument,
        format!("`{what}` cannot be empty"),
    )
}

/// Marks an [`InferError`] made by [`empty`] so it is answered with TEI's `Empty` type and 400.
fn is_empty_error(e: &InferError) -> bool {
    e.kind == ErrorKind::InvalidArgument && e.message.ends_with("cannot be empty")
}

/// `inputs`: one string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Inputs {
    One(String),
    Many(Vec<String>),
}

impl Inputs {
    fn into_vec(self) -> (Vec<String>, bool) {
        match self {
            Inputs::One(s) => (vec![s], false),
            Inputs::Many(v) => (v, true),
        }
    }
}

/// `truncation_direction`: `Right`/`Left` in either case.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
enum Direction {
    #[serde(alias = "right", alias = "Right")]
    #[default]
    Right,
    #[serde(alias = "left", alias = "Left")]
    Left,
}

impl Direction {
    fn side(self) -> Side {
        match self {
            Direction::Right => Side::Right,
            Direction::Left => Side::Left,
        }
    }
}

fn truncation(truncate: Option<bool>, direction: Direction) -> Option<Side> {
    truncate.unwrap_or(false).then(|| direction.side())
}

#[derive(Debug, Deserialize)]
struct EmbedRequest {
    inputs: Inputs,
    #[serde(default)]
    truncate: Option<bool>,
    #[serde(default)]
    truncation_direction: Direction,
    #[serde(default)]
    normalize: Option<bool>,
    #[serde(default)]
    dimensions: Option<usize>,
    #[serde(default)]
    prompt_name: Option<String>,
}

/// `inputs` of `/predict`: a string, a pair `[a, b]`, or a list of `[a]` / `[a, b]`.
#[derive(Debug)]
struct PredictInputs(Vec<TextInput>, bool);

impl<'de> Deserialize<'de> for PredictInputs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Flat(Vec<String>),
            Batch(Vec<Vec<String>>),
        }
        let sequence = |mut v: Vec<String>| match v.len() {
            1 => Ok(TextInput::Single(v.pop().unwrap_or_default())),
            2 => {
                let b = v.pop().unwrap_or_default();
                let a = v.pop().unwrap_or_default();
                Ok(TextInput::Pair(a, b))
            }
            n => Err(serde::de::Error::custom(format!(
                "an input is a string or a pair of strings, not {n} strings"
            ))),
        };
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "`inputs` must be a string, a pair of strings [string, string] or a batch of mixed strings and \
                 pairs [[string], [string, string], ...]",
            )
        })? {
            Raw::One(s) => Ok(PredictInputs(vec![TextInput::Single(s)], false)),
            Raw::Flat(v) if v.len() <= 2 && !v.is_empty() => Ok(PredictInputs(vec![sequence(v)?], false)),
            Raw::Flat(v) => Err(serde::de::Error::custom(format!(
                "an input is a string or a pair of strings, not {} strings",
                v.len()
            ))),
            Raw::Batch(b) => Ok(PredictInputs(b.into_iter().map(sequence).collect::<Result<_, _>>()?, true)),
        }
    }
}

#[derive(Debug, Deserialize)]
struct PredictRequest {
    inputs: PredictInputs,
    #[serde(default)]
    truncate: Option<bool>,
    #[serde(default)]
    truncation_direction: Direction,
    #[serde(default)]
    raw_scores: bool,
}

#[derive(Debug, Deserialize)]
struct RerankRequest {
    query: String,
    texts: Vec<String>,
    #[serde(default)]
    truncate: Option<bool>,
    #[serde(default)]
    truncation_direction: Direction,
    #[serde(default)]
    raw_scores: bool,
    #[serde(default)]
    return_text: bool,
}

#[derive(Debug, Deserialize)]
struct EmbedAllRequest {
    inputs: Inputs,
    #[serde(default)]
    truncate: Option<bool>,
    #[serde(default)]
    truncation_direction: Direction,
    #[serde(default)]
    prompt_name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct SimilarityInputs {
    source_sentence: String,
    sentences: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
struct SimilarityParameters {
    #[serde(default)]
    truncate: Option<bool>,
    #[serde(default)]
    truncation_direction: Direction,
    #[serde(default)]
    prompt_name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct SimilarityRequest {
    inputs: SimilarityInputs,
    #[serde(default)]
    parameters: Option<SimilarityParameters>,
}

#[derive(Debug, Deserialize)]
struct TokenizeRequest {
    inputs: Inputs,
    #[serde(default = "yes")]
    add_special_tokens: bool,
    #[serde(default)]
    prompt_name: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Ids {
    One(Vec<u32>),
    Many(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
struct DecodeRequest {
    ids: Ids,
    #[serde(default = "yes")]
    skip_special_tokens: bool,
}

/// TEI's routes, at the root and under `/models/{model}/`.
pub fn routes() -> axum::Router<AppState> {
    use axum::routing::{get, post};
    let mut router = axum::Router::new()
        .route("/info", get(root_info))
        .route("/models/{model}/info", get(named_info));
    for (path, call) in [
        ("embed", Call::Embed),
        ("embed_all", Call::EmbedAll),
        ("similarity", Call::Similarity),
        ("predict", Call::Predict),
        ("rerank", Call::Rerank),
        ("tokenize", Call::Tokenize),
        ("decode", Call::Decode),
    ] {
        router = router
            .route(
                &format!("/{path}"),
                post(move |s, h, b| root(call, s, h, b)),
            )
            .route(
                &format!("/models/{{model}}/{path}"),
                post(move |s, p, h, b| named(call, s, p, h, b)),
            );
    }
    router
}

/// TEI's calls (besides `/info`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `POST /embed`.
    Embed,
    /// `POST /embed_all`: every token's vector, unpooled.
    EmbedAll,
    /// `POST /similarity`: cosine similarity of a source sentence to each of a list.
    Similarity,
    /// `POST /predict`.
    Predict,
    /// `POST /rerank`.
    Rerank,
    /// `POST /tokenize`.
    Tokenize,
    /// `POST /decode`.
    Decode,
}

/// Which model a root route is for: the `x-model` header, or the only text model.
fn root_model(infer: &Infer, headers: &HeaderMap) -> Result<String, InferError> {
    if let Some(v) = headers.get(MODEL_HEADER) {
        return v
            .to_str()
            .map(str::to_string)
            .map_err(|_| InferError::invalid(format!("`{MODEL_HEADER}` is not a model name")));
    }
    let text_models: Vec<String> = infer
        .store
        .model_names()
        .into_iter()
        .filter(|name| {
            infer
                .resolve(name, &VersionSelector::Latest)
                .is_ok_and(|v| v.text.is_some())
        })
        .collect();
    match text_models.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(InferError::not_found("no text model is loaded")),
        many => Err(InferError::invalid(format!(
            "{} text models are loaded ({}): name one with the `{MODEL_HEADER}` header or call /models/{{model}}/...",
            many.len(),
            many.join(", ")
        ))),
    }
}

/// A TEI call at the root (`/embed`): the model comes from `x-model` or is the only text model.
pub async fn root(
    call: Call,
    State(state): State<AppState>,
    headers: HeaderMap,
    super::AdmittedBody(body): super::AdmittedBody,
) -> Response {
    match root_model(&state.infer, &headers) {
        Ok(model) => handle(&state.infer, call, &model, &headers, body).await,
        Err(e) => error_response(&e),
    }
}

/// A TEI call under `/models/{model}/`.
pub async fn named(
    call: Call,
    State(state): State<AppState>,
    Path(model): Path<String>,
    headers: HeaderMap,
    super::AdmittedBody(body): super::AdmittedBody,
) -> Response {
    handle(&state.infer, call, &model, &headers, body).await
}

/// `GET /info` for the root model.
pub async fn root_info(State(state): State<AppState>, headers: HeaderMap) -> Response {
    match root_model(&state.infer, &headers).and_then(|m| info(&state.infer, &m)) {
        Ok(v) => Json(v).into_response(),
        Err(e) => error_response(&e),
    }
}

/// `GET /models/{model}/info`.
pub async fn named_info(State(state): State<AppState>, Path(model): Path<String>) -> Response {
    match info(&state.infer, &model) {
        Ok(v) => Json(v).into_response(),
        Err(e) => error_response(&e),
    }
}

/// TEI's `/info` for one model.
fn info(infer: &Infer, model: &str) -> Result<Value, InferError> {
    let version = infer.resolve(model, &VersionSelector::Latest)?;
    let text = text::text_of(&version)?;
    let s = text.settings();
    let model_type = match s.task {
        Task::Embedding => json!({"embedding": {"pooling": s.pooling.name()}}),
        Task::Classifier | Task::Reranker => {
            let id2label: serde_json::Map<String, Value> = s
                .labels
                .iter()
                .enumerate()
                .map(|(i, l)| (i.to_string(), json!(l)))
                .collect();
            let label2id: serde_json::Map<String, Value> = s
                .labels
                .iter()
                .enumerate()
                .map(|(i, l)| (l.clone(), json!(i)))
                .collect();
            let kind = if s.task == Task::Reranker {
                "reranker"
            } else {
                "classifier"
            };
            json!({kind: {"id2label": id2label, "label2id": label2id}})
        }
    };
    let cfg = infer
        .store
        .with_model(model, |r| r.config.clone())
        .ok_or_else(|| InferError::not_found(format!("model `{model}` not found")))?;
    let limits = cfg.text_batching();
    Ok(json!({
        "model_id": model,
        "model_sha": null,
        "model_dtype": "float32",
        "model_type": model_type,
        "max_concurrent_requests": cfg.max_concurrent_requests,
        "max_input_length": s.max_length,
        "max_batch_tokens": limits.max_batch_tokens,
        "max_batch_requests": limits.max_batch_size,
        "max_client_batch_size": infer.limits.max_rows,
        "auto_truncate": false,
        "tokenization_workers": crate::model_config::machine_cores(),
        "version": env!("CARGO_PKG_VERSION"),
        "sha": null,
        "docker_label": null,
        "ferry_version": version.version,
    }))
}

/// Parses a TEI body: its JSON is scanned first (nesting depth, and no more values than
/// `--max-rows-per-request` allows inputs, a few for the other fields), so a flood of tiny strings is refused before
/// it is parsed.
fn parse<T: serde::de::DeserializeOwned>(infer: &Infer, body: &[u8]) -> Result<T, InferError> {
    let scan = infer.limits.scan_json(body)?;
    // Pairs and token-id lists hold several values per input.
    let most = infer.limits.max_rows.saturating_mul(3).saturating_add(16);
    if scan.values > most {
        return Err(InferError::invalid(format!(
            "the request holds {} JSON values; at most {most} are allowed (--max-rows-per-request inputs)",
            scan.values
        )));
    }
    serde_json::from_slice(body)
        .map_err(|e| InferError::invalid(format!("invalid request body: {e}")))
}

async fn handle(
    infer: &Infer,
    call: Call,
    model: &str,
    headers: &HeaderMap,
    body: Result<Bytes, InferError>,
) -> Response {
    let mut c = infer.call(crate::infer::Protocol::TeiRest);
    c.named(model);
    let result = run(infer, &mut c, call, model, headers, body).await;
    super::finish_rendered(
        c,
        result.map_err(|e| {
            let response = if is_empty_error(&e) {
                (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"error": e.message, "error_type": "Empty"})),
                )
                    .into_response()
            } else {
                error_response(&e)
            };
            (e.kind, response)
        }),
    )
}

/// Tokenizes `inputs` with `version`'s tokenizer and runs them through the call: one `[inputs, width]` output.
async fn run_texts(
    c: &mut crate::infer::Call<'_>,
    version: &crate::repository::LoadedVersion,
    inputs: Vec<TextInput>,
    truncate: Option<Side>,
    allowance: usize,
    deadline: Option<std::time::Instant>,
) -> Result<Vec<ferry_model::NamedTensor>, InferError> {
    let until = c.deadline(deadline);
    let tokens = text::tokenize(version, inputs, truncate, allowance, until).await?;
    c.predict_texts(tokens, crate::batching::TextOutput::Pooled, deadline)
        .await
}

/// How many numbers an `/embed_all` answer may hold for a request of `allowance` bytes of budget: as JSON each
/// takes about 10 bytes, so this bounds the answer to about 40 times the budget (every token's vector is the point
/// of the call, and a token's vector is hundreds of numbers).
fn embed_all_values(allowance: usize) -> usize {
    allowance.saturating_mul(4)
}

async fn run(
    infer: &Infer,
    c: &mut crate::infer::Call<'_>,
    call: Call,
    model: &str,
    headers: &HeaderMap,
    body: Result<Bytes, InferError>,
) -> Result<Response, InferError> {
    let body = body?;
    let version = c.resolve(
        model,
        Ok(VersionSelector::Latest),
        super::route_key(headers),
        body.len(),
    )?;
    let text = text::text_of(&version)?.clone();
    let allowance = crate::infer::Budget::for_request(body.len()).total();
    let deadline = super::client_deadline(headers)?;
    let task = text.settings().task;
    let wrong_task =
        |what: &str| InferError::invalid(format!("model `{model}` is not {what} model"));
    match call {
        Call::Embed => {
            let req: EmbedRequest = parse(infer, &body)?;
            drop(body);
            if task != Task::Embedding {
                return Err(wrong_task("an embedding"));
            }
            if req.dimensions == Some(0) {
                return Err(InferError::invalid("`dimensions` must be at least 1"));
            }
            let (texts, _) = req.inputs.into_vec();
            if texts.is_empty() {
                return Err(empty("inputs"));
            }
            let texts = text::prompted(&text, req.prompt_name.as_deref(), texts)?;
            let normalize = req.normalize.unwrap_or(true);
            let truncate = truncation(req.truncate, req.truncation_direction);
            let outputs = run_texts(
                c,
                &version,
                texts.into_iter().map(TextInput::Single).collect(),
                truncate,
                allowance,
                deadline,
            )
            .await?;
            let (rows, width) = text::rows(&outputs)?;
            let out: Vec<Vec<f32>> = rows
                .chunks_exact(width.max(1))
                .map(|r| text::embedding(r, req.dimensions, normalize))
                .collect();
            Ok(Json(out).into_response())
        }
        Call::EmbedAll => {
            let req: EmbedAllRequest = parse(infer, &body)?;
            drop(body);
            if task != Task::Embedding {
                return Err(wrong_task("an embedding"));
            }
            let (texts, _) = req.inputs.into_vec();
            if texts.is_empty() {
                return Err(empty("inputs"));
            }
            let texts = text::prompted(&text, req.prompt_name.as_deref(), texts)?;
            let truncate = truncation(req.truncate, req.truncation_direction);
            let inputs = texts.into_iter().map(TextInput::Single).collect();
            let until = c.deadline(deadline);
            let tokens = text::tokenize(&version, inputs, truncate, allowance, until).await?;
            let lens: Vec<usize> = tokens.iter().map(ferry_text::Tokens::len).collect();
            let output = crate::batching::TextOutput::Tokens {
                max_values: embed_all_values(allowance),
            };
            let outputs = c.predict_texts(tokens, output, deadline).await?;
            let (values, width) = text::rows(&outputs)?;
            let mut rows = values.chunks_exact(width.max(1));
            let out: Vec<Vec<&[f32]>> = lens
                .iter()
                .map(|n| rows.by_ref().take(*n).collect())
                .collect();
            Ok(Json(out).into_response())
        }
        Call::Similarity => {
            let req: SimilarityRequest = parse(infer, &body)?;
            drop(body);
            if task != Task::Embedding {
                return Err(wrong_task("an embedding"));
            }
            if req.inputs.sentences.is_empty() {
                return Err(empty("sentences"));
            }
            let p = req.parameters.unwrap_or_default();
            let mut texts = Vec::with_capacity(req.inputs.sentences.len() + 1);
            texts.push(req.inputs.source_sentence);
            texts.extend(req.inputs.sentences);
            let texts = text::prompted(&text, p.prompt_name.as_deref(), texts)?;
            let truncate = truncation(p.truncate, p.truncation_direction);
            let inputs = texts.into_iter().map(TextInput::Single).collect();
            let outputs = run_texts(c, &version, inputs, truncate, allowance, deadline).await?;
            let (rows, width) = text::rows(&outputs)?;
            let mut vectors = rows
                .chunks_exact(width.max(1))
                .map(|r| text::embedding(r, None, true));
            let source = vectors.next().unwrap_or_default();
            let out: Vec<f32> = vectors
                .map(|v| source.iter().zip(&v).map(|(a, b)| a * b).sum())
                .collect();
            Ok(Json(out).into_response())
        }
        Call::Predict => {
            let req: PredictRequest = parse(infer, &body)?;
            drop(body);
            if task == Task::Embedding {
                return Err(wrong_task("a classifier"));
            }
            let PredictInputs(inputs, batch) = req.inputs;
            if inputs.is_empty() {
                return Err(empty("inputs"));
            }
            let truncate = truncation(req.truncate, req.truncation_direction);
            let outputs = run_texts(c, &version, inputs, truncate, allowance, deadline).await?;
            let (rows, width) = text::rows(&outputs)?;
            let labels = &text.settings().labels;
            let answers: Vec<Value> = rows
                .chunks_exact(width.max(1))
                .map(|row| {
                    let scores = if req.raw_scores {
                        row.to_vec()
                    } else if row.len() == 1 {
                        vec![text::sigmoid(row[0])]
                    } else {
                        text::softmax(row)
                    };
                    let mut ranked: Vec<(usize, f32)> = scores.into_iter().enumerate().collect();
                    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
                    Value::Array(
                        ranked
                            .into_iter()
                            .map(|(i, score)| {
                                let label = labels
                                    .get(i)
                                    .cloned()
                                    .unwrap_or_else(|| format!("LABEL_{i}"));
                                json!({"score": score, "label": label})
                            })
                            .collect(),
                    )
                })
                .collect();
            let out = if batch {
                Value::Array(answers)
            } else {
                answers.into_iter().next().unwrap_or(Value::Null)
            };
            Ok(Json(out).into_response())
        }
        Call::Rerank => {
            let req: RerankRequest = parse(infer, &body)?;
            drop(body);
            if task != Task::Reranker {
                return Err(wrong_task("a re-ranker"));
            }
            if req.texts.is_empty() {
                return Err(empty("texts"));
            }
            let inputs = req
                .texts
                .iter()
                .map(|t| TextInput::Pair(req.query.clone(), t.clone()))
                .collect();
            let truncate = truncation(req.truncate, req.truncation_direction);
            let outputs = run_texts(c, &version, inputs, truncate, allowance, deadline).await?;
            let (rows, width) = text::rows(&outputs)?;
            let mut ranks: Vec<(usize, f32)> = rows
                .chunks_exact(width.max(1))
                .map(|r| {
                    if req.raw_scores {
                        r[0]
                    } else {
                        text::sigmoid(r[0])
                    }
                })
                .enumerate()
                .collect();
            ranks.sort_by(|a, b| b.1.total_cmp(&a.1));
            let out: Vec<Value> = ranks
                .into_iter()
                .map(|(index, score)| {
                    if req.return_text {
                        json!({"index": index, "text": req.texts[index], "score": score})
                    } else {
                        json!({"index": index, "score": score})
                    }
                })
                .collect();
            Ok(Json(out).into_response())
        }
        Call::Tokenize => {
            let req: TokenizeRequest = parse(infer, &body)?;
            drop(body);
            let (texts, _) = req.inputs.into_vec();
            if texts.is_empty() {
                return Err(empty("inputs"));
            }
            let texts = text::prompted(&text, req.prompt_name.as_deref(), texts)?;
            let until = c.deadline(deadline);
            let out = text::listing(&text, texts, req.add_special_tokens, allowance, until).await?;
            Ok((
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                out,
            )
                .into_response())
        }
        Call::Decode => {
            let req: DecodeRequest = parse(infer, &body)?;
            drop(body);
            let lists = match req.ids {
                Ids::One(ids) => vec![ids],
                Ids::Many(many) => many,
            };
            if lists.is_empty() {
                return Err(empty("ids"));
            }
            let out = lists
                .iter()
                .map(|ids| {
                    text.decode(ids, req.skip_special_tokens)
                        .map_err(text::text_error)
                })
                .collect::<Result<Vec<String>, _>>()?;
            Ok(Json(out).into_response())
        }
    }
}
