//! Protocol adapters: each decodes its wire format into the internal request, calls [`crate::infer::Infer`],
//! and encodes the answer. No business logic lives here.

pub mod json;
pub mod kserve_rest;
pub mod tfserving_rest;

use axum::extract::rejection::BytesRejection;

use crate::error::{ErrorKind, InferError};

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
