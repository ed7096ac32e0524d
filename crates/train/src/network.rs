//! The model every family shares: a stack of dense layers with an output head, its losses and their gradients.
//!
//! `linear` is one layer with the identity head and the cost J(θ) = 1/(2m) Σᵢ (h_θ(x⁽ⁱ⁾) − y⁽ⁱ⁾)²; `logistic`
//! is one layer with a sigmoid head and the binary cross-entropy; `softmax` is one layer with a softmax head and
//! the categorical cross-entropy; `mlp` puts hidden layers with ReLU or tanh in front of any of the three heads.
//! Each head is paired with its canonical loss, so the gradient at the output is always (h − y)/m.
//! Penalties apply to weights, never to biases: (l2/2) Σ w² + l1 Σ |w|.

use ndarray::{Array1, Array2, ArrayView2, Axis, Zip};
use rand::RngExt;

/// Hidden-layer activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// max(0, z).
    Relu,
    /// tanh(z).
    Tanh,
}

/// Output head, with its loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Head {
    /// h = z, mean squared error with the 1/2 factor.
    Identity,
    /// h = σ(z) on one output, binary cross-entropy.
    Sigmoid,
    /// h = softmax(z), categorical cross-entropy.
    Softmax,
}

/// One dense layer: z = a·W + b, with W of shape [inputs, outputs].
#[derive(Debug, Clone, PartialEq)]
pub struct Dense {
    /// Weights [inputs, outputs].
    pub w: Array2<f64>,
    /// Biases `[outputs]`.
    pub b: Array1<f64>,
}

impl Dense {
    fn zeros_like(&self) -> Dense {
        Dense {
            w: Array2::zeros(self.w.raw_dim()),
            b: Array1::zeros(self.b.raw_dim()),
        }
    }
}

/// Weight penalties.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Penalty {
    /// L2 strength: adds (l2/2) Σ w².
    pub l2: f64,
    /// L1 strength: adds l1 Σ |w|.
    pub l1: f64,
}

/// Layers, activation and head.
#[derive(Debug, Clone, PartialEq)]
pub struct Network {
    /// The layers, input first.
    pub layers: Vec<Dense>,
    /// The activation between layers.
    pub activation: Activation,
    /// The output head.
    pub head: Head,
}

/// Gradients, one [`Dense`] per layer.
pub type Gradients = Vec<Dense>;

fn apply_activation(z: &mut Array2<f64>, activation: Activation) {
    match activation {
        Activation::Relu => z.mapv_inplace(|v| v.max(0.0)),
        Activation::Tanh => z.mapv_inplace(f64::tanh),
    }
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// log(1 + e^z) without overflow.
fn softplus(z: f64) -> f64 {
    z.max(0.0) + (-z.abs()).exp().ln_1p()
}

impl Network {
    /// A network for `inputs` features and `outputs` outputs with the given hidden sizes.
    ///
    /// Without hidden layers (the linear families) weights start at zero, as in the classical formulation: the
    /// cost is convex, so the start only changes the path. With hidden layers weights are drawn from Glorot's
    /// uniform range, as scikit-learn's MLP does, and biases from the same range.
    pub fn new(
        inputs: usize,
        hidden: &[usize],
        outputs: usize,
        activation: Activation,
        head: Head,
        rng: &mut impl rand::Rng,
    ) -> Network {
        let mut sizes = vec![inputs];
        sizes.extend_from_slice(hidden);
        sizes.push(outputs);
        let layers = sizes
            .windows(2)
            .map(|io| {
                let (fan_in, fan_out) = (io[0], io[1]);
                if hidden.is_empty() {
                    return Dense {
                        w: Array2::zeros((fan_in, fan_out)),
                        b: Array1::zeros(fan_out),
                    };
                }
                let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
                Dense {
                    w: Array2::from_shape_simple_fn((fan_in, fan_out), || {
                        rng.random_range(-bound..bound)
                    }),
                    b: Array1::from_shape_simple_fn(fan_out, || rng.random_range(-bound..bound)),
                }
            })
            .collect();
        Network {
            layers,
            activation,
            head,
        }
    }

    /// The activations of every layer: `acts[0]` is the first hidden layer's output, the last is the logits.
    fn forward(&self, x: ArrayView2<'_, f64>) -> Vec<Array2<f64>> {
        let mut acts: Vec<Array2<f64>> = Vec::with_capacity(self.layers.len());
        for (l, layer) in self.layers.iter().enumerate() {
            let input = if l == 0 { x } else { acts[l - 1].view() };
            let mut z = input.dot(&layer.w) + &layer.b;
            if l + 1 < self.layers.len() {
                apply_activation(&mut z, self.activation);
            }
            acts.push(z);
        }
        acts
    }

    /// The outputs before the head.
    pub fn logits(&self, x: ArrayView2<'_, f64>) -> Array2<f64> {
        self.forward(x)
            .pop()
            .expect("a network has at least one layer")
    }

    /// The head's outputs: values (identity), P(class 1) (sigmoid) or class probabilities (softmax).
    pub fn predict(&self, x: ArrayView2<'_, f64>) -> Array2<f64> {
        let mut z = self.logits(x);
        match self.head {
            Head::Identity => {}
            Head::Sigmoid => z.mapv_inplace(sigmoid),
            Head::Softmax => {
                for mut row in z.rows_mut() {
                    let max = row.fold(f64::NEG_INFINITY, |m, &v| m.max(v));
                    row.mapv_inplace(|v| (v - max).exp());
                    let sum = row.sum();
                    row /= sum;
                }
            }
        }
        z
    }

    /// The mean data loss of logits `z` against targets `y`, and (h − y)/m when `delta` is asked for.
    fn data_loss(
        &self,
        z: &Array2<f64>,
        y: ArrayView2<'_, f64>,
        delta: bool,
    ) -> (f64, Option<Array2<f64>>) {
        let m = z.nrows() as f64;
        match self.head {
            Head::Identity => {
                let diff = z - &y;
                let loss = diff.iter().map(|d| d * d).sum::<f64>() / (2.0 * m);
                (loss, delta.then(|| diff / m))
            }
            Head::Sigmoid => {
                let loss = Zip::from(z)
                    .and(y)
                    .fold(0.0, |acc, &z, &y| acc + softplus(z) - y * z)
                    / m;
                let d = delta.then(|| {
                    let mut d = z.mapv(sigmoid) - y;
                    d /= m;
                    d
                });
                (loss, d)
            }
            Head::Softmax => {
                let mut total = 0.0;
                let mut d = delta.then(|| Array2::zeros(z.raw_dim()));
                for (i, (zr, yr)) in z.rows().into_iter().zip(y.rows()).enumerate() {
                    let max = zr.fold(f64::NEG_INFINITY, |a, &v| a.max(v));
                    let sum: f64 = zr.iter().map(|v| (v - max).exp()).sum();
                    let lse = max + sum.ln();
                    total += lse * yr.sum() - zr.dot(&yr);
                    if let Some(d) = &mut d {
                        for (c, out) in d.row_mut(i).iter_mut().enumerate() {
                            *out = ((zr[c] - lse).exp() - yr[c]) / m;
                        }
                    }
                }
                (total / m, d)
            }
        }
    }

    fn penalty_loss(&self, penalty: Penalty) -> f64 {
        if penalty.l2 == 0.0 && penalty.l1 == 0.0 {
            return 0.0;
        }
        self.layers
            .iter()
            .map(|l| {
                l.w.iter()
                    .map(|w| 0.5 * penalty.l2 * w * w + penalty.l1 * w.abs())
                    .sum::<f64>()
            })
            .sum()
    }

    /// The data loss alone (what validation and early stopping watch).
    pub fn loss(&self, x: ArrayView2<'_, f64>, y: ArrayView2<'_, f64>) -> f64 {
        self.loss_of_logits(&self.logits(x), y)
    }

    /// The data loss of logits already computed with [`Network::logits`].
    pub fn loss_of_logits(&self, z: &Array2<f64>, y: ArrayView2<'_, f64>) -> f64 {
        self.data_loss(z, y, false).0
    }

    /// The full objective (data loss plus penalty) and its gradient, written into `grads`.
    pub fn loss_and_gradients(
        &self,
        x: ArrayView2<'_, f64>,
        y: ArrayView2<'_, f64>,
        penalty: Penalty,
        grads: &mut Gradients,
    ) -> f64 {
        let acts = self.forward(x);
        let (loss, delta) = self.data_loss(acts.last().expect("at least one layer"), y, true);
        let mut delta = delta.expect("delta was asked for");
        for l in (0..self.layers.len()).rev() {
            let input = if l == 0 { x } else { acts[l - 1].view() };
            let layer = &self.layers[l];
            let g = &mut grads[l];
            ndarray::linalg::general_mat_mul(1.0, &input.t(), &delta, 0.0, &mut g.w);
            g.b.assign(&delta.sum_axis(Axis(0)));
            if penalty.l2 != 0.0 || penalty.l1 != 0.0 {
                Zip::from(&mut g.w).and(&layer.w).for_each(|g, &w| {
                    *g += penalty.l2 * w + penalty.l1 * w.signum() * f64::from(u8::from(w != 0.0));
                });
            }
            if l > 0 {
                let mut back = delta.dot(&layer.w.t());
                match self.activation {
                    Activation::Relu => Zip::from(&mut back).and(&acts[l - 1]).for_each(|d, &a| {
                        if a <= 0.0 {
                            *d = 0.0;
                        }
                    }),
                    Activation::Tanh => Zip::from(&mut back)
                        .and(&acts[l - 1])
                        .for_each(|d, &a| *d *= 1.0 - a * a),
                }
                delta = back;
            }
        }
        loss + self.penalty_loss(penalty)
    }

    /// Zeroed gradients shaped like this network.
    pub fn zero_gradients(&self) -> Gradients {
        self.layers.iter().map(Dense::zeros_like).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn random(rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> Array2<f64> {
        Array2::from_shape_simple_fn((rows, cols), || rng.random_range(-1.5..1.5))
    }

    /// Compares every analytic partial derivative with a central finite difference.
    fn check_gradients(hidden: &[usize], activation: Activation, head: Head, penalty: Penalty) {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let outputs = match head {
            Head::Softmax => 3,
            _ => 1,
        };
        let x = random(7, 4, &mut rng);
        let y = match head {
            Head::Identity => random(7, 1, &mut rng),
            Head::Sigmoid => {
                Array2::from_shape_fn((7, 1), |(i, _)| f64::from(u8::from(i % 3 == 0)))
            }
            Head::Softmax => {
                Array2::from_shape_fn((7, 3), |(i, c)| f64::from(u8::from(i % 3 == c)))
            }
        };
        let mut net = Network::new(4, hidden, outputs, activation, head, &mut rng);
        // Start linear models away from zero, where |w| has no derivative and the check would be moot.
        for layer in &mut net.layers {
            layer.w.mapv_inplace(|_| {
                rng.random_range(0.2..0.9) * if rng.random::<bool>() { 1.0 } else { -1.0 }
            });
            layer.b.mapv_inplace(|_| rng.random_range(-0.5..0.5));
        }
        let mut grads = net.zero_gradients();
        net.loss_and_gradients(x.view(), y.view(), penalty, &mut grads);
        let objective = |net: &Network| {
            let mut scratch = net.zero_gradients();
            net.loss_and_gradients(x.view(), y.view(), penalty, &mut scratch)
        };
        let eps = 1e-6;
        let mut checked = 0;
        for (l, grad) in grads.iter().enumerate() {
            for idx in 0..net.layers[l].w.len() {
                let (r, c) = (idx / net.layers[l].w.ncols(), idx % net.layers[l].w.ncols());
                let mut plus = net.clone();
                plus.layers[l].w[[r, c]] += eps;
                let mut minus = net.clone();
                minus.layers[l].w[[r, c]] -= eps;
                let numeric = (objective(&plus) - objective(&minus)) / (2.0 * eps);
                let analytic = grad.w[[r, c]];
                assert!(
                    (numeric - analytic).abs() < 1e-6 * (1.0 + numeric.abs()),
                    "{head:?} {activation:?} layer {l} w[{r},{c}]: numeric {numeric} analytic {analytic}"
                );
                checked += 1;
            }
            for c in 0..net.layers[l].b.len() {
                let mut plus = net.clone();
                plus.layers[l].b[c] += eps;
                let mut minus = net.clone();
                minus.layers[l].b[c] -= eps;
                let numeric = (objective(&plus) - objective(&minus)) / (2.0 * eps);
                let analytic = grad.b[c];
                assert!(
                    (numeric - analytic).abs() < 1e-6 * (1.0 + numeric.abs()),
                    "{head:?} {activation:?} layer {l} b[{c}]: numeric {numeric} analytic {analytic}"
                );
                checked += 1;
            }
        }
        assert!(checked > 4);
    }

    #[test]
    fn linear_mse_gradient_matches_finite_differences() {
        check_gradients(&[], Activation::Relu, Head::Identity, Penalty::default());
        check_gradients(
            &[],
            Activation::Relu,
            Head::Identity,
            Penalty { l2: 0.3, l1: 0.2 },
        );
    }

    #[test]
    fn logistic_gradient_matches_finite_differences() {
        check_gradients(
            &[],
            Activation::Relu,
            Head::Sigmoid,
            Penalty { l2: 0.1, l1: 0.0 },
        );
    }

    #[test]
    fn softmax_gradient_matches_finite_differences() {
        check_gradients(
            &[],
            Activation::Relu,
            Head::Softmax,
            Penalty { l2: 0.1, l1: 0.05 },
        );
    }

    #[test]
    fn mlp_gradients_match_finite_differences_for_every_head_and_activation() {
        for head in [Head::Identity, Head::Sigmoid, Head::Softmax] {
            for activation in [Activation::Relu, Activation::Tanh] {
                check_gradients(&[5, 3], activation, head, Penalty { l2: 0.01, l1: 0.0 });
            }
        }
    }

    #[test]
    fn mse_cost_is_half_mean_squared_error() {
        let net = Network {
            layers: vec![Dense {
                w: ndarray::arr2(&[[2.0]]),
                b: ndarray::arr1(&[1.0]),
            }],
            activation: Activation::Relu,
            head: Head::Identity,
        };
        let x = ndarray::arr2(&[[1.0], [2.0]]);
        let y = ndarray::arr2(&[[0.0], [5.0]]);
        // h = [3, 5]; J = (9 + 0) / (2 * 2).
        assert_eq!(net.loss(x.view(), y.view()), 2.25);
    }

    #[test]
    fn softmax_probabilities_sum_to_one() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let net = Network::new(3, &[4], 5, Activation::Tanh, Head::Softmax, &mut rng);
        let p = net.predict(random(6, 3, &mut rng).view());
        for row in p.rows() {
            assert!((row.sum() - 1.0).abs() < 1e-12);
        }
    }
}
