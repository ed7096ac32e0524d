//! Protocol adapters: each decodes its wire format into the internal request, calls [`crate::infer::Infer`],
//! and encodes the answer. No business logic lives here.

pub mod grpc;
pub mod json;
pub mod kserve_grpc;
pub mod kserve_rest;
pub mod openai;
pub mod tei;
pub mod tfserving_grpc;
pub mod tfserving_rest;

use axum::extract::rejection::BytesRejection;

use std::time::{Duration, Instant};

use axum::http::HeaderMap;

use crate::error::{ErrorKind, InferError};

/// Ends a REST call: counts the response body (when its length is known: bodies built in memory), records the
/// outcome, and turns the result into a response with the timing headers of a prediction.
pub(crate) fn finish(
    call: crate::infer::Call<'_>,
    result: Result<axum::response::Response, InferError>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    finish_rendered(call, result.map_err(|e| (e.kind, e.into_response())))
}

/// [`finish`] for a protocol with its own error bodies: the error comes already rendered, with its kind for the
/// metrics.
pub(crate) fn finish_rendered(
    call: crate::infer::Call<'_>,
    result: Result<axum::response::Response, (ErrorKind, axum::response::Response)>,
) -> axum::response::Response {
    use axum::body::HttpBody as _;
    match result {
        Ok(mut response) => {
            if let Some(n) = response.body().size_hint().exact() {
                call.response_bytes(usize::try_from(n).unwrap_or(usize::MAX));
            }
            if let Some(timing) = call.finish(Ok(())) {
                for (name, value) in timing.headers() {
                    if let Ok(v) = axum::http::HeaderValue::from_str(&value) {
                        response.headers_mut().insert(name, v);
                    }
                }
            }
            response
        }
        Err((kind, response)) => {
            call.finish(Err(kind));
            response
        }
    }
}

/// The header a REST client sets to give its own deadline, in milliseconds.
pub const TIMEOUT_HEADER: &str = "x-request-timeout-ms";

/// The header that pins a client to one side of a canary split (any stable value: a user or session id).
pub const ROUTE_HEADER: &str = "x-route-key";

/// The key a canary split routes a request by: `x-route-key`, else the client's `x-request-id`.
pub(crate) fn route_key(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(ROUTE_HEADER)
        .or_else(|| headers.get("x-request-id"))
        .and_then(|v| v.to_str().ok())
}

/// The same key from gRPC metadata.
pub(crate) fn grpc_route_key(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    metadata
        .get(ROUTE_HEADER)
        .or_else(|| metadata.get("x-request-id"))
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The client's deadline from the `x-request-timeout-ms` header, if it sent one.
pub(crate) fn client_deadline(headers: &HeaderMap) -> Result<Option<Instant>, InferError> {
    let Some(value) = headers.get(TIMEOUT_HEADER) else {
        return Ok(None);
    };
    let ms: u64 = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| {
            InferError::invalid(format!(
                "{TIMEOUT_HEADER} must be a whole number of milliseconds"
            ))
        })?;
    Ok(Some(Instant::now() + Duration::from_millis(ms)))
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
    budget: &crate::infer::Budget,
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
                .saturating_mul(crate::infer::element_cost(dtype))
                .saturating_add(raw.len())
        }
    };
    budget
        .take(bytes)
        .map_err(|e| InferError::invalid(format!("input `{name}`: {e}")))
}

/// Turns a body that could not be read (too large, broken connection) into our error format.
pub(crate) fn body_error(rejection: BytesRejection) -> InferError {
    if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        InferError::new(
            ErrorKind::PayloadTooLarge,
            "request body is larger than --max-request-bytes allows",
        )
    } else {
        InferError::invalid(format!(
            "cannot read the request body: {}",
            rejection.body_text()
        ))
    }
}
