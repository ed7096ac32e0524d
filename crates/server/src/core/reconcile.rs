//! The decisions of one model's reconciliation, as pure functions of what a scan found and what the manager
//! remembers: which versions a rollout or a shadow keeps loaded beyond the version policy ([`pins`]), which
//! versions are wanted and which of them to load now ([`wanted_versions`]), what becomes of a version no longer
//! wanted ([`retire`]), and whether a shadow version stays hidden from unversioned traffic ([`hidden_shadow`]).
//! `reload::Manager::reconcile_model` carries them out (loads, swaps, unloads) in that order.

use std::collections::{BTreeMap, BTreeSet};

use crate::core::model_config::VersionPolicy;
use crate::core::repository::VersionState;
use crate::core::rollout::{RolloutPlan, RolloutState};

/// Versions kept loaded beyond the version policy, and versions kept out of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pins {
    /// Loaded whatever the policy says (a running rollout's two versions, a finished one's settled version, the
    /// shadow version).
    pub extra: BTreeSet<u64>,
    /// Never loaded through the policy (a rolled-back candidate).
    pub excluded: BTreeSet<u64>,
    /// The shadow version when nothing but the shadow asks for it.
    pub shadow_only: Option<u64>,
}

/// What a rollout plan and a shadow pin, given the versions `present`. A finished plan pins its settled version
/// until a version newer than both plan versions exists.
pub fn pins(plan: Option<&RolloutPlan>, shadow: Option<u64>, present: &[u64]) -> Pins {
    let mut p = Pins::default();
    if let Some(plan) = plan {
        match plan.state {
            RolloutState::Running => {
                p.extra.insert(plan.stable);
                p.extra.insert(plan.candidate);
            }
            RolloutState::Promoted | RolloutState::RolledBack => {
                let newer = present.iter().any(|v| *v > plan.candidate.max(plan.stable));
                if !newer {
                    p.extra.insert(plan.settled_version());
                }
                if plan.state == RolloutState::RolledBack {
                    p.excluded.insert(plan.candidate);
                }
            }
        }
    }
    if let Some(shadow) = shadow {
        if !p.extra.contains(&shadow) {
            p.shadow_only = Some(shadow);
        }
        p.extra.insert(shadow);
    }
    p
}

/// What the manager remembers of a model's versions between scans, by fingerprint of their files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Versions {
    /// Serving, with the fingerprint they were loaded from.
    pub loaded: BTreeMap<u64, String>,
    /// Failed to load, not tried again until their files change.
    pub failed: BTreeMap<u64, String>,
    /// Serving, but to load again under a changed configuration (they keep serving if that fails).
    pub stale: BTreeSet<u64>,
}

/// The versions wanted among `present` (version → fingerprint) and, of those, the ones to load now: new, changed
/// or stale, unless they already failed with the same files. The policy is applied to the versions that can load
/// (not excluded, not failed unless serving), so a broken new version never unseats a working one.
pub fn wanted_versions(
    present: &BTreeMap<u64, String>,
    policy: &VersionPolicy,
    pins: &Pins,
    known: &Versions,
) -> (BTreeSet<u64>, Vec<u64>) {
    let can_serve = |v: &u64| !known.failed.contains_key(v) || known.loaded.contains_key(v);
    let eligible: Vec<u64> = present
        .keys()
        .copied()
        .filter(|v| !pins.excluded.contains(v))
        .filter(can_serve)
        .collect();
    let mut wanted: BTreeSet<u64> = policy.select(&eligible).into_iter().collect();
    wanted.extend(
        pins.extra
            .iter()
            .copied()
            .filter(|v| present.contains_key(v) && can_serve(v)),
    );
    let to_load = wanted
        .iter()
        .copied()
        .filter(|v| {
            let fp = &present[v];
            (known.loaded.get(v) != Some(fp) || known.stale.contains(v))
                && known.failed.get(v) != Some(fp)
        })
        .collect();
    (wanted, to_load)
}

/// What becomes of a version slot that is no longer wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retire {
    /// Serving: drain it, then remove it.
    Unload,
    /// Leave the slot as it is (already unloading, or a failure still worth reporting).
    Keep,
    /// Remove the slot now.
    Remove,
}

/// What becomes of an unwanted version in `state`; `failed_and_present` when its files are still there and failed
/// to load (its reason stays visible).
pub fn retire(state: &VersionState, failed_and_present: bool) -> Retire {
    match state {
        VersionState::Ready => Retire::Unload,
        VersionState::Unavailable(_) if failed_and_present => Retire::Keep,
        VersionState::Unloading => Retire::Keep,
        _ => Retire::Remove,
    }
}

/// The shadow version to hide from unversioned traffic: the shadow-only version unless the policy itself serves it.
pub fn hidden_shadow(
    shadow_only: Option<u64>,
    policy: &VersionPolicy,
    present: &[u64],
) -> Option<u64> {
    shadow_only.filter(|v| !policy.select(present).contains(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(state: RolloutState, stable: u64, candidate: u64) -> RolloutPlan {
        let mut p = RolloutPlan::new(
            stable,
            candidate,
            vec![10.0, 100.0],
            std::time::Duration::from_secs(60),
            0.01,
            1.5,
        )
        .unwrap();
        p.state = state;
        p
    }

    fn present(versions: &[u64]) -> BTreeMap<u64, String> {
        versions.iter().map(|v| (*v, format!("fp{v}"))).collect()
    }

    #[test]
    fn rollouts_and_shadows_pin_versions() {
        let running = plan(RolloutState::Running, 1, 2);
        let p = pins(Some(&running), None, &[1, 2, 3]);
        assert_eq!(p.extra, BTreeSet::from([1, 2]));
        assert!(p.excluded.is_empty());
        // A finished plan pins its settled version until a newer one exists.
        let promoted = plan(RolloutState::Promoted, 1, 2);
        assert_eq!(
            pins(Some(&promoted), None, &[1, 2]).extra,
            BTreeSet::from([2])
        );
        assert!(pins(Some(&promoted), None, &[1, 2, 3]).extra.is_empty());
        let back = plan(RolloutState::RolledBack, 1, 2);
        let p = pins(Some(&back), None, &[1, 2]);
        assert_eq!(
            (p.extra, p.excluded),
            (BTreeSet::from([1]), BTreeSet::from([2]))
        );
        // A shadow is shadow-only unless the plan pins it too.
        assert_eq!(pins(None, Some(4), &[3, 4]).shadow_only, Some(4));
        assert_eq!(pins(Some(&running), Some(2), &[1, 2]).shadow_only, None);
    }

    #[test]
    fn the_policy_applies_to_versions_that_can_load() {
        let latest = VersionPolicy::Latest(1);
        let none = Pins::default();
        // Fresh: the highest loads.
        let (wanted, to_load) =
            wanted_versions(&present(&[1, 2]), &latest, &none, &Versions::default());
        assert_eq!((wanted, to_load), (BTreeSet::from([2]), vec![2]));
        // Version 2 failed with these files while 1 serves: 1 stays wanted, nothing is retried.
        let known = Versions {
            loaded: BTreeMap::from([(1, "fp1".to_string())]),
            failed: BTreeMap::from([(2, "fp2".to_string())]),
            ..Versions::default()
        };
        let (wanted, to_load) = wanted_versions(&present(&[1, 2]), &latest, &none, &known);
        assert_eq!((wanted, to_load), (BTreeSet::from([1]), vec![]));
        // Its files changed: tried again.
        let mut changed = present(&[1, 2]);
        changed.insert(2, "fp2-new".into());
        let known = Versions {
            failed: BTreeMap::from([(2, "fp2".to_string())]),
            ..known
        };
        assert!(wanted_versions(&changed, &latest, &none, &known)
            .1
            .is_empty());
        // (The manager drops failures whose files changed before it asks; then version 2 loads.)
        let retried = Versions {
            failed: BTreeMap::new(),
            ..known.clone()
        };
        assert_eq!(
            wanted_versions(&changed, &latest, &none, &retried).1,
            vec![2]
        );
        // Stale serving versions load again; unchanged ones do not.
        let serving = Versions {
            loaded: BTreeMap::from([(2, "fp2".to_string())]),
            stale: BTreeSet::from([2]),
            ..Versions::default()
        };
        assert_eq!(
            wanted_versions(&present(&[2]), &latest, &none, &serving).1,
            vec![2]
        );
        let settled = Versions {
            stale: BTreeSet::new(),
            ..serving
        };
        assert!(wanted_versions(&present(&[2]), &latest, &none, &settled)
            .1
            .is_empty());
        // Pins add versions the policy would not pick; exclusions take them out of the policy's reach.
        let pinned = Pins {
            extra: BTreeSet::from([1]),
            excluded: BTreeSet::from([3]),
            shadow_only: None,
        };
        let (wanted, _) =
            wanted_versions(&present(&[1, 2, 3]), &latest, &pinned, &Versions::default());
        assert_eq!(wanted, BTreeSet::from([1, 2]));
    }

    #[test]
    fn unwanted_versions_drain_or_keep_their_reason() {
        assert_eq!(retire(&VersionState::Ready, false), Retire::Unload);
        assert_eq!(
            retire(&VersionState::Unavailable("x".into()), true),
            Retire::Keep
        );
        assert_eq!(
            retire(&VersionState::Unavailable("x".into()), false),
            Retire::Remove
        );
        assert_eq!(retire(&VersionState::Unloading, false), Retire::Keep);
        assert_eq!(retire(&VersionState::Loading, false), Retire::Remove);
        assert_eq!(
            hidden_shadow(Some(1), &VersionPolicy::Latest(1), &[1, 2]),
            Some(1)
        );
        assert_eq!(
            hidden_shadow(Some(2), &VersionPolicy::Latest(1), &[1, 2]),
            None
        );
    }
}
