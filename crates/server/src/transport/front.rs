//! What the REST listener does with each request: KServe v2 inference (`POST /v2/models/{m}/infer` and
//! `POST /v2/models/{m}/versions/{v}/infer`), the hot path, goes straight to its handler; every other request goes
//! through the axum [`Router`].
//!
//! The direct path applies exactly what the router's layers apply, in the same order: the token check, the request
//! id, then [`Admission`] (one for both paths): the body is read whole first (size limit, stall timeout, overall
//! deadline), and only then does the request wait for one of the `--max-concurrent-requests` permits, so a slow
//! upload never holds a permit. Probes (health, readiness, metrics) never wait for a permit.
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

use crate::core::infer::Infer;
use crate::error::{ErrorKind, InferError};

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
    pub auth: Option<Arc<crate::transport::auth::Auth>>,
    /// Body reading and the concurrency limit, shared with the router's [`admit`] layer.
    pub admission: Arc<Admission>,
}

/// How REST requests are let in, on both paths. A request with a body first takes one of `4 ×
/// --max-concurrent-requests` body slots and reads its body whole (at most `--max-request-bytes`, no pause longer
/// than `--client-timeout`, all of it within `--request-timeout`); only then does it wait for one of the
/// `--max-concurrent-requests` permits, and it keeps both until it is answered. So slow uploads hold body slots,
/// never permits, and the bodies in memory are at most `4 × --max-concurrent-requests × --max-request-bytes`.
/// Requests beyond the body slots wait, unread, in their connections. Probes take neither.
#[derive(Debug)]
pub struct Admission {
    /// Requests handled at once (`--max-concurrent-requests`).
    permits: tokio::sync::Semaphore,
    /// Requests with a body admitted at once: reading it, waiting for a permit, or being handled.
    bodies: tokio::sync::Semaphore,
    max_request_bytes: usize,
    /// The longest pause between two chunks of a body.
    stall: Duration,
    /// How long a whole body may take to arrive.
    deadline: Duration,
}

/// A request that was let in: the permits it holds until it is answered.
#[derive(Debug)]
pub struct Admitted<'a> {
    _body: Option<tokio::sync::SemaphorePermit<'a>>,
    _permit: Option<tokio::sync::SemaphorePermit<'a>>,
}

/// Body slots per concurrency permit.
pub const BODY_SLOTS_PER_PERMIT: usize = 4;

impl Admission {
    /// `max_concurrent` permits, four times as many body slots, and the body limits.
    pub fn new(
        max_concurrent: usize,
        max_request_bytes: usize,
        client_timeout: Duration,
        request_timeout: Duration,
    ) -> Admission {
        let max = tokio::sync::Semaphore::MAX_PERMITS;
        Admission {
            permits: tokio::sync::Semaphore::new(max_concurrent.min(max)),
            bodies: tokio::sync::Semaphore::new(
                max_concurrent
                    .saturating_mul(BODY_SLOTS_PER_PERMIT)
                    .min(max),
            ),
            max_request_bytes,
            stall: client_timeout,
            deadline: request_timeout,
        }
    }

    /// Lets a request in: reads its body (when it has one) under a body slot, then, unless it is a probe or its body
    /// failed, waits for a permit. The semaphores are never closed; were they, the request would go on without.
    pub async fn admit<B>(
        &self,
        body: B,
        headers: &HeaderMap,
        probe: bool,
    ) -> (Result<Bytes, InferError>, Admitted<'_>)
    where
        B: hyper::body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let mut admitted = Admitted {
            _body: None,
            _permit: None,
        };
        let body = if body.is_end_stream() {
            Ok(Bytes::new())
        } else {
            admitted._body = self.bodies.acquire().await.ok();
            let read = read_chunks(body, headers, self.max_request_bytes, self.stall);
            tokio::time::timeout(self.deadline, read)
                .await
                .unwrap_or_else(|_| {
                    Err(InferError::invalid(
                        "cannot read the request body: it did not arrive whole within --request-timeout",
                    ))
                })
        };
        if !probe && body.is_ok() {
            admitted._permit = self.permits.acquire().await.ok();
        }
        (body, admitted)
    }
}

/// The router's admission layer ([`Admission`]): the body is read first, then the permit is taken.
pub async fn admit(
    axum::extract::State(admission): axum::extract::State<Arc<Admission>>,
    request: Request<axum::body::Body>,
    next: axum::middleware::Next,
) -> Response {
    let (mut parts, body) = request.into_parts();
    let (read, _admitted) = admission
        .admit(body, &parts.headers, is_probe(parts.uri.path()))
        .await;
    let body = match read {
        Ok(bytes) => axum::body::Body::from(bytes),
        Err(e) => {
            parts.extensions.insert(crate::protocol::BodyError(e));
            axum::body::Body::empty()
        }
    };
    next.run(Request::from_parts(parts, body)).await
}

/// Health, readiness and metrics: answered without waiting for a permit, so a busy server still answers its probes.
fn is_probe(path: &str) -> bool {
    matches!(path, "/v2/health/live" | "/v2/health/ready" | "/metrics")
        || (path.starts_with("/v2/models/") && path.ends_with("/ready"))
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
            let endpoint =
                crate::transport::auth::rest_endpoint(request.method(), request.uri().path());
            if let Err(e) = auth.check(header, endpoint) {
                return e.into_response();
            }
        }
        let id = request_id(request.headers());
        let (parts, body) = request.into_parts();
        let (body, _admitted) = self.admission.admit(body, &parts.headers, false).await;
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

/// Reads a whole body of at most `limit` bytes, each chunk arriving within `stall` of the previous one: 413 past
/// the limit, 400 for a body that stalls or breaks off.
async fn read_chunks<B>(
    mut body: B,
    headers: &HeaderMap,
    limit: usize,
    stall: Duration,
) -> Result<Bytes, InferError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
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
