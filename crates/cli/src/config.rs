//! Merging the configuration file under the environment and flags, without touching the process environment.
//!
//! clap already gives flags precedence over environment variables. For each key of the file's table named after the
//! command (`[serve]` for `ferry serve`) whose flag was set neither on the command line nor in the environment, we add
//! `--key=value` to the arguments and parse again, so the file only fills what nothing else set.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};

use crate::cli::{Cli, Command};

/// Why the configuration could not be read.
#[derive(Debug)]
pub enum ConfigError {
    /// A command-line problem (also `--help` and `--version`), reported by clap itself.
    Clap(clap::Error),
    /// A problem in the configuration file.
    File(String),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Clap(e) => write!(f, "{e}"),
            ConfigError::File(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Parses the command line, filling unset flags from the `--config` file (and, for `ferry retrain`, from its
/// `--pipeline` file first).
pub fn parse(args: Vec<OsString>) -> Result<Command, ConfigError> {
    let mut args = args;
    let mut matches = Cli::command()
        .try_get_matches_from(&args)
        .map_err(ConfigError::Clap)?;
    let config = Cli::from_arg_matches(&matches)
        .map_err(ConfigError::Clap)?
        .config;
    let mut pipeline_done = false;
    if let Some(path) = pipeline_path(&matches) {
        (args, matches) = merge(args, &matches, &path, pipeline_args)?;
        pipeline_done = true;
    }
    if let Some(path) = config {
        (args, matches) = merge(args, &matches, &path, file_args)?;
    }
    // A pipeline file named in the configuration file.
    if !pipeline_done {
        if let Some(path) = pipeline_path(&matches) {
            (_, matches) = merge(args, &matches, &path, pipeline_args)?;
        }
    }
    Cli::from_arg_matches(&matches)
        .map(|c| c.command)
        .map_err(ConfigError::Clap)
}

/// Reads the flags a file gives (only those nothing else set).
type FileArgs = fn(&std::path::Path, &str, &clap::ArgMatches) -> Result<Vec<OsString>, ConfigError>;

/// Adds the flags `file` gives for unset arguments right after the subcommand name (flags from the command line
/// still follow) and parses again.
fn merge(
    args: Vec<OsString>,
    matches: &clap::ArgMatches,
    path: &std::path::Path,
    file: FileArgs,
) -> Result<(Vec<OsString>, clap::ArgMatches), ConfigError> {
    let (sub_name, sub_matches) = matches.subcommand().expect("clap requires a subcommand");
    let extra = file(path, sub_name, sub_matches)?;
    if extra.is_empty() {
        return Ok((args, matches.clone()));
    }
    let position = subcommand_position(&args, sub_name) + 1;
    let mut merged = args[..position].to_vec();
    merged.extend(extra);
    merged.extend_from_slice(&args[position..]);
    let matches = Cli::command().try_get_matches_from(&merged).map_err(|e| {
        ConfigError::File(format!(
            "in {}: {}",
            path.display(),
            e.to_string().trim_start_matches("error: ").trim_end()
        ))
    })?;
    Ok((merged, matches))
}

/// The `--pipeline` file of a `ferry retrain` command line.
fn pipeline_path(matches: &clap::ArgMatches) -> Option<PathBuf> {
    match matches.subcommand() {
        Some(("retrain", sub)) => sub.get_one::<PathBuf>("pipeline").cloned(),
        _ => None,
    }
}

/// Whether nothing (flag or environment) set the argument `id`.
fn unset(sub_matches: &clap::ArgMatches, id: &str) -> bool {
    matches!(
        sub_matches.value_source(id),
        None | Some(ValueSource::DefaultValue)
    )
}

/// The tables a pipeline file may group its keys in.
const PIPELINE_TABLES: [&str; 5] = ["data", "train", "gate", "rollout", "repository"];

/// Pipeline keys that name files (resolved against the pipeline file's directory when relative).
const PIPELINE_PATHS: [&str; 6] = [
    "data",
    "payload_log",
    "labels",
    "model_repository",
    "cache_dir",
    "onnxruntime_lib",
];

/// The arguments a `ferry retrain --pipeline` file gives: its keys (at the top or in [`PIPELINE_TABLES`]) are the
/// flags' names; lists become comma-separated values; `model_name` is the MODEL argument. Only arguments nothing
/// else set are taken, and the data keys go together: a command line naming `--payload-log` ignores the file's
/// `data`, and the other way round.
fn pipeline_args(
    path: &std::path::Path,
    sub_name: &str,
    sub_matches: &clap::ArgMatches,
) -> Result<Vec<OsString>, ConfigError> {
    let fail = |m: String| ConfigError::File(format!("pipeline file {}: {m}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| fail(syntax(&e, &text)))?;
    let mut keys: Vec<(String, toml::Value)> = Vec::new();
    for (key, value) in table {
        match value {
            toml::Value::Table(inner) => {
                if !PIPELINE_TABLES.contains(&key.as_str()) {
                    return Err(fail(format!(
                        "unknown table [{key}] (expected keys at the top, or in [{}])",
                        PIPELINE_TABLES.join("], [")
                    )));
                }
                keys.extend(inner.into_iter().map(|(k, v)| (format!("{key}.{k}"), v)));
            }
            other => keys.push((key, other)),
        }
    }
    let command = Cli::command();
    let sub = command
        .find_subcommand(sub_name)
        .expect("parsed subcommand exists");
    let base = path.parent().unwrap_or(std::path::Path::new(""));
    let data_given = !unset(sub_matches, "data");
    let payload_given = !unset(sub_matches, "payload_log") || !unset(sub_matches, "labels");
    let mut seen = std::collections::HashSet::new();
    let mut extra = Vec::new();
    for (full_key, value) in keys {
        let key = full_key.rsplit('.').next().unwrap_or(&full_key);
        let id = key.replace('-', "_");
        if !seen.insert(id.clone()) {
            return Err(fail(format!("`{full_key}` is given twice")));
        }
        let Some(arg) = sub
            .get_arguments()
            .find(|a| a.get_id().as_str() == id && id != "pipeline")
        else {
            return Err(fail(format!("unknown key `{full_key}`")));
        };
        let skip = !unset(sub_matches, &id)
            || (id == "data" && payload_given)
            || ((id == "payload_log" || id == "labels") && data_given);
        if skip {
            continue;
        }
        let scalar = |v: &toml::Value| -> Result<String, ConfigError> {
            let text = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(fail(format!(
                        "`{full_key}` must be a string, number, boolean or a list of them, not {}",
                        other.type_str()
                    )))
                }
            };
            Ok(
                if PIPELINE_PATHS.contains(&id.as_str()) && !text.contains("://") {
                    base.join(&text).display().to_string()
                } else {
                    text
                },
            )
        };
        let text = match &value {
            toml::Value::Array(items) => items
                .iter()
                .map(scalar)
                .collect::<Result<Vec<_>, _>>()?
                .join(","),
            other => scalar(other)?,
        };
        match arg.get_long() {
            Some(long) => extra.push(OsString::from(format!("--{long}={text}"))),
            None if !text.starts_with('-') => extra.push(OsString::from(text)),
            None => return Err(fail(format!("`{full_key}` cannot start with `-`"))),
        }
    }
    Ok(extra)
}

/// A TOML syntax error with its line and column.
fn syntax(e: &toml::de::Error, text: &str) -> String {
    e.message().trim_end().to_string() + &ferry_repo::toml_error_position(e, text)
}

/// Where the subcommand's name stands among the arguments: the first argument equal to it that is not the value of
/// the global `--config` option (`ferry --config serve serve` names a file called `serve`).
fn subcommand_position(args: &[OsString], sub_name: &str) -> usize {
    let mut skip_next = false;
    for (i, a) in args.iter().enumerate().skip(1) {
        if skip_next {
            skip_next = false;
            continue;
        }
        if a == "--config" {
            skip_next = true;
        } else if a == sub_name {
            return i;
        }
    }
    unreachable!("clap parsed `{sub_name}` as the subcommand, so it is among the arguments")
}

fn file_args(
    path: &std::path::Path,
    sub_name: &str,
    sub_matches: &clap::ArgMatches,
) -> Result<Vec<OsString>, ConfigError> {
    let fail = |m: String| ConfigError::File(format!("config file {}: {m}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| fail(syntax(&e, &text)))?;
    for key in table.keys() {
        if key != sub_name {
            return Err(fail(format!(
                "unknown section `{key}` (expected [{sub_name}])"
            )));
        }
    }
    let Some(section) = table.get(sub_name) else {
        return Ok(Vec::new());
    };
    let toml::Value::Table(section) = section else {
        return Err(fail(format!("`{sub_name}` must be a table")));
    };
    let command = Cli::command();
    let sub = command
        .find_subcommand(sub_name)
        .expect("parsed subcommand exists");
    let mut extra = Vec::new();
    for (key, value) in section {
        let id = key.replace('-', "_");
        let Some(arg) = sub
            .get_arguments()
            .find(|a| a.get_id().as_str() == id && a.get_long().is_some())
        else {
            return Err(fail(format!("unknown key `{sub_name}.{key}`")));
        };
        let from_default = matches!(
            sub_matches.value_source(&id),
            None | Some(ValueSource::DefaultValue)
        );
        if !from_default {
            continue;
        }
        let text = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => {
                return Err(fail(format!(
                    "`{sub_name}.{key}` must be a string, number or boolean, not {}",
                    other.type_str()
                )))
            }
        };
        extra.push(OsString::from(format!(
            "--{}={text}",
            arg.get_long().expect("filtered on long flags")
        )));
    }
    Ok(extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    fn serve(list: &[&str]) -> Result<crate::cli::ServeArgs, ConfigError> {
        parse(args(list)).map(|c| match c {
            Command::Serve(s) => *s,
            other => panic!("expected `serve`, parsed {other:?}"),
        })
    }

    fn file(text: &str) -> tempfile_path::Path {
        tempfile_path::Path::with(text)
    }

    mod tempfile_path {
        pub struct Path(pub std::path::PathBuf);
        impl Path {
            pub fn with(text: &str) -> Path {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let p = std::env::temp_dir()
                    .join(format!("ferry-config-test-{}-{n}.toml", std::process::id()));
                std::fs::write(&p, text).unwrap();
                Path(p)
            }
            pub fn arg(&self) -> String {
                self.0.display().to_string()
            }
        }
        impl Drop for Path {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn file_fills_what_flags_leave_unset() {
        let f = file("[serve]\nrest_port = 9000\nhost = \"127.0.0.1\"\nmax-request-bytes = 10\n");
        let s = serve(&[
            "ferry",
            "--config",
            &f.arg(),
            "serve",
            "--model-repository",
            "m",
            "--rest-port",
            "9100",
        ])
        .unwrap();
        assert_eq!(s.rest_port, 9100, "a flag beats the file");
        assert_eq!(s.host.to_string(), "127.0.0.1");
        assert_eq!(s.max_request_bytes, 10);
    }

    /// The error `ferry --config FILE serve` gives for a file holding `text`.
    fn file_error(text: &str) -> String {
        let f = file(text);
        serve(&[
            "ferry",
            "--config",
            &f.arg(),
            "serve",
            "--model-repository",
            "m",
        ])
        .unwrap_err()
        .to_string()
    }

    #[test]
    fn bad_files_name_the_key() {
        let e = file_error("[serve]\nrest_prot = 9000\n");
        assert!(e.contains("unknown key `serve.rest_prot`"), "{e}");
        let e = file_error("[serve]\nrest_port = \"high\"\n");
        assert!(e.contains("--rest-port"), "{e}");
        let e = file_error("[serve\n");
        assert!(e.starts_with("config file"), "{e}");
        let e = file_error("[serve]\nrest_port = 9000\nhost = localhost\n");
        assert!(e.ends_with("(line 3, column 8)"), "{e}");
    }

    #[test]
    fn a_config_file_named_like_the_subcommand_is_not_the_subcommand() {
        assert_eq!(
            subcommand_position(&args(&["ferry", "--config", "serve", "serve"]), "serve"),
            3
        );
        assert_eq!(
            subcommand_position(&args(&["ferry", "serve", "--config", "x"]), "serve"),
            1
        );
    }

    fn retrain(list: &[&str]) -> Result<crate::retrain::RetrainArgs, ConfigError> {
        parse(args(list)).map(|c| match c {
            Command::Retrain(r) => *r,
            other => panic!("expected `retrain`, parsed {other:?}"),
        })
    }

    #[test]
    fn a_pipeline_file_fills_retrain_flags_from_its_tables() {
        let f = file(concat!(
            "model_name = \"iris\"\n",
            "[data]\ndata = \"new.csv\"\nholdout-fraction = 0.3\n",
            "[train]\nmodel = \"mlp\"\nhidden = [16, 8]\n",
            "[gate]\nmin_improvement = -0.01\n",
            "[rollout]\nsteps = [10, 100]\nmax_error_rate = \"2%\"\nstep_interval = \"30s\"\n",
            "[repository]\nmodel_repository = \"s3://bucket/models\"\n",
        ));
        let dir = f.0.parent().unwrap().to_path_buf();
        let r = retrain(&[
            "ferry",
            "retrain",
            "--pipeline",
            &f.arg(),
            "--steps",
            "50,100",
        ])
        .unwrap();
        assert_eq!(r.model_name.as_deref(), Some("iris"));
        assert_eq!(r.data, Some(dir.join("new.csv")), "relative to the file");
        assert_eq!(r.holdout_fraction, 0.3);
        assert_eq!(r.settings.hidden, Some(vec![16, 8]));
        assert_eq!(r.min_improvement, -0.01);
        assert_eq!(r.rollout.steps, vec![50.0, 100.0], "a flag beats the file");
        assert_eq!(r.rollout.max_error_rate, 0.02);
        assert_eq!(r.rollout.step_interval, std::time::Duration::from_secs(30));
        assert_eq!(
            r.repository.model_repository.as_deref(),
            Some("s3://bucket/models")
        );
        // Payload logs on the command line replace the file's CSV rather than conflict with it.
        let r = retrain(&[
            "ferry",
            "retrain",
            "other",
            "--pipeline",
            &f.arg(),
            "--payload-log",
            "p.jsonl",
            "--labels",
            "l.csv",
        ])
        .unwrap();
        assert_eq!(r.data, None);
        assert_eq!(r.model_name.as_deref(), Some("other"));
        let bad = file("[model]\nmodel = \"mlp\"\n");
        let e = retrain(&["ferry", "retrain", "--pipeline", &bad.arg()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown table [model]"), "{e}");
        let twice = file("seed = 1\n[train]\nseed = 2\n");
        let e = retrain(&["ferry", "retrain", "--pipeline", &twice.arg()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("given twice"), "{e}");
        let broken = file("[train]\nseed = 1\nmodel = mlp\n");
        let e = retrain(&["ferry", "retrain", "--pipeline", &broken.arg()])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("pipeline file") && e.ends_with("(line 3, column 9)"),
            "{e}"
        );
    }

    #[test]
    fn durations() {
        use crate::cli::parse_duration;
        use std::time::Duration;
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("3h").is_err());
        assert!(parse_duration("fast").is_err());
        use crate::cli::parse_duration_or_zero;
        for zero in ["0", "0s", "0ms", "0.0s"] {
            assert_eq!(
                parse_duration_or_zero(zero).unwrap(),
                Duration::ZERO,
                "{zero}"
            );
        }
        assert_eq!(
            parse_duration_or_zero("2s").unwrap(),
            Duration::from_secs(2)
        );
        assert!(parse_duration_or_zero("0h").is_err());
        assert!(parse_duration_or_zero("-1s").is_err());
        assert!(parse_duration("99999999999999999999m").is_err());
    }
}
