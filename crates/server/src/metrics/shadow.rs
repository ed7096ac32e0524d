//! Shadow traffic: a copy of a share of live requests runs on another version (`[shadow]` in `config.toml`), and
//! its answers are compared with the live ones. Copies never reach clients and never hold them up: they start after
//! the live answer is ready, at most [`MAX_IN_FLIGHT`] at once, and a copy that finds no room is dropped.

use ferry_model::{NamedTensor, TensorData};

/// Shadow copies running at once, server-wide; more are dropped (and counted).
pub const MAX_IN_FLIGHT: usize = 32;

/// Running totals of one output's comparison.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Agreement {
    /// Non-float elements compared.
    pub compared: u64,
    /// Of those, equal.
    pub agreed: u64,
    /// Float elements compared.
    pub numeric: u64,
    /// Sum of their absolute differences.
    pub abs_difference: f64,
}

impl Agreement {
    /// Adds another comparison's totals.
    pub fn add(&mut self, other: &Agreement) {
        self.compared += other.compared;
        self.agreed += other.agreed;
        self.numeric += other.numeric;
        self.abs_difference += other.abs_difference;
    }

    /// Equal non-float elements over those compared.
    pub fn agreement_ratio(&self) -> Option<f64> {
        (self.compared > 0).then(|| self.agreed as f64 / self.compared as f64)
    }

    /// Mean absolute difference of float elements.
    pub fn mean_absolute_difference(&self) -> Option<f64> {
        (self.numeric > 0).then(|| self.abs_difference / self.numeric as f64)
    }
}

/// Compares the shadow's outputs with the live ones, output by output (by name). An output whose shape or type
/// differs counts as full disagreement (labels) or is skipped (floats, which have no distance then).
pub fn compare(live: &[NamedTensor], shadow: &[NamedTensor]) -> Vec<(String, Agreement)> {
    let mut out = Vec::new();
    for l in live {
        let Some(s) = shadow.iter().find(|s| s.name == l.name) else {
            continue;
        };
        let mut a = Agreement::default();
        let same_shape = l.tensor.shape == s.tensor.shape;
        match (&l.tensor.data, &s.tensor.data) {
            (TensorData::F32(x), TensorData::F32(y)) if same_shape => {
                differences(
                    &mut a,
                    x.iter().zip(y).map(|(p, q)| f64::from(*p) - f64::from(*q)),
                );
            }
            (TensorData::F64(x), TensorData::F64(y)) if same_shape => {
                differences(&mut a, x.iter().zip(y).map(|(p, q)| p - q));
            }
            (TensorData::F16(x), TensorData::F16(y)) if same_shape => {
                differences(
                    &mut a,
                    x.iter()
                        .zip(y)
                        .map(|(p, q)| f64::from(p.to_f32()) - f64::from(q.to_f32())),
                );
            }
            (x, _) if x.dtype().is_float() => continue,
            (x, y) => {
                a.compared = x.len() as u64;
                if same_shape {
                    a.agreed = agreeing(x, y);
                }
            }
        }
        out.push((l.name.clone(), a));
    }
    out
}

/// Adds float differences, skipping non-finite ones (one NaN must not poison the running mean).
fn differences(a: &mut Agreement, diffs: impl Iterator<Item = f64>) {
    for d in diffs.filter(|d| d.is_finite()) {
        a.numeric += 1;
        a.abs_difference += d.abs();
    }
}

/// Equal elements of two non-float tensors of the same length (0 when their types differ).
fn agreeing(x: &TensorData, y: &TensorData) -> u64 {
    macro_rules! pairs {
        ($($v:ident),*) => {
            match (x, y) {
                $((TensorData::$v(p), TensorData::$v(q)) => p.iter().zip(q.iter()).filter(|(a, b)| a == b).count() as u64,)*
                _ => 0,
            }
        };
    }
    pairs!(Bool, U8, U16, U32, U64, I8, I16, I32, I64, Bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::Tensor;

    fn t(name: &str, data: TensorData) -> NamedTensor {
        let n = data.len();
        NamedTensor::new(name, Tensor::new(vec![n], data).unwrap())
    }

    #[test]
    fn labels_agree_and_numbers_differ() {
        let live = [
            t("label", TensorData::I64(vec![0, 1, 2, 2])),
            t("p", TensorData::F32(vec![0.5, 0.25])),
        ];
        let shadow = [
            t("label", TensorData::I64(vec![0, 1, 1, 2])),
            t("p", TensorData::F32(vec![0.25, 0.25])),
        ];
        let got = compare(&live, &shadow);
        assert_eq!(got[0].1.agreement_ratio(), Some(0.75));
        assert_eq!(got[1].1.mean_absolute_difference(), Some(0.125));
        // A shape change is full disagreement.
        let other = [t("label", TensorData::I64(vec![0, 1]))];
        assert_eq!(
            compare(&live[..1], &other)[0].1.agreement_ratio(),
            Some(0.0)
        );
    }
}
