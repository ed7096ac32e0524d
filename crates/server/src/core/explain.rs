//! Feature attributions for a loaded version: which method explains it (chosen when it loads, from its graph), its
//! background sample (`background.csv` beside `model.onnx`), and running an explanation under a budget and the
//! request's deadline, in a lane of its own so that explanations never hold up predictions.
//!
//! Methods ([`ferry_explain`]): exact SHAP from the weights for `ferry train`'s linear models (in the `Gemm`'s
//! margin space: logits for classifiers), exact interventional TreeSHAP for ONNX tree ensembles (in the ensemble's
//! raw margin space, before its post-transform), and KernelSHAP for any other model with one numeric
//! `[rows, features]` input, whose perturbed rows run on the version's engine in batches of up to
//! [`KERNEL_ROWS_PER_CALL`].
//!
//! The explain lane: one explanation runs at a time per server (`lane`), on the blocking pool, calling the
//! engine directly rather than through the version's queue; predictions keep the queue and the worker threads.
//! On a machine of N cores an explanation takes at most one of them.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use ferry_explain::kernel::{KernelError, KernelOptions};
use ferry_explain::model::{EnsembleKind, LinearSpace, PostTransform};
use ferry_explain::{Ensemble, Explanation, LinearModel, Recognised};
use ferry_model::{DataType, NamedTensor, Signature, Tensor, TensorData};

use crate::error::{ErrorKind, InferError};

pub use ferry_explain::background::{read as read_background, Background, BACKGROUND_FILE};
/// The largest graph read for an exact method (decoding copies its weights); larger ones get KernelSHAP.
const MAX_GRAPH_BYTES: usize = 256 << 20;
/// The most rows one explain request may ask about.
pub const MAX_EXPLAIN_ROWS: usize = 1000;
/// Rows per engine call for KernelSHAP's perturbed rows.
pub const KERNEL_ROWS_PER_CALL: usize = 4096;
/// The default budget of model rows for one KernelSHAP request, and the most a request may ask for.
pub const DEFAULT_MODEL_ROWS: u64 = 1 << 20;
/// See [`DEFAULT_MODEL_ROWS`].
pub const MAX_MODEL_ROWS: u64 = 1 << 24;
/// The most tree nodes × background rows × explained rows one TreeSHAP request may cost.
pub const MAX_TREE_WORK: u64 = 1 << 32;

/// How a version is explained, settled when it loads.
#[derive(Debug)]
pub struct Explainer {
    /// The input explained.
    pub input: String,
    /// Features per row.
    pub features: usize,
    /// Feature names (`ferry.json`'s, the background header's, else `f0`, `f1`, ...).
    pub feature_names: Vec<String>,
    method: Available,
    background: Result<Background, String>,
    /// The figures of the last importance computation, which the metrics show.
    last: parking_lot::Mutex<Option<Arc<crate::metrics::ImportanceFigures>>>,
}

/// The most background rows explained for global importance (the first ones of the file).
pub const IMPORTANCE_BACKGROUND_ROWS: usize = 200;

/// Global feature importance of a version: over its background sample and over its recent live rows.
#[derive(Debug)]
pub struct Importance {
    /// How attributions were computed (`linear`, `tree_interventional`, `kernel_exact`, `kernel_sampled`).
    pub method: &'static str,
    /// What the attributions add up to.
    pub space: String,
    /// Feature names.
    pub features: Vec<String>,
    /// Explained outputs.
    pub outputs: Vec<String>,
    /// Background rows explained.
    pub background_rows: usize,
    /// `[output][feature]`: mean |attribution| over the background rows.
    pub background: Vec<Vec<f64>>,
    /// Live rows explained (the recent sampled rows of the drift window).
    pub live_rows: usize,
    /// `[output][feature]`: mean |attribution| over the live rows.
    pub live: Option<Vec<Vec<f64>>>,
    /// `[output][feature]`: mean attribution over the live rows, signed: since each row's attributions add up to
    /// its output minus the background's mean output, these add up to the shift of the mean prediction, split by
    /// feature (drift attribution).
    pub shift: Option<Vec<Vec<f64>>>,
    /// Per output: the live rows' mean output minus the background's (the sum of `shift`).
    pub prediction_shift: Option<Vec<f64>>,
}

/// `[output][feature]` means of `f(attribution)` over an explanation's rows.
fn means(e: &Explanation, f: impl Fn(f64) -> f64) -> Vec<Vec<f64>> {
    let n = e.rows.len().max(1) as f64;
    (0..e.outputs)
        .map(|k| {
            (0..e.features)
                .map(|j| e.rows.iter().map(|r| f(r[k].values[j])).sum::<f64>() / n)
                .collect()
        })
        .collect()
}

#[derive(Debug)]
enum Available {
    Linear(LinearModel),
    Trees(Ensemble),
    /// KernelSHAP on `output` (the first numeric output, unless the request names another); `why` says why no
    /// exact method applies.
    Kernel {
        why: String,
    },
}

/// What a request may choose.
#[derive(Debug, Clone)]
pub struct Options {
    /// `auto`, `linear`, `tree` or `kernel`.
    pub method: Option<String>,
    /// KernelSHAP: the output explained (default: the first numeric output).
    pub output: Option<String>,
    /// KernelSHAP: the most model rows it may run.
    pub max_model_rows: u64,
    /// KernelSHAP: coalitions sampled per row when features are too many to enumerate.
    pub coalitions: usize,
    /// KernelSHAP: enumerate every coalition up to this many varying features.
    pub exact_max_features: usize,
    /// KernelSHAP: the seed of its sampling.
    pub seed: u64,
}

impl Default for Options {
    fn default() -> Options {
        let k = KernelOptions::default();
        Options {
            method: None,
            output: None,
            max_model_rows: DEFAULT_MODEL_ROWS,
            coalitions: k.coalitions,
            exact_max_features: k.exact_max_features,
            seed: k.seed,
        }
    }
}

/// An explanation with what the answer says about it.
#[derive(Debug)]
pub struct Explained {
    /// The attributions.
    pub explanation: Explanation,
    /// What the attributions add up to: a sentence for the answer.
    pub space: String,
    /// One name per explained output (class labels, or output names and columns).
    pub outputs: Vec<String>,
    /// Feature names, one per attribution.
    pub features: Vec<String>,
}

impl Explainer {
    /// Works out how a version is explained: its one numeric `[rows, features]` input, the method its graph allows
    /// and its background. `None` for models explanations cannot apply to (several inputs, text, no fixed feature
    /// count); a graph the recognizer refuses is explained by KernelSHAP, and a missing or bad background file is
    /// kept as the error explain requests get.
    pub fn prepare(
        dir: &Path,
        bytes: &[u8],
        signature: &Signature,
        feature_names: Option<&[String]>,
        background_file: Option<&str>,
    ) -> Option<Explainer> {
        let background_file = background_file.unwrap_or(BACKGROUND_FILE);
        let [input] = signature.inputs.as_slice() else {
            return None;
        };
        let numeric = matches!(
            input.dtype,
            DataType::F32 | DataType::F64 | DataType::F16 | DataType::I32 | DataType::I64
        );
        let features = match input.shape.as_deref() {
            Some([_, f]) if *f > 0 && numeric => usize::try_from(*f).ok()?,
            _ => return None,
        };
        let method = match (bytes.len() <= MAX_GRAPH_BYTES)
            .then_some(bytes)
            .ok_or_else(|| format!("the graph is over {MAX_GRAPH_BYTES} bytes, too large to read for an exact method"))
            .and_then(|b| prost::Message::decode(b).map_err(|e: prost::DecodeError| e.to_string()))
            .and_then(|m| ferry_explain::recognise(&m).map_err(|e| e.to_string()))
        {
            Ok(Recognised::Linear(m)) if m.features == features => Available::Linear(m),
            Ok(Recognised::Trees(t)) if t.features <= features => Available::Trees(t),
            Ok(Recognised::Other { reason }) => Available::Kernel { why: reason },
            Ok(_) => Available::Kernel {
                why: "the graph's feature count differs from its input's".into(),
            },
            Err(e) => Available::Kernel {
                why: format!("the graph was not recognised: {e}"),
            },
        };
        let background = match read_background(&dir.join(background_file)).map_err(|e| e.to_string()) {
            Ok(b) if b.features.len() != features => Err(format!(
                "{background_file} has {} columns; the model takes {features} features",
                b.features.len()
            )),
            Ok(b) if b.rows == 0 => Err(format!("{background_file} has no rows")),
            Ok(b) => Ok(b),
            Err(e) if !dir.join(background_file).exists() => Err(format!(
                "the version has no background sample ({background_file}: `ferry train` writes one, `ferry baseline \
                 --background-rows` for models made elsewhere): attributions need rows to compare against ({e})"
            )),
            Err(e) => Err(e),
        };
        let feature_names = match (feature_names, &background) {
            (Some(names), _) if names.len() == features => names.to_vec(),
            (_, Ok(b)) => b.features.clone(),
            _ => (0..features).map(|i| format!("f{i}")).collect(),
        };
        Some(Explainer {
            input: input.name.clone(),
            features,
            feature_names,
            method,
            background,
            last: parking_lot::Mutex::new(None),
        })
    }

    /// The figures of the last importance computation, if any.
    pub fn last(&self) -> Option<Arc<crate::metrics::ImportanceFigures>> {
        self.last.lock().clone()
    }

    /// Global importance: the attributions of (up to [`IMPORTANCE_BACKGROUND_ROWS`] of) the background rows and of
    /// the `live` rows (row-major, as the drift window kept them), each averaged; the gauges show the result.
    pub async fn importance(
        self: &Arc<Self>,
        backend: Arc<dyn ferry_engine::Backend>,
        signature: &Signature,
        classes: Option<&[String]>,
        live: (usize, Vec<f64>),
        deadline: Instant,
    ) -> Result<Importance, InferError> {
        let background = self
            .background
            .as_ref()
            .map_err(|e| InferError::invalid(e.clone()))?;
        let rows = background.rows.min(IMPORTANCE_BACKGROUND_ROWS);
        let sample = background.values[..rows * self.features].to_vec();
        let bg = self
            .explain(
                backend.clone(),
                signature,
                classes,
                sample,
                Options::default(),
                deadline,
            )
            .await?;
        let live = if live.0 > 0 {
            Some(
                self.explain(
                    backend,
                    signature,
                    classes,
                    live.1,
                    Options::default(),
                    deadline,
                )
                .await?,
            )
        } else {
            None
        };
        let total = |f: &[Vec<f64>]| -> Vec<f64> {
            (0..self.features)
                .map(|j| f.iter().map(|o| o[j]).sum())
                .collect()
        };
        let importance = Importance {
            method: bg.explanation.method.name(),
            space: bg.space.clone(),
            features: bg.features.clone(),
            outputs: bg.outputs.clone(),
            background_rows: rows,
            background: means(&bg.explanation, f64::abs),
            live_rows: live.as_ref().map_or(0, |l| l.explanation.rows.len()),
            live: live.as_ref().map(|l| means(&l.explanation, f64::abs)),
            shift: live.as_ref().map(|l| means(&l.explanation, |v| v)),
            prediction_shift: live.as_ref().map(|l| {
                let n = l.explanation.rows.len().max(1) as f64;
                (0..l.explanation.outputs)
                    .map(|k| {
                        l.explanation
                            .rows
                            .iter()
                            .map(|r| r[k].values.iter().sum::<f64>())
                            .sum::<f64>()
                            / n
                    })
                    .collect()
            }),
        };
        *self.last.lock() = Some(Arc::new(crate::metrics::ImportanceFigures {
            features: importance.features.clone(),
            background: total(&importance.background),
            live: importance.live.as_deref().map(total),
            drift: importance.shift.as_deref().map(|s| {
                (0..self.features)
                    .map(|j| s.iter().map(|o| o[j].abs()).sum())
                    .collect()
            }),
        }));
        Ok(importance)
    }

    /// The method chosen automatically: `linear`, `tree` or `kernel`.
    pub fn method(&self) -> &'static str {
        match &self.method {
            Available::Linear(_) => "linear",
            Available::Trees(_) => "tree",
            Available::Kernel { .. } => "kernel",
        }
    }

    /// Explains `rows` (row-major, `features` wide) of `version`: on the blocking pool, one explanation at a time
    /// per server, refused with DEADLINE_EXCEEDED once `deadline` passes.
    pub async fn explain(
        self: &Arc<Self>,
        backend: Arc<dyn ferry_engine::Backend>,
        signature: &Signature,
        classes: Option<&[String]>,
        rows: Vec<f64>,
        options: Options,
        deadline: Instant,
    ) -> Result<Explained, InferError> {
        let n = rows.len() / self.features.max(1);
        if n == 0 {
            return Err(InferError::invalid("no rows to explain"));
        }
        if n > MAX_EXPLAIN_ROWS {
            return Err(InferError::invalid(format!(
                "{n} rows to explain; at most {MAX_EXPLAIN_ROWS} in one request"
            )));
        }
        if options.max_model_rows == 0 {
            return Err(InferError::invalid("`max_model_rows` must be at least 1"));
        }
        if options.max_model_rows > MAX_MODEL_ROWS {
            return Err(InferError::invalid(format!(
                "`max_model_rows` may be at most {MAX_MODEL_ROWS}"
            )));
        }
        let method = match options.method.as_deref() {
            None | Some("auto") => self.method(),
            Some(m @ ("linear" | "tree")) if m == self.method() => self.method(),
            Some("kernel") => "kernel",
            Some(m @ ("linear" | "tree")) => {
                let why = match &self.method {
                    Available::Kernel { why } => format!(": {why}"),
                    _ => String::new(),
                };
                return Err(InferError::invalid(format!(
                    "method `{m}` does not apply to this model (its method is `{}`{why})",
                    self.method()
                )));
            }
            Some(other) => {
                return Err(InferError::invalid(format!(
                    "unknown method `{other}` (auto, linear, tree or kernel)"
                )))
            }
        };
        let background = self
            .background
            .as_ref()
            .map_err(|e| InferError::invalid(e.clone()))?;
        let kernel_output = if method == "kernel" {
            Some(kernel_output(signature, options.output.as_deref())?)
        } else {
            None
        };
        // A bounded line: explanations waiting hold admission slots, so a flood of them must not fill the server's
        // `--max-concurrent-requests` and starve predictions.
        let waiting = Waiting::enter().ok_or_else(|| {
            InferError::new(
                ErrorKind::Overloaded,
                format!("{MAX_WAITING} explanations are already waiting; try again later"),
            )
            .with_retry_after(1)
        })?;
        let permit = tokio::time::timeout_at(deadline.into(), lane().acquire())
            .await
            .map_err(|_| late())?
            .map_err(|_| InferError::unavailable("server shutting down"))?;
        drop(waiting);
        let this = self.clone();
        let classes = classes.map(<[String]>::to_vec);
        let background = background.clone();
        let explained = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            match (method, &this.method) {
                ("linear", Available::Linear(m)) => {
                    let explanation = by_rows(&rows, this.features, deadline, |chunk| {
                        ferry_explain::linear::explain(m, chunk, &background.values)
                    })?;
                    Ok(Explained {
                        outputs: linear_outputs(m, classes.as_deref()),
                        space: linear_space(m),
                        features: this.feature_names.clone(),
                        explanation,
                    })
                }
                ("tree", Available::Trees(t)) => {
                    let work = (t.node_count() as u64)
                        .saturating_mul(background.rows as u64)
                        .saturating_mul(n as u64);
                    if work > MAX_TREE_WORK {
                        return Err(InferError::invalid(format!(
                            "explaining {n} rows of {} tree nodes against {} background rows is {work} steps; at \
                             most {MAX_TREE_WORK}: send fewer rows",
                            t.node_count(),
                            background.rows
                        )));
                    }
                    let mut wide = background.values.clone();
                    if t.features < this.features {
                        // Trees that read only the first features: explain those, the rest get 0.
                        wide = narrow(&wide, this.features, t.features);
                    }
                    let rows = narrow(&rows, this.features, t.features);
                    let mut explanation = by_rows(&rows, t.features, deadline, |chunk| {
                        ferry_explain::tree::explain(t, chunk, &wide)
                    })?;
                    widen(&mut explanation, this.features);
                    Ok(Explained {
                        outputs: tree_outputs(t),
                        space: tree_space(t),
                        features: this.feature_names.clone(),
                        explanation,
                    })
                }
                _ => {
                    let (output, columns) = kernel_output.unwrap_or_default();
                    let explanation = kernel(
                        backend.as_ref(),
                        &this,
                        &rows,
                        &background,
                        &options,
                        &output,
                        deadline,
                    )?;
                    Ok(Explained {
                        outputs: kernel_outputs(&output, columns, explanation.outputs, classes.as_deref()),
                        space: format!(
                            "the model's output `{output}` as it answers (base value + attributions = that output)"
                        ),
                        features: this.feature_names.clone(),
                        explanation,
                    })
                }
            }
        })
        .await
        .map_err(|_| InferError::new(ErrorKind::Internal, "the explanation failed"))??;
        Ok(explained)
    }
}

/// The most explanations that may wait for the lane; more are refused with 429.
pub const MAX_WAITING: usize = 8;

/// One explanation waiting for the lane (counted until it runs or gives up).
struct Waiting;

static WAITING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Waiting {
    fn enter() -> Option<Waiting> {
        use std::sync::atomic::Ordering;
        let before = WAITING.fetch_add(1, Ordering::AcqRel);
        if before >= MAX_WAITING {
            WAITING.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Waiting)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        WAITING.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The explain lane: one explanation at a time per server.
fn lane() -> &'static tokio::sync::Semaphore {
    static LANE: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
    &LANE
}

fn late() -> InferError {
    InferError::new(
        ErrorKind::DeadlineExceeded,
        "the explanation did not finish before the request's deadline",
    )
}

fn explain_error(e: ferry_explain::ExplainError) -> InferError {
    use ferry_explain::ExplainError as E;
    match e {
        E::ModelOutput(m) => InferError::new(ErrorKind::Internal, format!("explaining: {m}")),
        other => InferError::invalid(other.to_string()),
    }
}

/// Runs a graph method a row at a time, checking the deadline between rows, and joins the answers.
fn by_rows(
    rows: &[f64],
    features: usize,
    deadline: Instant,
    mut one: impl FnMut(&[f64]) -> Result<Explanation, ferry_explain::ExplainError>,
) -> Result<Explanation, InferError> {
    let mut joined: Option<Explanation> = None;
    for row in rows.chunks(features.max(1)) {
        if Instant::now() >= deadline {
            return Err(late());
        }
        let e = one(row).map_err(explain_error)?;
        match &mut joined {
            None => joined = Some(e),
            Some(j) => j.rows.extend(e.rows),
        }
    }
    joined.ok_or_else(|| InferError::invalid("no rows to explain"))
}

/// The first `keep` columns of rows `width` wide.
fn narrow(values: &[f64], width: usize, keep: usize) -> Vec<f64> {
    if keep == width {
        return values.to_vec();
    }
    values
        .chunks(width.max(1))
        .flat_map(|r| r[..keep].iter().copied())
        .collect()
}

/// Pads every attribution with zeros to `features` (features the trees never read).
fn widen(e: &mut Explanation, features: usize) {
    for row in &mut e.rows {
        for a in row {
            a.values.resize(features, 0.0);
        }
    }
    e.features = features;
}

fn linear_space(m: &LinearModel) -> String {
    match &m.space {
        LinearSpace::Output { output } => {
            format!("the model's output `{output}` (base value + attributions = that output)")
        }
        LinearSpace::Softmax { logits, probabilities } => format!(
            "logits (`{logits}`, before the softmax that gives `{probabilities}`): base value + attributions = \
             each class's logit"
        ),
        LinearSpace::Sigmoid { logits, probabilities } => format!(
            "log-odds (`{logits}`, before the sigmoid that gives `{probabilities}`): base value + attributions = \
             the logit"
        ),
        LinearSpace::Margin { margin } => {
            format!("the linear layer's output `{margin}` (base value + attributions = that value)")
        }
    }
}

fn linear_outputs(m: &LinearModel, classes: Option<&[String]>) -> Vec<String> {
    let name = match &m.space {
        LinearSpace::Output { output } => output,
        LinearSpace::Softmax { logits, .. } | LinearSpace::Sigmoid { logits, .. } => logits,
        LinearSpace::Margin { margin } => margin,
    };
    (0..m.outputs)
        .map(|k| match classes {
            Some(c) if c.len() == m.outputs => c[k].clone(),
            _ if m.outputs == 1 => name.clone(),
            _ => format!("{name}[{k}]"),
        })
        .collect()
}

fn tree_space(t: &Ensemble) -> String {
    let after = match t.post_transform {
        PostTransform::None => {
            return "the ensemble's raw output (base value + attributions = the output)".into()
        }
        PostTransform::Softmax => "softmax",
        PostTransform::Logistic => "logistic",
        PostTransform::SoftmaxZero => "softmax_zero",
        PostTransform::Probit => "probit",
    };
    format!(
        "the ensemble's raw margin, before its {after} post-transform (base value + attributions = the margin, as \
         shap's TreeExplainer with model_output=\"raw\")"
    )
}

fn tree_outputs(t: &Ensemble) -> Vec<String> {
    match &t.kind {
        EnsembleKind::Classifier {
            labels,
            binary_single_column: true,
        } if labels.len() == 2 => {
            vec![labels[1].clone()]
        }
        EnsembleKind::Classifier { labels, .. } if labels.len() == t.outputs => labels.clone(),
        _ => (0..t.outputs).map(|k| format!("{k}")).collect(),
    }
}

fn kernel_outputs(
    output: &str,
    columns: usize,
    n: usize,
    classes: Option<&[String]>,
) -> Vec<String> {
    (0..n)
        .map(|k| match classes {
            Some(c) if c.len() == n => c[k].clone(),
            _ if columns <= 1 => output.to_string(),
            _ => format!("{output}[{k}]"),
        })
        .collect()
}

/// The numeric output KernelSHAP explains, and its width when stated.
fn kernel_output(
    signature: &Signature,
    named: Option<&str>,
) -> Result<(String, usize), InferError> {
    let numeric = |d: DataType| matches!(d, DataType::F32 | DataType::F64 | DataType::F16);
    let spec = match named {
        Some(name) => signature
            .output(name)
            .filter(|o| numeric(o.dtype))
            .ok_or_else(|| {
                InferError::invalid(format!("the model has no floating-point output `{name}`"))
            })?,
        None => signature
            .outputs
            .iter()
            .find(|o| numeric(o.dtype) && o.shape.as_ref().is_some_and(|s| s.len() <= 2))
            .ok_or_else(|| {
                InferError::invalid(
                    "the model has no floating-point output of one value or one row per input row",
                )
            })?,
    };
    let columns = match spec.shape.as_deref() {
        Some([_, c]) => usize::try_from(*c).unwrap_or(0),
        _ => 1,
    };
    Ok((spec.name.clone(), columns))
}

/// KernelSHAP with the version's engine as the model: perturbed rows in calls of up to [`KERNEL_ROWS_PER_CALL`].
fn kernel(
    backend: &dyn ferry_engine::Backend,
    ex: &Explainer,
    rows: &[f64],
    background: &Background,
    options: &Options,
    output: &str,
    deadline: Instant,
) -> Result<Explanation, InferError> {
    let input = backend
        .signature()
        .input(&ex.input)
        .ok_or_else(|| InferError::new(ErrorKind::Internal, "the explained input is gone"))?
        .dtype;
    let kernel_options = KernelOptions {
        exact_max_features: options.exact_max_features,
        coalitions: options.coalitions,
        max_rows_per_call: KERNEL_ROWS_PER_CALL,
        max_model_rows: options.max_model_rows,
        seed: options.seed,
    };
    let rows32: Vec<f32> = rows.iter().map(|v| *v as f32).collect();
    let bg32: Vec<f32> = background.values.iter().map(|v| *v as f32).collect();
    let run = |batch: &[f32], n: usize| -> Result<Vec<f32>, InferError> {
        if Instant::now() >= deadline {
            return Err(late());
        }
        let data = match input {
            DataType::F32 => TensorData::F32(batch.to_vec()),
            DataType::F64 => TensorData::F64(batch.iter().map(|v| f64::from(*v)).collect()),
            other => {
                return Err(InferError::invalid(format!(
                    "KernelSHAP feeds FP32 or FP64 inputs; this model's input is {other}"
                )))
            }
        };
        let tensor = Tensor::new(vec![n, ex.features], data)
            .map_err(|e| InferError::new(ErrorKind::Internal, e.to_string()))?;
        let outputs = backend
            .predict(vec![NamedTensor::new(&ex.input, tensor)])
            .map_err(InferError::from)?;
        let out = outputs
            .into_iter()
            .find(|o| o.name == output)
            .ok_or_else(|| {
                InferError::new(
                    ErrorKind::Internal,
                    format!("the model gave no output `{output}`"),
                )
            })?;
        match out.tensor.data {
            TensorData::F32(v) => Ok(v),
            TensorData::F64(v) => Ok(v.into_iter().map(|x| x as f32).collect()),
            TensorData::F16(v) => Ok(v.into_iter().map(f32::from).collect()),
            _ => Err(InferError::invalid(format!(
                "output `{output}` is not floating-point"
            ))),
        }
    };
    ferry_explain::kernel::explain(&rows32, &bg32, ex.features, &kernel_options, run).map_err(|e| {
        match e {
            KernelError::Explain(e) => explain_error(e),
            KernelError::Model(e) => e,
        }
    })
}

/// The most texts one explain request of a text model may hold (each costs up to `coalitions` engine rows).
pub const MAX_EXPLAIN_TEXTS: usize = 16;
/// Sequences per engine call when token attributions run their masked texts.
const TEXT_ROWS_PER_CALL: usize = 64;

/// The token attributions of one text.
#[derive(Debug)]
pub struct TextExplained {
    /// The text's tokens that were attributed (special tokens are kept in every masked text and get none).
    pub tokens: Vec<ferry_text::TokenInfo>,
    /// One row: per output, the base value (every token masked) and one attribution per token.
    pub explanation: Explanation,
}

/// Token attributions for a text classifier or re-ranker: KernelSHAP over the text's tokens, a token left out
/// replaced by the vocabulary's mask token (else its unknown token), special tokens always kept. The base value is
/// the model on the text with every token masked; base value + attributions = the model's raw scores (logits) on
/// the text. Runs in the explain lane, calling the engine directly.
pub async fn explain_texts(
    version: &Arc<crate::repository::LoadedVersion>,
    texts: Vec<String>,
    options: Options,
    deadline: Instant,
) -> Result<(Vec<TextExplained>, Vec<String>, String), InferError> {
    let model = crate::text::text_of(version)?.clone();
    let settings = model.settings();
    if settings.task == ferry_text::Task::Embedding {
        return Err(InferError::invalid(format!(
            "model `{}` is an embedding model: token attributions explain classifiers' scores",
            version.model
        )));
    }
    if texts.is_empty() || texts.len() > MAX_EXPLAIN_TEXTS {
        return Err(InferError::invalid(format!(
            "{} texts to explain; between 1 and {MAX_EXPLAIN_TEXTS} in one request",
            texts.len()
        )));
    }
    if options.max_model_rows == 0 || options.max_model_rows > MAX_MODEL_ROWS {
        return Err(InferError::invalid(format!(
            "`max_model_rows` must be between 1 and {MAX_MODEL_ROWS}"
        )));
    }
    let mask = model.mask_id().ok_or_else(|| {
        InferError::invalid("the tokenizer has no mask or unknown token to hide tokens with")
    })?;
    let outputs = if settings.labels.is_empty() {
        vec!["score".to_string()]
    } else {
        settings.labels.clone()
    };
    let space = "the model's raw scores (logits, before softmax or sigmoid): base value (every token masked) + \
                 attributions = the text's scores"
        .to_string();
    let waiting = Waiting::enter().ok_or_else(|| {
        InferError::new(
            ErrorKind::Overloaded,
            format!("{MAX_WAITING} explanations are already waiting; try again later"),
        )
        .with_retry_after(1)
    })?;
    let permit = tokio::time::timeout_at(deadline.into(), lane().acquire())
        .await
        .map_err(|_| late())?
        .map_err(|_| InferError::unavailable("server shutting down"))?;
    drop(waiting);
    let version = version.clone();
    let explained = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let runner = version.scheduler.text_runner().ok_or_else(|| {
            InferError::new(ErrorKind::Internal, "a text model without its runner")
        })?;
        let mut out = Vec::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            let prefix = |e: InferError| e.with_prefix(&format!("text {i}: "));
            let encoded = model
                .encode(text, None, None)
                .map_err(|e| prefix(crate::text::text_error(e)))?;
            let infos = model
                .tokenize(text, true, None)
                .map_err(|e| prefix(crate::text::text_error(e)))?;
            let positions: Vec<usize> = (0..infos.len()).filter(|k| !infos[*k].special).collect();
            if positions.is_empty() || infos.len() != encoded.ids.len() {
                return Err(prefix(InferError::invalid(
                    "the text has no tokens to attribute",
                )));
            }
            let n = positions.len();
            let kernel_options = KernelOptions {
                exact_max_features: options.exact_max_features,
                coalitions: options.coalitions,
                max_rows_per_call: TEXT_ROWS_PER_CALL,
                max_model_rows: options.max_model_rows,
                seed: options.seed,
            };
            let run = |batch: &[f32], rows: usize| -> Result<Vec<f32>, InferError> {
                if Instant::now() >= deadline {
                    return Err(late());
                }
                let seqs: Vec<ferry_text::Tokens> = (0..rows)
                    .map(|r| {
                        let keep = &batch[r * n..(r + 1) * n];
                        let mut ids = encoded.ids.clone();
                        for (f, k) in positions.iter().enumerate() {
                            if keep[f] < 0.5 {
                                ids[*k] = mask;
                            }
                        }
                        ferry_text::Tokens {
                            ids,
                            type_ids: encoded.type_ids.clone(),
                        }
                    })
                    .collect();
                let refs: Vec<&ferry_text::Tokens> = seqs.iter().collect();
                let rows =
                    crate::batching::text::run_direct(runner, version.backend.as_ref(), &refs)?;
                Ok(rows.into_iter().flatten().collect())
            };
            let explanation = ferry_explain::kernel::explain(
                &vec![1.0; n],
                &vec![0.0; n],
                n,
                &kernel_options,
                run,
            )
            .map_err(|e| match e {
                KernelError::Explain(e) => prefix(explain_error(e)),
                KernelError::Model(e) => e,
            })?;
            out.push(TextExplained {
                tokens: positions.iter().map(|k| infos[*k].clone()).collect(),
                explanation,
            });
        }
        Ok(out)
    })
    .await
    .map_err(|_| InferError::new(ErrorKind::Internal, "the explanation failed"))??;
    Ok((explained, outputs, space))
}
