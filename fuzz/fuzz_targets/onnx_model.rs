//! Model files as the server reads them before any engine: the external-data scan (a skeleton of ModelProto,
//! every subgraph, function and training graph) with its location checks, and the ModelProto subset Ferry reads and
//! writes (`ferry optimize` decodes models made elsewhere). ONNX Runtime's own parser is not fuzzed here (it is
//! C++, and slow to start per input).
#![no_main]

use ferry_model::external::{check_location, check_self_contained, external_tensors};
use ferry_model::onnx::ModelProto;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(found) = external_tensors(data) {
        for t in &found {
            let _ = check_location(&t.location, None);
        }
        let verdict = check_self_contained(data, None);
        assert_eq!(found.is_empty(), verdict.is_ok());
    }
    if let Ok(model) = ModelProto::decode(data) {
        // What Ferry writes back decodes to the same bytes again.
        let once = model.encode_to_vec();
        let again = ModelProto::decode(once.as_slice()).expect("re-encoded model decodes");
        assert_eq!(once, again.encode_to_vec());
    }
});
