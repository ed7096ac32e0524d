//! `ferry evaluate`: runs an exported model directory through ONNX Runtime on a CSV file and prints its scores.

use std::path::PathBuf;

use std::fmt::Write as _;

use anyhow::Context;
use ferry_train::fit::Report;

/// `ferry evaluate` flags.
#[derive(Debug, clap::Args)]
pub struct EvaluateArgs {
    /// A model version directory holding `model.onnx` and the `ferry.json` written by `ferry train`.
    #[arg(value_name = "MODEL_DIR")]
    pub model_dir: PathBuf,

    /// The data: a CSV file with the model's feature columns (by name) and its target column.
    #[arg(value_name = "DATA.csv")]
    pub data: PathBuf,

    /// Print one JSON object (`accuracy` or `r2` among its keys) instead of the tables.
    #[arg(long, env = "FERRY_EVALUATE_JSON", num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub json: bool,

    /// The ONNX Runtime 1.32 library. Without it Ferry looks at $ORT_DYLIB_PATH, in `.ferry/lib` above the
    /// working directory or its own binary, beside the binary, and in an installed Python `onnxruntime` package.
    #[arg(long, env = "FERRY_ONNXRUNTIME_LIB", value_name = "FILE")]
    pub onnxruntime_lib: Option<PathBuf>,
}

/// Runs `ferry evaluate`.
pub fn run(args: EvaluateArgs) -> anyhow::Result<()> {
    let engine = ferry_engine::OrtEngine::init(args.onnxruntime_lib.as_deref())
        .context("starting ONNX Runtime")?;
    let (meta, report) = ferry_train::evaluate::evaluate(&engine, &args.model_dir, &args.data)
        .context("evaluating the model")?;
    if args.json {
        let mut value = serde_json::to_value(&report).expect("reports serialize");
        if let Some(object) = value.as_object_mut() {
            object.insert(
                "task".into(),
                serde_json::to_value(meta.task).expect("tasks serialize"),
            );
        }
        return emit(&format!("{value}\n"));
    }
    let mut out = String::new();
    match report {
        Report::Regression(r) => {
            _ = writeln!(out, "rows {}", r.rows);
            _ = writeln!(out, "rmse {:.6}", r.rmse);
            _ = writeln!(out, "mae  {:.6}", r.mae);
            _ = writeln!(out, "r2   {:.6}", r.r2);
        }
        Report::Classification(r) => {
            _ = writeln!(out, "rows     {}", r.rows);
            _ = writeln!(out, "accuracy {:.6}", r.accuracy);
            _ = writeln!(out, "log_loss {:.6}", r.log_loss);
            if let Some(auc) = r.roc_auc {
                _ = writeln!(out, "roc_auc  {auc:.6}");
            }
            let width = r
                .per_class
                .iter()
                .map(|c| c.class.len())
                .max()
                .unwrap_or(5)
                .max(5);
            out.push('\n');
            _ = writeln!(
                out,
                "{:<width$}  precision  recall     f1  support",
                "class"
            );
            for c in &r.per_class {
                _ = writeln!(
                    out,
                    "{:<width$}  {:>9.4}  {:>6.4}  {:>5.4}  {:>7}",
                    c.class, c.precision, c.recall, c.f1, c.support
                );
            }
            out.push('\n');
            _ = writeln!(
                out,
                "confusion matrix (rows: true class, columns: predicted)"
            );
            _ = write!(out, "{:<width$}", "");
            for c in &r.per_class {
                _ = write!(out, "  {:>w$}", c.class, w = c.class.len().max(5));
            }
            out.push('\n');
            for (c, row) in r.per_class.iter().zip(&r.confusion) {
                _ = write!(out, "{:<width$}", c.class);
                for (p, n) in r.per_class.iter().zip(row) {
                    _ = write!(out, "  {:>w$}", n, w = p.class.len().max(5));
                }
                out.push('\n');
            }
        }
    }
    emit(&out)
}

/// Writes the report; a closed pipe (`| head`) is not an error.
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("writing the report")
        }
        _ => Ok(()),
    }
}
