//! The limits every decoder keeps: rows, elements and JSON depth checked on declared shapes before anything is
//! decoded (`Limits`, with `scan_json`, the byte scan before parsing), and the memory a request's decoding may take
//! (`Budget`: 4 x its size + 1 MiB, charged before each allocation).

use ferry_model::NamedTensor;

use crate::error::InferError;

/// Per-request limits beyond the body size, checked before any work is queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Rows (the first dimension) an input may have.
    pub max_rows: usize,
    /// Elements one input tensor may have.
    pub max_tensor_elements: usize,
    /// How deeply a JSON body may nest arrays and objects.
    pub max_json_depth: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_rows: 65_536,
            max_tensor_elements: 1 << 26,
            max_json_depth: 64,
        }
    }
}

impl Limits {
    /// Checks decoded inputs against the row and element limits.
    pub fn check(&self, inputs: &[NamedTensor]) -> Result<(), InferError> {
        for input in inputs {
            self.check_shape(&input.name, &input.tensor.shape)?;
        }
        Ok(())
    }

    /// Checks a shape a client declared against the row and element limits, before anything is decoded or
    /// allocated for it.
    pub fn check_shape(&self, name: &str, shape: &[usize]) -> Result<(), InferError> {
        let rows = shape.first().copied().unwrap_or(1);
        if rows > self.max_rows {
            return Err(InferError::invalid(format!(
                "input `{name}` has {rows} rows; at most {} are allowed per request (--max-rows-per-request)",
                self.max_rows
            )));
        }
        let elements = ferry_model::element_count(shape).unwrap_or(usize::MAX);
        if elements > self.max_tensor_elements {
            return Err(InferError::invalid(format!(
                "input `{name}` has {elements} elements; at most {} are allowed per tensor (--max-tensor-elements)",
                self.max_tensor_elements
            )));
        }
        Ok(())
    }

    /// Scans a JSON body before parsing it: refuses nesting deeper than `max_json_depth`, and says how many values
    /// it holds (what a JSON tree of it would cost) and whether it spells non-finite numbers as bare tokens.
    pub fn scan_json(&self, body: &[u8]) -> Result<JsonScan, InferError> {
        let mut depth = 0usize;
        let mut strings = JsonStrings::default();
        let mut scan = JsonScan {
            values: 1,
            nonfinite: false,
        };
        for &b in body {
            if strings.inside(b) {
                continue;
            }
            match b {
                b'[' | b'{' => {
                    scan.values += 1;
                    depth += 1;
                    if depth > self.max_json_depth {
                        return Err(InferError::invalid(format!(
                            "the JSON body nests deeper than {} levels (--max-json-depth)",
                            self.max_json_depth
                        )));
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                b',' | b':' => scan.values += 1,
                // Outside strings, JSON's literals are lower case: these start `NaN` and `Infinity`.
                b'N' | b'I' => scan.nonfinite = true,
                _ => {}
            }
        }
        Ok(scan)
    }
}

/// Tracks whether a byte scan of JSON text is inside a string (escapes included).
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonStrings {
    in_string: bool,
    escaped: bool,
}

impl JsonStrings {
    /// Takes the next byte; true when it belongs to a string (its quotes included).
    pub fn inside(&mut self, b: u8) -> bool {
        if self.in_string {
            match (self.escaped, b) {
                (true, _) => self.escaped = false,
                (false, b'\\') => self.escaped = true,
                (false, b'"') => self.in_string = false,
                _ => {}
            }
            return true;
        }
        self.in_string = b == b'"';
        self.in_string
    }
}

/// What [`Limits::scan_json`] saw in a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonScan {
    /// About how many values (scalars, lists, objects, keys) the body holds.
    pub values: usize,
    /// Whether it has a `NaN` or `Infinity` token outside strings.
    pub nonfinite: bool,
}

impl JsonScan {
    /// About what parsing the body into a `serde_json::Value` tree would allocate: a `Value` and a map entry or
    /// list slot per value.
    pub fn tree_bytes(&self) -> usize {
        self.values.saturating_mul(64)
    }
}

/// How much memory a request's decoded tensors may take, as a multiple of the request's own size (see [`Budget`]).
pub const EXPANSION_FACTOR: usize = 4;
/// What any request may take beyond [`EXPANSION_FACTOR`] times its size, so small requests are never refused.
pub const EXPANSION_FLOOR: usize = 1 << 20;

/// The memory a request's decoding may still take, charged before each allocation: every path that expands data
/// (a single value filling a shape, byte strings, nested JSON, typed gRPC fields) takes from it first, so a request
/// of B bytes never decodes into more than `EXPANSION_FACTOR` × B + `EXPANSION_FLOOR` bytes.
#[derive(Debug, Clone)]
pub struct Budget {
    left: std::cell::Cell<usize>,
    total: usize,
    request_bytes: usize,
}

impl Budget {
    /// The budget of a request whose body (or message) is `request_bytes` long.
    pub fn for_request(request_bytes: usize) -> Budget {
        let total = request_bytes
            .saturating_mul(EXPANSION_FACTOR)
            .saturating_add(EXPANSION_FLOOR);
        Budget {
            left: std::cell::Cell::new(total),
            total,
            request_bytes,
        }
    }

    /// Takes `bytes`, or says why it cannot.
    pub fn take(&self, bytes: usize) -> Result<(), OverBudget> {
        match self.left.get().checked_sub(bytes) {
            Some(left) => {
                self.left.set(left);
                Ok(())
            }
            None => Err(OverBudget {
                total: self.total,
                request_bytes: self.request_bytes,
            }),
        }
    }

    /// What is left.
    pub fn left(&self) -> usize {
        self.left.get()
    }

    /// The whole budget.
    pub fn total(&self) -> usize {
        self.total
    }
}

/// A charge a request's [`Budget`] cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "decoding it would take more than {total} bytes of memory, the most a request of {request_bytes} bytes may take \
     ({factor} x its size + 1 MiB): split the request, or send the elements themselves rather than one \
     value filling a large shape",
    factor = EXPANSION_FACTOR
)]
pub struct OverBudget {
    /// The whole budget.
    pub total: usize,
    /// The size of the request it belongs to.
    pub request_bytes: usize,
}

/// A request that would decode into more memory than its budget is a 400.
impl From<OverBudget> for InferError {
    fn from(e: OverBudget) -> InferError {
        InferError::invalid(e.to_string())
    }
}

/// The memory decoded tensor data takes, counted as [`Budget`] charges it.
pub fn memory_cost(data: &ferry_model::TensorData) -> usize {
    let content = match data {
        ferry_model::TensorData::Bytes(v) => v.content_len(),
        _ => 0,
    };
    data.len() * element_cost(data.dtype()) + content
}

/// The memory byte strings take as prost decodes them (a vector each), before they are copied into a tensor's one
/// buffer: charged as well, since both are held while the copy is made.
pub fn decoded_strings_cost(strings: &[Vec<u8>]) -> usize {
    std::mem::size_of_val(strings) + strings.iter().map(Vec::len).sum::<usize>()
}

/// The bytes one element of `dtype` takes in memory: its size, or for `BYTES` the string an engine makes of it
/// (ONNX Runtime takes a `String` per element; the tensor itself holds an 8-byte offset), its content charged on
/// top. So a flood of empty strings is refused before an engine would multiply it.
pub fn element_cost(dtype: ferry_model::DataType) -> usize {
    dtype
        .element_size()
        .unwrap_or(std::mem::size_of::<String>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::{Tensor, TensorData};

    #[test]
    fn an_over_budget_charge_says_what_a_request_may_take() {
        let budget = Budget::for_request(10);
        assert_eq!(
            budget.take(usize::MAX).unwrap_err().to_string(),
            format!(
                "decoding it would take more than {} bytes of memory, the most a request of 10 bytes may take (4 x its \
                 size + 1 MiB): split the request, or send the elements themselves rather than one value filling a \
                 large shape",
                budget.total()
            )
        );
    }

    #[test]
    fn limits_count_rows_elements_and_json_depth() {
        let limits = Limits {
            max_rows: 2,
            max_tensor_elements: 8,
            max_json_depth: 3,
        };
        let t = |shape: Vec<usize>| {
            let n = shape.iter().product();
            NamedTensor::new(
                "x",
                Tensor::new(shape, TensorData::F32(vec![0.0; n])).unwrap(),
            )
        };
        assert!(limits.check(&[t(vec![2, 4])]).is_ok());
        assert!(limits
            .check(&[t(vec![3, 1])])
            .unwrap_err()
            .message
            .contains("rows"));
        assert!(limits
            .check(&[t(vec![1, 9])])
            .unwrap_err()
            .message
            .contains("elements"));
        assert!(limits.scan_json(br#"{"a": [[1]]}"#).is_ok());
        assert!(limits.scan_json(br#"{"a": [[[1]]]}"#).is_err());
        // Brackets inside strings (and escaped quotes) do not count.
        assert!(limits.scan_json(br#"{"a": "[[[[\"[[[", "b": [1]}"#).is_ok());
    }
}
