//! Data and prediction drift against the training baseline.
//!
//! `ferry train` writes per-feature histograms of the training data into `ferry.json` (`feature_stats`), and the
//! distribution of the model's own predictions on its training rows (`prediction_stats`: class frequencies of a
//! label output, a histogram of a numeric output); `ferry baseline` writes both for models made elsewhere. For a
//! version with such a baseline, [`Drift`] keeps the last `window` sampled rows of its input (when it is one
//! `[rows, features]` float matrix) and of each tracked output as bin indices over the baseline's own bins (fixed-size
//! rings, so memory is bounded), and computes the population stability index (PSI) against the baseline, with the
//! Kolmogorov–Smirnov statistic for numeric values. One request in `sample_every` is sampled; the cost on the request
//! path is one binary search (or one class lookup) per sampled value, under short locks.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use ferry_model::{NamedTensor, TensorData};
use serde::Serialize;

/// PSI above this is drift by the usual rule of thumb (0.1 to 0.2: moderate, above 0.2: significant).
pub const PSI_THRESHOLD: f64 = 0.2;

/// The rows a window needs before drift is judged (or the whole window, when `drift_window` is smaller): PSI over a
/// handful of rows is noise (4 rows gave every feature of a healthy model a PSI of 7.4).
pub const MIN_WINDOW_ROWS: usize = 100;

/// Values binned on the stack before they go into a window (larger requests allocate).
const SMALL: usize = 256;

/// The most recent sampled input rows kept as values (not only bins), for feature importance over live traffic.
pub const RECENT_ROWS: usize = 256;

/// The last [`RECENT_ROWS`] sampled input rows, as values: a ring.
#[derive(Debug)]
struct Recent {
    width: usize,
    values: Vec<f64>,
    next: usize,
    filled: usize,
}

impl Recent {
    fn push(&mut self, row: impl Iterator<Item = f64>) {
        let start = self.next * self.width;
        if self.values.len() < start + self.width {
            self.values.resize(start + self.width, f64::NAN);
        }
        for (slot, v) in self.values[start..start + self.width].iter_mut().zip(row) {
            *slot = v;
        }
        self.next = (self.next + 1) % RECENT_ROWS;
        self.filled = (self.filled + 1).min(RECENT_ROWS);
    }
}

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
        edge_bin(&self.edges, v) as u8
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

/// A tracked output's training distribution (`prediction_stats` in `ferry.json`): the model's own predictions on its
/// training rows.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictionBaseline {
    /// The output's name.
    pub output: String,
    /// How its values are binned.
    pub bins: PredictionBins,
    /// The share of training predictions per bin (for classes, one more bin, at 0, for labels not among them).
    pub shares: Vec<f64>,
}

/// The bins of a tracked output.
#[derive(Debug, Clone, PartialEq)]
pub enum PredictionBins {
    /// Class labels (a string or integer output, one value per row); other values fall into one more bin.
    Classes(Vec<String>),
    /// `bins + 1` increasing edges of a numeric output (one float per row); values outside fall into the end bins.
    Edges(Vec<f64>),
}

impl PredictionBaseline {
    /// Reads `prediction_stats` from a parsed `ferry.json`; `None` when absent or malformed.
    pub fn from_ferry_json(meta: &serde_json::Value) -> Option<Vec<PredictionBaseline>> {
        let stats = meta.get("prediction_stats")?.as_array()?;
        let numbers = |v: &serde_json::Value| -> Option<Vec<f64>> {
            v.as_array()?.iter().map(|x| x.as_f64()).collect()
        };
        stats
            .iter()
            .map(|s| {
                let output = s.get("output")?.as_str()?.to_string();
                let (bins, counts) = match s.get("kind")?.as_str()? {
                    "categorical" => {
                        let classes: Vec<String> = s
                            .get("classes")?
                            .as_array()?
                            .iter()
                            .map(|c| c.as_str().map(str::to_string))
                            .collect::<Option<_>>()?;
                        let mut counts = numbers(s.get("counts")?)?;
                        if counts.len() != classes.len() || classes.len() >= usize::from(u16::MAX) {
                            return None;
                        }
                        counts.push(0.0);
                        (PredictionBins::Classes(classes), counts)
                    }
                    "numeric" => {
                        let h = s.get("histogram")?;
                        let edges = numbers(h.get("edges")?)?;
                        let counts = numbers(h.get("counts")?)?;
                        if edges.len() != counts.len() + 1 || counts.len() > 255 {
                            return None;
                        }
                        (PredictionBins::Edges(edges), counts)
                    }
                    _ => return None,
                };
                let total: f64 = counts.iter().sum();
                if counts.is_empty() || total <= 0.0 {
                    return None;
                }
                Some(PredictionBaseline {
                    output,
                    bins,
                    shares: counts.iter().map(|c| c / total).collect(),
                })
            })
            .collect()
    }
}

/// One output's prediction drift figures.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PredictionDrift {
    /// The output's name.
    pub output: String,
    /// `categorical` (class frequencies) or `numeric` (a histogram).
    pub kind: &'static str,
    /// Rows in its window.
    pub window_rows: usize,
    /// Population stability index between the window and the training predictions.
    pub psi: f64,
    /// Kolmogorov–Smirnov statistic (numeric outputs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ks: Option<f64>,
    /// Whether `psi` exceeds [`PSI_THRESHOLD`].
    pub drifted: bool,
    /// For classes: each class's share in training predictions and in the window (`(other)` for unknown labels).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<ClassShare>,
}

/// A class's share of predictions.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClassShare {
    /// The class label.
    pub class: String,
    /// Its share of the model's predictions on its training rows.
    pub expected: f64,
    /// Its share of the window.
    pub actual: f64,
}

/// A version's drift: per feature of its input, per tracked output.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Report {
    /// Input features (empty until the window holds enough rows, or without a feature baseline).
    pub features: Vec<FeatureDrift>,
    /// Tracked outputs (those with enough rows in their window).
    pub predictions: Vec<PredictionDrift>,
    /// Why some figures are missing: `not enough rows (4 of the 100 needed)` while a window fills.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

/// A ring of binned rows and the count per bin of each column.
#[derive(Debug)]
struct Window {
    capacity: usize,
    width: usize,
    /// Bin indices, `width` per row, as a ring of `capacity` rows.
    rows: Vec<u16>,
    next: usize,
    filled: usize,
    counts: Vec<Vec<u64>>,
}

impl Window {
    /// The rows needed before this window's drift is judged.
    fn min_rows(&self) -> usize {
        MIN_WINDOW_ROWS.min(self.capacity).max(1)
    }

    fn new(capacity: usize, bins: impl Iterator<Item = usize>) -> Window {
        let counts: Vec<Vec<u64>> = bins.map(|b| vec![0; b]).collect();
        let capacity = capacity.max(1);
        Window {
            capacity,
            width: counts.len(),
            rows: vec![0; capacity * counts.len()],
            next: 0,
            filled: 0,
            counts,
        }
    }

    /// Adds rows of `width` bin indices each, evicting the oldest past capacity.
    fn push(&mut self, bins: &[u16]) {
        let width = self.width;
        for row in bins.chunks(width) {
            let at = self.next * width;
            for (f, bin) in row.iter().enumerate() {
                if self.filled == self.capacity {
                    let old = self.rows[at + f] as usize;
                    self.counts[f][old] -= 1;
                }
                self.rows[at + f] = *bin;
                self.counts[f][*bin as usize] += 1;
            }
            self.next = (self.next + 1) % self.capacity;
            self.filled = (self.filled + 1).min(self.capacity);
        }
    }
}

/// PSI and KS of live counts (`n` rows) against baseline shares.
fn compare(shares: &[f64], counts: &[u64], n: usize) -> (f64, f64) {
    // A small floor keeps empty bins from making PSI infinite.
    const FLOOR: f64 = 1e-4;
    let n = n as f64;
    let mut psi = 0.0;
    let (mut cum_live, mut cum_base, mut ks) = (0.0f64, 0.0f64, 0.0f64);
    for (expected, live) in shares.iter().zip(counts) {
        let actual = *live as f64 / n;
        let (e, a) = (expected.max(FLOOR), actual.max(FLOOR));
        psi += (a - e) * (a / e).ln();
        cum_live += actual;
        cum_base += expected;
        ks = ks.max((cum_live - cum_base).abs());
    }
    (psi, ks)
}

/// The input side of a version's drift.
#[derive(Debug)]
struct InputWindow {
    baseline: Vec<FeatureBaseline>,
    input: String,
    window: Mutex<Window>,
    recent: Mutex<Recent>,
}

/// One tracked output.
#[derive(Debug)]
struct OutputWindow {
    baseline: PredictionBaseline,
    /// Class label bytes to bin, and integer labels to bin (labels that parse as integers).
    labels: HashMap<Vec<u8>, u16>,
    integers: HashMap<i64, u16>,
    window: Mutex<Window>,
}

impl OutputWindow {
    fn new(baseline: PredictionBaseline, capacity: usize) -> OutputWindow {
        let (mut labels, mut integers) = (HashMap::new(), HashMap::new());
        if let PredictionBins::Classes(classes) = &baseline.bins {
            for (i, c) in classes.iter().enumerate() {
                labels.insert(c.as_bytes().to_vec(), i as u16);
                if let Ok(n) = c.parse::<i64>() {
                    integers.insert(n, i as u16);
                }
            }
        }
        let window = Window::new(capacity, std::iter::once(baseline.shares.len()));
        OutputWindow {
            baseline,
            labels,
            integers,
            window: Mutex::new(window),
        }
    }

    /// The bins of one output tensor's values, when it is the kind of output the baseline describes.
    fn bins(&self, data: &TensorData) -> Option<Vec<u16>> {
        let other = (self.baseline.shares.len() - 1) as u16;
        let int = |v: i64| self.integers.get(&v).copied().unwrap_or(other);
        Some(match (&self.baseline.bins, data) {
            (PredictionBins::Classes(_), TensorData::Bytes(v)) => v
                .iter()
                .map(|b| self.labels.get(b).copied().unwrap_or(other))
                .collect(),
            (PredictionBins::Classes(_), TensorData::I64(v)) => v.iter().map(|x| int(*x)).collect(),
            (PredictionBins::Classes(_), TensorData::I32(v)) => {
                v.iter().map(|x| int(i64::from(*x))).collect()
            }
            (PredictionBins::Classes(_), TensorData::I16(v)) => {
                v.iter().map(|x| int(i64::from(*x))).collect()
            }
            (PredictionBins::Classes(_), TensorData::I8(v)) => {
                v.iter().map(|x| int(i64::from(*x))).collect()
            }
            (PredictionBins::Classes(_), TensorData::U8(v)) => {
                v.iter().map(|x| int(i64::from(*x))).collect()
            }
            (PredictionBins::Classes(_), TensorData::U16(v)) => {
                v.iter().map(|x| int(i64::from(*x))).collect()
            }
            (PredictionBins::Classes(_), TensorData::U32(v)) => {
                v.iter().map(|x| int(i64::from(*x))).collect()
            }
            (PredictionBins::Classes(_), TensorData::U64(v)) => v
                .iter()
                .map(|x| i64::try_from(*x).map_or(other, int))
                .collect(),
            (PredictionBins::Classes(_), TensorData::Bool(v)) => {
                v.iter().map(|x| int(i64::from(*x))).collect()
            }
            (PredictionBins::Edges(edges), TensorData::F32(v)) => {
                v.iter().map(|x| edge_bin(edges, f64::from(*x))).collect()
            }
            (PredictionBins::Edges(edges), TensorData::F64(v)) => {
                v.iter().map(|x| edge_bin(edges, *x)).collect()
            }
            (PredictionBins::Edges(edges), TensorData::F16(v)) => {
                v.iter().map(|x| edge_bin(edges, x.to_f64())).collect()
            }
            _ => return None,
        })
    }

    fn report(&self) -> Option<PredictionDrift> {
        let w = self.window.lock();
        if w.filled < w.min_rows() {
            return None;
        }
        let (psi, ks) = compare(&self.baseline.shares, &w.counts[0], w.filled);
        let (kind, ks, classes) = match &self.baseline.bins {
            PredictionBins::Classes(names) => {
                let n = w.filled as f64;
                let classes = names
                    .iter()
                    .map(String::as_str)
                    .chain(std::iter::once("(other)"))
                    .zip(self.baseline.shares.iter().zip(&w.counts[0]))
                    .map(|(class, (expected, live))| ClassShare {
                        class: class.to_string(),
                        expected: *expected,
                        actual: *live as f64 / n,
                    })
                    .collect();
                ("categorical", None, classes)
            }
            PredictionBins::Edges(_) => ("numeric", Some(ks), Vec::new()),
        };
        Some(PredictionDrift {
            output: self.baseline.output.clone(),
            kind,
            window_rows: w.filled,
            psi,
            ks,
            drifted: psi > PSI_THRESHOLD,
            classes,
        })
    }
}

/// The bin of `v` over `edges` (values outside go to the end bins).
fn edge_bin(edges: &[f64], v: f64) -> u16 {
    let bins = edges.len() - 1;
    // partition_point gives the number of inner edges <= v, which is the bin index.
    edges[1..bins].partition_point(|e| *e <= v).min(bins - 1) as u16
}

/// The sampled windows of one model version: its input's features and its tracked outputs.
#[derive(Debug)]
pub struct Drift {
    sample_every: u64,
    seen: AtomicU64,
    inputs: Option<InputWindow>,
    outputs: Vec<OutputWindow>,
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
        Drift::from_parts(Some((baseline, input)), Vec::new(), window, sample_every)
            .expect("an input baseline makes a drift window")
    }

    /// Windows for the input features (when `inputs` gives their baseline and the input's name) and for each
    /// output in `predictions`; `None` when there is nothing to track or `sample_every` is 0 (drift off).
    pub fn from_parts(
        inputs: Option<(Vec<FeatureBaseline>, String)>,
        predictions: Vec<PredictionBaseline>,
        window: usize,
        sample_every: u64,
    ) -> Option<Drift> {
        if sample_every == 0 || (inputs.is_none() && predictions.is_empty()) {
            return None;
        }
        Some(Drift {
            sample_every,
            seen: AtomicU64::new(0),
            inputs: inputs.map(|(baseline, input)| InputWindow {
                window: Mutex::new(Window::new(window, baseline.iter().map(|b| b.shares.len()))),
                recent: Mutex::new(Recent {
                    width: baseline.len(),
                    values: Vec::new(),
                    next: 0,
                    filled: 0,
                }),
                baseline,
                input,
            }),
            outputs: predictions
                .into_iter()
                .map(|p| OutputWindow::new(p, window))
                .collect(),
        })
    }

    /// Counts a request and says whether it is sampled (one in `sample_every`).
    pub fn sample(&self) -> bool {
        self.seen
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(self.sample_every)
    }

    /// Records a request's input rows when it is sampled, and says whether it was (so its outputs can follow with
    /// [`Drift::observe_outputs`]). Inputs that are not the expected float matrix are ignored.
    pub fn observe(&self, inputs: &[NamedTensor]) -> bool {
        if !self.sample() {
            return false;
        }
        self.observe_inputs(inputs);
        true
    }

    /// Records the input rows of a sampled request.
    pub fn observe_inputs(&self, inputs: &[NamedTensor]) {
        let Some(side) = &self.inputs else {
            return;
        };
        let Some(input) = inputs.iter().find(|i| i.name == side.input) else {
            return;
        };
        let width = side.baseline.len();
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
        // Bin outside the lock (on the stack for small requests); only the ring update holds it.
        let n = input.tensor.shape[0] * width;
        let bin = |i: usize| u16::from(side.baseline[i % width].bin(value(i)));
        let mut small = [0u16; SMALL];
        let bins: std::borrow::Cow<'_, [u16]> = if n <= SMALL {
            for (i, b) in small[..n].iter_mut().enumerate() {
                *b = bin(i);
            }
            std::borrow::Cow::Borrowed(&small[..n])
        } else {
            std::borrow::Cow::Owned((0..n).map(bin).collect())
        };
        side.window.lock().push(&bins);
        // The values of the last rows (at most RECENT_ROWS of this request), for importance over live traffic.
        let rows = input.tensor.shape[0];
        let mut recent = side.recent.lock();
        for r in rows.saturating_sub(RECENT_ROWS)..rows {
            recent.push((r * width..(r + 1) * width).map(value));
        }
    }

    /// The values of the last sampled input rows (at most [`RECENT_ROWS`]), row-major, and how many rows.
    pub fn recent_rows(&self) -> (usize, Vec<f64>) {
        let Some(side) = &self.inputs else {
            return (0, Vec::new());
        };
        let recent = side.recent.lock();
        (
            recent.filled,
            recent.values[..recent.filled * recent.width].to_vec(),
        )
    }

    /// Records the tracked outputs of a sampled request (outputs of another kind or shape are ignored).
    pub fn observe_outputs(&self, outputs: &[NamedTensor]) {
        for w in &self.outputs {
            let Some(out) = outputs.iter().find(|o| o.name == w.baseline.output) else {
                continue;
            };
            if !matches!(out.tensor.shape.as_slice(), [_] | [_, 1]) {
                continue;
            }
            if let Some(bins) = w.bins(&out.tensor.data) {
                w.window.lock().push(&bins);
            }
        }
    }

    /// Whether it tracks input features.
    pub fn has_inputs(&self) -> bool {
        self.inputs.is_some()
    }

    /// The number of input rows in the window.
    pub fn rows(&self) -> usize {
        self.inputs.as_ref().map_or(0, |i| i.window.lock().filled)
    }

    /// PSI and KS per feature, and per tracked output, over the current windows.
    pub fn report(&self) -> Report {
        let status = self
            .inputs
            .as_ref()
            .map(|i| &i.window)
            .into_iter()
            .chain(self.outputs.iter().map(|o| &o.window))
            .find_map(|w| {
                let w = w.lock();
                (w.filled < w.min_rows()).then(|| {
                    format!(
                        "not enough rows ({} of the {} needed before drift is judged)",
                        w.filled,
                        w.min_rows()
                    )
                })
            });
        Report {
            features: self
                .inputs
                .as_ref()
                .map(InputWindow::report)
                .unwrap_or_default(),
            predictions: self
                .outputs
                .iter()
                .filter_map(OutputWindow::report)
                .collect(),
            status,
        }
    }
}

impl InputWindow {
    fn report(&self) -> Vec<FeatureDrift> {
        let w = self.window.lock();
        if w.filled < w.min_rows() {
            return Vec::new();
        }
        self.baseline
            .iter()
            .zip(&w.counts)
            .map(|(b, counts)| {
                let (psi, ks) = compare(&b.shares, counts, w.filled);
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
    fn drift_is_not_judged_on_a_few_rows() {
        let baseline = vec![FeatureBaseline {
            name: "a".into(),
            edges: vec![0.0, 1.0, 2.0],
            shares: vec![0.5, 0.5],
        }];
        let d = Drift::new(baseline, "x".into(), 1000, 1);
        let x = |rows: usize| {
            vec![NamedTensor::new(
                "x",
                Tensor::new(vec![rows, 1], ferry_model::TensorData::F32(vec![0.5; rows])).unwrap(),
            )]
        };
        d.observe(&x(4));
        let r = d.report();
        assert!(r.features.is_empty(), "{r:?}");
        assert_eq!(
            r.status.as_deref(),
            Some("not enough rows (4 of the 100 needed before drift is judged)")
        );
        d.observe(&x(96));
        let r = d.report();
        assert_eq!(r.status, None);
        assert!(r.features[0].drifted, "all rows in one bin: {r:?}");
        // A window smaller than the minimum is judged once full.
        let small = Drift::new(
            vec![FeatureBaseline {
                name: "a".into(),
                edges: vec![0.0, 1.0, 2.0],
                shares: vec![0.5, 0.5],
            }],
            "x".into(),
            10,
            1,
        );
        small.observe(&x(10));
        assert_eq!(small.report().features.len(), 1);
    }

    #[test]
    fn same_distribution_stays_low_and_a_shift_is_flagged() {
        let d = Drift::new(baseline(), "x".into(), 1000, 1);
        assert!(d.report().features.is_empty());
        d.observe(&rows(
            (0..1000).map(|i| ((i % 100) as f32 / 10.0, (i % 100) as f32 / 10.0)),
        ));
        let r = d.report().features;
        assert!(
            r.iter().all(|f| f.psi < 0.01 && f.ks < 0.02 && !f.drifted),
            "{r:?}"
        );
        // Shift f1 by +5: half its mass leaves the training range (into the last bin).
        d.observe(&rows((0..1000).map(|i| {
            ((i % 100) as f32 / 10.0, (i % 100) as f32 / 10.0 + 5.0)
        })));
        let r = d.report().features;
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

    fn labels(values: &[&str]) -> Vec<NamedTensor> {
        vec![NamedTensor::new(
            "label",
            Tensor::new(
                vec![values.len()],
                TensorData::Bytes(values.iter().map(|v| v.as_bytes()).collect()),
            )
            .unwrap(),
        )]
    }

    #[test]
    fn predicted_class_frequencies_drift_when_one_class_takes_over() {
        let meta = serde_json::json!({"prediction_stats": [
            {"output": "label", "kind": "categorical", "classes": ["a", "b", "c"], "counts": [10, 10, 10]},
        ]});
        let baseline = PredictionBaseline::from_ferry_json(&meta).unwrap();
        let d = Drift::from_parts(None, baseline, 30, 1).unwrap();
        assert!(!d.has_inputs());
        assert!(d.report().predictions.is_empty());
        d.observe_outputs(&labels(&["a", "b", "c"].repeat(10)));
        let p = &d.report().predictions[0];
        assert_eq!((p.kind, p.window_rows, p.ks), ("categorical", 30, None));
        assert!(p.psi < 0.01 && !p.drifted, "{p:?}");
        assert_eq!(p.classes.len(), 4, "three classes and (other)");
        // Two thirds of the window turn into `a`, and an unknown label appears.
        d.observe_outputs(&labels(&["a"; 19]));
        d.observe_outputs(&labels(&["zzz"]));
        let p = &d.report().predictions[0];
        assert!(p.drifted && p.psi > PSI_THRESHOLD, "{p:?}");
        assert_eq!(p.classes[3].class, "(other)");
        assert!((p.classes[3].actual - 1.0 / 30.0).abs() < 1e-12);
    }

    #[test]
    fn integer_labels_and_numeric_outputs() {
        let meta = serde_json::json!({"prediction_stats": [
            {"output": "y", "kind": "categorical", "classes": ["0", "1"], "counts": [1, 1]},
            {"output": "v", "kind": "numeric", "histogram": {"edges": [0.0, 1.0, 2.0, 3.0, 4.0], "counts": [1, 1, 1, 1]}},
        ]});
        let baseline = PredictionBaseline::from_ferry_json(&meta).unwrap();
        let d = Drift::from_parts(None, baseline, 4, 1).unwrap();
        let out = |ys: Vec<i64>, vs: Vec<f32>| {
            vec![
                NamedTensor::new(
                    "y",
                    Tensor::new(vec![ys.len()], TensorData::I64(ys)).unwrap(),
                ),
                NamedTensor::new(
                    "v",
                    Tensor::new(vec![vs.len(), 1], TensorData::F32(vs)).unwrap(),
                ),
            ]
        };
        d.observe_outputs(&out(vec![0, 1, 0, 1], vec![0.5, 1.5, 2.5, 3.5]));
        let r = d.report().predictions;
        assert_eq!(r.len(), 2);
        assert!(r.iter().all(|p| p.psi < 0.01), "{r:?}");
        assert_eq!(r[1].kind, "numeric");
        assert_eq!(r[1].ks, Some(0.0));
        // Every new value lands above the training range.
        d.observe_outputs(&out(vec![1; 96], vec![9.0; 96]));
        let r = d.report().predictions;
        assert!(r[0].drifted && r[1].drifted, "{r:?}");
        assert!(r[1].ks.unwrap() > 0.7, "{r:?}");
    }

    #[test]
    fn drift_off_and_sampling_covers_outputs_too() {
        let meta = serde_json::json!({"prediction_stats": [
            {"output": "label", "kind": "categorical", "classes": ["a"], "counts": [1]},
        ]});
        let baseline = PredictionBaseline::from_ferry_json(&meta).unwrap();
        assert!(
            Drift::from_parts(None, baseline.clone(), 10, 0).is_none(),
            "0 turns drift off"
        );
        assert!(Drift::from_parts(None, Vec::new(), 10, 1).is_none());
        let d = Drift::from_parts(None, baseline, 10, 3).unwrap();
        let sampled: Vec<bool> = (0..6).map(|_| d.observe(&[])).collect();
        assert_eq!(sampled, [true, false, false, true, false, false]);
        assert!(
            PredictionBaseline::from_ferry_json(&serde_json::json!({"prediction_stats": [
                {"output": "x", "kind": "categorical", "classes": ["a"], "counts": [1, 2]}
            ]}))
            .is_none()
        );
    }
}
