//! What a model takes and gives: names, element types and shapes of its inputs and outputs.

use crate::DataType;

/// How a model value is laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueKind {
    /// A dense tensor.
    Tensor,
    /// A sequence of maps, one map per row, as scikit-learn's ZipMap produces.
    /// Ferry answers it as a dense `[rows, keys]` tensor of the map values, with the keys listed beside it.
    MapSequence {
        /// The type of the map keys (`INT64` or `BYTES`).
        key: DataType,
    },
}

/// One input or output of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// The name in the graph.
    pub name: String,
    /// The element type (for map sequences, the type of the map values).
    pub dtype: DataType,
    /// The dimensions, `-1` where the size is dynamic; `None` when even the rank is unknown.
    pub shape: Option<Vec<i64>>,
    /// Dense tensor or map sequence.
    pub kind: ValueKind,
}

impl TensorSpec {
    /// A dense tensor spec.
    pub fn tensor(name: impl Into<String>, dtype: DataType, shape: Vec<i64>) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype,
            shape: Some(shape),
            kind: ValueKind::Tensor,
        }
    }

    /// Whether `shape` fits this spec: same rank, and equal sizes wherever the spec fixes one.
    pub fn accepts_shape(&self, shape: &[usize]) -> bool {
        match &self.shape {
            None => true,
            Some(dims) => {
                dims.len() == shape.len()
                    && dims
                        .iter()
                        .zip(shape)
                        .all(|(want, got)| *want < 0 || *want as usize == *got)
            }
        }
    }

    /// The shape as it is shown to users: `-1` for dynamic dimensions, `[-1]` when the rank is unknown.
    pub fn display_shape(&self) -> Vec<i64> {
        self.shape.clone().unwrap_or_else(|| vec![-1])
    }
}

/// The inputs and outputs of a model, in graph order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Signature {
    /// The graph inputs that must be fed (initializers that are also inputs are not listed).
    pub inputs: Vec<TensorSpec>,
    /// The graph outputs.
    pub outputs: Vec<TensorSpec>,
}

impl Signature {
    /// The input with this name.
    pub fn input(&self, name: &str) -> Option<&TensorSpec> {
        self.inputs.iter().find(|s| s.name == name)
    }

    /// The output with this name.
    pub fn output(&self, name: &str) -> Option<&TensorSpec> {
        self.outputs.iter().find(|s| s.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_match_on_fixed_dimensions_only() {
        let spec = TensorSpec::tensor("x", DataType::F32, vec![-1, 4]);
        assert!(spec.accepts_shape(&[1, 4]));
        assert!(spec.accepts_shape(&[100, 4]));
        assert!(!spec.accepts_shape(&[1, 3]));
        assert!(!spec.accepts_shape(&[4]));
        let any = TensorSpec {
            shape: None,
            ..spec
        };
        assert!(any.accepts_shape(&[2, 2, 2]));
    }
}
