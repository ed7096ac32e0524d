//! What the REST listener does with each request: KServe v2 inference (`POST /v2/models/{m}/infer` and
//! `POST /v2/models/{m}/versions/{v}/infer`), the hot path, goes straight to its handler; every other request goes
//! through the axum [`Router`].
//!
//! The direct path applies exactly what the router's layers apply, in the same order: the token check, the request
//! id, the shared concurrency limit (one semaphore for both paths), the body size limit and the body-stall timeout.
//! It skips the router's per-request boxing and cloning, about a fifth of a small model's server time per request
//! (`bench/serving/run.py`). Any path it is not sure of (percent-escapes, empty segments) goes to the router, which
//! gives the same answer more slowly.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, Method, Request};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use hyper::body::Incoming;
use tower::ServiceExt;

use crate::error::{ErrorKind, InferError};
use crate::infer::Infer;

/// What the REST listener serves: the router, and optionally the direct inference path in front of it.
#[derive(Clone)]
pub struct Front {
    router: Router,
    direct: Option<Arc<DirectInfer>>,
}

impl std::fmt::Debug for Front {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Front")
            .field("direct", &self.direct.is_some())
            .finish()
    }
}

impl From<Router> for Front {
    fn from(router: Router) -> Front {
        Front {
            router,
            direct: None,
        }
    }
}

/// The direct inference path's settings: the same ones the router's layers get.
#[derive(Debug)]
pub struct DirectInfer {
    /// The inference path.
    pub infer: Infer,
    /// Token checks, when tokens are configured.
    pub auth: Option<Arc<crate::auth::Auth>>,
    /// The REST concurrency limit, shared with the router's `GlobalConcurrencyLimitLayer`.
    pub permits: Arc<tokio::sync::Semaphore>,
    /// `--max-request-bytes`.
    pub max_request_bytes: usize,
    /// How long a request body may pause between chunks (`--client-timeout`).
    pub client_timeout: Duration,
}

impl Front {
    /// `router` for everything, with inference requests taken directly.
    pub fn with_direct_infer(router: Router, direct: DirectInfer) -> Front {
        Front {
            router,
            direct: Some(Arc::new(direct)),
        }
    }

    /// Answers one request.
    ///
    /// The work is boxed, so this future stays a few words long: hyper keeps room for it in every open connection,
    /// busy or idle, while the boxed work exists only during a request.
    pub async fn call(self, request: Request<Incoming>) -> Response {
        if let Some(direct) = &self.direct {
            if request.method() == Method::POST {
                if let Some((model, version)) = infer_route(request.uri().path()) {
                    let (model, version) = (model.to_string(), version.map(str::to_string));
                    return Box::pin(direct.infer(request, &model, version.as_deref())).await;
                }
            }
        }
        match Box::pin(self.router.oneshot(request.map(axum::body::Body::new))).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }
}

/// The model and version of a KServe v2 inference path in plain form: no percent-escapes and no empty segments
/// (those go through the router, which decodes them).
pub fn infer_route(path: &str) -> Option<(&str, Option<&str>)> {
    let rest = path.strip_prefix("/v2/models/")?;
    if rest.contains('%') {
        return None;
    }
    let mut parts = rest.split('/');
    let model = parts.next().filter(|m| !m.is_empty())?;
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("infer"), None, _, _) => Some((model, None)),
        (Some("versions"), Some(v), Some("infer"), None) if !v.is_empty() => Some((model, Some(v))),
        _ => None,
    }
}

impl DirectInfer {
    async fn infer(
        &self,
        request: Request<Incoming>,
        model: &str,
        version: Option<&str>,
    ) -> Response {
        let started = std::time::Instant::now();
        if let Some(auth) = &self.auth {
            let header = request
                .headers()
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            let endpoint = crate::auth::rest_endpoint(request.method(), request.uri().path());
            if let Err(e) = auth.check(header, endpoint) {
                return e.into_response();
            }
        }
        let id = request_id(request.headers());
        // The semaphore is never closed; were it, the request would go on without a permit rather than fail.
        let _permit = self.permits.acquire().await.ok();
        let (parts, body) = request.into_parts();
        let body = read_body(
            body,
            &parts.headers,
            self.max_request_bytes,
            self.client_timeout,
        )
        .await;
        let mut response = crate::protocol::kserve_rest::infer_request(
            &self.infer,
            model,
            version,
            &parts.headers,
            body,
        )
        .await;
        tracing::debug!(
            id = %id,
            status = response.status().as_u16(),
            micros = started.elapsed().as_micros() as u64,
            "request done"
        );
        echo_id(&mut response, &id);
        response
    }
}

/// The request's id: the client's `x-request-id` (at most 128 bytes), or a new one.
pub(crate) fn request_id(headers: &HeaderMap) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(|| {
            format!(
                "{:016x}",
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            )
        })
}

/// Echoes the request id in the response.
pub(crate) fn echo_id(response: &mut Response, id: &str) {
    if let Ok(v) = HeaderValue::from_str(id) {
        response.headers_mut().insert("x-request-id", v);
    }
}

/// Reads a whole body of at most `limit` bytes, each chunk arriving within `stall` of the previous one: the
/// router's `DefaultBodyLimit` and `RequestBodyTimeoutLayer`, with the same answers (413, and 400 for a body that
/// stalls or breaks off).
async fn read_body(
    mut body: Incoming,
    headers: &HeaderMap,
    limit: usize,
    stall: Duration,
) -> Result<Bytes, InferError> {
    use hyper::body::Body;
    let too_large = || {
        InferError::new(
            ErrorKind::PayloadTooLarge,
            "request body is larger than --max-request-bytes allows",
        )
    };
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut first: Option<Bytes> = None;
    let mut rest: Vec<u8> = Vec::new();
    loop {
        let next = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx));
        let frame = match tokio::time::timeout(stall, next).await {
            Err(_) => {
                return Err(InferError::invalid(
                    "cannot read the request body: it stalled for longer than --client-timeout",
                ))
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(InferError::invalid(format!(
                    "cannot read the request body: {e}"
                )))
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let have = first.as_ref().map_or(0, Bytes::len) + rest.len();
        if have + data.len() > limit {
            return Err(too_large());
        }
        // The usual body is one chunk: keep it as it came, without a copy.
        match &first {
            None if rest.is_empty() => first = Some(data),
            _ => {
                if let Some(f) = first.take() {
                    rest.extend_from_slice(&f);
                }
                rest.extend_from_slice(&data);
            }
        }
    }
    Ok(match first {
        Some(f) => f,
        None => Bytes::from(rest),
    })
}

#[cfg(test)]
mod tests {
    use super::infer_route;

    #[test]
    fn only_plain_inference_paths_take_the_direct_route() {
        assert_eq!(infer_route("/v2/models/iris/infer"), Some(("iris", None)));
        assert_eq!(
            infer_route("/v2/models/iris/versions/2/infer"),
            Some(("iris", Some("2")))
        );
        assert_eq!(infer_route("/v2/models/infer/infer"), Some(("infer", None)));
        for other in [
            "/v2/models/iris",
            "/v2/models/iris/infer/",
            "/v2/models//infer",
            "/v2/models/iris/versions//infer",
            "/v2/models/iris/versions/2/infer/x",
            "/v2/models/ir%69s/infer",
            "/v2/models/iris/ready",
            "/v1/models/iris:predict",
            "/v2/models/iris/versions/2",
        ] {
            assert_eq!(infer_route(other), None, "{other}");
        }
    }
}
