//! The canary controller: every tick, each running rollout's step is judged by its gates (the candidate's error rate
//! and p99 against the stable version's, once the candidate answered enough requests), and the decision (step passed,
//! extended, promoted, rolled back) is written to the model's `rollout.json`, the plan every replica follows
//! (`ferry_repo::rollout` holds the plan, its gates and the routing rule; this file only runs them). Another
//! writer's finished state wins over this replica's.

use std::sync::Arc;
use std::time::Duration;

use crate::core::reload::Manager;
use crate::core::repository::VersionState;
use crate::core::rollout::{RolloutPlan, RolloutState, Tick, PLAN_FILE};

impl Manager {
    /// Runs the canary controller every `every` until `stop` turns true.
    pub async fn run_rollouts(
        self: Arc<Self>,
        every: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        while super::sleep_unless_stopped(every, &mut stop).await {
            self.rollout_tick().await;
        }
    }

    /// One pass of the canary controller over every running rollout.
    pub async fn rollout_tick(&self) {
        for name in self.store.model_names() {
            let Some((live, ready)) = self
                .store
                .with_model(&name, |r| {
                    r.rollout.clone().map(|live| {
                        let plan = live.plan();
                        let ready = |v: u64| {
                            r.versions
                                .get(&v)
                                .is_some_and(|s| s.state == VersionState::Ready)
                        };
                        (live, ready(plan.candidate) && ready(plan.stable))
                    })
                })
                .flatten()
            else {
                continue;
            };
            let plan = live.plan();
            if plan.state != RolloutState::Running {
                continue;
            }
            if !ready {
                live.hold();
                continue;
            }
            let tick = live.tick();
            if tick == Tick::Wait {
                continue;
            }
            let plan = live.plan();
            let last = plan.history.last().cloned();
            match &tick {
                Tick::Finished(RolloutState::Promoted) => {
                    tracing::info!(model = %name, candidate = plan.candidate, "rollout promoted: every step passed its gates")
                }
                Tick::Finished(_) => tracing::warn!(
                    model = %name,
                    candidate = plan.candidate,
                    stable = plan.stable,
                    reason = last.as_ref().map_or("", |e| e.reason.as_str()),
                    "rollout rolled back"
                ),
                Tick::Advanced => tracing::info!(
                    model = %name,
                    candidate = plan.candidate,
                    weight = live.weight(),
                    "rollout step passed; candidate weight raised"
                ),
                _ => {
                    tracing::info!(model = %name, candidate = plan.candidate, "rollout step extended: too little candidate traffic")
                }
            }
            if let Tick::Finished(state) = tick {
                self.metrics.rollout_decision(&name, state.name());
            } else if tick == Tick::Advanced {
                self.metrics.rollout_decision(&name, "step_passed");
            }
            // The plan file is the shared truth: write the decision so other replicas (and `ferry rollout status`)
            // follow. Another writer's finished state wins over ours.
            let stored = match self.repo.read_file(&name, PLAN_FILE).await {
                Ok(Some(bytes)) => RolloutPlan::parse(&String::from_utf8_lossy(&bytes)).ok(),
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(model = %name, error = %e, "cannot read the rollout plan");
                    None
                }
            };
            if let Some(stored) = &stored {
                if !live.same_rollout(stored) {
                    // A new plan replaced this one; the next poll picks it up.
                    continue;
                }
                if stored.state != RolloutState::Running {
                    live.adopt(stored.clone());
                    continue;
                }
            }
            let merged = live.merged_with(stored.as_ref());
            if let Err(e) = self
                .repo
                .write_file(&name, PLAN_FILE, merged.to_json().into_bytes())
                .await
            {
                tracing::warn!(model = %name, error = %e, "cannot write the rollout plan");
            }
        }
    }
}
