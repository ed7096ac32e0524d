//! Idle gRPC connections are closed, as idle REST connections are.
//!
//! hyper closes a keep-alive REST connection that sends no new request within `--client-timeout`. tonic has no
//! such limit for HTTP/2, and keepalive pings only find dead peers: a live client could hold any number of idle
//! connections (and file descriptors). Each gRPC connection therefore counts its open calls ([`Calls`], reached
//! from the call through tonic's connect info, counted by [`CountCallsLayer`] until the response body is done),
//! and the connection ends once it has had no open call for the idle limit and read nothing for a moment
//! ([`Calls::idle_for`]). gRPC clients reconnect on their next call, as they do after any server's idle limit.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// A connection's open calls and when that count last changed.
#[derive(Debug)]
pub struct Calls {
    open: AtomicUsize,
    changed: Mutex<Instant>,
}

/// How long a connection must have read nothing before it may be closed as idle: a request whose first bytes
/// have just arrived is never cut.
pub const QUIET_READS: Duration = Duration::from_millis(500);

impl Calls {
    /// A connection with no call yet, idle from `now`.
    pub fn new(now: Instant) -> Arc<Calls> {
        Arc::new(Calls {
            open: AtomicUsize::new(0),
            changed: Mutex::new(now),
        })
    }

    /// Counts a call as open until the guard drops.
    pub fn start(self: &Arc<Calls>) -> CallGuard {
        let mut changed = self.changed.lock();
        self.open.fetch_add(1, Ordering::SeqCst);
        *changed = Instant::now();
        CallGuard(self.clone())
    }

    /// How long the connection has been idle at `now` (no open call since then, and nothing read within
    /// [`QUIET_READS`] of `last_read`), or `None` while it is busy.
    pub fn idle_for(&self, now: Instant, last_read: Instant) -> Option<Duration> {
        let changed = self.changed.lock();
        if self.open.load(Ordering::SeqCst) > 0
            || now.saturating_duration_since(last_read) < QUIET_READS
        {
            return None;
        }
        Some(now.saturating_duration_since(*changed))
    }
}

/// An open call; dropping it closes the call.
#[derive(Debug)]
pub struct CallGuard(Arc<Calls>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        let mut changed = self.0.changed.lock();
        self.0.open.fetch_sub(1, Ordering::SeqCst);
        *changed = Instant::now();
    }
}

/// A gRPC connection's calls, as tonic hands its connect info to each call.
#[derive(Debug, Clone)]
pub struct OpenCalls(pub Arc<Calls>);

/// Counts each call as open on its connection until its response body is done.
#[derive(Debug, Clone, Copy)]
pub struct CountCallsLayer;

impl<S> tower::Layer<S> for CountCallsLayer {
    type Service = CountCalls<S>;
    fn layer(&self, inner: S) -> CountCalls<S> {
        CountCalls(inner)
    }
}

/// The service [`CountCallsLayer`] makes.
#[derive(Debug, Clone)]
pub struct CountCalls<S>(S);

impl<S, B> tower::Service<axum::http::Request<B>> for CountCalls<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        let guard = request.extensions().get::<OpenCalls>().map(|c| c.0.start());
        let answer = self.0.call(request);
        Box::pin(async move {
            let response = answer.await?;
            Ok(match guard {
                Some(guard) => response.map(|body| {
                    tonic::body::Body::new(Guarded {
                        body,
                        _guard: guard,
                    })
                }),
                None => response,
            })
        })
    }
}

/// A response body that keeps its call open until it is done or dropped.
struct Guarded {
    body: tonic::body::Body,
    _guard: CallGuard,
}

impl hyper::body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, tonic::Status>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_idle_only_without_calls_and_recent_reads() {
        let t0 = Instant::now();
        let calls = Calls::new(t0);
        let later = t0 + Duration::from_secs(20);
        assert_eq!(calls.idle_for(later, t0), Some(Duration::from_secs(20)));
        // Bytes just read (a request's first frame) keep it open.
        assert_eq!(calls.idle_for(later, later - QUIET_READS / 2), None);
        let guard = calls.start();
        assert_eq!(
            calls.idle_for(Instant::now() + Duration::from_secs(60), t0),
            None
        );
        drop(guard);
        // Idle again, counted from the call's end.
        let idle = calls
            .idle_for(Instant::now() + Duration::from_secs(5), t0)
            .unwrap();
        assert!(
            idle >= Duration::from_secs(5) && idle < Duration::from_secs(6),
            "{idle:?}"
        );
    }
}
