//! What the explain routes share (KServe v2's `POST /v2/models/{m}[/versions/{v}]/explain` in
//! [`super::kserve_rest`], KServe v1's `POST /v1/models/{m}:explain` in [`super::tfserving_rest`]): the options a
//! request may set in `parameters`, the rows taken from its decoded input, the prediction and the explanation run
//! through the core ([`crate::explain`]), and the explanation as JSON.

use std::sync::Arc;
use std::time::Instant;

use ferry_model::{NamedTensor, TensorData};
use serde_json::{json, Map, Value};

use crate::core::explain::{Explained, Options};
use crate::core::infer::Call;
use crate::core::repository::LoadedVersion;
use crate::error::InferError;

/// Reads the explain options from a request's `parameters`: `method` (auto, linear, tree, kernel), `output`,
/// `max_model_rows`, `coalitions`, `exact_max_features`, `seed`. Other keys are refused, so a misspelt option is
/// never silently ignored (Triton's `timeout` and the binary-data flags are allowed).
pub(crate) fn options(parameters: Option<&Map<String, Value>>) -> Result<Options, InferError> {
    let mut o = Options::default();
    let Some(p) = parameters else {
        return Ok(o);
    };
    let count = |key: &str, v: &Value| {
        v.as_u64().ok_or_else(|| {
            InferError::invalid(format!("parameter `{key}` must be a whole number, got {v}"))
        })
    };
    let text = |key: &str, v: &Value| {
        v.as_str().map(str::to_string).ok_or_else(|| {
            InferError::invalid(format!("parameter `{key}` must be a string, got {v}"))
        })
    };
    for (key, v) in p {
        match key.as_str() {
            "method" => o.method = Some(text(key, v)?),
            "output" => o.output = Some(text(key, v)?),
            "max_model_rows" => o.max_model_rows = count(key, v)?,
            "coalitions" => {
                o.coalitions = usize::try_from(count(key, v)?)
                    .ok()
                    .filter(|c| (2..=1 << 20).contains(c))
                    .ok_or_else(|| {
                        InferError::invalid("`coalitions` must be between 2 and 1048576")
                    })?;
            }
            "exact_max_features" => {
                o.exact_max_features = usize::try_from(count(key, v)?)
                    .ok()
                    .filter(|n| *n <= 20)
                    .ok_or_else(|| InferError::invalid("`exact_max_features` may be at most 20"))?;
            }
            "seed" => o.seed = count(key, v)?,
            "timeout" | "binary_data_output" => {}
            other => {
                return Err(InferError::invalid(format!(
                "unknown explain parameter `{other}` (method, output, max_model_rows, coalitions, \
                     exact_max_features, seed)"
            )))
            }
        }
    }
    Ok(o)
}

/// The rows to explain: the explained input's values as f64, row-major.
fn rows_of(inputs: &[NamedTensor], input: &str) -> Result<Vec<f64>, InferError> {
    let t = inputs
        .iter()
        .find(|t| t.name == input)
        .ok_or_else(|| InferError::invalid(format!("the request has no input `{input}`")))?;
    Ok(match &t.tensor.data {
        TensorData::F32(v) => v.iter().map(|x| f64::from(*x)).collect(),
        TensorData::F64(v) => v.clone(),
        TensorData::F16(v) => v.iter().map(|x| f64::from(*x)).collect(),
        TensorData::I32(v) => v.iter().map(|x| f64::from(*x)).collect(),
        TensorData::I64(v) => v.iter().map(|x| *x as f64).collect(),
        other => {
            return Err(InferError::invalid(format!(
                "input `{input}` is {}; explanations take numbers",
                other.dtype()
            )))
        }
    })
}

/// An explanation as the routes answer it: what it says of itself, and one entry per explained row or text.
pub(crate) struct Answer {
    /// `method`, `space`, `features` (absent for texts), `outputs`, `background_rows`, `model_rows`, ...
    pub info: Map<String, Value>,
    /// Per row: `base_values` and `attributions`; per text also its `tokens`.
    pub rows: Vec<Value>,
}

/// Predicts and explains `inputs` on `loaded`: the prediction as any inference request makes it (queued, counted),
/// then the attributions in the explain lane, both under the client's `deadline` and `--request-timeout`. A text
/// model's texts get token attributions ([`crate::explain::explain_texts`]).
pub(crate) async fn run(
    call: &mut Call<'_>,
    loaded: &Arc<LoadedVersion>,
    inputs: Vec<NamedTensor>,
    parameters: Option<&Map<String, Value>>,
    id: Option<String>,
    deadline: Option<Instant>,
) -> Result<(Vec<NamedTensor>, Answer), InferError> {
    if loaded.text.is_some() {
        let options = options(parameters)?;
        let texts = texts_of(&inputs)?;
        let until = call.deadline(deadline);
        let outputs = call.predict(inputs, None, id, deadline).await?;
        let (explained, names, space) =
            crate::core::explain::explain_texts(loaded, texts, options, until).await?;
        let mut info = Map::new();
        let first = explained.first().map(|e| &e.explanation);
        info.insert("method".into(), json!(first.map(|e| e.method.name())));
        info.insert("space".into(), json!(space));
        info.insert("outputs".into(), json!(names));
        info.insert(
            "model_rows".into(),
            json!(explained
                .iter()
                .map(|e| e.explanation.model_rows)
                .sum::<u64>()),
        );
        let rows = explained
            .iter()
            .map(|e| {
                let row = &e.explanation.rows[0];
                json!({
                    "tokens": e.tokens.iter().map(|t| json!({
                        "id": t.id,
                        "text": t.text,
                        "start": t.span.map(|s| s.0),
                        "stop": t.span.map(|s| s.1),
                    })).collect::<Vec<_>>(),
                    "method": e.explanation.method.name(),
                    "base_values": row.iter().map(|a| a.base_value).collect::<Vec<_>>(),
                    "attributions": row.iter().map(|a| &a.values).collect::<Vec<_>>(),
                })
            })
            .collect();
        return Ok((outputs, Answer { info, rows }));
    }
    let (outputs, explained) = run_features(call, loaded, inputs, parameters, id, deadline).await?;
    Ok((
        outputs,
        Answer {
            info: info(&explained),
            rows: rows(&explained),
        },
    ))
}

/// The texts of a text model's `text` input.
fn texts_of(inputs: &[NamedTensor]) -> Result<Vec<String>, InferError> {
    let input = inputs
        .iter()
        .find(|t| t.name == crate::text::TEXT_INPUT)
        .ok_or_else(|| {
            InferError::invalid(format!(
                "token attributions explain the input `{}` (BYTES, one text per row)",
                crate::text::TEXT_INPUT
            ))
        })?;
    let TensorData::Bytes(strings) = &input.tensor.data else {
        return Err(InferError::invalid(format!(
            "input `{}` must be BYTES",
            crate::text::TEXT_INPUT
        )));
    };
    strings
        .iter()
        .enumerate()
        .map(|(i, s)| {
            String::from_utf8(s.to_vec())
                .map_err(|_| InferError::invalid(format!("text {i} is not valid UTF-8")))
        })
        .collect()
}

/// Predicts and explains the rows of a model of one numeric input.
async fn run_features(
    call: &mut Call<'_>,
    loaded: &Arc<LoadedVersion>,
    inputs: Vec<NamedTensor>,
    parameters: Option<&Map<String, Value>>,
    id: Option<String>,
    deadline: Option<Instant>,
) -> Result<(Vec<NamedTensor>, Explained), InferError> {
    let explainer = loaded.explainer.clone().ok_or_else(|| {
        InferError::invalid(format!(
            "model `{}` cannot be explained: explanations take models of one numeric input of shape [rows, \
             features]",
            loaded.model
        ))
    })?;
    let options = options(parameters)?;
    let rows = rows_of(&inputs, &explainer.input)?;
    let until = call.deadline(deadline);
    let outputs = call.predict(inputs, None, id, deadline).await?;
    let explained = explainer
        .explain(
            loaded.backend.clone(),
            &loaded.tensor_signature,
            loaded.meta.classes.as_deref(),
            rows,
            options,
            until,
        )
        .await?;
    Ok((outputs, explained))
}

/// What an explanation says of itself: method, space, names and costs.
fn info(e: &Explained) -> Map<String, Value> {
    let x = &e.explanation;
    let mut m = Map::new();
    m.insert("method".into(), json!(x.method.name()));
    m.insert("space".into(), json!(e.space));
    m.insert("features".into(), json!(e.features));
    m.insert("outputs".into(), json!(e.outputs));
    m.insert("background_rows".into(), json!(x.background_rows));
    m.insert("model_rows".into(), json!(x.model_rows));
    m.insert("coalitions".into(), json!(x.coalitions));
    m
}

/// One row's attributions: `base_values` (one per output) and `attributions` (per output, one per feature).
fn rows(e: &Explained) -> Vec<Value> {
    e.explanation
        .rows
        .iter()
        .map(|row| {
            json!({
                "base_values": row.iter().map(|a| a.base_value).collect::<Vec<_>>(),
                "attributions": row.iter().map(|a| &a.values).collect::<Vec<_>>(),
            })
        })
        .collect()
}
