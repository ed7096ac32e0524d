//! `ferry retrain`: the update loop in one command. It trains a candidate on new data (a CSV file, or payload logs
//! joined with labels), scores it and the live version on the same seeded holdout rows through ONNX Runtime, and
//! only when the candidate is better by `--min-improvement` writes a rollout plan and publishes the candidate as
//! the model's next version, in that order, so a polling server never sends all traffic to a version that was
//! just published. A refused candidate exits with [`EXIT_REFUSED`]; `--dry-run` does everything but write.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use ferry_repo::rollout::{RolloutState, PLAN_FILE};
use ferry_repo::source::Repository;
use ferry_train::export::{
    metadata, metadata_json, onnx_model, read_metadata, training_background, Metadata,
};
use ferry_train::gate::{headline, holdout_split, rows_for, score, GateRecord};
use ferry_train::{CsvSource, ModelKind};

use crate::rollout::{
    check_no_running_plan, describe_steps, live_version, read_plan, runtime, write_plan,
    RepositoryFlags, RolloutFlags,
};
use crate::train::{fit_with_progress, model_name, parse_name, TrainSettings};

/// The exit status of a candidate the gate refused (1 is an error, 64 a bad configuration).
pub const EXIT_REFUSED: u8 = 3;

/// The gate refused the candidate: nothing was written.
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// `ferry retrain` flags.
#[derive(Debug, clap::Args)]
pub struct RetrainArgs {
    /// The model to retrain (a directory of the repository).
    #[arg(value_name = "MODEL")]
    pub model_name: Option<String>,

    /// The repository.
    #[command(flatten)]
    pub repository: RepositoryFlags,

    /// New training data: a CSV file with a header row, the features and a target column (as for `ferry train`).
    #[arg(long, env = "FERRY_RETRAIN_DATA", value_name = "DATA.csv")]
    pub data: Option<PathBuf>,

    /// Payload logs written by `ferry serve --payload-log`, comma-separated (a file and its rotations): the
    /// inputs logged for MODEL become training rows, labelled from --labels by request id.
    #[arg(
        long,
        env = "FERRY_RETRAIN_PAYLOAD_LOG",
        value_delimiter = ',',
        value_name = "FILES"
    )]
    pub payload_log: Vec<PathBuf>,

    /// Labels for the payload log: a CSV file with the columns `id` (the request id) and `label`. A request of
    /// several rows is labelled row by row, as `ID:ROW` (`req-7:0`, `req-7:1`).
    #[arg(long, env = "FERRY_RETRAIN_LABELS", value_name = "FILE")]
    pub labels: Option<PathBuf>,

    /// The model family: `linear`, `logistic`, `softmax` or `mlp` (default: the live version's, with its hidden
    /// layers for mlp).
    #[arg(long, env = "FERRY_TRAIN_MODEL", value_parser = parse_name::<ModelKind>, value_name = "FAMILY")]
    pub model: Option<ModelKind>,

    /// What to read from the data and how to fit, as for `ferry train`.
    #[command(flatten)]
    pub settings: TrainSettings,

    /// Share of the rows held out (drawn with --seed, stratified by class) to score the candidate and the live
    /// version on; the candidate trains on the others.
    #[arg(long, env = "FERRY_RETRAIN_HOLDOUT_FRACTION", default_value_t = 0.2)]
    pub holdout_fraction: f64,

    /// The least gain in holdout score (accuracy, or R² for regressors) over the live version that publishes the
    /// candidate. 0 publishes a candidate that is not worse; a negative value accepts a drop that large.
    #[arg(
        long,
        env = "FERRY_RETRAIN_MIN_IMPROVEMENT",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    pub min_improvement: f64,

    /// The canary rollout the published candidate starts with.
    #[command(flatten)]
    pub rollout: RolloutFlags,

    /// Publish without a rollout: the new version takes traffic once it loads, by the version policy (an earlier
    /// plan of the model, which would keep routing to its versions, is replaced by one already promoted to it).
    #[arg(long, env = "FERRY_RETRAIN_NO_ROLLOUT", num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub no_rollout: bool,

    /// Replace a rollout of the model that is still running (otherwise retraining refuses to start).
    #[arg(long, env = "FERRY_RETRAIN_FORCE", num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub force: bool,

    /// Do everything but write: train, score, decide, and print what would be published.
    #[arg(long, env = "FERRY_RETRAIN_DRY_RUN", num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub dry_run: bool,

    /// A TOML file describing the whole loop: keys named like these flags (`data`, `model`, `min_improvement`,
    /// `steps = [5, 25, 50, 100]`, `model_name` for MODEL), at the top or in the tables [data], [train], [gate],
    /// [rollout] and [repository]. Flags and environment variables override it; relative paths in it are relative
    /// to the file.
    #[arg(long, env = "FERRY_RETRAIN_PIPELINE", value_name = "FILE")]
    pub pipeline: Option<PathBuf>,

    /// No progress bar and no step lines on standard error.
    #[arg(long, env = "FERRY_RETRAIN_QUIET", num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub quiet: bool,

    /// Print one JSON object (the scores, the decision, the version and the plan) on standard output.
    #[arg(long, env = "FERRY_RETRAIN_JSON", num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub json: bool,

    /// The ONNX Runtime 1.32 library (else $ORT_DYLIB_PATH, `.ferry/lib` above the working directory or the
    /// binary, beside the binary, or a Python `onnxruntime`).
    #[arg(long, env = "FERRY_ONNXRUNTIME_LIB", value_name = "FILE")]
    pub onnxruntime_lib: Option<PathBuf>,

    /// Sign the published version with this Ed25519 secret key (its ferry.sig, as `ferry sign` writes it), for
    /// servers started with --trusted-key.
    #[arg(long, env = "FERRY_SIGN_KEY", value_name = "KEY_FILE")]
    pub sign_key: Option<PathBuf>,
}

/// The version serving now, as read from the repository.
struct Live {
    version: u64,
    meta: Metadata,
    onnx: Vec<u8>,
}

/// Step lines on standard error, unless quiet.
struct Steps {
    quiet: bool,
}

impl Steps {
    fn say(&self, line: impl std::fmt::Display) {
        if !self.quiet {
            eprintln!("retrain: {line}");
        }
    }
}

/// Runs `ferry retrain`.
pub fn run(args: RetrainArgs) -> anyhow::Result<()> {
    let model = args.model_name.clone().context(
        "name the model to retrain: `ferry retrain MODEL` (or `model_name` in the pipeline file)",
    )?;
    let steps = Steps {
        quiet: args.quiet || args.json,
    };
    // Read the key first: a key that cannot sign should stop the run before any training.
    let sign_key = match &args.sign_key {
        Some(path) => Some(ferry_repo::integrity::SigningKey::read(path).context("--sign-key")?),
        None => None,
    };
    let engine = ferry_engine::OrtEngine::init(args.onnxruntime_lib.as_deref())
        .context("starting ONNX Runtime")?;
    let repo = args.repository.open()?;
    let rt = runtime()?;

    // What serves now.
    let plan = match rt.block_on(read_plan(&repo, &model)) {
        Ok(p) => p,
        Err(e) if args.force => {
            steps.say(format_args!(
                "replacing an unreadable plan: {}",
                crate::describe(&e)
            ));
            None
        }
        Err(e) => return Err(e.context("--force replaces it")),
    };
    check_no_running_plan(&model, plan.as_ref(), args.force)?;
    let present = rt.block_on(repo.versions(&model))?;
    let live = match live_version(&present, plan.as_ref(), None) {
        None => {
            steps.say(format_args!(
                "{model} has no version in {}: the candidate becomes its first version, without a gate or a rollout",
                repo.describe()
            ));
            None
        }
        Some(version) => {
            let live = rt
                .block_on(read_live(&repo, &model, version))
                .with_context(|| format!("reading the live version {version} of {model}"))?;
            steps.say(format_args!(
                "live version: {model} {version} ({}, {} features)",
                model_name(live.meta.model),
                live.meta.features.len()
            ));
            Some(live)
        }
    };

    // The data.
    let source = data_source(&args, &model, live.as_ref(), &steps)?;
    let dataset = source
        .load(&args.settings.load_options())
        .context("loading the training data")?;
    let family = args.model.or(live.as_ref().map(|l| l.meta.model)).context(
        "give --model (linear, logistic, softmax or mlp): there is no live version to take it from",
    )?;
    let mut options = args.settings.options(family);
    if args.model.is_none() && options.hidden.is_none() {
        options.hidden = live
            .as_ref()
            .and_then(|l| l.meta.hyper_parameters.as_ref())
            .map(|h| h.hidden.clone())
            .filter(|h| !h.is_empty());
    }
    let task = ferry_train::fit::resolve_task(&options, &dataset)?;
    // Judged on every row: the candidate, trained on fewer, keeps it.
    options.task = Some(task);
    if let Some(l) = &live {
        anyhow::ensure!(
            l.meta.task == task,
            "the candidate would be a {task:?} model but the live version {} is a {:?} model: they cannot be compared",
            l.version,
            l.meta.task
        );
    }
    let (train_rows, holdout_rows) =
        holdout_split(&dataset, task, args.holdout_fraction, options.seed)?;
    steps.say(format_args!(
        "data: {} rows from {}; training on {}, holding out {} (seed {})",
        dataset.rows(),
        source.name().display(),
        train_rows.len(),
        holdout_rows.len(),
        options.seed
    ));

    // The candidate.
    let train = dataset.subset(&train_rows);
    let trained = fit_with_progress(&train, &options, steps.quiet)?;
    let mut meta = metadata(&trained, &train, args.settings.impute);
    let onnx = onnx_model(&trained, train.imputed.as_deref());
    let (metric, validation) = headline(&trained.validation);
    steps.say(format_args!(
        "trained {} on {} rows in {:.2}s ({} epochs, best {}): validation {metric} {validation:.4}",
        model_name(family),
        trained.training_rows,
        trained.seconds,
        trained.curve.len(),
        trained.best_epoch
    ));

    // The gate.
    let holdout = dataset.subset(&holdout_rows);
    let candidate_score = headline(
        &score(&engine, &onnx, &meta, &holdout).context("scoring the candidate on the holdout")?,
    )
    .1;
    let live_score = match &live {
        None => None,
        Some(l) => {
            let rows = rows_for(
                &l.meta,
                &source,
                &dataset.target_name,
                args.settings.impute,
                &holdout_rows,
                dataset.rows(),
            )
            .and_then(|rows| score(&engine, &l.onnx, &l.meta, &rows))
            .with_context(|| format!("scoring the live version {} on the holdout", l.version))?;
            Some((l.version, headline(&rows).1))
        }
    };
    let gate = GateRecord::decide(
        metric,
        candidate_score,
        live_score,
        args.min_improvement,
        holdout_rows.len(),
        args.holdout_fraction,
        options.seed,
    );
    steps.say(describe_gate(&gate));
    meta.gate = Some(gate.clone());

    let mut summary = serde_json::json!({
        "model": model,
        "metric": gate.metric,
        "candidate": gate.candidate,
        "live_version": gate.live_version,
        "live": gate.live,
        "improvement": gate.improvement,
        "min_improvement": gate.min_improvement,
        "holdout_rows": gate.holdout_rows,
        "training_rows": train_rows.len(),
        "passed": gate.passed,
        "published": false,
        "dry_run": args.dry_run,
        "version": null,
        "rollout": null,
    });
    if !gate.passed {
        let message = format!(
            "refused the candidate for {model}: {} (nothing was written)",
            describe_gate(&gate)
        );
        if args.json {
            println!("{summary}");
        }
        return Err(Refused(message).into());
    }

    // Publishing: the plan first, then the version.
    let version = present
        .iter()
        .copied()
        .chain(plan.iter().flat_map(|p| [p.stable, p.candidate]))
        .max()
        .unwrap_or(0)
        + 1;
    let new_plan = match &live {
        Some(l) if !args.no_rollout => Some(args.rollout.plan(l.version, version)?),
        // Without a rollout, an earlier plan left in place would keep routing to its versions: it is replaced by
        // one already promoted to the new version (which serves once it loads, as the version policy would).
        Some(l) if plan.is_some() => {
            let mut p = args.rollout.plan(l.version, version)?;
            p.finish(
                RolloutState::Promoted,
                "published without a rollout by ferry retrain".into(),
            );
            Some(p)
        }
        _ => None,
    };
    summary["version"] = version.into();
    summary["rollout"] = serde_json::to_value(&new_plan).expect("plans serialize");
    let outcome = match (&new_plan, &live) {
        (Some(p), _) if p.state == RolloutState::Running => format!(
            "version {version} with a rollout from version {}: {} of unversioned traffic, {}s a step",
            p.stable,
            describe_steps(p),
            p.step_interval_secs
        ),
        (Some(_), _) => format!(
            "version {version} without a rollout: the model's plan is replaced by one already promoted to it, so it serves once it loads"
        ),
        (None, Some(_)) => format!(
            "version {version} without a rollout: it serves by the version policy once it loads"
        ),
        (None, None) => format!("version {version}, the first"),
    };
    if args.dry_run {
        if args.json {
            println!("{summary}");
        } else {
            println!("dry run: would publish {model} {outcome} (nothing was written)");
        }
        return Ok(());
    }
    if let Some(p) = &new_plan {
        rt.block_on(write_plan(&repo, &model, p))?;
        steps.say(format_args!(
            "wrote {model}/{PLAN_FILE}: version {version} from {}, {}",
            p.stable,
            p.state.name()
        ));
    }
    let mut files = vec![(
        ferry_train::export::METADATA_FILE.to_string(),
        metadata_json(&onnx, &meta),
    )];
    // The background: the candidate's training split, never its validation rows or the holdout.
    if let Some(b) = training_background(&trained, &train, args.settings.background_rows) {
        files.push((ferry_train::export::BACKGROUND_FILE.to_string(), b.to_csv()));
    }
    files.push((ferry_train::export::MODEL_FILE.to_string(), onnx));
    if let Some(key) = &sign_key {
        let sig = ferry_repo::integrity::sign_files(&model, version, &files, key)?;
        files.push((ferry_repo::integrity::SIGNATURE_FILE.to_string(), sig));
    }
    if let Err(e) = rt.block_on(repo.publish_version(&model, version, files)) {
        // Leave no plan behind for a version that never came: the earlier plan goes back, or the new one is
        // rolled back.
        let restore = match (plan, new_plan) {
            (Some(old), Some(_)) => Some(old),
            (None, Some(mut p)) => {
                p.finish(
                    RolloutState::RolledBack,
                    format!("publishing version {version} failed: {e}"),
                );
                Some(p)
            }
            (_, None) => None,
        };
        if let Some(p) = restore {
            if let Err(undo) = rt.block_on(write_plan(&repo, &model, &p)) {
                eprintln!("ferry: could not undo the plan: {}", crate::describe(&undo));
            }
        }
        bail!("publishing version {version} of {model}: {e}");
    }
    steps.say(format_args!(
        "published {}/{model}/{version}",
        repo.describe()
    ));
    summary["published"] = true.into();
    if args.json {
        println!("{summary}");
    } else {
        println!("published {model} {outcome}");
    }
    Ok(())
}

/// The gate's figures in one line.
fn describe_gate(gate: &GateRecord) -> String {
    let metric = &gate.metric;
    match (gate.live_version, gate.live, gate.improvement) {
        (Some(v), Some(live), Some(gain)) => format!(
            "on {} holdout rows, candidate {metric} {:.4}, live version {v} {metric} {live:.4}: {gain:+.4}, {} {:+.4}",
            gate.holdout_rows,
            gate.candidate,
            if gate.passed { "at least" } else { "short of" },
            gate.min_improvement
        ),
        _ => format!(
            "on {} holdout rows, candidate {metric} {:.4} (no live version to compare with)",
            gate.holdout_rows, gate.candidate
        ),
    }
}

/// Reads the live version's files (fetched into the cache first from S3).
async fn read_live(repo: &Repository, model: &str, version: u64) -> anyhow::Result<Live> {
    let dir = repo.fetch_version(model, version).await?;
    let meta = read_metadata(&dir).context(
        "its ferry.json gives the features and classes to score it (`ferry baseline` writes one for models made elsewhere)",
    )?;
    let path = dir.join(ferry_train::export::MODEL_FILE);
    let onnx = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Live {
        version,
        meta,
        onnx,
    })
}

/// The training data the flags name: the CSV file, or the payload logs joined with their labels.
fn data_source(
    args: &RetrainArgs,
    model: &str,
    live: Option<&Live>,
    steps: &Steps,
) -> anyhow::Result<CsvSource> {
    match (&args.data, args.payload_log.as_slice(), &args.labels) {
        (Some(data), [], None) => Ok(CsvSource::File(data.clone())),
        (None, [_, ..], Some(labels)) => {
            let joined = ferry_train::payload::join(
                &args.payload_log,
                labels,
                model,
                live.map(|l| l.meta.features.as_slice()),
            )
            .context("joining the payload log with its labels")?;
            steps.say(format_args!(
                "payload log: {} records of {model}, {} rows labelled, {} without a label left out",
                joined.records, joined.rows, joined.unlabeled
            ));
            Ok(CsvSource::Memory {
                name: joined_name(&args.payload_log, labels),
                bytes: joined.csv,
            })
        }
        (None, [], None) => {
            bail!(
                "no training data: give --data FILE.csv, or --payload-log FILE with --labels FILE"
            )
        }
        (Some(_), _, _) => bail!("give --data, or --payload-log with --labels, not both"),
        (None, [_, ..], None) => bail!("--payload-log needs --labels (a CSV file of id,label)"),
        (None, [], Some(_)) => bail!("--labels needs --payload-log"),
    }
}

/// What `ferry.json` and messages call joined payload data.
fn joined_name(logs: &[PathBuf], labels: &Path) -> PathBuf {
    let logs: Vec<String> = logs.iter().map(|p| p.display().to_string()).collect();
    PathBuf::from(format!(
        "{} joined with {}",
        logs.join(","),
        labels.display()
    ))
}
