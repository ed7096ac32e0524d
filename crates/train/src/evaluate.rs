//! Evaluation through the serving engine: an exported model directory is loaded with ONNX Runtime (the engine
//! `ferry serve` uses), run on a CSV file's rows, and scored. What is scored is therefore what is served.

use std::path::Path;

use ferry_engine::{Backend, EngineOptions, OrtEngine};
use ferry_model::{NamedTensor, Tensor, TensorData};
use ndarray::{Array2, ArrayView2, Axis};

use crate::data::{load_csv, Dataset, LoadOptions, Target};
use crate::export::{read_metadata, Metadata, MODEL_FILE};
use crate::fit::{Report, Task};
use crate::{metrics, TrainError};

/// Rows sent to the engine at once, to bound memory on big files.
const CHUNK_ROWS: usize = 8192;

/// An exported model loaded in an engine (ONNX Runtime unless built from another [`Backend`]).
pub struct OnnxModel {
    backend: Box<dyn Backend>,
}

/// What an exported model returns for a batch of rows.
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxOutputs {
    /// `probabilities` [N, C] (classifiers) or `prediction` [N, 1] (regressors), widened to f64.
    pub values: Array2<f64>,
    /// `label` (classifiers).
    pub labels: Option<Vec<String>>,
}

fn engine_error(message: String) -> TrainError {
    TrainError::Engine(ferry_engine::EngineError::Run(message))
}

impl OnnxModel {
    /// Loads serialized ONNX bytes.
    pub fn load(engine: &OrtEngine, bytes: &[u8]) -> Result<OnnxModel, TrainError> {
        let options = EngineOptions {
            instances: 1,
            ..EngineOptions::default()
        };
        Ok(OnnxModel::from_backend(Box::new(
            engine.load(bytes, &options)?,
        )))
    }

    /// Wraps a model already loaded in any engine (tract, for instance).
    pub fn from_backend(backend: Box<dyn Backend>) -> OnnxModel {
        OnnxModel { backend }
    }

    /// Runs the model on raw feature rows.
    pub fn run(&self, x: ArrayView2<'_, f64>) -> Result<OnnxOutputs, TrainError> {
        let mut values: Option<Array2<f64>> = None;
        let mut labels: Option<Vec<String>> = None;
        for chunk in x.axis_chunks_iter(Axis(0), CHUNK_ROWS) {
            let data: Vec<f32> = chunk.iter().map(|&v| v as f32).collect();
            let input = Tensor::new(vec![chunk.nrows(), chunk.ncols()], TensorData::F32(data))
                .expect("one value per cell");
            let outputs = self
                .backend
                .predict(vec![NamedTensor::new("features", input)])?;
            for out in outputs {
                match (out.name.as_str(), out.tensor.data) {
                    ("probabilities" | "prediction", TensorData::F32(v)) => {
                        let cols = out.tensor.shape.get(1).copied().unwrap_or(1);
                        let part = Array2::from_shape_vec(
                            (chunk.nrows(), cols),
                            v.into_iter().map(f64::from).collect(),
                        )
                        .map_err(|e| engine_error(format!("output `{}`: {e}", out.name)))?;
                        values = Some(match values.take() {
                            None => part,
                            Some(prev) => {
                                ndarray::concatenate(Axis(0), &[prev.view(), part.view()])
                                    .map_err(|e| engine_error(e.to_string()))?
                            }
                        });
                    }
                    ("label", TensorData::Bytes(v)) => labels
                        .get_or_insert_with(Vec::new)
                        .extend(v.iter().map(|b| String::from_utf8_lossy(b).into_owned())),
                    _ => {}
                }
            }
        }
        let values = values.ok_or_else(|| {
            engine_error("the model has no FP32 `probabilities` or `prediction` output".into())
        })?;
        Ok(OnnxOutputs { values, labels })
    }
}

/// The prediction drift baseline of any ONNX model whose single input is a `[rows, features]` float matrix, from its
/// answers on `x` (run in chunks): a string or integer output with one value per row becomes class frequencies, a
/// float output with one value per row a histogram. Other outputs (probability matrices, maps) are not tracked.
pub fn prediction_baseline(
    engine: &OrtEngine,
    bytes: &[u8],
    x: ArrayView2<'_, f64>,
) -> Result<Vec<crate::stats::PredictionStats>, TrainError> {
    use crate::stats::PredictionStats;
    let options = EngineOptions {
        instances: 1,
        ..EngineOptions::default()
    };
    let backend = engine.load(bytes, &options)?;
    let signature = backend.signature().clone();
    let [input] = signature.inputs.as_slice() else {
        return Err(engine_error(format!(
            "the model takes {} inputs; a prediction baseline needs one [rows, features] input",
            signature.inputs.len()
        )));
    };
    let (name, dtype) = (input.name.clone(), input.dtype);
    if !matches!(
        dtype,
        ferry_model::DataType::F32 | ferry_model::DataType::F64
    ) {
        return Err(engine_error(format!(
            "input `{name}` is {dtype}; a prediction baseline needs FP32 or FP64 features"
        )));
    }
    // Per output: labels (as text) or numbers, in row order.
    let mut labels: Vec<(String, Vec<String>)> = Vec::new();
    let mut numbers: Vec<(String, Vec<f64>)> = Vec::new();
    let mut first = true;
    for chunk in x.axis_chunks_iter(Axis(0), CHUNK_ROWS) {
        let shape = vec![chunk.nrows(), chunk.ncols()];
        let data = match dtype {
            ferry_model::DataType::F64 => TensorData::F64(chunk.iter().copied().collect()),
            _ => TensorData::F32(chunk.iter().map(|&v| v as f32).collect()),
        };
        let tensor = Tensor::new(shape, data).expect("one value per cell");
        let outputs = backend.predict(vec![NamedTensor::new(name.clone(), tensor)])?;
        for out in outputs {
            let one_per_row =
                matches!(out.tensor.shape.as_slice(), [n] | [n, 1] if *n == chunk.nrows());
            if !one_per_row || out.keys.is_some() {
                continue;
            }
            let text: Option<Vec<String>> = match &out.tensor.data {
                TensorData::Bytes(v) => Some(
                    v.iter()
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .collect(),
                ),
                TensorData::I64(v) => Some(v.iter().map(i64::to_string).collect()),
                TensorData::I32(v) => Some(v.iter().map(i32::to_string).collect()),
                TensorData::U8(v) => Some(v.iter().map(u8::to_string).collect()),
                TensorData::Bool(v) => Some(v.iter().map(|b| u8::from(*b).to_string()).collect()),
                _ => None,
            };
            let floats: Option<Vec<f64>> = match &out.tensor.data {
                TensorData::F32(v) => Some(v.iter().map(|&f| f64::from(f)).collect()),
                TensorData::F64(v) => Some(v.clone()),
                _ => None,
            };
            if let Some(t) = text {
                match labels.iter_mut().find(|(n, _)| *n == out.name) {
                    Some((_, all)) => all.extend(t),
                    None if first => labels.push((out.name.clone(), t)),
                    None => {}
                }
            } else if let Some(f) = floats {
                match numbers.iter_mut().find(|(n, _)| *n == out.name) {
                    Some((_, all)) => all.extend(f),
                    None if first => numbers.push((out.name.clone(), f)),
                    None => {}
                }
            }
        }
        first = false;
    }
    let rows = x.nrows();
    let mut stats: Vec<PredictionStats> = labels
        .iter()
        .filter(|(_, v)| v.len() == rows && rows > 0)
        .map(|(n, v)| PredictionStats::from_labels(n, v))
        .collect();
    stats.extend(
        numbers
            .iter()
            .filter(|(_, v)| v.len() == rows && rows > 0)
            .map(|(n, v)| PredictionStats::numeric(n, ndarray::ArrayView1::from(v))),
    );
    // Signature order, as the server lists outputs.
    stats.sort_by_key(|s| signature.outputs.iter().position(|o| o.name == s.output));
    Ok(stats)
}

/// Loads `model_dir` (its `model.onnx` and `ferry.json`), runs it on `data`, and scores it.
pub fn evaluate(
    engine: &OrtEngine,
    model_dir: &Path,
    data: &Path,
) -> Result<(Metadata, Report), TrainError> {
    let meta = read_metadata(model_dir)?;
    let model_path = model_dir.join(MODEL_FILE);
    let bytes = std::fs::read(&model_path).map_err(|e| TrainError::io(&model_path, e))?;
    let dataset = load_for(&meta, data)?;
    let model = OnnxModel::load(engine, &bytes)?;
    let report = score_model(&model, &meta, &dataset)?;
    Ok((meta, report))
}

/// Reads the columns a model described by `meta` needs from `data`.
pub fn load_for(meta: &Metadata, data: &Path) -> Result<Dataset, TrainError> {
    let options = LoadOptions {
        target: Some(meta.target.clone()),
        features: Some(meta.features.clone()),
        impute: meta.imputation.as_ref().map(|i| i.strategy),
        ..LoadOptions::default()
    };
    load_csv(data, &options)
}

/// Runs a loaded model on every row of `dataset` and scores it against the target.
pub fn score_model(
    model: &OnnxModel,
    meta: &Metadata,
    dataset: &Dataset,
) -> Result<Report, TrainError> {
    let outputs = model.run(dataset.x.view())?;
    Ok(match meta.task {
        Task::Regression => {
            let truth = dataset.values()?;
            Report::Regression(metrics::regression(
                truth,
                &outputs.values.column(0).to_vec(),
            ))
        }
        Task::Classification => {
            let classes = meta.classes.clone().ok_or_else(|| TrainError::Metadata {
                path: dataset.path.clone(),
                message: "a classifier's ferry.json must list its classes".into(),
            })?;
            let truth = class_indices(&dataset.target, &classes).map_err(|e| TrainError::Data {
                path: dataset.path.clone(),
                message: e.to_string(),
            })?;
            Report::Classification(metrics::classification(
                &classes,
                &truth,
                outputs.values.view(),
            ))
        }
    })
}

/// A target value that is none of the model's classes.
#[derive(Debug, thiserror::Error)]
#[error("target value `{label}` is not one of the model's classes ({})", .classes.join(", "))]
struct UnknownClass {
    /// The value, as written (numbers as `f64` displays them).
    label: String,
    /// The model's classes.
    classes: Vec<String>,
}

/// Maps a target column onto a model's classes: by label, or by numeric value for numeric classes.
fn class_indices(target: &Target, classes: &[String]) -> Result<Vec<usize>, UnknownClass> {
    let unknown = |label: &str| UnknownClass {
        label: label.to_string(),
        classes: classes.to_vec(),
    };
    match target {
        Target::Labels {
            classes: names,
            index,
        } => {
            let map: Vec<usize> = names
                .iter()
                .map(|n| {
                    classes
                        .iter()
                        .position(|c| c == n)
                        .ok_or_else(|| unknown(n))
                })
                .collect::<Result<_, _>>()?;
            Ok(index.iter().map(|&i| map[i]).collect())
        }
        Target::Numeric { values, .. } => {
            let numeric: Vec<Option<f64>> = classes.iter().map(|c| c.parse::<f64>().ok()).collect();
            values
                .iter()
                .map(|v| {
                    numeric
                        .iter()
                        .position(|c| *c == Some(*v))
                        .ok_or_else(|| unknown(&v.to_string()))
                })
                .collect()
        }
    }
}
