//! Export: the ONNX graph of a [`Trained`] model, its `ferry.json` and its `background.csv` (see
//! [`background`](crate::background)), written to a directory or published as the next version of a model in a
//! repository (`<repo>/<model>/<version>/`).
//!
//! The graph takes raw features: imputation (when asked for) is an `IsNaN`/`Where` pair, and standardization is
//! folded into the first layer's weights (W' = W / σ, b' = b − (μ / σ)·W), the target scale of a regressor into
//! the last (W' = W·s, b' = b·s + μ_y). Classifiers end in `Softmax` → `probabilities` and `ArgMax` → `Gather`
//! on a string initializer of class names → `label`; binary logistic models export their single logit z as the
//! pair (0, z), whose softmax is exactly (1 − σ(z), σ(z)).
//!
//! Publishing never shows a reader half a model: files go to a hidden temporary directory beside the versions,
//! are synced to disk, and the directory is renamed into place (a rename onto an existing version fails, and the
//! next number is tried).

use std::io::Write;
use std::path::{Path, PathBuf};

use ferry_model::onnx::{AttributeProto, GraphBuilder, TensorProto};
use ferry_model::DataType;
use ndarray::{Array1, Array2};
use sha2::{Digest, Sha256};

use crate::background::Background;
use crate::data::{Dataset, Impute};
use crate::fit::{EpochLog, HyperParameters, Report, Task, Trained};
use crate::network::{Activation, Head};
use crate::stats::FeatureStats;
use crate::TrainError;

/// The file names inside a model version directory.
pub const MODEL_FILE: &str = "model.onnx";
/// See [`MODEL_FILE`].
pub const METADATA_FILE: &str = "ferry.json";
pub use crate::background::BACKGROUND_FILE;

/// Everything `ferry.json` records about a model.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Metadata {
    /// `classification` or `regression`.
    pub task: Task,
    /// The model family.
    pub model: crate::fit::ModelKind,
    /// The target column's name.
    pub target: String,
    /// Feature column names, in input order.
    pub features: Vec<String>,
    /// Class labels in output column order (classifiers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<String>>,
    /// The resolved training settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hyper_parameters: Option<HyperParameters>,
    /// The seed of every random draw.
    #[serde(default)]
    pub seed: u64,
    /// The training file and its hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_data: Option<TrainingData>,
    /// How missing values were filled, when they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imputation: Option<Imputation>,
    /// Validation scores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    /// The epoch whose weights were kept.
    #[serde(default)]
    pub best_epoch: usize,
    /// Wall time of the fit in seconds.
    #[serde(default)]
    pub training_seconds: f64,
    /// One record per epoch run.
    #[serde(default)]
    pub loss_curve: Vec<EpochLog>,
    /// Per-feature statistics of the training rows: the drift baseline.
    #[serde(default)]
    pub feature_stats: Vec<FeatureStats>,
    /// The distribution of the model's predictions on its training rows: the prediction drift baseline.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prediction_stats: Vec<crate::stats::PredictionStats>,
    /// Hex sha256 of `model.onnx`.
    #[serde(default)]
    pub model_sha256: String,
    /// The tool and its version.
    #[serde(default)]
    pub trained_by: String,
    /// For an int8 model: how it compares with the float model it came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<crate::quantize::Comparison>,
    /// For a model `ferry retrain` published: how it compared with the live version on the holdout rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<crate::gate::GateRecord>,
}

/// The training file.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainingData {
    /// The path it was read from.
    pub path: String,
    /// Hex sha256 of its bytes.
    pub sha256: String,
    /// Data rows.
    pub rows: usize,
    /// Rows trained on.
    pub training_rows: usize,
    /// Rows held out for validation.
    pub validation_rows: usize,
}

/// How missing values were filled.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Imputation {
    /// Mean or median.
    pub strategy: Impute,
    /// The value per feature, in feature order (also in the graph).
    pub values: Vec<f64>,
}

/// Validation scores: the headline number and the full report.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Metrics {
    /// Validation accuracy (classifiers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_accuracy: Option<f64>,
    /// Validation R² (regressors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_r2: Option<f64>,
    /// Which rows were scored: `validation`, or `training` when none were held out.
    #[serde(default)]
    pub scored_on: String,
    /// The full report (absent from metadata written by other tools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<Report>,
}

/// The metadata of a trained model (without `model_sha256`, which [`write_model`] fills in).
pub fn metadata(trained: &Trained, dataset: &Dataset, imputed_with: Option<Impute>) -> Metadata {
    let (validation_accuracy, validation_r2) = match &trained.validation {
        Report::Classification(r) => (Some(r.accuracy), None),
        Report::Regression(r) => (None, Some(r.r2)),
    };
    Metadata {
        task: trained.hyper.task,
        model: trained.hyper.model,
        target: dataset.target_name.clone(),
        features: dataset.features.clone(),
        classes: trained.classes.clone(),
        hyper_parameters: Some(trained.hyper.clone()),
        seed: trained.hyper.seed,
        training_data: Some(TrainingData {
            path: dataset.path.display().to_string(),
            sha256: dataset.sha256.clone(),
            rows: dataset.rows(),
            training_rows: trained.training_rows,
            validation_rows: trained.validation_rows,
        }),
        imputation: imputed_with
            .zip(dataset.imputed.clone())
            .map(|(strategy, values)| Imputation { strategy, values }),
        metrics: Some(Metrics {
            validation_accuracy,
            validation_r2,
            scored_on: if trained.validation_rows > 0 {
                "validation"
            } else {
                "training"
            }
            .into(),
            report: Some(trained.validation.clone()),
        }),
        best_epoch: trained.best_epoch,
        training_seconds: trained.seconds,
        loss_curve: trained.curve.clone(),
        feature_stats: trained.feature_stats.clone(),
        prediction_stats: trained.prediction_stats.clone(),
        model_sha256: String::new(),
        trained_by: format!("ferry {}", env!("CARGO_PKG_VERSION")),
        quantization: None,
        gate: None,
    }
}

fn f32_tensor(name: &str, a: &Array2<f64>) -> TensorProto {
    let dims = [a.nrows() as i64, a.ncols() as i64];
    TensorProto::f32(name, &dims, a.iter().map(|&v| v as f32).collect())
}

fn f32_vector(name: &str, a: &Array1<f64>) -> TensorProto {
    TensorProto::f32(
        name,
        &[a.len() as i64],
        a.iter().map(|&v| v as f32).collect(),
    )
}

/// The standard ONNX model (opset 17) of a trained model; `impute` gives the fill value per feature when missing
/// inputs (NaN) are to be filled in the graph.
pub fn onnx_model(trained: &Trained, impute: Option<&[f64]>) -> Vec<u8> {
    let layers = &trained.network.layers;
    let n_features = trained.input_mean.len() as i64;
    let mut weights: Vec<(Array2<f64>, Array1<f64>)> =
        layers.iter().map(|l| (l.w.clone(), l.b.clone())).collect();
    // Fold standardization into the first layer.
    {
        let (w, b) = &mut weights[0];
        let scaled_mean = &trained.input_mean / &trained.input_std;
        *b = &*b - &scaled_mean.dot(&*w);
        for (mut row, s) in w.rows_mut().into_iter().zip(trained.input_std.iter()) {
            row /= *s;
        }
    }
    let last = weights.len() - 1;
    if let Some((mean, std)) = trained.target_scale {
        let (w, b) = &mut weights[last];
        *w *= std;
        *b = b.mapv(|v| v * std + mean);
    }
    if trained.network.head == Head::Sigmoid {
        let (w, b) = &mut weights[last];
        let mut two = Array2::zeros((w.nrows(), 2));
        two.column_mut(1).assign(&w.column(0));
        *w = two;
        *b = ndarray::arr1(&[0.0, b[0]]);
    }

    let mut g = GraphBuilder::new(&format!("ferry_{:?}", trained.hyper.model).to_lowercase())
        .input("features", DataType::F32, Some(&[-1, n_features]));
    let mut current = "features".to_string();
    if let Some(fill) = impute {
        g = g
            .initializer(TensorProto::f32(
                "impute_values",
                &[n_features],
                fill.iter().map(|&v| v as f32).collect(),
            ))
            .node("IsNaN", &["features"], &["missing"], vec![])
            .node(
                "Where",
                &["missing", "impute_values", "features"],
                &["imputed"],
                vec![],
            );
        current = "imputed".into();
    }
    for (l, (w, b)) in weights.iter().enumerate() {
        let is_last = l == last;
        let out = match (is_last, trained.hyper.task) {
            (true, Task::Regression) => "prediction".to_string(),
            (true, Task::Classification) => "logits".to_string(),
            (false, _) => format!("z{l}"),
        };
        let (wn, bn) = (format!("W{l}"), format!("B{l}"));
        g = g
            .initializer(f32_tensor(&wn, w))
            .initializer(f32_vector(&bn, b))
            .node("Gemm", &[&current, &wn, &bn], &[&out], vec![]);
        current = out;
        if !is_last {
            let op = match trained.hyper.activation {
                Activation::Relu => "Relu",
                Activation::Tanh => "Tanh",
            };
            let act = format!("a{l}");
            g = g.node(op, &[&current], &[&act], vec![]);
            current = act;
        }
    }
    match (&trained.classes, trained.hyper.task) {
        (Some(classes), Task::Classification) => {
            let names = TensorProto {
                name: "classes".into(),
                dims: vec![classes.len() as i64],
                data_type: DataType::Bytes.onnx_code(),
                string_data: classes.iter().map(|c| c.as_bytes().to_vec()).collect(),
                ..Default::default()
            };
            let k = classes.len() as i64;
            g = g
                .initializer(names)
                .node(
                    "Softmax",
                    &["logits"],
                    &["probabilities"],
                    vec![AttributeProto::int("axis", 1)],
                )
                .node(
                    "ArgMax",
                    &["probabilities"],
                    &["index"],
                    vec![
                        AttributeProto::int("axis", 1),
                        AttributeProto::int("keepdims", 0),
                    ],
                )
                .node(
                    "Gather",
                    &["classes", "index"],
                    &["label"],
                    vec![AttributeProto::int("axis", 0)],
                )
                .output("label", DataType::Bytes, Some(&[-1]))
                .output("probabilities", DataType::F32, Some(&[-1, k]));
        }
        _ => g = g.output("prediction", DataType::F32, Some(&[-1, 1])),
    }
    g.metadata(
        "ferry.model",
        &format!("{:?}", trained.hyper.model).to_lowercase(),
    )
    .to_bytes()
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let mut file = std::fs::File::create(path).map_err(|e| TrainError::io(path, e))?;
    file.write_all(bytes).map_err(|e| TrainError::io(path, e))?;
    file.sync_all().map_err(|e| TrainError::io(path, e))
}

fn sync_dir(dir: &Path) -> Result<(), TrainError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| TrainError::io(dir, e))
}

/// The text of `ferry.json` for the model `onnx`, with its sha256 filled in.
pub fn metadata_json(onnx: &[u8], metadata: &Metadata) -> Vec<u8> {
    let mut metadata = metadata.clone();
    metadata.model_sha256 = sha256_hex(onnx);
    let mut json = serde_json::to_vec_pretty(&metadata).expect("metadata serializes");
    json.push(b'\n');
    json
}

/// The background sample `ferry train` keeps: up to `n` of the training split's rows (never the validation rows),
/// drawn with the training seed; `None` when `n` is 0.
pub fn training_background(trained: &Trained, dataset: &Dataset, n: usize) -> Option<Background> {
    crate::background::sample(
        dataset,
        &trained.training_row_indices,
        n,
        trained.hyper.seed,
    )
}

/// Writes `model.onnx`, `ferry.json` (with the model's sha256 filled in) and, when given, `background.csv` into
/// `dir`, creating it. A `background.csv` already there is removed when none is given, so that a directory never
/// pairs a model with another model's background.
pub fn write_model(
    dir: &Path,
    onnx: &[u8],
    metadata: &Metadata,
    background: Option<&Background>,
) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    let json = metadata_json(onnx, metadata);
    write_synced(&dir.join(MODEL_FILE), onnx)?;
    write_synced(&dir.join(METADATA_FILE), &json)?;
    let background_path = dir.join(BACKGROUND_FILE);
    match background {
        Some(b) => write_synced(&background_path, &b.to_csv())?,
        None => match std::fs::remove_file(&background_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(TrainError::io(&background_path, e))
            }
            _ => {}
        },
    }
    sync_dir(dir)
}

/// Publishes a model (and its background, when given) as the next version of `<repository>/<model>` and returns
/// the version directory.
pub fn publish(
    model_dir: &Path,
    onnx: &[u8],
    metadata: &Metadata,
    background: Option<&Background>,
) -> Result<PathBuf, TrainError> {
    std::fs::create_dir_all(model_dir).map_err(|e| TrainError::io(model_dir, e))?;
    let staging = model_dir.join(format!(".ferry-publish-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| TrainError::io(&staging, e))?;
    }
    write_model(&staging, onnx, metadata, background)?;
    let mut version = latest_version(model_dir)? + 1;
    loop {
        let target = model_dir.join(version.to_string());
        match std::fs::rename(&staging, &target) {
            Ok(()) => {
                sync_dir(model_dir)?;
                return Ok(target);
            }
            // Another publisher took this number first (or an empty folder sits there): try the next one.
            Err(_) if target.exists() && version < u64::MAX => version += 1,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(TrainError::io(&target, e));
            }
        }
    }
}

/// Where a model goes: `--out DIR` or `--publish REPO/MODEL`.
#[derive(Debug, Clone, Copy)]
pub enum Destination<'a> {
    /// Write `model.onnx` and `ferry.json` into this directory.
    Dir(&'a Path),
    /// Publish as the next version of this model directory.
    Publish(&'a Path),
}

impl<'a> Destination<'a> {
    /// The destination the two flags give (clap makes exactly one of them present).
    pub fn from_flags(out: Option<&'a Path>, publish: Option<&'a Path>) -> Option<Destination<'a>> {
        out.map(Destination::Dir)
            .or(publish.map(Destination::Publish))
    }

    /// Writes or publishes the model (and its background, when given) and returns the directory it went to.
    pub fn save(
        self,
        onnx: &[u8],
        metadata: &Metadata,
        background: Option<&Background>,
    ) -> Result<PathBuf, TrainError> {
        match self {
            Destination::Dir(dir) => {
                write_model(dir, onnx, metadata, background).map(|()| dir.to_path_buf())
            }
            Destination::Publish(model_dir) => publish(model_dir, onnx, metadata, background),
        }
    }
}

/// The highest version number under `model_dir` (0 when there is none).
pub fn latest_version(model_dir: &Path) -> Result<u64, TrainError> {
    let entries = std::fs::read_dir(model_dir).map_err(|e| TrainError::io(model_dir, e))?;
    Ok(entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()))
        .max()
        .unwrap_or(0))
}

/// Reads a model directory's `ferry.json`.
pub fn read_metadata(dir: &Path) -> Result<Metadata, TrainError> {
    let path = dir.join(METADATA_FILE);
    let text = std::fs::read(&path).map_err(|e| TrainError::io(&path, e))?;
    serde_json::from_slice(&text).map_err(|e| TrainError::Metadata {
        path,
        message: format!("not a ferry.json this version understands: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_from_other_tools_reads_with_what_evaluation_needs() {
        let meta: Metadata = serde_json::from_str(
            r#"{"task":"classification","model":"softmax","target":"label","features":["a","b"],
                "classes":["x","y"],"trained_by":"numpy","metrics":{"validation_accuracy":0.9}}"#,
        )
        .unwrap();
        assert_eq!(
            meta.classes.as_deref(),
            Some(&["x".to_string(), "y".to_string()][..])
        );
        assert_eq!(meta.metrics.unwrap().validation_accuracy, Some(0.9));
    }

    #[test]
    fn the_background_is_a_seeded_sample_of_the_training_split_only() {
        let dir = std::env::temp_dir().join(format!("ferry-background-fit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // The first feature is the row number, so the sample says which rows it took.
        let mut text = String::from("row,x,y\n");
        for r in 0..300 {
            text.push_str(&format!("{r},{},{}\n", (r % 7) as f64 * 0.1, r % 2));
        }
        let data = dir.join("data.csv");
        std::fs::write(&data, text).unwrap();
        let dataset = crate::load_csv(&data, &Default::default()).unwrap();
        let mut options = crate::TrainOptions::new(crate::ModelKind::Logistic);
        options.epochs = Some(2);
        options.validation_fraction = 0.3;
        options.seed = 5;
        let trained = crate::fit(&dataset, &options, &mut |_| {}).unwrap();
        assert_eq!(trained.training_row_indices.len(), trained.training_rows);
        let background = training_background(&trained, &dataset, 100).unwrap();
        assert_eq!(background.rows, 100);
        assert_eq!(background.features, ["row", "x"]);
        let rows: Vec<usize> = (0..100).map(|r| background.row(r)[0] as usize).collect();
        assert!(rows
            .iter()
            .all(|r| trained.training_row_indices.binary_search(r).is_ok()));
        // Not just the first rows of the split: a draw across it.
        assert_ne!(rows, trained.training_row_indices[..100]);
        // The same data and seed, the same rows; another seed, others.
        let again = crate::fit(&dataset, &options, &mut |_| {}).unwrap();
        assert_eq!(training_background(&again, &dataset, 100), Some(background));
        options.seed = 6;
        let other = crate::fit(&dataset, &options, &mut |_| {}).unwrap();
        assert_ne!(
            training_background(&other, &dataset, 100).unwrap().values,
            training_background(&trained, &dataset, 100).unwrap().values
        );
        // Fewer training rows than asked for: all of them; 0: none.
        assert_eq!(
            training_background(&trained, &dataset, 1000).unwrap().rows,
            trained.training_rows
        );
        assert!(training_background(&trained, &dataset, 0).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn publish_takes_the_next_number_and_leaves_no_staging_folder() {
        let dir = std::env::temp_dir().join(format!("ferry-publish-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("3")).unwrap();
        std::fs::create_dir_all(dir.join("notes")).unwrap();
        let meta: Metadata = serde_json::from_str(
            r#"{"task":"regression","model":"linear","target":"y","features":["x"]}"#,
        )
        .unwrap();
        let first = publish(&dir, b"onnx", &meta, None).unwrap();
        assert_eq!(first, dir.join("4"));
        assert!(!first.join(BACKGROUND_FILE).exists());
        let background = Background {
            features: vec!["x".into()],
            rows: 2,
            values: vec![0.25, f64::NAN],
        };
        let second = publish(&dir, b"onnx", &meta, Some(&background)).unwrap();
        assert_eq!(second, dir.join("5"));
        let written = read_metadata(&second).unwrap();
        assert_eq!(written.model_sha256, sha256_hex(b"onnx"));
        assert_eq!(std::fs::read(second.join(MODEL_FILE)).unwrap(), b"onnx");
        let read = crate::background::read_background(&second.join(BACKGROUND_FILE)).unwrap();
        assert_eq!(read.features, written.features);
        assert_eq!(read.values[0], 0.25);
        assert!(read.values[1].is_nan());
        let hidden = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with('.')
            })
            .count();
        assert_eq!(hidden, 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
