//! Optimizers (plain gradient descent θ := θ − α∇J, momentum, Adam) and the learning-rate schedule.
//!
//! Whether a step sees the whole training set (batch gradient descent) or a mini-batch is the training loop's
//! business; an optimizer only turns a gradient into an update.

use ndarray::Zip;

use crate::network::{Dense, Gradients, Network};

/// The update rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Batch gradient descent: one step per epoch on the whole training set, θ := θ − α∇J.
    Gd,
    /// Mini-batch stochastic gradient descent with the same plain update.
    Sgd,
    /// Mini-batch SGD with momentum 0.9: v := 0.9v − α∇J, θ := θ + v.
    Momentum,
    /// Adam (β₁ = 0.9, β₂ = 0.999, ε = 1e-8) on mini-batches.
    Adam,
}

impl OptimizerKind {
    /// Whether the optimizer steps on mini-batches.
    pub fn is_minibatch(self) -> bool {
        self != OptimizerKind::Gd
    }
}

/// How the learning rate changes over epochs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// The same rate every epoch.
    Constant,
    /// Cosine annealing from the rate down to zero at the last epoch.
    Cosine,
}

impl Schedule {
    /// The rate for `epoch` (0-based) of `epochs`.
    pub fn rate(self, base: f64, epoch: usize, epochs: usize) -> f64 {
        match self {
            Schedule::Constant => base,
            Schedule::Cosine => {
                let progress = epoch as f64 / epochs.max(1) as f64;
                0.5 * base * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

const BETA: f64 = 0.9;
const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPSILON: f64 = 1e-8;

/// An optimizer with its state (velocities or moment estimates).
#[derive(Debug, Clone)]
pub struct Optimizer {
    kind: OptimizerKind,
    first: Vec<Dense>,
    second: Vec<Dense>,
    steps: i32,
}

impl Optimizer {
    /// A fresh optimizer for `net`.
    pub fn new(kind: OptimizerKind, net: &Network) -> Optimizer {
        let (first, second) = match kind {
            OptimizerKind::Gd | OptimizerKind::Sgd => (Vec::new(), Vec::new()),
            OptimizerKind::Momentum => (net.zero_gradients(), Vec::new()),
            OptimizerKind::Adam => (net.zero_gradients(), net.zero_gradients()),
        };
        Optimizer {
            kind,
            first,
            second,
            steps: 0,
        }
    }

    /// Applies one update with learning rate `lr`.
    pub fn step(&mut self, net: &mut Network, grads: &Gradients, lr: f64) {
        self.steps += 1;
        let t = self.steps;
        for (l, (layer, g)) in net.layers.iter_mut().zip(grads).enumerate() {
            match self.kind {
                OptimizerKind::Gd | OptimizerKind::Sgd => {
                    layer.w.scaled_add(-lr, &g.w);
                    layer.b.scaled_add(-lr, &g.b);
                }
                OptimizerKind::Momentum => {
                    let v = &mut self.first[l];
                    Zip::from(&mut layer.w)
                        .and(&mut v.w)
                        .and(&g.w)
                        .for_each(|p, v, &g| {
                            *v = BETA * *v - lr * g;
                            *p += *v;
                        });
                    Zip::from(&mut layer.b)
                        .and(&mut v.b)
                        .and(&g.b)
                        .for_each(|p, v, &g| {
                            *v = BETA * *v - lr * g;
                            *p += *v;
                        });
                }
                OptimizerKind::Adam => {
                    // Bias corrections folded into the step size, as in the Adam paper's efficient form.
                    let step = lr * (1.0 - BETA2.powi(t)).sqrt() / (1.0 - BETA1.powi(t));
                    let (m, v) = (&mut self.first[l], &mut self.second[l]);
                    Zip::from(&mut layer.w)
                        .and(&mut m.w)
                        .and(&mut v.w)
                        .and(&g.w)
                        .for_each(|p, m, v, &g| adam(p, m, v, g, step));
                    Zip::from(&mut layer.b)
                        .and(&mut m.b)
                        .and(&mut v.b)
                        .and(&g.b)
                        .for_each(|p, m, v, &g| adam(p, m, v, g, step));
                }
            }
        }
    }
}

fn adam(p: &mut f64, m: &mut f64, v: &mut f64, g: f64, step: f64) {
    *m = BETA1 * *m + (1.0 - BETA1) * g;
    *v = BETA2 * *v + (1.0 - BETA2) * g * g;
    *p -= step * *m / (v.sqrt() + EPSILON);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::{Activation, Head};
    use ndarray::{arr1, arr2};

    fn one_weight(w: f64) -> Network {
        Network {
            layers: vec![Dense {
                w: arr2(&[[w]]),
                b: arr1(&[0.0]),
            }],
            activation: Activation::Relu,
            head: Head::Identity,
        }
    }

    fn gradient(w: f64, b: f64) -> Gradients {
        vec![Dense {
            w: arr2(&[[w]]),
            b: arr1(&[b]),
        }]
    }

    #[test]
    fn gradient_descent_step_is_theta_minus_alpha_gradient() {
        let mut net = one_weight(1.0);
        let grads = gradient(0.5, -2.0);
        Optimizer::new(OptimizerKind::Gd, &net).step(&mut net, &grads, 0.1);
        assert_eq!(net.layers[0].w[[0, 0]], 1.0 - 0.05);
        assert_eq!(net.layers[0].b[0], 0.2);
    }

    #[test]
    fn first_adam_step_moves_each_parameter_by_the_learning_rate() {
        let mut net = one_weight(1.0);
        let grads = gradient(3.0, -0.01);
        Optimizer::new(OptimizerKind::Adam, &net).step(&mut net, &grads, 0.1);
        assert!((net.layers[0].w[[0, 0]] - 0.9).abs() < 1e-6);
        assert!((net.layers[0].b[0] - 0.1).abs() < 1e-4);
    }

    #[test]
    fn momentum_accumulates_velocity() {
        let mut net = one_weight(0.0);
        let grads = gradient(1.0, 0.0);
        let mut opt = Optimizer::new(OptimizerKind::Momentum, &net);
        opt.step(&mut net, &grads, 1.0);
        opt.step(&mut net, &grads, 1.0);
        // v1 = -1, v2 = -0.9 - 1 = -1.9: w = -2.9.
        assert!((net.layers[0].w[[0, 0]] + 2.9).abs() < 1e-12);
    }

    #[test]
    fn cosine_schedule_falls_from_base_to_zero() {
        assert_eq!(Schedule::Cosine.rate(0.1, 0, 10), 0.1);
        assert!(Schedule::Cosine.rate(0.1, 10, 10).abs() < 1e-15);
        assert_eq!(Schedule::Constant.rate(0.1, 7, 10), 0.1);
    }
}
