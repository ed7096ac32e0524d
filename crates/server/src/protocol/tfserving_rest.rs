//! TensorFlow Serving's REST API: model status, metadata, `:predict` (row and columnar formats), `:classify` and
//! `:regress`, with responses shaped as TF Serving shapes them.
//!
//! Routes are parsed by hand from `/v1/models/{rest}` because TF Serving puts the method after a colon
//! (`/v1/models/iris/versions/2:predict`).

use axum::extract::{Path, State};
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use ferry_model::{DataType, NamedTensor, Tensor, TensorData, TensorSpec};
use serde_json::{json, Map, Value};

use std::collections::BTreeMap;

use serde_json::value::RawValue;

use super::{client_deadline, finish};
use crate::codec::json::{
    decode_leaves, decode_value, json_text, leaves, nested_shape, Decoder, NestedJson,
};
use crate::codec::limits::Budget;
use crate::core::infer::{Call, Infer, Protocol, VersionSelector};
use crate::core::repository::{parse_version, LoadedVersion, VersionState};
use crate::error::InferError;
use crate::protocol::AppState;

/// What a `/v1/models/...` path asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `GET .../{m}[/versions/{v}|/labels/{l}]`.
    Status,
    /// `GET .../metadata`.
    Metadata,
    /// `POST ...:predict`.
    Predict,
    /// `POST ...:classify`.
    Classify,
    /// `POST ...:regress`.
    Regress,
    /// `POST ...:explain` (KServe v1's explain verb: `instances` in, `predictions` and `explanations` out).
    Explain,
}

/// Parses the part of the path after `/v1/models/` for the given method.
pub fn parse_path(
    method: &Method,
    rest: &str,
) -> Result<(String, VersionSelector, Action), InferError> {
    let malformed =
        || InferError::invalid(format!("Malformed request: {method} /v1/models/{rest}"));
    let (path, verb) = match rest.rsplit_once(':') {
        Some((p, v)) if !v.contains('/') => (p, Some(v)),
        _ => (rest, None),
    };
    let mut segments: Vec<&str> = path.split('/').collect();
    let mut action = match (method, verb) {
        (&Method::POST, Some("predict")) => Action::Predict,
        (&Method::POST, Some("classify")) => Action::Classify,
        (&Method::POST, Some("regress")) => Action::Regress,
        (&Method::POST, Some("explain")) => Action::Explain,
        (&Method::GET, None) => Action::Status,
        _ => return Err(malformed()),
    };
    if action == Action::Status && segments.len() > 1 && segments.last() == Some(&"metadata") {
        segments.pop();
        action = Action::Metadata;
    }
    let selector = match segments.as_slice() {
        [_] => VersionSelector::Latest,
        [_, "versions", v] => VersionSelector::Specific(parse_version(v).ok_or_else(|| {
            InferError::invalid(format!("Failed to convert version: {v} to numeric."))
        })?),
        [_, "labels", l] if !l.is_empty() => VersionSelector::Label((*l).to_string()),
        _ => return Err(malformed()),
    };
    if segments[0].is_empty() {
        return Err(InferError::invalid("Missing model name in request."));
    }
    Ok((segments[0].to_string(), selector, action))
}

/// `GET /v1/models/{rest}`: status or metadata.
pub async fn get(
    State(state): State<AppState>,
    Path(rest): Path<String>,
) -> Result<axum::Json<Value>, InferError> {
    let answer = match parse_path(&Method::GET, &rest)? {
        (model, selector, Action::Status) => status(&state.infer, &model, &selector),
        (model, selector, _) => metadata(&state.infer, &model, &selector),
    };
    answer.map(axum::Json)
}

/// `POST /v1/models/{rest}`: predict, classify or regress.
pub async fn post(
    State(state): State<AppState>,
    Path(rest): Path<String>,
    headers: axum::http::HeaderMap,
    crate::protocol::AdmittedBody(body): crate::protocol::AdmittedBody,
) -> Response {
    let parsed = parse_path(&Method::POST, &rest);
    let mut call = state.infer.call(Protocol::TfservingRest);
    let result = async {
        let (model, selector, action) = parsed.as_ref().map_err(Clone::clone)?;
        call.named(model);
        let deadline = client_deadline(&headers)?;
        let body = body?;
        // Resolve first: an unknown or unready model is reported as such whatever the body holds.
        let loaded = call.resolve(
            model,
            Ok(selector.clone()),
            super::route_key(&headers),
            body.len(),
        )?;
        match action {
            Action::Predict => predict(&mut call, loaded, &body, deadline).await,
            Action::Explain => explain(&mut call, loaded, &body, deadline).await,
            Action::Classify | Action::Regress => {
                let request = parse_body(&body, call.limits())?;
                classify_or_regress(&mut call, loaded, &request, action, deadline)
                    .await
                    .map(|v| axum::Json(v).into_response())
            }
            Action::Status | Action::Metadata => {
                unreachable!("parse_path gives POST only predict, classify, regress or explain")
            }
        }
    }
    .await;
    finish(call, result)
}

fn check_signature_name(name: Option<&RawValue>) -> Result<(), InferError> {
    let name = name.map(|raw| serde_json::from_str::<Value>(raw.get()).unwrap_or(Value::Null));
    match name {
        None => Ok(()),
        Some(Value::String(s)) if s.is_empty() || s == "serving_default" => Ok(()),
        Some(Value::String(s)) => Err(InferError::invalid(format!(
            "Serving signature name: \"{s}\" not found in signature def (Ferry models have `serving_default`)"
        ))),
        Some(_) => Err(InferError::invalid("'signature_name' key must be a string value.")),
    }
}

fn status(infer: &Infer, model: &str, selector: &VersionSelector) -> Result<Value, InferError> {
    let statuses: Vec<Value> = infer
        .version_states(model, selector)?
        .into_iter()
        .map(|(v, state)| {
            let (state, code, message) = match state {
                VersionState::Loading => ("LOADING", "OK", String::new()),
                VersionState::Ready => ("AVAILABLE", "OK", String::new()),
                VersionState::Unloading => ("UNLOADING", "OK", String::new()),
                VersionState::Unavailable(reason) => ("END", "UNKNOWN", reason),
            };
            json!({"version": v.to_string(), "state": state, "status": {"error_code": code, "error_message": message}})
        })
        .collect();
    Ok(json!({ "model_version_status": statuses }))
}

fn tensor_info(spec: &TensorSpec) -> Value {
    let shape = match &spec.shape {
        Some(dims) => {
            json!({"dim": dims.iter().map(|d| json!({"size": d.to_string(), "name": ""})).collect::<Vec<_>>(), "unknown_rank": false})
        }
        None => json!({"dim": [], "unknown_rank": true}),
    };
    json!({"dtype": spec.dtype.tf_name(), "tensor_shape": shape, "name": spec.name})
}

fn metadata(infer: &Infer, model: &str, selector: &VersionSelector) -> Result<Value, InferError> {
    let loaded = infer.resolve(model, selector)?;
    let map = |specs: &[TensorSpec]| {
        specs
            .iter()
            .map(|s| (s.name.clone(), tensor_info(s)))
            .collect::<Map<_, _>>()
    };
    Ok(json!({
        "model_spec": {"name": loaded.model, "signature_name": "", "version": loaded.version.to_string()},
        "metadata": {"signature_def": {"signature_def": {"serving_default": {
            "inputs": map(&loaded.signature.inputs),
            "outputs": map(&loaded.signature.outputs),
            "method_name": "tensorflow/serving/predict",
        }}}}
    }))
}

/// Builds one input tensor by stacking per-instance values along a new first dimension.
fn stack(spec: &TensorSpec, values: &[&Value]) -> Result<NamedTensor, InferError> {
    let err = |e: String| InferError::invalid(format!("input `{}`: {e}", spec.name));
    let first = nested_shape(values[0]).map_err(|e| err(e.to_string()))?;
    let mut items = Vec::new();
    for (i, v) in values.iter().enumerate() {
        let shape = nested_shape(v).map_err(|e| err(e.to_string()))?;
        if shape != first {
            return Err(err(format!(
                "instance {i} has shape {shape:?} but instance 0 has {first:?}"
            )));
        }
        leaves(v, &mut items);
    }
    let data = decode_leaves(spec.dtype, &items, true).map_err(|e| err(e.to_string()))?;
    let mut shape = vec![values.len()];
    shape.extend(first);
    Ok(NamedTensor::new(
        spec.name.clone(),
        Tensor::new(shape, data).map_err(|e| err(e.to_string()))?,
    ))
}

/// The top level of a body: its keys, each value left as JSON text (nothing below is parsed yet).
fn top_level(json: &[u8]) -> Result<BTreeMap<String, &RawValue>, InferError> {
    if json.trim_ascii_start().first() != Some(&b'{') {
        return Err(InferError::invalid("request body must be a JSON object"));
    }
    let top: BTreeMap<String, &RawValue> = serde_json::from_slice(json)
        .map_err(|e| InferError::invalid(format!("JSON Parse error: {e}")))?;
    check_signature_name(top.get("signature_name").copied())?;
    Ok(top)
}

/// How many times its own size a `:classify` or `:regress` body may take as a JSON tree.
const TREE_FACTOR: usize = 24;

/// Parses a `:classify` or `:regress` body into a JSON tree, after checking the tree fits its allowance.
fn parse_body(
    body: &[u8],
    limits: &crate::codec::limits::Limits,
) -> Result<Map<String, Value>, InferError> {
    let budget = Budget::for_request(body.len());
    let (json, scan) = json_text(body, limits, &budget)?;
    // A JSON tree takes far more than the text it came from (a 4-byte number becomes a 32-byte value in a list):
    // it gets its own allowance, TREE_FACTOR x the body, instead of the tensor decoders' budget.
    let tree = body
        .len()
        .saturating_mul(TREE_FACTOR)
        .saturating_add(crate::codec::limits::EXPANSION_FLOOR);
    if scan.tree_bytes() > tree {
        return Err(InferError::invalid(format!(
            "this body would take about {} bytes as a JSON tree, more than {TREE_FACTOR} x its size + 1 MiB allows; \
             send fewer examples per request",
            scan.tree_bytes()
        )));
    }
    top_level(&json)?;
    let request: Value = serde_json::from_slice(&json)
        .map_err(|e| InferError::invalid(format!("JSON Parse error: {e}")))?;
    let Value::Object(request) = request else {
        return Err(InferError::invalid("request body must be a JSON object"));
    };
    Ok(request)
}

/// Decodes a TF Serving `:predict` body against a model's inputs as `post` does; also says whether it was in row
/// format (`instances`) rather than columnar (`inputs`). The entry point of the fuzz targets and property tests.
///
/// No JSON tree is built: the top level is split into raw values, and each input's values are decoded straight into
/// its elements, within the request's memory [`Budget`].
pub fn decode_predict_body(
    specs: &[TensorSpec],
    body: &[u8],
    limits: &crate::codec::limits::Limits,
) -> Result<(Vec<NamedTensor>, bool), InferError> {
    let budget = Budget::for_request(body.len());
    let (json, _) = json_text(body, limits, &budget)?;
    let top = top_level(&json)?;
    let names = || {
        specs
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(",")
    };
    let inputs = match (top.get("instances"), top.get("inputs")) {
        (Some(_), Some(_)) => return Err(InferError::invalid(
            "Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist",
        )),
        (None, None) => return Err(InferError::invalid("Missing 'inputs' or 'instances' key")),
        (Some(instances), None) => (instances_of(specs, instances, &budget, &names)?, true),
        (None, Some(columns)) => {
            let text = columns.get();
            let inputs = if text.starts_with('{') && !is_b64_text(text) {
                let columns: BTreeMap<String, &RawValue> = serde_json::from_str(text)
                    .map_err(|e| InferError::invalid(format!("JSON Parse error: {e}")))?;
                specs
                    .iter()
                    .map(|spec| {
                        let value = columns.get(&spec.name).ok_or_else(|| {
                            InferError::invalid(format!(
                                "Missing named input: {} in 'inputs' object.",
                                spec.name
                            ))
                        })?;
                        whole_tensor(spec, value.get(), &budget)
                    })
                    .collect::<Result<Vec<_>, _>>()?
            } else {
                if specs.len() != 1 {
                    return Err(InferError::invalid(format!(
                        "inputs is a plain value/list, but expecting an object as multiple input tensors required ({})",
                        names()
                    )));
                }
                vec![whole_tensor(&specs[0], text, &budget)?]
            };
            (inputs, false)
        }
    };
    Ok(inputs)
}

/// Whether a JSON value's text is `{"b64": "..."}` (a byte string), not an object of named inputs.
fn is_b64_text(text: &str) -> bool {
    serde_json::from_str::<BTreeMap<std::borrow::Cow<'_, str>, serde::de::IgnoredAny>>(text)
        .is_ok_and(|m| m.len() == 1 && m.contains_key("b64"))
}

/// One input from a value whose full shape is its nesting (the columnar format).
fn whole_tensor(spec: &TensorSpec, text: &str, budget: &Budget) -> Result<NamedTensor, InferError> {
    let err = |e: String| InferError::invalid(format!("input `{}`: {e}", spec.name));
    let (data, shape) =
        decode_value(spec.dtype, text, true, budget).map_err(|e| err(e.to_string()))?;
    Ok(NamedTensor::new(
        spec.name.clone(),
        Tensor::new(shape, data).map_err(|e| err(e.to_string()))?,
    ))
}

/// The inputs of a row-format request: each instance's values stacked along a new first dimension, decoded one
/// instance at a time.
fn instances_of(
    specs: &[TensorSpec],
    instances: &RawValue,
    budget: &Budget,
    names: &dyn Fn() -> String,
) -> Result<Vec<NamedTensor>, InferError> {
    if !instances.get().starts_with('[') {
        return Err(InferError::invalid(
            "Excepting 'instances' to be an list/array",
        ));
    }
    let mut rows = Rows {
        specs,
        decoders: specs
            .iter()
            .map(|s| {
                // No first allocation: which input holds most of the data shows only as instances arrive.
                Decoder::new(s.dtype, true, None, 0, budget)
            })
            .collect(),
        shapes: vec![None; specs.len()],
        named: None,
        count: 0,
        names,
        error: None,
    };
    let mut de = serde_json::Deserializer::from_str(instances.get());
    let parsed = serde::Deserializer::deserialize_seq(&mut de, &mut rows);
    if let Some(e) = rows.error.take() {
        return Err(e);
    }
    parsed.map_err(|e| InferError::invalid(format!("JSON Parse error: {e}")))?;
    if rows.count == 0 {
        return Err(InferError::invalid("No values in 'instances' array"));
    }
    let count = rows.count;
    specs
        .iter()
        .zip(rows.decoders)
        .zip(rows.shapes)
        .map(|((spec, decoder), shape)| {
            let mut full = vec![count];
            full.extend(shape.unwrap_or_default());
            Tensor::new(full, decoder.finish())
                .map(|t| NamedTensor::new(spec.name.clone(), t))
                .map_err(|e| InferError::invalid(format!("input `{}`: {e}", spec.name)))
        })
        .collect()
}

/// Walks the `instances` list, handing each instance's values to the decoder of their input.
struct Rows<'s, 'b> {
    specs: &'s [TensorSpec],
    decoders: Vec<Decoder<'b>>,
    /// Each input's per-instance shape, set by the first instance.
    shapes: Vec<Option<Vec<usize>>>,
    /// Whether instances are objects of named inputs (set by the first).
    named: Option<bool>,
    count: usize,
    names: &'s dyn Fn() -> String,
    /// The client's error, kept whole (a serde error would carry a position inside `instances`).
    error: Option<InferError>,
}

impl Rows<'_, '_> {
    /// Decodes one input's value of instance `i` and checks its shape against instance 0's.
    fn value(&mut self, input: usize, i: usize, text: &str) -> Result<(), InferError> {
        let name = &self.specs[input].name;
        let shape = self.decoders[input]
            .decode_str(text)
            .map_err(|e| InferError::invalid(format!("input `{name}`: {e}")))?;
        match &self.shapes[input] {
            None => self.shapes[input] = Some(shape),
            Some(first) if *first != shape => {
                return Err(InferError::invalid(format!(
                    "input `{name}`: instance {i} has shape {shape:?} but instance 0 has {first:?}"
                )))
            }
            Some(_) => {}
        }
        Ok(())
    }

    fn instance(&mut self, i: usize, text: &str) -> Result<(), InferError> {
        let object = text.starts_with('{') && !is_b64_text(text);
        let named = *self.named.get_or_insert(object);
        if !named {
            if self.specs.len() != 1 {
                return Err(InferError::invalid(format!(
                    "instances is a plain list, but expecting list of objects as multiple input tensors required ({})",
                    (self.names)()
                )));
            }
            if object {
                return Err(InferError::invalid(format!(
                    "Expecting value/list but got object at item {i} of input list"
                )));
            }
            return self.value(0, i, text);
        }
        if !object {
            return Err(InferError::invalid(format!(
                "Expecting object but got list at item {i} of input list"
            )));
        }
        let fields: BTreeMap<std::borrow::Cow<'_, str>, &RawValue> = serde_json::from_str(text)
            .map_err(|e| InferError::invalid(format!("JSON Parse error: {e}")))?;
        if let Some(unknown) = fields
            .keys()
            .find(|k| !self.specs.iter().any(|s| s.name == **k))
        {
            return Err(InferError::invalid(format!(
                "Failed to process element: {i} key: {unknown} of 'instances' list: the model has no input named {unknown} (inputs: {})",
                (self.names)()
            )));
        }
        if fields.len() != self.specs.len() {
            return Err(InferError::invalid(format!(
                "Failed to process element: {i} of 'instances' list. JSON object must have keys: {}",
                (self.names)()
            )));
        }
        for input in 0..self.specs.len() {
            let text = fields[self.specs[input].name.as_str()].get();
            self.value(input, i, text)?;
        }
        Ok(())
    }
}

impl<'de> serde::de::Visitor<'de> for &mut Rows<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a list of instances")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        use serde::de::Error;
        while let Some(instance) = seq.next_element::<&RawValue>()? {
            let i = self.count;
            if let Err(e) = self.instance(i, instance.get()) {
                self.error = Some(e);
                return Err(A::Error::custom("instance refused"));
            }
            self.count += 1;
        }
        Ok(())
    }
}

async fn predict(
    call: &mut Call<'_>,
    loaded: std::sync::Arc<LoadedVersion>,
    body: &[u8],
    deadline: Option<std::time::Instant>,
) -> Result<Response, InferError> {
    let (inputs, row_format) = decode_predict_body(&loaded.signature.inputs, body, call.limits())?;
    let outputs = call.predict(inputs, None, None, deadline).await?;
    if row_format {
        let batch = outputs
            .first()
            .and_then(|o| o.tensor.shape.first().copied())
            .unwrap_or(0);
        for o in &outputs {
            match o.tensor.shape.first() {
                None => {
                    return Err(InferError::invalid(format!(
                        "Tensor name: {} has no shape information",
                        o.name
                    )))
                }
                Some(n) if *n != batch => {
                    return Err(InferError::invalid(format!(
                        "Tensor name: {} has inconsistent batch size: {n} expecting: {batch}",
                        o.name
                    )))
                }
                _ => {}
            }
        }
        encode(&Predictions {
            outputs: &outputs,
            batch,
        })
    } else {
        encode(&Outputs(&outputs))
    }
}

/// KServe v1's `:explain`: the rows of `instances` (or `inputs`) predicted and explained. The answer is
/// `{"predictions": [...], "explanations": [{"base_values", "attributions"}, ...], "explanation_info": {...}}`, one
/// explanation per instance; options go in a top-level `parameters` object ([`super::explain::options`]).
async fn explain(
    call: &mut Call<'_>,
    loaded: std::sync::Arc<LoadedVersion>,
    body: &[u8],
    deadline: Option<std::time::Instant>,
) -> Result<Response, InferError> {
    let (inputs, _) = decode_predict_body(&loaded.signature.inputs, body, call.limits())?;
    let parameters = match top_level(body)?.get("parameters") {
        None => None,
        Some(raw) => Some(
            serde_json::from_str::<serde_json::Map<String, Value>>(raw.get())
                .map_err(|_| InferError::invalid("`parameters` must be an object"))?,
        ),
    };
    let (outputs, answer) =
        super::explain::run(call, &loaded, inputs, parameters.as_ref(), None, deadline).await?;
    let batch = outputs
        .first()
        .and_then(|o| o.tensor.shape.first().copied())
        .unwrap_or(0);
    let predictions = serde_json::to_value(Predictions {
        outputs: &outputs,
        batch,
    })
    .map_err(internal)?;
    let mut json = predictions;
    json["explanations"] = Value::from(answer.rows);
    json["explanation_info"] = Value::Object(answer.info);
    Ok(axum::Json(json).into_response())
}

/// Serializes a response body straight from the tensors (no intermediate JSON tree, so FP32 values keep their
/// shortest form).
fn encode(body: &impl serde::Serialize) -> Result<Response, InferError> {
    let bytes = serde_json::to_vec(body).map_err(internal)?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        bytes,
    )
        .into_response())
}

/// One batch row of an output, as nested lists.
fn row(o: &NamedTensor, i: usize) -> NestedJson<'_> {
    let rest = &o.tensor.shape[1..];
    let stride: usize = rest.iter().product();
    NestedJson {
        data: &o.tensor.data,
        shape: rest,
        start: i * stride,
        b64: o.name.ends_with("_bytes"),
    }
}

/// The whole of an output, as nested lists.
fn whole(o: &NamedTensor) -> NestedJson<'_> {
    NestedJson {
        data: &o.tensor.data,
        shape: &o.tensor.shape,
        start: 0,
        b64: o.name.ends_with("_bytes"),
    }
}

/// `{"predictions": [...]}`: one entry per batch row, the row itself when there is one output, else an object.
struct Predictions<'a> {
    outputs: &'a [NamedTensor],
    batch: usize,
}

impl serde::Serialize for Predictions<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        struct Rows<'a>(&'a Predictions<'a>);
        struct RowObject<'a>(&'a [NamedTensor], usize);
        impl serde::Serialize for RowObject<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut map = s.serialize_map(Some(self.0.len()))?;
                for o in self.0 {
                    map.serialize_entry(&o.name, &row(o, self.1))?;
                }
                map.end()
            }
        }
        impl serde::Serialize for Rows<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let p = self.0;
                let mut seq = s.serialize_seq(Some(p.batch))?;
                for i in 0..p.batch {
                    if let [single] = p.outputs {
                        seq.serialize_element(&row(single, i))?;
                    } else {
                        seq.serialize_element(&RowObject(p.outputs, i))?;
                    }
                }
                seq.end()
            }
        }
        let mut map = s.serialize_map(Some(1))?;
        map.serialize_entry("predictions", &Rows(self))?;
        map.end()
    }
}

/// `{"outputs": ...}`: the single output's whole tensor, or an object of every output.
struct Outputs<'a>(&'a [NamedTensor]);

impl serde::Serialize for Outputs<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        struct All<'a>(&'a [NamedTensor]);
        impl serde::Serialize for All<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut map = s.serialize_map(Some(self.0.len()))?;
                for o in self.0 {
                    map.serialize_entry(&o.name, &whole(o))?;
                }
                map.end()
            }
        }
        let mut map = s.serialize_map(Some(1))?;
        match self.0 {
            [single] => map.serialize_entry("outputs", &whole(single))?,
            many => map.serialize_entry("outputs", &All(many))?,
        }
        map.end()
    }
}

fn internal(e: serde_json::Error) -> InferError {
    InferError::new(
        crate::error::ErrorKind::Internal,
        format!("cannot encode the response: {e}"),
    )
}

/// Reads a feature value: a number, or a list holding exactly one number.
fn feature_value<'a>(name: &str, v: &'a Value) -> Result<&'a Value, InferError> {
    match v {
        Value::Array(items) if items.len() == 1 => Ok(&items[0]),
        Value::Number(_) | Value::Bool(_) => Ok(v),
        other => Err(InferError::invalid(format!(
            "feature `{name}`: expected a number, got {other}"
        ))),
    }
}

async fn classify_or_regress(
    call: &mut Call<'_>,
    loaded: std::sync::Arc<LoadedVersion>,
    request: &Map<String, Value>,
    action: &Action,
    deadline: Option<std::time::Instant>,
) -> Result<Value, InferError> {
    let method = if *action == Action::Classify {
        "classify"
    } else {
        "regress"
    };
    let spec = match loaded.signature.inputs.as_slice() {
        [spec] if spec.shape.as_ref().is_some_and(|s| s.len() == 2) && spec.dtype != DataType::Bytes && spec.dtype != DataType::Bool => spec,
        _ => {
            return Err(InferError::invalid(format!(
                "{method} needs a model with one numeric input of shape [batch, features]; use :predict for model `{}`",
                loaded.model
            )))
        }
    };
    let examples = match request.get("examples") {
        None => {
            return Err(InferError::invalid(format!(
                "When method is {method}, key 'examples' is expected and was not found"
            )))
        }
        Some(Value::Array(e)) if e.is_empty() => {
            return Err(InferError::invalid("'examples' value is an empty array"))
        }
        Some(Value::Array(e)) => e,
        Some(_) => {
            return Err(InferError::invalid(
                "Expecting 'examples' value to be an list/array",
            ))
        }
    };
    let context = match request.get("context") {
        None => Map::new(),
        Some(Value::Object(c)) => c.clone(),
        Some(_) => return Err(InferError::invalid("'context' must be a JSON object")),
    };
    let width = spec
        .shape
        .as_ref()
        .and_then(|s| s.get(1))
        .copied()
        .filter(|w| *w > 0);
    let mut rows: Vec<Value> = Vec::with_capacity(examples.len());
    for (i, example) in examples.iter().enumerate() {
        let Value::Object(example) = example else {
            return Err(InferError::invalid(format!(
                "example {i}: Example must be JSON object"
            )));
        };
        let mut features = context.clone();
        features.extend(example.clone());
        let row: Vec<Value> = match &loaded.meta.features {
            Some(names) if !(features.len() == 1 && features.contains_key(&spec.name)) => {
                if let Some(unknown) = features.keys().find(|k| !names.contains(k)) {
                    return Err(InferError::invalid(format!(
                        "example {i}: unknown feature `{unknown}`; the model takes {}",
                        names.join(", ")
                    )));
                }
                names
                    .iter()
                    .map(|n| {
                        let v = features
                            .get(n)
                            .ok_or_else(|| InferError::invalid(format!("example {i}: missing feature `{n}`")))?;
                        feature_value(n, v).cloned()
                    })
                    .collect::<Result<_, _>>()?
            }
            _ => match features.iter().next() {
                Some((_, Value::Array(values))) if features.len() == 1 => values.clone(),
                _ => {
                    return Err(InferError::invalid(format!(
                        "example {i}: this model has no feature names (ferry.json); give each example one feature, `{}`, holding the list of {} values",
                        spec.name,
                        width.map_or("all".to_string(), |w| w.to_string())
                    )))
                }
            },
        };
        rows.push(Value::Array(row));
    }
    let values: Vec<&Value> = rows.iter().collect();
    let input = stack(spec, &values)?;
    let outputs = call.predict(vec![input], None, None, deadline).await?;
    let n = examples.len();
    let floats = |o: &NamedTensor| -> Option<Vec<f64>> {
        match &o.tensor.data {
            // Through text, so an FP32 score keeps its shortest form (0.99762803, not 0.9976280331611633).
            TensorData::F32(v) => Some(
                v.iter()
                    .map(|x| x.to_string().parse().unwrap_or(f64::NAN))
                    .collect(),
            ),
            TensorData::F64(v) => Some(v.clone()),
            TensorData::F16(v) => Some(v.iter().map(|x| x.to_f64()).collect()),
            _ => None,
        }
    };
    if *action == Action::Regress {
        let out = outputs
            .iter()
            .filter(|o| o.tensor.dtype().is_float() && o.tensor.data.len() == n)
            .min_by_key(|o| (o.name != "prediction") as u8)
            .ok_or_else(|| {
                InferError::invalid(format!(
                    "model `{}` is not a regressor: no output with one number per example",
                    loaded.model
                ))
            })?;
        return Ok(json!({ "results": floats(out).expect("filtered on float outputs") }));
    }
    let is_scores = |o: &&NamedTensor| {
        o.tensor.dtype().is_float()
            && o.tensor.shape.len() == 2
            && o.tensor.shape[0] == n
            && o.tensor.shape[1] >= 2
    };
    let out = outputs
        .iter()
        .filter(is_scores)
        .min_by_key(|o| (o.name != "probabilities") as u8)
        .ok_or_else(|| {
            InferError::invalid(format!(
                "model `{}` is not a classifier: no [batch, classes] score output",
                loaded.model
            ))
        })?;
    let classes = out.tensor.shape[1];
    let labels: Vec<String> = match (&out.keys, &loaded.meta.classes) {
        (Some(keys), _) => keys.clone(),
        (None, Some(classes_meta)) if classes_meta.len() == classes => classes_meta.clone(),
        _ => (0..classes).map(|c| c.to_string()).collect(),
    };
    let scores = floats(out).expect("filtered on float outputs");
    let results: Vec<Value> = scores
        .chunks(classes)
        .map(|row| Value::Array(labels.iter().zip(row).map(|(l, s)| json!([l, s])).collect()))
        .collect();
    Ok(json!({ "results": results }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_bodies_of_thousands_of_examples_are_parsed() {
        let example = r#"{"x0": 5.1, "x1": 3.5, "x2": 1.4, "x3": 0.2}"#;
        let body = format!(r#"{{"examples": [{}]}}"#, vec![example; 3000].join(","));
        assert!(parse_body(body.as_bytes(), &crate::codec::limits::Limits::default()).is_ok());
        // A body of nothing but tiny values would make a tree far larger than itself.
        let body = format!(
            r#"{{"examples": [{}]}}"#,
            vec!["[[[0]]]"; 400_000].join(",")
        );
        let e = parse_body(body.as_bytes(), &crate::codec::limits::Limits::default()).unwrap_err();
        assert!(e.message.contains("as a JSON tree"), "{}", e.message);
    }

    #[test]
    fn paths() {
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(
            parse_path(&get, "iris").unwrap(),
            ("iris".into(), VersionSelector::Latest, Action::Status)
        );
        assert_eq!(
            parse_path(&get, "iris/versions/2").unwrap(),
            ("iris".into(), VersionSelector::Specific(2), Action::Status)
        );
        assert_eq!(
            parse_path(&get, "iris/labels/stable/metadata").unwrap(),
            (
                "iris".into(),
                VersionSelector::Label("stable".into()),
                Action::Metadata
            )
        );
        assert_eq!(
            parse_path(&get, "iris/metadata").unwrap(),
            ("iris".into(), VersionSelector::Latest, Action::Metadata)
        );
        assert_eq!(
            parse_path(&post, "iris:predict").unwrap(),
            ("iris".into(), VersionSelector::Latest, Action::Predict)
        );
        assert_eq!(
            parse_path(&post, "iris/versions/3:classify").unwrap(),
            (
                "iris".into(),
                VersionSelector::Specific(3),
                Action::Classify
            )
        );
        assert_eq!(
            parse_path(&post, "iris/labels/canary:regress").unwrap(),
            (
                "iris".into(),
                VersionSelector::Label("canary".into()),
                Action::Regress
            )
        );
        for (m, bad) in [
            (&get, "iris:predict"),
            (&post, "iris"),
            (&post, "iris:explode"),
            (&get, "iris/versions/x"),
            (&get, "iris/version/1"),
            (&get, "iris/versions/1/labels/x"),
            (&get, ""),
        ] {
            assert!(parse_path(m, bad).is_err(), "{m} {bad}");
        }
    }
}
