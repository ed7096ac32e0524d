//! What Ferry's server and its own clients (`ferry bench`, `ferry top`) share on the wire, so that the clients need
//! not depend on the server: the gRPC messages and services generated from `proto/` by `build.rs` (KServe v2 and
//! TF Serving), and the metric catalogue's names.

pub mod metrics;

/// KServe v2 / Open Inference Protocol messages and service (`package inference`).
#[allow(missing_docs, clippy::all, unreachable_pub)]
pub mod inference {
    tonic::include_proto!("inference");
}

/// TensorFlow framework messages (`package tensorflow`).
#[allow(missing_docs, clippy::all, unreachable_pub)]
pub mod tensorflow {
    tonic::include_proto!("tensorflow");

    /// TF Serving messages and services (`package tensorflow.serving`).
    pub mod serving {
        tonic::include_proto!("tensorflow.serving");
    }
}
