//! The one error table: every failure on the request path is an [`InferError`], and its [`ErrorKind`] decides the
//! HTTP status (and, later, the gRPC code and metric label) in one place.

use axum::http::StatusCode;

/// The class of a failure, which decides how every protocol reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or does not fit the model: 400.
    InvalidArgument,
    /// No such model or version: 404.
    NotFound,
    /// The body exceeds `--max-request-bytes`: 413.
    PayloadTooLarge,
    /// The model (or server) exists but is not ready: 503.
    Unavailable,
    /// The model's queue is full: 429, answered at once.
    Overloaded,
    /// The request took longer than `--request-timeout`: 504.
    DeadlineExceeded,
    /// The request asks for something Ferry does not do (a content encoding, a method on a model kind): 501.
    Unimplemented,
    /// The engine failed on a request that passed validation: 500.
    Internal,
    /// No valid token: 401 (gRPC UNAUTHENTICATED).
    Unauthenticated,
    /// A valid token without the scope the call needs: 403 (gRPC PERMISSION_DENIED).
    PermissionDenied,
    /// A path the server has, with a method it does not take: 405, with the `Allow` header axum's router adds (gRPC
    /// UNIMPLEMENTED, its code for a method a service does not have).
    MethodNotAllowed,
}

impl ErrorKind {
    /// Every kind, in declaration order (`ALL[k as usize] == k`): the metrics count outcomes by this order.
    pub const ALL: [ErrorKind; 11] = [
        ErrorKind::InvalidArgument,
        ErrorKind::NotFound,
        ErrorKind::PayloadTooLarge,
        ErrorKind::Unavailable,
        ErrorKind::Overloaded,
        ErrorKind::DeadlineExceeded,
        ErrorKind::Unimplemented,
        ErrorKind::Internal,
        ErrorKind::Unauthenticated,
        ErrorKind::PermissionDenied,
        ErrorKind::MethodNotAllowed,
    ];

    /// The HTTP status for this kind.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::InvalidArgument => StatusCode::BAD_REQUEST,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
            ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// The gRPC status code for this kind.
    pub fn grpc_code(self) -> tonic::Code {
        match self {
            ErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
            ErrorKind::NotFound => tonic::Code::NotFound,
            ErrorKind::PayloadTooLarge | ErrorKind::Overloaded => tonic::Code::ResourceExhausted,
            ErrorKind::Unavailable => tonic::Code::Unavailable,
            ErrorKind::DeadlineExceeded => tonic::Code::DeadlineExceeded,
            ErrorKind::Unimplemented | ErrorKind::MethodNotAllowed => tonic::Code::Unimplemented,
            ErrorKind::Internal => tonic::Code::Internal,
            ErrorKind::Unauthenticated => tonic::Code::Unauthenticated,
            ErrorKind::PermissionDenied => tonic::Code::PermissionDenied,
        }
    }

    /// A stable snake_case label, for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::NotFound => "not_found",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::Unimplemented => "unimplemented",
            ErrorKind::Internal => "internal",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
        }
    }
}

/// A failed request: its kind and a message for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InferError {
    /// The class of failure.
    pub kind: ErrorKind,
    /// What went wrong, in words the client can act on (no internal details).
    pub message: String,
    /// For an overloaded or unavailable server, when to retry (seconds, `Retry-After`); 1 when not known.
    pub retry_after: Option<u32>,
}

/// A name that could not name a model is a 400.
impl From<ferry_repo::NameError> for InferError {
    fn from(e: ferry_repo::NameError) -> InferError {
        InferError::invalid(e.to_string())
    }
}

impl InferError {
    /// An error of the given kind.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> InferError {
        InferError {
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    /// A 400: the request is malformed or does not fit the model.
    pub fn invalid(message: impl Into<String>) -> InferError {
        InferError::new(ErrorKind::InvalidArgument, message)
    }

    /// A 404: no such model or version.
    pub fn not_found(message: impl Into<String>) -> InferError {
        InferError::new(ErrorKind::NotFound, message)
    }

    /// A 503: not ready.
    pub fn unavailable(message: impl Into<String>) -> InferError {
        InferError::new(ErrorKind::Unavailable, message)
    }

    /// The same error, telling the client to retry in `seconds` (`Retry-After`, at least 1).
    pub fn with_retry_after(mut self, seconds: u32) -> InferError {
        self.retry_after = Some(seconds.max(1));
        self
    }

    /// The `Retry-After` value for this error (seconds; 1 when not known).
    pub fn retry_after_header(&self) -> axum::http::HeaderValue {
        axum::http::HeaderValue::from(self.retry_after.unwrap_or(1))
    }

    /// The same error with `prefix` before its message (which input it was about).
    pub fn with_prefix(mut self, prefix: &str) -> InferError {
        self.message.insert_str(0, prefix);
        self
    }
}

impl From<ferry_engine::EngineError> for InferError {
    fn from(e: ferry_engine::EngineError) -> InferError {
        match e {
            ferry_engine::EngineError::InvalidInput(m) => InferError::invalid(m),
            ferry_engine::EngineError::Busy {
                reason,
                retry_after_secs,
            } => InferError::new(ErrorKind::Overloaded, reason).with_retry_after(retry_after_secs),
            ferry_engine::EngineError::Stopping(m) => InferError::new(ErrorKind::Unavailable, m),
            other => InferError::new(ErrorKind::Internal, other.to_string()),
        }
    }
}

/// The longest gRPC status message, in bytes: it travels percent-encoded in the `grpc-message` header, and
/// clients refuse headers past their metadata limit (8 KB in gRPC's C core), losing the status with it. A message
/// that echoes a long client-supplied name is cut here, on a character boundary, ending in `…`.
pub const MAX_GRPC_MESSAGE_BYTES: usize = 1024;

/// `message` cut to at most `max` bytes on a character boundary, ending in `…` when it was cut.
pub fn bounded_message(mut message: String, max: usize) -> String {
    const ELLIPSIS: &str = "…";
    if message.len() > max {
        let mut end = max.saturating_sub(ELLIPSIS.len());
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str(ELLIPSIS);
    }
    message
}

impl From<InferError> for tonic::Status {
    fn from(e: InferError) -> tonic::Status {
        tonic::Status::new(
            e.kind.grpc_code(),
            bounded_message(e.message, MAX_GRPC_MESSAGE_BYTES),
        )
    }
}

impl axum::response::IntoResponse for InferError {
    fn into_response(self) -> axum::response::Response {
        let status = self.kind.status();
        let body = serde_json::json!({ "error": self.message }).to_string();
        let mut response = (
            status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
        if matches!(self.kind, ErrorKind::Unavailable | ErrorKind::Overloaded) {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, self.retry_after_header());
        }
        if self.kind == ErrorKind::Unauthenticated {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_kinds_are_listed_in_declaration_order() {
        for (i, kind) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(*kind as usize, i, "{}", kind.label());
        }
    }

    #[test]
    fn grpc_messages_are_bounded_on_a_char_boundary() {
        let short = InferError::not_found("model `iris` is not in the repository");
        assert_eq!(tonic::Status::from(short.clone()).message(), short.message);
        let name = "é".repeat(4096);
        let long = InferError::not_found(format!("model `{name}` is not in the repository"));
        let status = tonic::Status::from(long);
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert!(status.message().len() <= MAX_GRPC_MESSAGE_BYTES);
        assert!(status.message().starts_with("model `éé"));
        assert!(status.message().ends_with('…'));
        assert_eq!(bounded_message("abcdef".into(), 5), "ab…");
    }
}
