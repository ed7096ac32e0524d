//! The gRPC front door (KServe v2 and TF Serving) on a real server, called with tonic clients generated from the
//! same protocol files. Third-party clients (tritonclient.grpc, tensorflow-serving-api) are exercised in
//! tests/python.

mod common;

use common::*;
use ferry_server::protocol::grpc::inference::{
    grpc_inference_service_client::GrpcInferenceServiceClient,
    model_infer_request::InferInputTensor, InferTensorContents, ModelInferRequest,
    ModelMetadataRequest, ModelReadyRequest, ServerLiveRequest, ServerReadyRequest,
};
use ferry_server::protocol::grpc::tensorflow::serving::{
    model_service_client::ModelServiceClient, model_spec::VersionChoice,
    prediction_service_client::PredictionServiceClient, GetModelMetadataRequest,
    GetModelStatusRequest, ModelSpec, PredictRequest, SignatureDefMap,
};
use ferry_server::protocol::grpc::tensorflow::{
    tensor_shape_proto::Dim, DataType as TfType, TensorProto, TensorShapeProto,
};
use prost::Message;

fn repository() -> TempDir {
    let repo = TempDir::new("grpc");
    put_model(&repo.0, "affine", 1, &affine());
    put_model(&repo.0, "two_io", 1, &two_io());
    put_model(
        &repo.0,
        "strings",
        1,
        &identity(ferry_model::DataType::Bytes),
    );
    put_model(&repo.0, "broken", 1, b"nope");
    repo
}

fn x_input(values: Vec<f32>) -> InferInputTensor {
    InferInputTensor {
        name: "x".into(),
        datatype: "FP32".into(),
        shape: vec![values.len() as i64 / 2, 2],
        parameters: Default::default(),
        contents: Some(InferTensorContents {
            fp32_contents: values,
            ..Default::default()
        }),
    }
}

#[tokio::test]
async fn kserve_health_metadata_and_infer() {
    let s = TestServer::start(repository()).await;
    let mut c = GrpcInferenceServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    assert!(
        c.server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        c.server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let ready = |name: &str, version: &str| ModelReadyRequest {
        name: name.into(),
        version: version.into(),
    };
    assert!(
        c.model_ready(ready("affine", ""))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert!(
        !c.model_ready(ready("broken", ""))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert!(
        !c.model_ready(ready("nope", "1"))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let meta = c
        .model_metadata(ModelMetadataRequest {
            name: "affine".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.versions, vec!["1"]);
    assert_eq!(meta.inputs[0].shape, vec![-1, 2]);
    assert_eq!(meta.outputs[0].datatype, "FP32");

    // Typed contents in, raw contents out.
    let request = ModelInferRequest {
        model_name: "affine".into(),
        id: "g-1".into(),
        inputs: vec![x_input(vec![1.0, 2.0, 3.0, 4.0])],
        ..Default::default()
    };
    // Timing travels as response metadata on every call (kept out of HPACK's table, as values that always change).
    for _ in 0..2 {
        let r = c.model_infer(request.clone()).await.unwrap();
        for name in ["x-queue-time-us", "x-compute-time-us", "x-total-time-us"] {
            let v = r
                .metadata()
                .get(name)
                .map(|v| v.to_str().unwrap().to_string());
            assert!(
                v.as_deref().is_some_and(|v| v.parse::<u64>().is_ok()),
                "{name}: {v:?}"
            );
        }
    }
    let r = c.model_infer(request).await.unwrap();
    let r = r.into_inner();
    assert_eq!((r.id.as_str(), r.model_version.as_str()), ("g-1", "1"));
    assert_eq!(r.outputs[0].shape, vec![2, 1]);
    let y: Vec<f32> = r.raw_output_contents[0]
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(y, vec![0.5, 2.5]);

    // Raw contents in, including BYTES with length prefixes.
    let mut raw = Vec::new();
    ferry_model::TensorData::Bytes(
        vec![b"ab".to_vec(), b"".to_vec(), b"c".to_vec(), b"def".to_vec()].into(),
    )
    .write_le_bytes(&mut raw);
    let request = ModelInferRequest {
        model_name: "strings".into(),
        inputs: vec![InferInputTensor {
            name: "x".into(),
            datatype: "BYTES".into(),
            shape: vec![2, 2],
            ..Default::default()
        }],
        raw_input_contents: vec![raw.clone()],
        ..Default::default()
    };
    let r = c.model_infer(request).await.unwrap().into_inner();
    assert_eq!(r.raw_output_contents[0], raw);
}

#[tokio::test]
async fn kserve_errors_use_the_error_table() {
    let s = TestServer::start(repository()).await;
    let mut c = GrpcInferenceServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    let cases = vec![
        (
            ModelInferRequest {
                model_name: "nope".into(),
                inputs: vec![x_input(vec![1.0, 2.0])],
                ..Default::default()
            },
            tonic::Code::NotFound,
            "not found",
        ),
        (
            ModelInferRequest {
                model_name: "broken".into(),
                inputs: vec![x_input(vec![1.0, 2.0])],
                ..Default::default()
            },
            tonic::Code::Unavailable,
            "unavailable",
        ),
        (
            ModelInferRequest {
                model_name: "affine".into(),
                inputs: vec![x_input(vec![1.0, 2.0, 3.0])],
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "needs 2 elements",
        ),
        (
            ModelInferRequest {
                model_name: "affine".into(),
                model_version: "x".into(),
                inputs: vec![x_input(vec![1.0, 2.0])],
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "positive integer",
        ),
        (
            ModelInferRequest {
                model_name: "affine".into(),
                inputs: vec![],
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "missing input `x`",
        ),
        (
            ModelInferRequest {
                model_name: "affine".into(),
                inputs: vec![x_input(vec![1.0, 2.0])],
                raw_input_contents: vec![vec![0; 8], vec![0; 8]],
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "raw_input_contents has 2 entries for 1 inputs",
        ),
    ];
    for (request, code, fragment) in cases {
        let e = c.model_infer(request).await.unwrap_err();
        assert_eq!(e.code(), code, "{}", e.message());
        assert!(
            e.message().contains(fragment),
            "`{}` should mention `{fragment}`",
            e.message()
        );
    }
}

fn tf_floats(shape: &[i64], values: Vec<f32>) -> TensorProto {
    TensorProto {
        dtype: TfType::DtFloat as i32,
        tensor_shape: Some(TensorShapeProto {
            dim: shape
                .iter()
                .map(|d| Dim {
                    size: *d,
                    name: String::new(),
                })
                .collect(),
            unknown_rank: false,
        }),
        float_val: values,
        ..Default::default()
    }
}

fn spec(name: &str) -> Option<ModelSpec> {
    Some(ModelSpec {
        name: name.into(),
        ..Default::default()
    })
}

#[tokio::test]
async fn tfserving_predict_metadata_and_status() {
    let s = TestServer::start(repository()).await;
    let mut p = PredictionServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    let request = PredictRequest {
        model_spec: spec("affine"),
        inputs: [(
            "x".to_string(),
            tf_floats(&[2, 2], vec![1.0, 2.0, 3.0, 4.0]),
        )]
        .into(),
        ..Default::default()
    };
    let r = p.predict(request).await.unwrap().into_inner();
    assert_eq!(r.outputs["y"].float_val, vec![0.5, 2.5]);
    assert_eq!(
        r.model_spec.unwrap().version_choice,
        Some(VersionChoice::Version(1))
    );
    // tensor_content (raw bytes), and a single value filling the shape, as TensorFlow allows.
    let raw: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let content = TensorProto {
        tensor_content: raw,
        float_val: vec![],
        ..tf_floats(&[1, 2], vec![])
    };
    let b = TensorProto {
        dtype: TfType::DtInt64 as i32,
        int64_val: vec![10],
        ..tf_floats(&[1, 2], vec![])
    };
    let request = PredictRequest {
        model_spec: spec("two_io"),
        inputs: [("a".to_string(), content), ("b".to_string(), b)].into(),
        output_filter: vec!["sum".into()],
    };
    let r = p.predict(request).await.unwrap().into_inner();
    assert_eq!(r.outputs.len(), 1);
    assert_eq!(r.outputs["sum"].float_val, vec![11.0, 12.0]);
    let e = p
        .predict(PredictRequest {
            model_spec: spec("affine"),
            inputs: [("z".to_string(), tf_floats(&[1], vec![1.0]))].into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("alias not found"), "{}", e.message());

    // A shape is checked against the row limit before anything is decoded.
    let huge = PredictRequest {
        model_spec: spec("affine"),
        inputs: [("x".to_string(), tf_floats(&[1 << 40, 2], vec![1.0]))].into(),
        ..Default::default()
    };
    let e = p.predict(huge).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("--max-rows-per-request"),
        "{}",
        e.message()
    );

    // A single value may fill a shape (as in TensorFlow), within the request's memory budget: one 1 KB string
    // filling [32768, 2] would take 68 MB from a request of about 1 KB, and is refused before anything is allocated.
    let fill = |rows: i64, text: &[u8]| PredictRequest {
        model_spec: spec("strings"),
        inputs: [(
            "x".to_string(),
            TensorProto {
                dtype: TfType::DtString as i32,
                string_val: vec![text.to_vec()],
                ..tf_floats(&[rows, 2], vec![])
            },
        )]
        .into(),
        ..Default::default()
    };
    let e = p.predict(fill(32_768, &[b'a'; 1024])).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message()
            .contains("a single value filling shape [32768, 2]")
            && e.message().contains("bytes of memory"),
        "{}",
        e.message()
    );
    let r = p.predict(fill(2, b"hi")).await.unwrap().into_inner();
    assert_eq!(r.outputs["y"].string_val, vec![b"hi".to_vec(); 4]);
    let meta = p
        .get_model_metadata(GetModelMetadataRequest {
            model_spec: spec("affine"),
            metadata_field: vec!["signature_def".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let any = &meta.metadata["signature_def"];
    assert_eq!(
        any.type_url,
        "type.googleapis.com/tensorflow.serving.SignatureDefMap"
    );
    let map = SignatureDefMap::decode(any.value.as_slice()).unwrap();
    let sig = &map.signature_def["serving_default"];
    assert_eq!(sig.inputs["x"].dtype, TfType::DtFloat as i32);
    assert_eq!(
        sig.inputs["x"]
            .tensor_shape
            .as_ref()
            .unwrap()
            .dim
            .iter()
            .map(|d| d.size)
            .collect::<Vec<_>>(),
        vec![-1, 2]
    );

    let mut m = ModelServiceClient::connect(s.grpc.clone()).await.unwrap();
    let status = m
        .get_model_status(GetModelStatusRequest {
            model_spec: spec("affine"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.model_version_status[0].state, 30, "AVAILABLE");
    let status = m
        .get_model_status(GetModelStatusRequest {
            model_spec: spec("broken"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.model_version_status[0].state, 50, "END");
    assert!(status.model_version_status[0]
        .status
        .as_ref()
        .unwrap()
        .error_message
        .contains("model failed to load"));
    let e = m
        .get_model_status(GetModelStatusRequest {
            model_spec: spec("nope"),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn oversized_messages_are_resource_exhausted() {
    // As gRPC's reference servers and Triton answer (and REST's 413): RESOURCE_EXHAUSTED, not tonic's OUT_OF_RANGE.
    let s = TestServer::start_with(repository(), |c| ferry_server::ServeConfig {
        max_request_bytes: 1024,
        ..c
    })
    .await;
    let mut c = GrpcInferenceServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    let big = ModelInferRequest {
        model_name: "affine".into(),
        inputs: vec![x_input(vec![1.5; 400])],
        ..Default::default()
    };
    let e = c.model_infer(big).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{}", e.message());
    assert!(e.message().contains("too large"), "{}", e.message());
    let small = ModelInferRequest {
        model_name: "affine".into(),
        inputs: vec![x_input(vec![1.0, 2.0])],
        ..Default::default()
    };
    c.model_infer(small)
        .await
        .expect("a message under the limit is served");

    let mut p = PredictionServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    let request = PredictRequest {
        model_spec: spec("affine"),
        inputs: [("x".to_string(), tf_floats(&[200, 2], vec![1.5; 400]))].into(),
        ..Default::default()
    };
    let e = p.predict(request).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{}", e.message());
}

#[tokio::test]
async fn idle_connections_close_but_calls_are_never_cut_and_clients_reconnect() {
    let timeout = std::time::Duration::from_millis(500);
    let repo = repository();
    put_model(&repo.0, "heavy", 1, &heavy(384));
    let s = TestServer::start_with(repo, |c| ferry_server::ServeConfig {
        client_timeout: timeout,
        ..c
    })
    .await;
    let mut c = GrpcInferenceServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    // A call that runs for several idle limits is not cut.
    let started = std::time::Instant::now();
    let rows = 128;
    let answer = c
        .model_infer(ModelInferRequest {
            model_name: "heavy".into(),
            inputs: vec![InferInputTensor {
                name: "x".into(),
                datatype: "FP32".into(),
                shape: vec![rows, 512],
                parameters: Default::default(),
                contents: Some(InferTensorContents {
                    fp32_contents: vec![0.5; rows as usize * 512],
                    ..Default::default()
                }),
            }],
            ..Default::default()
        })
        .await;
    let took = started.elapsed();
    assert!(answer.is_ok(), "{answer:?}");
    assert!(
        took > timeout * 2,
        "the call was too quick to test anything: {took:?}"
    );
    // Idle past the limit: the server closes the connection, and the same client reconnects for its next calls.
    for _ in 0..2 {
        tokio::time::sleep(timeout * 3).await;
        let ready = c
            .server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(ready.ready);
    }
}

#[tokio::test]
async fn silent_connections_are_closed_after_the_client_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let timeout = std::time::Duration::from_millis(500);
    let s = TestServer::start_with(repository(), |c| ferry_server::ServeConfig {
        client_timeout: timeout,
        ..c
    })
    .await;
    let addr = s.grpc.trim_start_matches("http://").to_string();
    // Reads until the server closes the connection (or `limit` passes): whether it closed, and when.
    async fn closed_within(stream: &mut tokio::net::TcpStream, limit: std::time::Duration) -> bool {
        let mut buf = [0u8; 1024];
        let read_to_end = async {
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    return;
                }
            }
        };
        tokio::time::timeout(limit, read_to_end).await.is_ok()
    }
    // Silent from the start: closed once the client timeout passes.
    let started = std::time::Instant::now();
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    assert!(closed_within(&mut silent, timeout * 6).await);
    assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());
    // Half a preface, then silence: closed too.
    let mut partial = tokio::net::TcpStream::connect(&addr).await.unwrap();
    partial.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    assert!(closed_within(&mut partial, timeout * 6).await);
    // The whole preface and a SETTINGS frame, then no call: closed as idle, as REST closes an idle keep-alive
    // connection, but not before the client timeout.
    let started = std::time::Instant::now();
    let mut live = tokio::net::TcpStream::connect(&addr).await.unwrap();
    live.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    assert!(closed_within(&mut live, timeout * 8).await);
    assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());
    // A connection that has not sent its preface does not hold shutdown for the grace period (10 s here).
    let timeout = std::time::Duration::from_secs(5);
    let s = TestServer::start_with(repository(), |c| ferry_server::ServeConfig {
        client_timeout: timeout,
        ..c
    })
    .await;
    let _silent = tokio::net::TcpStream::connect(s.grpc.trim_start_matches("http://"))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut s = s;
    s.shutdown();
    let handle = std::mem::replace(&mut s.handle, tokio::spawn(async { Ok(()) }));
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(2), handle).await;
    assert!(
        matches!(stopped, Ok(Ok(Ok(())))),
        "shutdown waited for a silent connection: {stopped:?}"
    );
}
