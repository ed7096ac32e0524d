//! Property tests: arbitrary bodies thrown at every decoder never panic the server and always get either an
//! answer or a JSON error with a 4xx/503 status. Runs the router in-process on models built in code.

mod common;

use axum::body::Body;
use axum::http::Request;
use common::*;
use ferry_model::DataType;
use proptest::prelude::*;
use serde_json::{json, Value};
use tower::ServiceExt;

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "[a-z0-9_ ]{0,8}".prop_map(Value::from),
        Just(json!({"b64": "aGk="})),
        Just(json!({"b64": "!!"})),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        Just("x".to_string()),
                        Just("a".to_string()),
                        Just("b".to_string()),
                        Just("inputs".to_string()),
                        Just("instances".to_string()),
                        Just("examples".to_string()),
                        Just("data".to_string()),
                        Just("shape".to_string()),
                        Just("datatype".to_string()),
                        Just("name".to_string()),
                        Just("parameters".to_string()),
                        Just("binary_data_size".to_string()),
                        Just("outputs".to_string()),
                        "[a-z]{1,6}"
                    ],
                    inner
                ),
                0..6
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// KServe requests that are close to valid: real input names and datatypes, arbitrary shapes and data.
fn kserve_request() -> impl Strategy<Value = Value> {
    let datatype = prop::sample::select(
        DataType::ALL
            .iter()
            .map(|d| d.kserve_name())
            .chain(["FLOAT", ""])
            .collect::<Vec<_>>(),
    );
    let input = (prop::sample::select(vec!["x", "a", "b", "q"]), prop::collection::vec(-2i64..5, 0..4), datatype, json_value(), any::<bool>(), 0u64..64)
        .prop_map(|(name, shape, datatype, data, binary, size)| {
            if binary {
                json!({"name": name, "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": size}})
            } else {
                json!({"name": name, "shape": shape, "datatype": datatype, "data": data})
            }
        });
    (prop::collection::vec(input, 0..3), any::<bool>()).prop_map(|(inputs, binary_out)| {
        json!({"inputs": inputs, "parameters": {"binary_data_output": binary_out}})
    })
}

struct Harness {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
    _server: TestServer,
}

fn harness() -> Harness {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = runtime.block_on(async {
        let repo = TempDir::new("prop");
        put_model(&repo.0, "affine", 1, &affine());
        put_model(&repo.0, "two_io", 1, &two_io());
        put_model(&repo.0, "strings", 1, &identity(DataType::Bytes));
        put_model(&repo.0, "classifier", 1, &classifier());
        put_model(&repo.0, "broken", 1, b"not a model");
        TestServer::start(repo).await
    });
    let router = ferry_server::app(
        ferry_server::AppState {
            infer: server.infer.clone(),
        },
        1 << 20,
    );
    Harness {
        runtime,
        router,
        _server: server,
    }
}

fn check(
    h: &Harness,
    path: &str,
    body: Vec<u8>,
    header_len: Option<usize>,
) -> Result<(), TestCaseError> {
    let mut req = Request::post(path);
    if let Some(n) = header_len {
        req = req.header("inference-header-content-length", n.to_string());
    }
    let response = h
        .runtime
        .block_on(
            h.router
                .clone()
                .oneshot(req.body(Body::from(body)).unwrap()),
        )
        .unwrap();
    let status = response.status().as_u16();
    let bytes = h
        .runtime
        .block_on(axum::body::to_bytes(response.into_body(), usize::MAX))
        .unwrap();
    prop_assert!(
        matches!(status, 200 | 400 | 404 | 413 | 503),
        "status {status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    if status != 200 {
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|e| TestCaseError::fail(format!("error body is not JSON: {e}")))?;
        prop_assert!(v["error"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
    Ok(())
}

const PATHS: [&str; 9] = [
    "/v2/models/affine/infer",
    "/v2/models/two_io/infer",
    "/v2/models/strings/infer",
    "/v2/models/broken/infer",
    "/v1/models/affine:predict",
    "/v1/models/two_io:predict",
    "/v1/models/strings:predict",
    "/v1/models/classifier:classify",
    "/v1/models/affine:regress",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes(path in prop::sample::select(PATHS.to_vec()), body in prop::collection::vec(any::<u8>(), 0..256), header in prop::option::of(0usize..300)) {
        HARNESS.with(|h| check(h, path, body, header))?;
    }

    #[test]
    fn arbitrary_json(path in prop::sample::select(PATHS.to_vec()), value in json_value()) {
        HARNESS.with(|h| check(h, path, value.to_string().into_bytes(), None))?;
    }

    #[test]
    fn near_valid_kserve(path in prop::sample::select(PATHS[..4].to_vec()), value in kserve_request(), tail in prop::collection::vec(any::<u8>(), 0..64)) {
        let header = value.to_string().into_bytes();
        let n = header.len();
        let mut body = header;
        body.extend_from_slice(&tail);
        HARNESS.with(|h| check(h, path, body, Some(n)))?;
    }

    #[test]
    fn near_valid_tfserving(path in prop::sample::select(PATHS[4..].to_vec()), rows in json_value(), key in prop::sample::select(vec!["instances", "inputs", "examples"])) {
        HARNESS.with(|h| check(h, path, json!({key: rows}).to_string().into_bytes(), None))?;
    }
}

thread_local! {
    /// One server per test thread, shared by every case that thread runs.
    static HARNESS: Harness = harness();
}

// The decoders on their own, without a server: the entry points the fuzz targets call (fuzz/fuzz_targets), run here
// as a bounded property test so every `cargo test` covers the same inputs.

use axum::http::HeaderMap;
use ferry_model::external::{check_location, check_self_contained, external_tensors};
use ferry_model::onnx::{GraphBuilder, ModelProto, TensorProto};
use ferry_model::{element_count, NamedTensor, TensorSpec};
use ferry_server::infer::{memory_cost, Budget, Limits};
use ferry_server::protocol::grpc::inference as kserve;
use ferry_server::protocol::grpc::tensorflow as tf;
use ferry_server::protocol::kserve_grpc::decode_infer_inputs;
use ferry_server::protocol::kserve_rest::{decode_json_inputs, decode_request_body, HEADER_LENGTH};
use ferry_server::protocol::tfserving_grpc::decode_predict_inputs;
use ferry_server::protocol::tfserving_rest::decode_predict_body;
use prost::Message;

/// The model signatures TF Serving bodies are decoded against (as in the fuzz target).
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

fn consistent(inputs: &[NamedTensor]) -> Result<(), TestCaseError> {
    for i in inputs {
        prop_assert_eq!(
            element_count(&i.tensor.shape),
            Some(i.tensor.data.len()),
            "{}",
            i.name
        );
    }
    Ok(())
}

/// Decoded tensors of a request of `request_bytes` never take more memory than its budget.
fn within_budget(inputs: &[NamedTensor], request_bytes: usize) -> Result<(), TestCaseError> {
    let used: usize = inputs.iter().map(|i| memory_cost(&i.tensor.data)).sum();
    let total = Budget::for_request(request_bytes).total();
    prop_assert!(
        used <= total,
        "{used} bytes decoded from a request of {request_bytes} (budget {total})"
    );
    Ok(())
}

/// A TF Serving `Predict` input of `dtype` with `shape`, holding `values` in its typed field (one value fills).
fn tf_tensor(dtype: DataType, shape: &[i64], values: usize, text: &[u8]) -> tf::TensorProto {
    let mut t = tf::TensorProto {
        dtype: match dtype {
            DataType::F32 => tf::DataType::DtFloat,
            DataType::I64 => tf::DataType::DtInt64,
            _ => tf::DataType::DtString,
        } as i32,
        tensor_shape: Some(tf::TensorShapeProto {
            dim: shape
                .iter()
                .map(|d| tf::tensor_shape_proto::Dim {
                    size: *d,
                    name: String::new(),
                })
                .collect(),
            unknown_rank: false,
        }),
        ..Default::default()
    };
    match dtype {
        DataType::F32 => t.float_val = vec![1.5; values],
        DataType::I64 => t.int64_val = vec![7; values],
        _ => t.string_val = vec![text.to_vec(); values],
    }
    t
}

fn kserve_direct(body: Vec<u8>, header: Option<usize>) -> Result<(), TestCaseError> {
    let mut headers = HeaderMap::new();
    if let Some(n) = header {
        headers.insert(HEADER_LENGTH, n.into());
    }
    let n = body.len();
    if let Ok(inputs) = decode_request_body(&headers, &body.into(), &Limits::default()) {
        consistent(&inputs)?;
        within_budget(&inputs, n)?;
    }
    Ok(())
}

/// `y = x + w` with `w` kept in an external file at `location`.
fn external_model(location: &str) -> Vec<u8> {
    GraphBuilder::new("g")
        .input("x", DataType::F32, Some(&[-1, 2]))
        .output("y", DataType::F32, Some(&[-1, 2]))
        .initializer(TensorProto::external("w", DataType::F32, &[2], location))
        .node("Add", &["x", "w"], &["y"], vec![])
        .to_bytes()
}

fn onnx_direct(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(found) = external_tensors(bytes) {
        prop_assert_eq!(found.is_empty(), check_self_contained(bytes, None).is_ok());
    }
    if let Ok(model) = ModelProto::decode(bytes) {
        let once = model.encode_to_vec();
        let again = ModelProto::decode(once.as_slice()).unwrap();
        prop_assert_eq!(once, again.encode_to_vec());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn kserve_decoder_on_arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..512), header in prop::option::of(0usize..600)) {
        kserve_direct(body, header)?;
    }

    #[test]
    fn kserve_decoder_on_near_valid_binary_requests(value in kserve_request(), tail in prop::collection::vec(any::<u8>(), 0..128), cut in 0usize..3) {
        let header = value.to_string().into_bytes();
        let n = header.len();
        let mut body = header;
        body.extend_from_slice(&tail);
        // The true header length, one short (the JSON is cut), or one long (a byte of binary data joins it).
        kserve_direct(body, Some((n + cut).saturating_sub(1).max(1)))?;
    }

    #[test]
    fn warmup_decoder_on_arbitrary_json(value in kserve_request()) {
        if let Ok(inputs) = decode_json_inputs(value.to_string().as_bytes()) {
            consistent(&inputs)?;
        }
    }

    #[test]
    fn tfserving_decoder_on_arbitrary_bodies(pick in 0usize..5, value in json_value(), key in prop::sample::select(vec!["instances", "inputs", "examples", "signature_name"]), raw in prop::collection::vec(any::<u8>(), 0..256), use_raw in any::<bool>()) {
        let specs = &signatures()[pick];
        let body = if use_raw { raw } else { json!({key: value}).to_string().into_bytes() };
        if let Ok((inputs, _)) = decode_predict_body(specs, &body, &Limits::default()) {
            consistent(&inputs)?;
            within_budget(&inputs, body.len())?;
            for i in &inputs {
                prop_assert!(specs.iter().any(|s| s.name == i.name && s.dtype == i.tensor.dtype()));
            }
        }
    }

    #[test]
    fn tfserving_decoder_on_named_instances(pick in 0usize..5, rows in prop::collection::vec(json_value(), 1..4)) {
        let specs = &signatures()[pick];
        let instances: Vec<Value> = rows
            .iter()
            .map(|v| Value::Object(specs.iter().map(|s| (s.name.clone(), v.clone())).collect()))
            .collect();
        for body in [json!({"instances": instances}), json!({"inputs": instances[0].clone()})] {
            if let Ok((inputs, _)) = decode_predict_body(specs, body.to_string().as_bytes(), &Limits::default()) {
                consistent(&inputs)?;
            }
        }
    }

    #[test]
    fn tfserving_grpc_fills_stay_within_the_budget(
        dtype in prop::sample::select(vec![DataType::F32, DataType::I64, DataType::Bytes]),
        shape in prop::collection::vec(prop_oneof![0i64..4, 0i64..70_000, Just(-1i64), Just(1i64 << 40)], 0..4),
        values in 0usize..4,
        text_len in 0usize..3000,
    ) {
        let specs = vec![TensorSpec::tensor("x", dtype, vec![-1; shape.len()])];
        let mut request = tf::serving::PredictRequest::default();
        request.inputs.insert("x".into(), tf_tensor(dtype, &shape, values, &vec![b's'; text_len]));
        let n = request.encoded_len();
        if let Ok(inputs) = decode_predict_inputs(&specs, request.inputs, n, &Limits::default()) {
            consistent(&inputs)?;
            within_budget(&inputs, n)?;
        }
    }

    #[test]
    fn grpc_decoders_on_arbitrary_messages(bytes in prop::collection::vec(any::<u8>(), 0..512), pick in 0usize..5) {
        if let Ok(request) = kserve::ModelInferRequest::decode(bytes.as_slice()) {
            if let Ok(inputs) = decode_infer_inputs(request.inputs, request.raw_input_contents, bytes.len(), &Limits::default()) {
                consistent(&inputs)?;
                within_budget(&inputs, bytes.len())?;
            }
        }
        if let Ok(request) = tf::serving::PredictRequest::decode(bytes.as_slice()) {
            if let Ok(inputs) = decode_predict_inputs(&signatures()[pick], request.inputs, bytes.len(), &Limits::default()) {
                consistent(&inputs)?;
                within_budget(&inputs, bytes.len())?;
            }
        }
    }

    #[test]
    fn onnx_scan_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        onnx_direct(&bytes)?;
    }

    #[test]
    fn onnx_scan_on_mutated_models(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8), cut in any::<prop::sample::Index>()) {
        let mut bytes = external_model("weights.bin");
        for (at, b) in edits {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        let end = cut.index(bytes.len() + 1);
        onnx_direct(&bytes[..end])?;
        onnx_direct(&bytes)?;
    }

    #[test]
    fn external_locations_escape_exactly_when_they_leave_the_directory(location in "[a-z./\\\\:]{0,10}") {
        let escapes = location.is_empty()
            || location.starts_with('/')
            || location.contains('\\')
            || location.contains(':')
            || location.split('/').any(|part| part == "..");
        prop_assert_eq!(check_location(&location, None).is_err(), escapes, "{:?}", location);
        let verdict = check_self_contained(&external_model(&location), None);
        let refused_as_escape = matches!(verdict, Err(ferry_model::external::ExternalDataError::Escapes { .. }));
        prop_assert_eq!(refused_as_escape, escapes, "{:?}: {:?}", location, verdict);
        prop_assert!(verdict.is_err());
    }
}

#[test]
fn grpc_typed_byte_strings_are_charged_to_the_budget() {
    // 200,000 empty strings: 400 KB on the wire, 4.8 MB as vectors.
    let request = kserve::ModelInferRequest {
        inputs: vec![kserve::model_infer_request::InferInputTensor {
            name: "s".into(),
            datatype: "BYTES".into(),
            shape: vec![100, 2000],
            contents: Some(kserve::InferTensorContents {
                bytes_contents: vec![Vec::new(); 200_000],
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let n = request.encoded_len();
    let e = decode_infer_inputs(
        request.inputs,
        request.raw_input_contents,
        n,
        &Limits::default(),
    )
    .unwrap_err();
    assert!(e.message.contains("bytes of memory"), "{}", e.message);
    let mut request = tf::serving::PredictRequest::default();
    request.inputs.insert(
        "s".into(),
        tf_tensor(DataType::Bytes, &[100, 2000], 200_000, b""),
    );
    let n = request.encoded_len();
    let specs = vec![TensorSpec::tensor("s", DataType::Bytes, vec![-1, -1])];
    let e = decode_predict_inputs(&specs, request.inputs, n, &Limits::default()).unwrap_err();
    assert!(e.message.contains("bytes of memory"), "{}", e.message);
}

/// `[[[...]]]` and `{"a":{"a":...}}` nested `depth` times.
fn nested(depth: usize) -> [String; 2] {
    [
        format!("{}{}", "[".repeat(depth), "]".repeat(depth)),
        format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth)),
    ]
}

#[test]
fn deeply_nested_json_is_refused_not_a_stack_overflow() {
    let limits = Limits::default();
    for depth in [limits.max_json_depth + 1, 1_000, 200_000] {
        for text in nested(depth) {
            let kserve = format!(
                r#"{{"inputs":[{{"name":"x","shape":[1,2],"datatype":"FP32","data":{text}}}]}}"#
            );
            let e = decode_request_body(&HeaderMap::new(), &kserve.clone().into(), &limits)
                .unwrap_err();
            assert_eq!(e.kind.status().as_u16(), 400, "{}", e.message);
            // Warm-up requests skip the depth scan; serde_json's own recursion limit stops them.
            assert!(decode_json_inputs(kserve.as_bytes()).is_err());
            for specs in signatures() {
                let tf = format!(r#"{{"instances":{text}}}"#);
                assert!(decode_predict_body(&specs, tf.as_bytes(), &limits).is_err());
                assert!(decode_predict_body(&specs, text.as_bytes(), &limits).is_err());
            }
            HARNESS.with(|h| {
                for path in PATHS {
                    check(h, path, text.clone().into_bytes(), None).unwrap();
                    check(h, path, kserve.clone().into_bytes(), None).unwrap();
                }
            });
        }
    }
}

#[test]
fn oversized_shapes_are_refused_before_anything_is_allocated() {
    let big = [
        json!([4_294_967_296u64, 4_294_967_296u64]),
        json!([i64::MAX]),
        json!([u64::MAX]),
        json!([2_147_483_648u64, 2, 2]),
        json!([1u64 << 21, 1u64 << 21, 1u64 << 21]),
        json!(vec![2; 64]),
        json!([-1, 2]),
        json!([1.5, 2]),
    ];
    for shape in big {
        for input in [
            json!({"name": "x", "shape": shape, "datatype": "FP32", "data": [1.0, 2.0]}),
            json!({"name": "x", "shape": shape, "datatype": "BYTES", "data": ["a"]}),
            json!({"name": "x", "shape": shape, "datatype": "FP32", "parameters": {"binary_data_size": 8}}),
        ] {
            let header = json!({"inputs": [input]}).to_string().into_bytes();
            let n = header.len();
            let mut body = header;
            body.extend_from_slice(&[0; 8]);
            let mut headers = HeaderMap::new();
            headers.insert(HEADER_LENGTH, n.into());
            let e = decode_request_body(&headers, &body.clone().into(), &Limits::default())
                .unwrap_err();
            assert_eq!(e.kind.status().as_u16(), 400, "{shape}: {}", e.message);
            HARNESS.with(|h| {
                for path in &PATHS[..4] {
                    check(h, path, body.clone(), Some(n)).unwrap();
                }
            });
        }
    }
}
