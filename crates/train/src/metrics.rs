//! Scores: accuracy, per-class precision/recall/F1, the confusion matrix, log-loss and ROC-AUC for classifiers;
//! RMSE, MAE and R² for regressors. Used on the validation split while training and by `ferry evaluate`.

use ndarray::ArrayView2;

/// One class's scores.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClassScores {
    /// The class label.
    pub class: String,
    /// Of the rows predicted as this class, the share that are.
    pub precision: f64,
    /// Of the rows of this class, the share predicted as it.
    pub recall: f64,
    /// Harmonic mean of precision and recall.
    pub f1: f64,
    /// Rows of this class.
    pub support: usize,
}

/// A classifier's scores.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClassificationReport {
    /// Rows scored.
    pub rows: usize,
    /// Share of rows predicted right.
    pub accuracy: f64,
    /// Mean negative log-probability of the true class (probabilities clipped to [1e-15, 1]).
    pub log_loss: f64,
    /// Area under the ROC curve of the second class's probability, for two classes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roc_auc: Option<f64>,
    /// Scores per class, in class order.
    pub per_class: Vec<ClassScores>,
    /// `confusion[true][predicted]` row counts.
    pub confusion: Vec<Vec<usize>>,
}

/// A regressor's scores.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RegressionReport {
    /// Rows scored.
    pub rows: usize,
    /// Root mean squared error.
    pub rmse: f64,
    /// Mean absolute error.
    pub mae: f64,
    /// Coefficient of determination, 1 − SS_res / SS_tot.
    pub r2: f64,
}

/// Scores class probabilities `probs` [rows, classes] against true class indices; the prediction is the most
/// probable class (the first on ties, as ONNX ArgMax picks).
pub fn classification(
    classes: &[String],
    truth: &[usize],
    probs: ArrayView2<'_, f64>,
) -> ClassificationReport {
    let k = classes.len();
    let mut confusion = vec![vec![0usize; k]; k];
    let mut log_loss = 0.0;
    for (row, &t) in probs.rows().into_iter().zip(truth) {
        let predicted = argmax(row.iter().copied());
        confusion[t][predicted] += 1;
        log_loss -= row[t].clamp(1e-15, 1.0).ln();
    }
    let n = truth.len();
    let correct: usize = (0..k).map(|c| confusion[c][c]).sum();
    let per_class = (0..k)
        .map(|c| {
            let tp = confusion[c][c] as f64;
            let predicted: usize = (0..k).map(|t| confusion[t][c]).sum();
            let support: usize = confusion[c].iter().sum();
            let precision = if predicted > 0 {
                tp / predicted as f64
            } else {
                0.0
            };
            let recall = if support > 0 {
                tp / support as f64
            } else {
                0.0
            };
            let f1 = if precision + recall > 0.0 {
                2.0 * precision * recall / (precision + recall)
            } else {
                0.0
            };
            ClassScores {
                class: classes[c].clone(),
                precision,
                recall,
                f1,
                support,
            }
        })
        .collect();
    let roc_auc = (k == 2).then(|| {
        let scores: Vec<f64> = probs.column(1).to_vec();
        let positive: Vec<bool> = truth.iter().map(|&t| t == 1).collect();
        roc_auc(&scores, &positive)
    });
    ClassificationReport {
        rows: n,
        accuracy: correct as f64 / n.max(1) as f64,
        log_loss: log_loss / n.max(1) as f64,
        roc_auc: roc_auc.flatten(),
        per_class,
        confusion,
    }
}

/// The index of the largest value, the first one on ties.
pub fn argmax(values: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, v) in values.enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

/// ROC-AUC by the rank-sum (Mann–Whitney) formula with tied scores sharing their mean rank; `None` when one
/// class is absent.
pub fn roc_auc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let pos = positive.iter().filter(|&&p| p).count();
    let neg = positive.len() - pos;
    if pos == 0 || neg == 0 {
        return None;
    }
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let mean_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += order[i..=j].iter().filter(|&&r| positive[r]).count() as f64 * mean_rank;
        i = j + 1;
    }
    let (pos, neg) = (pos as f64, neg as f64);
    Some((rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg))
}

/// Scores predictions against true values.
pub fn regression(truth: &[f64], predicted: &[f64]) -> RegressionReport {
    let n = truth.len().max(1) as f64;
    let mean = truth.iter().sum::<f64>() / n;
    let (mut ss_res, mut abs, mut ss_tot) = (0.0, 0.0, 0.0);
    for (&t, &p) in truth.iter().zip(predicted) {
        ss_res += (t - p).powi(2);
        abs += (t - p).abs();
        ss_tot += (t - mean).powi(2);
    }
    RegressionReport {
        rows: truth.len(),
        rmse: (ss_res / n).sqrt(),
        mae: abs / n,
        r2: if ss_tot > 0.0 {
            1.0 - ss_res / ss_tot
        } else {
            0.0
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::arr2;

    #[test]
    fn binary_report_by_hand() {
        let classes = vec!["no".to_string(), "yes".to_string()];
        let probs = arr2(&[[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.8, 0.2]]);
        let r = classification(&classes, &[0, 0, 1, 1], probs.view());
        assert_eq!(r.confusion, vec![vec![1, 1], vec![1, 1]]);
        assert_eq!(r.accuracy, 0.5);
        assert_eq!(r.per_class[1].precision, 0.5);
        // Positive scores 0.7, 0.2 against negatives 0.1, 0.6: 3 of 4 pairs ordered right.
        assert_eq!(r.roc_auc, Some(0.75));
        let expected = -(0.9f64.ln() + 0.4f64.ln() + 0.7f64.ln() + 0.2f64.ln()) / 4.0;
        assert!((r.log_loss - expected).abs() < 1e-12);
    }

    #[test]
    fn auc_with_ties_counts_half() {
        assert_eq!(roc_auc(&[0.5, 0.5], &[false, true]), Some(0.5));
        assert_eq!(roc_auc(&[0.1, 0.9], &[true, true]), None);
    }

    #[test]
    fn regression_report_by_hand() {
        let r = regression(&[1.0, 2.0, 3.0], &[1.0, 2.0, 5.0]);
        assert_eq!(r.mae, 2.0 / 3.0);
        assert_eq!(r.r2, 1.0 - 4.0 / 2.0);
        assert!((r.rmse - (4.0f64 / 3.0).sqrt()).abs() < 1e-12);
    }
}
