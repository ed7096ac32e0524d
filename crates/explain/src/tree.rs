//! Exact interventional TreeSHAP: the Shapley values of the game v(S) = mean over background rows z of
//! f(x_S, z_S̄), for f a tree ensemble's raw margins, as shap's `TreeExplainer(feature_perturbation=
//! "interventional")` computes them.
//!
//! For one background row z and one tree, the game is a sum over leaves: a leaf of value v is reached by the
//! hybrid row exactly when the features where x and z part ways on its path take the side that leads there. With
//! A the features whose x value the path needs and B those whose z value it needs (disjoint; a feature split on
//! where x and z agree does not matter), the leaf's game is v·[A ⊆ S, B ∩ S = ∅], whose Shapley values are
//! v·(|A|−1)!|B|!/(|A|+|B|)! for each feature of A and −v·|A|!(|B|−1)!/(|A|+|B|)! for each of B. The walk
//! follows both rows at once and branches only where they disagree on a feature not yet assigned, so its cost
//! is at most the tree's size times the path length, per explained row and background row.
//!
//! The answer is in the raw margin space (before the ensemble's post-transform; see
//! [`Ensemble`]), per target or class margin, averaged over trees when the ensemble
//! averages; the base value is the mean raw margin of the background rows, and base + Σφ equals the row's raw
//! margin up to rounding.

use crate::model::{Ensemble, Node, Tree};
use crate::{row_count, Attribution, ExplainError, Explanation, Method};

/// 1 / (n · C(n + m, n)) = (n − 1)! m! / (n + m)!, the Shapley weight of one of n needed features against m.
fn weight(n: usize, m: usize) -> f64 {
    // C(n + m, n) as a product of min(n, m) ratios, each ≤ n + m, so no intermediate overflows before the end.
    let k = n.min(m);
    let total = n + m;
    let mut binomial = 1.0f64;
    for i in 1..=k {
        binomial *= (total - k + i) as f64 / i as f64;
    }
    1.0 / (n as f64 * binomial)
}

/// Which row a feature on the current path takes its value from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Free,
    X,
    Z,
}

/// A node still to visit: its index, the path length it continues from, and the feature it assigns first.
type Frame = (u32, usize, Option<(u32, Side)>);

/// Reusable buffers of one walk.
struct Walk {
    side: Vec<Side>,
    path: Vec<(u32, Side)>,
    counts: [usize; 2],
    stack: Vec<Frame>,
}

impl Walk {
    fn new(features: usize) -> Walk {
        Walk {
            side: vec![Side::Free; features],
            path: Vec::new(),
            counts: [0, 0],
            stack: Vec::new(),
        }
    }

    fn truncate(&mut self, len: usize) {
        while self.path.len() > len {
            let (f, s) = self.path.pop().expect("longer than len");
            self.side[f as usize] = Side::Free;
            self.counts[(s == Side::Z) as usize] -= 1;
        }
    }

    /// Adds to `phi` (`outputs × features`) the Shapley values of one tree's game for rows `x` and `z`, times
    /// `scale`.
    fn tree(
        &mut self,
        tree: &Tree,
        x: &[f64],
        z: &[f64],
        scale: f64,
        features: usize,
        phi: &mut [f64],
    ) {
        self.stack.clear();
        self.stack.push((0, 0, None));
        while let Some((index, len, assign)) = self.stack.pop() {
            self.truncate(len);
            if let Some((f, s)) = assign {
                self.side[f as usize] = s;
                self.counts[(s == Side::Z) as usize] += 1;
                self.path.push((f, s));
            }
            let depth = self.path.len();
            match tree.nodes[index as usize] {
                Node::Branch {
                    feature,
                    threshold,
                    mode,
                    missing_tracks_true,
                    yes,
                    no,
                } => {
                    let f = feature as usize;
                    let go = |v: f64| {
                        if mode.goes_true(v, threshold, missing_tracks_true) {
                            yes
                        } else {
                            no
                        }
                    };
                    match self.side[f] {
                        Side::X => self.stack.push((go(x[f]), depth, None)),
                        Side::Z => self.stack.push((go(z[f]), depth, None)),
                        Side::Free => {
                            let (gx, gz) = (go(x[f]), go(z[f]));
                            if gx == gz {
                                self.stack.push((gx, depth, None));
                            } else {
                                self.stack.push((gx, depth, Some((feature, Side::X))));
                                self.stack.push((gz, depth, Some((feature, Side::Z))));
                            }
                        }
                    }
                }
                Node::Leaf { start, end } => {
                    let [a, b] = self.counts;
                    if a + b == 0 {
                        continue;
                    }
                    let wa = if a > 0 { weight(a, b) } else { 0.0 };
                    let wb = if b > 0 { weight(b, a) } else { 0.0 };
                    for &(k, v) in &tree.leaf_values[start as usize..end as usize] {
                        let row = &mut phi[k as usize * features..(k as usize + 1) * features];
                        let v = v * scale;
                        for &(f, s) in &self.path {
                            row[f as usize] += if s == Side::X { v * wa } else { -v * wb };
                        }
                    }
                }
            }
        }
    }
}

/// Explains `rows` (row-major, `ensemble.features` values each; NaN allowed, routed as the graph routes
/// missing values) against `background` (same layout).
///
/// The values must be the ones the model compares: for an f32 graph input, the f32 values widened to f64.
pub fn explain(
    ensemble: &Ensemble,
    rows: &[f64],
    background: &[f64],
) -> Result<Explanation, ExplainError> {
    let features = ensemble.features;
    let explained = row_count("rows", rows.len(), features)?;
    let reference = row_count("background", background.len(), features)?;
    if reference == 0 {
        return Err(ExplainError::NoBackground);
    }
    let outputs = ensemble.outputs;
    let scale = ensemble.tree_scale();
    let row = |r: usize| r * features..(r + 1) * features;
    let mut base = vec![0.0; outputs];
    for r in 0..reference {
        for (b, v) in base.iter_mut().zip(ensemble.raw(&background[row(r)])) {
            *b += v;
        }
    }
    base.iter_mut().for_each(|b| *b /= reference as f64);

    let mut walk = Walk::new(features);
    let mut phi = vec![0.0; outputs * features];
    let mut answer = Vec::with_capacity(explained);
    for r in 0..explained {
        let x = &rows[row(r)];
        phi.iter_mut().for_each(|p| *p = 0.0);
        for zr in 0..reference {
            let z = &background[row(zr)];
            for tree in &ensemble.trees {
                walk.tree(tree, x, z, scale, features, &mut phi);
            }
        }
        answer.push(
            (0..outputs)
                .map(|k| Attribution {
                    base_value: base[k],
                    values: phi[k * features..(k + 1) * features]
                        .iter()
                        .map(|p| p / reference as f64)
                        .collect(),
                })
                .collect(),
        );
    }
    Ok(Explanation {
        method: Method::TreeInterventional,
        background_rows: reference,
        features,
        outputs,
        rows: answer,
        model_rows: 0,
        coalitions: 0,
    })
}
