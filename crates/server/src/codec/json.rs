//! Tensor data in JSON, shared by the KServe v2 and TF Serving adapters: nested arrays to flat elements
//! and back.

use base64::Engine as _;
use ferry_model::{DataType, TensorData};
use half::f16;
use serde::ser::{SerializeMap, SerializeSeq, SerializeStruct};
use serde::{Serialize, Serializer};
use serde_json::Value;

use crate::codec::limits::{Budget, OverBudget};

/// Why JSON tensor data cannot be decoded; the adapters prefix the input's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonDataError {
    /// Nested lists whose elements differ in shape.
    #[error("ragged nested list: element {index} has shape {shape:?} but element 0 has {first:?}")]
    Ragged {
        /// The element that differs.
        index: usize,
        /// Its shape.
        shape: Vec<usize>,
        /// Element 0's shape.
        first: Vec<usize>,
    },
    /// An element that is not of the tensor's type.
    #[error("element {index}: expected {want}, got {got} ({shown})")]
    Element {
        /// The element, counted in row-major order.
        index: usize,
        /// What the datatype takes.
        want: &'static str,
        /// What kind of JSON value it is.
        got: &'static str,
        /// The value, cut at 40 bytes.
        shown: String,
    },
    /// A `data` field with more or fewer elements than the shape.
    #[error("the shape needs {expected} elements but `data` has {given}")]
    Count {
        /// Elements the shape needs.
        expected: usize,
        /// Elements `data` holds.
        given: usize,
    },
    /// What the streaming [`Decoder`] refused: the text of serde_json's error (a syntax error, or the decoder's own
    /// reason passed through serde's `custom`), with the position dropped and the element named. serde_json keeps
    /// its errors as text, so this stays text.
    #[error("{0}")]
    Decode(String),
}

/// The shape of nested JSON arrays, checking that every level is rectangular. A non-array is a scalar (`[]`).
pub fn nested_shape(value: &Value) -> Result<Vec<usize>, JsonDataError> {
    match value {
        Value::Array(items) => {
            let mut shape = vec![items.len()];
            if let Some(first) = items.first() {
                let inner = nested_shape(first)?;
                for (i, item) in items.iter().enumerate().skip(1) {
                    let other = nested_shape(item)?;
                    if other != inner {
                        return Err(JsonDataError::Ragged {
                            index: i,
                            shape: other,
                            first: inner,
                        });
                    }
                }
                shape.extend(inner);
            }
            Ok(shape)
        }
        _ => Ok(Vec::new()),
    }
}

/// Pushes the non-array leaves of `value` in row-major order.
pub fn leaves<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|v| leaves(v, out)),
        other => out.push(other),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Converts JSON leaves to elements of `dtype`. `{"b64": "..."}` objects are accepted for `BYTES` when `b64` is set.
pub fn decode_leaves(
    dtype: DataType,
    values: &[&Value],
    b64: bool,
) -> Result<TensorData, JsonDataError> {
    fn each<T>(
        values: &[&Value],
        f: impl Fn(&Value) -> Option<T>,
        want: &'static str,
    ) -> Result<Vec<T>, JsonDataError> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                f(v).ok_or_else(|| {
                    let shown = v.to_string();
                    let shown = if shown.len() > 40 {
                        format!("{}...", &shown[..shown.floor_char_boundary(40)])
                    } else {
                        shown
                    };
                    JsonDataError::Element {
                        index: i,
                        want,
                        got: kind(v),
                        shown,
                    }
                })
            })
            .collect()
    }
    fn int<T: TryFrom<i64> + TryFrom<u64>>(v: &Value) -> Option<T> {
        match v {
            Value::Number(n) => n
                .as_i64()
                .and_then(|x| T::try_from(x).ok())
                .or_else(|| n.as_u64().and_then(|x| T::try_from(x).ok())),
            _ => None,
        }
    }
    let float = |v: &Value| v.as_f64().or_else(|| v.as_str().and_then(nonfinite));
    Ok(match dtype {
        DataType::Bool => TensorData::Bool(each(values, Value::as_bool, "true or false")?),
        DataType::U8 => TensorData::U8(each(values, int::<u8>, "an integer in 0..=255")?),
        DataType::U16 => TensorData::U16(each(values, int::<u16>, "an integer in 0..=65535")?),
        DataType::U32 => TensorData::U32(each(values, int::<u32>, "a UINT32 integer")?),
        DataType::U64 => TensorData::U64(each(values, int::<u64>, "a UINT64 integer")?),
        DataType::I8 => TensorData::I8(each(values, int::<i8>, "an integer in -128..=127")?),
        DataType::I16 => TensorData::I16(each(values, int::<i16>, "an INT16 integer")?),
        DataType::I32 => TensorData::I32(each(values, int::<i32>, "an INT32 integer")?),
        DataType::I64 => TensorData::I64(each(values, int::<i64>, "an INT64 integer")?),
        DataType::F16 => TensorData::F16(each(
            values,
            |v| float(v).and_then(to_f16),
            "a number in FP16's range",
        )?),
        DataType::F32 => TensorData::F32(each(
            values,
            |v| float(v).and_then(to_f32),
            "a number in FP32's range",
        )?),
        DataType::F64 => TensorData::F64(each(values, float, "a number")?),
        DataType::Bytes => TensorData::Bytes(
            each(
                values,
                |v| match v {
                    Value::String(s) => Some(s.as_bytes().to_vec()),
                    Value::Object(map) if b64 && map.len() == 1 => map
                        .get("b64")
                        .and_then(Value::as_str)
                        .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok()),
                    _ => None,
                },
                if b64 {
                    "a string or {\"b64\": \"...\"}"
                } else {
                    "a string"
                },
            )?
            .into(),
        ),
    })
}

/// `x` as FP32, unless it is finite and beyond FP32's range (a cast would make it infinite).
fn to_f32(x: f64) -> Option<f32> {
    let y = x as f32;
    (y.is_finite() || !x.is_finite()).then_some(y)
}

/// `x` as FP16, unless it is finite and beyond FP16's range.
fn to_f16(x: f64) -> Option<f16> {
    let y = f16::from_f64(x);
    (y.is_finite() || !x.is_finite()).then_some(y)
}

/// One element of a tensor as JSON. Byte strings are text (invalid UTF-8 replaced) or, with `b64`,
/// `{"b64": "..."}`.
struct Element<'a>(&'a TensorData, usize, bool, NonFinite);

/// How non-finite floats are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonFinite {
    /// As the bare tokens `NaN`, `Infinity`, `-Infinity` (what Triton and TF Serving answer).
    Tokens,
    /// As `null`, so strict JSON readers can read the text (payload logs).
    Null,
}

impl Serialize for Element<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let i = self.1;
        match self.0 {
            TensorData::Bool(v) => s.serialize_bool(v[i]),
            TensorData::U8(v) => s.serialize_u8(v[i]),
            TensorData::U16(v) => s.serialize_u16(v[i]),
            TensorData::U32(v) => s.serialize_u32(v[i]),
            TensorData::U64(v) => s.serialize_u64(v[i]),
            TensorData::I8(v) => s.serialize_i8(v[i]),
            TensorData::I16(v) => s.serialize_i16(v[i]),
            TensorData::I32(v) => s.serialize_i32(v[i]),
            TensorData::I64(v) => s.serialize_i64(v[i]),
            TensorData::F16(v) => {
                float(s, self.3, v[i].to_f64(), |s| s.serialize_f32(v[i].to_f32()))
            }
            TensorData::F32(v) => float(s, self.3, f64::from(v[i]), |s| s.serialize_f32(v[i])),
            TensorData::F64(v) => float(s, self.3, v[i], |s| s.serialize_f64(v[i])),
            TensorData::Bytes(v) if self.2 => {
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry(
                    "b64",
                    &base64::engine::general_purpose::STANDARD.encode(&v[i]),
                )?;
                map.end()
            }
            TensorData::Bytes(v) => s.serialize_str(&String::from_utf8_lossy(&v[i])),
        }
    }
}

/// Writes a float: finite ones (and, with [`NonFinite::Null`], all of them: serde_json writes `null`) by `finite`,
/// the others as the bare tokens `NaN`, `Infinity` and `-Infinity` that
/// Triton and TF Serving write and Python's `json` and the clients built on it read (serde_json would write `null`,
/// losing the value's kind and sign).
fn float<S: Serializer>(
    s: S,
    mode: NonFinite,
    x: f64,
    finite: impl FnOnce(S) -> Result<S::Ok, S::Error>,
) -> Result<S::Ok, S::Error> {
    if x.is_finite() || mode == NonFinite::Null {
        return finite(s);
    }
    let token = if x.is_nan() {
        "NaN"
    } else if x > 0.0 {
        "Infinity"
    } else {
        "-Infinity"
    };
    // serde_json writes a struct of this name and field verbatim: it is how its `RawValue` is written (the name is
    // private to serde_json; `nonfinite_outputs_are_bare_tokens` holds the output to the expected text).
    const RAW: &str = "$serde_json::private::RawValue";
    let mut raw = s.serialize_struct(RAW, 1)?;
    raw.serialize_field(RAW, token)?;
    raw.end()
}

/// A tensor's elements as one flat JSON list.
pub struct FlatJson<'a>(pub &'a TensorData, pub NonFinite);

impl Serialize for FlatJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for i in 0..self.0.len() {
            seq.serialize_element(&Element(self.0, i, false, self.1))?;
        }
        seq.end()
    }
}

/// A tensor (or a slice of it starting at element `start`) as nested JSON lists following `shape`.
pub struct NestedJson<'a> {
    /// All the elements.
    pub data: &'a TensorData,
    /// The shape of the part to write.
    pub shape: &'a [usize],
    /// The index of its first element.
    pub start: usize,
    /// Whether byte strings are written as `{"b64": "..."}`.
    pub b64: bool,
}

impl Serialize for NestedJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.shape.split_first() {
            None => Element(self.data, self.start, self.b64, NonFinite::Tokens).serialize(s),
            Some((n, rest)) => {
                let stride: usize = rest.iter().product();
                let mut seq = s.serialize_seq(Some(*n))?;
                for i in 0..*n {
                    seq.serialize_element(&NestedJson {
                        data: self.data,
                        shape: rest,
                        start: self.start + i * stride,
                        b64: self.b64,
                    })?;
                }
                seq.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_shapes() {
        assert_eq!(
            nested_shape(&json!([[1, 2], [3, 4], [5, 6]])).unwrap(),
            vec![3, 2]
        );
        assert_eq!(nested_shape(&json!(5)).unwrap(), Vec::<usize>::new());
        assert_eq!(nested_shape(&json!([])).unwrap(), vec![0]);
        assert!(nested_shape(&json!([[1, 2], [3]])).is_err());
    }

    #[test]
    fn leaves_decode_with_range_checks() {
        let v = json!([[1, 2], [3, 300]]);
        let mut l = Vec::new();
        leaves(&v, &mut l);
        assert_eq!(
            decode_leaves(DataType::I32, &l, false).unwrap(),
            TensorData::I32(vec![1, 2, 3, 300])
        );
        let e = decode_leaves(DataType::U8, &l, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("element 3: expected an integer in 0..=255"),
            "{e}"
        );
        let e = decode_leaves(DataType::I64, &[&json!(1.5)], false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("expected an INT64 integer, got a number (1.5)"),
            "{e}"
        );
        assert_eq!(
            decode_leaves(
                DataType::Bytes,
                &[&json!({"b64": "aGk="}), &json!("x")],
                true
            )
            .unwrap(),
            TensorData::Bytes(vec![b"hi".to_vec(), b"x".to_vec()].into())
        );
        assert!(decode_leaves(DataType::Bytes, &[&json!({"b64": "aGk="})], false).is_err());
    }

    #[test]
    fn nested_output() {
        let data = TensorData::F32(vec![1.0, 2.5, 3.0, 4.0, 5.0, 6.0]);
        let s = serde_json::to_string(&NestedJson {
            data: &data,
            shape: &[3, 2],
            start: 0,
            b64: false,
        })
        .unwrap();
        assert_eq!(s, "[[1.0,2.5],[3.0,4.0],[5.0,6.0]]");
        let s = serde_json::to_string(&NestedJson {
            data: &data,
            shape: &[2],
            start: 2,
            b64: false,
        })
        .unwrap();
        assert_eq!(s, "[3.0,4.0]");
        let bytes = TensorData::Bytes(vec![b"hi".to_vec()].into());
        let s = serde_json::to_string(&NestedJson {
            data: &bytes,
            shape: &[1],
            start: 0,
            b64: true,
        })
        .unwrap();
        assert_eq!(s, r#"[{"b64":"aGk="}]"#);
        assert_eq!(
            serde_json::to_string(&FlatJson(&data, NonFinite::Tokens)).unwrap(),
            "[1.0,2.5,3.0,4.0,5.0,6.0]"
        );
    }
}

/// Decodes a KServe `data` field (flat or nested lists) straight into elements of `dtype`, without building a JSON
/// tree: the hot path for large JSON tensors. Elements beyond `expected` are counted, not stored; nested lists must
/// be rectangular; every stored element is charged to `budget` first.
pub fn decode_data(
    dtype: DataType,
    raw: &str,
    expected: usize,
    budget: &Budget,
) -> Result<TensorData, JsonDataError> {
    let mut decoder = Decoder::new(dtype, false, Some(expected), raw.len(), budget);
    decoder.decode_str(raw)?;
    let given = decoder.given();
    if given != expected {
        return Err(JsonDataError::Count { expected, given });
    }
    Ok(decoder.finish())
}

/// Decodes one JSON value (a scalar or rectangular nested lists) into elements of `dtype` and its shape, without
/// building a JSON tree; `{"b64": "..."}` objects are byte strings when `b64` is set.
pub fn decode_value(
    dtype: DataType,
    raw: &str,
    b64: bool,
    budget: &Budget,
) -> Result<(TensorData, Vec<usize>), JsonDataError> {
    let mut decoder = Decoder::new(dtype, b64, None, raw.len(), budget);
    let shape = decoder.decode_str(raw)?;
    Ok((decoder.finish(), shape))
}

/// The fewest bytes of JSON one element of `dtype` takes, with its separator (`0,`, `"",`, `true,`).
fn min_json_bytes(dtype: DataType) -> usize {
    match dtype {
        DataType::Bytes => 3,
        DataType::Bool => 5,
        _ => 2,
    }
}

/// Collects the scalars of JSON values into one typed vector while a deserializer walks their nested lists, checking
/// that every value is rectangular and charging each element to the request's [`Budget`] before storing it.
///
/// Several values may go into one decoder (the instances of a TF Serving row-format request, one input at a time):
/// [`Decoder::decode_str`] gives each one's shape.
pub struct Decoder<'b> {
    data: TensorData,
    /// Store at most this many elements (more are only counted).
    limit: Option<usize>,
    extra: usize,
    b64: bool,
    cost: usize,
    budget: &'b Budget,
    /// The lists open around the current position.
    depth: usize,
    /// The length every list at each depth must have (set by the first one that closes).
    dims: Vec<Option<usize>>,
    /// The depth at which scalars sit (set by the first one).
    leaf_depth: Option<usize>,
}

impl<'b> Decoder<'b> {
    /// A decoder for `dtype`; `json_bytes` (the size of the JSON it will read) sizes its first allocation.
    pub fn new(
        dtype: DataType,
        b64: bool,
        limit: Option<usize>,
        json_bytes: usize,
        budget: &'b Budget,
    ) -> Decoder<'b> {
        let cost = crate::codec::limits::element_cost(dtype);
        // Size the buffer from the data actually sent and what the budget allows, never from a client's shape.
        let capacity = (json_bytes / min_json_bytes(dtype) + 1)
            .min(limit.unwrap_or(usize::MAX))
            .min(budget.left() / cost);
        // The first allocation is charged like every later growth (see `charge`).
        let capacity = if budget.take(capacity * cost).is_ok() {
            capacity
        } else {
            0
        };
        Decoder {
            data: TensorData::with_capacity(dtype, capacity),
            limit,
            extra: 0,
            b64,
            cost,
            budget,
            depth: 0,
            dims: Vec::new(),
            leaf_depth: None,
        }
    }

    /// Elements seen so far (stored or only counted).
    pub fn given(&self) -> usize {
        self.data.len() + self.extra
    }

    /// The elements stored.
    pub fn finish(self) -> TensorData {
        self.data
    }

    /// Decodes one value from JSON text and gives its shape; errors name the element and drop serde_json's position
    /// (which means nothing to a client when `raw` is one field of a body).
    pub fn decode_str(&mut self, raw: &str) -> Result<Vec<usize>, JsonDataError> {
        let mut de = serde_json::Deserializer::from_str(raw);
        let shape = self.decode(&mut de).map_err(|e| self.explain(e))?;
        de.end().map_err(|e| self.explain(e))?;
        Ok(shape)
    }

    /// Turns a serde_json error into a client message naming the element it happened at.
    fn explain(&self, e: serde_json::Error) -> JsonDataError {
        let text = e.to_string();
        let text = match text.rfind(" at line ") {
            Some(i) => text[..i].to_string(),
            None => text,
        };
        JsonDataError::Decode(
            if text.starts_with("element ") || text.starts_with("ragged") {
                text
            } else {
                format!("element {}: {text}", self.given())
            },
        )
    }

    /// Decodes one value from a deserializer and gives its shape.
    fn decode<'de, D: serde::Deserializer<'de>>(&mut self, d: D) -> Result<Vec<usize>, D::Error> {
        self.depth = 0;
        self.dims.clear();
        self.leaf_depth = None;
        serde::de::DeserializeSeed::deserialize(&mut *self, d)?;
        Ok(match self.leaf_depth {
            Some(depth) => self.dims[..depth].iter().map(|d| d.unwrap_or(0)).collect(),
            // Only lists, all empty at their deepest: `[]` is [0], `[[], []]` is [2, 0].
            None => self.dims.iter().map(|d| d.unwrap_or(0)).collect(),
        })
    }

    fn fail<E: serde::de::Error>(&self, want: &str, got: &str) -> E {
        E::custom(format!(
            "element {}: expected {want}, got {got}",
            self.given()
        ))
    }

    /// Checks that a scalar sits as deep as every other, and whether it should be stored (past the limit it is only
    /// counted).
    fn leaf<E: serde::de::Error>(&mut self) -> Result<bool, E> {
        match self.leaf_depth {
            // A list already closed at this depth or deeper held no value here: `[[[]], [1]]` is ragged.
            None if self.dims.len() > self.depth => {
                return Err(E::custom(format!(
                    "ragged nested list: element {} is at depth {} below an empty list",
                    self.given(),
                    self.depth
                )))
            }
            None => self.leaf_depth = Some(self.depth),
            Some(d) if d != self.depth => {
                return Err(E::custom(format!(
                    "ragged nested list: element {} is at depth {} but element 0 is at depth {d}",
                    self.given(),
                    self.depth
                )))
            }
            Some(_) => {}
        }
        if self.limit.is_some_and(|limit| self.data.len() >= limit) {
            self.extra += 1;
            return Ok(false);
        }
        Ok(true)
    }

    /// Charges one element (and `content` bytes of a byte string) to the budget.
    /// Charges the room for one more element (and `content` bytes of a byte string) to the budget. The budget
    /// follows the vector's capacity: when it is full, the growth is charged first and then reserved exactly, so
    /// the memory held is the memory charged.
    fn charge<E: serde::de::Error>(&mut self, content: usize) -> Result<(), E> {
        let given = self.given();
        let refuse = |e: OverBudget| E::custom(format!("element {given}: {e}"));
        let (len, capacity) =
            ferry_model::with_tensor_data!(&self.data, v => (v.len(), v.capacity()));
        if len == capacity {
            let grow = capacity.max(16);
            self.budget
                .take(grow.saturating_mul(self.cost))
                .map_err(refuse)?;
            ferry_model::with_tensor_data!(&mut self.data, v => v.reserve_exact(grow));
        }
        // A byte string's content goes into the tensor's one buffer, whose growth is charged the same way (all of
        // a doubling when the budget allows, else just what this string needs).
        if let TensorData::Bytes(o) = &mut self.data {
            let (held, capacity) = (o.content_len(), o.content_capacity());
            if held + content > capacity {
                let need = held + content - capacity;
                let grow = need.max(capacity).max(256);
                let grow = match self.budget.take(grow) {
                    Ok(()) => grow,
                    Err(_) => {
                        self.budget.take(need).map_err(refuse)?;
                        need
                    }
                };
                o.reserve_content_exact(grow);
            }
        }
        Ok(())
    }

    fn int<E: serde::de::Error>(
        &mut self,
        v: i128,
        shown: &dyn std::fmt::Display,
    ) -> Result<(), E> {
        if !self.leaf()? {
            return Ok(());
        }
        self.charge(0)?;
        fn put<T: TryFrom<i128>, E: serde::de::Error>(
            out: &mut Vec<T>,
            v: i128,
            want: &str,
            i: usize,
            shown: &dyn std::fmt::Display,
        ) -> Result<(), E> {
            out.push(T::try_from(v).map_err(|_| {
                E::custom(format!(
                    "element {i}: expected {want}, got a number ({shown})"
                ))
            })?);
            Ok(())
        }
        let i = self.given();
        match &mut self.data {
            TensorData::U8(o) => put(o, v, "an integer in 0..=255", i, shown),
            TensorData::U16(o) => put(o, v, "an integer in 0..=65535", i, shown),
            TensorData::U32(o) => put(o, v, "a UINT32 integer", i, shown),
            TensorData::U64(o) => put(o, v, "a UINT64 integer", i, shown),
            TensorData::I8(o) => put(o, v, "an integer in -128..=127", i, shown),
            TensorData::I16(o) => put(o, v, "an INT16 integer", i, shown),
            TensorData::I32(o) => put(o, v, "an INT32 integer", i, shown),
            TensorData::I64(o) => put(o, v, "an INT64 integer", i, shown),
            _ => self.put_float(v as f64, shown),
        }
    }

    fn float<E: serde::de::Error>(
        &mut self,
        v: f64,
        shown: &dyn std::fmt::Display,
    ) -> Result<(), E> {
        if !self.leaf()? {
            return Ok(());
        }
        self.charge(0)?;
        self.put_float(v, shown)
    }

    /// Stores a number in a float tensor; a finite number too large for the type is refused, not made infinite.
    fn put_float<E: serde::de::Error>(
        &mut self,
        v: f64,
        shown: &dyn std::fmt::Display,
    ) -> Result<(), E> {
        let i = self.given();
        let out_of_range =
            |name: &str| E::custom(format!("element {i}: {shown} is out of range for {name}"));
        match &mut self.data {
            TensorData::F16(o) => {
                o.push(to_f16(v).ok_or_else(|| out_of_range("FP16 (largest 65504)"))?)
            }
            TensorData::F32(o) => {
                o.push(to_f32(v).ok_or_else(|| out_of_range("FP32 (largest 3.4028235e38)"))?)
            }
            TensorData::F64(o) => o.push(v),
            TensorData::Bool(_) => {
                return Err(self.fail("true or false", &format!("a number ({shown})")))
            }
            TensorData::Bytes(_) => {
                return Err(self.fail("a string", &format!("a number ({shown})")))
            }
            other => {
                let want = match other.dtype() {
                    DataType::U8 => "an integer in 0..=255",
                    DataType::U16 => "an integer in 0..=65535",
                    DataType::U32 => "a UINT32 integer",
                    DataType::U64 => "a UINT64 integer",
                    DataType::I8 => "an integer in -128..=127",
                    DataType::I16 => "an INT16 integer",
                    DataType::I32 => "an INT32 integer",
                    _ => "an INT64 integer",
                };
                return Err(self.fail(want, &format!("a number ({shown})")));
            }
        }
        Ok(())
    }

    fn want(&self) -> &'static str {
        match self.data.dtype() {
            DataType::Bool => "true or false",
            DataType::Bytes if self.b64 => "a string or {\"b64\": \"...\"}",
            DataType::Bytes => "a string",
            t if t.is_float() => "a number",
            _ => "an integer",
        }
    }

    fn bytes<E: serde::de::Error>(&mut self, v: &[u8]) -> Result<(), E> {
        match &mut self.data {
            TensorData::Bytes(o) => {
                o.push(v);
                Ok(())
            }
            _ => unreachable!("bytes() is called for BYTES tensors only"),
        }
    }
}

/// A request body's JSON text after the nesting scan, with the bare non-finite tokens turned into strings when it
/// has any (the copy is charged to the request's budget), and what the scan saw.
pub fn json_text<'a>(
    body: &'a [u8],
    limits: &crate::codec::limits::Limits,
    budget: &Budget,
) -> Result<(std::borrow::Cow<'a, [u8]>, crate::codec::limits::JsonScan), crate::error::InferError>
{
    let scan = limits.scan_json(body)?;
    if !scan.nonfinite {
        return Ok((std::borrow::Cow::Borrowed(body), scan));
    }
    let text = nonfinite_as_strings(body);
    budget.take(text.len())?;
    Ok((std::borrow::Cow::Owned(text), scan))
}

/// The spellings of non-finite numbers: JSON has none, so Triton and TF Serving write these bare tokens (as
/// Python's `json` module does), which [`nonfinite_as_strings`] turns into strings before parsing.
fn nonfinite(text: &str) -> Option<f64> {
    match text {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => None,
    }
}

/// Rewrites the bare tokens `NaN`, `Infinity` and `-Infinity` outside strings as the strings `"NaN"`,
/// `"Infinity"` and `"-Infinity"`, which float inputs accept, so standard JSON parsers can read the body. Called only
/// when a scan saw such a token (`Limits::scan_json`); anything else is copied unchanged and left to the parser.
pub fn nonfinite_as_strings(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 16);
    let mut strings = crate::codec::limits::JsonStrings::default();
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        if strings.inside(b) {
            out.push(b);
            i += 1;
            continue;
        }
        // Only where a value may stand (after `[`, `,` or `:`): a bare `NaN` as an object key stays the error it is.
        let value_position = matches!(
            out.iter().rev().find(|c| !c.is_ascii_whitespace()),
            Some(b'[' | b',' | b':')
        );
        let token = [&b"NaN"[..], b"Infinity", b"-Infinity"]
            .into_iter()
            .find(|t| body[i..].starts_with(t));
        match token.filter(|_| value_position) {
            Some(t) => {
                out.push(b'"');
                out.extend_from_slice(t);
                out.push(b'"');
                i += t.len();
            }
            None => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

impl<'de> serde::de::DeserializeSeed<'de> for &mut Decoder<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for &mut Decoder<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a list of tensor elements")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        use serde::de::Error;
        let depth = self.depth;
        if self.leaf_depth.is_some_and(|d| d <= depth) {
            return Err(A::Error::custom(format!(
                "ragged nested list: a list where element {} should be a value",
                self.given()
            )));
        }
        self.depth += 1;
        let mut n = 0usize;
        while seq.next_element_seed(&mut *self)?.is_some() {
            n += 1;
        }
        self.depth -= 1;
        if self.dims.len() <= depth {
            self.dims.resize(depth + 1, None);
        }
        match self.dims[depth] {
            None => self.dims[depth] = Some(n),
            Some(m) if m != n => {
                return Err(A::Error::custom(format!(
                    "ragged nested list: a list at depth {depth} has {n} elements but an earlier one has {m}"
                )))
            }
            Some(_) => {}
        }
        Ok(())
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
        if !matches!(self.data, TensorData::Bool(_)) {
            return Err(self.fail(self.want(), "a boolean"));
        }
        if !self.leaf()? {
            return Ok(());
        }
        self.charge(0)?;
        if let TensorData::Bool(o) = &mut self.data {
            o.push(v);
        }
        Ok(())
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.int(i128::from(v), &v)
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.int(i128::from(v), &v)
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        // Shown as Rust's Debug writes it: 3.5e38, not 39 digits.
        self.float(v, &format_args!("{v:?}"))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        if self.data.dtype() == DataType::Bytes {
            if !self.leaf()? {
                return Ok(());
            }
            self.charge(v.len())?;
            return self.bytes(v.as_bytes());
        }
        if self.data.dtype().is_float() {
            if let Some(x) = nonfinite(v) {
                return self.float(x, &v);
            }
        }
        let shown = if v.len() > 40 {
            format!("{}...", &v[..v.floor_char_boundary(40)])
        } else {
            v.to_string()
        };
        Err(self.fail(self.want(), &format!("a string ({shown:?})")))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        Err(self.fail(self.want(), "null"))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        use serde::de::Error;
        if !(self.b64 && self.data.dtype() == DataType::Bytes) {
            return Err(self.fail(self.want(), "an object"));
        }
        let key: Option<std::borrow::Cow<'de, str>> = map.next_key()?;
        if key.as_deref() != Some("b64") {
            return Err(self.fail(self.want(), "an object"));
        }
        let text: std::borrow::Cow<'de, str> = map.next_value()?;
        if map.next_key::<std::borrow::Cow<'de, str>>()?.is_some() {
            return Err(self.fail(self.want(), "an object with more than `b64`"));
        }
        if !self.leaf()? {
            return Ok(());
        }
        self.charge(text.len() / 4 * 3 + 3)?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(|e| {
                A::Error::custom(format!("element {}: invalid base64: {e}", self.given()))
            })?;
        self.bytes(&decoded)
    }
}

#[cfg(test)]
mod data_tests {
    use super::*;

    #[test]
    fn streaming_decode_matches_the_tree_decoder() {
        for (dtype, raw) in [
            (DataType::F32, "[[1, 2.5], [-3e2, 4]]"),
            (
                DataType::I64,
                "[1, -9223372036854775808, 9223372036854775807, 0]",
            ),
            (DataType::U8, "[[0, 255], [1, 2]]"),
            (DataType::Bool, "[true, false, true, true]"),
            (DataType::Bytes, r#"["a", "", "é", "x"]"#),
            (DataType::F16, "[0.5, 1, 2, 3]"),
        ] {
            let v: Value = serde_json::from_str(raw).unwrap();
            let mut items = Vec::new();
            leaves(&v, &mut items);
            assert_eq!(
                decode_data(dtype, raw, 4, &Budget::for_request(1)).unwrap(),
                decode_leaves(dtype, &items, false).unwrap(),
                "{dtype}"
            );
        }
    }

    fn data(dtype: DataType, raw: &str, n: usize) -> Result<TensorData, JsonDataError> {
        decode_data(dtype, raw, n, &Budget::for_request(raw.len()))
    }

    #[test]
    fn ragged_lists_are_refused() {
        let e = data(DataType::F32, "[[1, 2, 3], [4]]", 4)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("ragged nested list"), "{e}");
        let e = data(DataType::F32, "[[1, 2], 3]", 3)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("ragged nested list"), "{e}");
        let e = data(DataType::F32, "[1, [2, 3]]", 3)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("ragged nested list"), "{e}");
        let e = data(DataType::F32, "[[], [1]]", 1).unwrap_err().to_string();
        assert!(e.starts_with("ragged nested list"), "{e}");
        let e = data(DataType::I32, "[[[], []], [1, 2]]", 2)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("ragged nested list"), "{e}");
        let b = Budget::for_request(100);
        let e = decode_value(DataType::I32, "[[[]], [1]]", false, &b)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("ragged nested list"), "{e}");
        assert_eq!(
            data(DataType::F32, "[[1, 2], [3, 4]]", 4).unwrap(),
            TensorData::F32(vec![1.0, 2.0, 3.0, 4.0])
        );
        let b = Budget::for_request(100);
        assert_eq!(
            decode_value(
                DataType::I32,
                "[[[1], [2]], [[3], [4]], [[5], [6]]]",
                false,
                &b
            )
            .unwrap()
            .1,
            vec![3, 2, 1]
        );
        assert_eq!(
            decode_value(DataType::I32, "7", false, &b).unwrap().1,
            Vec::<usize>::new()
        );
        assert_eq!(
            decode_value(DataType::I32, "[[], []]", false, &b)
                .unwrap()
                .1,
            vec![2, 0]
        );
    }

    #[test]
    fn nonfinite_numbers_round_trip_as_tokens() {
        let body = br#"{"a": [NaN, Infinity, -Infinity, 1], "b": "NaN Infinity"}"#;
        // A key is not a value: `{NaN: 1}` is left for the parser to refuse.
        assert_eq!(nonfinite_as_strings(b"{NaN: [NaN]}"), b"{NaN: [\"NaN\"]}");
        let text = String::from_utf8(nonfinite_as_strings(body)).unwrap();
        assert_eq!(
            text,
            r#"{"a": ["NaN", "Infinity", "-Infinity", 1], "b": "NaN Infinity"}"#
        );
        let v = data(DataType::F32, r#"["NaN", "Infinity", "-Infinity", 1]"#, 4).unwrap();
        let TensorData::F32(v) = v else { panic!() };
        assert!(v[0].is_nan() && v[1] == f32::INFINITY && v[2] == f32::NEG_INFINITY && v[3] == 1.0);
        // A string that is not one of the three spellings is still refused for a number.
        assert!(data(DataType::F32, r#"["nan"]"#, 1).is_err());
        assert!(data(DataType::I32, r#"["NaN"]"#, 1).is_err());
        for (data, text) in [
            (
                TensorData::F32(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.5]),
                "[NaN,Infinity,-Infinity,0.5]",
            ),
            (
                TensorData::F64(vec![f64::NAN, -f64::INFINITY]),
                "[NaN,-Infinity]",
            ),
            (TensorData::F16(vec![f16::INFINITY]), "[Infinity]"),
        ] {
            assert_eq!(
                serde_json::to_string(&FlatJson(&data, NonFinite::Tokens)).unwrap(),
                text
            );
        }
        let nulls = TensorData::F32(vec![f32::NAN, 1.0]);
        assert_eq!(
            serde_json::to_string(&FlatJson(&nulls, NonFinite::Null)).unwrap(),
            "[null,1.0]"
        );
    }

    #[test]
    fn nonfinite_outputs_are_bare_tokens() {
        let data = TensorData::F32(vec![f32::NAN, 2.0]);
        let s = serde_json::to_string(&NestedJson {
            data: &data,
            shape: &[1, 2],
            start: 0,
            b64: false,
        })
        .unwrap();
        assert_eq!(s, "[[NaN,2.0]]");
    }

    #[test]
    fn numbers_out_of_range_are_refused_not_rounded_to_infinity() {
        let e = data(DataType::F32, "[1, 3.5e38]", 2)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "element 1: 3.5e38 is out of range for FP32 (largest 3.4028235e38)"
        );
        let e = data(DataType::F16, "[70000]", 1).unwrap_err().to_string();
        assert!(e.contains("out of range for FP16"), "{e}");
        assert!(data(DataType::F32, "[3.4028235e38]", 1).is_ok());
        assert!(data(DataType::F64, "[3.5e38]", 1).is_ok());
        let e = data(DataType::F64, "[1, 2, 1e400]", 3)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("element 2: number out of range"), "{e}");
    }

    #[test]
    fn decoding_stays_within_the_budget() {
        // 20,000 empty strings in 60 KB would take 480 KB of vectors: within 1 MiB + 4 x 60 KB.
        let raw = format!("[{}]", vec!["\"\""; 20_000].join(","));
        assert!(decode_data(
            DataType::Bytes,
            &raw,
            20_000,
            &Budget::for_request(raw.len())
        )
        .is_ok());
        // 200,000 of them (600 KB) would take 4.8 MB, more than 1 MiB + 2.4 MB.
        let raw = format!("[{}]", vec!["\"\""; 200_000].join(","));
        let e = decode_data(
            DataType::Bytes,
            &raw,
            200_000,
            &Budget::for_request(raw.len()),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("more than") && e.contains("bytes of memory"),
            "{e}"
        );
        // Numbers never exceed it: FP64 takes at most 4 x the JSON it came from.
        let raw = format!("[{}]", vec!["0"; 300_000].join(","));
        assert!(decode_data(
            DataType::F64,
            &raw,
            300_000,
            &Budget::for_request(raw.len())
        )
        .is_ok());
    }

    #[test]
    fn the_budget_follows_the_capacity_a_decoder_holds() {
        let b = Budget::for_request(0);
        let total = b.total();
        // No first allocation, then 300,000 values: every growth is charged before it is reserved.
        let mut d = Decoder::new(DataType::F64, false, None, 0, &b);
        let raw = format!("[{}]", vec!["0"; 100_000].join(","));
        for _ in 0..3 {
            if d.decode_str(&raw).is_err() {
                break;
            }
        }
        let capacity = ferry_model::with_tensor_data!(&d.data, v => v.capacity());
        assert!(
            capacity * 8 <= total - b.left(),
            "{capacity} elements held, {} bytes charged",
            total - b.left()
        );
    }

    #[test]
    fn b64_objects_are_byte_strings_only_where_allowed() {
        let b = Budget::for_request(100);
        let (v, shape) =
            decode_value(DataType::Bytes, r#"[{"b64": "aGk="}, "x"]"#, true, &b).unwrap();
        assert_eq!(
            v,
            TensorData::Bytes(vec![b"hi".to_vec(), b"x".to_vec()].into())
        );
        assert_eq!(shape, vec![2]);
        assert!(decode_value(DataType::Bytes, r#"[{"b64": "aGk="}]"#, false, &b).is_err());
        assert!(decode_value(DataType::Bytes, r#"[{"b64": "aGk=", "x": 1}]"#, true, &b).is_err());
        assert!(decode_value(DataType::Bytes, r#"[{"b64": "!!"}]"#, true, &b).is_err());
    }

    #[test]
    fn streaming_errors_name_the_element() {
        let e = decode_data(DataType::F32, r#"[1, "two"]"#, 2, &Budget::for_request(1))
            .unwrap_err()
            .to_string();
        assert_eq!(e, r#"element 1: expected a number, got a string ("two")"#);
        let e = decode_data(DataType::U8, "[1, 300]", 2, &Budget::for_request(1))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "element 1: expected an integer in 0..=255, got a number (300)"
        );
        let e = decode_data(DataType::I32, "[1.5]", 1, &Budget::for_request(1))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "element 0: expected an INT32 integer, got a number (1.5)"
        );
        let e = decode_data(DataType::F32, "[1, 2, 3]", 2, &Budget::for_request(1))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "the shape needs 2 elements but `data` has 3");
        let e = decode_data(DataType::F32, "[[1], [2]]", 3, &Budget::for_request(1))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "the shape needs 3 elements but `data` has 2");
        assert!(
            decode_data(DataType::F32, "[null]", 1, &Budget::for_request(1))
                .unwrap_err()
                .to_string()
                .contains("got null")
        );
        assert!(
            decode_data(DataType::Bool, "[1]", 1, &Budget::for_request(1))
                .unwrap_err()
                .to_string()
                .contains("expected true or false")
        );
    }
}
