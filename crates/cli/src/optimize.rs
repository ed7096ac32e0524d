//! `ferry optimize`: `search` (grid or random hyper-parameter search scored by k-fold cross-validation or the
//! validation split; prints the table, then trains the best candidate on the whole file and writes or publishes
//! it as `ferry train` does) and `quantize` (int8 weights, compared with the float model, written only when the
//! score holds).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use ferry_train::search::{cross_validate, grid, random, score, Candidate, SearchSpace};

use crate::train::{parse_name, train_and_write, TrainArgs};

/// How candidates are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SearchKind {
    /// Every combination of the candidate values.
    Grid,
    /// `--trials` distinct combinations drawn with the seed.
    Random,
}

/// `ferry optimize` subcommands.
#[derive(Debug, clap::Args)]
pub struct OptimizeArgs {
    /// What to optimize.
    #[command(subcommand)]
    pub command: OptimizeCommand,
}

/// The two optimizations.
#[derive(Debug, clap::Subcommand)]
pub enum OptimizeCommand {
    /// Search hyper-parameters (grid or random; k-fold or validation split), then train and write the best.
    Search(Box<SearchArgs>),
    /// Quantize a trained model's Gemm/MatMul weights to int8; compare size, latency and score with the float
    /// model, and write it only if it is smaller and the score drops by at most --max-accuracy-drop.
    Quantize(QuantizeArgs),
}

/// `ferry optimize quantize` flags.
#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("destination").required(true).args(["out", "publish"]))]
pub struct QuantizeArgs {
    /// The float model: a directory with `model.onnx` and its `ferry.json`.
    #[arg(value_name = "MODEL_DIR")]
    pub model_dir: PathBuf,

    /// Data to score both models on (a CSV file with the model's feature and target columns).
    #[arg(value_name = "DATA.csv")]
    pub data: PathBuf,

    /// The largest score drop (accuracy, or R² for regressors) accepted; past it nothing is written and the
    /// command fails.
    #[arg(long, env = "FERRY_QUANTIZE_MAX_ACCURACY_DROP", default_value_t = 0.01)]
    pub max_accuracy_drop: f64,

    /// Write the int8 model's `model.onnx` and `ferry.json` into this directory.
    #[arg(long, env = "FERRY_QUANTIZE_OUT", value_name = "DIR")]
    pub out: Option<PathBuf>,

    /// Publish the int8 model as the next version of `REPO/MODEL` (atomically, as `ferry train` does).
    #[arg(long, env = "FERRY_QUANTIZE_PUBLISH", value_name = "REPO/MODEL")]
    pub publish: Option<PathBuf>,

    /// Print the comparison as one JSON object.
    #[arg(long, env = "FERRY_QUANTIZE_JSON", num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub json: bool,

    /// The ONNX Runtime 1.32 library (else $ORT_DYLIB_PATH, `.ferry/lib` above the working directory or the
    /// binary, beside the binary, or a Python `onnxruntime`).
    #[arg(long, env = "FERRY_ONNXRUNTIME_LIB", value_name = "FILE")]
    pub onnxruntime_lib: Option<PathBuf>,
}

/// `ferry optimize search` flags: every `ferry train` flag (the base settings and the destination), plus the
/// search.
#[derive(Debug, clap::Args)]
pub struct SearchArgs {
    /// The base settings, as for `ferry train`.
    #[command(flatten)]
    pub train: TrainArgs,

    /// `grid` (every combination) or `random` (`--trials` distinct combinations drawn with `--seed`).
    #[arg(long, env = "FERRY_OPTIMIZE_SEARCH", value_parser = parse_name::<SearchKind>, default_value = "grid")]
    pub search: SearchKind,

    /// Combinations a random search scores.
    #[arg(long, env = "FERRY_OPTIMIZE_TRIALS", default_value_t = 10)]
    pub trials: usize,

    /// Score each candidate by k-fold cross-validation (stratified for classes) with this many folds; 0 scores
    /// it on the validation split of one fit (faster, noisier).
    #[arg(long, env = "FERRY_OPTIMIZE_FOLDS", default_value_t = 0)]
    pub folds: usize,

    /// Learning rates to try, comma-separated.
    #[arg(
        long,
        env = "FERRY_OPTIMIZE_TRY_LEARNING_RATE",
        value_delimiter = ',',
        value_name = "ALPHAS"
    )]
    pub try_learning_rate: Vec<f64>,

    /// L2 strengths to try, comma-separated.
    #[arg(
        long,
        env = "FERRY_OPTIMIZE_TRY_L2",
        value_delimiter = ',',
        value_name = "VALUES"
    )]
    pub try_l2: Vec<f64>,

    /// Mini-batch sizes to try, comma-separated.
    #[arg(
        long,
        env = "FERRY_OPTIMIZE_TRY_BATCH_SIZE",
        value_delimiter = ',',
        value_name = "SIZES"
    )]
    pub try_batch_size: Vec<usize>,

    /// Hidden layer sizes to try (mlp): candidates separated by `;`, layers by `,` (`64;128,64`).
    #[arg(long, env = "FERRY_OPTIMIZE_TRY_HIDDEN", value_delimiter = ';', value_parser = parse_sizes, value_name = "LAYERS")]
    pub try_hidden: Vec<Vec<usize>>,

    /// Epoch limits to try, comma-separated.
    #[arg(
        long,
        env = "FERRY_OPTIMIZE_TRY_EPOCHS",
        value_delimiter = ',',
        value_name = "COUNTS"
    )]
    pub try_epochs: Vec<usize>,
}

fn parse_sizes(s: &str) -> anyhow::Result<Vec<usize>> {
    s.split(',')
        .map(|p| {
            p.trim()
                .parse::<usize>()
                .map_err(|e| anyhow::anyhow!("`{p}`: {e}"))
        })
        .collect()
}

fn describe(c: &Candidate) -> String {
    let mut parts = Vec::new();
    if let Some(v) = c.learning_rate {
        parts.push(format!("learning_rate={v}"));
    }
    if let Some(v) = c.l2 {
        parts.push(format!("l2={v}"));
    }
    if let Some(v) = c.batch_size {
        parts.push(format!("batch_size={v}"));
    }
    if let Some(v) = &c.hidden {
        let v: Vec<String> = v.iter().map(usize::to_string).collect();
        parts.push(format!("hidden={}", v.join(",")));
    }
    if let Some(v) = c.epochs {
        parts.push(format!("epochs={v}"));
    }
    if parts.is_empty() {
        "defaults".into()
    } else {
        parts.join(" ")
    }
}

/// Runs `ferry optimize`.
pub fn run(args: OptimizeArgs) -> anyhow::Result<()> {
    match args.command {
        OptimizeCommand::Search(args) => search(*args),
        OptimizeCommand::Quantize(args) => quantize(args),
    }
}

fn quantize(args: QuantizeArgs) -> anyhow::Result<()> {
    use ferry_train::export::{read_metadata, Destination, BACKGROUND_FILE, MODEL_FILE};
    let engine = ferry_engine::OrtEngine::init(args.onnxruntime_lib.as_deref())
        .context("starting ONNX Runtime")?;
    let mut meta = read_metadata(&args.model_dir).context("reading the model's ferry.json")?;
    let path = args.model_dir.join(MODEL_FILE);
    let float = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let (int8, tensors) =
        ferry_train::quantize::quantize_weights(&float).context("quantizing the weights")?;
    anyhow::ensure!(
        tensors > 0,
        "the model has no float Gemm/MatMul weights to quantize"
    );
    let dataset = ferry_train::evaluate::load_for(&meta, &args.data).context("loading the data")?;
    let c = ferry_train::quantize::compare(&engine, &meta, &dataset, &float, &int8, tensors)
        .context("comparing the models")?;
    if args.json {
        println!(
            "{}",
            serde_json::to_value(&c).expect("comparisons serialize")
        );
    } else {
        println!("             float      int8");
        println!("bytes   {:>10} {:>9}", c.float_bytes, c.int8_bytes);
        println!(
            "ms/{:<4} {:>10.3} {:>9.3}",
            c.latency_rows, c.float_latency_ms, c.int8_latency_ms
        );
        println!(
            "{:<7} {:>10.4} {:>9.4}",
            c.metric, c.float_score, c.int8_score
        );
    }
    anyhow::ensure!(
        c.drop <= args.max_accuracy_drop,
        "not written: {} drops by {:.4}, more than --max-accuracy-drop {}",
        c.metric,
        c.drop,
        args.max_accuracy_drop
    );
    anyhow::ensure!(
        c.int8_bytes < c.float_bytes,
        "not written: the int8 model ({} bytes) is not smaller than the float model ({} bytes); its weights are \
         too few for int8 to outweigh the DequantizeLinear nodes and scales it adds",
        c.int8_bytes,
        c.float_bytes
    );
    meta.quantization = Some(c);
    // The int8 model takes the same inputs: it keeps the float model's background rows.
    let background_path = args.model_dir.join(BACKGROUND_FILE);
    let background = if background_path.is_file() {
        Some(
            ferry_train::read_background(&background_path)
                .context("reading the model's background")?,
        )
    } else {
        None
    };
    let destination = Destination::from_flags(args.out.as_deref(), args.publish.as_deref())
        .expect("clap requires --out or --publish")
        .save(&int8, &meta, background.as_ref())
        .context("writing the model")?;
    if !args.json {
        println!("wrote {}", destination.display());
    }
    Ok(())
}

fn search(args: SearchArgs) -> anyhow::Result<()> {
    let space = SearchSpace {
        learning_rate: args.try_learning_rate.clone(),
        l2: args.try_l2.clone(),
        batch_size: args.try_batch_size.clone(),
        hidden: args.try_hidden.clone(),
        epochs: args.try_epochs.clone(),
    };
    let candidates = match args.search {
        SearchKind::Grid => grid(&space),
        SearchKind::Random => random(&space, args.trials, args.train.settings.seed),
    };
    let dataset = crate::train::load(&args.train)?;
    let base = args.train.options();
    let talk = !args.train.quiet && !args.train.json;
    let mut rows = Vec::with_capacity(candidates.len());
    for (i, candidate) in candidates.iter().enumerate() {
        let options = candidate.apply(&base);
        let started = Instant::now();
        let value = if args.folds > 0 {
            cross_validate(&dataset, &options, args.folds)
        } else {
            ferry_train::fit(&dataset, &options, &mut |_| {}).map(|t| score(&t.validation))
        }
        .with_context(|| format!("trial {} ({})", i + 1, describe(candidate)))?;
        let seconds = started.elapsed().as_secs_f64();
        if talk {
            eprintln!(
                "trial {}/{}: {} → {value:.4} ({seconds:.2}s)",
                i + 1,
                candidates.len(),
                describe(candidate)
            );
        }
        rows.push((candidate.clone(), value, seconds));
    }
    let best = rows
        .iter()
        .enumerate()
        .fold(0, |b, (i, r)| if r.1 > rows[b].1 { i } else { b });
    let scored_by = if args.folds > 0 {
        format!("{}-fold cross-validation", args.folds)
    } else {
        "the validation split".to_string()
    };
    if args.train.json {
        let trials: Vec<serde_json::Value> = rows
            .iter()
            .map(|(c, v, s)| serde_json::json!({"candidate": c, "score": v, "seconds": s}))
            .collect();
        eprintln!(
            "{}",
            serde_json::json!({"scored_by": scored_by, "trials": trials, "best": rows[best].0})
        );
    } else if !args.train.quiet {
        let mut table = format!("trial  score   seconds  settings (scored by {scored_by})\n");
        for (i, (c, v, s)) in rows.iter().enumerate() {
            let mark = if i == best { "*" } else { " " };
            let _ = writeln!(
                table,
                "{mark}{:>4}  {v:.4}  {s:>7.2}  {}",
                i + 1,
                describe(c)
            );
        }
        print!("{table}");
    }
    // The winner, trained on the whole file with its own validation split, is what gets written.
    train_and_write(&args.train, &dataset, &rows[best].0.apply(&base))
}
