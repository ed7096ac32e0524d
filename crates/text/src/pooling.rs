//! From one vector per token to one vector per text, and L2 normalization.

use crate::Pooling;

/// Pools the token vectors of one text: `hidden` holds `seq × width` floats (row-major, the padded length of its
/// batch), of which the first `len` tokens are the text's own (the rest is padding). `len` is at least 1.
pub fn pool(pooling: Pooling, hidden: &[f32], width: usize, len: usize) -> Vec<f32> {
    debug_assert!(len >= 1 && hidden.len() >= len * width);
    let tokens = hidden[..len * width].chunks_exact(width);
    match pooling {
        Pooling::Cls => hidden[..width].to_vec(),
        Pooling::LastToken => hidden[(len - 1) * width..len * width].to_vec(),
        Pooling::Mean => {
            // Sums in f64: a long text's mean should not depend on its length's rounding.
            let mut sum = vec![0f64; width];
            for t in tokens {
                for (s, x) in sum.iter_mut().zip(t) {
                    *s += f64::from(*x);
                }
            }
            sum.iter().map(|s| (s / len as f64) as f32).collect()
        }
        Pooling::Max => {
            let mut max = vec![f32::NEG_INFINITY; width];
            for t in tokens {
                for (m, x) in max.iter_mut().zip(t) {
                    *m = m.max(*x);
                }
            }
            max
        }
    }
}

/// Scales `v` to unit length (left as is when it is all zeros), as sentence-transformers' `Normalize`.
pub fn normalize(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt();
    // torch.nn.functional.normalize divides by max(norm, 1e-12).
    let norm = norm.max(1e-12);
    for x in v {
        *x = (f64::from(*x) / norm) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_only_the_texts_tokens() {
        // Three tokens of width 2, then a padding token whose values must not count.
        let h = [1.0, -1.0, 3.0, 0.0, 2.0, 4.0, 100.0, 100.0];
        assert_eq!(pool(Pooling::Mean, &h, 2, 3), vec![2.0, 1.0]);
        assert_eq!(pool(Pooling::Max, &h, 2, 3), vec![3.0, 4.0]);
        assert_eq!(pool(Pooling::Cls, &h, 2, 3), vec![1.0, -1.0]);
        assert_eq!(pool(Pooling::LastToken, &h, 2, 3), vec![2.0, 4.0]);
    }

    #[test]
    fn normalizes_to_unit_length() {
        let mut v = [3.0, 4.0];
        normalize(&mut v);
        assert_eq!(v, [0.6, 0.8]);
        let mut z = [0.0, 0.0];
        normalize(&mut z);
        assert_eq!(z, [0.0, 0.0]);
    }
}
