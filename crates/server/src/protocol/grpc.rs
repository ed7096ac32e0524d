//! Code generated from `proto/` by `build.rs` (KServe v2 and TF Serving gRPC), and what both gRPC adapters share.

#![allow(missing_docs, clippy::all, unreachable_pub)]

use std::time::{Duration, Instant};

use crate::error::InferError;

/// KServe v2 / Open Inference Protocol messages and service (`package inference`).
pub mod inference {
    tonic::include_proto!("inference");
}

/// TensorFlow framework messages (`package tensorflow`).
pub mod tensorflow {
    tonic::include_proto!("tensorflow");

    /// TF Serving messages and services (`package tensorflow.serving`).
    pub mod serving {
        tonic::include_proto!("tensorflow.serving");
    }
}

/// Records a gRPC call's outcome in the metrics and turns its result into a response, with the timing as metadata
/// (`x-queue-time-us`, `x-compute-time-us`, `x-total-time-us`).
pub(crate) fn finish<T>(
    record: crate::metrics::RequestRecord<'_>,
    result: Result<T, InferError>,
) -> Result<tonic::Response<T>, tonic::Status> {
    let timing = record.timing_headers().cloned();
    record.finish(
        result
            .as_ref()
            .map_or_else(|e| e.kind.label(), |_| "success"),
    );
    let mut response = tonic::Response::new(result?);
    for (name, value) in timing.iter().flatten() {
        if let Ok(mut v) = value.parse::<tonic::metadata::MetadataValue<_>>() {
            // A value that changes with every call must stay out of HPACK's table: indexing it would evict useful
            // entries and make every later header search the table for nothing (about 6% of a call's server CPU here).
            v.set_sensitive(true);
            response.metadata_mut().insert(*name, v);
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
    let bad = || InferError::invalid(format!("malformed grpc-timeout `{text}`"));
    if text.len() < 2 {
        return Err(bad());
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let duration = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return Err(bad()),
    };
    // tonic enforces the same header itself and answers CANCELLED when it fires; finishing a little earlier lets
    // the answer be the DEADLINE_EXCEEDED the protocol promises.
    let margin = (duration / 20).clamp(Duration::from_micros(200), Duration::from_millis(5));
    Ok(Instant::now().checked_add(duration.saturating_sub(margin)))
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
