//! `ferry train`: flags, the progress bar, and the call into `ferry-train` (load, fit, export, write or publish).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use ferry_train::export::{metadata, onnx_model, training_background, Destination};
use ferry_train::fit::{EpochLog, Report};
use ferry_train::network::Activation;
use ferry_train::optim::{OptimizerKind, Schedule};
use ferry_train::{Impute, LoadOptions, ModelKind, Task, TrainOptions};

/// Parses a lower-case name into one of the training crate's enums (they spell their values as serde does).
pub fn parse_name<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, serde_json::Error> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
}

/// `ferry train` flags.
#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("destination").required(true).args(["out", "publish"]))]
pub struct TrainArgs {
    /// The training data: a CSV file with a header row, numeric feature columns and a target column. Or, instead,
    /// payload logs joined with labels (--payload-log and --labels).
    #[arg(value_name = "DATA.csv", required_unless_present = "payload_log")]
    pub data: Option<PathBuf>,

    /// Train on payload logs written by `ferry serve --payload-log` (comma-separated: a file and its rotations): the
    /// inputs logged for one model become the feature columns, labelled from --labels by request id.
    #[arg(
        long,
        env = "FERRY_TRAIN_PAYLOAD_LOG",
        value_delimiter = ',',
        value_name = "FILES",
        conflicts_with = "data",
        requires = "labels"
    )]
    pub payload_log: Vec<PathBuf>,

    /// Labels for --payload-log: a CSV file with the columns `id` (the request id the log recorded) and `label`. A
    /// request of several rows is labelled row by row, as `ID:ROW` (`req-7:0`, `req-7:1`).
    #[arg(
        long,
        env = "FERRY_TRAIN_LABELS",
        value_name = "FILE",
        requires = "payload_log"
    )]
    pub labels: Option<PathBuf>,

    /// The model whose logged requests to train on (default: the model --publish names, else the only model in
    /// the log). Feature columns take the names in the latest published version's ferry.json when there is one.
    #[arg(long, env = "FERRY_TRAIN_PAYLOAD_MODEL", value_name = "NAME")]
    pub payload_model: Option<String>,

    /// The model family: `linear` (regression on the MSE cost), `logistic` (binary classes), `softmax`
    /// (any number of classes) or `mlp` (a neural network, for either).
    #[arg(long, env = "FERRY_TRAIN_MODEL", value_parser = parse_name::<ModelKind>)]
    pub model: ModelKind,

    /// What to read from the data and how to fit.
    #[command(flatten)]
    pub settings: TrainSettings,

    /// Write `model.onnx` and `ferry.json` into this directory (created if needed).
    #[arg(long, env = "FERRY_TRAIN_OUT", value_name = "DIR")]
    pub out: Option<PathBuf>,

    /// Publish as the next version of a model in a repository, `REPO/MODEL` (written to a temporary folder
    /// and renamed into place, so a watching server never sees half a model).
    #[arg(long, env = "FERRY_TRAIN_PUBLISH", value_name = "REPO/MODEL")]
    pub publish: Option<PathBuf>,

    /// No progress bar and no summary.
    #[arg(long, env = "FERRY_TRAIN_QUIET", num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub quiet: bool,

    /// Print one JSON object (where the model went, its validation scores, `accuracy` or `r2`) and nothing else.
    #[arg(long, env = "FERRY_TRAIN_JSON", num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub json: bool,
}

/// The training settings `ferry train`, `ferry optimize search` and `ferry retrain` share: what to read from the
/// data, how to fit, and what to keep of the data (every `FERRY_TRAIN_*` variable but the family and the
/// destination).
#[derive(Debug, Clone, clap::Args)]
pub struct TrainSettings {
    /// The target column (default: the last column). Labels that are not numbers become classes in order of
    /// first appearance; numeric classes keep their numeric order.
    #[arg(long, env = "FERRY_TRAIN_TARGET", value_name = "COLUMN")]
    pub target: Option<String>,

    /// Columns to leave out (comma-separated), such as identifiers or text.
    #[arg(
        long,
        env = "FERRY_TRAIN_DROP",
        value_name = "COLUMNS",
        value_delimiter = ','
    )]
    pub drop: Vec<String>,

    /// Fill missing feature values with the column's `mean` or `median` (in the data and, for NaN inputs,
    /// in the exported graph). Without it a missing value is an error naming its line and column.
    #[arg(long, env = "FERRY_TRAIN_IMPUTE", value_parser = parse_name::<Impute>)]
    pub impute: Option<Impute>,

    /// `classification` or `regression`; only mlp can do both. By default labels and small sets of integers
    /// (20 distinct values at most) are classes.
    #[arg(long, env = "FERRY_TRAIN_TASK", value_parser = parse_name::<Task>)]
    pub task: Option<Task>,

    /// Hidden layer sizes for mlp, comma-separated (default 100: one layer of 100 units).
    #[arg(
        long,
        env = "FERRY_TRAIN_HIDDEN",
        value_name = "SIZES",
        value_delimiter = ','
    )]
    pub hidden: Option<Vec<usize>>,

    /// Hidden activation for mlp: `relu` or `tanh`.
    #[arg(long, env = "FERRY_TRAIN_ACTIVATION", value_parser = parse_name::<Activation>, default_value = "relu")]
    pub activation: Activation,

    /// The update rule: `gd` (batch gradient descent, the default for linear), `sgd`, `momentum` or `adam`
    /// (the default for the others). The last three step on mini-batches.
    #[arg(long, env = "FERRY_TRAIN_OPTIMIZER", value_parser = parse_name::<OptimizerKind>)]
    pub optimizer: Option<OptimizerKind>,

    /// The step size α. Default: 1/L for gd (L bounds the cost's curvature, computed from the data), 0.01 for
    /// Adam on linear families, 0.001 for Adam on mlp, 0.01 for sgd and momentum.
    #[arg(long, env = "FERRY_TRAIN_LEARNING_RATE", value_name = "ALPHA")]
    pub learning_rate: Option<f64>,

    /// Learning-rate schedule: `constant` or `cosine` (annealed to zero at the last epoch).
    #[arg(long, env = "FERRY_TRAIN_SCHEDULE", value_parser = parse_name::<Schedule>, default_value = "constant")]
    pub schedule: Schedule,

    /// Rows per mini-batch (default 32 for logistic and softmax, 200 for mlp; gd always uses every row).
    #[arg(long, env = "FERRY_TRAIN_BATCH_SIZE")]
    pub batch_size: Option<usize>,

    /// The most epochs (default 5000 for gd, 1000 for logistic and softmax, 500 for mlp); early stopping usually
    /// ends sooner.
    #[arg(long, env = "FERRY_TRAIN_EPOCHS")]
    pub epochs: Option<usize>,

    /// L2 penalty strength, (l2/2)·Σw² on the weights (default: 1/m for logistic and softmax, like
    /// scikit-learn's C = 1; 0 for linear; 1e-3 for mlp).
    #[arg(long, env = "FERRY_TRAIN_L2")]
    pub l2: Option<f64>,

    /// L1 penalty strength, l1·Σ|w| on the weights.
    #[arg(long, env = "FERRY_TRAIN_L1", default_value_t = 0.0)]
    pub l1: f64,

    /// Stop after this many epochs without the validation loss improving by the tolerance (default 100 for
    /// gd, 20 otherwise); the best epoch's weights are kept.
    #[arg(long, env = "FERRY_TRAIN_PATIENCE")]
    pub patience: Option<usize>,

    /// The least improvement of the validation loss that counts (default 1e-9 for gd, 1e-4 otherwise).
    #[arg(long, env = "FERRY_TRAIN_TOLERANCE")]
    pub tolerance: Option<f64>,

    /// Share of rows held out (stratified by class) for validation metrics and early stopping. 0 trains on
    /// every row and stops on the training loss instead.
    #[arg(long, env = "FERRY_TRAIN_VALIDATION_FRACTION", default_value_t = 0.1)]
    pub validation_fraction: f64,

    /// Seed of every random draw (split, initial weights, shuffles): the same seed and data give the same
    /// model bit for bit.
    #[arg(long, env = "FERRY_TRAIN_SEED", default_value_t = 0)]
    pub seed: u64,

    /// Keep a seeded sample of this many training rows (drawn with --seed from the training split, never the
    /// validation rows; all of them when there are fewer) with the model as `background.csv`, the reference rows of
    /// feature attributions. At most 1000; 0 writes none.
    #[arg(
        long,
        env = "FERRY_TRAIN_BACKGROUND_ROWS",
        value_name = "N",
        default_value_t = ferry_train::background::DEFAULT_BACKGROUND_ROWS,
        value_parser = background_rows,
    )]
    pub background_rows: usize,
}

/// Parses `--background-rows`: 0 to [`MAX_BACKGROUND_ROWS`](ferry_train::background::MAX_BACKGROUND_ROWS).
pub fn background_rows(s: &str) -> Result<usize, String> {
    let max = ferry_train::background::MAX_BACKGROUND_ROWS;
    match s.parse::<usize>() {
        Ok(n) if n <= max => Ok(n),
        _ => Err(format!("expected a number of rows from 0 to {max}")),
    }
}

impl TrainSettings {
    /// The training settings the flags give, for the family `model`.
    pub fn options(&self, model: ModelKind) -> TrainOptions {
        TrainOptions {
            model,
            task: self.task,
            hidden: self.hidden.clone(),
            activation: self.activation,
            optimizer: self.optimizer,
            learning_rate: self.learning_rate,
            batch_size: self.batch_size,
            epochs: self.epochs,
            l2: self.l2,
            l1: self.l1,
            schedule: self.schedule,
            patience: self.patience,
            tolerance: self.tolerance,
            validation_fraction: self.validation_fraction,
            seed: self.seed,
        }
    }

    /// What to read from the data.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            target: self.target.clone(),
            drop: self.drop.clone(),
            features: None,
            impute: self.impute,
        }
    }
}

impl TrainArgs {
    /// The training settings the flags give.
    pub fn options(&self) -> TrainOptions {
        self.settings.options(self.model)
    }
}

/// A model family as the flags spell it.
pub fn model_name(model: ModelKind) -> String {
    serde_json::to_value(model)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn check_model_name(publish: &Path) -> anyhow::Result<()> {
    let name = publish
        .file_name()
        .and_then(|n| n.to_str())
        .context("--publish must end in a model name (REPO/MODEL)")?;
    anyhow::ensure!(
        !name.starts_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')),
        "model name `{name}` must use letters, digits, `-`, `_` and `.`, and not start with `.`"
    );
    Ok(())
}

/// The epoch progress bar on standard error, unless `hidden`.
fn progress_bar(hidden: bool) -> Option<indicatif::ProgressBar> {
    if hidden {
        return None;
    }
    let bar =
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed:>4} [{bar:30}] epoch {pos}/{len} {msg} ETA {eta}",
        )
        .expect("the template is valid")
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    Some(bar)
}

fn epoch_message(log: &EpochLog) -> String {
    let mut m = format!("loss {:.5}", log.train_loss);
    if let Some(v) = log.validation_loss {
        m.push_str(&format!(" val_loss {v:.5}"));
    }
    if let Some(v) = log.validation_metric {
        m.push_str(&format!(" val_score {v:.4}"));
    }
    m
}

/// Runs `ferry train`.
pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let dataset = load(&args)?;
    let options = args.options();
    train_and_write(&args, &dataset, &options)
}

/// Checks the destination and loads the training data as the flags say.
pub fn load(args: &TrainArgs) -> anyhow::Result<ferry_train::Dataset> {
    if let Some(p) = &args.publish {
        check_model_name(p)?;
    }
    source(args)?
        .load(&args.settings.load_options())
        .context("loading the training data")
}

/// The training data the flags name: the CSV file, or the payload logs joined with their labels.
fn source(args: &TrainArgs) -> anyhow::Result<ferry_train::CsvSource> {
    let (logs, labels) = match (&args.data, args.payload_log.as_slice(), &args.labels) {
        (Some(data), [], None) => return Ok(ferry_train::CsvSource::File(data.clone())),
        (None, logs @ [_, ..], Some(labels)) => (logs, labels),
        _ => anyhow::bail!("give DATA.csv, or --payload-log FILES with --labels FILE"),
    };
    let model = match (&args.payload_model, &args.publish) {
        (Some(m), _) => m.clone(),
        (None, Some(publish)) => publish
            .file_name()
            .and_then(|n| n.to_str())
            .context("--publish must end in a model name (REPO/MODEL)")?
            .to_string(),
        (None, None) => {
            let models = ferry_train::payload::models(logs).context("reading the payload log")?;
            match models.as_slice() {
                [only] => only.clone(),
                [] => anyhow::bail!("the payload log holds no records"),
                many => anyhow::bail!(
                    "the payload log holds several models ({}): name one with --payload-model",
                    many.join(", ")
                ),
            }
        }
    };
    // A model published before names its feature columns.
    let features = args.publish.as_deref().and_then(|dir| {
        let latest = ferry_train::export::latest_version(dir).ok()?;
        (latest > 0)
            .then(|| ferry_train::export::read_metadata(&dir.join(latest.to_string())).ok())
            .flatten()
            .map(|m| m.features)
    });
    let joined = ferry_train::payload::join(logs, labels, &model, features.as_deref())
        .context("joining the payload log with its labels")?;
    if !args.quiet && !args.json {
        eprintln!(
            "payload log: {} records of {model}, {} rows labelled, {} without a label left out",
            joined.records, joined.rows, joined.unlabeled
        );
    }
    let logs: Vec<String> = logs.iter().map(|p| p.display().to_string()).collect();
    Ok(ferry_train::CsvSource::Memory {
        name: PathBuf::from(format!(
            "{} joined with {}",
            logs.join(","),
            labels.display()
        )),
        bytes: joined.csv,
    })
}

/// Trains with `options`, with a progress bar on standard error unless `quiet`.
pub fn fit_with_progress(
    dataset: &ferry_train::Dataset,
    options: &TrainOptions,
    quiet: bool,
) -> anyhow::Result<ferry_train::Trained> {
    let bar = progress_bar(quiet);
    let mut on_epoch = |log: &EpochLog| {
        if let Some(bar) = &bar {
            if bar.length() != Some(log.max_epochs as u64) {
                bar.set_length(log.max_epochs as u64);
            }
            bar.set_position(log.epoch as u64);
            bar.set_message(epoch_message(log));
        }
    };
    let trained = ferry_train::fit(dataset, options, &mut on_epoch).context("training")?;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    Ok(trained)
}

/// Trains with `options` (a progress bar unless quiet), writes or publishes the model, and prints the summary.
pub fn train_and_write(
    args: &TrainArgs,
    dataset: &ferry_train::Dataset,
    options: &TrainOptions,
) -> anyhow::Result<()> {
    let trained = fit_with_progress(dataset, options, args.quiet || args.json)?;
    let meta = metadata(&trained, dataset, args.settings.impute);
    let onnx = onnx_model(&trained, dataset.imputed.as_deref());
    let background = training_background(&trained, dataset, args.settings.background_rows);
    let background_rows = background.as_ref().map_or(0, |b| b.rows);
    let destination = Destination::from_flags(args.out.as_deref(), args.publish.as_deref())
        .expect("clap requires --out or --publish")
        .save(&onnx, &meta, background.as_ref())
        .context("writing the model")?;
    let (key, score) = match &trained.validation {
        Report::Classification(r) => ("accuracy", r.accuracy),
        Report::Regression(r) => ("r2", r.r2),
    };
    if args.json {
        let summary = serde_json::json!({
            "model_dir": destination.display().to_string(),
            "model": trained.hyper.model,
            "task": trained.hyper.task,
            key: score,
            "scored_on": if trained.validation_rows > 0 { "validation" } else { "training" },
            "epochs_run": trained.curve.len(),
            "best_epoch": trained.best_epoch,
            "training_seconds": trained.seconds,
            "background_rows": background_rows,
            "hyper_parameters": trained.hyper,
            "validation": trained.validation,
        });
        println!("{summary}");
    } else if !args.quiet {
        let on = if trained.validation_rows > 0 {
            format!("{} validation rows", trained.validation_rows)
        } else {
            "the training rows".to_string()
        };
        println!(
            "trained {} on {} rows in {:.2}s ({} epochs, best {}): {key} {score:.4} on {on}",
            model_name(args.model),
            trained.training_rows,
            trained.seconds,
            trained.curve.len(),
            trained.best_epoch
        );
        if background_rows > 0 {
            println!(
                "wrote {} (with {background_rows} background rows)",
                destination.display()
            );
        } else {
            println!("wrote {}", destination.display());
        }
    }
    Ok(())
}
