//! Security tests on a real server: signed versions with trusted keys (tampered, unsigned, untrusted), external
//! data outside the version folder and oversized models refused before the engine, external data inside it
//! served and covered by the signature and the size limit, and path traversal through model names, versions and
//! labels in REST paths (sent raw, byte for byte) and gRPC requests.

mod common;

use common::*;
use ferry_model::onnx::{GraphBuilder, TensorProto};
use ferry_model::DataType;
use ferry_server::integrity::{sign_version, IntegrityPolicy, SigningKey};
use ferry_server::protocol::grpc::inference::{
    grpc_inference_service_client::GrpcInferenceServiceClient, ModelInferRequest,
    ModelMetadataRequest, ModelReadyRequest,
};
use ferry_server::protocol::grpc::tensorflow::serving::{
    model_service_client::ModelServiceClient, model_spec::VersionChoice,
    prediction_service_client::PredictionServiceClient, GetModelStatusRequest, ModelSpec,
    PredictRequest,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The reason a model's only version is not available (TF Serving's status), or "" when it is.
async fn reason(s: &TestServer, model: &str) -> String {
    let (status, body) = s.get(&format!("/v1/models/{model}")).await;
    assert_eq!(status, 200, "{model}: {body}");
    body["model_version_status"][0]["status"]["error_message"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn infers(s: &TestServer, model: &str) -> u16 {
    s.post(
        &format!("/v2/models/{model}/infer"),
        serde_json::json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}),
    )
    .await
    .0
}

/// A server over `repo` that loads only versions signed by `key`.
async fn trusting(repo: TempDir, key: &SigningKey) -> TestServer {
    TestServer::start_with(repo, |c| ferry_server::ServeConfig {
        integrity: IntegrityPolicy {
            trusted_keys: vec![key.public_key()],
            ..IntegrityPolicy::default()
        },
        ..c
    })
    .await
}

#[tokio::test]
async fn only_versions_signed_by_a_trusted_key_load() {
    let repo = TempDir::new("signed");
    let trusted = SigningKey::from_seed(&[11; 32]);
    let stranger = SigningKey::from_seed(&[12; 32]);
    let meta = r#"{"features": ["a", "b"]}"#;
    for name in [
        "good", "flipped", "meta", "unsigned", "stranger", "added", "copied",
    ] {
        put_model(&repo.0, name, 1, &affine());
        put_file(&repo.0, name, "1/ferry.json", meta);
    }
    let dir = |name: &str| repo.0.join(name).join("1");
    for name in ["good", "flipped", "meta", "added"] {
        sign_version(&dir(name), name, 1, &trusted).unwrap();
    }
    sign_version(&dir("stranger"), "stranger", 1, &stranger).unwrap();
    // Signed as `good`, then copied under another name.
    std::fs::copy(
        dir("good").join("ferry.sig"),
        dir("copied").join("ferry.sig"),
    )
    .unwrap();
    // Flip one byte of the model, change ferry.json, add a warm-up request.
    let mut bytes = std::fs::read(dir("flipped").join("model.onnx")).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(dir("flipped").join("model.onnx"), bytes).unwrap();
    put_file(
        &repo.0,
        "meta",
        "1/ferry.json",
        r#"{"features": ["b", "a"]}"#,
    );
    put_file(&repo.0, "added", "1/warmup/x.json", "{}");

    let s = trusting(repo, &trusted).await;
    assert_eq!(reason(&s, "good").await, "");
    assert_eq!(infers(&s, "good").await, 200);
    for (name, why) in [
        ("flipped", "model.onnx changed after signing"),
        ("meta", "ferry.json changed after signing"),
        ("added", "warmup/x.json was added after signing"),
        ("unsigned", "not signed"),
        ("stranger", "not a trusted key"),
        ("copied", "signed for good version 1, not copied version 1"),
    ] {
        let r = reason(&s, name).await;
        assert!(r.contains(why), "{name}: {r}");
        assert_eq!(infers(&s, name).await, 503, "{name}");
    }
}

#[tokio::test]
async fn without_trusted_keys_signatures_are_not_required() {
    let repo = TempDir::new("unsigned-ok");
    put_model(&repo.0, "m", 1, &affine());
    let s = TestServer::start(repo).await;
    assert_eq!(infers(&s, "m").await, 200);
}

fn external(location: &str) -> Vec<u8> {
    GraphBuilder::new("g")
        .input("x", DataType::F32, Some(&[-1, 2]))
        .output("y", DataType::F32, Some(&[-1, 2]))
        .initializer(TensorProto::external("w", DataType::F32, &[2], location))
        .node("Add", &["x", "w"], &["y"], vec![])
        .to_bytes()
}

/// `w` = [10, 20] as the bytes of an external data file.
fn weights() -> Vec<u8> {
    [10f32, 20.0].iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[tokio::test]
async fn external_data_outside_the_version_and_oversized_models_never_reach_the_engine() {
    let repo = TempDir::new("external");
    put_model(&repo.0, "dotdot", 1, &external("../../etc/passwd"));
    put_model(&repo.0, "absolute", 1, &external("/etc/passwd"));
    put_model(&repo.0, "inside", 1, &external("weights.bin"));
    std::fs::write(repo.0.join("inside/1/weights.bin"), weights()).unwrap();
    put_model(&repo.0, "missing", 1, &external("weights.bin"));
    // A small graph whose data file makes the model too big.
    put_model(&repo.0, "bigdata", 1, &external("weights.bin"));
    #[cfg(unix)]
    {
        put_model(&repo.0, "link", 1, &external("w.bin"));
        std::os::unix::fs::symlink("/etc/passwd", repo.0.join("link/1/w.bin")).unwrap();
    }
    let big: Vec<u8> = heavy(40);
    put_model(&repo.0, "big", 1, &big);
    put_model(&repo.0, "small", 1, &affine());
    let limit = affine().len().max(big.len() - 1) as u64;
    std::fs::write(
        repo.0.join("bigdata/1/weights.bin"),
        vec![0u8; limit as usize],
    )
    .unwrap();
    assert!((affine().len() as u64) <= limit && (big.len() as u64) > limit);
    let s = TestServer::start_with(repo, |c| ferry_server::ServeConfig {
        integrity: IntegrityPolicy {
            max_model_bytes: limit,
            ..IntegrityPolicy::default()
        },
        ..c
    })
    .await;
    for (name, why) in [
        ("dotdot", "outside the version directory (a `..` component)"),
        (
            "absolute",
            "outside the version directory (an absolute path)",
        ),
        (
            "missing",
            "cannot read the external data file weights.bin that model.onnx names",
        ),
        (
            "bigdata",
            "model.onnx and its external data (weights.bin) are",
        ),
        ("big", "larger than the"),
    ] {
        let r = reason(&s, name).await;
        assert!(r.contains(why), "{name}: {r}");
    }
    #[cfg(unix)]
    {
        let r = reason(&s, "link").await;
        assert!(r.contains("a symbolic link to /etc/passwd"), "{r}");
    }
    assert_eq!(infers(&s, "small").await, 200);
    // Data inside the version folder loads, read from there (not from the working directory).
    let (status, body) = s
        .post(
            "/v2/models/inside/infer",
            serde_json::json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outputs"][0]["data"], serde_json::json!([11.0, 22.0]));
}

/// tract loads self-contained models only, and says so (ONNX Runtime serves the same version).
#[cfg(feature = "tract")]
#[tokio::test]
async fn tract_refuses_external_data_by_name() {
    let repo = TempDir::new("external-tract");
    for name in ["tract", "ort"] {
        put_model(&repo.0, name, 1, &external("weights.bin"));
        std::fs::write(repo.0.join(name).join("1/weights.bin"), weights()).unwrap();
    }
    put_file(&repo.0, "tract", "config.toml", "engine = \"tract\"\n");
    let s = TestServer::start(repo).await;
    let r = reason(&s, "tract").await;
    assert!(
        r.contains("which only the ONNX Runtime engine loads"),
        "{r}"
    );
    assert_eq!(infers(&s, "ort").await, 200);
}

#[tokio::test]
async fn a_signature_covers_external_data() {
    let repo = TempDir::new("external-signed");
    let key = SigningKey::from_seed(&[13; 32]);
    for name in ["good", "flipped", "added"] {
        put_model(&repo.0, name, 1, &external("data/weights.bin"));
        std::fs::create_dir_all(repo.0.join(name).join("1/data")).unwrap();
        std::fs::write(repo.0.join(name).join("1/data/weights.bin"), weights()).unwrap();
        sign_version(&repo.0.join(name).join("1"), name, 1, &key).unwrap();
    }
    let mut flipped = weights();
    flipped[7] ^= 1;
    std::fs::write(repo.0.join("flipped/1/data/weights.bin"), flipped).unwrap();
    put_file(&repo.0, "added", "1/data/more.bin", "x");
    let s = trusting(repo, &key).await;
    assert_eq!(reason(&s, "good").await, "");
    assert_eq!(infers(&s, "good").await, 200);
    for (name, why) in [
        ("flipped", "data/weights.bin changed after signing"),
        ("added", "data/more.bin was added after signing"),
    ] {
        let r = reason(&s, name).await;
        assert!(r.contains(why), "{name}: {r}");
    }
}

/// Sends one raw HTTP/1.1 request (the path exactly as given, no client-side normalization) and returns the
/// status and body.
async fn raw(s: &TestServer, method: &str, path: &str, body: &str) -> (u16, String) {
    let addr = s.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

#[tokio::test]
async fn traversal_in_rest_paths_names_nothing_outside_the_table() {
    let repo = TempDir::new("traversal");
    put_model(&repo.0, "m", 1, &affine());
    put_file(&repo.0, "m", "config.toml", "[labels]\nstable = 1\n");
    let s = TestServer::start(repo).await;
    let body = r#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}]}"#;
    let tf_body = r#"{"instances":[[1,2]]}"#;
    let escapes = [
        "..%2F..%2Fetc",
        "..%2f..%2f..%2fetc%2fpasswd",
        "%2e%2e",
        "%2e%2e%2f%2e%2e%2fetc",
        "%2Fetc%2Fpasswd",
        "..",
        ".",
        "m%00",
        "m%2F..%2F..",
        "%5C..%5C..%5Cetc",
    ];
    for bad in escapes {
        for (method, path, body) in [
            ("POST", format!("/v2/models/{bad}/infer"), body),
            ("POST", format!("/v2/models/{bad}/versions/1/infer"), body),
            ("POST", format!("/v2/models/m/versions/{bad}/infer"), body),
            ("GET", format!("/v2/models/{bad}"), ""),
            ("GET", format!("/v2/models/{bad}/ready"), ""),
            ("GET", format!("/v2/models/m/versions/{bad}/ready"), ""),
            ("POST", format!("/v1/models/{bad}:predict"), tf_body),
            (
                "POST",
                format!("/v1/models/{bad}/versions/1:predict"),
                tf_body,
            ),
            (
                "POST",
                format!("/v1/models/m/versions/{bad}:predict"),
                tf_body,
            ),
            (
                "POST",
                format!("/v1/models/m/labels/{bad}:predict"),
                tf_body,
            ),
            ("GET", format!("/v1/models/{bad}"), ""),
            ("GET", format!("/v1/models/m/labels/{bad}"), ""),
        ] {
            let (status, answer) = raw(&s, method, &path, body).await;
            assert!(
                matches!(status, 400 | 404),
                "{method} {path}: {status} {answer}"
            );
            assert!(!answer.contains("root:"), "{path}: {answer}");
        }
    }
    // Literal `..` segments and absolute paths inside the path.
    for path in [
        "/v2/models/../../etc/passwd/infer",
        "/v2/models/m/../../../etc/infer",
        "/v1/models/../../etc/passwd:predict",
        "/v1/models//etc/passwd:predict",
        "/v2/models//etc/passwd/infer",
    ] {
        let (status, answer) = raw(&s, "POST", path, body).await;
        assert!(
            matches!(status, 400 | 404 | 405),
            "{path}: {status} {answer}"
        );
        assert!(!answer.contains("root:"), "{path}: {answer}");
    }
    // The same requests with plain names work, so the refusals above are about the names.
    assert_eq!(
        raw(&s, "POST", "/v2/models/m/versions/1/infer", body)
            .await
            .0,
        200
    );
    assert_eq!(
        raw(&s, "POST", "/v1/models/m/labels/stable:predict", tf_body)
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn traversal_in_grpc_names_is_refused() {
    let repo = TempDir::new("traversal-grpc");
    put_model(&repo.0, "m", 1, &affine());
    let s = TestServer::start(repo).await;
    let mut kserve = GrpcInferenceServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    let mut predict = PredictionServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    let mut status = ModelServiceClient::connect(s.grpc.clone()).await.unwrap();
    let refused = |code: tonic::Code| {
        matches!(
            code,
            tonic::Code::NotFound | tonic::Code::InvalidArgument | tonic::Code::Unavailable
        )
    };
    for (name, version) in [
        ("../../etc/passwd", ""),
        ("/etc/passwd", ""),
        ("..", "1"),
        ("m", "../1"),
        ("m", "/1"),
        ("m", "-1"),
        ("m\0", ""),
    ] {
        let e = kserve
            .model_infer(ModelInferRequest {
                model_name: name.into(),
                model_version: version.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(refused(e.code()), "{name:?} {version:?}: {e:?}");
        let e = kserve
            .model_metadata(ModelMetadataRequest {
                name: name.into(),
                version: version.into(),
            })
            .await
            .unwrap_err();
        assert!(refused(e.code()), "{name:?} {version:?}: {e:?}");
        if let Ok(r) = kserve
            .model_ready(ModelReadyRequest {
                name: name.into(),
                version: version.into(),
            })
            .await
        {
            assert!(!r.into_inner().ready, "{name:?} {version:?}");
        }
    }
    for (name, choice) in [
        ("../../etc/passwd", None),
        ("/etc/passwd", None),
        ("m", Some(VersionChoice::VersionLabel("../../etc".into()))),
        ("m", Some(VersionChoice::VersionLabel("/etc/passwd".into()))),
        ("m", Some(VersionChoice::Version(-1))),
    ] {
        let spec = Some(ModelSpec {
            name: name.into(),
            version_choice: choice.clone(),
            ..Default::default()
        });
        let e = predict
            .predict(PredictRequest {
                model_spec: spec.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(refused(e.code()), "{name:?} {choice:?}: {e:?}");
        let e = status
            .get_model_status(GetModelStatusRequest { model_spec: spec })
            .await
            .unwrap_err();
        assert!(refused(e.code()), "{name:?} {choice:?}: {e:?}");
    }
}

#[tokio::test]
async fn the_repository_refuses_names_that_leave_it() {
    let repo = TempDir::new("repo-names");
    let r = ferry_server::source::Repository::open(
        &repo.0.display().to_string(),
        &std::env::temp_dir(),
    )
    .unwrap();
    for bad in ["..", "../etc", "/etc", "a/b", ".hidden", ""] {
        assert!(r.fetch_version(bad, 1).await.is_err(), "{bad}");
        assert!(r.read_file(bad, "config.toml").await.is_err(), "{bad}");
        assert!(r.read_file("m", bad).await.is_err(), "{bad}");
        assert!(
            r.write_file(bad, "rollout.json", b"{}".to_vec())
                .await
                .is_err(),
            "{bad}"
        );
    }
    let e = r
        .publish_version("m", 1, vec![("../../escape".into(), b"x".to_vec())])
        .await
        .unwrap_err();
    assert!(
        matches!(e, ferry_server::source::SourceError::Name(_)),
        "{e}"
    );
    assert!(e.to_string().contains("invalid"), "{e}");
    assert!(!repo.0.parent().unwrap().join("escape").exists());
}
