//! `ferry`: the single binary. Parses the command line (flags < env < config file merged in [`config`]),
//! sets up logging, and runs the chosen subcommand.

mod baseline;
mod bench;
mod cli;
mod config;
mod evaluate;
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
            eprintln!("ferry: {e:#}");
            if e.downcast_ref::<retrain::Refused>().is_some() {
                ExitCode::from(retrain::EXIT_REFUSED)
            } else {
                ExitCode::from(1)
            }
        }
    }
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
        cli::Command::Top(args) => top::run(args),
        cli::Command::Serve(args) => {
            telemetry::init(args.log_format, &args.log_level).context("setting up logging")?;
            let config = (*args)
                .into_config()
                .context("checking the serve configuration")?;
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
