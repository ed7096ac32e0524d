//! `ferry baseline`: writes the drift baseline into a model version's `ferry.json`, for models that `ferry train`
//! did not make: per-feature statistics of the training data, and the distribution of the model's own predictions on
//! that data (run through ONNX Runtime, as `ferry serve` runs it); and a seeded sample of the data's rows as
//! `background.csv`, the reference rows of feature attributions.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// `ferry baseline` flags.
#[derive(Debug, clap::Args)]
pub struct BaselineArgs {
    /// A model version directory (`<repo>/<model>/<version>`); its `ferry.json` is created or updated.
    #[arg(value_name = "MODEL_DIR")]
    pub model_dir: PathBuf,

    /// The training data: a CSV file with a header row, the feature columns in the order of the model's input.
    #[arg(value_name = "DATA.csv")]
    pub data: PathBuf,

    /// The target column, left out of the features (default: the last column).
    #[arg(long, env = "FERRY_BASELINE_TARGET")]
    pub target: Option<String>,

    /// Other columns to leave out, comma-separated.
    #[arg(long, env = "FERRY_BASELINE_DROP", value_delimiter = ',')]
    pub drop: Vec<String>,

    /// Write only the feature baseline: do not run the model for the prediction baseline (`prediction_stats`).
    #[arg(long, env = "FERRY_BASELINE_NO_PREDICTIONS")]
    pub no_predictions: bool,

    /// Write a seeded sample of this many of the data's rows (all of them when there are fewer) as
    /// `background.csv`, the reference rows of feature attributions. At most 1000; 0 writes none (and leaves an
    /// existing one as it is).
    #[arg(
        long,
        env = "FERRY_BASELINE_BACKGROUND_ROWS",
        value_name = "N",
        default_value_t = ferry_train::background::DEFAULT_BACKGROUND_ROWS,
        value_parser = crate::train::background_rows,
    )]
    pub background_rows: usize,

    /// The seed of the background sample: the same data and seed give the same rows.
    #[arg(long, env = "FERRY_BASELINE_SEED", default_value_t = 0)]
    pub seed: u64,

    /// The ONNX Runtime 1.32 library, to run the model (else $ORT_DYLIB_PATH, `.ferry/lib` above the working
    /// directory or the binary, beside the binary, or a Python `onnxruntime`).
    #[arg(long, env = "FERRY_ONNXRUNTIME_LIB", value_name = "FILE")]
    pub onnxruntime_lib: Option<PathBuf>,
}

/// Runs `ferry baseline`.
pub fn run(args: BaselineArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.model_dir.is_dir(),
        "{} is not a model version directory",
        args.model_dir.display()
    );
    let options = ferry_train::LoadOptions {
        target: args.target,
        drop: args.drop,
        ..Default::default()
    };
    let data = ferry_train::load_csv(&args.data, &options)
        .with_context(|| format!("reading {}", args.data.display()))?;
    anyhow::ensure!(data.rows() > 0, "{} has no rows", args.data.display());
    let stats: Vec<_> = data
        .features
        .iter()
        .enumerate()
        .map(|(i, name)| ferry_train::stats::feature_stats(name, data.x.column(i)))
        .collect();
    // The model's answers on the same rows: the prediction drift baseline (when the directory has a model).
    let model_path = args.model_dir.join("model.onnx");
    let predictions = if args.no_predictions || !model_path.is_file() {
        None
    } else {
        let engine = ferry_engine::OrtEngine::init(args.onnxruntime_lib.as_deref()).context(
            "starting ONNX Runtime to run the model for its prediction baseline (--no-predictions skips it)",
        )?;
        let bytes = std::fs::read(&model_path)
            .with_context(|| format!("reading {}", model_path.display()))?;
        Some(
            ferry_train::evaluate::prediction_baseline(&engine, &bytes, data.x.view())
                .with_context(|| {
                    format!(
                        "running {} for its prediction baseline (--no-predictions skips it)",
                        model_path.display()
                    )
                })?,
        )
    };
    let path = args.model_dir.join("ferry.json");
    let mut meta = match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str::<serde_json::Value>(&text)
            .with_context(|| format!("parsing {}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::json!({}),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let object = meta
        .as_object_mut()
        .with_context(|| format!("{} is not a JSON object", path.display()))?;
    object.insert("features".into(), serde_json::to_value(&data.features)?);
    object.insert("feature_stats".into(), serde_json::to_value(&stats)?);
    object.insert("baseline_data".into(), serde_json::json!({"path": args.data.display().to_string(), "sha256": data.sha256, "rows": data.rows()}));
    if let Some(p) = &predictions {
        object.insert("prediction_stats".into(), serde_json::to_value(p)?);
    }
    let all_rows: Vec<usize> = (0..data.rows()).collect();
    let background =
        ferry_train::background::sample(&data, &all_rows, args.background_rows, args.seed);
    let background_path = args
        .model_dir
        .join(ferry_train::background::BACKGROUND_FILE);
    if let Some(b) = &background {
        replace(&background_path, &b.to_csv())?;
    }
    replace(
        &path,
        (serde_json::to_string_pretty(&meta)? + "\n").as_bytes(),
    )?;
    let outputs = match &predictions {
        None => String::new(),
        Some(p) if p.is_empty() => {
            " (no output gives one label or number per row, so no prediction baseline)".into()
        }
        Some(p) => format!(
            " and {} output{} ({})",
            p.len(),
            if p.len() == 1 { "" } else { "s" },
            p.iter()
                .map(|s| s.output.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    println!(
        "wrote the drift baseline of {} features{outputs} from {} rows to {}",
        stats.len(),
        data.rows(),
        path.display()
    );
    if let Some(b) = &background {
        println!(
            "wrote {} background rows (seed {}) to {}",
            b.rows,
            args.seed,
            background_path.display()
        );
    }
    Ok(())
}

/// Writes `bytes` beside `path`, then renames it into place: a server reading the directory never sees half a file.
fn replace(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let partial = path.with_file_name(format!(".{name}.partial"));
    std::fs::write(&partial, bytes).with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| format!("replacing {}", path.display()))
}
