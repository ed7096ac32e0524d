//! Per-feature training statistics, written to `ferry.json` as the drift baseline monitoring compares live
//! traffic with: count, mean, standard deviation, min, max, quantiles and a histogram.

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
}
