//! KernelSHAP for any model with a numeric `[rows, features]` input, run through a batch closure.
//!
//! The value of a coalition S of features is v(S) = mean over the background rows z of f(x_S, z_S̄): the model on
//! the rows that take x's values for the features in S and z's for the others. v(∅) (the base value) is the mean
//! output over the background, computed once for all explained rows; v(all) is f(x).
//!
//! Features whose value in x equals every background row's (NaN equal to NaN) cannot change any coalition's value:
//! their attribution is 0 and they are left out of the coalitions, as shap does. With M features left:
//! - when M ≤ [`KernelOptions::exact_max_features`], every one of the 2^M coalitions is evaluated and the Shapley
//!   values are computed from them exactly ([`Method::KernelExact`]);
//! - otherwise coalitions are drawn as shap's `KernelExplainer` draws them: subset sizes whose every subset fits
//!   the budget are enumerated whole (with their Shapley-kernel weight), the rest sampled by the kernel in
//!   complementary pairs (a subset and its complement), repeated draws adding weight; the attributions solve the
//!   weighted least-squares problem with Σφ = f(x) − v(∅) enforced exactly, by eliminating the last feature
//!   ([`Method::KernelSampled`]). When the budget covers every coalition the answer is exact and is reported as
//!   `KernelExact`.
//!
//! The perturbed rows of all explained rows are built in one stream and handed to the closure in batches of at
//! most [`KernelOptions::max_rows_per_call`] rows, so a batching engine sees large batches. The answer depends on
//! the seed, not on the batch size: outputs are summed in the order the rows were built.

use std::collections::HashMap;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{row_count, Attribution, ExplainError, Explanation, Method};

/// The most features exact enumeration accepts (2^20 coalitions per row).
pub const MAX_EXACT_FEATURES: usize = 20;
/// The most varying features the sampled method solves for (its linear system is that size squared).
pub const MAX_SAMPLED_FEATURES: usize = 1024;
/// The most outputs per row a model may answer.
pub const MAX_OUTPUTS: usize = crate::model::MAX_OUTPUTS;

/// How KernelSHAP runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelOptions {
    /// Enumerate every coalition when at most this many features vary (at most [`MAX_EXACT_FEATURES`]).
    pub exact_max_features: usize,
    /// Coalitions per explained row when sampling (the empty and full coalitions not counted); capped at the
    /// number of coalitions there are. shap's default is 2M + 2048.
    pub coalitions: usize,
    /// The most rows handed to the model in one call.
    pub max_rows_per_call: usize,
    /// The most model rows one call of [`explain`] may run in all; more is refused before any run.
    pub max_model_rows: u64,
    /// The seed of the sampling (the same seed, rows and background give the same answer).
    pub seed: u64,
}

impl Default for KernelOptions {
    fn default() -> KernelOptions {
        KernelOptions {
            exact_max_features: 10,
            coalitions: 2048,
            max_rows_per_call: 4096,
            max_model_rows: 1 << 24,
            seed: 0,
        }
    }
}

/// Why KernelSHAP failed: the request, or the model.
#[derive(Debug, thiserror::Error)]
pub enum KernelError<E> {
    /// The rows, background, options or the model's answer shape were wrong.
    #[error(transparent)]
    Explain(#[from] ExplainError),
    /// The model failed; its error as the closure returned it.
    #[error("the model failed: {0}")]
    Model(E),
}

/// The plan for one explained row.
struct RowPlan {
    /// The features that vary against the background (coalitions are over these).
    varying: Vec<usize>,
    /// u64 words per mask.
    words: usize,
    /// Masks over `varying`, `words` each (the empty and full coalitions excluded).
    masks: Vec<u64>,
    /// Kernel weight per mask (sampled plans only).
    weights: Vec<f64>,
    /// Every coalition is there, enumerated in order of its bits (mask m at position m − 1).
    exact: bool,
    /// First slot: f(x); the coalitions follow.
    slot: usize,
}

impl RowPlan {
    fn count(&self) -> usize {
        self.masks.len() / self.words.max(1)
    }
    fn mask(&self, c: usize) -> &[u64] {
        &self.masks[c * self.words..(c + 1) * self.words]
    }
}

fn has(mask: &[u64], i: usize) -> bool {
    mask[i / 64] >> (i % 64) & 1 == 1
}

fn set(mask: &mut [u64], i: usize) {
    mask[i / 64] |= 1 << (i % 64);
}

/// The features of `0..m` that `mask` leaves out.
fn complement(mask: &[u64], m: usize) -> Vec<u64> {
    (0..mask.len())
        .map(|k| {
            let bits = (m - k * 64).min(64);
            let valid = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            !mask[k] & valid
        })
        .collect()
}

fn binomial(n: usize, k: usize) -> f64 {
    let k = k.min(n - k);
    (1..=k).fold(1.0, |acc, i| acc * (n - k + i) as f64 / i as f64)
}

/// shap's coalition draw: whole subset sizes while the budget covers them, then kernel-weighted paired samples.
fn sample(m: usize, budget: usize, rng: &mut ChaCha8Rng) -> (Vec<u64>, Vec<f64>, bool) {
    let words = m.div_ceil(64);
    let mut masks: Vec<u64> = Vec::new();
    let mut weights: Vec<f64> = Vec::new();
    let sizes = (m - 1).div_ceil(2);
    let paired = (m - 1) / 2;
    let mut kernel: Vec<f64> = (1..=sizes)
        .map(|s| (m - 1) as f64 / (s * (m - s)) as f64)
        .collect();
    for w in kernel.iter_mut().take(paired) {
        *w *= 2.0;
    }
    let total: f64 = kernel.iter().sum();
    kernel.iter_mut().for_each(|w| *w /= total);
    let mut remaining = kernel.clone();
    let mut left = budget as f64;
    let mut full = 0;
    for s in 1..=sizes {
        let mut subsets = binomial(m, s);
        if s <= paired {
            subsets *= 2.0;
        }
        if left * remaining[s - 1] / subsets < 1.0 - 1e-8 {
            break;
        }
        full += 1;
        left -= subsets;
        if remaining[s - 1] < 1.0 {
            let scale = 1.0 - remaining[s - 1];
            remaining.iter_mut().for_each(|w| *w /= scale);
        }
        let mut w = kernel[s - 1] / binomial(m, s);
        if s <= paired {
            w /= 2.0;
        }
        // Every subset of size s, in lexicographic order of its members.
        let mut members: Vec<usize> = (0..s).collect();
        loop {
            let mut mask = vec![0u64; words];
            members.iter().for_each(|&i| set(&mut mask, i));
            masks.extend_from_slice(&mask);
            weights.push(w);
            if s <= paired {
                let complement = complement(&mask, m);
                masks.extend_from_slice(&complement);
                weights.push(w);
            }
            // Next combination.
            let mut i = s;
            while i > 0 && members[i - 1] == m - s + i - 1 {
                i -= 1;
            }
            if i == 0 {
                break;
            }
            members[i - 1] += 1;
            for j in i..s {
                members[j] = members[j - 1] + 1;
            }
        }
    }
    let fixed = weights.len();
    let all = full == sizes;
    if !all {
        let mut left = budget.saturating_sub(fixed);
        let mut draw: Vec<f64> = kernel.clone();
        for w in draw.iter_mut().take(paired) {
            *w /= 2.0;
        }
        let draw = &draw[full..];
        let draw_total: f64 = draw.iter().sum();
        let mut used: HashMap<Vec<u64>, usize> = HashMap::new();
        let mut order: Vec<usize> = (0..m).collect();
        let mut tries = 4 * left;
        while left > 0 && tries > 0 {
            tries -= 1;
            let mut u = rng.random::<f64>() * draw_total;
            let mut pick = draw.len() - 1;
            for (i, w) in draw.iter().enumerate() {
                if u < *w {
                    pick = i;
                    break;
                }
                u -= w;
            }
            let s = pick + full + 1;
            for i in 0..s {
                let j = rng.random_range(i..m);
                order.swap(i, j);
            }
            let mut mask = vec![0u64; words];
            order[..s].iter().for_each(|&i| set(&mut mask, i));
            let index = match used.get(&mask) {
                Some(&index) => {
                    weights[index] += 1.0;
                    Some(index)
                }
                None => {
                    used.insert(mask.clone(), weights.len());
                    masks.extend_from_slice(&mask);
                    weights.push(1.0);
                    left -= 1;
                    None
                }
            };
            if left > 0 && s <= paired {
                match index {
                    Some(index) => weights[index + 1] += 1.0,
                    None => {
                        let complement = complement(&mask, m);
                        masks.extend_from_slice(&complement);
                        weights.push(1.0);
                        left -= 1;
                    }
                }
            }
        }
        let left_weight: f64 = kernel[full..].iter().sum();
        let sampled: f64 = weights[fixed..].iter().sum();
        if sampled > 0.0 {
            weights[fixed..]
                .iter_mut()
                .for_each(|w| *w *= left_weight / sampled);
        }
    }
    (masks, weights, all)
}

/// Rows handed to the model in batches; their outputs summed into slots.
struct Sink<'f, F> {
    model: &'f mut F,
    max_rows: usize,
    buffer: Vec<f32>,
    targets: Vec<(u32, f64)>,
    outputs: Option<usize>,
    values: Vec<f64>,
    slots: usize,
    rows_run: u64,
}

impl<F, E> Sink<'_, F>
where
    F: FnMut(&[f32], usize) -> Result<Vec<f32>, E>,
{
    /// Adds a row (already appended to `buffer` by the caller) whose output counts `weight` times in `slot`.
    fn row_added(&mut self, slot: usize, weight: f64) -> Result<(), KernelError<E>> {
        self.targets.push((slot as u32, weight));
        if self.targets.len() >= self.max_rows {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), KernelError<E>> {
        let rows = self.targets.len();
        if rows == 0 {
            return Ok(());
        }
        let answer = (self.model)(&self.buffer, rows).map_err(KernelError::Model)?;
        self.rows_run += rows as u64;
        let outputs = match self.outputs {
            Some(k) => k,
            None => {
                let k = answer.len() / rows;
                if k == 0 || k > MAX_OUTPUTS {
                    return Err(ExplainError::ModelOutput(format!(
                        "{} values for {rows} rows",
                        answer.len()
                    ))
                    .into());
                }
                self.outputs = Some(k);
                self.values = vec![0.0; self.slots * k];
                k
            }
        };
        if answer.len() != rows * outputs {
            return Err(ExplainError::ModelOutput(format!(
                "{} values for {rows} rows of {outputs} outputs",
                answer.len()
            ))
            .into());
        }
        if let Some(bad) = answer.iter().position(|v| !v.is_finite()) {
            return Err(ExplainError::ModelOutput(format!(
                "output {} of row {} is {}",
                bad % outputs,
                bad / outputs,
                answer[bad]
            ))
            .into());
        }
        for (y, &(slot, weight)) in answer.chunks_exact(outputs).zip(&self.targets) {
            let out = &mut self.values[slot as usize * outputs..(slot as usize + 1) * outputs];
            for (o, v) in out.iter_mut().zip(y) {
                *o += weight * f64::from(*v);
            }
        }
        self.buffer.clear();
        self.targets.clear();
        Ok(())
    }
}

/// Solves `a · x = b` for a symmetric positive semi-definite `a` (`n × n`) and `r` right-hand sides (`n × r`),
/// by Gaussian elimination with partial pivoting; a singular system gets a tiny ridge (1e-10 of its largest
/// diagonal entry) and is solved again.
fn solve(a: &[f64], b: &[f64], n: usize, r: usize) -> Vec<f64> {
    let scale = (0..n)
        .map(|i| a[i * n + i].abs())
        .fold(0.0, f64::max)
        .max(1e-300);
    for ridge in [0.0, 1e-10 * scale, 1e-6 * scale] {
        let mut m = a.to_vec();
        let mut x = b.to_vec();
        for i in 0..n {
            m[i * n + i] += ridge;
        }
        let mut singular = false;
        for col in 0..n {
            let pivot = (col..n)
                .max_by(|&p, &q| m[p * n + col].abs().total_cmp(&m[q * n + col].abs()))
                .expect("col < n");
            if m[pivot * n + col].abs() <= 1e-12 * scale {
                singular = true;
                break;
            }
            if pivot != col {
                for k in 0..n {
                    m.swap(pivot * n + k, col * n + k);
                }
                for k in 0..r {
                    x.swap(pivot * r + k, col * r + k);
                }
            }
            let d = m[col * n + col];
            for row in col + 1..n {
                let f = m[row * n + col] / d;
                if f == 0.0 {
                    continue;
                }
                for k in col..n {
                    m[row * n + k] -= f * m[col * n + k];
                }
                for k in 0..r {
                    x[row * r + k] -= f * x[col * r + k];
                }
            }
        }
        if singular {
            continue;
        }
        for col in (0..n).rev() {
            for k in 0..r {
                let mut v = x[col * r + k];
                for j in col + 1..n {
                    v -= m[col * n + j] * x[j * r + k];
                }
                x[col * r + k] = v / m[col * n + col];
            }
        }
        return x;
    }
    vec![0.0; n * r]
}

fn same(a: f32, b: f32) -> bool {
    a == b || (a.is_nan() && b.is_nan())
}

/// Explains `rows` (row-major, `features` values each) against `background` (same layout), running the model
/// through `model(rows, count)`, which answers `count × outputs` values, row-major. Reports the rows it ran in
/// [`Explanation::model_rows`].
///
/// The method is [`Method::KernelSampled`] when any row's coalitions were sampled, else [`Method::KernelExact`].
pub fn explain<F, E>(
    rows: &[f32],
    background: &[f32],
    features: usize,
    options: &KernelOptions,
    mut model: F,
) -> Result<Explanation, KernelError<E>>
where
    F: FnMut(&[f32], usize) -> Result<Vec<f32>, E>,
{
    if features == 0 {
        return Err(ExplainError::Options("a model with no features".into()).into());
    }
    if options.exact_max_features > MAX_EXACT_FEATURES {
        return Err(ExplainError::Options(format!(
            "exact_max_features {} is beyond {MAX_EXACT_FEATURES}",
            options.exact_max_features
        ))
        .into());
    }
    if options.max_rows_per_call == 0 || options.coalitions == 0 {
        return Err(ExplainError::Options(
            "max_rows_per_call and coalitions must be at least 1".into(),
        )
        .into());
    }
    let explained = row_count("rows", rows.len(), features)?;
    let reference = row_count("background", background.len(), features)?;
    if reference == 0 {
        return Err(ExplainError::NoBackground.into());
    }
    let row = |data: &[f32], r: usize| -> std::ops::Range<usize> {
        debug_assert!((r + 1) * features <= data.len());
        r * features..(r + 1) * features
    };

    // Plan every row's coalitions before running anything, so the budget is checked first.
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    let mut plans = Vec::with_capacity(explained);
    let mut slot = 1; // slot 0: the background's mean output
    let mut total_rows = reference as u64;
    let mut sampled_any = false;
    for r in 0..explained {
        let x = &rows[row(rows, r)];
        let varying: Vec<usize> = (0..features)
            .filter(|&j| (0..reference).any(|z| !same(background[z * features + j], x[j])))
            .collect();
        let m = varying.len();
        let words = m.div_ceil(64).max(1);
        let plan = if m <= 1 {
            RowPlan {
                varying,
                words,
                masks: Vec::new(),
                weights: Vec::new(),
                exact: true,
                slot,
            }
        } else if m <= options.exact_max_features {
            let masks: Vec<u64> = (1..(1u64 << m) - 1).collect();
            RowPlan {
                varying,
                words,
                masks,
                weights: Vec::new(),
                exact: true,
                slot,
            }
        } else {
            if m > MAX_SAMPLED_FEATURES {
                return Err(ExplainError::TooLarge {
                    what: "the varying features of a row",
                    size: m as u64,
                    limit: MAX_SAMPLED_FEATURES as u64,
                }
                .into());
            }
            let budget = if m < 63 {
                options
                    .coalitions
                    .min(((1u64 << m) - 2).min(usize::MAX as u64) as usize)
            } else {
                options.coalitions
            };
            // Refuse before drawing: the draw allocates up to `budget` masks.
            let most = total_rows
                .saturating_add(1)
                .saturating_add((budget as u64).saturating_mul(reference as u64));
            if most > options.max_model_rows {
                return Err(ExplainError::TooLarge {
                    what: "the model rows to run",
                    size: most,
                    limit: options.max_model_rows,
                }
                .into());
            }
            let (masks, weights, all) = sample(m, budget, &mut rng);
            sampled_any |= !all;
            RowPlan {
                varying,
                words,
                masks,
                weights,
                exact: false,
                slot,
            }
        };
        let coalitions = plan.count();
        slot += 1 + coalitions;
        total_rows = total_rows
            .saturating_add(1)
            .saturating_add((coalitions as u64).saturating_mul(reference as u64));
        if total_rows > options.max_model_rows {
            return Err(ExplainError::TooLarge {
                what: "the model rows to run",
                size: total_rows,
                limit: options.max_model_rows,
            }
            .into());
        }
        plans.push(plan);
    }

    // Run: the background, then per row f(x) and every coalition's mixed rows.
    let batch = options.max_rows_per_call.min(1 << 20);
    let mut sink = Sink {
        model: &mut model,
        max_rows: batch,
        buffer: Vec::with_capacity(
            (batch.min(total_rows as usize))
                .saturating_mul(features)
                .min(1 << 22),
        ),
        targets: Vec::with_capacity(batch.min(total_rows as usize).min(1 << 16)),
        outputs: None,
        values: Vec::new(),
        slots: slot,
        rows_run: 0,
    };
    let share = 1.0 / reference as f64;
    for z in 0..reference {
        sink.buffer
            .extend_from_slice(&background[row(background, z)]);
        sink.row_added(0, share)?;
    }
    for (r, plan) in plans.iter().enumerate() {
        let x = &rows[row(rows, r)];
        sink.buffer.extend_from_slice(x);
        sink.row_added(plan.slot, 1.0)?;
        for c in 0..plan.count() {
            let mask = plan.mask(c);
            for z in 0..reference {
                let start = sink.buffer.len();
                sink.buffer
                    .extend_from_slice(&background[row(background, z)]);
                for (i, &j) in plan.varying.iter().enumerate() {
                    if has(mask, i) {
                        sink.buffer[start + j] = x[j];
                    }
                }
                sink.row_added(plan.slot + 1 + c, share)?;
            }
        }
    }
    sink.flush()?;
    let outputs = sink.outputs.unwrap_or(0);
    let values = std::mem::take(&mut sink.values);
    let model_rows = sink.rows_run;
    let slot_values = |s: usize| &values[s * outputs..(s + 1) * outputs];
    let null = slot_values(0);

    let mut answer = Vec::with_capacity(explained);
    let mut max_coalitions = 0u64;
    for plan in &plans {
        let fx = slot_values(plan.slot);
        let m = plan.varying.len();
        let mut phi = vec![vec![0.0; features]; outputs];
        max_coalitions = max_coalitions.max(plan.count() as u64 + 2);
        if m == 1 {
            for k in 0..outputs {
                phi[k][plan.varying[0]] = fx[k] - null[k];
            }
        } else if m > 1 && plan.exact {
            // v(mask) for every mask: 0 is the background, the full mask f(x).
            let full = (1usize << m) - 1;
            let v = |mask: usize, k: usize| -> f64 {
                if mask == 0 {
                    null[k]
                } else if mask == full {
                    fx[k]
                } else {
                    slot_values(plan.slot + mask)[k]
                }
            };
            let weights: Vec<f64> = (0..m)
                .map(|s| 1.0 / (m as f64 * binomial(m - 1, s)))
                .collect();
            for mask in 0..full {
                let size = mask.count_ones() as usize;
                for i in (0..m).filter(|i| mask >> i & 1 == 0) {
                    let w = weights[size];
                    for (k, p) in phi.iter_mut().enumerate() {
                        p[plan.varying[i]] += w * (v(mask | 1 << i, k) - v(mask, k));
                    }
                }
            }
        } else if m > 1 {
            // Weighted least squares with Σφ = f(x) − v(∅): φ_last = d − Σ_{i<last} φ_i, so for each coalition
            // y − z_last·d = Σ_{i<last} (z_i − z_last) φ_i.
            let n = m - 1;
            let mut gram = vec![0.0; n * n];
            let mut rhs = vec![0.0; n * outputs];
            let mut a = vec![0.0; n];
            for c in 0..plan.count() {
                let mask = plan.mask(c);
                let w = plan.weights[c];
                let last = f64::from(u8::from(has(mask, n)));
                for (i, ai) in a.iter_mut().enumerate() {
                    *ai = f64::from(u8::from(has(mask, i))) - last;
                }
                let y = slot_values(plan.slot + 1 + c);
                for i in 0..n {
                    if a[i] == 0.0 {
                        continue;
                    }
                    let wa = w * a[i];
                    for j in 0..n {
                        gram[i * n + j] += wa * a[j];
                    }
                    for k in 0..outputs {
                        let target = y[k] - null[k] - last * (fx[k] - null[k]);
                        rhs[i * outputs + k] += wa * target;
                    }
                }
            }
            let solution = solve(&gram, &rhs, n, outputs);
            for (k, p) in phi.iter_mut().enumerate() {
                let mut sum = 0.0;
                for i in 0..n {
                    let value = solution[i * outputs + k];
                    p[plan.varying[i]] = value;
                    sum += value;
                }
                p[plan.varying[n]] = (fx[k] - null[k]) - sum;
            }
        }
        answer.push(
            phi.into_iter()
                .enumerate()
                .map(|(k, values)| Attribution {
                    base_value: null[k],
                    values,
                })
                .collect(),
        );
    }
    Ok(Explanation {
        method: if sampled_any {
            Method::KernelSampled
        } else {
            Method::KernelExact
        },
        background_rows: reference,
        features,
        outputs,
        rows: answer,
        model_rows,
        coalitions: max_coalitions,
    })
}
