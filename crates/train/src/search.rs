//! Hyper-parameter search: grid or random over candidate values of the learning rate, L2, batch size, hidden
//! sizes and epochs, each candidate scored by k-fold cross-validation or by the fit's own validation split.
//!
//! Random search draws `trials` distinct combinations from the grid with a seeded shuffle, so it is reproducible
//! and never scores the same combination twice.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::data::{split, Dataset};
use crate::fit::{fit, Report, Task, TrainOptions};
use crate::TrainError;

/// Candidate values; an empty list means "the family's default only".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SearchSpace {
    /// Learning rates.
    pub learning_rate: Vec<f64>,
    /// L2 strengths.
    pub l2: Vec<f64>,
    /// Mini-batch sizes.
    pub batch_size: Vec<usize>,
    /// Hidden layer sizes (mlp).
    pub hidden: Vec<Vec<usize>>,
    /// Epoch limits.
    pub epochs: Vec<usize>,
}

/// One combination of candidate values (`None`: the default).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Candidate {
    /// Learning rate.
    pub learning_rate: Option<f64>,
    /// L2 strength.
    pub l2: Option<f64>,
    /// Mini-batch size.
    pub batch_size: Option<usize>,
    /// Hidden layer sizes.
    pub hidden: Option<Vec<usize>>,
    /// Epoch limit.
    pub epochs: Option<usize>,
}

impl Candidate {
    /// `base` with this candidate's values put in.
    pub fn apply(&self, base: &TrainOptions) -> TrainOptions {
        let mut o = base.clone();
        o.learning_rate = self.learning_rate.or(o.learning_rate);
        o.l2 = self.l2.or(o.l2);
        o.batch_size = self.batch_size.or(o.batch_size);
        o.hidden = self.hidden.clone().or(o.hidden);
        o.epochs = self.epochs.or(o.epochs);
        o
    }
}

fn options_of<T: Clone>(values: &[T]) -> Vec<Option<T>> {
    if values.is_empty() {
        vec![None]
    } else {
        values.iter().cloned().map(Some).collect()
    }
}

/// Every combination of the space, in a fixed order.
pub fn grid(space: &SearchSpace) -> Vec<Candidate> {
    let mut out = Vec::new();
    for learning_rate in options_of(&space.learning_rate) {
        for l2 in options_of(&space.l2) {
            for batch_size in options_of(&space.batch_size) {
                for hidden in options_of(&space.hidden) {
                    for epochs in options_of(&space.epochs) {
                        out.push(Candidate {
                            learning_rate,
                            l2,
                            batch_size,
                            hidden: hidden.clone(),
                            epochs,
                        });
                    }
                }
            }
        }
    }
    out
}

/// `trials` distinct combinations of the space drawn with `seed` (all of them when the grid is smaller).
pub fn random(space: &SearchSpace, trials: usize, seed: u64) -> Vec<Candidate> {
    let mut all = grid(space);
    all.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    all.truncate(trials);
    all
}

/// The headline score of a report: accuracy or R².
pub fn score(report: &Report) -> f64 {
    match report {
        Report::Classification(r) => r.accuracy,
        Report::Regression(r) => r.r2,
    }
}

/// Mean score over `folds` folds (stratified for classification): each fold trains on the other folds (with
/// their own validation split for early stopping) and is scored on the held-out fold.
pub fn cross_validate(
    dataset: &Dataset,
    options: &TrainOptions,
    folds: usize,
) -> Result<f64, TrainError> {
    if folds < 2 {
        return Err(TrainError::Config("--folds must be at least 2".into()));
    }
    let task = crate::fit::resolve_task(options, dataset)?;
    let classification = task == Task::Classification;
    // The task is judged on the whole file; the folds, fewer rows each, keep it.
    let options = &TrainOptions {
        task: Some(task),
        ..options.clone()
    };
    let strata = if classification {
        Some(dataset.classes()?.index)
    } else {
        None
    };
    // Fold k takes the rows a seeded stratified split of fraction 1/(folds - k) hands to validation from
    // what earlier folds left: equal-sized folds that keep the class balance.
    let mut remaining: Vec<usize> = (0..dataset.rows()).collect();
    let mut total = 0.0;
    for k in 0..folds {
        let held: Vec<usize> = if k + 1 == folds {
            remaining.clone()
        } else {
            let sub_strata: Option<Vec<usize>> = strata
                .as_ref()
                .map(|s| remaining.iter().map(|&i| s[i]).collect());
            let (_, valid) = split(
                remaining.len(),
                1.0 / (folds - k) as f64,
                sub_strata.as_deref(),
                options.seed.wrapping_add(k as u64),
            );
            valid.iter().map(|&j| remaining[j]).collect()
        };
        remaining.retain(|i| held.binary_search(i).is_err());
        let train_rows: Vec<usize> = (0..dataset.rows())
            .filter(|i| held.binary_search(i).is_err())
            .collect();
        let trained = fit(&dataset.subset(&train_rows), options, &mut |_| {})?;
        let test = dataset.subset(&held);
        let predicted = trained.predict(test.x.view());
        total += match &trained.classes {
            Some(names) => {
                let truth = test.classes()?.index;
                crate::metrics::classification(names, &truth, predicted.view()).accuracy
            }
            None => crate::metrics::regression(test.values()?, &predicted.column(0).to_vec()).r2,
        };
    }
    Ok(total / folds as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> SearchSpace {
        SearchSpace {
            learning_rate: vec![0.1, 0.01],
            l2: vec![],
            batch_size: vec![16, 32, 64],
            hidden: vec![vec![8], vec![8, 4]],
            epochs: vec![],
        }
    }

    #[test]
    fn grid_is_the_cartesian_product() {
        let g = grid(&space());
        assert_eq!(g.len(), 2 * 3 * 2);
        assert!(g.iter().all(|c| c.l2.is_none() && c.epochs.is_none()));
        assert_eq!(g[0].hidden, Some(vec![8]));
        assert_eq!(grid(&SearchSpace::default()).len(), 1);
    }

    #[test]
    fn random_draws_distinct_seeded_combinations() {
        let r = random(&space(), 5, 3);
        assert_eq!(r.len(), 5);
        for (i, a) in r.iter().enumerate() {
            assert!(r[i + 1..].iter().all(|b| b != a));
        }
        assert_eq!(random(&space(), 5, 3), r);
        assert_eq!(random(&space(), 50, 3).len(), 12);
    }
}
