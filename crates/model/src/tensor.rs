//! The neutral tensor type that crosses every boundary in Ferry.
//!
//! Protocol adapters decode into [`Tensor`] and engines consume it; neither side knows the other.
//! Data is kept flat, in row-major order, with its shape beside it.

use half::f16;

use crate::ByteStrings;

/// The element types a tensor can hold: every type ONNX models use at their inputs and outputs.
///
/// The names follow the KServe v2 protocol (`FP32`, `INT64`, `BYTES`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    /// `BOOL`, one byte per element on the wire.
    Bool,
    /// `UINT8`.
    U8,
    /// `UINT16`.
    U16,
    /// `UINT32`.
    U32,
    /// `UINT64`.
    U64,
    /// `INT8`.
    I8,
    /// `INT16`.
    I16,
    /// `INT32`.
    I32,
    /// `INT64`.
    I64,
    /// `FP16`, IEEE half precision.
    F16,
    /// `FP32`.
    F32,
    /// `FP64`.
    F64,
    /// `BYTES`: variable-length byte strings (ONNX `string` tensors).
    Bytes,
}

impl DataType {
    /// Every data type, in the order the KServe v2 specification lists them.
    pub const ALL: [DataType; 13] = [
        DataType::Bool,
        DataType::U8,
        DataType::U16,
        DataType::U32,
        DataType::U64,
        DataType::I8,
        DataType::I16,
        DataType::I32,
        DataType::I64,
        DataType::F16,
        DataType::F32,
        DataType::F64,
        DataType::Bytes,
    ];

    /// The KServe v2 name of the type (`FP32`, `INT64`, `BYTES`, ...).
    pub fn kserve_name(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::U8 => "UINT8",
            DataType::U16 => "UINT16",
            DataType::U32 => "UINT32",
            DataType::U64 => "UINT64",
            DataType::I8 => "INT8",
            DataType::I16 => "INT16",
            DataType::I32 => "INT32",
            DataType::I64 => "INT64",
            DataType::F16 => "FP16",
            DataType::F32 => "FP32",
            DataType::F64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    /// Parses a KServe v2 type name.
    pub fn from_kserve_name(name: &str) -> Option<DataType> {
        DataType::ALL.into_iter().find(|t| t.kserve_name() == name)
    }

    /// The TensorFlow `DataType` enum name TF Serving reports for this type (`DT_FLOAT`, ...).
    pub fn tf_name(self) -> &'static str {
        match self {
            DataType::Bool => "DT_BOOL",
            DataType::U8 => "DT_UINT8",
            DataType::U16 => "DT_UINT16",
            DataType::U32 => "DT_UINT32",
            DataType::U64 => "DT_UINT64",
            DataType::I8 => "DT_INT8",
            DataType::I16 => "DT_INT16",
            DataType::I32 => "DT_INT32",
            DataType::I64 => "DT_INT64",
            DataType::F16 => "DT_HALF",
            DataType::F32 => "DT_FLOAT",
            DataType::F64 => "DT_DOUBLE",
            DataType::Bytes => "DT_STRING",
        }
    }

    /// The ONNX `TensorProto.DataType` code of the type.
    pub fn onnx_code(self) -> i32 {
        match self {
            DataType::F32 => 1,
            DataType::U8 => 2,
            DataType::I8 => 3,
            DataType::U16 => 4,
            DataType::I16 => 5,
            DataType::I32 => 6,
            DataType::I64 => 7,
            DataType::Bytes => 8,
            DataType::Bool => 9,
            DataType::F16 => 10,
            DataType::F64 => 11,
            DataType::U32 => 12,
            DataType::U64 => 13,
        }
    }

    /// The size of one element in bytes, or `None` for variable-length `BYTES`.
    pub fn element_size(self) -> Option<usize> {
        Some(match self {
            DataType::Bool | DataType::U8 | DataType::I8 => 1,
            DataType::U16 | DataType::I16 | DataType::F16 => 2,
            DataType::U32 | DataType::I32 | DataType::F32 => 4,
            DataType::U64 | DataType::I64 | DataType::F64 => 8,
            DataType::Bytes => return None,
        })
    }

    /// Whether the type is a floating-point type.
    pub fn is_float(self) -> bool {
        matches!(self, DataType::F16 | DataType::F32 | DataType::F64)
    }
}

impl std::fmt::Display for DataType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kserve_name())
    }
}

/// The elements of a tensor, flat and row-major, one variant per [`DataType`].
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub enum TensorData {
    Bool(Vec<bool>),
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
    U64(Vec<u64>),
    I8(Vec<i8>),
    I16(Vec<i16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    F16(Vec<f16>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bytes(ByteStrings),
}

/// Calls `$body` with `$v` bound to the inner vector of any [`TensorData`] variant.
#[macro_export]
macro_rules! with_tensor_data {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            $crate::TensorData::Bool($v) => $body,
            $crate::TensorData::U8($v) => $body,
            $crate::TensorData::U16($v) => $body,
            $crate::TensorData::U32($v) => $body,
            $crate::TensorData::U64($v) => $body,
            $crate::TensorData::I8($v) => $body,
            $crate::TensorData::I16($v) => $body,
            $crate::TensorData::I32($v) => $body,
            $crate::TensorData::I64($v) => $body,
            $crate::TensorData::F16($v) => $body,
            $crate::TensorData::F32($v) => $body,
            $crate::TensorData::F64($v) => $body,
            $crate::TensorData::Bytes($v) => $body,
        }
    };
}

impl TensorData {
    /// The data type of the elements.
    pub fn dtype(&self) -> DataType {
        match self {
            TensorData::Bool(_) => DataType::Bool,
            TensorData::U8(_) => DataType::U8,
            TensorData::U16(_) => DataType::U16,
            TensorData::U32(_) => DataType::U32,
            TensorData::U64(_) => DataType::U64,
            TensorData::I8(_) => DataType::I8,
            TensorData::I16(_) => DataType::I16,
            TensorData::I32(_) => DataType::I32,
            TensorData::I64(_) => DataType::I64,
            TensorData::F16(_) => DataType::F16,
            TensorData::F32(_) => DataType::F32,
            TensorData::F64(_) => DataType::F64,
            TensorData::Bytes(_) => DataType::Bytes,
        }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        with_tensor_data!(self, v => v.len())
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// An empty vector of the given type with room for `capacity` elements.
    pub fn with_capacity(dtype: DataType, capacity: usize) -> TensorData {
        match dtype {
            DataType::Bool => TensorData::Bool(Vec::with_capacity(capacity)),
            DataType::U8 => TensorData::U8(Vec::with_capacity(capacity)),
            DataType::U16 => TensorData::U16(Vec::with_capacity(capacity)),
            DataType::U32 => TensorData::U32(Vec::with_capacity(capacity)),
            DataType::U64 => TensorData::U64(Vec::with_capacity(capacity)),
            DataType::I8 => TensorData::I8(Vec::with_capacity(capacity)),
            DataType::I16 => TensorData::I16(Vec::with_capacity(capacity)),
            DataType::I32 => TensorData::I32(Vec::with_capacity(capacity)),
            DataType::I64 => TensorData::I64(Vec::with_capacity(capacity)),
            DataType::F16 => TensorData::F16(Vec::with_capacity(capacity)),
            DataType::F32 => TensorData::F32(Vec::with_capacity(capacity)),
            DataType::F64 => TensorData::F64(Vec::with_capacity(capacity)),
            DataType::Bytes => TensorData::Bytes(ByteStrings::with_capacity(capacity, 0)),
        }
    }

    /// Decodes little-endian fixed-size elements, as the KServe binary extension lays them out.
    ///
    /// `BYTES` elements are each preceded by a 4-byte little-endian length.
    /// Returns `None` when the buffer does not hold a whole number of elements.
    pub fn from_le_bytes(dtype: DataType, raw: &[u8]) -> Option<TensorData> {
        fn chunks<const N: usize, T>(raw: &[u8], f: impl Fn([u8; N]) -> T) -> Option<Vec<T>> {
            if !raw.len().is_multiple_of(N) {
                return None;
            }
            Some(
                raw.chunks_exact(N)
                    .map(|c| f(c.try_into().expect("chunks_exact yields N bytes")))
                    .collect(),
            )
        }
        Some(match dtype {
            DataType::Bool => TensorData::Bool(raw.iter().map(|b| *b != 0).collect()),
            DataType::U8 => TensorData::U8(raw.to_vec()),
            DataType::I8 => TensorData::I8(raw.iter().map(|b| *b as i8).collect()),
            DataType::U16 => TensorData::U16(chunks(raw, u16::from_le_bytes)?),
            DataType::I16 => TensorData::I16(chunks(raw, i16::from_le_bytes)?),
            DataType::F16 => TensorData::F16(chunks(raw, f16::from_le_bytes)?),
            DataType::U32 => TensorData::U32(chunks(raw, u32::from_le_bytes)?),
            DataType::I32 => TensorData::I32(chunks(raw, i32::from_le_bytes)?),
            DataType::F32 => TensorData::F32(chunks(raw, f32::from_le_bytes)?),
            DataType::U64 => TensorData::U64(chunks(raw, u64::from_le_bytes)?),
            DataType::I64 => TensorData::I64(chunks(raw, i64::from_le_bytes)?),
            DataType::F64 => TensorData::F64(chunks(raw, f64::from_le_bytes)?),
            DataType::Bytes => TensorData::Bytes(length_prefixed(raw, usize::MAX)?),
        })
    }

    /// A tensor of `n` copies of this tensor's single element; `None` unless it holds exactly one element.
    pub fn repeat_single(&self, n: usize) -> Option<TensorData> {
        if self.len() != 1 {
            return None;
        }
        macro_rules! rep {
            ($($variant:ident),*) => {
                match self {
                    $(TensorData::$variant(v) => TensorData::$variant(std::iter::repeat_n(v[0].clone(), n).collect()),)*
                    TensorData::Bytes(_) => unreachable!("handled above"),
                }
            };
        }
        Some(match self {
            TensorData::Bytes(v) => TensorData::Bytes(v.repeat(0, n)),
            _ => rep!(Bool, U8, U16, U32, U64, I8, I16, I32, I64, F16, F32, F64),
        })
    }

    /// Like [`TensorData::from_le_bytes`], but refuses (`None`) a buffer holding more than `max` elements, counting
    /// `BYTES` elements as it goes so a flood of empty strings never allocates.
    pub fn from_le_bytes_at_most(dtype: DataType, raw: &[u8], max: usize) -> Option<TensorData> {
        match dtype.element_size() {
            Some(size) if raw.len() / size > max => None,
            Some(_) => TensorData::from_le_bytes(dtype, raw),
            None => length_prefixed(raw, max).map(TensorData::Bytes),
        }
    }

    /// Appends the elements as little-endian bytes (the inverse of [`TensorData::from_le_bytes`]).
    pub fn write_le_bytes(&self, out: &mut Vec<u8>) {
        match self {
            TensorData::Bool(v) => out.extend(v.iter().map(|b| u8::from(*b))),
            TensorData::U8(v) => out.extend_from_slice(v),
            TensorData::I8(v) => out.extend(v.iter().map(|x| *x as u8)),
            TensorData::U16(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::I16(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::F16(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::U32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::I32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::F32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::U64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::I64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::F64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::Bytes(v) => v.iter().for_each(|s| {
                out.extend_from_slice(&(s.len() as u32).to_le_bytes());
                out.extend_from_slice(s);
            }),
        }
    }

    /// Joins tensors' elements end to end (the data of a concatenation along the first dimension).
    /// Returns `None` when the parts have different types.
    pub fn concat(parts: &[&TensorData]) -> Option<TensorData> {
        let first = parts.first()?;
        let total = parts.iter().map(|p| p.len()).sum();
        let mut out = TensorData::with_capacity(first.dtype(), total);
        for part in parts {
            match (&mut out, part) {
                (TensorData::Bool(o), TensorData::Bool(p)) => o.extend_from_slice(p),
                (TensorData::U8(o), TensorData::U8(p)) => o.extend_from_slice(p),
                (TensorData::U16(o), TensorData::U16(p)) => o.extend_from_slice(p),
                (TensorData::U32(o), TensorData::U32(p)) => o.extend_from_slice(p),
                (TensorData::U64(o), TensorData::U64(p)) => o.extend_from_slice(p),
                (TensorData::I8(o), TensorData::I8(p)) => o.extend_from_slice(p),
                (TensorData::I16(o), TensorData::I16(p)) => o.extend_from_slice(p),
                (TensorData::I32(o), TensorData::I32(p)) => o.extend_from_slice(p),
                (TensorData::I64(o), TensorData::I64(p)) => o.extend_from_slice(p),
                (TensorData::F16(o), TensorData::F16(p)) => o.extend_from_slice(p),
                (TensorData::F32(o), TensorData::F32(p)) => o.extend_from_slice(p),
                (TensorData::F64(o), TensorData::F64(p)) => o.extend_from_slice(p),
                (TensorData::Bytes(o), TensorData::Bytes(p)) => o.extend_from(p),
                _ => return None,
            }
        }
        Some(out)
    }

    /// Keeps the elements in `range` (element indices), dropping the rest.
    pub fn slice(&self, range: std::ops::Range<usize>) -> TensorData {
        match self {
            TensorData::Bool(v) => TensorData::Bool(v[range].to_vec()),
            TensorData::U8(v) => TensorData::U8(v[range].to_vec()),
            TensorData::U16(v) => TensorData::U16(v[range].to_vec()),
            TensorData::U32(v) => TensorData::U32(v[range].to_vec()),
            TensorData::U64(v) => TensorData::U64(v[range].to_vec()),
            TensorData::I8(v) => TensorData::I8(v[range].to_vec()),
            TensorData::I16(v) => TensorData::I16(v[range].to_vec()),
            TensorData::I32(v) => TensorData::I32(v[range].to_vec()),
            TensorData::I64(v) => TensorData::I64(v[range].to_vec()),
            TensorData::F16(v) => TensorData::F16(v[range].to_vec()),
            TensorData::F32(v) => TensorData::F32(v[range].to_vec()),
            TensorData::F64(v) => TensorData::F64(v[range].to_vec()),
            TensorData::Bytes(v) => TensorData::Bytes(v.slice(range)),
        }
    }
}

/// Decodes `BYTES` elements each preceded by a 4-byte little-endian length, refusing (`None`) a truncated buffer or
/// more than `max` elements. Counts the elements first, so the offsets and contents are allocated once, exactly.
fn length_prefixed(raw: &[u8], max: usize) -> Option<ByteStrings> {
    let (mut count, mut bytes, mut rest) = (0usize, 0usize, raw);
    while !rest.is_empty() {
        if count == max {
            return None;
        }
        let len_bytes: [u8; 4] = rest.get(..4)?.try_into().ok()?;
        let len = u32::from_le_bytes(len_bytes) as usize;
        rest.get(4..4 + len)?;
        rest = &rest[4 + len..];
        count += 1;
        bytes += len;
    }
    let mut out = ByteStrings::with_capacity(count, bytes);
    let mut rest = raw;
    while !rest.is_empty() {
        let len = u32::from_le_bytes(rest[..4].try_into().expect("checked above")) as usize;
        out.push(&rest[4..4 + len]);
        rest = &rest[4 + len..];
    }
    Some(out)
}

/// A dense tensor: a shape and its row-major elements.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// The dimensions; an empty shape is a scalar.
    pub shape: Vec<usize>,
    /// The elements; their count is the product of `shape`.
    pub data: TensorData,
}

impl Tensor {
    /// Builds a tensor, checking that the element count matches the shape.
    pub fn new(shape: Vec<usize>, data: TensorData) -> Result<Tensor, ShapeMismatch> {
        let expected = element_count(&shape);
        if expected != Some(data.len()) {
            return Err(ShapeMismatch {
                shape,
                elements: data.len(),
            });
        }
        Ok(Tensor { shape, data })
    }

    /// The element type.
    pub fn dtype(&self) -> DataType {
        self.data.dtype()
    }
}

/// The number of elements a shape holds, or `None` on overflow.
pub fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, d| acc.checked_mul(*d))
}

/// A shape whose element count differs from the data supplied with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("shape {shape:?} needs {} elements but {elements} were given", element_count(.shape).map_or("too many".to_string(), |n| n.to_string()))]
pub struct ShapeMismatch {
    /// The shape given.
    pub shape: Vec<usize>,
    /// The number of elements given.
    pub elements: usize,
}

/// A tensor with the name of the model input or output it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// The input or output name.
    pub name: String,
    /// The value.
    pub tensor: Tensor,
    /// For outputs that were maps in the model (scikit-learn's ZipMap), the map keys, one per column.
    pub keys: Option<Vec<String>>,
}

impl NamedTensor {
    /// A named tensor without map keys.
    pub fn new(name: impl Into<String>, tensor: Tensor) -> NamedTensor {
        NamedTensor {
            name: name.into(),
            tensor,
            keys: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn le_bytes_round_trip_every_type() {
        let samples = vec![
            TensorData::Bool(vec![true, false]),
            TensorData::U8(vec![0, 255]),
            TensorData::U16(vec![1, 65535]),
            TensorData::U32(vec![7, u32::MAX]),
            TensorData::U64(vec![9, u64::MAX]),
            TensorData::I8(vec![-128, 127]),
            TensorData::I16(vec![-3, 3]),
            TensorData::I32(vec![i32::MIN, 5]),
            TensorData::I64(vec![i64::MIN, 5]),
            TensorData::F16(vec![f16::from_f32(1.5), f16::from_f32(-2.0)]),
            TensorData::F32(vec![1.25, -0.0]),
            TensorData::F64(vec![std::f64::consts::PI, 1e300]),
            TensorData::Bytes(vec![b"abc".to_vec(), vec![], vec![0, 159]].into()),
        ];
        for data in samples {
            let mut raw = Vec::new();
            data.write_le_bytes(&mut raw);
            assert_eq!(TensorData::from_le_bytes(data.dtype(), &raw), Some(data));
        }
    }

    #[test]
    fn repeat_and_limited_decode() {
        assert_eq!(
            TensorData::F32(vec![2.0]).repeat_single(3),
            Some(TensorData::F32(vec![2.0; 3]))
        );
        assert_eq!(TensorData::F32(vec![2.0, 1.0]).repeat_single(3), None);
        let mut raw = Vec::new();
        TensorData::Bytes(vec![vec![]; 5].into()).write_le_bytes(&mut raw);
        assert!(TensorData::from_le_bytes_at_most(DataType::Bytes, &raw, 4).is_none());
        assert_eq!(
            TensorData::from_le_bytes_at_most(DataType::Bytes, &raw, 5).map(|d| d.len()),
            Some(5)
        );
        assert!(TensorData::from_le_bytes_at_most(DataType::F32, &[0; 12], 2).is_none());
    }

    #[test]
    fn concat_then_slice_round_trips() {
        let a = TensorData::F32(vec![1.0, 2.0]);
        let b = TensorData::F32(vec![3.0]);
        let joined = TensorData::concat(&[&a, &b]).unwrap();
        assert_eq!(joined, TensorData::F32(vec![1.0, 2.0, 3.0]));
        assert_eq!(joined.slice(0..2), a);
        assert_eq!(joined.slice(2..3), b);
        assert_eq!(TensorData::concat(&[&a, &TensorData::I8(vec![1])]), None);
    }

    #[test]
    fn truncated_buffers_are_refused() {
        assert_eq!(TensorData::from_le_bytes(DataType::F32, &[0, 0, 0]), None);
        assert_eq!(
            TensorData::from_le_bytes(DataType::Bytes, &[5, 0, 0, 0, 1]),
            None
        );
        assert_eq!(TensorData::from_le_bytes(DataType::Bytes, &[5, 0]), None);
    }

    #[test]
    fn names_round_trip() {
        for t in DataType::ALL {
            assert_eq!(DataType::from_kserve_name(t.kserve_name()), Some(t));
        }
        assert_eq!(DataType::from_kserve_name("FLOAT"), None);
    }

    #[test]
    fn shape_is_checked() {
        assert!(Tensor::new(vec![2, 2], TensorData::F32(vec![0.0; 4])).is_ok());
        let err = Tensor::new(vec![2, 3], TensorData::F32(vec![0.0; 4])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "shape [2, 3] needs 6 elements but 4 were given"
        );
    }
}
