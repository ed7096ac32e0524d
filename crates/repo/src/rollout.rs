//! Canary rollouts: the plan stored in the repository (`<root>/<model>/rollout.json`) and the traffic split and
//! gates every replica applies to it.
//!
//! The plan is the shared truth: `ferry rollout start` (or `ferry retrain`) writes it, each server replica reads it
//! when it polls the repository, splits the model's unversioned traffic between the stable and the candidate
//! version by the current step's weight, and judges each step by comparing the candidate's error rate and p99 with
//! the stable version's over that step. A replica that sees a gate fail writes `rolled_back`; one that finishes the
//! last step writes `promoted`; the others follow the file.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The name of the plan file in a model's directory.
pub const PLAN_FILE: &str = "rollout.json";

/// Why a rollout plan (from flags or from `rollout.json`) is refused.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A version 0.
    #[error("versions are positive integers")]
    ZeroVersion,
    /// The candidate is the stable version.
    #[error("the candidate and the stable version are both {0}")]
    SameVersion(u64),
    /// No steps.
    #[error("a rollout needs at least one step")]
    NoSteps,
    /// A step weight outside (0, 100].
    #[error("step weights are percentages above 0, at most 100")]
    WeightOutOfRange,
    /// Step weights that do not increase.
    #[error("step weights must increase")]
    WeightsNotIncreasing,
    /// A last step below 100.
    #[error("the last step must be 100 (the candidate takes all traffic)")]
    LastStepNotFull,
    /// `min_requests` of 0.
    #[error("min_requests must be at least 1 (a step is judged on evidence)")]
    NoMinRequests,
    /// A step interval that is not a positive number of seconds.
    #[error("the step interval must be positive")]
    StepInterval,
    /// A maximum error rate outside [0, 1].
    #[error("the maximum error rate is a fraction between 0 and 1")]
    MaxErrorRate,
    /// A maximum p99 ratio below 1.
    #[error("the maximum p99 ratio must be at least 1")]
    MaxP99Ratio,
    /// `rollout.json` is not the JSON of a plan.
    #[error("{PLAN_FILE}: {0}")]
    Json(#[source] serde_json::Error),
    /// `rollout.json` holds a plan whose settings are refused.
    #[error("{PLAN_FILE}: {0}")]
    InFile(#[source] Box<PlanError>),
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Splitting traffic step by step.
    Running,
    /// Every step passed (or an operator promoted it): the candidate takes all unversioned traffic.
    Promoted,
    /// A gate failed (or an operator rolled it back): the stable version takes all unversioned traffic.
    RolledBack,
}

impl RolloutState {
    /// The name used in status output and metrics.
    pub fn name(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Promoted => "promoted",
            RolloutState::RolledBack => "rolled_back",
        }
    }
}

/// One arm's figures over a step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ArmFigures {
    /// Requests answered.
    pub requests: u64,
    /// Of those, server-side failures (engine errors, timeouts, unavailability).
    pub errors: u64,
    /// The 99th percentile latency in milliseconds (an upper bucket bound), when there were requests.
    pub p99_ms: Option<f64>,
}

impl ArmFigures {
    /// Errors over requests (0 without requests).
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }
}

/// One entry of a plan's history: what happened, when, and the figures behind a gate decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutEvent {
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// What happened (`started`, `step_passed`, `step_extended`, `promoted`, `rolled_back`).
    pub event: String,
    /// The step index it concerns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<usize>,
    /// The candidate's traffic share in percent during that step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    /// The candidate's figures over the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<ArmFigures>,
    /// The stable version's figures over the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable: Option<ArmFigures>,
    /// Why (for decisions), or who (for operator actions).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// A canary rollout of one model, as stored in `<root>/<model>/rollout.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutPlan {
    /// The version being rolled out.
    pub candidate: u64,
    /// The version serving before the rollout.
    pub stable: u64,
    /// The candidate's share of unversioned traffic at each step, in percent, increasing, the last one 100.
    pub steps: Vec<f64>,
    /// How long each step lasts, in seconds.
    pub step_interval_secs: f64,
    /// A step fails when the candidate's error rate exceeds this (0.01 is 1%).
    pub max_error_rate: f64,
    /// A step fails when the candidate's p99 exceeds the stable version's times this.
    pub max_p99_ratio: f64,
    /// Requests the candidate must have answered in a step before it is judged; a step with fewer is extended.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    /// Where it stands.
    pub state: RolloutState,
    /// When it was written first (seconds since the Unix epoch).
    pub created_at: u64,
    /// What happened so far.
    #[serde(default)]
    pub history: Vec<RolloutEvent>,
}

fn default_min_requests() -> u64 {
    20
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl RolloutPlan {
    /// A new running plan; checks the settings.
    pub fn new(
        stable: u64,
        candidate: u64,
        steps: Vec<f64>,
        step_interval: Duration,
        max_error_rate: f64,
        max_p99_ratio: f64,
    ) -> Result<RolloutPlan, PlanError> {
        let mut plan = RolloutPlan {
            candidate,
            stable,
            steps,
            step_interval_secs: step_interval.as_secs_f64(),
            max_error_rate,
            max_p99_ratio,
            min_requests: default_min_requests(),
            state: RolloutState::Running,
            created_at: now_secs(),
            history: Vec::new(),
        };
        plan.validate()?;
        plan.record("started", None, None, None, None, String::new());
        Ok(plan)
    }

    /// Checks a plan read from a file or built from flags.
    pub fn validate(&self) -> Result<(), PlanError> {
        if self.candidate == 0 || self.stable == 0 {
            return Err(PlanError::ZeroVersion);
        }
        if self.candidate == self.stable {
            return Err(PlanError::SameVersion(self.stable));
        }
        if self.steps.is_empty() {
            return Err(PlanError::NoSteps);
        }
        if self
            .steps
            .iter()
            .any(|w| !w.is_finite() || *w <= 0.0 || *w > 100.0)
        {
            return Err(PlanError::WeightOutOfRange);
        }
        if self.steps.windows(2).any(|w| w[1] <= w[0]) {
            return Err(PlanError::WeightsNotIncreasing);
        }
        if self.steps.last() != Some(&100.0) {
            return Err(PlanError::LastStepNotFull);
        }
        if self.min_requests == 0 {
            return Err(PlanError::NoMinRequests);
        }
        if !(self.step_interval_secs.is_finite() && self.step_interval_secs > 0.0) {
            return Err(PlanError::StepInterval);
        }
        if !(0.0..=1.0).contains(&self.max_error_rate) {
            return Err(PlanError::MaxErrorRate);
        }
        if !(self.max_p99_ratio.is_finite() && self.max_p99_ratio >= 1.0) {
            return Err(PlanError::MaxP99Ratio);
        }
        Ok(())
    }

    /// Parses and checks a plan file.
    pub fn parse(text: &str) -> Result<RolloutPlan, PlanError> {
        let plan: RolloutPlan = serde_json::from_str(text).map_err(PlanError::Json)?;
        plan.validate()
            .map_err(|e| PlanError::InFile(Box::new(e)))?;
        Ok(plan)
    }

    /// The plan as pretty JSON (what the file holds).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a plan serializes") + "\n"
    }

    /// Appends an event to the history, now.
    pub fn record(
        &mut self,
        event: &str,
        step: Option<usize>,
        weight: Option<f64>,
        candidate: Option<ArmFigures>,
        stable: Option<ArmFigures>,
        reason: String,
    ) {
        self.history.push(RolloutEvent {
            at: now_secs(),
            event: event.to_string(),
            step,
            weight,
            candidate,
            stable,
            reason,
        });
    }

    /// Ends the rollout (an operator's or a gate's decision), recording why.
    pub fn finish(&mut self, state: RolloutState, reason: String) {
        self.state = state;
        let event = state.name();
        self.record(event, None, None, None, None, reason);
    }

    /// The version that takes unversioned traffic when the split is not running.
    pub fn settled_version(&self) -> u64 {
        match self.state {
            RolloutState::Promoted => self.candidate,
            RolloutState::Running | RolloutState::RolledBack => self.stable,
        }
    }

    /// Judges one step's figures: `Ok(true)` passed, `Ok(false)` not enough candidate traffic yet,
    /// `Err(reason)` a gate failed.
    pub fn judge(&self, candidate: &ArmFigures, stable: &ArmFigures) -> Result<bool, String> {
        if candidate.requests > 0 && candidate.error_rate() > self.max_error_rate {
            // Errors count even before the minimum: a candidate failing many of its few requests is already bad.
            // Before the minimum, it takes at least three errors (one unlucky request is not evidence).
            if candidate.requests >= self.min_requests
                || (candidate.errors >= 3
                    && candidate.errors as f64 > self.max_error_rate * self.min_requests as f64)
            {
                return Err(format!(
                    "candidate error rate {:.2}% ({} of {}) is above the maximum {:.2}%",
                    candidate.error_rate() * 100.0,
                    candidate.errors,
                    candidate.requests,
                    self.max_error_rate * 100.0
                ));
            }
        }
        if candidate.requests < self.min_requests {
            return Ok(false);
        }
        if let (Some(c), Some(s)) = (candidate.p99_ms, stable.p99_ms) {
            if stable.requests >= self.min_requests && c > s * self.max_p99_ratio {
                return Err(format!(
                    "candidate p99 {c:.3} ms is above {:.2}× the stable p99 {s:.3} ms",
                    self.max_p99_ratio
                ));
            }
        }
        Ok(true)
    }
}

/// Upper bounds (milliseconds) of the latency buckets each arm counts; p99 is read as the bound of the bucket that
/// holds it.
const BUCKETS_MS: [f64; 28] = [
    0.05,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    5.0,
    7.5,
    10.0,
    15.0,
    20.0,
    30.0,
    50.0,
    75.0,
    100.0,
    200.0,
    500.0,
    1000.0,
    2000.0,
    5000.0,
    f64::INFINITY,
];

/// One arm's live counters for the current step (lock-free, reset at each step).
#[derive(Debug, Default)]
pub struct ArmCounters {
    requests: AtomicU64,
    errors: AtomicU64,
    buckets: [AtomicU64; BUCKETS_MS.len()],
}

impl ArmCounters {
    /// Counts one answered request.
    pub fn observe(&self, latency: Duration, server_error: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if server_error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let ms = latency.as_secs_f64() * 1e3;
        let i = BUCKETS_MS
            .iter()
            .position(|b| ms <= *b)
            .unwrap_or(BUCKETS_MS.len() - 1);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The figures so far, without resetting.
    pub fn peek(&self) -> ArmFigures {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        figures(
            self.requests.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
            &counts,
        )
    }

    /// The figures so far, and resets the counters for the next step.
    pub fn take(&self) -> ArmFigures {
        let requests = self.requests.swap(0, Ordering::Relaxed);
        let errors = self.errors.swap(0, Ordering::Relaxed);
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.swap(0, Ordering::Relaxed))
            .collect();
        figures(requests, errors, &counts)
    }
}

fn figures(requests: u64, errors: u64, counts: &[u64]) -> ArmFigures {
    {
        let total: u64 = counts.iter().sum();
        let p99_ms = (total > 0).then(|| {
            let rank = (total as f64 * 0.99).ceil() as u64;
            let mut seen = 0;
            for (count, bound) in counts.iter().zip(BUCKETS_MS) {
                seen += count;
                if seen >= rank {
                    // The open last bucket reports the largest finite bound.
                    return if bound.is_finite() { bound } else { 5000.0 };
                }
            }
            5000.0
        });
        ArmFigures {
            requests,
            errors,
            p99_ms,
        }
    }
}

/// Whether a request with this routing key goes to the candidate at `weight` percent. The same key always lands on
/// the same side of a given weight, and keys that went to the candidate stay there as the weight grows.
pub fn routes_to_candidate(key: u64, weight: f64) -> bool {
    if weight >= 100.0 {
        return true;
    }
    // Spread the key over 0..10000 (splitmix64's finalizer, so sequential ids spread evenly).
    let mut z = key.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z % 10_000) as f64) < weight * 100.0
}

/// A 64-bit hash of a routing key (a request id or a routing header value), FNV-1a.
pub fn key_hash(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// What a rollout says about one request that names no version: the plan's versions and state, and whether the
/// request's key fell in the candidate's share ([`Live::choose`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The version being rolled out.
    pub candidate: u64,
    /// The version it replaces.
    pub stable: u64,
    /// Where the rollout is.
    pub state: RolloutState,
    /// Whether this request falls in the candidate's share.
    pub to_candidate: bool,
}

/// The version that serves a request naming none, among `versions`: the one rule the server routes by and
/// `ferry rollout`/`ferry retrain` read the live version from. `usable` says whether a version can answer now;
/// `unrouted` whether it may also take traffic no rollout sends it (the server keeps shadow-only versions out).
///
/// - No rollout: the highest `unrouted` version.
/// - Running: the arm the request fell in, else the stable version, if usable; else as without a rollout.
/// - Promoted: the candidate, if usable and no usable version is newer than both plan versions; else as without a
///   rollout.
/// - Rolled back: as without a rollout, the candidate excluded.
pub fn unversioned_target(
    route: Option<Route>,
    versions: &[u64],
    usable: impl Fn(u64) -> bool,
    unrouted: impl Fn(u64) -> bool,
) -> Option<u64> {
    let mut excluded = None;
    if let Some(r) = route {
        match r.state {
            RolloutState::Running => {
                let first = if r.to_candidate {
                    r.candidate
                } else {
                    r.stable
                };
                if usable(first) {
                    return Some(first);
                }
                if usable(r.stable) {
                    return Some(r.stable);
                }
            }
            RolloutState::Promoted => {
                let newer = versions
                    .iter()
                    .any(|v| *v > r.candidate.max(r.stable) && usable(*v));
                if !newer && usable(r.candidate) {
                    return Some(r.candidate);
                }
            }
            RolloutState::RolledBack => excluded = Some(r.candidate),
        }
    }
    versions
        .iter()
        .copied()
        .filter(|v| Some(*v) != excluded && unrouted(*v))
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_naming_no_version_follow_the_rollout() {
        let route = |state, to_candidate| {
            Some(Route {
                candidate: 3,
                stable: 2,
                state,
                to_candidate,
            })
        };
        let all = |_: u64| true;
        let versions = [1, 2, 3];
        // No rollout: the highest.
        assert_eq!(unversioned_target(None, &versions, all, all), Some(3));
        // Running: the arm, else stable, else the highest that may take unrouted traffic.
        assert_eq!(
            unversioned_target(route(RolloutState::Running, true), &versions, all, all),
            Some(3)
        );
        assert_eq!(
            unversioned_target(route(RolloutState::Running, false), &versions, all, all),
            Some(2)
        );
        let no_candidate = |v: u64| v != 3;
        assert_eq!(
            unversioned_target(
                route(RolloutState::Running, true),
                &versions,
                no_candidate,
                no_candidate
            ),
            Some(2)
        );
        let only_one = |v: u64| v == 1;
        assert_eq!(
            unversioned_target(
                route(RolloutState::Running, true),
                &versions,
                only_one,
                only_one
            ),
            Some(1)
        );
        // Promoted: the candidate until a newer version is usable.
        assert_eq!(
            unversioned_target(route(RolloutState::Promoted, false), &[1, 2, 3], all, all),
            Some(3)
        );
        let shadow_four = |v: u64| v != 4;
        assert_eq!(
            unversioned_target(route(RolloutState::Promoted, false), &[2, 3, 4], all, shadow_four),
            Some(3),
            "a newer shadow-only version ends the promotion, and the highest version that takes unrouted traffic serves"
        );
        assert_eq!(
            unversioned_target(
                Some(Route {
                    candidate: 2,
                    stable: 1,
                    state: RolloutState::Promoted,
                    to_candidate: false
                }),
                &[1, 2, 3],
                all,
                all
            ),
            Some(3)
        );
        // Rolled back: never the candidate.
        assert_eq!(
            unversioned_target(route(RolloutState::RolledBack, true), &versions, all, all),
            Some(2)
        );
        assert_eq!(unversioned_target(None, &[], all, all), None);
    }

    fn plan() -> RolloutPlan {
        RolloutPlan::new(
            1,
            2,
            vec![5.0, 25.0, 50.0, 100.0],
            Duration::from_secs(60),
            0.01,
            1.5,
        )
        .unwrap()
    }

    #[test]
    fn plans_round_trip_and_bad_plans_are_refused() {
        let p = plan();
        assert_eq!(RolloutPlan::parse(&p.to_json()).unwrap(), p);
        for steps in [
            vec![],
            vec![50.0, 25.0, 100.0],
            vec![5.0, 50.0],
            vec![0.0, 100.0],
        ] {
            let mut bad = p.clone();
            bad.steps = steps.clone();
            assert!(bad.validate().is_err(), "{steps:?}");
        }
        let mut same = p.clone();
        same.candidate = same.stable;
        assert!(matches!(same.validate(), Err(PlanError::SameVersion(_))));
        assert!(matches!(RolloutPlan::parse("{"), Err(PlanError::Json(_))));
        let mut decreasing = p.clone();
        decreasing.steps = vec![50.0, 25.0, 100.0];
        let e = RolloutPlan::parse(&decreasing.to_json()).unwrap_err();
        assert!(
            matches!(&e, PlanError::InFile(inner) if matches!(**inner, PlanError::WeightsNotIncreasing)),
            "{e}"
        );
        assert_eq!(e.to_string(), "rollout.json: step weights must increase");
    }

    #[test]
    fn gates_pass_extend_and_fail() {
        let p = plan();
        let ok = |requests, errors, p99| ArmFigures {
            requests,
            errors,
            p99_ms: Some(p99),
        };
        assert_eq!(p.judge(&ok(100, 0, 1.0), &ok(1000, 0, 1.0)), Ok(true));
        assert_eq!(p.judge(&ok(5, 0, 1.0), &ok(100, 0, 1.0)), Ok(false));
        assert!(p.judge(&ok(100, 5, 1.0), &ok(1000, 0, 1.0)).is_err());
        assert!(p.judge(&ok(10, 10, 1.0), &ok(1000, 0, 1.0)).is_err());
        // One failed request of a few is not yet evidence.
        assert_eq!(p.judge(&ok(5, 1, 1.0), &ok(1000, 0, 1.0)), Ok(false));
        assert!(p.judge(&ok(100, 0, 2.0), &ok(1000, 0, 1.0)).is_err());
        assert_eq!(p.judge(&ok(100, 0, 1.4), &ok(1000, 0, 1.0)), Ok(true));
        // A stable arm without enough traffic cannot fail the candidate on latency.
        assert_eq!(p.judge(&ok(100, 0, 9.0), &ok(3, 0, 1.0)), Ok(true));
    }

    #[test]
    fn counters_give_a_p99_and_reset() {
        let c = ArmCounters::default();
        for _ in 0..99 {
            c.observe(Duration::from_micros(400), false);
        }
        c.observe(Duration::from_millis(40), true);
        let f = c.take();
        assert_eq!((f.requests, f.errors), (100, 1));
        assert_eq!(f.p99_ms, Some(0.4));
        c.observe(Duration::from_secs(100), false);
        assert_eq!(c.take().p99_ms, Some(5000.0));
        assert_eq!(c.take(), ArmFigures::default());
    }

    #[test]
    fn a_replica_keeps_its_decision_and_merges_history() {
        let live = Live::new(plan());
        let mut stored = plan();
        stored.created_at = live.plan().created_at;
        stored.history.push(RolloutEvent {
            at: 1,
            event: "step_passed".into(),
            step: Some(0),
            weight: Some(5.0),
            candidate: None,
            stable: None,
            reason: "other replica".into(),
        });
        let mut mine = live.plan();
        mine.finish(RolloutState::RolledBack, "gate".into());
        live.adopt(mine);
        // A running plan read back from the file does not undo the rollback.
        live.adopt(stored.clone());
        assert_eq!(live.plan().state, RolloutState::RolledBack);
        let merged = live.merged_with(Some(&stored));
        assert!(merged.history.iter().any(|e| e.reason == "other replica"));
        assert!(merged.history.iter().any(|e| e.event == "rolled_back"));
        assert!(merged.history.windows(2).all(|w| w[0].at <= w[1].at));
        let mut zero = plan();
        zero.min_requests = 0;
        assert!(zero.validate().is_err());
    }

    #[test]
    fn routing_is_sticky_and_proportional() {
        let share = |w| {
            (0..100_000u64)
                .filter(|k| routes_to_candidate(*k, w))
                .count() as f64
                / 1000.0
        };
        for w in [5.0, 25.0, 50.0] {
            assert!((share(w) - w).abs() < 1.0, "{w}: {}", share(w));
        }
        assert_eq!(share(100.0), 100.0);
        for k in 0..1000u64 {
            if routes_to_candidate(k, 5.0) {
                assert!(routes_to_candidate(k, 25.0));
            }
        }
        assert_eq!(key_hash("abc"), key_hash("abc"));
        assert_ne!(key_hash("abc"), key_hash("abd"));
    }
}

/// A plan as one server applies it: the stored plan plus this replica's step clock and per-arm counters.
#[derive(Debug)]
pub struct Live {
    plan: parking_lot::Mutex<RolloutPlan>,
    /// The candidate's counters for the current step.
    pub candidate: ArmCounters,
    /// The stable version's counters for the current step.
    pub stable: ArmCounters,
    step: std::sync::atomic::AtomicUsize,
    step_started: parking_lot::Mutex<std::time::Instant>,
    extended: std::sync::atomic::AtomicBool,
    next_key: AtomicU64,
}

/// What a controller tick decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Tick {
    /// Nothing to do yet.
    Wait,
    /// A step passed and the next began (the plan gained an event; write it).
    Advanced,
    /// A step had too little candidate traffic and goes on (the plan gained an event; write it).
    Extended,
    /// The rollout finished (promoted or rolled back; write it).
    Finished(RolloutState),
}

impl Live {
    /// Starts applying `plan` at its first step.
    pub fn new(plan: RolloutPlan) -> Live {
        Live {
            plan: parking_lot::Mutex::new(plan),
            candidate: ArmCounters::default(),
            stable: ArmCounters::default(),
            step: std::sync::atomic::AtomicUsize::new(0),
            step_started: parking_lot::Mutex::new(std::time::Instant::now()),
            extended: std::sync::atomic::AtomicBool::new(false),
            next_key: AtomicU64::new(0),
        }
    }

    /// A copy of the plan as this replica knows it.
    pub fn plan(&self) -> RolloutPlan {
        self.plan.lock().clone()
    }

    /// Whether `other` (read from the repository) is the same rollout as this one (so this replica's step clock
    /// carries on).
    pub fn same_rollout(&self, other: &RolloutPlan) -> bool {
        let p = self.plan.lock();
        p.candidate == other.candidate
            && p.stable == other.stable
            && p.created_at == other.created_at
    }

    /// Adopts the stored plan of the same rollout (its history and state: an operator may have ended it).
    pub fn adopt(&self, stored: RolloutPlan) {
        let mut plan = self.plan.lock();
        // A decision this replica took is not undone by a file written before it.
        if plan.state != RolloutState::Running && stored.state == RolloutState::Running {
            return;
        }
        *plan = stored;
    }

    /// The plan to write back: the stored one's history merged with this replica's events (other replicas write
    /// theirs too), in time order.
    pub fn merged_with(&self, stored: Option<&RolloutPlan>) -> RolloutPlan {
        let mut plan = self.plan();
        if let Some(stored) = stored.filter(|s| self.same_rollout(s)) {
            let mut history = stored.history.clone();
            for e in &plan.history {
                if !history.contains(e) {
                    history.push(e.clone());
                }
            }
            history.sort_by_key(|e| e.at);
            plan.history = history;
        }
        plan
    }

    /// The current step index.
    pub fn step(&self) -> usize {
        self.step.load(Ordering::Relaxed)
    }

    /// The candidate's share of unversioned traffic now, in percent (0 once rolled back, 100 once promoted).
    pub fn weight(&self) -> f64 {
        let p = self.plan.lock();
        match p.state {
            RolloutState::Running => p.steps.get(self.step()).copied().unwrap_or(100.0),
            RolloutState::Promoted => 100.0,
            RolloutState::RolledBack => 0.0,
        }
    }

    /// Picks the arm for one request: the candidate when `key` (or, without one, a rotating counter) falls in the
    /// current weight. Returns `(candidate, stable, state, to_candidate)`.
    pub fn choose(&self, key: Option<u64>) -> (u64, u64, RolloutState, bool) {
        let (candidate, stable, state, weight) = {
            let p = self.plan.lock();
            let w = match p.state {
                RolloutState::Running => p.steps.get(self.step()).copied().unwrap_or(100.0),
                RolloutState::Promoted => 100.0,
                RolloutState::RolledBack => 0.0,
            };
            (p.candidate, p.stable, p.state, w)
        };
        let key = key.unwrap_or_else(|| self.next_key.fetch_add(1, Ordering::Relaxed));
        (candidate, stable, state, routes_to_candidate(key, weight))
    }

    /// The counters a request answered by `version` counts in, while the rollout runs.
    pub fn arm(&self, version: u64) -> Option<&ArmCounters> {
        let p = self.plan.lock();
        if p.state != RolloutState::Running {
            return None;
        }
        if version == p.candidate {
            Some(&self.candidate)
        } else if version == p.stable {
            Some(&self.stable)
        } else {
            None
        }
    }

    /// Holds the step clock at its start (while the candidate or the stable version is not ready).
    pub fn hold(&self) {
        *self.step_started.lock() = std::time::Instant::now();
        self.candidate.take();
        self.stable.take();
    }

    /// Judges the current step when its interval is over, advancing, extending or finishing the plan.
    pub fn tick(&self) -> Tick {
        let mut plan = self.plan.lock();
        if plan.state != RolloutState::Running {
            return Tick::Wait;
        }
        let mut started = self.step_started.lock();
        if started.elapsed().as_secs_f64() < plan.step_interval_secs {
            return Tick::Wait;
        }
        let step = self.step();
        let weight = plan.steps.get(step).copied().unwrap_or(100.0);
        // Figures accumulate over an extended step: only a judged step resets them.
        let candidate = self.candidate.peek();
        let stable = self.stable.peek();
        match plan.judge(&candidate, &stable) {
            Err(reason) => {
                plan.record(
                    "gate_failed",
                    Some(step),
                    Some(weight),
                    Some(candidate),
                    Some(stable),
                    reason.clone(),
                );
                plan.finish(RolloutState::RolledBack, reason);
                Tick::Finished(RolloutState::RolledBack)
            }
            Ok(false) => {
                *started = std::time::Instant::now();
                if self.extended.swap(true, Ordering::Relaxed) {
                    return Tick::Wait;
                }
                let reason = format!(
                    "the candidate answered {} requests, fewer than the {} a step needs",
                    candidate.requests, plan.min_requests
                );
                plan.record(
                    "step_extended",
                    Some(step),
                    Some(weight),
                    Some(candidate),
                    Some(stable),
                    reason,
                );
                Tick::Extended
            }
            Ok(true) => {
                self.candidate.take();
                self.stable.take();
                self.extended.store(false, Ordering::Relaxed);
                plan.record(
                    "step_passed",
                    Some(step),
                    Some(weight),
                    Some(candidate),
                    Some(stable),
                    String::new(),
                );
                if step + 1 >= plan.steps.len() {
                    plan.finish(RolloutState::Promoted, "every step passed its gates".into());
                    return Tick::Finished(RolloutState::Promoted);
                }
                self.step.store(step + 1, Ordering::Relaxed);
                *started = std::time::Instant::now();
                Tick::Advanced
            }
        }
    }
}
