//! Merging the configuration file under the environment and flags, without touching the process environment.
//!
//! clap already gives flags precedence over environment variables. For each key of the file's `[serve]` table
//! whose flag was set neither on the command line nor in the environment, we add `--key=value` to the arguments
//! and parse again, so the file only fills what nothing else set.

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

/// Parses the command line, filling unset flags from the `--config` file.
pub fn parse(args: Vec<OsString>) -> Result<Command, ConfigError> {
    let matches = Cli::command()
        .try_get_matches_from(&args)
        .map_err(ConfigError::Clap)?;
    let cli = Cli::from_arg_matches(&matches).map_err(ConfigError::Clap)?;
    let Some(path) = cli.config.clone() else {
        return Ok(cli.command);
    };
    let (sub_name, sub_matches) = matches.subcommand().expect("clap requires a subcommand");
    let extra = file_args(&path, sub_name, sub_matches)?;
    if extra.is_empty() {
        return Ok(cli.command);
    }
    // Insert the file's flags right after the subcommand name; flags from the command line still follow.
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
    Cli::from_arg_matches(&matches)
        .map(|c| c.command)
        .map_err(ConfigError::Clap)
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
    path: &PathBuf,
    sub_name: &str,
    sub_matches: &clap::ArgMatches,
) -> Result<Vec<OsString>, ConfigError> {
    let fail = |m: String| ConfigError::File(format!("config file {}: {m}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| fail(e.message().to_string()))?;
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
            Command::Serve(s) => s,
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
        assert!(parse_duration("99999999999999999999m").is_err());
    }
}
