//! gRPC inference messages as protobuf bytes: KServe v2 `ModelInferRequest` (typed contents, raw little-endian
//! contents, length-prefixed BYTES) and TF Serving `PredictRequest` (`tensor_content`, typed fields, a single value
//! filling a shape). The first byte picks the protocol and, for TF Serving, the model signature. Decoding never
//! panics, and what it decodes fills its shapes within the request's memory budget.
#![no_main]

use ferry_model::{DataType, TensorSpec};
use ferry_server::infer::Limits;
use ferry_server::protocol::grpc::inference::ModelInferRequest;
use ferry_server::protocol::grpc::tensorflow::serving::PredictRequest;
use ferry_server::protocol::kserve_grpc::decode_infer_inputs;
use ferry_server::protocol::tfserving_grpc::decode_predict_inputs;
use libfuzzer_sys::fuzz_target;
use prost::Message;

#[path = "check.rs"]
mod check;

fn signatures() -> Vec<Vec<TensorSpec>> {
    vec![
        vec![TensorSpec::tensor("x", DataType::F32, vec![-1, 4])],
        vec![TensorSpec::tensor("s", DataType::Bytes, vec![-1, -1])],
        vec![
            TensorSpec::tensor("a", DataType::I64, vec![-1, -1, -1]),
            TensorSpec::tensor("b", DataType::U8, vec![-1]),
        ],
        vec![TensorSpec::tensor("h", DataType::F16, vec![-1, 2])],
    ]
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, message)) = data.split_first() else {
        return;
    };
    let limits = Limits::default();
    if pick % 2 == 0 {
        if let Ok(r) = ModelInferRequest::decode(message) {
            if let Ok(inputs) = decode_infer_inputs(r.inputs, r.raw_input_contents, message.len(), &limits) {
                check::decoded(&inputs, message.len());
            }
        }
    } else if let Ok(r) = PredictRequest::decode(message) {
        let signatures = signatures();
        let specs = &signatures[usize::from(pick / 2) % signatures.len()];
        if let Ok(inputs) = decode_predict_inputs(specs, r.inputs, message.len(), &limits) {
            check::decoded(&inputs, message.len());
        }
    }
});
