//! KServe v2 REST bodies with the binary tensor extension: the first two bytes choose the
//! `Inference-Header-Content-Length` (possibly past the end, or 0), the rest is the body, so the JSON header, the
//! split and the binary inputs after it are all fuzzed together.
#![no_main]

use ferry_server::infer::Limits;
use ferry_server::protocol::kserve_rest::{decode_request_body, HEADER_LENGTH};
use libfuzzer_sys::fuzz_target;

#[path = "check.rs"]
mod check;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (n, body) = data.split_at(2);
    let n = usize::from(u16::from_le_bytes([n[0], n[1]])) % (body.len() + 2);
    let mut headers = http::HeaderMap::new();
    headers.insert(HEADER_LENGTH, n.into());
    let body = bytes::Bytes::copy_from_slice(body);
    if let Ok(inputs) = decode_request_body(&headers, &body, &Limits::default()) {
        check::decoded(&inputs, body.len());
    }
});
