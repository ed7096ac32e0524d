//! A reader for the safetensors format: an 8-byte little-endian header length, a JSON header mapping each tensor
//! name to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the end of the header; an
//! optional `__metadata__` entry of strings), then the tensors' bytes, little-endian.
//!
//! The whole file is read into memory; tensors of F32, F16, BF16 and F64 convert to `f32` on request.

use std::collections::BTreeMap;

/// The largest JSON header accepted (the format's own limit).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Why a safetensors file cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SafetensorsError {
    /// The file is shorter than its 8-byte header length.
    #[error("the file has {0} bytes, fewer than the 8-byte header length")]
    TooShort(usize),
    /// The header length is larger than the file or the format's limit.
    #[error("the header length ({declared} bytes) is larger than {what} ({limit} bytes)")]
    BadHeaderLength {
        /// The declared length.
        declared: u64,
        /// What it exceeds.
        what: &'static str,
        /// That limit.
        limit: u64,
    },
    /// The header is not the expected JSON.
    #[error("the header is not valid: {0}")]
    BadHeader(String),
    /// A tensor's byte range does not fit the file or its shape.
    #[error("tensor `{name}`: {why}")]
    BadTensor {
        /// The tensor.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// A tensor's element type cannot be converted to `f32`.
    #[error("tensor `{name}` has dtype {dtype}; only F32, F16, BF16 and F64 weights can be read")]
    UnsupportedDtype {
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: String,
    },
    /// No tensor has that name.
    #[error("no tensor named `{0}`")]
    Missing(String),
}

/// One tensor's entry in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The element type as the header spells it (`F32`, `F16`, `BF16`, `I64`, ...).
    pub dtype: String,
    /// The dimensions.
    pub shape: Vec<usize>,
    /// The byte range in the data section.
    range: std::ops::Range<usize>,
}

#[derive(serde::Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

/// A parsed safetensors file, holding its bytes.
#[derive(Debug)]
pub struct SafeTensors {
    bytes: Vec<u8>,
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
}

/// Bytes per element of the dtypes the format defines; `None` for a dtype this reader does not know.
fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

impl SafeTensors {
    /// Parses a file's bytes, checking every tensor's byte range against the file and its shape.
    pub fn parse(bytes: Vec<u8>) -> Result<SafeTensors, SafetensorsError> {
        let Some(len_bytes) = bytes.get(..8) else {
            return Err(SafetensorsError::TooShort(bytes.len()));
        };
        let declared = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
        let available = (bytes.len() - 8) as u64;
        if declared > MAX_HEADER_BYTES {
            return Err(SafetensorsError::BadHeaderLength {
                declared,
                what: "the format's limit",
                limit: MAX_HEADER_BYTES,
            });
        }
        if declared > available {
            return Err(SafetensorsError::BadHeaderLength {
                declared,
                what: "the rest of the file",
                limit: available,
            });
        }
        let data_start = 8 + declared as usize;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&bytes[8..data_start])
                .map_err(|e| SafetensorsError::BadHeader(e.to_string()))?;
        let data_len = bytes.len() - data_start;
        let mut tensors = BTreeMap::new();
        for (name, value) in header {
            if name == "__metadata__" {
                continue;
            }
            let bad = |why: String| SafetensorsError::BadTensor {
                name: name.clone(),
                why,
            };
            let raw: RawEntry = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
            let [begin, end] = raw.data_offsets;
            if begin > end || end > data_len {
                return Err(bad(format!(
                    "data_offsets [{begin}, {end}] are outside the data section ({data_len} bytes)"
                )));
            }
            if let Some(size) = dtype_size(&raw.dtype) {
                let expected = raw
                    .shape
                    .iter()
                    .try_fold(size, |n, &d| n.checked_mul(d))
                    .ok_or_else(|| bad(format!("shape {:?} overflows", raw.shape)))?;
                if expected != end - begin {
                    return Err(bad(format!(
                        "{} bytes for shape {:?} of {}, but data_offsets [{begin}, {end}] hold {}",
                        expected,
                        raw.shape,
                        raw.dtype,
                        end - begin
                    )));
                }
            }
            tensors.insert(
                name,
                TensorInfo {
                    dtype: raw.dtype,
                    shape: raw.shape,
                    range: begin..end,
                },
            );
        }
        Ok(SafeTensors {
            bytes,
            data_start,
            tensors,
        })
    }

    /// The tensors' names and entries, in name order.
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    /// One tensor's entry.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// A tensor's elements converted to `f32` (from F32, F16, BF16 or F64), row-major.
    pub fn f32(&self, name: &str) -> Result<Vec<f32>, SafetensorsError> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| SafetensorsError::Missing(name.to_string()))?;
        let start = self.data_start + info.range.start;
        let data = &self.bytes[start..start + info.range.len()];
        Ok(match info.dtype.as_str() {
            "F32" => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            "F16" => data
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            "BF16" => data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            "F64" => data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
            other => {
                return Err(SafetensorsError::UnsupportedDtype {
                    name: name.to_string(),
                    dtype: other.to_string(),
                })
            }
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A safetensors file from `(name, dtype, shape, bytes)` entries, laid out in order.
    pub(crate) fn file(entries: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let mut data = Vec::new();
        for (name, dtype, shape, bytes) in entries {
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [data.len(), data.len() + bytes.len()]}),
            );
            data.extend_from_slice(bytes);
        }
        let header = serde_json::to_vec(&header).unwrap();
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend(header);
        out.extend(data);
        out
    }

    fn with_header(header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend(header.as_bytes());
        out.extend(data);
        out
    }

    #[test]
    fn converts_f32_f16_bf16_and_f64() {
        let values = [1.5f32, -2.0, 0.0, 65504.0];
        let f32s: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let f16s: Vec<u8> = values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let bf16s: Vec<u8> = [1.5f32, -2.0, 0.0, 3.0e38]
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let f64s: Vec<u8> = values
            .iter()
            .flat_map(|v| (*v as f64).to_le_bytes())
            .collect();
        let ids: Vec<u8> = [0i64, 1].iter().flat_map(|v| v.to_le_bytes()).collect();
        let st = SafeTensors::parse(file(&[
            ("a", "F32", vec![2, 2], f32s),
            ("b", "F16", vec![4], f16s),
            ("c", "BF16", vec![1, 4], bf16s),
            ("d", "F64", vec![4], f64s),
            ("ids", "I64", vec![2], ids),
        ]))
        .unwrap();
        assert_eq!(st.f32("a").unwrap(), values);
        assert_eq!(st.f32("b").unwrap(), values);
        assert_eq!(
            st.f32("c").unwrap(),
            [1.5, -2.0, 0.0, half::bf16::from_f32(3.0e38).to_f32()]
        );
        assert_eq!(st.f32("d").unwrap(), values);
        assert_eq!(st.info("a").unwrap().shape, [2, 2]);
        assert_eq!(st.tensors().len(), 5);
        assert_eq!(
            st.f32("ids").unwrap_err(),
            SafetensorsError::UnsupportedDtype {
                name: "ids".into(),
                dtype: "I64".into()
            }
        );
        assert_eq!(
            st.f32("nope").unwrap_err(),
            SafetensorsError::Missing("nope".into())
        );
    }

    #[test]
    fn refuses_bad_header_lengths() {
        assert_eq!(
            SafeTensors::parse(vec![1, 2, 3]).unwrap_err(),
            SafetensorsError::TooShort(3)
        );
        let mut bytes = 1000u64.to_le_bytes().to_vec();
        bytes.extend(b"{}");
        assert!(matches!(
            SafeTensors::parse(bytes).unwrap_err(),
            SafetensorsError::BadHeaderLength {
                declared: 1000,
                limit: 2,
                ..
            }
        ));
        let mut bytes = u64::MAX.to_le_bytes().to_vec();
        bytes.extend(b"{}");
        assert!(matches!(
            SafeTensors::parse(bytes).unwrap_err(),
            SafetensorsError::BadHeaderLength {
                what: "the format's limit",
                ..
            }
        ));
        assert!(matches!(
            SafeTensors::parse(with_header("[1, 2]", b"")).unwrap_err(),
            SafetensorsError::BadHeader(_)
        ));
        // An empty file list is a valid (empty) file.
        assert!(SafeTensors::parse(with_header("{}", b""))
            .unwrap()
            .tensors()
            .is_empty());
    }

    #[test]
    fn refuses_offsets_outside_the_data_or_unlike_the_shape() {
        let header = r#"{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}"#;
        let err = SafeTensors::parse(with_header(header, &[0; 4])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tensor `w`: data_offsets [0, 8] are outside the data section (4 bytes)"
        );
        let header = r#"{"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}"#;
        assert!(SafeTensors::parse(with_header(header, &[0; 8])).is_err());
        let header = r#"{"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}"#;
        let err = SafeTensors::parse(with_header(header, &[0; 8])).unwrap_err();
        assert!(
            err.to_string().contains("12 bytes for shape [3] of F32"),
            "{err}"
        );
        let header = r#"{"w": {"dtype": "F32", "shape": [2]}}"#;
        let err = SafeTensors::parse(with_header(header, &[0; 8])).unwrap_err();
        assert!(err.to_string().contains("data_offsets"), "{err}");
        let header =
            r#"{"w": {"dtype": "F32", "shape": [4611686018427387904, 8], "data_offsets": [0, 8]}}"#;
        let err = SafeTensors::parse(with_header(header, &[0; 8])).unwrap_err();
        assert!(err.to_string().contains("overflows"), "{err}");
    }
}
