//! The training loop: resolves [`TrainOptions`] into [`HyperParameters`] (every default made explicit), splits
//! and standardizes the data, runs epochs of gradient steps with early stopping on the validation loss, and
//! returns a [`Trained`] model that predicts from raw features.
//!
//! Runs are reproducible: one ChaCha8 stream seeded with `seed` draws the split, the initial weights and every
//! epoch's shuffle, and every sum runs in a fixed order, so the same data and seed give the same model bit for bit.

use std::time::Instant;

use ndarray::{Array1, Array2, ArrayView2, Axis};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::data::{split, Dataset};
use crate::metrics::{self, ClassificationReport, RegressionReport};
use crate::network::{Activation, Head, Network, Penalty};
use crate::optim::{Optimizer, OptimizerKind, Schedule};
use crate::stats::{feature_stats, FeatureStats};
use crate::TrainError;

/// The model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Linear regression on the MSE cost.
    Linear,
    /// Binary logistic regression.
    Logistic,
    /// Multinomial (softmax) logistic regression.
    Softmax,
    /// A multi-layer perceptron, for classification or regression.
    Mlp,
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Class labels with probabilities.
    Classification,
    /// A number.
    Regression,
}

/// Training settings as the user gave them; `None` means "the family's default".
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// The model family.
    pub model: ModelKind,
    /// Classification or regression; only `mlp` can do both. `None`: labels and small sets of integers
    /// (at most 20 distinct values) are classes, other numbers are regression targets.
    pub task: Option<Task>,
    /// Hidden layer sizes for `mlp` (default one layer of 100).
    pub hidden: Option<Vec<usize>>,
    /// Hidden activation for `mlp`.
    pub activation: Activation,
    /// The update rule (default: `gd` for linear, `adam` otherwise).
    pub optimizer: Option<OptimizerKind>,
    /// The step size α (default: 1/L for `gd`, L the largest curvature of the cost; Adam 0.01 for the linear
    /// families, 0.001 for `mlp`; 0.01 for `sgd` and `momentum`).
    pub learning_rate: Option<f64>,
    /// Rows per mini-batch (default 32 for the linear families, 200 for `mlp`; ignored by `gd`).
    pub batch_size: Option<usize>,
    /// The most epochs (default 5000 for `gd`, 1000 for the linear families on mini-batches, 500 for `mlp`).
    pub epochs: Option<usize>,
    /// L2 strength (default: 1/m for logistic and softmax, scikit-learn's C = 1; 0 for linear; 1e-3 for mlp).
    pub l2: Option<f64>,
    /// L1 strength.
    pub l1: f64,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Epochs without improvement of the validation loss before stopping (default 100 for `gd`, 20 otherwise).
    pub patience: Option<usize>,
    /// The least improvement that counts (default 1e-9 for `gd`, 1e-4 otherwise).
    pub tolerance: Option<f64>,
    /// The share of rows held out for validation and early stopping; 0 trains on every row and watches the
    /// training loss instead.
    pub validation_fraction: f64,
    /// The seed of every random draw.
    pub seed: u64,
}

impl TrainOptions {
    /// Every default for `model`.
    pub fn new(model: ModelKind) -> TrainOptions {
        TrainOptions {
            model,
            task: None,
            hidden: None,
            activation: Activation::Relu,
            optimizer: None,
            learning_rate: None,
            batch_size: None,
            epochs: None,
            l2: None,
            l1: 0.0,
            schedule: Schedule::Constant,
            patience: None,
            tolerance: None,
            validation_fraction: 0.1,
            seed: 0,
        }
    }
}

/// The settings a model was trained with, every default resolved; written to `ferry.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HyperParameters {
    /// The model family.
    pub model: ModelKind,
    /// The task.
    pub task: Task,
    /// Hidden layer sizes (empty for the linear families).
    pub hidden: Vec<usize>,
    /// Hidden activation (meaningful with hidden layers).
    pub activation: Activation,
    /// The update rule.
    pub optimizer: OptimizerKind,
    /// The step size.
    pub learning_rate: f64,
    /// Rows per step.
    pub batch_size: usize,
    /// The most epochs.
    pub epochs: usize,
    /// L2 strength.
    pub l2: f64,
    /// L1 strength.
    pub l1: f64,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Early-stopping patience in epochs.
    pub patience: usize,
    /// The least improvement that counts.
    pub tolerance: f64,
    /// The share of rows held out.
    pub validation_fraction: f64,
    /// The seed.
    pub seed: u64,
}

/// One epoch's record.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochLog {
    /// 1-based epoch number.
    pub epoch: usize,
    /// The most epochs this run may take.
    pub max_epochs: usize,
    /// Mean training objective (data loss plus penalty) over the epoch's steps.
    pub train_loss: f64,
    /// Validation data loss after the epoch, when rows were held out.
    pub validation_loss: Option<f64>,
    /// Validation accuracy (classification) or R² (regression) after the epoch.
    pub validation_metric: Option<f64>,
    /// The learning rate used.
    pub learning_rate: f64,
}

/// Validation scores of either kind.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum Report {
    /// A classifier's.
    Classification(ClassificationReport),
    /// A regressor's.
    Regression(RegressionReport),
}

/// A trained model with what is needed to export, describe and reproduce it.
#[derive(Debug, Clone)]
pub struct Trained {
    /// The network, on standardized inputs (and standardized targets for regression).
    pub network: Network,
    /// Training means of the raw features.
    pub input_mean: Array1<f64>,
    /// Training standard deviations of the raw features (1 where a feature is constant).
    pub input_std: Array1<f64>,
    /// For regression, the training target's mean and standard deviation: prediction = output·std + mean.
    pub target_scale: Option<(f64, f64)>,
    /// Class labels, for classification.
    pub classes: Option<Vec<String>>,
    /// The resolved settings.
    pub hyper: HyperParameters,
    /// The loss curve, one entry per epoch run.
    pub curve: Vec<EpochLog>,
    /// The epoch whose weights were kept (best validation loss).
    pub best_epoch: usize,
    /// Scores on the validation rows, or on the training rows when none were held out.
    pub validation: Report,
    /// Rows trained on.
    pub training_rows: usize,
    /// The dataset's rows trained on, ascending (the training split, without the validation rows).
    pub training_row_indices: Vec<usize>,
    /// Rows held out.
    pub validation_rows: usize,
    /// Per-feature statistics of the training rows.
    pub feature_stats: Vec<FeatureStats>,
    /// The distribution of the model's predictions on the training rows (`label`, or `prediction`).
    pub prediction_stats: Vec<crate::stats::PredictionStats>,
    /// Wall time of the fit in seconds.
    pub seconds: f64,
}

impl Trained {
    /// Predictions from raw features: class probabilities [N, C] (two columns for binary logistic) or values
    /// [N, 1] in the target's units.
    pub fn predict(&self, x: ArrayView2<'_, f64>) -> Array2<f64> {
        let z = (&x - &self.input_mean) / &self.input_std;
        let out = self.network.predict(z.view());
        match (self.network.head, self.target_scale) {
            (Head::Sigmoid, _) => {
                let mut two = Array2::zeros((out.nrows(), 2));
                two.column_mut(1).assign(&out.column(0));
                two.column_mut(0).assign(&out.column(0).mapv(|p| 1.0 - p));
                two
            }
            (_, Some((mean, std))) => out.mapv(|v| v * std + mean),
            _ => out,
        }
    }
}

/// The task a model family and the data make: only `mlp` can do both, and without `--task` it classifies labels
/// and small sets of integers (at most 20 distinct values).
pub fn resolve_task(options: &TrainOptions, dataset: &Dataset) -> Result<Task, TrainError> {
    Ok(match (options.model, options.task) {
        (ModelKind::Linear, Some(Task::Classification)) => {
            return Err(TrainError::Config(
                "linear is a regressor: use logistic, softmax or mlp to classify".into(),
            ))
        }
        (ModelKind::Logistic | ModelKind::Softmax, Some(Task::Regression)) => {
            return Err(TrainError::Config(
                "logistic and softmax are classifiers: use linear or mlp for regression".into(),
            ))
        }
        (ModelKind::Linear, _) => Task::Regression,
        (ModelKind::Logistic | ModelKind::Softmax, Some(_)) => Task::Classification,
        (ModelKind::Logistic | ModelKind::Softmax, None) => {
            refuse_continuous_target(dataset)?;
            Task::Classification
        }
        (ModelKind::Mlp, Some(task)) => task,
        (ModelKind::Mlp, None) => match &dataset.target {
            crate::data::Target::Labels { .. } => Task::Classification,
            crate::data::Target::Numeric { labels, .. } => match labels {
                Some(l) if l.len() <= AUTO_CLASSES && l.iter().all(|(_, v)| v.fract() == 0.0) => {
                    Task::Classification
                }
                _ => Task::Regression,
            },
        },
    })
}

/// Classes need at least this many rows each on average once there are more than [`AUTO_CLASSES`] of them.
pub const MIN_ROWS_PER_CLASS: usize = 5;

/// The most distinct integers `mlp` takes for classes without `--task`; past it a numeric target must also have
/// [`MIN_ROWS_PER_CLASS`] rows per class on average for a classifier.
pub const AUTO_CLASSES: usize = 20;

/// Refuses a numeric target that looks like a measurement rather than classes, for a classifier chosen by its
/// family alone: a value that is not a whole number, or more than [`AUTO_CLASSES`] distinct values with fewer than
/// [`MIN_ROWS_PER_CLASS`] rows each on average. `--task classification` overrides it.
fn refuse_continuous_target(dataset: &Dataset) -> Result<(), TrainError> {
    let crate::data::Target::Numeric { values, labels } = &dataset.target else {
        return Ok(());
    };
    let advice = "to predict it as a number train a regressor (--model linear, or mlp); if these values really are \
                  classes, say so with --task classification";
    let name = &dataset.target_name;
    if let Some(v) = values.iter().find(|v| v.fract() != 0.0) {
        return Err(TrainError::Config(format!(
            "the target `{name}` looks continuous ({v} is not a whole number), not like class labels: {advice}"
        )));
    }
    let classes = labels
        .as_ref()
        .map_or(crate::data::MAX_CLASSES + 1, Vec::len);
    let rows = values.len();
    if classes > AUTO_CLASSES && rows < classes * MIN_ROWS_PER_CLASS {
        let count = match labels {
            Some(l) => format!("{} distinct values", l.len()),
            None => format!("more than {} distinct values", crate::data::MAX_CLASSES),
        };
        return Err(TrainError::Config(format!(
            "the target `{name}` looks continuous, not like class labels: {count} in {rows} rows, fewer than \
             {MIN_ROWS_PER_CLASS} rows per class on average (more than {AUTO_CLASSES} classes need at least \
             {MIN_ROWS_PER_CLASS} rows each on average): {advice}"
        )));
    }
    Ok(())
}

fn resolve(options: &TrainOptions, dataset: &Dataset) -> Result<HyperParameters, TrainError> {
    let task = resolve_task(options, dataset)?;
    let linear_family = options.model != ModelKind::Mlp;
    let optimizer = options
        .optimizer
        .unwrap_or(if options.model == ModelKind::Linear {
            OptimizerKind::Gd
        } else {
            OptimizerKind::Adam
        });
    let gd = optimizer == OptimizerKind::Gd;
    let hidden = if linear_family {
        if options.hidden.as_ref().is_some_and(|h| !h.is_empty()) {
            return Err(TrainError::Config("--hidden applies to mlp only".into()));
        }
        Vec::new()
    } else {
        options.hidden.clone().unwrap_or_else(|| vec![100])
    };
    if hidden.contains(&0) {
        return Err(TrainError::Config(
            "hidden layer sizes must be positive".into(),
        ));
    }
    if !(0.0..0.9).contains(&options.validation_fraction) {
        return Err(TrainError::Config(format!(
            "--validation-fraction must be in [0, 0.9), got {}",
            options.validation_fraction
        )));
    }
    let train_rows = (dataset.rows() as f64 * (1.0 - options.validation_fraction)).max(1.0);
    let learning_rate = match options.learning_rate {
        // Resolved to 1/L once the data is standardized (see `fit`); 0 marks "not yet".
        None if gd => 0.0,
        None => match (optimizer, linear_family) {
            (OptimizerKind::Adam, true) => 0.01,
            (OptimizerKind::Adam, false) => 0.001,
            _ => 0.01,
        },
        Some(lr) if lr > 0.0 && lr.is_finite() => lr,
        Some(lr) => {
            return Err(TrainError::Config(format!(
                "--learning-rate must be positive, got {lr}"
            )))
        }
    };
    let positive = |name: &str, v: usize| {
        if v == 0 {
            Err(TrainError::Config(format!("{name} must be at least 1")))
        } else {
            Ok(v)
        }
    };
    Ok(HyperParameters {
        model: options.model,
        task,
        hidden,
        activation: options.activation,
        optimizer,
        learning_rate,
        batch_size: positive(
            "--batch-size",
            options
                .batch_size
                .unwrap_or(if linear_family { 32 } else { 200 }),
        )?,
        epochs: positive(
            "--epochs",
            options.epochs.unwrap_or(match (gd, linear_family) {
                (true, _) => 5000,
                (false, true) => 1000,
                (false, false) => 500,
            }),
        )?,
        l2: options.l2.unwrap_or(match options.model {
            ModelKind::Linear => 0.0,
            ModelKind::Logistic | ModelKind::Softmax => 1.0 / train_rows,
            ModelKind::Mlp => 1e-3,
        }),
        l1: options.l1,
        schedule: options.schedule,
        patience: positive(
            "--patience",
            options.patience.unwrap_or(if gd { 100 } else { 20 }),
        )?,
        tolerance: options.tolerance.unwrap_or(if gd { 1e-9 } else { 1e-4 }),
        validation_fraction: options.validation_fraction,
        seed: options.seed,
    })
}

/// The largest eigenvalue of AᵀA/m for A = [x, 1], by power iteration: the curvature bound L of the MSE cost,
/// whose reciprocal is the classical safe step for batch gradient descent.
fn curvature(x: ArrayView2<'_, f64>) -> f64 {
    let (m, f) = x.dim();
    let ones = Array2::ones((m, 1));
    let a = ndarray::concatenate(Axis(1), &[x, ones.view()]).expect("same row count");
    let gram = a.t().dot(&a) / m as f64;
    let mut v = Array1::from_elem(f + 1, 1.0 / ((f + 1) as f64).sqrt());
    let mut lambda = 0.0;
    for _ in 0..500 {
        let w = gram.dot(&v);
        let norm = w.dot(&w).sqrt();
        if norm == 0.0 {
            return 1.0;
        }
        let next = v.dot(&w);
        v = w / norm;
        if (next - lambda).abs() <= 1e-12 * next.abs() {
            return next;
        }
        lambda = next;
    }
    lambda
}

/// Trains a model on `dataset`, calling `progress` after every epoch.
pub fn fit(
    dataset: &Dataset,
    options: &TrainOptions,
    progress: &mut dyn FnMut(&EpochLog),
) -> Result<Trained, TrainError> {
    let started = Instant::now();
    let mut hyper = resolve(options, dataset)?;
    let (classes, class_index) = match hyper.task {
        Task::Classification => {
            let c = dataset.classes()?;
            if c.names.len() < 2 {
                return Err(TrainError::Config(format!(
                    "the target `{}` has a single class ({}): nothing to learn",
                    dataset.target_name, c.names[0]
                )));
            }
            if hyper.model == ModelKind::Logistic && c.names.len() != 2 {
                return Err(TrainError::Config(format!(
                    "logistic is binary but the target `{}` has {} classes: use softmax",
                    dataset.target_name,
                    c.names.len()
                )));
            }
            (Some(c.names), Some(c.index))
        }
        Task::Regression => {
            dataset.values()?;
            (None, None)
        }
    };
    let mut rng = ChaCha8Rng::seed_from_u64(hyper.seed);
    let (train_idx, valid_idx) = split(
        dataset.rows(),
        hyper.validation_fraction,
        class_index.as_deref(),
        rand::Rng::next_u64(&mut rng),
    );

    let x_train_raw = dataset.x.select(Axis(0), &train_idx);
    let feature_stats: Vec<FeatureStats> = dataset
        .features
        .iter()
        .zip(x_train_raw.columns())
        .map(|(name, col)| feature_stats(name, col))
        .collect();
    let input_mean = Array1::from_iter(feature_stats.iter().map(|s| s.mean));
    let input_std =
        Array1::from_iter(
            feature_stats
                .iter()
                .map(|s| if s.std > 0.0 { s.std } else { 1.0 }),
        );
    let standardize = |x: Array2<f64>| (x - &input_mean) / &input_std;
    let x_train = standardize(x_train_raw);
    let x_valid = standardize(dataset.x.select(Axis(0), &valid_idx));

    // Targets as matrices: one-hot rows (softmax), a 0/1 column (sigmoid) or a standardized column (regression).
    let (head, outputs) = match (&classes, hyper.model) {
        (Some(_), ModelKind::Logistic) => (Head::Sigmoid, 1),
        (Some(c), _) => (Head::Softmax, c.len()),
        (None, _) => (Head::Identity, 1),
    };
    let mut target_scale = None;
    let targets = |rows: &[usize], scale: Option<(f64, f64)>| -> Array2<f64> {
        match (&class_index, head) {
            (Some(ci), Head::Sigmoid) => {
                Array2::from_shape_fn((rows.len(), 1), |(i, _)| ci[rows[i]] as f64)
            }
            (Some(ci), _) => Array2::from_shape_fn((rows.len(), outputs), |(i, c)| {
                f64::from(u8::from(ci[rows[i]] == c))
            }),
            (None, _) => {
                let values = dataset.values().expect("checked above");
                let (mean, std) = scale.expect("regression has a target scale");
                Array2::from_shape_fn((rows.len(), 1), |(i, _)| (values[rows[i]] - mean) / std)
            }
        }
    };
    if class_index.is_none() {
        let values = dataset.values()?;
        let n = train_idx.len() as f64;
        let mean = train_idx.iter().map(|&i| values[i]).sum::<f64>() / n;
        let var = train_idx
            .iter()
            .map(|&i| (values[i] - mean).powi(2))
            .sum::<f64>()
            / n;
        target_scale = Some((mean, if var > 0.0 { var.sqrt() } else { 1.0 }));
    }
    let y_train = targets(&train_idx, target_scale);
    let y_valid = targets(&valid_idx, target_scale);

    if hyper.learning_rate == 0.0 {
        // Batch gradient descent's step: 1/L, with L bounding the cost's curvature. The sigmoid and softmax
        // losses curve at most 1/4 and 1/2 as much as the squared error.
        let head_factor = match head {
            Head::Identity => 1.0,
            Head::Sigmoid => 0.25,
            Head::Softmax => 0.5,
        };
        hyper.learning_rate = 1.0 / (curvature(x_train.view()) * head_factor + hyper.l2);
    }

    let mut network = Network::new(
        dataset.features.len(),
        &hyper.hidden,
        outputs,
        hyper.activation,
        head,
        &mut rng,
    );
    let penalty = Penalty {
        l2: hyper.l2,
        l1: hyper.l1,
    };
    let mut optimizer = Optimizer::new(hyper.optimizer, &network);
    let mut grads = network.zero_gradients();
    let mut order: Vec<usize> = (0..train_idx.len()).collect();
    let batch = if hyper.optimizer.is_minibatch() {
        hyper.batch_size.min(order.len())
    } else {
        order.len()
    };
    let has_validation = !valid_idx.is_empty();
    let mut curve = Vec::new();
    let mut best = (f64::INFINITY, network.clone(), 0usize);
    let mut stale = 0;
    for epoch in 0..hyper.epochs {
        let lr = hyper
            .schedule
            .rate(hyper.learning_rate, epoch, hyper.epochs);
        let mut total = 0.0;
        if batch < order.len() {
            order.shuffle(&mut rng);
            for chunk in order.chunks(batch) {
                let xb = x_train.select(Axis(0), chunk);
                let yb = y_train.select(Axis(0), chunk);
                let loss = network.loss_and_gradients(xb.view(), yb.view(), penalty, &mut grads);
                total += loss * chunk.len() as f64;
                optimizer.step(&mut network, &grads, lr);
            }
            total /= order.len() as f64;
        } else {
            total = network.loss_and_gradients(x_train.view(), y_train.view(), penalty, &mut grads);
            optimizer.step(&mut network, &grads, lr);
        }
        if !total.is_finite() {
            return Err(TrainError::Diverged {
                epoch: epoch + 1,
                loss: total,
            });
        }
        let (watched, validation_loss, validation_metric) = if has_validation {
            let z = network.logits(x_valid.view());
            let loss = network.loss_of_logits(&z, y_valid.view());
            let metric = quick_metric(&z, y_valid.view(), head);
            (loss, Some(loss), Some(metric))
        } else {
            (total, None, None)
        };
        let log = EpochLog {
            epoch: epoch + 1,
            max_epochs: hyper.epochs,
            train_loss: total,
            validation_loss,
            validation_metric,
            learning_rate: lr,
        };
        progress(&log);
        curve.push(log);
        if !watched.is_finite() {
            return Err(TrainError::Diverged {
                epoch: epoch + 1,
                loss: watched,
            });
        }
        if watched < best.0 - hyper.tolerance {
            best = (watched, network.clone(), epoch + 1);
            stale = 0;
        } else {
            if watched < best.0 {
                best = (watched, network.clone(), epoch + 1);
            }
            stale += 1;
            if stale >= hyper.patience {
                break;
            }
        }
    }
    let (_, network, best_epoch) = best;
    let mut trained = Trained {
        network,
        input_mean,
        input_std,
        target_scale,
        classes,
        hyper,
        curve,
        best_epoch,
        validation: Report::Regression(metrics::regression(&[], &[])),
        training_rows: train_idx.len(),
        training_row_indices: Vec::new(),
        validation_rows: valid_idx.len(),
        feature_stats,
        prediction_stats: Vec::new(),
        seconds: 0.0,
    };
    trained.prediction_stats =
        training_predictions(&trained, dataset, &train_idx, class_index.as_deref());
    let scored = if has_validation {
        &valid_idx
    } else {
        &train_idx
    };
    let predicted = trained.predict(dataset.x.select(Axis(0), scored).view());
    trained.validation = match (&trained.classes, &class_index) {
        (Some(names), Some(ci)) => {
            let truth: Vec<usize> = scored.iter().map(|&i| ci[i]).collect();
            Report::Classification(metrics::classification(names, &truth, predicted.view()))
        }
        _ => {
            let values = dataset.values()?;
            let truth: Vec<f64> = scored.iter().map(|&i| values[i]).collect();
            Report::Regression(metrics::regression(&truth, &predicted.column(0).to_vec()))
        }
    };
    trained.training_row_indices = train_idx;
    trained.seconds = started.elapsed().as_secs_f64();
    Ok(trained)
}

/// The prediction drift baseline: what the model predicts for its training rows, as the exported graph answers it
/// (`label` class frequencies, or a histogram of `prediction`), computed in chunks so memory stays bounded. The
/// training labels' frequencies go along for reference. The baseline is the model's own predictions, not the
/// targets: a regressor's predictions are narrower than its targets, so comparing with the targets would flag drift
/// on the training data itself.
fn training_predictions(
    trained: &Trained,
    dataset: &Dataset,
    rows: &[usize],
    class_index: Option<&[usize]>,
) -> Vec<crate::stats::PredictionStats> {
    use crate::stats::PredictionStats;
    const CHUNK: usize = 4096;
    if rows.is_empty() {
        return Vec::new();
    }
    let predict = |chunk: &[usize]| trained.predict(dataset.x.select(Axis(0), chunk).view());
    match &trained.classes {
        Some(classes) => {
            let mut counts = vec![0usize; classes.len()];
            for chunk in rows.chunks(CHUNK) {
                for row in predict(chunk).rows() {
                    counts[metrics::argmax(row.iter().copied())] += 1;
                }
            }
            let labels = class_index.map(|ci| {
                let mut c = vec![0usize; classes.len()];
                for &i in rows {
                    c[ci[i]] += 1;
                }
                c
            });
            vec![PredictionStats::categorical(
                "label",
                classes.clone(),
                counts,
                labels,
            )]
        }
        None => {
            let mut values = Vec::with_capacity(rows.len());
            for chunk in rows.chunks(CHUNK) {
                values.extend(predict(chunk).column(0).iter().copied());
            }
            vec![PredictionStats::numeric(
                "prediction",
                ndarray::ArrayView1::from(&values),
            )]
        }
    }
}

/// Accuracy (classification) or R² (regression) straight from logits, for the progress display.
fn quick_metric(z: &Array2<f64>, y: ArrayView2<'_, f64>, head: Head) -> f64 {
    match head {
        Head::Identity => {
            let truth = y.column(0).to_vec();
            let predicted = z.column(0).to_vec();
            metrics::regression(&truth, &predicted).r2
        }
        Head::Sigmoid => {
            let correct = z
                .column(0)
                .iter()
                .zip(y.column(0))
                .filter(|(z, y)| (**z > 0.0) == (**y > 0.5))
                .count();
            correct as f64 / z.nrows() as f64
        }
        Head::Softmax => {
            let correct = z
                .rows()
                .into_iter()
                .zip(y.rows())
                .filter(|(z, y)| {
                    metrics::argmax(z.iter().copied()) == metrics::argmax(y.iter().copied())
                })
                .count();
            correct as f64 / z.nrows() as f64
        }
    }
}
