//! The retraining gate: a candidate and the live version are scored on the same seeded holdout rows, each through
//! the engine that serves it, on the same metric (accuracy for classifiers, R² for regressors); the candidate
//! passes when it beats the live version by at least the minimum improvement.

use ferry_engine::OrtEngine;

use crate::data::{split, CsvSource, Dataset, Impute, LoadOptions};
use crate::evaluate::{score_model, OnnxModel};
use crate::export::Metadata;
use crate::fit::{Report, Task};
use crate::TrainError;

/// How a candidate compared with the live version; written into the candidate's `ferry.json` as `gate`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GateRecord {
    /// `accuracy` or `r2`.
    pub metric: String,
    /// The candidate's score on the holdout rows.
    pub candidate: f64,
    /// The version that served when the candidate was made (none for a model's first version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_version: Option<u64>,
    /// The live version's score on the same rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<f64>,
    /// Candidate minus live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub improvement: Option<f64>,
    /// The least improvement that passes (0: not worse; negative: a drop this large is accepted).
    pub min_improvement: f64,
    /// Rows both were scored on.
    pub holdout_rows: usize,
    /// The share of the data held out.
    pub holdout_fraction: f64,
    /// The seed of the holdout split.
    pub seed: u64,
    /// Whether the candidate passed.
    pub passed: bool,
}

/// Rounding noise allowed when an improvement is compared with the minimum (two models scoring the same rows the
/// same must pass a gate of 0).
const EPSILON: f64 = 1e-12;

impl GateRecord {
    /// The decision for a candidate's score against the live version's (`None`: there is no live version, and any
    /// candidate passes).
    pub fn decide(
        metric: &str,
        candidate: f64,
        live: Option<(u64, f64)>,
        min_improvement: f64,
        holdout_rows: usize,
        holdout_fraction: f64,
        seed: u64,
    ) -> GateRecord {
        let improvement = live.map(|(_, score)| candidate - score);
        GateRecord {
            metric: metric.to_string(),
            candidate,
            live_version: live.map(|(v, _)| v),
            live: live.map(|(_, s)| s),
            improvement,
            min_improvement,
            holdout_rows,
            holdout_fraction,
            seed,
            passed: improvement.is_none_or(|i| i + EPSILON >= min_improvement),
        }
    }
}

/// The headline metric's name and value of a report.
pub fn headline(report: &Report) -> (&'static str, f64) {
    match report {
        Report::Classification(r) => ("accuracy", r.accuracy),
        Report::Regression(r) => ("r2", r.r2),
    }
}

/// Splits a dataset's rows into training rows and holdout rows, seeded, stratified by class for classification.
pub fn holdout_split(
    dataset: &Dataset,
    task: Task,
    fraction: f64,
    seed: u64,
) -> Result<(Vec<usize>, Vec<usize>), TrainError> {
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(TrainError::Config(format!(
            "the holdout fraction must be between 0 and 1, not {fraction}"
        )));
    }
    let strata = match task {
        Task::Classification => Some(dataset.classes()?.index),
        Task::Regression => None,
    };
    let (train, holdout) = split(dataset.rows(), fraction, strata.as_deref(), seed);
    if holdout.is_empty() || train.len() < 2 {
        return Err(TrainError::Config(format!(
            "{} rows leave {} for training and {} for the holdout: more data, or another --holdout-fraction",
            dataset.rows(),
            train.len(),
            holdout.len()
        )));
    }
    Ok((train, holdout))
}

/// Runs serialized ONNX bytes described by `meta` through ONNX Runtime on `rows`, and scores it.
pub fn score(
    engine: &OrtEngine,
    onnx: &[u8],
    meta: &Metadata,
    rows: &Dataset,
) -> Result<Report, TrainError> {
    let model = OnnxModel::load(engine, onnx)?;
    score_model(&model, meta, rows)
}

/// Reads the columns a model described by `meta` takes (its features, in its order) and the `target` column from
/// `source`, and keeps the rows `rows`: the same holdout rows another model was scored on.
pub fn rows_for(
    meta: &Metadata,
    source: &CsvSource,
    target: &str,
    impute: Option<Impute>,
    rows: &[usize],
    expected_rows: usize,
) -> Result<Dataset, TrainError> {
    let options = LoadOptions {
        target: Some(target.to_string()),
        features: Some(meta.features.clone()),
        impute: meta.imputation.as_ref().map(|i| i.strategy).or(impute),
        ..LoadOptions::default()
    };
    let all = source.load(&options)?;
    if all.rows() != expected_rows {
        return Err(TrainError::Data {
            path: source.name().to_path_buf(),
            message: format!(
                "read {} rows for the model's columns but {expected_rows} for the candidate's",
                all.rows()
            ),
        });
    }
    Ok(all.subset(rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_passes_equal_scores_at_zero_and_honours_the_minimum() {
        let d = |c, live, min| GateRecord::decide("accuracy", c, live, min, 30, 0.2, 0);
        assert!(d(0.9, Some((1, 0.9)), 0.0).passed);
        assert!(!d(0.89, Some((1, 0.9)), 0.0).passed);
        assert!(!d(0.91, Some((1, 0.9)), 0.05).passed);
        assert!(d(0.96, Some((1, 0.9)), 0.05).passed);
        assert!(d(0.88, Some((1, 0.9)), -0.05).passed, "a tolerated drop");
        let first = d(0.5, None, 0.1);
        assert!(first.passed && first.improvement.is_none());
        // Scores that differ only by rounding count as equal.
        assert!(d(0.1 + 0.2, Some((1, 0.3)), 0.0).passed);
    }
}
