//! The core: the model repository and what serves from it. Loading and reloading versions, following their rollouts,
//! per-version batching, warm-up, the payload log, and [`infer::Infer`], whose [`infer::Call`] is the one entry
//! point of every protocol adapter. Sources (a local directory or S3), signatures and rollout plans are `ferry-repo`'s,
//! re-exported here.
//!
//! The core knows no protocol, listener or route: it uses only [`crate::error`], [`crate::codec`] and
//! [`crate::metrics`].

pub mod batching;
pub mod canary;
pub mod explain;
pub mod infer;
pub mod llm;
pub mod model_config;
pub mod payload_log;
pub mod reconcile;
pub mod reload;
pub mod repository;
pub mod text;
pub mod warmup;

// The repository as files lives in `ferry-repo`, shared with the command line; re-exported at the paths the core
// has always used.
pub use ferry_repo::{integrity, rollout, source};

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
