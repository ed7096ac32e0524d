//! Dynamic batching, backpressure and deadlines on a real server.

mod common;

use common::*;
use serde_json::{json, Value};

fn request(rows: usize, width: usize, value: f32) -> Value {
    json!({"inputs": [{"name": "x", "shape": [rows, width], "datatype": "FP32", "data": vec![value; rows * width]}]})
}

#[tokio::test]
async fn concurrent_requests_run_as_one_batch_and_get_their_own_rows() {
    let repo = TempDir::new("batch");
    put_model(&repo.0, "rows", 1, &counts_rows());
    // Four rows fill a batch; the long delay means only a full batch is cut.
    put_file(
        &repo.0,
        "rows",
        "config.toml",
        "max_batch_size = 4\nmax_queue_delay_us = 2000000\ninstances = 1\n",
    );
    let s = TestServer::start(repo).await;
    let mut calls = Vec::new();
    for (i, rows) in [1usize, 2, 1].into_iter().enumerate() {
        let (client, url) = (s.client.clone(), s.url("/v2/models/rows/infer"));
        calls.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .body(request(rows, 2, 10.0 * i as f32).to_string())
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (
                i,
                rows,
                status,
                serde_json::from_slice::<Value>(&r.bytes().await.unwrap()).unwrap(),
            )
        }));
    }
    for call in calls {
        let (i, rows, status, body) = call.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["outputs"][0]["shape"],
            json!([rows, 2]),
            "each request gets back its own rows"
        );
        // 4 rows ran together: every element is its own value plus 4.
        assert_eq!(
            body["outputs"][0]["data"],
            json!(vec![10.0 * i as f32 + 4.0; rows * 2]),
            "request {i}"
        );
    }
}

#[tokio::test]
async fn different_shapes_are_not_merged_and_batching_off_runs_alone() {
    let repo = TempDir::new("shapes");
    put_model(&repo.0, "rows", 1, &counts_rows());
    put_file(
        &repo.0,
        "rows",
        "config.toml",
        "max_batch_size = 8\nmax_queue_delay_us = 100000\ninstances = 1\n",
    );
    put_model(&repo.0, "alone", 1, &counts_rows());
    let s = TestServer::start(repo).await;
    let a = s.post("/v2/models/rows/infer", request(1, 2, 0.0));
    let b = s.post("/v2/models/rows/infer", request(1, 3, 0.0));
    let ((sa, ba), (sb, bb)) = tokio::join!(a, b);
    assert_eq!((sa, sb), (200, 200));
    assert_eq!(
        ba["outputs"][0]["data"],
        json!([1.0, 1.0]),
        "width 2 ran without the width-3 request"
    );
    assert_eq!(bb["outputs"][0]["data"], json!([1.0, 1.0, 1.0]));
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let (client, url) = (s.client.clone(), s.url("/v2/models/alone/infer"));
            tokio::spawn(async move {
                let r = client
                    .post(url)
                    .body(request(1, 2, 0.0).to_string())
                    .send()
                    .await
                    .unwrap();
                (
                    r.status().as_u16(),
                    serde_json::from_slice::<Value>(&r.bytes().await.unwrap()).unwrap(),
                )
            })
        })
        .collect();
    for call in calls {
        let (status, body) = call.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(
            body["outputs"][0]["data"],
            json!([1.0, 1.0]),
            "without max_batch_size every request runs alone"
        );
    }
}

#[tokio::test]
async fn a_full_queue_answers_429_at_once_and_deadlines_give_504() {
    let repo = TempDir::new("overload");
    put_model(&repo.0, "heavy", 1, &heavy(24));
    put_file(
        &repo.0,
        "heavy",
        "config.toml",
        "instances = 1\nmax_queue_size = 1\n",
    );
    let s = TestServer::start(repo).await;
    let rows = 128;
    // Binary inputs decode in no time, so the requests reach the queue together and the engine is the bottleneck.
    let header = json!({"inputs": [{"name": "x", "shape": [rows, 512], "datatype": "FP32",
                                      "parameters": {"binary_data_size": rows * 512 * 4}}],
                        "outputs": [{"name": "h24", "parameters": {"binary_data": true}}]})
    .to_string();
    let mut binary_body = header.clone().into_bytes();
    binary_body.extend((0..rows * 512).flat_map(|_| 0.5f32.to_le_bytes()));
    let header_len = header.len().to_string();
    let body = json!({"inputs": [{"name": "x", "shape": [rows, 512], "datatype": "FP32", "data": vec![0.5f32; rows * 512]}],
                      "outputs": [{"name": "h24", "parameters": {"binary_data": true}}]})
    .to_string();
    let mut calls = Vec::new();
    for _ in 0..8 {
        let (client, url, binary_body, header_len) = (
            s.client.clone(),
            s.url("/v2/models/heavy/infer"),
            binary_body.clone(),
            header_len.clone(),
        );
        calls.push(tokio::spawn(async move {
            let started = std::time::Instant::now();
            let r = client
                .post(url)
                .header("inference-header-content-length", header_len)
                .body(binary_body)
                .send()
                .await
                .unwrap();
            let retry = r.headers().get("retry-after").is_some();
            (r.status().as_u16(), retry, started.elapsed())
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    for call in calls {
        let (status, retry, elapsed) = call.await.unwrap();
        match status {
            200 => ok += 1,
            429 => {
                refused += 1;
                assert!(retry, "429 carries Retry-After");
                assert!(
                    elapsed < std::time::Duration::from_secs(2),
                    "refusals are immediate: {elapsed:?}"
                );
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(ok >= 1 && refused >= 1, "ok {ok}, refused {refused}");

    // A client deadline shorter than the work: 504, and the server keeps serving.
    let r = s
        .post_raw(
            "/v2/models/heavy/infer",
            body.clone().into_bytes(),
            &[("x-request-timeout-ms", "1".into())],
        )
        .await;
    assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
    let r = s
        .post_raw("/v2/models/heavy/infer", body.into_bytes(), &[])
        .await;
    assert_eq!(r.status, 200);
}
