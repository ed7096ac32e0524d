//! Protocol adapters: each decodes its wire format into the internal request, calls [`crate::core::infer::Infer`],
//! and encodes the answer. No business logic lives here.

pub mod explain;
pub mod generate;
pub mod grpc;
pub mod kserve_grpc;
pub mod kserve_rest;
pub mod openai;
pub mod openai_llm;
pub mod tei;
pub mod tfserving_grpc;
pub mod tfserving_rest;

/// Tensor data in JSON, at its path from before it moved to [`crate::codec`].
pub use crate::codec::json;

use axum::extract::rejection::BytesRejection;

use std::time::{Duration, Instant};

use axum::http::HeaderMap;

use crate::error::{ErrorKind, InferError};

/// What every handler gets.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The shared inference path.
    pub infer: crate::core::infer::Infer,
}

/// A body that failed to arrive, left by the transport's admission layer for the handler to answer (and count) as it
/// would any other.
#[derive(Debug, Clone)]
pub(crate) struct BodyError(pub(crate) InferError);

/// A request body as the transport's admission layer read it: the bytes, or why they could not be read (413, 400).
/// Read directly when the layer is not there.
#[derive(Debug)]
pub struct AdmittedBody(pub Result<axum::body::Bytes, InferError>);

impl<S: Send + Sync> axum::extract::FromRequest<S> for AdmittedBody {
    type Rejection = std::convert::Infallible;

    async fn from_request(
        mut request: axum::http::Request<axum::body::Body>,
        state: &S,
    ) -> Result<AdmittedBody, Self::Rejection> {
        if let Some(BodyError(e)) = request.extensions_mut().remove::<BodyError>() {
            return Ok(AdmittedBody(Err(e)));
        }
        let read = axum::body::Bytes::from_request(request, state).await;
        Ok(AdmittedBody(read.map_err(body_error)))
    }
}

/// Ends a REST call: counts the response body (when its length is known: bodies built in memory), records the
/// outcome, and turns the result into a response with the timing headers of a prediction.
pub(crate) fn finish(
    call: crate::core::infer::Call<'_>,
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

/// What a server-sent event stream of a language model does next.
pub(crate) enum Next {
    /// The engine's next event (`None`: the engine stopped).
    Event(Option<ferry_llm::Event>),
    /// Nothing came for [`HEARTBEAT`]: send the SSE comment [`HEARTBEAT_COMMENT`]. Writing it is how a closed
    /// connection is noticed while a sequence waits or reads its prompt (hyper learns of a closed socket only when
    /// it writes), so the sequence is freed instead of running for nobody.
    Heartbeat,
}

/// How long a stream waits for a token before it writes [`HEARTBEAT_COMMENT`].
pub(crate) const HEARTBEAT: std::time::Duration = std::time::Duration::from_millis(200);

/// An SSE comment line, which clients ignore.
pub(crate) const HEARTBEAT_COMMENT: &[u8] = b": waiting\n\n";

/// The next event of a generation, or a heartbeat when none came in time.
pub(crate) async fn next_event(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<ferry_llm::Event>,
) -> Next {
    match tokio::time::timeout(HEARTBEAT, events.recv()).await {
        Ok(event) => Next::Event(event),
        Err(_) => Next::Heartbeat,
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
