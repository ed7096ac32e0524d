//! The metric catalogue (names, types, help texts, labels and buckets, defined in `ferry-wire` so that `ferry top`
//! reads the same names) and the fixed label values: [`Protocol`] and [`Outcome`].

pub use ferry_wire::metrics::*;

use crate::error::{ErrorKind, InferError};

/// The protocol a request came in by: the `protocol` label's values. A new front door adds a variant here (and to
/// [`Protocol::ALL`]); its requests are then counted without a lock like the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// KServe v2 over REST.
    KserveRest,
    /// TF Serving over REST.
    TfservingRest,
    /// KServe v2 over gRPC.
    KserveGrpc,
    /// TF Serving over gRPC.
    TfservingGrpc,
    /// Hugging Face text-embeddings-inference's REST API.
    TeiRest,
    /// OpenAI's REST API.
    OpenaiRest,
    /// Triton's generate extension (REST).
    GenerateRest,
}

impl Protocol {
    /// Every protocol, in declaration order (`ALL[p as usize] == p`).
    pub const ALL: [Protocol; 7] = [
        Protocol::KserveRest,
        Protocol::TfservingRest,
        Protocol::KserveGrpc,
        Protocol::TfservingGrpc,
        Protocol::TeiRest,
        Protocol::OpenaiRest,
        Protocol::GenerateRest,
    ];

    /// The `protocol` label value.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::KserveRest => "rest_kserve",
            Protocol::TfservingRest => "rest_tfserving",
            Protocol::KserveGrpc => "grpc_kserve",
            Protocol::TfservingGrpc => "grpc_tfserving",
            Protocol::TeiRest => "rest_tei",
            Protocol::OpenaiRest => "rest_openai",
            Protocol::GenerateRest => "rest_generate",
        }
    }
}

/// How a request ended: the `outcome` label's values are `success` and the error kinds' labels, derived from
/// [`ErrorKind`], so a new kind is a new outcome with nothing else to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered.
    Success,
    /// Failed with this kind of error.
    Failed(ErrorKind),
}

impl Outcome {
    /// Every outcome: `success`, then the error kinds in [`ErrorKind::ALL`]'s order (`ALL[o.index()] == o`).
    pub const ALL: [Outcome; ErrorKind::ALL.len() + 1] = {
        let mut all = [Outcome::Success; ErrorKind::ALL.len() + 1];
        let mut i = 0;
        while i < ErrorKind::ALL.len() {
            all[i + 1] = Outcome::Failed(ErrorKind::ALL[i]);
            i += 1;
        }
        all
    };

    /// The outcome of a result.
    pub fn of<T>(result: &Result<T, InferError>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(e) => Outcome::Failed(e.kind),
        }
    }

    /// Its place in [`Outcome::ALL`].
    pub(super) fn index(self) -> usize {
        match self {
            Outcome::Success => 0,
            Outcome::Failed(kind) => kind as usize + 1,
        }
    }

    /// The `outcome` label value.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failed(kind) => kind.label(),
        }
    }
}
