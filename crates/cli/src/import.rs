//! `ferry import hf`: a Hugging Face folder (`config.json` + `model.safetensors` + tokenizer files) of the BERT
//! family to a servable version folder (`model.onnx` built by `ferry_model::hf`, and the tokenizer and
//! sentence-transformers files beside it), with no Python.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use ferry_model::hf::{self, ModelKind};

/// `ferry import` arguments.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// Where the model comes from.
    #[command(subcommand)]
    pub source: ImportSource,
}

/// The formats `ferry import` reads.
#[derive(Debug, clap::Subcommand)]
pub enum ImportSource {
    /// A Hugging Face model folder as the hub ships it (BERT, MiniLM, RoBERTa, XLM-RoBERTa: base models and
    /// sentence-transformers give `last_hidden_state`, *ForSequenceClassification models `logits`).
    #[command(after_help = "Examples:
  ferry import hf ./all-MiniLM-L6-v2 --out models/minilm/1
  ferry import hf ./ms-marco-MiniLM-L-6-v2 --out models/reranker/1 --force")]
    Hf(HfArgs),
}

/// `ferry import hf` flags.
#[derive(Debug, clap::Args)]
pub struct HfArgs {
    /// The folder holding config.json and model.safetensors (or model.safetensors.index.json and its shards).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,

    /// The version folder to write (`<repository>/<model>/<version>`): model.onnx, and the tokenizer and
    /// sentence-transformers files found in DIR. Created when missing.
    #[arg(long, value_name = "VERSION_DIR")]
    pub out: PathBuf,

    /// Replace a model.onnx already in VERSION_DIR.
    #[arg(long)]
    pub force: bool,
}

/// Runs `ferry import`.
pub fn run(args: ImportArgs) -> anyhow::Result<()> {
    match args.source {
        ImportSource::Hf(args) => hf_import(&args),
    }
}

fn hf_import(args: &HfArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.dir.is_dir(),
        "{} is not a folder (give the Hugging Face model's folder, with config.json and model.safetensors)",
        args.dir.display()
    );
    let target = args.out.join("model.onnx");
    anyhow::ensure!(
        args.force || !target.exists(),
        "{} already exists: give --force to replace it",
        target.display()
    );
    let started = Instant::now();
    let imported =
        hf::import(&args.dir).with_context(|| format!("importing {}", args.dir.display()))?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut copied = Vec::new();
    for name in hf::COMPANION_FILES {
        let from = args.dir.join(name);
        if from.is_file() {
            copy(&from, &args.out.join(name))?;
            copied.push(*name);
        }
    }
    // The model goes last, written aside and renamed: a server polling the repository sees a version only once it
    // is whole, tokenizer files included.
    let partial = args.out.join(".model.onnx.partial");
    std::fs::write(&partial, &imported.onnx)
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &target).with_context(|| format!("writing {}", target.display()))?;
    let what = match imported.kind {
        ModelKind::Embedding => format!(
            "an embedding model: last_hidden_state [batch_size, sequence_length, {}]",
            imported.hidden_size
        ),
        ModelKind::Classifier => format!(
            "a classifier: logits [batch_size, {}] ({})",
            imported.num_labels,
            imported.id2label.join(", ")
        ),
    };
    println!(
        "imported {} ({}, {} layers, up to {} tokens) as {what}, from inputs {}",
        args.dir.display(),
        imported.family.model_type(),
        imported.num_layers,
        imported.max_sequence_length,
        imported.inputs.join(", "),
    );
    if !copied.contains(&"tokenizer.json") {
        println!(
            "note: {} has no tokenizer.json: clients must send token ids (input_ids, attention_mask) themselves",
            args.dir.display()
        );
    }
    println!(
        "wrote {} ({:.1} MB) and {} in {:.2} s",
        target.display(),
        imported.onnx.len() as f64 / 1e6,
        if copied.is_empty() {
            "no tokenizer files (none found)".to_string()
        } else {
            copied.join(", ")
        },
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}
