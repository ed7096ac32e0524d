//! The gRPC messages and services (generated in `ferry-wire`, re-exported here) and what both gRPC adapters share.

use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::error::InferError;

pub use ferry_wire::{inference, tensorflow};

/// Ends a gRPC call: counts the response message, records the outcome, and turns the result into a response with a
/// prediction's timing as metadata (`x-queue-time-us`, `x-compute-time-us`, `x-total-time-us`).
pub(crate) fn finish<T: prost::Message>(
    call: crate::core::infer::Call<'_>,
    result: Result<T, InferError>,
) -> Result<tonic::Response<T>, tonic::Status> {
    let outcome = match &result {
        Ok(message) => {
            call.response_bytes(message.encoded_len());
            Ok(())
        }
        Err(e) => Err(e.kind),
    };
    let timing = call.finish(outcome);
    let mut response = tonic::Response::new(result?);
    for (name, value) in timing.iter().flat_map(crate::core::infer::Timing::headers) {
        if let Ok(mut v) = value.parse::<tonic::metadata::MetadataValue<_>>() {
            // A value that changes with every call must stay out of HPACK's table: indexing it would evict useful
            // entries and make every later header search the table for nothing (about 6% of a call's server CPU here).
            v.set_sensitive(true);
            response.metadata_mut().insert(name, v);
        }
    }
    Ok(response)
}

/// tonic refuses a message larger than `max_decoding_message_size` with OUT_OF_RANGE ("decoded message length too
/// large"); gRPC's reference servers, Triton and Ferry's error table answer RESOURCE_EXHAUSTED. Applied to every gRPC
/// response; only that refusal is changed.
pub(crate) fn oversized_is_resource_exhausted<B>(
    mut response: axum::http::Response<B>,
) -> axum::http::Response<B> {
    const OUT_OF_RANGE: &str = "11";
    let headers = response.headers_mut();
    let too_large = headers
        .get("grpc-status")
        .is_some_and(|s| s == OUT_OF_RANGE)
        && headers.get("grpc-message").is_some_and(|m| {
            let m = m.as_bytes();
            [
                &b"decoded%20message%20length%20too%20large"[..],
                b"decoded message length too large",
            ]
            .iter()
            .any(|needle| m.windows(needle.len()).any(|w| w == *needle))
        });
    if too_large {
        headers.insert(
            "grpc-status",
            axum::http::HeaderValue::from(tonic::Code::ResourceExhausted as i32),
        );
    }
    response
}

/// The client's deadline from the `grpc-timeout` header (`100m` is 100 ms; units H, M, S, m, u, n).
pub(crate) fn grpc_deadline(
    metadata: &tonic::metadata::MetadataMap,
) -> Result<Option<Instant>, InferError> {
    let Some(value) = metadata.get("grpc-timeout") else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or_default();
    let duration = grpc_timeout(text)
        .ok_or_else(|| InferError::invalid(format!("malformed grpc-timeout `{text}`")))?;
    Ok(Instant::now().checked_add(before_tonic(duration)))
}

/// A `grpc-timeout` value as a duration; `None` when malformed.
fn grpc_timeout(text: &str) -> Option<Duration> {
    if text.len() < 2 {
        return None;
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// tonic enforces the `grpc-timeout` header itself and answers CANCELLED when it fires; finishing a little earlier
/// lets the answer be the DEADLINE_EXCEEDED the protocol promises.
fn before_tonic(duration: Duration) -> Duration {
    let margin = (duration / 20).clamp(Duration::from_micros(200), Duration::from_millis(5));
    duration.saturating_sub(margin)
}

/// Ends every gRPC call, its upload included, with DEADLINE_EXCEEDED once it has run for `limit` (or the client's
/// `grpc-timeout`, a little before tonic's own timer, when that is shorter). tonic's `Server::timeout` would end it
/// with CANCELLED, which tells the client nothing about why (a request message that never finished arriving, say).
#[derive(Debug, Clone, Copy)]
pub struct GrpcDeadlineLayer(pub Duration);

impl<S> tower::Layer<S> for GrpcDeadlineLayer {
    type Service = GrpcDeadline<S>;
    fn layer(&self, inner: S) -> GrpcDeadline<S> {
        GrpcDeadline {
            limit: self.0,
            inner,
        }
    }
}

/// The service [`GrpcDeadlineLayer`] makes.
#[derive(Debug, Clone)]
pub struct GrpcDeadline<S> {
    limit: Duration,
    inner: S,
}

/// What [`GrpcDeadline`] makes of the call's result or its timer running out.
type Deadlined<R, E> = fn(Result<Result<R, E>, tokio::time::error::Elapsed>) -> Result<R, E>;

fn deadline_exceeded<E>(
    answer: Result<Result<axum::http::Response<tonic::body::Body>, E>, tokio::time::error::Elapsed>,
) -> Result<axum::http::Response<tonic::body::Body>, E> {
    answer.unwrap_or_else(|_| {
        Ok(tonic::Status::deadline_exceeded(
            "the call did not finish in time (--request-timeout plus --client-timeout, or the client's grpc-timeout)",
        )
        .into_http())
    })
}

impl<S, B> tower::Service<axum::http::Request<B>> for GrpcDeadline<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures_util::future::Map<
        tokio::time::Timeout<S::Future>,
        Deadlined<S::Response, S::Error>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        use futures_util::FutureExt;
        let client = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(grpc_timeout)
            .map(before_tonic);
        let limit = client.map_or(self.limit, |c| c.min(self.limit));
        tokio::time::timeout(limit, self.inner.call(request))
            .map(deadline_exceeded as Deadlined<S::Response, S::Error>)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        let mut m = tonic::metadata::MetadataMap::new();
        assert_eq!(grpc_deadline(&m).unwrap(), None);
        m.insert("grpc-timeout", "250m".parse().unwrap());
        let d = grpc_deadline(&m).unwrap().unwrap();
        assert!(
            d > Instant::now() + Duration::from_millis(200)
                && d <= Instant::now() + Duration::from_millis(250)
        );
        m.insert("grpc-timeout", "5x".parse().unwrap());
        assert!(grpc_deadline(&m).is_err());
    }
}
