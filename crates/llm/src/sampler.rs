//! Choosing the next token from the model's logits: greedy, or temperature, top-k and top-p with a seeded
//! generator, as OpenAI's parameters describe them; and the log-probabilities clients may ask for.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How one sequence samples.
#[derive(Debug, Clone)]
pub struct Sampling {
    /// 0 is greedy (the most likely token); above 0 the logits are divided by it before the softmax.
    pub temperature: f32,
    /// Keep the smallest set of most likely tokens whose probabilities reach this total (1 keeps all).
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens (0 keeps all).
    pub top_k: u32,
    /// The generator's seed; without one, from the clock and a counter.
    pub seed: Option<u64>,
}

impl Default for Sampling {
    fn default() -> Sampling {
        Sampling {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
        }
    }
}

/// One sequence's sampler: its settings, its generator and a reusable buffer.
pub(crate) struct Sampler {
    sampling: Sampling,
    rng: ChaCha8Rng,
    candidates: Vec<(f32, u32)>,
}

impl Sampler {
    pub(crate) fn new(sampling: Sampling) -> Sampler {
        let rng = match sampling.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::seed_from_u64(fresh_seed()),
        };
        Sampler {
            sampling,
            rng,
            candidates: Vec::new(),
        }
    }

    /// The next token.
    pub(crate) fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.sampling.temperature <= 0.0 || self.sampling.top_k == 1 {
            return argmax(logits);
        }
        let t = self.sampling.temperature;
        self.candidates.clear();
        self.candidates
            .extend(logits.iter().enumerate().map(|(i, &l)| (l / t, i as u32)));
        let by_logit_desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0);
        let k = self.sampling.top_k as usize;
        if k > 0 && k < self.candidates.len() {
            self.candidates.select_nth_unstable_by(k - 1, by_logit_desc);
            self.candidates.truncate(k);
        }
        let top_p = self.sampling.top_p;
        if top_p < 1.0 {
            self.candidates.sort_unstable_by(by_logit_desc);
        }
        let max = self
            .candidates
            .iter()
            .map(|c| c.0)
            .fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0f64;
        for c in &mut self.candidates {
            c.0 = (c.0 - max).exp();
            total += f64::from(c.0);
        }
        if top_p < 1.0 {
            // Sorted: keep the head whose mass reaches top_p (at least one token).
            let mut kept = 0.0f64;
            let mut n = 0;
            for c in &self.candidates {
                kept += f64::from(c.0);
                n += 1;
                if kept >= f64::from(top_p) * total {
                    break;
                }
            }
            self.candidates.truncate(n);
            total = kept;
        }
        let mut r = self.rng.random::<f64>() * total;
        for &(p, id) in &self.candidates {
            r -= f64::from(p);
            if r <= 0.0 {
                return id;
            }
        }
        self.candidates.last().map_or(0, |c| c.1)
    }
}

/// A seed for a request that gave none: the clock and a process-wide counter.
fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The index of the largest logit (the first, on ties).
pub(crate) fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Log-probabilities of the model's distribution (the softmax of its raw logits, before temperature):
/// the chosen token's and the `top` most likely tokens', most likely first.
pub(crate) fn logprobs(logits: &[f32], chosen: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_z = f64::from(max) + sum.ln();
    let lp = |l: f32| (f64::from(l) - log_z) as f32;
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        let mut all: Vec<(f32, u32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (l, i as u32))
            .collect();
        let k = top.min(all.len());
        all.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
        all.truncate(k);
        all.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
        best.extend(all.into_iter().map(|(l, id)| (id, lp(l))));
    }
    (lp(logits[chosen as usize]), best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_largest_and_the_first_of_ties() {
        let mut s = Sampler::new(Sampling {
            temperature: 0.0,
            ..Sampling::default()
        });
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = [0.5, 2.0, 1.9, -3.0];
        for _ in 0..50 {
            let mut s = Sampler::new(Sampling {
                top_k: 1,
                ..Sampling::default()
            });
            assert_eq!(s.sample(&logits), 1);
            let mut s = Sampler::new(Sampling {
                top_p: 0.01,
                ..Sampling::default()
            });
            assert_eq!(s.sample(&logits), 1);
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens_and_frequencies_follow_the_softmax() {
        let logits = [0.0f32, (2.0f32).ln(), (7.0f32).ln()];
        let draw = |seed| {
            let mut s = Sampler::new(Sampling {
                seed: Some(seed),
                ..Sampling::default()
            });
            (0..10_000).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7));
        assert_ne!(a, draw(8));
        let share = |id| a.iter().filter(|&&t| t == id).count() as f64 / a.len() as f64;
        assert!((share(0) - 0.1).abs() < 0.02, "{}", share(0));
        assert!((share(2) - 0.7).abs() < 0.02, "{}", share(2));
    }

    #[test]
    fn top_p_keeps_the_head_that_reaches_the_mass() {
        // probabilities 0.7, 0.2, 0.1: top_p 0.8 keeps the first two only.
        let logits = [(7.0f32).ln(), (2.0f32).ln(), 0.0];
        let mut s = Sampler::new(Sampling {
            top_p: 0.8,
            seed: Some(1),
            ..Sampling::default()
        });
        let draws: Vec<u32> = (0..5000).map(|_| s.sample(&logits)).collect();
        assert!(!draws.contains(&2));
        let share0 = draws.iter().filter(|&&t| t == 0).count() as f64 / 5000.0;
        assert!((share0 - 7.0 / 9.0).abs() < 0.03, "{share0}");
    }

    #[test]
    fn logprobs_are_a_log_softmax() {
        let (chosen, top) = logprobs(&[1.0, 2.0, 3.0], 0, 2);
        let z = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        assert!((f64::from(chosen) - (1.0 - z)).abs() < 1e-6);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
        assert!((f64::from(top[0].1) - (3.0 - z)).abs() < 1e-6);
    }
}
