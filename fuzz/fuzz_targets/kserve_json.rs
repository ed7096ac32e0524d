//! KServe v2 REST inference bodies without binary data: any bytes as the JSON body (and as a recorded warm-up
//! request, which takes the same decoder). Decoding either succeeds or returns an error; it never panics, and what
//! it decodes is consistent (each tensor's data fills its shape).
#![no_main]

use ferry_server::infer::Limits;
use ferry_server::protocol::kserve_rest::{decode_json_inputs, decode_request_body};
use libfuzzer_sys::fuzz_target;

#[path = "check.rs"]
mod check;

fuzz_target!(|data: &[u8]| {
    let body = bytes::Bytes::copy_from_slice(data);
    let limits = Limits::default();
    if let Ok(inputs) = decode_request_body(&http::HeaderMap::new(), &body, &limits) {
        check::decoded(&inputs, data.len());
        let _ = limits.check(&inputs);
    }
    let _ = decode_json_inputs(data);
});
