//! Tensor data in JSON, shared by the KServe v2 and TF Serving adapters: nested arrays to flat elements
//! and back.

use base64::Engine as _;
use ferry_model::{DataType, TensorData};
use half::f16;
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use serde_json::Value;

/// The shape of nested JSON arrays, checking that every level is rectangular. A non-array is a scalar (`[]`).
pub fn nested_shape(value: &Value) -> Result<Vec<usize>, String> {
    match value {
        Value::Array(items) => {
            let mut shape = vec![items.len()];
            if let Some(first) = items.first() {
                let inner = nested_shape(first)?;
                for (i, item) in items.iter().enumerate().skip(1) {
                    let other = nested_shape(item)?;
                    if other != inner {
                        return Err(format!(
                            "ragged nested list: element {i} has shape {other:?} but element 0 has {inner:?}"
                        ));
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
pub fn decode_leaves(dtype: DataType, values: &[&Value], b64: bool) -> Result<TensorData, String> {
    fn each<T>(
        values: &[&Value],
        f: impl Fn(&Value) -> Option<T>,
        want: &str,
    ) -> Result<Vec<T>, String> {
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
                    format!("element {i}: expected {want}, got {} ({shown})", kind(v))
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
    let float = |v: &Value| v.as_f64();
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
        DataType::F16 => {
            TensorData::F16(each(values, |v| float(v).map(f16::from_f64), "a number")?)
        }
        DataType::F32 => TensorData::F32(each(values, |v| float(v).map(|x| x as f32), "a number")?),
        DataType::F64 => TensorData::F64(each(values, float, "a number")?),
        DataType::Bytes => TensorData::Bytes(each(
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
        )?),
    })
}

/// One element of a tensor as JSON. Byte strings are text (invalid UTF-8 replaced) or, with `b64`,
/// `{"b64": "..."}`.
struct Element<'a>(&'a TensorData, usize, bool);

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
            TensorData::F16(v) => s.serialize_f32(v[i].to_f32()),
            TensorData::F32(v) => s.serialize_f32(v[i]),
            TensorData::F64(v) => s.serialize_f64(v[i]),
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

/// A tensor's elements as one flat JSON list.
pub struct FlatJson<'a>(pub &'a TensorData);

impl Serialize for FlatJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for i in 0..self.0.len() {
            seq.serialize_element(&Element(self.0, i, false))?;
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
            None => Element(self.data, self.start, self.b64).serialize(s),
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
        let e = decode_leaves(DataType::U8, &l, false).unwrap_err();
        assert!(
            e.starts_with("element 3: expected an integer in 0..=255"),
            "{e}"
        );
        let e = decode_leaves(DataType::I64, &[&json!(1.5)], false).unwrap_err();
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
            TensorData::Bytes(vec![b"hi".to_vec(), b"x".to_vec()])
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
        let bytes = TensorData::Bytes(vec![b"hi".to_vec()]);
        let s = serde_json::to_string(&NestedJson {
            data: &bytes,
            shape: &[1],
            start: 0,
            b64: true,
        })
        .unwrap();
        assert_eq!(s, r#"[{"b64":"aGk="}]"#);
        assert_eq!(
            serde_json::to_string(&FlatJson(&data)).unwrap(),
            "[1.0,2.5,3.0,4.0,5.0,6.0]"
        );
    }
}

/// Decodes a KServe `data` field (flat or nested lists) straight into elements of `dtype`, without building a JSON
/// tree: the hot path for large JSON tensors. Elements beyond `expected` are counted, not stored.
pub fn decode_data(dtype: DataType, raw: &str, expected: usize) -> Result<TensorData, String> {
    // Size the buffer from the data actually sent (each element takes at least two bytes of JSON), not from the
    // client's shape alone.
    let mut sink = Sink {
        data: TensorData::with_capacity(dtype, expected.min(raw.len() / 2 + 1)),
        expected,
        extra: 0,
    };
    let mut de = serde_json::Deserializer::from_str(raw);
    serde::de::DeserializeSeed::deserialize(&mut sink, &mut de).map_err(|e| {
        // serde_json appends the position inside `data`, which means nothing to the client.
        let text = e.to_string();
        match text.rfind(" at line ") {
            Some(i) => text[..i].to_string(),
            None => text,
        }
    })?;
    let given = sink.data.len() + sink.extra;
    if given != expected {
        return Err(format!(
            "the shape needs {expected} elements but `data` has {given}"
        ));
    }
    Ok(sink.data)
}

/// Collects scalars into a typed vector while a deserializer walks nested arrays.
struct Sink {
    data: TensorData,
    expected: usize,
    extra: usize,
}

impl Sink {
    fn fail<E: serde::de::Error>(&self, want: &str, got: &str) -> E {
        E::custom(format!(
            "element {}: expected {want}, got {got}",
            self.data.len()
        ))
    }

    /// Whether the next element should be stored; past `expected` it is only counted.
    fn room(&mut self) -> bool {
        if self.data.len() >= self.expected {
            self.extra += 1;
            return false;
        }
        true
    }

    fn int<E: serde::de::Error>(
        &mut self,
        v: i128,
        shown: &dyn std::fmt::Display,
    ) -> Result<(), E> {
        if !self.room() {
            return Ok(());
        }
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
        let i = self.data.len();
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
        if !self.room() {
            return Ok(());
        }
        self.put_float(v, shown)
    }

    fn put_float<E: serde::de::Error>(
        &mut self,
        v: f64,
        shown: &dyn std::fmt::Display,
    ) -> Result<(), E> {
        match &mut self.data {
            TensorData::F16(o) => o.push(f16::from_f64(v)),
            TensorData::F32(o) => o.push(v as f32),
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
            DataType::Bytes => "a string",
            t if t.is_float() => "a number",
            _ => "an integer",
        }
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for &mut Sink {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for &mut Sink {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a list of tensor elements")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(&mut *self)?.is_some() {}
        Ok(())
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
        if !self.room() {
            return Ok(());
        }
        match &mut self.data {
            TensorData::Bool(o) => {
                o.push(v);
                Ok(())
            }
            _ => Err(self.fail(self.want(), "a boolean")),
        }
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.int(i128::from(v), &v)
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.int(i128::from(v), &v)
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        self.float(v, &v)
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        if !self.room() {
            return Ok(());
        }
        match &mut self.data {
            TensorData::Bytes(o) => {
                o.push(v.as_bytes().to_vec());
                Ok(())
            }
            _ => {
                let shown = if v.len() > 40 {
                    format!("{}...", &v[..v.floor_char_boundary(40)])
                } else {
                    v.to_string()
                };
                Err(self.fail(self.want(), &format!("a string ({shown:?})")))
            }
        }
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        Err(self.fail(self.want(), "null"))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(self.fail(self.want(), "an object"))
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
                decode_data(dtype, raw, 4).unwrap(),
                decode_leaves(dtype, &items, false).unwrap(),
                "{dtype}"
            );
        }
    }

    #[test]
    fn streaming_errors_name_the_element() {
        let e = decode_data(DataType::F32, r#"[1, "two"]"#, 2).unwrap_err();
        assert_eq!(e, r#"element 1: expected a number, got a string ("two")"#);
        let e = decode_data(DataType::U8, "[1, 300]", 2).unwrap_err();
        assert_eq!(
            e,
            "element 1: expected an integer in 0..=255, got a number (300)"
        );
        let e = decode_data(DataType::I32, "[1.5]", 1).unwrap_err();
        assert_eq!(
            e,
            "element 0: expected an INT32 integer, got a number (1.5)"
        );
        let e = decode_data(DataType::F32, "[1, 2, 3]", 2).unwrap_err();
        assert_eq!(e, "the shape needs 2 elements but `data` has 3");
        let e = decode_data(DataType::F32, "[[1], [2]]", 3).unwrap_err();
        assert_eq!(e, "the shape needs 3 elements but `data` has 2");
        assert!(decode_data(DataType::F32, "[null]", 1)
            .unwrap_err()
            .contains("got null"));
        assert!(decode_data(DataType::Bool, "[1]", 1)
            .unwrap_err()
            .contains("expected true or false"));
    }
}
