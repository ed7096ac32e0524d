//! `ferry`: the single binary. Parses the command line (flags < env < config file merged in [`config`]),
//! sets up logging, and runs the chosen subcommand.
// Doc comments on clap's arguments are the `--help` text users read, where `[redacted]` and `[data]` are literal
// brackets, not links.
#![allow(rustdoc::broken_intra_doc_links)]

mod allocator;
mod baseline;
mod bench;
mod cli;
mod config;
mod evaluate;
mod import;
mod optimize;
mod retrain;
mod rollout;
mod sign;
mod telemetry;
mod top;
mod train;

use std::process::ExitCode;

use anyhow::Context;

/// mimalloc instead of glibc malloc (see Cargo.toml): measured with `bench/serving/run.py`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let command = match config::parse(std::env::args_os().collect()) {
        Ok(c) => c,
        Err(config::ConfigError::Clap(e)) => e.exit(),
        Err(e) => {
            eprintln!("ferry: {e}");
            // EX_USAGE, as linkerd does for a bad configuration.
            return ExitCode::from(64);
        }
    };
    match run(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: {}", describe(&e));
            if e.downcast_ref::<retrain::Refused>().is_some() {
                ExitCode::from(retrain::EXIT_REFUSED)
            } else if e.downcast_ref::<BadServeConfig>().is_some() {
                ExitCode::from(64)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// `ferry serve` flags that cannot work together, found before any port is bound or model loaded: exit status 64
/// (EX_USAGE), as for a bad configuration file.
#[derive(Debug)]
struct BadServeConfig;

impl std::fmt::Display for BadServeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("checking the serve configuration")
    }
}

/// An error and its causes as `anyhow`'s `{:#}` joins them, but a cause whose text the message before it already
/// ends with (an error type that prints its source too, as `TrainError` and the engine's do) is not
/// repeated; the continuation lines of a multi-line message (ONNX Runtime's) are indented under it.
pub fn describe(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        let text = text.trim();
        if text.is_empty() || parts.last().is_some_and(|before| before.ends_with(text)) {
            continue;
        }
        parts.push(text.to_string());
    }
    parts
        .join(": ")
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n  ")
}

fn run(command: cli::Command) -> anyhow::Result<()> {
    match command {
        cli::Command::Train(args) => train::run(args),
        cli::Command::Evaluate(args) => evaluate::run(args),
        cli::Command::Optimize(args) => optimize::run(args),
        cli::Command::Bench(args) => bench::run(args),
        cli::Command::Baseline(args) => baseline::run(args),
        cli::Command::Rollout(args) => rollout::run(args),
        cli::Command::Retrain(args) => retrain::run(*args),
        cli::Command::Sign(args) => sign::run(args),
        cli::Command::Import(args) => import::run(args),
        cli::Command::Top(args) => top::run(args),
        cli::Command::Serve(args) => {
            let restart_failed = allocator::restart_with_settings();
            telemetry::init(args.log_format, &args.log_level).context("setting up logging")?;
            if let Some(why) = restart_failed {
                tracing::warn!(%why, "serving with the allocators' default settings: memory may stay resident after large requests");
            }
            let config = (*args).into_config().context(BadServeConfig)?;
            tracing::info!(?config, "effective configuration");
            let engine = ferry_engine::OrtEngine::init(config.onnxruntime_lib.as_deref());
            if let Err(e) = &engine {
                // A build with tract can serve without ONNX Runtime; a build without it cannot serve at all.
                anyhow::ensure!(
                    cfg!(feature = "tract"),
                    "starting the inference engine: {e}"
                );
                tracing::warn!(error = %e, "ONNX Runtime is not available: models with engine = \"auto\" use tract");
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let grace = config.shutdown_grace_period;
            let result = runtime.block_on(async move {
                let server = ferry_server::Server::start(config, engine)
                    .await
                    .context("starting the server")?;
                server
                    .run(ferry_server::shutdown_signal())
                    .await
                    .context("serving")
            });
            // Inference still running on blocking threads gets the grace period, not forever.
            runtime.shutdown_timeout(grace);
            result
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct PrintsItsSource(std::io::Error);

    impl std::fmt::Display for PrintsItsSource {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "data.csv: {}", self.0)
        }
    }

    impl std::error::Error for PrintsItsSource {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn causes_are_printed_once_and_multi_line_messages_indented() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let e = anyhow::Error::new(PrintsItsSource(io)).context("loading");
        assert_eq!(describe(&e), "loading: data.csv: No such file");
        let e = anyhow::anyhow!("Load model failed:\nIn Node Gemm\n\nbad input  \n")
            .context("evaluating");
        assert_eq!(
            describe(&e),
            "evaluating: Load model failed:\n  In Node Gemm\n  bad input"
        );
        // A cause is dropped only when the message ends with it, not merely contains it.
        let e = anyhow::anyhow!("model").context("reading the model file");
        assert_eq!(describe(&e), "reading the model file: model");
    }
}
