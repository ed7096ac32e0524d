//! The KServe v2 request body, shared by the REST adapter, the gRPC adapter (an input's datatype and shape, binary
//! data's budget) and the core's warm-up (recorded requests are KServe v2 JSON bodies).
//!
//! A REST body is the JSON header (its length in `Inference-Header-Content-Length`) followed by the raw data of every
//! input that carries `parameters.binary_data_size`, in the order of the `inputs` list.

use axum::body::Bytes;
use axum::http::HeaderMap;
use ferry_model::{NamedTensor, Tensor, TensorData};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::json::{decode_data, json_text};
use super::limits::{Budget, Limits};
use crate::error::InferError;

/// The header that gives the length of the JSON part of a binary request or response.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

#[derive(Debug, Deserialize)]
pub(crate) struct InferRequestBody {
    #[serde(default)]
    pub(crate) id: Option<String>,
    #[serde(default)]
    pub(crate) parameters: Option<Map<String, Value>>,
    inputs: Vec<InputBody>,
    #[serde(default)]
    pub(crate) outputs: Option<Vec<OutputRequest>>,
}

#[derive(Debug, Deserialize)]
struct InputBody {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(default)]
    data: Option<Box<serde_json::value::RawValue>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct OutputRequest {
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) parameters: Option<Map<String, Value>>,
}

/// Decodes a KServe v2 REST inference body as `infer` does: splits it at `Inference-Header-Content-Length`, checks
/// the JSON header's nesting, parses it, and decodes every input (JSON `data`, or binary data after the header, in
/// order). The entry point of the fuzz targets and property tests.
pub fn decode_request_body(
    headers: &HeaderMap,
    body: &Bytes,
    limits: &Limits,
) -> Result<Vec<NamedTensor>, InferError> {
    decode_request(headers, body, limits).map(|(_, inputs)| inputs)
}

pub(crate) fn decode_request(
    headers: &HeaderMap,
    body: &Bytes,
    limits: &Limits,
) -> Result<(InferRequestBody, Vec<NamedTensor>), InferError> {
    let budget = Budget::for_request(body.len());
    let (json, mut binary) = split_body(headers, body)?;
    let (json, _) = json_text(json, limits, &budget)?;
    let mut request: InferRequestBody = serde_json::from_slice(&json)
        .map_err(|e| InferError::invalid(format!("malformed inference request: {e}")))?;
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in &mut request.inputs {
        inputs.push(decode_input(input, &mut binary, limits, &budget)?);
        // The data's JSON text is a copy of its part of the body: free it as soon as it is decoded.
        input.data = None;
    }
    if !binary.is_empty() {
        return Err(InferError::invalid(format!(
            "{} bytes of binary data follow the inference header but no input claims them (set parameters.binary_data_size)",
            binary.len()
        )));
    }
    Ok((request, inputs))
}

/// Splits a body into its JSON header and the binary data after it.
fn split_body<'a>(
    headers: &HeaderMap,
    body: &'a Bytes,
) -> Result<(&'a [u8], &'a [u8]), InferError> {
    match headers.get(HEADER_LENGTH) {
        None => Ok((body, &[])),
        Some(value) => {
            let n: usize = value
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| {
                    InferError::invalid(
                        "Inference-Header-Content-Length must be a non-negative integer",
                    )
                })?;
            if n == 0 {
                return Err(InferError::invalid(
                    "Inference-Header-Content-Length 0 (a raw binary request without a JSON header) is not supported",
                ));
            }
            if n > body.len() {
                return Err(InferError::invalid(format!(
                    "Inference-Header-Content-Length is {n} but the body has only {} bytes",
                    body.len()
                )));
            }
            Ok(body.split_at(n))
        }
    }
}

/// Decodes the inputs of a KServe v2 JSON inference request (a recorded warm-up request: JSON data only).
pub fn decode_json_inputs(body: &[u8]) -> Result<Vec<NamedTensor>, InferError> {
    let headers = HeaderMap::new();
    decode_request_body(&headers, &Bytes::copy_from_slice(body), &Limits::default())
}

fn decode_input(
    input: &InputBody,
    binary: &mut &[u8],
    limits: &Limits,
    budget: &Budget,
) -> Result<NamedTensor, InferError> {
    let name = &input.name;
    let (dtype, shape, expected) = kserve_input_header(name, &input.datatype, &input.shape)?;
    limits.check_shape(name, &shape)?;
    let binary_size = match input
        .parameters
        .as_ref()
        .and_then(|p| p.get("binary_data_size"))
    {
        None => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            InferError::invalid(format!(
                "input `{name}`: binary_data_size must be a non-negative integer, got {v}"
            ))
        })? as usize),
    };
    let data = match (binary_size, &input.data) {
        (Some(_), Some(_)) => {
            return Err(InferError::invalid(format!(
                "input `{name}`: give either `data` or parameters.binary_data_size, not both"
            )))
        }
        (None, None) => {
            return Err(InferError::invalid(format!(
                "input `{name}`: no `data` and no binary_data_size"
            )))
        }
        (Some(size), None) => {
            if size > binary.len() {
                return Err(InferError::invalid(format!(
                    "input `{name}`: binary_data_size is {size} but only {} bytes of binary data remain",
                    binary.len()
                )));
            }
            let (mine, rest) = binary.split_at(size);
            *binary = rest;
            charge_binary(name, dtype, mine, budget)?;
            TensorData::from_le_bytes_at_most(dtype, mine, expected).ok_or_else(|| {
                InferError::invalid(format!(
                    "input `{name}`: {size} bytes are not the {expected} {dtype} elements shape {shape:?} needs"
                ))
            })?
        }
        (None, Some(raw)) => decode_data(dtype, raw.get(), expected, budget)
            .map_err(|e| InferError::invalid(format!("input `{name}`: {e}")))?,
    };
    let tensor = Tensor::new(shape, data)
        .map_err(|e| InferError::invalid(format!("input `{name}`: {e}")))?;
    Ok(NamedTensor::new(name.clone(), tensor))
}

/// Reads a KServe v2 input's datatype and shape (REST and gRPC alike): the element type, the shape, and the number
/// of elements it needs.
pub(crate) fn kserve_input_header(
    name: &str,
    datatype: &str,
    shape: &[i64],
) -> Result<(ferry_model::DataType, Vec<usize>, usize), InferError> {
    let dtype = ferry_model::DataType::from_kserve_name(datatype).ok_or_else(|| {
        InferError::invalid(format!("input `{name}`: unknown datatype `{datatype}`"))
    })?;
    let dims = shape
        .iter()
        .map(|d| usize::try_from(*d))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(|_| {
            InferError::invalid(format!(
                "input `{name}`: shape {shape:?} has a negative dimension"
            ))
        })?;
    let count = ferry_model::element_count(&dims).ok_or_else(|| {
        InferError::invalid(format!("input `{name}`: shape {dims:?} is too large"))
    })?;
    Ok((dtype, dims, count))
}

/// Charges the memory binary tensor data will take once decoded: its own size, or for `BYTES` a vector per element
/// (counted from the length prefixes before anything is allocated) plus the content.
pub(crate) fn charge_binary(
    name: &str,
    dtype: ferry_model::DataType,
    raw: &[u8],
    budget: &Budget,
) -> Result<(), InferError> {
    let bytes = match dtype.element_size() {
        Some(_) => raw.len(),
        None => {
            let (mut count, mut rest) = (0usize, raw);
            while let Some(prefix) = rest.get(..4) {
                let len = u32::from_le_bytes(prefix.try_into().expect("4 bytes")) as usize;
                count += 1;
                rest = rest.get(4 + len..).unwrap_or_default();
            }
            count
                .saturating_mul(super::limits::element_cost(dtype))
                .saturating_add(raw.len())
        }
    };
    budget
        .take(bytes)
        .map_err(|e| InferError::invalid(format!("input `{name}`: {e}")))
}
