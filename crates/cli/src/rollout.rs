//! `ferry rollout`: start, inspect, promote and roll back canary rollouts.
//!
//! The plan is a file in the repository (`<repo>/<model>/rollout.json`, [`RolloutPlan`]); every server replica
//! polling the repository follows it, splits the model's unversioned traffic by the current step's weight, judges
//! each step's gates and writes the outcome back. These commands only write the plan: `start` a new one,
//! `promote` or `rollback` a running one (an operator's decision, recorded in its history); `status` reads it.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_repo::rollout::{
    now_secs, unversioned_target, RolloutPlan, RolloutState, Route, PLAN_FILE,
};
use ferry_repo::source::Repository;

use crate::cli::parse_duration;

/// Where the model repository is, for commands that read or write it.
#[derive(Debug, Clone, clap::Args)]
pub struct RepositoryFlags {
    /// The model repository: a directory, or `s3://bucket/prefix` (credentials and endpoint from the standard
    /// `AWS_*` variables).
    #[arg(
        long,
        env = "FERRY_MODEL_REPOSITORY",
        value_name = "DIR|s3://BUCKET/PREFIX"
    )]
    pub model_repository: Option<String>,

    /// Where versions fetched from S3 are cached (default: `ferry-cache` in the system's temporary directory).
    #[arg(long, env = "FERRY_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

impl RepositoryFlags {
    /// Opens the repository.
    pub fn open(&self) -> anyhow::Result<Repository> {
        let spec = self
            .model_repository
            .as_deref()
            .context("no model repository: give --model-repository (or FERRY_MODEL_REPOSITORY)")?;
        let cache = self
            .cache_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("ferry-cache"));
        Ok(Repository::open(spec, &cache)?)
    }
}

/// The async runtime the repository calls run on (one thread: these commands make a few calls in a row).
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Parses an error rate: `1%` or the fraction `0.01`.
pub fn parse_rate(text: &str) -> anyhow::Result<f64> {
    let text = text.trim();
    let (number, scale) = match text.strip_suffix('%') {
        Some(n) => (n.trim(), 100.0),
        None => (text, 1.0),
    };
    let rate = number
        .parse::<f64>()
        .map_err(|_| anyhow::anyhow!("`{text}` is not a rate (try 1% or 0.01)"))?
        / scale;
    anyhow::ensure!(
        (0.0..=1.0).contains(&rate),
        "`{text}` is not between 0 and 1 (write 5% or 0.05)"
    );
    Ok(rate)
}

/// Parses one step weight: a percentage, with or without `%`.
fn parse_step(text: &str) -> anyhow::Result<f64> {
    let text = text.trim();
    text.trim_end_matches('%')
        .trim()
        .parse::<f64>()
        .map_err(|_| anyhow::anyhow!("`{text}` is not a percentage (steps look like 5,25,50,100)"))
}

/// A rollout's settings, shared by `ferry rollout start` and `ferry retrain`.
#[derive(Debug, Clone, clap::Args)]
pub struct RolloutFlags {
    /// The candidate's share of unversioned traffic at each step, in percent: increasing, ending at 100.
    #[arg(
        long,
        env = "FERRY_ROLLOUT_STEPS",
        value_delimiter = ',',
        value_parser = parse_step,
        default_value = "5,25,50,100",
        value_name = "PERCENTS"
    )]
    pub steps: Vec<f64>,

    /// How long each step lasts before its gates are judged (`30s`, `5m`).
    #[arg(long, env = "FERRY_ROLLOUT_STEP_INTERVAL", value_parser = parse_duration, default_value = "60s")]
    pub step_interval: Duration,

    /// A step fails (and the rollout rolls back) when the candidate's server-side error rate is above this:
    /// `1%` or `0.01`.
    #[arg(long, env = "FERRY_ROLLOUT_MAX_ERROR_RATE", value_parser = parse_rate, default_value = "1%", value_name = "RATE")]
    pub max_error_rate: f64,

    /// A step fails when the candidate's p99 latency is above the stable version's times this.
    #[arg(
        long,
        env = "FERRY_ROLLOUT_MAX_P99_RATIO",
        default_value_t = 1.5,
        value_name = "RATIO"
    )]
    pub max_p99_ratio: f64,

    /// Requests the candidate must answer in a step before it is judged; a step with fewer is extended.
    #[arg(
        long,
        env = "FERRY_ROLLOUT_MIN_REQUESTS",
        default_value_t = 20,
        value_name = "N"
    )]
    pub min_requests: u64,
}

impl RolloutFlags {
    /// A new running plan from `stable` to `candidate` with these settings.
    pub fn plan(&self, stable: u64, candidate: u64) -> anyhow::Result<RolloutPlan> {
        let mut plan = RolloutPlan::new(
            stable,
            candidate,
            self.steps.clone(),
            self.step_interval,
            self.max_error_rate,
            self.max_p99_ratio,
        )
        .map_err(|e| anyhow::anyhow!("the rollout settings: {e}"))?;
        plan.min_requests = self.min_requests;
        Ok(plan)
    }
}

/// `ferry rollout` subcommands.
#[derive(Debug, clap::Args)]
pub struct RolloutArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: RolloutCommand,
}

/// The rollout commands.
#[derive(Debug, clap::Subcommand)]
pub enum RolloutCommand {
    /// Start a canary rollout: write a plan that servers follow, sending a growing share of the model's
    /// unversioned traffic to `--version` and rolling back by themselves when a gate fails.
    Start(Box<StartArgs>),
    /// Print a model's rollout plan: state, versions, steps, the current step and the history with its figures.
    Status(StatusArgs),
    /// End a running rollout now, sending all unversioned traffic to the candidate.
    Promote(DecideArgs),
    /// End a running rollout now, sending all unversioned traffic back to the stable version.
    Rollback(DecideArgs),
}

/// `ferry rollout start` flags.
#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// The model (a directory of the repository).
    #[arg(value_name = "MODEL")]
    pub model: String,

    /// The candidate version. It may be published after the plan is written: the rollout waits for it to load.
    #[arg(long)]
    pub version: u64,

    /// The version serving now (default: the one a server routes unversioned traffic to, other than --version:
    /// the promoted candidate or, after a rollback, the highest version but the candidate; else the highest).
    #[arg(long)]
    pub stable: Option<u64>,

    /// Replace a rollout that is still running.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub force: bool,

    /// The steps and gates.
    #[command(flatten)]
    pub rollout: RolloutFlags,

    /// The repository.
    #[command(flatten)]
    pub repository: RepositoryFlags,
}

/// `ferry rollout status` flags.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The model.
    #[arg(value_name = "MODEL")]
    pub model: String,

    /// Print the plan as one JSON object (with `current_step` and `current_weight` added).
    #[arg(long, num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub json: bool,

    /// The repository.
    #[command(flatten)]
    pub repository: RepositoryFlags,
}

/// `ferry rollout promote` and `ferry rollout rollback` flags.
#[derive(Debug, clap::Args)]
pub struct DecideArgs {
    /// The model.
    #[arg(value_name = "MODEL")]
    pub model: String,

    /// The repository.
    #[command(flatten)]
    pub repository: RepositoryFlags,
}

/// Runs `ferry rollout`.
pub fn run(args: RolloutArgs) -> anyhow::Result<()> {
    let rt = runtime()?;
    match args.command {
        RolloutCommand::Start(a) => rt.block_on(start(*a)),
        RolloutCommand::Status(a) => rt.block_on(status(a)),
        RolloutCommand::Promote(a) => rt.block_on(decide(a, RolloutState::Promoted)),
        RolloutCommand::Rollback(a) => rt.block_on(decide(a, RolloutState::RolledBack)),
    }
}

/// Reads a model's plan; `None` when it has none.
pub async fn read_plan(repo: &Repository, model: &str) -> anyhow::Result<Option<RolloutPlan>> {
    let Some(bytes) = repo.read_file(model, PLAN_FILE).await? else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&bytes);
    RolloutPlan::parse(&text)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("{model}/{e}"))
}

/// Writes a model's plan.
pub async fn write_plan(repo: &Repository, model: &str, plan: &RolloutPlan) -> anyhow::Result<()> {
    repo.write_file(model, PLAN_FILE, plan.to_json().into_bytes())
        .await
        .with_context(|| format!("writing {model}/{PLAN_FILE}"))
}

/// The version that takes a model's unversioned traffic now, other than `exclude`, as a server following the plan
/// routes it (`ferry_repo::rollout::unversioned_target`, the rule the server routes by): the stable version while a
/// rollout runs, the candidate once promoted (until a version newer than both plan versions exists), and after a
/// rollback the highest version but the candidate; without a plan (or when those versions are gone) the highest
/// version present.
pub fn live_version(
    present: &[u64],
    plan: Option<&RolloutPlan>,
    exclude: Option<u64>,
) -> Option<u64> {
    let usable = |v: u64| Some(v) != exclude && present.contains(&v);
    let route = plan.map(|p| Route {
        candidate: p.candidate,
        stable: p.stable,
        state: p.state,
        to_candidate: false,
    });
    unversioned_target(route, present, usable, usable)
}

/// Refuses to replace a running plan unless forced.
pub fn check_no_running_plan(
    model: &str,
    plan: Option<&RolloutPlan>,
    force: bool,
) -> anyhow::Result<()> {
    if let Some(p) = plan.filter(|p| p.state == RolloutState::Running) {
        if !force {
            bail!(
                "a rollout of {model} is running (version {} from {}): promote or roll it back first, or replace it with --force",
                p.candidate,
                p.stable
            );
        }
    }
    Ok(())
}

/// Steps as a user writes them: `5%, 25%, 50%, 100%`.
pub fn describe_steps(plan: &RolloutPlan) -> String {
    plan.steps
        .iter()
        .map(|w| format!("{w}%"))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn start(args: StartArgs) -> anyhow::Result<()> {
    let repo = args.repository.open()?;
    let model = args.model.as_str();
    let existing = match read_plan(&repo, model).await {
        Ok(p) => p,
        Err(e) if args.force => {
            eprintln!(
                "ferry: replacing an unreadable plan: {}",
                crate::describe(&e)
            );
            None
        }
        Err(e) => return Err(e.context("--force replaces it")),
    };
    check_no_running_plan(model, existing.as_ref(), args.force)?;
    let present = repo.versions(model).await?;
    anyhow::ensure!(
        !present.is_empty(),
        "{model} has no versions in {}",
        repo.describe()
    );
    let stable = match args.stable {
        Some(v) => v,
        None => {
            live_version(&present, existing.as_ref(), Some(args.version)).with_context(|| {
                format!(
                    "{model} has no version other than {} to roll out from (give --stable)",
                    args.version
                )
            })?
        }
    };
    anyhow::ensure!(
        present.contains(&stable),
        "the stable version {stable} of {model} is not in the repository ({})",
        versions_present(&present)
    );
    // A candidate not published yet is a version to come, numbered after those present; a lower number that is
    // missing is a mistake the rollout would wait on for ever.
    anyhow::ensure!(
        present.contains(&args.version) || present.iter().all(|v| *v < args.version),
        "version {} of {model} is not in the repository ({}); a candidate still to be published must be numbered \
         after them",
        args.version,
        versions_present(&present)
    );
    let plan = args.rollout.plan(stable, args.version)?;
    write_plan(&repo, model, &plan).await?;
    println!(
        "started the rollout of {model} version {} (stable {stable}): {} of unversioned traffic, {}s a step",
        plan.candidate,
        describe_steps(&plan),
        plan.step_interval_secs
    );
    if !present.contains(&args.version) {
        println!(
            "version {} of {model} is not in the repository yet: the rollout waits for it to load",
            args.version
        );
    }
    println!("wrote {}/{model}/{PLAN_FILE}", repo.describe());
    Ok(())
}

async fn decide(args: DecideArgs, state: RolloutState) -> anyhow::Result<()> {
    let repo = args.repository.open()?;
    let model = args.model.as_str();
    let mut plan = read_plan(&repo, model)
        .await?
        .with_context(|| format!("{model} has no rollout plan"))?;
    let verb = match state {
        RolloutState::Promoted => "promote",
        _ => "roll back",
    };
    if plan.state != RolloutState::Running {
        bail!(
            "the rollout of {model} (version {} from {}) is already {}: nothing to {verb}",
            plan.candidate,
            plan.stable,
            plan.state.name().replace('_', " ")
        );
    }
    if state == RolloutState::Promoted {
        let present = repo.versions(model).await?;
        anyhow::ensure!(
            present.contains(&plan.candidate),
            "cannot promote {model}: its candidate, version {}, is not in the repository ({}); publish it first, \
             or roll back",
            plan.candidate,
            versions_present(&present)
        );
    }
    plan.finish(state, "by operator".into());
    write_plan(&repo, model, &plan).await?;
    println!(
        "{} {model}: version {} takes all unversioned traffic",
        state.name().replace('_', " "),
        plan.settled_version()
    );
    Ok(())
}

/// "versions present: 1, 2", or "no versions".
fn versions_present(present: &[u64]) -> String {
    if present.is_empty() {
        return "no versions".into();
    }
    let mut sorted = present.to_vec();
    sorted.sort_unstable();
    let list: Vec<String> = sorted.iter().map(u64::to_string).collect();
    format!("versions present: {}", list.join(", "))
}

/// The step a running plan is in by its history (the step after the last one that passed), and since when.
pub fn current_step(plan: &RolloutPlan) -> (usize, u64) {
    let mut step = 0;
    let mut since = plan.created_at;
    for e in &plan.history {
        if e.event == "step_passed" {
            if let Some(s) = e.step {
                step = s + 1;
                since = e.at;
            }
        }
    }
    (step.min(plan.steps.len().saturating_sub(1)), since)
}

/// A Unix time as `YYYY-MM-DD HH:MM:SS` UTC.
fn utc(secs: u64) -> String {
    // Days to a civil date (Howard Hinnant's algorithm).
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn figures(f: &ferry_repo::rollout::ArmFigures) -> String {
    let p99 = f
        .p99_ms
        .map_or("no p99".to_string(), |p| format!("p99 {p} ms"));
    format!(
        "{} requests, {} errors ({:.2}%), {p99}",
        f.requests,
        f.errors,
        f.error_rate() * 100.0
    )
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let repo = args.repository.open()?;
    let model = args.model.as_str();
    let plan = read_plan(&repo, model)
        .await?
        .with_context(|| format!("{model} has no rollout plan in {}", repo.describe()))?;
    let present = repo.versions(model).await?;
    let (step, since) = current_step(&plan);
    let running = plan.state == RolloutState::Running;
    if args.json {
        let mut value = serde_json::to_value(&plan).expect("plans serialize");
        if let Some(object) = value.as_object_mut() {
            object.insert("model".into(), model.into());
            object.insert(
                "candidate_present".into(),
                present.contains(&plan.candidate).into(),
            );
            object.insert(
                "stable_present".into(),
                present.contains(&plan.stable).into(),
            );
            object.insert("settled_version".into(), plan.settled_version().into());
            if running {
                object.insert("current_step".into(), step.into());
                object.insert("current_weight".into(), plan.steps[step].into());
            }
        }
        println!("{value}");
        return Ok(());
    }
    let presence = |v: u64| {
        if present.contains(&v) {
            ""
        } else {
            " (not in the repository yet)"
        }
    };
    let mut out = String::new();
    _ = writeln!(out, "model      {model}");
    _ = writeln!(out, "state      {}", plan.state.name());
    _ = writeln!(
        out,
        "candidate  {}{}",
        plan.candidate,
        presence(plan.candidate)
    );
    _ = writeln!(out, "stable     {}{}", plan.stable, presence(plan.stable));
    _ = writeln!(
        out,
        "steps      {} of unversioned traffic, {}s a step",
        describe_steps(&plan),
        plan.step_interval_secs
    );
    _ = writeln!(
        out,
        "gates      error rate at most {:.2}%, p99 at most {}x the stable version's, judged after {} candidate requests",
        plan.max_error_rate * 100.0,
        plan.max_p99_ratio,
        plan.min_requests
    );
    if running {
        let elapsed = now_secs().saturating_sub(since);
        _ = writeln!(
            out,
            "now        step {} of {} ({}% to the candidate), for {elapsed}s",
            step + 1,
            plan.steps.len(),
            plan.steps[step]
        );
    } else {
        _ = writeln!(
            out,
            "now        version {} takes all unversioned traffic",
            plan.settled_version()
        );
    }
    _ = writeln!(out, "history");
    for e in &plan.history {
        let mut line = format!("  {}  {}", utc(e.at), e.event);
        if let Some(s) = e.step {
            _ = write!(line, "  step {}", s + 1);
        }
        if let Some(w) = e.weight {
            _ = write!(line, " at {w}%");
        }
        if let Some(c) = &e.candidate {
            _ = write!(line, "  candidate: {}", figures(c));
        }
        if let Some(s) = &e.stable {
            _ = write!(line, "; stable: {}", figures(s));
        }
        if !e.reason.is_empty() {
            _ = write!(line, "  ({})", e.reason);
        }
        _ = writeln!(out, "{line}");
    }
    print!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(stable: u64, candidate: u64, state: RolloutState) -> RolloutPlan {
        let mut p = RolloutPlan::new(
            stable,
            candidate,
            vec![50.0, 100.0],
            Duration::from_secs(1),
            0.01,
            1.5,
        )
        .unwrap();
        if state != RolloutState::Running {
            p.finish(state, "test".into());
        }
        p
    }

    #[test]
    fn the_live_version_follows_the_plan_until_a_newer_version_appears() {
        assert_eq!(live_version(&[1, 2, 3], None, None), Some(3));
        assert_eq!(live_version(&[1, 2, 3], None, Some(3)), Some(2));
        assert_eq!(live_version(&[], None, None), None);
        // After a rollback the candidate is left out, whatever was published since.
        let back = plan(1, 2, RolloutState::RolledBack);
        assert_eq!(live_version(&[1, 2], Some(&back), None), Some(1));
        assert_eq!(live_version(&[1, 2, 3], Some(&back), None), Some(3));
        assert_eq!(live_version(&[1, 2, 3], Some(&back), Some(3)), Some(1));
        assert_eq!(live_version(&[2], Some(&back), None), None);
        // A promoted candidate keeps the traffic until a version newer than both plan versions appears; gone, the
        // highest present serves.
        let promoted = plan(1, 2, RolloutState::Promoted);
        assert_eq!(live_version(&[1, 2], Some(&promoted), None), Some(2));
        assert_eq!(live_version(&[1, 2, 3], Some(&promoted), None), Some(3));
        let promoted_older = plan(3, 2, RolloutState::Promoted);
        assert_eq!(
            live_version(&[1, 2, 3], Some(&promoted_older), None),
            Some(2)
        );
        assert_eq!(live_version(&[1, 2], Some(&promoted), Some(2)), Some(1));
        assert_eq!(live_version(&[1, 3], Some(&promoted), None), Some(3));
        let running = plan(1, 2, RolloutState::Running);
        assert_eq!(live_version(&[1, 2, 3], Some(&running), None), Some(1));
    }

    #[test]
    fn rates_steps_and_times() {
        assert_eq!(parse_rate("1%").unwrap(), 0.01);
        assert_eq!(parse_rate("0.01").unwrap(), 0.01);
        assert_eq!(parse_rate(" 2.5 % ").unwrap(), 0.025);
        assert!(parse_rate("5").is_err());
        assert!(parse_rate("lots").is_err());
        assert_eq!(parse_step("25%").unwrap(), 25.0);
        assert!(parse_step("x").is_err());
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400 + 3_723), "2000-02-29 01:02:03");
    }

    #[test]
    fn the_current_step_comes_from_the_history() {
        let mut p = plan(1, 2, RolloutState::Running);
        assert_eq!(current_step(&p).0, 0);
        p.record(
            "step_passed",
            Some(0),
            Some(50.0),
            None,
            None,
            String::new(),
        );
        assert_eq!(current_step(&p).0, 1);
        p.record(
            "step_passed",
            Some(1),
            Some(100.0),
            None,
            None,
            String::new(),
        );
        assert_eq!(current_step(&p).0, 1, "never past the last step");
    }
}
