//! Per-feature training statistics, written to `ferry.json` as the drift baseline monitoring compares live
//! traffic with: count, mean, standard deviation, min, max, quantiles and a histogram. Also the distribution of a
//! model's own predictions on its training rows (`prediction_stats`), the baseline for prediction drift: class
//! frequencies for a label output, the same statistics as a feature's for a numeric output.

use ndarray::ArrayView1;

/// The quantiles recorded for every feature.
pub const QUANTILES: [f64; 7] = [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99];
/// Histogram bins (equal width between min and max).
pub const BINS: usize = 10;

/// One feature's statistics over the training rows.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FeatureStats {
    /// The feature name.
    pub name: String,
    /// Rows counted.
    pub count: usize,
    /// Mean.
    pub mean: f64,
    /// Population standard deviation (what standardization divides by).
    pub std: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// `[q, value]` pairs for [`QUANTILES`] (linear interpolation between order statistics).
    pub quantiles: Vec<[f64; 2]>,
    /// Histogram: `edges` has one more element than `counts`.
    pub histogram: Histogram,
}

/// An equal-width histogram.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Histogram {
    /// Bin edges, ascending.
    pub edges: Vec<f64>,
    /// Rows per bin; the last bin includes its upper edge.
    pub counts: Vec<usize>,
}

/// The `q` quantile (0..=1) of unsorted values, interpolating linearly (numpy's default).
pub fn quantile_unsorted(mut values: Vec<f64>, q: f64) -> f64 {
    values.sort_unstable_by(f64::total_cmp);
    quantile_sorted(&values, q)
}

fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Statistics of one column (which must not be empty).
pub fn feature_stats(name: &str, column: ArrayView1<'_, f64>) -> FeatureStats {
    let mut sorted: Vec<f64> = column.to_vec();
    sorted.sort_unstable_by(f64::total_cmp);
    let n = sorted.len();
    let mean = sorted.iter().sum::<f64>() / n as f64;
    let var = sorted.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
    let (min, max) = (sorted[0], sorted[n - 1]);
    let width = (max - min) / BINS as f64;
    let mut counts = vec![0usize; BINS];
    for v in &sorted {
        let bin = if width > 0.0 {
            (((v - min) / width) as usize).min(BINS - 1)
        } else {
            0
        };
        counts[bin] += 1;
    }
    FeatureStats {
        name: name.to_string(),
        count: n,
        mean,
        std: var.sqrt(),
        min,
        max,
        quantiles: QUANTILES
            .iter()
            .map(|&q| [q, quantile_sorted(&sorted, q)])
            .collect(),
        histogram: Histogram {
            edges: (0..=BINS).map(|i| min + width * i as f64).collect(),
            counts,
        },
    }
}

/// How a prediction baseline describes an output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionKind {
    /// Class labels: how often each was predicted.
    Categorical,
    /// Numbers: a histogram and summary statistics.
    Numeric,
}

/// The distribution of one output's predictions on the training rows (an entry of `prediction_stats`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PredictionStats {
    /// The output's name.
    pub output: String,
    /// Categorical or numeric.
    pub kind: PredictionKind,
    /// Rows predicted.
    pub rows: usize,
    /// Class labels (categorical), in the order of `counts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<String>>,
    /// Rows predicted as each class (categorical).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counts: Option<Vec<usize>>,
    /// Rows whose true label is each class (categorical, when the labels were known), for reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_counts: Option<Vec<usize>>,
    /// Mean (numeric).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean: Option<f64>,
    /// Population standard deviation (numeric).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub std: Option<f64>,
    /// Smallest value (numeric).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Largest value (numeric).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// `[q, value]` pairs for [`QUANTILES`] (numeric).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantiles: Option<Vec<[f64; 2]>>,
    /// Equal-width histogram (numeric): the bins prediction drift counts live values in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub histogram: Option<Histogram>,
}

impl PredictionStats {
    /// Class frequencies of an output: `counts[i]` rows were predicted as `classes[i]`.
    pub fn categorical(
        output: &str,
        classes: Vec<String>,
        counts: Vec<usize>,
        label_counts: Option<Vec<usize>>,
    ) -> PredictionStats {
        PredictionStats {
            output: output.to_string(),
            kind: PredictionKind::Categorical,
            rows: counts.iter().sum(),
            classes: Some(classes),
            counts: Some(counts),
            label_counts,
            mean: None,
            std: None,
            min: None,
            max: None,
            quantiles: None,
            histogram: None,
        }
    }

    /// The distribution of a numeric output (which must not be empty).
    pub fn numeric(output: &str, values: ArrayView1<'_, f64>) -> PredictionStats {
        let s = feature_stats(output, values);
        PredictionStats {
            output: output.to_string(),
            kind: PredictionKind::Numeric,
            rows: s.count,
            classes: None,
            counts: None,
            label_counts: None,
            mean: Some(s.mean),
            std: Some(s.std),
            min: Some(s.min),
            max: Some(s.max),
            quantiles: Some(s.quantiles),
            histogram: Some(s.histogram),
        }
    }

    /// Class frequencies of predicted labels, classes in sorted order (numerically when every label is an integer).
    pub fn from_labels(output: &str, labels: &[String]) -> PredictionStats {
        let mut counts: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
        for l in labels {
            *counts.entry(l.as_str()).or_default() += 1;
        }
        let mut classes: Vec<(&str, usize)> = counts.into_iter().collect();
        if classes.iter().all(|(c, _)| c.parse::<i64>().is_ok()) {
            classes.sort_by_key(|(c, _)| c.parse::<i64>().unwrap_or_default());
        }
        PredictionStats::categorical(
            output,
            classes.iter().map(|(c, _)| c.to_string()).collect(),
            classes.iter().map(|(_, n)| *n).collect(),
            None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::arr1;

    #[test]
    fn statistics_of_one_to_ten() {
        let column = arr1(&[10.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
        let s = feature_stats("x", column.view());
        assert_eq!((s.count, s.mean, s.min, s.max), (10, 5.5, 1.0, 10.0));
        assert!((s.std - 8.25f64.sqrt()).abs() < 1e-12);
        assert_eq!(s.quantiles[3], [0.5, 5.5]);
        assert_eq!(s.histogram.counts, vec![1; 10]);
        assert_eq!(s.histogram.edges.len(), 11);
    }

    #[test]
    fn constant_column_has_one_full_bin() {
        let s = feature_stats("c", arr1(&[2.0, 2.0, 2.0]).view());
        assert_eq!(s.std, 0.0);
        assert_eq!(s.histogram.counts[0], 3);
    }

    #[test]
    fn prediction_baselines_serialize_as_the_server_reads_them() {
        let c = PredictionStats::from_labels("y", &["10".into(), "9".into(), "10".into()]);
        assert_eq!(
            c.classes.as_deref(),
            Some(&["9".to_string(), "10".to_string()][..])
        );
        assert_eq!(c.counts.as_deref(), Some(&[1, 2][..]));
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["kind"], "categorical");
        assert!(json.get("histogram").is_none());
        let n = PredictionStats::numeric("prediction", arr1(&[1.0, 2.0, 3.0]).view());
        let json = serde_json::to_value(&n).unwrap();
        assert_eq!(json["kind"], "numeric");
        assert_eq!(json["rows"], 3);
        assert_eq!(
            json["histogram"]["edges"].as_array().unwrap().len(),
            BINS + 1
        );
    }
}
