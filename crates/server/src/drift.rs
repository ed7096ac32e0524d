//! Data drift against the training baseline.
//!
//! `ferry train` writes per-feature histograms of the training data into `ferry.json` (`feature_stats`). For a
//! version with such a baseline and one `[rows, features]` input, [`Drift`] keeps the last `window` sampled rows as
//! bin indices over the baseline's own bin edges (a fixed-size ring, so memory is bounded), and computes, per
//! feature, the population stability index (PSI) and the Kolmogorov–Smirnov statistic between the window and the
//! baseline. The cost on the request path is one binary search per sampled value under a short lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use ferry_model::{NamedTensor, TensorData};
use serde::Serialize;

/// PSI above this is drift by the usual rule of thumb (0.1 to 0.2: moderate, above 0.2: significant).
pub const PSI_THRESHOLD: f64 = 0.2;

/// A feature's training distribution: bin edges and the share of training rows in each bin.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureBaseline {
    /// The feature name.
    pub name: String,
    /// `bins + 1` increasing edges; values outside fall into the first or last bin.
    pub edges: Vec<f64>,
    /// The share of training rows per bin (sums to 1).
    pub shares: Vec<f64>,
}

impl FeatureBaseline {
    /// Reads `feature_stats` from a parsed `ferry.json`; `None` when absent or malformed.
    pub fn from_ferry_json(meta: &serde_json::Value) -> Option<Vec<FeatureBaseline>> {
        let stats = meta.get("feature_stats")?.as_array()?;
        stats
            .iter()
            .map(|s| {
                let name = s.get("name")?.as_str()?.to_string();
                let h = s.get("histogram")?;
                let edges: Vec<f64> = h
                    .get("edges")?
                    .as_array()?
                    .iter()
                    .map(|v| v.as_f64())
                    .collect::<Option<_>>()?;
                let counts: Vec<f64> = h
                    .get("counts")?
                    .as_array()?
                    .iter()
                    .map(|v| v.as_f64())
                    .collect::<Option<_>>()?;
                let total: f64 = counts.iter().sum();
                if edges.len() != counts.len() + 1
                    || counts.is_empty()
                    || counts.len() > 255
                    || total <= 0.0
                {
                    return None;
                }
                Some(FeatureBaseline {
                    name,
                    edges,
                    shares: counts.iter().map(|c| c / total).collect(),
                })
            })
            .collect()
    }

    /// The bin a value falls in.
    fn bin(&self, v: f64) -> u8 {
        let bins = self.shares.len();
        // partition_point gives the number of inner edges <= v, which is the bin index.
        let inner = &self.edges[1..bins];
        inner.partition_point(|e| *e <= v).min(bins - 1) as u8
    }
}

/// One feature's drift figures.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FeatureDrift {
    /// The feature name.
    pub name: String,
    /// Population stability index between the window and the training data.
    pub psi: f64,
    /// Kolmogorov–Smirnov statistic (largest gap between the two cumulative distributions, at bin edges).
    pub ks: f64,
    /// Whether `psi` exceeds [`PSI_THRESHOLD`].
    pub drifted: bool,
}

/// The sampled window of one model version.
#[derive(Debug)]
pub struct Drift {
    baseline: Vec<FeatureBaseline>,
    input: String,
    sample_every: u64,
    seen: AtomicU64,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    capacity: usize,
    /// Bin indices, `features` per row, as a ring of `capacity` rows.
    rows: Vec<u8>,
    next: usize,
    filled: usize,
    counts: Vec<Vec<u64>>,
}

impl Drift {
    /// A drift window over `input` (a `[rows, features]` tensor whose columns are the baseline's features), keeping
    /// the last `window` rows of every `sample_every`-th request.
    pub fn new(
        baseline: Vec<FeatureBaseline>,
        input: String,
        window: usize,
        sample_every: u64,
    ) -> Drift {
        let counts = baseline.iter().map(|b| vec![0; b.shares.len()]).collect();
        Drift {
            input,
            sample_every: sample_every.max(1),
            seen: AtomicU64::new(0),
            window: Mutex::new(Window {
                capacity: window.max(1),
                rows: vec![0; window.max(1) * baseline.len()],
                next: 0,
                filled: 0,
                counts,
            }),
            baseline,
        }
    }

    /// Records a request's rows when it is sampled. Inputs that are not the expected float matrix are ignored.
    pub fn observe(&self, inputs: &[NamedTensor]) {
        if !self
            .seen
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(self.sample_every)
        {
            return;
        }
        let Some(input) = inputs.iter().find(|i| i.name == self.input) else {
            return;
        };
        let width = self.baseline.len();
        if input.tensor.shape.len() != 2 || input.tensor.shape[1] != width {
            return;
        }
        let value = |i: usize| -> f64 {
            match &input.tensor.data {
                TensorData::F32(v) => f64::from(v[i]),
                TensorData::F64(v) => v[i],
                TensorData::F16(v) => v[i].to_f64(),
                _ => f64::NAN,
            }
        };
        if !matches!(
            input.tensor.data,
            TensorData::F32(_) | TensorData::F64(_) | TensorData::F16(_)
        ) {
            return;
        }
        // Bin outside the lock; only the ring update holds it.
        let rows = input.tensor.shape[0];
        let bins: Vec<u8> = (0..rows * width)
            .map(|i| self.baseline[i % width].bin(value(i)))
            .collect();
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        for row in bins.chunks(width) {
            let at = w.next * width;
            for (f, bin) in row.iter().enumerate() {
                if w.filled == w.capacity {
                    let old = w.rows[at + f] as usize;
                    w.counts[f][old] -= 1;
                }
                w.rows[at + f] = *bin;
                w.counts[f][*bin as usize] += 1;
            }
            w.next = (w.next + 1) % w.capacity;
            w.filled = (w.filled + 1).min(w.capacity);
        }
    }

    /// The number of rows in the window.
    pub fn rows(&self) -> usize {
        self.window.lock().unwrap_or_else(|p| p.into_inner()).filled
    }

    /// PSI and KS per feature over the current window (empty while the window is empty).
    pub fn report(&self) -> Vec<FeatureDrift> {
        let w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if w.filled == 0 {
            return Vec::new();
        }
        let n = w.filled as f64;
        self.baseline
            .iter()
            .zip(&w.counts)
            .map(|(b, counts)| {
                // A small floor keeps empty bins from making PSI infinite.
                const FLOOR: f64 = 1e-4;
                let mut psi = 0.0;
                let (mut cum_live, mut cum_base, mut ks) = (0.0f64, 0.0f64, 0.0f64);
                for (expected, live) in b.shares.iter().zip(counts) {
                    let actual = *live as f64 / n;
                    let (e, a) = (expected.max(FLOOR), actual.max(FLOOR));
                    psi += (a - e) * (a / e).ln();
                    cum_live += actual;
                    cum_base += expected;
                    ks = ks.max((cum_live - cum_base).abs());
                }
                FeatureDrift {
                    name: b.name.clone(),
                    psi,
                    ks,
                    drifted: psi > PSI_THRESHOLD,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::Tensor;

    fn baseline() -> Vec<FeatureBaseline> {
        // Two features, uniform over [0, 10) in ten bins.
        (0..2)
            .map(|f| FeatureBaseline {
                name: format!("f{f}"),
                edges: (0..=10).map(f64::from).collect(),
                shares: vec![0.1; 10],
            })
            .collect()
    }

    fn rows(values: impl Iterator<Item = (f32, f32)>) -> Vec<NamedTensor> {
        let flat: Vec<f32> = values.flat_map(|(a, b)| [a, b]).collect();
        let n = flat.len() / 2;
        vec![NamedTensor::new(
            "x",
            Tensor::new(vec![n, 2], TensorData::F32(flat)).unwrap(),
        )]
    }

    #[test]
    fn same_distribution_stays_low_and_a_shift_is_flagged() {
        let d = Drift::new(baseline(), "x".into(), 1000, 1);
        assert!(d.report().is_empty());
        d.observe(&rows(
            (0..1000).map(|i| ((i % 100) as f32 / 10.0, (i % 100) as f32 / 10.0)),
        ));
        let r = d.report();
        assert!(
            r.iter().all(|f| f.psi < 0.01 && f.ks < 0.02 && !f.drifted),
            "{r:?}"
        );
        // Shift f1 by +5: half its mass leaves the training range (into the last bin).
        d.observe(&rows((0..1000).map(|i| {
            ((i % 100) as f32 / 10.0, (i % 100) as f32 / 10.0 + 5.0)
        })));
        let r = d.report();
        assert!(!r[0].drifted && r[0].psi < 0.01, "{r:?}");
        assert!(r[1].drifted && r[1].psi > 1.0 && r[1].ks > 0.4, "{r:?}");
        assert_eq!(d.rows(), 1000, "the window keeps the last 1000 rows");
    }

    #[test]
    fn sampling_and_shape_checks() {
        let d = Drift::new(baseline(), "x".into(), 10, 2);
        d.observe(&rows([(1.0, 1.0)].into_iter()));
        d.observe(&rows([(1.0, 1.0)].into_iter()));
        assert_eq!(d.rows(), 1, "every second request is sampled");
        let wrong = vec![NamedTensor::new(
            "x",
            Tensor::new(vec![1, 3], TensorData::F32(vec![0.0; 3])).unwrap(),
        )];
        d.observe(&wrong);
        d.observe(&wrong);
        assert_eq!(d.rows(), 1);
    }

    #[test]
    fn baselines_come_from_ferry_json() {
        let meta = serde_json::json!({"feature_stats": [
            {"name": "a", "histogram": {"edges": [0.0, 1.0, 2.0], "counts": [3, 1]}},
        ]});
        let b = FeatureBaseline::from_ferry_json(&meta).unwrap();
        assert_eq!(b[0].shares, vec![0.75, 0.25]);
        assert_eq!(b[0].bin(-5.0), 0);
        assert_eq!(b[0].bin(1.0), 1);
        assert_eq!(b[0].bin(99.0), 1);
        assert!(FeatureBaseline::from_ferry_json(&serde_json::json!({})).is_none());
    }
}
