//! KServe v2 (Open Inference Protocol) over REST, with Triton's binary tensor data extension.
//!
//! The adapter decodes requests into [`NamedTensor`]s, hands them to [`Infer`], and encodes the answer.
//! Binary framing: the body is the JSON header (its length in `Inference-Header-Content-Length`) followed by the
//! raw data of every input that carries `parameters.binary_data_size`, in the order of the `inputs` list.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ferry_model::NamedTensor;
use serde::Serialize;
use serde_json::{Map, Value};

use super::{client_deadline, finish, AppState};
use crate::codec::json::{FlatJson, NonFinite};
pub use crate::codec::kserve::{decode_json_inputs, decode_request_body, HEADER_LENGTH};
use crate::codec::kserve::{decode_request, InferRequestBody};
use crate::core::infer::{Call, Infer, Protocol, VersionSelector};
use crate::core::repository::{parse_version, LoadedVersion};
use crate::error::{ErrorKind, InferError};

#[derive(Serialize)]
struct InferResponseBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    model_name: &'a str,
    model_version: String,
    outputs: Vec<OutputBody<'a>>,
}

#[derive(Serialize)]
struct OutputBody<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [usize],
    #[serde(skip_serializing_if = "Map::is_empty")]
    parameters: Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<FlatJson<'a>>,
}

#[derive(Serialize)]
struct TensorMetadata {
    name: String,
    datatype: &'static str,
    shape: Vec<i64>,
}

fn selector(version: Option<&str>) -> Result<VersionSelector, InferError> {
    match version {
        None => Ok(VersionSelector::Latest),
        Some(v) => parse_version(v)
            .map(VersionSelector::Specific)
            .ok_or_else(|| {
                InferError::invalid(format!("version must be a positive integer, got `{v}`"))
            }),
    }
}

/// `GET /v2`: server metadata.
pub async fn server_metadata() -> Response {
    axum::Json(serde_json::json!({
        "name": "ferry",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
    .into_response()
}

/// `GET /v2/health/live`: 200 while the process serves requests.
pub async fn live() -> Response {
    axum::Json(serde_json::json!({ "live": true })).into_response()
}

/// `GET /v2/health/ready`: 200 once the startup load has finished, until shutdown begins; 400 otherwise (the
/// protocol's 4xx for "false").
pub async fn ready(State(state): State<AppState>) -> Result<Json<Value>, InferError> {
    if state.infer.health.is_ready() {
        Ok(Json(serde_json::json!({ "ready": true })))
    } else {
        Err(InferError::invalid("server is not ready"))
    }
}

/// `GET /v2/models/{m}/ready`.
pub async fn model_ready(
    State(state): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<Value>, InferError> {
    version_readiness(&state.infer, &model, None)
}

/// `GET /v2/models/{m}/versions/{v}/ready`.
pub async fn version_ready(
    State(state): State<AppState>,
    Path((model, version)): Path<(String, String)>,
) -> Result<Json<Value>, InferError> {
    version_readiness(&state.infer, &model, Some(&version))
}

fn version_readiness(
    infer: &Infer,
    model: &str,
    version: Option<&str>,
) -> Result<Json<Value>, InferError> {
    let v = selector(version)
        .and_then(|s| infer.resolve(model, &s))
        .map_err(|e| match e.kind {
            // Not ready is the protocol's 4xx "false" (Triton's 400); an unknown model stays a 404.
            ErrorKind::Unavailable => InferError::invalid(e.message),
            _ => e,
        })?;
    Ok(Json(serde_json::json!({ "name": v.model, "ready": true })))
}

/// `GET /v2/models/{m}/drift`: per-feature and prediction drift of the latest version against its training data.
pub async fn model_drift(
    State(state): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<Value>, InferError> {
    drift_report(&state.infer, &model, None)
}

/// `GET /v2/models/{m}/versions/{v}/drift`.
pub async fn version_drift(
    State(state): State<AppState>,
    Path((model, version)): Path<(String, String)>,
) -> Result<Json<Value>, InferError> {
    drift_report(&state.infer, &model, Some(&version))
}

fn drift_report(
    infer: &Infer,
    model: &str,
    version: Option<&str>,
) -> Result<Json<Value>, InferError> {
    let loaded = infer.resolve(model, &selector(version)?)?;
    let drift = loaded.drift.as_ref().ok_or_else(|| {
        InferError::not_found(format!(
            "version {} of model `{model}` has no drift baseline (feature_stats in ferry.json for one [rows, features] input, or prediction_stats for its outputs), or drift_sample_every is 0",
            loaded.version
        ))
    })?;
    let report = drift.report();
    Ok(Json(serde_json::json!({
        "model_name": loaded.model,
        "model_version": loaded.version.to_string(),
        "window_rows": drift.rows(),
        "psi_threshold": crate::metrics::drift::PSI_THRESHOLD,
        "min_window_rows": crate::metrics::drift::MIN_WINDOW_ROWS,
        "status": report.status.as_deref().unwrap_or("ok"),
        "features": report.features,
        "predictions": report.predictions,
    })))
}

/// `GET /v2/models/{m}/importance`: global feature importance of the latest version, over its background sample
/// and its recent live rows, with drift attribution.
pub async fn model_importance(
    State(state): State<AppState>,
    Path(model): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, InferError> {
    importance(&state.infer, &model, None, &headers).await
}

/// `GET /v2/models/{m}/versions/{v}/importance`.
pub async fn version_importance(
    State(state): State<AppState>,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, InferError> {
    importance(&state.infer, &model, Some(&version), &headers).await
}

/// Importance over the background and the live rows the drift window kept, and for each feature its drift (PSI)
/// beside its part in the shift of the mean prediction.
async fn importance(
    infer: &Infer,
    model: &str,
    version: Option<&str>,
    headers: &HeaderMap,
) -> Result<Json<Value>, InferError> {
    let loaded = infer.resolve(model, &selector(version)?)?;
    let explainer = loaded.explainer.clone().ok_or_else(|| {
        InferError::invalid(format!(
            "model `{model}` cannot be explained: explanations take models of one numeric input of shape [rows, \
             features]"
        ))
    })?;
    let live = loaded
        .drift
        .as_ref()
        .map_or((0, Vec::new()), |d| d.recent_rows());
    let deadline = infer.deadline(std::time::Instant::now(), client_deadline(headers)?);
    let i = explainer
        .importance(
            loaded.backend.clone(),
            &loaded.tensor_signature,
            loaded.meta.classes.as_deref(),
            live,
            deadline,
        )
        .await?;
    let report = loaded.drift.as_ref().map(|d| d.report());
    let drift: Vec<Value> = i
        .features
        .iter()
        .enumerate()
        .map(|(j, name)| {
            let psi = report
                .as_ref()
                .and_then(|r| r.features.iter().find(|f| &f.name == name));
            let shift: Option<Vec<f64>> =
                i.shift.as_ref().map(|s| s.iter().map(|o| o[j]).collect());
            serde_json::json!({
                "feature": name,
                "psi": psi.map(|f| f.psi),
                "drifted": psi.map(|f| f.drifted),
                "attribution": shift,
                "abs_attribution": shift.as_ref().map(|s| s.iter().map(|v| v.abs()).sum::<f64>()),
            })
        })
        .collect();
    Ok(Json(serde_json::json!({
        "model_name": loaded.model,
        "model_version": loaded.version.to_string(),
        "method": i.method,
        "space": i.space,
        "features": i.features,
        "outputs": i.outputs,
        "background": {"rows": i.background_rows, "importance": i.background},
        "live": {
            "rows": i.live_rows,
            "importance": i.live,
            "prediction_shift": i.prediction_shift,
        },
        "drift": drift,
        "drift_status": report.as_ref().map(|r| r.status.as_deref().unwrap_or("ok")),
    })))
}

/// `GET /v2/models/{m}`.
pub async fn model_metadata(
    State(state): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<Value>, InferError> {
    metadata(&state.infer, &model, None)
}

/// `GET /v2/models/{m}/versions/{v}`.
pub async fn version_metadata(
    State(state): State<AppState>,
    Path((model, version)): Path<(String, String)>,
) -> Result<Json<Value>, InferError> {
    metadata(&state.infer, &model, Some(&version))
}

fn metadata(infer: &Infer, model: &str, version: Option<&str>) -> Result<Json<Value>, InferError> {
    let sel = selector(version)?;
    let loaded = infer.resolve(model, &sel)?;
    let versions = infer.metadata_versions(&sel, &loaded);
    let describe = |specs: &[ferry_model::TensorSpec]| -> Vec<TensorMetadata> {
        specs
            .iter()
            .map(|s| TensorMetadata {
                name: s.name.clone(),
                datatype: s.dtype.kserve_name(),
                shape: s.display_shape(),
            })
            .collect()
    };
    Ok(Json(serde_json::json!({
        "name": loaded.model,
        "versions": versions,
        "platform": format!("{}_onnx", loaded.backend.engine_name()),
        "inputs": describe(&loaded.signature.inputs),
        "outputs": describe(&loaded.signature.outputs),
    })))
}

/// `POST /v2/models/{m}/infer`.
pub async fn infer(
    State(state): State<AppState>,
    Path(model): Path<String>,
    headers: HeaderMap,
    crate::protocol::AdmittedBody(body): crate::protocol::AdmittedBody,
) -> Response {
    infer_request(&state.infer, &model, None, &headers, body).await
}

/// `POST /v2/models/{m}/versions/{v}/infer`.
pub async fn infer_version(
    State(state): State<AppState>,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
    crate::protocol::AdmittedBody(body): crate::protocol::AdmittedBody,
) -> Response {
    infer_request(&state.infer, &model, Some(&version), &headers, body).await
}

/// One KServe v2 inference request: the router's handlers and the listener's direct path ([`crate::transport::front`]) both
/// end here.
pub(crate) async fn infer_request(
    infer: &Infer,
    model: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Result<Bytes, InferError>,
) -> Response {
    let mut call = infer.call(Protocol::KserveRest);
    call.named(model);
    let result = infer_inner(&mut call, model, version, headers, body).await;
    finish(call, result)
}

async fn infer_inner(
    call: &mut Call<'_>,
    model: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Result<Bytes, InferError>,
) -> Result<Response, InferError> {
    let body = body?;
    if let Some(enc) = headers.get(header::CONTENT_ENCODING) {
        if !enc.as_bytes().eq_ignore_ascii_case(b"identity") {
            return Err(InferError::new(
                ErrorKind::Unimplemented,
                format!(
                    "Content-Encoding `{}` is not supported; send the body uncompressed",
                    String::from_utf8_lossy(enc.as_bytes())
                ),
            ));
        }
    }
    // Resolve first: an unknown or unready model is reported as such whatever the body holds.
    let loaded = call.resolve(
        model,
        selector(version),
        super::route_key(headers),
        body.len(),
    )?;
    let (request, inputs) = decode_request(headers, &body, call.limits())?;
    // Everything the body held is decoded: it need not wait for the answer.
    drop(body);

    let mut deadline = client_deadline(headers)?;
    // Triton's per-request `timeout` parameter, in microseconds.
    if let Some(t) = request.parameters.as_ref().and_then(|p| p.get("timeout")) {
        let us = t.as_u64().ok_or_else(|| {
            InferError::invalid(format!("parameter `timeout` must be microseconds, got {t}"))
        })?;
        let theirs = std::time::Instant::now() + std::time::Duration::from_micros(us);
        deadline = Some(deadline.map_or(theirs, |d| d.min(theirs)));
    }
    let default_binary = flag(request.parameters.as_ref(), "binary_data_output")?.unwrap_or(false);
    let mut requested: Option<Vec<(String, bool)>> = None;
    if let Some(outputs) = &request.outputs {
        let mut list = Vec::with_capacity(outputs.len());
        for o in outputs {
            // Triton's `classification` (top-k labels) and other output parameters would change the answer's
            // shape; refusing them is better than silently answering something else.
            if let Some(other) = o
                .parameters
                .iter()
                .flat_map(|p| p.keys())
                .find(|k| *k != "binary_data")
            {
                return Err(InferError::invalid(format!(
                    "output `{}`: parameter `{other}` is not supported (only binary_data)",
                    o.name
                )));
            }
            list.push((
                o.name.clone(),
                flag(o.parameters.as_ref(), "binary_data")?.unwrap_or(default_binary),
            ));
        }
        requested = Some(list);
    }
    let output_names = requested
        .as_ref()
        .map(|r| r.iter().map(|(n, _)| n.clone()).collect());
    let outputs = call
        .predict(inputs, output_names, request.id.clone(), deadline)
        .await?;
    let binary_of = |name: &str| {
        requested
            .as_ref()
            .and_then(|r| r.iter().find(|(n, _)| n == name).map(|(_, b)| *b))
            .unwrap_or(default_binary)
    };
    Ok(encode_response(&request, &loaded, &outputs, binary_of))
}

/// `POST /v2/models/{m}/explain`: a KServe v2 inference request answered with the prediction and its feature
/// attributions ([`super::explain`]).
pub async fn explain(
    State(state): State<AppState>,
    Path(model): Path<String>,
    headers: HeaderMap,
    crate::protocol::AdmittedBody(body): crate::protocol::AdmittedBody,
) -> Response {
    explain_request(&state.infer, &model, None, &headers, body).await
}

/// `POST /v2/models/{m}/versions/{v}/explain`.
pub async fn explain_version(
    State(state): State<AppState>,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
    crate::protocol::AdmittedBody(body): crate::protocol::AdmittedBody,
) -> Response {
    explain_request(&state.infer, &model, Some(&version), &headers, body).await
}

async fn explain_request(
    infer: &Infer,
    model: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Result<Bytes, InferError>,
) -> Response {
    let mut call = infer.call(Protocol::KserveRest);
    call.named(model);
    let result = async {
        let body = body?;
        let loaded = call.resolve(
            model,
            selector(version),
            super::route_key(headers),
            body.len(),
        )?;
        let (request, inputs) = decode_request(headers, &body, call.limits())?;
        drop(body);
        let deadline = client_deadline(headers)?;
        let (outputs, explained) = super::explain::run(
            &mut call,
            &loaded,
            inputs,
            request.parameters.as_ref(),
            request.id.clone(),
            deadline,
        )
        .await?;
        let outputs = outputs
            .iter()
            .map(|out| OutputBody {
                name: &out.name,
                datatype: out.tensor.dtype().kserve_name(),
                shape: &out.tensor.shape,
                parameters: Map::new(),
                data: Some(FlatJson(&out.tensor.data, NonFinite::Tokens)),
            })
            .collect();
        let answer = InferResponseBody {
            id: request.id.as_deref(),
            model_name: &loaded.model,
            model_version: loaded.version.to_string(),
            outputs,
        };
        let mut json = serde_json::to_value(&answer)
            .map_err(|e| InferError::new(ErrorKind::Internal, e.to_string()))?;
        let mut explanations = explained.info;
        explanations.insert("rows".into(), Value::from(explained.rows));
        json["explanations"] = Value::Object(explanations);
        Ok(Json(json).into_response())
    }
    .await;
    finish(call, result)
}

fn flag(parameters: Option<&Map<String, Value>>, key: &str) -> Result<Option<bool>, InferError> {
    match parameters.and_then(|p| p.get(key)) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(InferError::invalid(format!(
            "parameter `{key}` must be true or false, got {other}"
        ))),
    }
}

fn encode_response(
    request: &InferRequestBody,
    loaded: &LoadedVersion,
    outputs: &[NamedTensor],
    binary_of: impl Fn(&str) -> bool,
) -> Response {
    let mut binary = Vec::new();
    let mut bodies = Vec::with_capacity(outputs.len());
    for out in outputs {
        let mut parameters = Map::new();
        if let Some(keys) = &out.keys {
            parameters.insert("map_keys".into(), Value::from(keys.clone()));
        }
        let data = if binary_of(&out.name) {
            let before = binary.len();
            out.tensor.data.write_le_bytes(&mut binary);
            parameters.insert(
                "binary_data_size".into(),
                Value::from(binary.len() - before),
            );
            None
        } else {
            Some(FlatJson(&out.tensor.data, NonFinite::Tokens))
        };
        bodies.push(OutputBody {
            name: &out.name,
            datatype: out.tensor.dtype().kserve_name(),
            shape: &out.tensor.shape,
            parameters,
            data,
        });
    }
    let body = InferResponseBody {
        id: request.id.as_deref(),
        model_name: &loaded.model,
        model_version: loaded.version.to_string(),
        outputs: bodies,
    };
    let mut json =
        serde_json::to_vec(&body).expect("serializing an inference response cannot fail");
    if binary.is_empty() {
        return (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            json,
        )
            .into_response();
    }
    let header_len = json.len();
    json.extend_from_slice(&binary);
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (
                header::HeaderName::from_static(HEADER_LENGTH),
                HeaderValue::from(header_len),
            ),
        ],
        json,
    )
        .into_response()
}
