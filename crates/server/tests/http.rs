//! The REST server end to end: a real server on a free port, called over HTTP with a real client, on models built
//! in code. Needs ONNX Runtime: run through `scripts/test`, which sets `ORT_DYLIB_PATH`.

mod common;

use common::*;
use ferry_model::DataType;
use serde_json::{json, Value};

/// A repository with good, broken and multi-version models.
fn repository() -> TempDir {
    let repo = TempDir::new("http");
    let root = &repo.0;
    put_model(root, "affine", 1, &affine());
    put_model(root, "two_io", 1, &two_io());
    put_model(root, "classifier", 1, &classifier());
    put_file(
        root,
        "classifier",
        "1/ferry.json",
        r#"{"features": ["f0", "f1"], "classes": ["a", "b", "c"]}"#,
    );
    put_model(root, "broken", 1, b"definitely not an onnx file");
    put_model(root, "badconfig", 1, &affine());
    put_file(
        root,
        "badconfig",
        "config.toml",
        "version_policy = \"newest\"\n",
    );
    for v in 1..=3 {
        put_model(root, "versioned", v, &scaled_affine(v as f32));
    }
    put_file(
        root,
        "versioned",
        "config.toml",
        "version_policy = { specific = [1, 2] }\n[labels]\nstable = 1\ncanary = 2\n",
    );
    for dtype in DataType::ALL {
        put_model(
            root,
            &format!("id_{}", dtype.kserve_name().to_lowercase()),
            1,
            &identity(dtype),
        );
    }
    repo
}

async fn server() -> TestServer {
    TestServer::start(repository()).await
}

fn assert_error(status: u16, body: &Value, want_status: u16, fragments: &[&str]) {
    assert_eq!(status, want_status, "{body}");
    let message = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message in {body}"));
    for f in fragments {
        assert!(message.contains(f), "`{message}` should mention `{f}`");
    }
}

#[tokio::test]
async fn health_and_server_metadata() {
    let s = server().await;
    assert_eq!(s.get("/v2/health/live").await.0, 200);
    assert_eq!(s.get("/v2/health/ready").await.0, 200);
    let (status, meta) = s.get("/v2").await;
    assert_eq!(status, 200);
    assert_eq!(meta["name"], "ferry");
    assert!(meta["extensions"]
        .as_array()
        .unwrap()
        .contains(&json!("binary_tensor_data")));
    let (status, body) = s.get("/nowhere").await;
    assert_error(status, &body, 404, &["no such endpoint"]);
}

#[tokio::test]
async fn kserve_model_metadata_and_readiness() {
    let s = server().await;
    let (status, meta) = s.get("/v2/models/affine").await;
    assert_eq!(status, 200);
    assert_eq!(
        meta,
        json!({"name": "affine", "versions": ["1"], "platform": "onnxruntime_onnx",
               "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
               "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}]})
    );
    assert_eq!(
        s.get("/v2/models/affine/versions/1").await.1["versions"],
        json!(["1"])
    );
    assert_eq!(s.get("/v2/models/affine/ready").await.0, 200);
    assert_eq!(s.get("/v2/models/affine/versions/1/ready").await.0, 200);
    assert_eq!(s.get("/v2/models/affine/versions/2/ready").await.0, 404);
    assert_eq!(s.get("/v2/models/nope/ready").await.0, 404);
    // A broken model is known but not ready: the protocol's 4xx "false".
    let (status, body) = s.get("/v2/models/broken/ready").await;
    assert_error(status, &body, 400, &["unavailable", "model failed to load"]);
    let (status, body) = s.get("/v2/models/versioned").await;
    assert_eq!(status, 200);
    assert_eq!(
        body["versions"],
        json!(["1", "2"]),
        "version policy `specific` serves 1 and 2 only"
    );
}

#[tokio::test]
async fn kserve_infer_json_flat_and_nested() {
    let s = server().await;
    let (status, body) = s
        .post(
            "/v2/models/affine/infer",
            json!({"id": "req-7", "parameters": {"trace": "yes"},
                   "inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"id": "req-7", "model_name": "affine", "model_version": "1",
               "outputs": [{"name": "y", "datatype": "FP32", "shape": [2, 1], "data": [0.5, 2.5]}]})
    );
    let (status, nested) = s
        .post(
            "/v2/models/affine/versions/1/infer",
            json!({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4]]}],
                   "outputs": [{"name": "y"}]}),
        )
        .await;
    assert_eq!(status, 200, "{nested}");
    assert_eq!(nested["outputs"][0]["data"], json!([0.5, 2.5]));
    assert!(
        nested.get("id").is_none(),
        "no id is echoed when none was sent"
    );
}

#[tokio::test]
async fn kserve_every_datatype_in_json_and_binary() {
    let s = server().await;
    let samples: Vec<(DataType, Value)> = vec![
        (DataType::Bool, json!([true, false, false, true])),
        (DataType::U8, json!([0, 1, 254, 255])),
        (DataType::U16, json!([0, 1, 65534, 65535])),
        (DataType::U32, json!([0, 1, 7, 4294967295u64])),
        (DataType::U64, json!([0, 1, 7, 18446744073709551615u64])),
        (DataType::I8, json!([-128, -1, 0, 127])),
        (DataType::I16, json!([-32768, -1, 0, 32767])),
        (DataType::I32, json!([-2147483648i64, -1, 0, 2147483647])),
        (
            DataType::I64,
            json!([-9223372036854775808i64, -1, 0, 9223372036854775807i64]),
        ),
        (DataType::F16, json!([0.5, -2.0, 0.0, 1024.0])),
        (DataType::F32, json!([0.25, -1.5, 3.0e30, 1.0e-30])),
        (DataType::F64, json!([0.1, -1.0e300, 2.5, 1.0e-300])),
        (DataType::Bytes, json!(["alpha", "", "β", "four"])),
    ];
    for (dtype, data) in samples {
        let name = format!("id_{}", dtype.kserve_name().to_lowercase());
        let path = format!("/v2/models/{name}/infer");
        // JSON in, JSON out.
        let (status, body) = s
            .post(&path, json!({"inputs": [{"name": "x", "shape": [2, 2], "datatype": dtype.kserve_name(), "data": data}]}))
            .await;
        assert_eq!(status, 200, "{dtype}: {body}");
        assert_eq!(body["outputs"][0]["datatype"], dtype.kserve_name());
        assert_eq!(body["outputs"][0]["shape"], json!([2, 2]));
        assert_eq!(body["outputs"][0]["data"], data, "{dtype}");

        // Binary in, binary out (what tritonclient does by default).
        let mut items = Vec::new();
        ferry_server::protocol::json::leaves(&data, &mut items);
        let tensor = ferry_server::protocol::json::decode_leaves(dtype, &items, false).unwrap();
        let mut raw = Vec::new();
        tensor.write_le_bytes(&mut raw);
        let header =
            json!({"inputs": [{"name": "x", "shape": [2, 2], "datatype": dtype.kserve_name(),
                                         "parameters": {"binary_data_size": raw.len()}}],
                            "parameters": {"binary_data_output": true}})
            .to_string();
        let mut body = header.clone().into_bytes();
        body.extend_from_slice(&raw);
        let r = s
            .post_raw(
                &path,
                body,
                &[("Inference-Header-Content-Length", header.len().to_string())],
            )
            .await;
        assert_eq!(
            r.status,
            200,
            "{dtype}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.headers["content-type"], "application/octet-stream");
        let json_len: usize = r.headers["inference-header-content-length"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let head: Value = serde_json::from_slice(&r.body[..json_len]).unwrap();
        assert_eq!(
            head["outputs"][0]["parameters"]["binary_data_size"],
            json!(raw.len()),
            "{dtype}"
        );
        assert!(head["outputs"][0].get("data").is_none());
        assert_eq!(
            &r.body[json_len..],
            &raw[..],
            "{dtype}: binary output bytes"
        );
    }
}

#[tokio::test]
async fn kserve_mixed_binary_and_json() {
    let s = server().await;
    // Binary `a`, JSON `b`; `sum` back as binary, `neg` as JSON.
    let a: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let header = json!({
        "inputs": [
            {"name": "a", "shape": [2, 2], "datatype": "FP32", "parameters": {"binary_data_size": 16}},
            {"name": "b", "shape": [2, 2], "datatype": "INT64", "data": [10, 20, 30, 40]}
        ],
        "outputs": [{"name": "sum", "parameters": {"binary_data": true}}, {"name": "neg", "parameters": {"binary_data": false}}]
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend_from_slice(&a);
    let r = s
        .post_raw(
            "/v2/models/two_io/infer",
            body,
            &[("inference-header-content-length", header.len().to_string())],
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let n: usize = r.headers["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let head: Value = serde_json::from_slice(&r.body[..n]).unwrap();
    assert_eq!(head["outputs"][0]["name"], "sum");
    assert_eq!(head["outputs"][1]["data"], json!([-1.0, -2.0, -3.0, -4.0]));
    let sum: Vec<f32> = r.body[n..]
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(sum, vec![11.0, 22.0, 33.0, 44.0]);
    // Only `neg` requested, as JSON: no binary part, no header.
    let (status, body) = s
        .post(
            "/v2/models/two_io/infer",
            json!({"inputs": [{"name": "a", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]},
                              {"name": "b", "shape": [1, 2], "datatype": "INT64", "data": [1, 2]}],
                   "outputs": [{"name": "neg"}]}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["outputs"].as_array().unwrap().len(), 1);
    assert_eq!(body["outputs"][0]["name"], "neg");
}

#[tokio::test]
async fn kserve_bad_requests_get_clear_errors() {
    let s = server().await;
    let x = |shape: Value, datatype: &str, data: Value| json!({"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": data}]});
    let cases: Vec<(&str, Value, u16, Vec<&str>)> = vec![
        (
            "/v2/models/nope/infer",
            x(json!([1, 2]), "FP32", json!([1, 2])),
            404,
            vec!["model `nope` not found"],
        ),
        (
            "/v2/models/affine/versions/9/infer",
            x(json!([1, 2]), "FP32", json!([1, 2])),
            404,
            vec!["no version 9"],
        ),
        (
            "/v2/models/affine/versions/zero/infer",
            x(json!([1, 2]), "FP32", json!([1, 2])),
            400,
            vec!["positive integer"],
        ),
        (
            "/v2/models/affine/infer",
            x(json!([1, 2]), "FP64", json!([1, 2])),
            400,
            vec!["`x`", "expected datatype FP32, got FP64"],
        ),
        (
            "/v2/models/affine/infer",
            x(json!([1, 3]), "FP32", json!([1, 2, 3])),
            400,
            vec!["`x`", "expected shape [-1, 2], got [1, 3]"],
        ),
        (
            "/v2/models/affine/infer",
            x(json!([1, 2]), "FP32", json!([1, 2, 3])),
            400,
            vec!["`x`", "the shape needs 2 elements but `data` has 3"],
        ),
        (
            "/v2/models/affine/infer",
            x(json!([1, 2]), "FP32", json!([1, "two"])),
            400,
            vec!["`x`", "element 1: expected a number, got a string"],
        ),
        (
            "/v2/models/affine/infer",
            x(json!([1, 2]), "FLOAT32", json!([1, 2])),
            400,
            vec!["`x`", "unknown datatype `FLOAT32`"],
        ),
        (
            "/v2/models/affine/infer",
            x(json!([-1, 2]), "FP32", json!([1, 2])),
            400,
            vec!["`x`", "negative dimension"],
        ),
        (
            "/v2/models/affine/infer",
            json!({"inputs": []}),
            400,
            vec!["missing input `x`"],
        ),
        (
            "/v2/models/affine/infer",
            json!({"inputs": [{"name": "z", "shape": [1], "datatype": "FP32", "data": [1]}]}),
            400,
            vec!["unknown input `z`", "`x`"],
        ),
        (
            "/v2/models/affine/infer",
            json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32"}]}),
            400,
            vec!["`x`", "no `data`"],
        ),
        (
            "/v2/models/affine/infer",
            json!({"outputs": []}),
            400,
            vec!["malformed inference request", "inputs"],
        ),
        (
            "/v2/models/affine/infer",
            json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}], "outputs": [{"name": "q"}]}),
            400,
            vec!["unknown output `q`"],
        ),
        (
            "/v2/models/affine/infer",
            json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}],
                   "outputs": [{"name": "y", "parameters": {"classification": 2}}]}),
            400,
            vec!["`classification` is not supported"],
        ),
        (
            "/v2/models/affine/infer",
            x(json!([0, 4294967296u64]), "FP32", json!([])),
            400,
            vec!["`x`", "dimension 4294967296 is too large"],
        ),
        (
            "/v2/models/broken/infer",
            x(json!([1, 2]), "FP32", json!([1, 2])),
            503,
            vec!["broken", "unavailable"],
        ),
        (
            "/v2/models/badconfig/infer",
            x(json!([1, 2]), "FP32", json!([1, 2])),
            503,
            vec!["config.toml", "version_policy"],
        ),
        (
            "/v2/models/..%2Fetc/infer",
            x(json!([1, 2]), "FP32", json!([1, 2])),
            400,
            vec!["invalid model name"],
        ),
    ];
    for (path, body, want, fragments) in cases {
        let (status, answer) = s.post(path, body.clone()).await;
        assert_error(status, &answer, want, &fragments);
    }
    // Malformed JSON.
    let (status, body) = s
        .post_raw("/v2/models/affine/infer", b"{\"inputs\": [".to_vec(), &[])
        .await
        .into_json();
    assert_error(status, &body, 400, &["malformed inference request"]);
    // Binary framing errors.
    let header = json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}).to_string();
    let mut short = header.clone().into_bytes();
    short.extend_from_slice(&[0; 4]);
    let (status, body) = s
        .post_raw(
            "/v2/models/affine/infer",
            short,
            &[("inference-header-content-length", header.len().to_string())],
        )
        .await
        .into_json();
    assert_error(
        status,
        &body,
        400,
        &["`x`", "binary_data_size is 8 but only 4 bytes"],
    );
    let mut long = header.clone().into_bytes();
    long.extend_from_slice(&[0; 12]);
    let (status, body) = s
        .post_raw(
            "/v2/models/affine/infer",
            long,
            &[("inference-header-content-length", header.len().to_string())],
        )
        .await
        .into_json();
    assert_error(
        status,
        &body,
        400,
        &["4 bytes of binary data", "no input claims them"],
    );
    let (status, body) = s
        .post_raw(
            "/v2/models/affine/infer",
            header.clone().into_bytes(),
            &[("inference-header-content-length", "99999".into())],
        )
        .await
        .into_json();
    assert_error(
        status,
        &body,
        400,
        &["Inference-Header-Content-Length is 99999"],
    );
    // The good model still answers after all of that.
    let (status, _) = s
        .post(
            "/v2/models/affine/infer",
            x(json!([1, 2]), "FP32", json!([1, 2])),
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn oversized_bodies_are_refused_with_413() {
    let repo = TempDir::new("limit");
    put_model(&repo.0, "affine", 1, &affine());
    let s = TestServer::start_with(repo, |c| ferry_server::ServeConfig {
        max_request_bytes: 1024,
        ..c
    })
    .await;
    let big = json!({"inputs": [{"name": "x", "shape": [200, 2], "datatype": "FP32", "data": vec![1.5; 400]}]});
    let (status, body) = s.post("/v2/models/affine/infer", big.clone()).await;
    assert_error(status, &body, 413, &["--max-request-bytes"]);
    let (status, body) = s
        .post(
            "/v1/models/affine:predict",
            json!({"instances": vec![[1.5, 2.5]; 200]}),
        )
        .await;
    assert_error(status, &body, 413, &["--max-request-bytes"]);
}

#[tokio::test]
async fn versions_labels_and_policies() {
    let s = server().await;
    let x = json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 0]}]});
    // y = 2k·1 − k·0 + 0.5 for version k.
    let (_, latest) = s.post("/v2/models/versioned/infer", x.clone()).await;
    assert_eq!(latest["model_version"], "2");
    assert_eq!(latest["outputs"][0]["data"], json!([4.5]));
    let (_, v1) = s
        .post("/v2/models/versioned/versions/1/infer", x.clone())
        .await;
    assert_eq!(v1["outputs"][0]["data"], json!([2.5]));
    let (status, _) = s
        .post("/v2/models/versioned/versions/3/infer", x.clone())
        .await;
    assert_eq!(status, 404, "version 3 is on disk but outside the policy");
    let (status, body) = s
        .post(
            "/v1/models/versioned/labels/stable:predict",
            json!({"instances": [[1.0, 0.0]]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"predictions": [[2.5]]}));
    let (_, body) = s
        .post(
            "/v1/models/versioned/labels/canary:predict",
            json!({"instances": [[1.0, 0.0]]}),
        )
        .await;
    assert_eq!(body, json!({"predictions": [[4.5]]}));
    let (_, body) = s
        .post(
            "/v1/models/versioned/versions/1:predict",
            json!({"instances": [[1.0, 0.0]]}),
        )
        .await;
    assert_eq!(body, json!({"predictions": [[2.5]]}));
    let (status, body) = s
        .post(
            "/v1/models/versioned/labels/beta:predict",
            json!({"instances": [[1.0, 0.0]]}),
        )
        .await;
    assert_error(status, &body, 400, &["no version label `beta`"]);
}

#[tokio::test]
async fn tfserving_status_and_metadata() {
    let s = server().await;
    let (status, body) = s.get("/v1/models/affine").await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"model_version_status": [{"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]})
    );
    let (_, body) = s.get("/v1/models/versioned").await;
    let versions: Vec<&str> = body["model_version_status"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_str().unwrap())
        .collect();
    assert_eq!(
        versions,
        vec!["2", "1"],
        "newest first, as TF Serving lists them"
    );
    let (_, body) = s.get("/v1/models/versioned/labels/stable").await;
    assert_eq!(body["model_version_status"][0]["version"], "1");
    let (_, body) = s.get("/v1/models/broken").await;
    assert_eq!(body["model_version_status"][0]["state"], "END");
    assert_eq!(
        body["model_version_status"][0]["status"]["error_code"],
        "UNKNOWN"
    );
    assert!(body["model_version_status"][0]["status"]["error_message"]
        .as_str()
        .unwrap()
        .contains("model failed to load"));
    let (status, body) = s.get("/v1/models/nope").await;
    assert_error(status, &body, 404, &["nope"]);
    let (status, body) = s.get("/v1/models/affine/versions/4").await;
    assert_error(status, &body, 404, &["version 4"]);

    let (status, meta) = s.get("/v1/models/affine/metadata").await;
    assert_eq!(status, 200);
    assert_eq!(
        meta["model_spec"],
        json!({"name": "affine", "signature_name": "", "version": "1"})
    );
    let sig = &meta["metadata"]["signature_def"]["signature_def"]["serving_default"];
    assert_eq!(sig["method_name"], "tensorflow/serving/predict");
    assert_eq!(
        sig["inputs"]["x"],
        json!({"dtype": "DT_FLOAT", "tensor_shape": {"dim": [{"size": "-1", "name": ""}, {"size": "2", "name": ""}], "unknown_rank": false}, "name": "x"})
    );
    assert_eq!(sig["outputs"]["y"]["dtype"], "DT_FLOAT");
}

#[tokio::test]
async fn tfserving_predict_row_and_columnar() {
    let s = server().await;
    // One output: predictions collapse to the output's rows.
    let (status, body) = s
        .post(
            "/v1/models/affine:predict",
            json!({"instances": [[1.0, 2.0], [3.0, 4.0]]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"predictions": [[0.5], [2.5]]}));
    let (_, body) = s
        .post(
            "/v1/models/affine:predict",
            json!({"instances": [{"x": [1.0, 2.0]}]}),
        )
        .await;
    assert_eq!(body, json!({"predictions": [[0.5]]}));
    let (_, body) = s
        .post(
            "/v1/models/affine:predict",
            json!({"inputs": [[1.0, 2.0], [3.0, 4.0]]}),
        )
        .await;
    assert_eq!(body, json!({"outputs": [[0.5], [2.5]]}));
    let (_, body) = s
        .post(
            "/v1/models/affine:predict",
            json!({"signature_name": "serving_default", "inputs": {"x": [[3.0, 4.0]]}}),
        )
        .await;
    assert_eq!(body, json!({"outputs": [[2.5]]}));
    // Several outputs: one object per instance (row) or per output (columnar).
    let (status, body) = s
        .post("/v1/models/two_io:predict", json!({"instances": [{"a": [1.0, 2.0], "b": [10, 20]}, {"a": [3.0, 4.0], "b": [30, 40]}]}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"predictions": [{"sum": [11.0, 22.0], "neg": [-1.0, -2.0]}, {"sum": [33.0, 44.0], "neg": [-3.0, -4.0]}]})
    );
    let (_, body) = s
        .post(
            "/v1/models/two_io:predict",
            json!({"inputs": {"a": [[1.0, 2.0]], "b": [[1, 1]]}}),
        )
        .await;
    assert_eq!(
        body,
        json!({"outputs": {"sum": [[2.0, 3.0]], "neg": [[-1.0, -2.0]]}})
    );
    // Strings, with {"b64": ...} accepted on the way in.
    let (status, body) = s
        .post(
            "/v1/models/id_bytes:predict",
            json!({"instances": [["a", {"b64": "aGk="}]]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"predictions": [["a", "hi"]]}));
}

#[tokio::test]
async fn tfserving_bad_requests() {
    let s = server().await;
    let cases: Vec<(&str, Value, u16, Vec<&str>)> = vec![
        (
            "/v1/models/affine:predict",
            json!({}),
            400,
            vec!["Missing 'inputs' or 'instances' key"],
        ),
        (
            "/v1/models/affine:predict",
            json!({"instances": [], }),
            400,
            vec!["No values in 'instances' array"],
        ),
        (
            "/v1/models/affine:predict",
            json!({"instances": [[1.0]], "inputs": [[1.0]]}),
            400,
            vec!["only one of 'inputs' or 'instances'"],
        ),
        (
            "/v1/models/affine:predict",
            json!({"instances": [[1.0, 2.0], [1.0]]}),
            400,
            vec!["`x`", "instance 1 has shape [1] but instance 0 has [2]"],
        ),
        (
            "/v1/models/affine:predict",
            json!({"instances": [[1.0, 2.0, 3.0]]}),
            400,
            vec!["`x`", "expected shape [-1, 2], got [1, 3]"],
        ),
        (
            "/v1/models/affine:predict",
            json!({"instances": [["a", "b"]]}),
            400,
            vec!["`x`", "expected a number, got a string"],
        ),
        (
            "/v1/models/affine:predict",
            json!({"signature_name": "other", "instances": [[1.0, 2.0]]}),
            400,
            vec!["\"other\" not found"],
        ),
        (
            "/v1/models/two_io:predict",
            json!({"instances": [[1.0, 2.0]]}),
            400,
            vec!["expecting list of objects"],
        ),
        (
            "/v1/models/two_io:predict",
            json!({"instances": [{"a": [1.0, 2.0]}]}),
            400,
            vec!["must have keys: a,b"],
        ),
        (
            "/v1/models/two_io:predict",
            json!({"inputs": {"a": [[1.0, 2.0]]}}),
            400,
            vec!["Missing named input: b"],
        ),
        (
            "/v1/models/nope:predict",
            json!({"instances": [[1.0]]}),
            404,
            vec!["nope"],
        ),
        (
            "/v1/models/broken:predict",
            json!({"instances": [[1.0]]}),
            503,
            vec!["unavailable"],
        ),
        (
            "/v1/models/affine:detect",
            json!({"instances": [[1.0]]}),
            400,
            vec!["Malformed request"],
        ),
        (
            "/v1/models/affine:classify",
            json!({"examples": [{"x": [1.0, 2.0]}]}),
            400,
            vec!["not a classifier"],
        ),
        (
            "/v1/models/classifier:classify",
            json!({"examples": [{"f0": 1.0}]}),
            400,
            vec!["missing feature `f1`"],
        ),
        (
            "/v1/models/classifier:classify",
            json!({"examples": [{"f0": 1.0, "f1": 1.0, "f2": 3.0}]}),
            400,
            vec!["unknown feature `f2`"],
        ),
        (
            "/v1/models/classifier:classify",
            json!({"instances": [[1.0, 1.0]]}),
            400,
            vec!["'examples' is expected"],
        ),
    ];
    for (path, body, want, fragments) in cases {
        let (status, answer) = s.post(path, body.clone()).await;
        assert_error(status, &answer, want, &fragments);
    }
    let (status, body) = s
        .post_raw("/v1/models/affine:predict", b"{oops".to_vec(), &[])
        .await
        .into_json();
    assert_error(status, &body, 400, &["JSON Parse error"]);
}

#[tokio::test]
async fn tfserving_classify_and_regress() {
    let s = server().await;
    let (status, body) = s
        .post(
            "/v1/models/classifier:classify",
            json!({"examples": [{"f0": 3.0, "f1": 0.0}, {"f0": 0.0, "f1": 3.0}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    let labels: Vec<&str> = results[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_str().unwrap())
        .collect();
    assert_eq!(labels, vec!["a", "b", "c"]);
    let best = |r: &Value| {
        r.as_array()
            .unwrap()
            .iter()
            .max_by(|a, b| a[1].as_f64().partial_cmp(&b[1].as_f64()).unwrap())
            .unwrap()[0]
            .clone()
    };
    assert_eq!(best(&results[0]), "a");
    assert_eq!(best(&results[1]), "b");
    let total: f64 = results[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[1].as_f64().unwrap())
        .sum();
    assert!((total - 1.0).abs() < 1e-5);
    // Context features merge into every example.
    let (_, body) = s
        .post(
            "/v1/models/classifier:classify",
            json!({"context": {"f1": 0.0}, "examples": [{"f0": 3.0}]}),
        )
        .await;
    assert_eq!(best(&body["results"][0]), "a");
    // A model without feature names takes the whole row under its input name.
    let (status, body) = s
        .post(
            "/v1/models/affine:regress",
            json!({"examples": [{"x": [1.0, 2.0]}, {"x": [3.0, 4.0]}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"results": [0.5, 2.5]}));
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests() {
    let repo = TempDir::new("shutdown");
    put_model(&repo.0, "heavy", 1, &heavy(24));
    let mut s = TestServer::start(repo).await;
    let rows = 256;
    let body = json!({"inputs": [{"name": "x", "shape": [rows, 512], "datatype": "FP32", "data": vec![0.5f32; rows * 512]}],
                      "outputs": [{"name": "h24", "parameters": {"binary_data": true}}]})
    .to_string();
    let started = std::time::Instant::now();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let client = s.client.clone();
    let url = s.url("/v2/models/heavy/infer");
    let in_flight = tokio::spawn(async move {
        let _ = tx.send(());
        client
            .post(url)
            .body(body)
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    rx.await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    s.shutdown();
    // Readiness turns false at once, while the request is still running.
    let mut saw_not_ready = false;
    for _ in 0..50 {
        if !s.infer.health.is_ready() {
            saw_not_ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    assert!(
        saw_not_ready,
        "readiness must turn false when shutdown begins"
    );
    let status = in_flight
        .await
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(status, 200);
    let handle = std::mem::replace(&mut s.handle, tokio::spawn(async { Ok(()) }));
    handle.await.unwrap().unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    // The listener is closed: new connections fail.
    assert!(reqwest::get(s.url("/v2/health/live")).await.is_err());
}

#[tokio::test]
async fn requests_past_the_timeout_get_504() {
    let repo = TempDir::new("timeout");
    // About 52 GFLOP per request (13 GFLOP finished within 100 ms once on an idle 2-core machine): far longer than the timeout on any machine, while the affine model takes
    // microseconds, well within it even on a loaded one.
    put_model(&repo.0, "heavy", 1, &heavy(384));
    put_model(&repo.0, "affine", 1, &affine());
    let s = TestServer::start_with(repo, |c| ferry_server::ServeConfig {
        request_timeout: std::time::Duration::from_millis(100),
        ..c
    })
    .await;
    let rows = 256;
    let body = json!({"inputs": [{"name": "x", "shape": [rows, 512], "datatype": "FP32", "data": vec![0.5f32; rows * 512]}],
                      "outputs": [{"name": "h384", "parameters": {"binary_data": true}}]});
    let (status, answer) = s.post("/v2/models/heavy/infer", body).await;
    assert_error(status, &answer, 504, &["did not finish within 100 ms"]);
    let (status, _) = s
        .post(
            "/v2/models/affine/infer",
            json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}),
        )
        .await;
    assert_eq!(status, 200, "other models keep serving");
}

#[tokio::test]
async fn engine_choice_per_model() {
    let repo = TempDir::new("engines");
    put_model(&repo.0, "on_ort", 1, &affine());
    put_file(
        &repo.0,
        "on_ort",
        "config.toml",
        "engine = \"onnxruntime\"\ngraph_optimization_level = \"disable\"\n",
    );
    put_model(&repo.0, "on_tract", 1, &affine());
    put_file(&repo.0, "on_tract", "config.toml", "engine = \"tract\"\n");
    let s = TestServer::start(repo).await;
    let x = json!({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]});
    let (status, ort) = s.post("/v2/models/on_ort/infer", x.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(
        s.get("/v2/models/on_ort").await.1["platform"],
        "onnxruntime_onnx"
    );
    let (status, tract) = s.post("/v2/models/on_tract/infer", x).await;
    if cfg!(feature = "tract") {
        assert_eq!(status, 200, "{tract}");
        assert_eq!(
            tract["outputs"], ort["outputs"],
            "tract and ONNX Runtime agree"
        );
        assert_eq!(
            s.get("/v2/models/on_tract").await.1["platform"],
            "tract_onnx"
        );
    } else {
        assert_error(
            status,
            &tract,
            503,
            &["needs a build with the `tract` feature"],
        );
    }
}

#[tokio::test]
async fn failures_before_a_version_count_under_the_model_named() {
    let s = server().await;
    let ok =
        json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]});
    // A known model with no ready version, over both REST protocols.
    assert_eq!(s.post("/v2/models/broken/infer", ok.clone()).await.0, 503);
    assert_eq!(
        s.post(
            "/v1/models/broken:predict",
            json!({"instances": [[1.0, 2.0]]})
        )
        .await
        .0,
        503
    );
    // A request refused before its version is resolved.
    let r = s
        .client
        .post(s.url("/v2/models/affine/infer"))
        .header("content-encoding", "gzip")
        .json(&ok)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 501);
    let text = s.metrics_text().await;
    for line in [
        r#"ferry_requests_total{model="broken",version="",protocol="rest_kserve",outcome="unavailable"} 1"#,
        r#"ferry_requests_total{model="broken",version="",protocol="rest_tfserving",outcome="unavailable"} 1"#,
        r#"ferry_requests_total{model="affine",version="",protocol="rest_kserve",outcome="unimplemented"} 1"#,
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in\n{text}"
        );
    }
}

#[tokio::test]
async fn metrics_count_what_was_sent() {
    let s = server().await;
    let ok =
        json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]});
    let bad =
        json!({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]});
    for _ in 0..3 {
        assert_eq!(s.post("/v2/models/affine/infer", ok.clone()).await.0, 200);
    }
    assert_eq!(s.post("/v2/models/affine/infer", bad).await.0, 400);
    assert_eq!(
        s.post("/v2/models/no_such_model/infer", ok.clone()).await.0,
        404
    );
    assert_eq!(
        s.post(
            "/v1/models/affine:predict",
            json!({"instances": [[1.0, 2.0]]})
        )
        .await
        .0,
        200
    );
    let r = s.client.get(s.url("/metrics")).send().await.unwrap();
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = r.text().await.unwrap();
    let has = |line: &str| {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in\n{text}"
        )
    };
    has(
        r#"ferry_requests_total{model="affine",version="1",protocol="rest_kserve",outcome="success"} 3"#,
    );
    has(
        r#"ferry_requests_total{model="affine",version="1",protocol="rest_kserve",outcome="invalid_argument"} 1"#,
    );
    has(
        r#"ferry_requests_total{model="",version="",protocol="rest_kserve",outcome="not_found"} 1"#,
    );
    has(
        r#"ferry_requests_total{model="affine",version="1",protocol="rest_tfserving",outcome="success"} 1"#,
    );
    has(
        r#"ferry_request_duration_seconds_count{model="affine",version="1",protocol="rest_kserve"} 4"#,
    );
    has(r#"ferry_batch_size_count{model="affine",version="1"} 4"#);
    has(r#"ferry_model_state{model="broken",version="1",state="UNAVAILABLE"} 1"#);
    has(r#"ferry_model_state{model="affine",version="1",state="READY"} 1"#);
    has(r#"ferry_model_load_failures_total{model="broken"} 1"#);
    assert!(
        !text.contains("no_such_model"),
        "unknown names never become label values"
    );
}

#[tokio::test]
async fn openmetrics_on_request_response_bytes_and_triton_families() {
    let s = TestServer::start_with(repository(), |c| ferry_server::ServeConfig {
        metrics: ferry_server::metrics::MetricsOptions {
            enabled: true,
            triton: true,
        },
        ..c
    })
    .await;
    let ok = json!({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]});
    let (status, body) = s.post("/v2/models/affine/infer", ok.clone()).await;
    assert_eq!(status, 200);
    let response_len = serde_json::to_vec(&body).unwrap().len();
    let bad =
        json!({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]});
    assert_eq!(s.post("/v2/models/affine/infer", bad).await.0, 400);
    let r = s
        .client
        .get(s.url("/metrics"))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = r.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    let has = |line: &str| {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in\n{text}"
        )
    };
    has("# TYPE ferry_requests counter");
    has(
        r#"ferry_requests_total{model="affine",version="1",protocol="rest_kserve",outcome="success"} 1"#,
    );
    has("# UNIT ferry_response_bytes bytes");
    // The JSON answer was re-serialized above, byte for byte the same length as what was sent.
    has(&format!(
        r#"ferry_response_bytes_total{{model="affine",protocol="rest_kserve"}} {response_len}"#
    ));
    has("# TYPE nv_inference_request_success unknown");
    has(r#"nv_inference_request_success{model="affine",version="1"} 1"#);
    has(r#"nv_inference_request_failure{model="affine",version="1"} 1"#);
    has(r#"nv_inference_count{model="affine",version="1"} 2"#);
    has(r#"nv_inference_exec_count{model="affine",version="1"} 1"#);
    has(r#"nv_inference_pending_request_count{model="affine",version="1"} 0"#);
    // Without the header: the Prometheus text format, Triton's counters typed as counters.
    let r = s.client.get(s.url("/metrics")).send().await.unwrap();
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = r.text().await.unwrap();
    assert!(text.contains("# TYPE nv_inference_queue_duration_us counter\n"));
    assert!(text.contains("# TYPE ferry_requests_total counter\n"));
    assert!(!text.contains("# EOF"));
}

#[tokio::test]
async fn no_metrics_records_no_requests() {
    let s = TestServer::start_with(repository(), |c| ferry_server::ServeConfig {
        metrics: ferry_server::metrics::MetricsOptions {
            enabled: false,
            triton: false,
        },
        ..c
    })
    .await;
    let ok =
        json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]});
    let r = s
        .client
        .post(s.url("/v2/models/affine/infer"))
        .json(&ok)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers().contains_key("x-total-time-us"),
        "timing headers stay"
    );
    let text = s.metrics_text().await;
    assert!(!text.contains("ferry_requests_total{"), "{text}");
    assert!(text.contains(r#"ferry_model_state{model="affine",version="1",state="READY"} 1"#));
}

#[tokio::test]
async fn shape_overrides_are_checked_at_load() {
    let repo = TempDir::new("overrides");
    put_model(&repo.0, "rank", 1, &affine());
    put_file(&repo.0, "rank", "config.toml", "[inputs.x]\nshape = [4]\n");
    put_model(&repo.0, "fixed", 1, &affine());
    put_file(
        &repo.0,
        "fixed",
        "config.toml",
        "[inputs.x]\nshape = [-1, 3]\n",
    );
    put_model(&repo.0, "narrowed", 1, &affine());
    put_file(
        &repo.0,
        "narrowed",
        "config.toml",
        "[inputs.x]\nshape = [1, 2]\n",
    );
    let s = TestServer::start(repo).await;
    let x = json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]});
    let (status, body) = s.post("/v2/models/rank/infer", x.clone()).await;
    assert_error(status, &body, 503, &["inputs.x.shape [4]", "rank is 2"]);
    let (status, body) = s.post("/v2/models/fixed/infer", x.clone()).await;
    assert_error(status, &body, 503, &["fixes a dimension at 2"]);
    assert_eq!(s.post("/v2/models/narrowed/infer", x).await.0, 200);
    let two_rows = json!({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]});
    let (status, body) = s.post("/v2/models/narrowed/infer", two_rows).await;
    assert_error(status, &body, 400, &["expected shape [1, 2], got [2, 2]"]);
}

#[tokio::test]
async fn drift_against_the_training_baseline() {
    let repo = TempDir::new("drift");
    put_model(&repo.0, "affine", 1, &affine());
    // Training data: both features uniform over [0, 10).
    let stats = |name: &str| json!({"name": name, "histogram": {"edges": (0..=10).collect::<Vec<_>>(), "counts": vec![10; 10]}});
    put_file(
        &repo.0,
        "affine",
        "1/ferry.json",
        &json!({"feature_stats": [stats("a"), stats("b")]}).to_string(),
    );
    put_file(&repo.0, "affine", "config.toml", "drift_window = 500\n");
    put_model(&repo.0, "plain", 1, &affine());
    let s = TestServer::start(repo).await;
    let send = |shift: f32| {
        let data: Vec<f32> = (0..100)
            .flat_map(|i| [(i % 10) as f32 + 0.5, (i % 10) as f32 + 0.5 + shift])
            .collect();
        json!({"inputs": [{"name": "x", "shape": [100, 2], "datatype": "FP32", "data": data}]})
    };
    for _ in 0..5 {
        assert_eq!(s.post("/v2/models/affine/infer", send(0.0)).await.0, 200);
    }
    let (status, report) = s.get("/v2/models/affine/drift").await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["window_rows"], 500);
    for f in report["features"].as_array().unwrap() {
        assert!(
            f["psi"].as_f64().unwrap() < 0.01 && f["drifted"] == false,
            "{report}"
        );
    }
    // Feature b moves by +6: most of its values now fall in the training data's top bin.
    for _ in 0..5 {
        assert_eq!(s.post("/v2/models/affine/infer", send(6.0)).await.0, 200);
    }
    let (_, report) = s.get("/v2/models/affine/versions/1/drift").await;
    let features = report["features"].as_array().unwrap();
    assert_eq!(features[0]["name"], "a");
    assert_eq!(features[0]["drifted"], false, "{report}");
    assert_eq!(features[1]["drifted"], true, "{report}");
    assert!(features[1]["psi"].as_f64().unwrap() > 0.2);
    let text = s.metrics_text().await;
    let psi_b = text
        .lines()
        .find(|l| {
            l.starts_with(r#"ferry_feature_drift_psi{model="affine",version="1",feature="b"}"#)
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .expect("a PSI gauge for feature b");
    assert!(psi_b > 0.2);
    let (status, body) = s.get("/v2/models/plain/drift").await;
    assert_error(status, &body, 404, &["no drift baseline"]);
}

#[tokio::test]
async fn payload_log_keeps_a_sample_without_blocking() {
    let repo = TempDir::new("payload");
    put_model(&repo.0, "two_io", 1, &two_io());
    let log = repo.0.join("logs/payload.jsonl");
    let config = ferry_server::payload_log::PayloadLogConfig {
        path: log.clone(),
        sample_rate: 0.5,
        max_bytes: 1 << 20,
        keep: 2,
        redact: vec!["b".into()],
    };
    let s = TestServer::start_with(repo, |c| ferry_server::ServeConfig {
        payload_log: Some(config),
        ..c
    })
    .await;
    for i in 0..10 {
        let body = json!({"id": format!("req-{i}"),
                          "inputs": [{"name": "a", "shape": [1, 2], "datatype": "FP32", "data": [i, 1]},
                                     {"name": "b", "shape": [1, 2], "datatype": "INT64", "data": [7, 7]}]});
        assert_eq!(s.post("/v2/models/two_io/infer", body).await.0, 200);
    }
    let mut lines = Vec::new();
    for _ in 0..100 {
        lines = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        if lines.len() == 5 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(lines.len(), 5, "one request in two is logged");
    let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first["model"], "two_io");
    assert_eq!(first["version"], 1);
    assert!(first["id"].as_str().unwrap().starts_with("req-"));
    assert_eq!(first["inputs"]["b"]["data"], "[redacted]");
    assert_eq!(first["inputs"]["a"]["datatype"], "FP32");
    assert!(first["outputs"]["sum"]["data"].is_array());
    let text = s.metrics_text().await;
    assert!(
        text.lines()
            .any(|l| l == r#"ferry_payload_log_records_total{outcome="queued"} 5"#),
        "{text}"
    );
}

#[tokio::test]
async fn metrics_can_have_their_own_port() {
    let repo = TempDir::new("metrics-port");
    put_model(&repo.0, "affine", 1, &affine());
    let s = TestServer::start_with(repo, |c| ferry_server::ServeConfig {
        metrics_port: Some(0),
        ..c
    })
    .await;
    let own = s.metrics.clone().expect("a metrics listener");
    assert_ne!(own, s.base);
    let page = s
        .client
        .get(format!("{own}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("# TYPE ferry_requests_total counter"));
    let r = s
        .client
        .post(format!("{own}/v2/models/affine/infer"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "the metrics port serves nothing else");
}

/// The listener takes plain inference paths directly and sends every other spelling (here percent-escapes) through
/// the router: both give the same answers, errors included, and both echo the request id.
#[tokio::test]
async fn direct_and_routed_inference_answer_alike() {
    let repo = TempDir::new("direct");
    put_model(&repo.0, "affine", 1, &affine());
    let s = TestServer::start_with(repo, |c| ferry_server::ServeConfig {
        max_request_bytes: 4096,
        ..c
    })
    .await;
    let input = |name: &str, datatype: &str| {
        json!({"id": "7", "inputs": [{"name": name, "shape": [1, 2], "datatype": datatype, "data": [1, 2]}]})
            .to_string()
            .into_bytes()
    };
    let bodies = [
        input("x", "FP32"),
        input("x", "INT64"),
        input("nope", "FP32"),
        b"{\"inputs\": [".to_vec(),
        vec![b' '; 8192],
    ];
    let pairs = [
        ("/v2/models/affine/infer", "/v2/models/%61ffine/infer"),
        (
            "/v2/models/affine/versions/1/infer",
            "/v2/models/affine/versions/%31/infer",
        ),
        ("/v2/models/missing/infer", "/v2/models/m%69ssing/infer"),
    ];
    let mut statuses = Vec::new();
    for (direct, routed) in pairs {
        for body in &bodies {
            let id = [("x-request-id", "abc".to_string())];
            let a = s.post_raw(direct, body.clone(), &id).await;
            let b = s.post_raw(routed, body.clone(), &id).await;
            assert_eq!(a.status, b.status, "{direct} vs {routed}");
            assert_eq!(
                String::from_utf8_lossy(&a.body),
                String::from_utf8_lossy(&b.body),
                "{direct} vs {routed}"
            );
            for r in [&a, &b] {
                assert_eq!(r.headers["x-request-id"], "abc");
            }
            statuses.push(a.status);
        }
    }
    assert_eq!(
        statuses,
        [200, 400, 400, 400, 413, 200, 400, 400, 400, 413, 404, 404, 404, 404, 413]
    );
}

#[tokio::test]
async fn a_wrong_repository_layout_is_explained_where_versions_are_missing() {
    let repo = TempDir::new("layout");
    // model.onnx straight in the model folder, a version spelled with a leading zero, and a version folder
    // without its model: none of them loads, and each says what was expected.
    std::fs::create_dir_all(repo.0.join("flat")).unwrap();
    std::fs::write(repo.0.join("flat/model.onnx"), affine()).unwrap();
    std::fs::create_dir_all(repo.0.join("zero/01")).unwrap();
    std::fs::write(repo.0.join("zero/01/model.onnx"), affine()).unwrap();
    std::fs::create_dir_all(repo.0.join("empty/1")).unwrap();
    // The repository pointed at one model's folder: its version folder `1` looks like a model.
    std::fs::create_dir_all(repo.0.join("7")).unwrap();
    std::fs::write(repo.0.join("7/model.onnx"), affine()).unwrap();
    put_model(&repo.0, "fine", 1, &affine());
    let s = TestServer::start(repo).await;
    let x = json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]});
    let (status, _) = s.post("/v2/models/fine/infer", x.clone()).await;
    assert_eq!(status, 200);
    for (model, expected) in [
        (
            "flat",
            "flat/model.onnx is not in a version folder (versions are numbered folders: flat/1/model.onnx)",
        ),
        ("zero", "version folder zero/01 is skipped: name it 1 (no leading zeros)"),
        ("empty", "version folder empty/1 has no model.onnx, model.gguf"),
        ("7", "looks like one model's folder"),
    ] {
        let (status, body) = s.post(&format!("/v2/models/{model}/infer"), x.clone()).await;
        assert_error(status, &body, 503, &["has no version to serve", expected]);
    }
}

#[tokio::test]
async fn thread_counts_beyond_the_machine_make_the_model_unavailable_not_the_server() {
    let repo = TempDir::new("threads");
    // ONNX Runtime crashed the whole process at intra_op_threads = 100000; now the value never reaches it.
    put_model(&repo.0, "greedy", 1, &affine());
    put_file(
        &repo.0,
        "greedy",
        "config.toml",
        "intra_op_threads = 100000\n",
    );
    put_model(&repo.0, "fine", 1, &affine());
    let s = TestServer::start(repo).await;
    let x = json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]});
    assert_eq!(s.post("/v2/models/fine/infer", x.clone()).await.0, 200);
    let (status, body) = s.post("/v2/models/greedy/infer", x).await;
    assert_error(
        status,
        &body,
        503,
        &[
            "version 1 is unavailable",
            "config.toml: intra_op_threads must be between 1 and",
        ],
    );
}

#[tokio::test]
async fn slow_uploads_hold_no_permit_and_probes_never_wait() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let repo = TempDir::new("admission");
    put_model(&repo.0, "affine", 1, &affine());
    let client_timeout = std::time::Duration::from_millis(1000);
    let s = TestServer::start_with(repo, |c| ferry_server::ServeConfig {
        max_concurrent_requests: 2,
        client_timeout,
        request_timeout: std::time::Duration::from_secs(4),
        ..c
    })
    .await;
    let addr = s.base.trim_start_matches("http://").to_string();
    // Four uploads that trickle a byte every half client timeout, two on the direct path and two through the router
    // (a percent-escaped path): none stalls long enough to be cut, none ever finishes.
    let mut uploads = Vec::new();
    for path in [
        "/v2/models/affine/infer",
        "/v2/models/%61ffine/infer",
        "/v2/models/affine/infer",
        "/v2/models/%61ffine/infer",
    ] {
        let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{");
        tcp.write_all(head.as_bytes()).await.unwrap();
        uploads.push(tokio::spawn(async move {
            let started = std::time::Instant::now();
            let mut answer = Vec::new();
            loop {
                let mut buf = [0u8; 4096];
                tokio::select! {
                    () = tokio::time::sleep(client_timeout / 2) => {
                        if tcp.write_all(b" ").await.is_err() {
                            break;
                        }
                    }
                    n = tcp.read(&mut buf) => match n {
                        Ok(n) if n > 0 => {
                            answer.extend_from_slice(&buf[..n]);
                            if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
                                break;
                            }
                        }
                        _ => break,
                    },
                }
            }
            (started.elapsed(), String::from_utf8_lossy(&answer).to_string())
        }));
    }
    tokio::time::sleep(client_timeout).await;
    let quick = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(1))
        .build()
        .unwrap();
    for path in [
        "/v2/health/ready",
        "/v2/health/live",
        "/metrics",
        "/v2/models/affine/ready",
    ] {
        let r = quick.get(s.url(path)).send().await;
        assert_eq!(r.map(|r| r.status().as_u16()).ok(), Some(200), "{path}");
    }
    let body =
        json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]});
    for path in ["/v2/models/affine/infer", "/v2/models/%61ffine/infer"] {
        let r = quick.post(s.url(path)).json(&body).send().await;
        assert_eq!(r.map(|r| r.status().as_u16()).ok(), Some(200), "{path}");
    }
    // A body must also arrive whole within --request-timeout: the uploads end with 400 then.
    for upload in uploads {
        let (elapsed, answer) = upload.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("within --request-timeout"), "{answer}");
        assert!(elapsed < std::time::Duration::from_secs(8), "{elapsed:?}");
    }
}

#[tokio::test]
async fn every_router_error_is_json() {
    let s = server().await;
    // Path segments that are not UTF-8 once percent-decoded: axum's rejection was plain text.
    for (method, path) in [
        ("GET", "/v2/models/%FF/ready"),
        ("GET", "/v2/models/%FF"),
        ("GET", "/v2/models/affine/versions/%C3%28"),
        ("POST", "/v2/models/%FF/infer"),
        ("POST", "/v2/models/affine/versions/%FF/infer"),
        ("GET", "/v1/models/%FF"),
        ("POST", "/v1/models/%FF:predict"),
    ] {
        let r = s
            .client
            .request(method.parse().unwrap(), s.url(path))
            .body("{}")
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        assert_eq!(
            r.headers()["content-type"],
            "application/json",
            "{method} {path}"
        );
        let body: Value = r.json().await.unwrap();
        assert_error(status, &body, 400, &["UTF-8"]);
    }
    // The fallbacks.
    let (status, body) = s.get("/nowhere").await;
    assert_error(status, &body, 404, &["no such endpoint"]);
    let r = s
        .client
        .delete(s.url("/v2/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert_eq!(r.headers()["allow"], "GET,HEAD");
    let body: Value = r.json().await.unwrap();
    assert!(body["error"].is_string(), "{body}");
}

#[tokio::test]
async fn requests_hyper_cannot_parse_get_json_errors() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = server().await;
    let addr = s.base.trim_start_matches("http://").to_string();
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000));
    let big_header = format!(
        "GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(500_000)
    );
    for (request, status, fragment) in [
        (
            "GET /v2 HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n".to_string(),
            400,
            "parsed",
        ),
        (
            "GET /v2 HTTP/1.1\r\nHo st: x\r\n\r\n".to_string(),
            400,
            "parsed",
        ),
        (long_uri, 414, "URI"),
        (big_header, 431, "headers"),
    ] {
        let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        // The server may answer and close before it has read all of a large request.
        let _ = tcp.write_all(request.as_bytes()).await;
        let mut answer = Vec::new();
        let _ = tcp.read_to_end(&mut answer).await;
        let answer = String::from_utf8(answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{head}");
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let body: Value = serde_json::from_str(body).unwrap();
        assert!(body["error"].as_str().unwrap().contains(fragment), "{body}");
    }
    // The connection's ordinary answers are untouched, and the server still serves.
    let (status, _) = s.get("/v2/health/ready").await;
    assert_eq!(status, 200);
}
