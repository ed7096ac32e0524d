//! TF Serving REST `:predict` bodies (row and columnar formats, base64 strings) against a few model signatures: the
//! first byte picks the signature, the rest is the body.
#![no_main]

use ferry_model::{DataType, TensorSpec};
use ferry_server::infer::Limits;
use ferry_server::protocol::tfserving_rest::decode_predict_body;
use libfuzzer_sys::fuzz_target;

#[path = "check.rs"]
mod check;

fn signatures() -> Vec<Vec<TensorSpec>> {
    vec![
        vec![TensorSpec::tensor("x", DataType::F32, vec![-1, 4])],
        vec![
            TensorSpec::tensor("a", DataType::F32, vec![-1, 2]),
            TensorSpec::tensor("b", DataType::I64, vec![-1, 2]),
        ],
        vec![TensorSpec::tensor("s", DataType::Bytes, vec![-1])],
        vec![TensorSpec::tensor("flag", DataType::Bool, vec![-1, -1])],
        vec![
            TensorSpec::tensor("h", DataType::F16, vec![-1]),
            TensorSpec::tensor("u", DataType::U8, vec![-1, 3, 2]),
            TensorSpec::tensor("d", DataType::F64, vec![]),
        ],
    ]
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let signatures = signatures();
    let specs = &signatures[usize::from(pick) % signatures.len()];
    if let Ok((inputs, _row_format)) = decode_predict_body(specs, body, &Limits::default()) {
        check::decoded(&inputs, body.len());
        for input in &inputs {
            assert!(specs.iter().any(|s| s.name == input.name && s.dtype == input.tensor.dtype()));
        }
    }
});
