//! The core: the model repository and what serves from it. Sources (a local directory or S3), signatures and
//! integrity, loading and reloading versions, rollouts and their gates, per-version batching, warm-up, the payload
//! log, and [`infer::Infer`], whose [`infer::Call`] is the one entry point of every protocol adapter.
//!
//! The core knows no protocol, listener or route: it uses only [`crate::error`], [`crate::codec`] and
//! [`crate::metrics`].

pub mod batching;
pub mod infer;
pub mod integrity;
pub mod llm;
pub mod model_config;
pub mod payload_log;
pub mod reload;
pub mod repository;
pub mod rollout;
pub mod source;
pub mod text;
pub mod warmup;

use std::time::Duration;

/// Sleeps `period`; `false` (at once) when `stop` turns true first. The loop of every periodic task.
pub async fn sleep_unless_stopped(
    period: Duration,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        () = tokio::time::sleep(period) => true,
        () = stopped(stop) => false,
    }
}

/// Completes once `stop` turns true (without holding the channel's lock across an await).
pub async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
