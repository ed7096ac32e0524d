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
