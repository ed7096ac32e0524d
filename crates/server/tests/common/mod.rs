//! Test support: model repositories built in code, and a real server on a free port.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_model::onnx::{GraphBuilder, TensorProto};
use ferry_model::DataType;
use ferry_server::{ServeConfig, Server};

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("ferry-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `<root>/<model>/<version>/model.onnx`.
pub fn put_model(root: &Path, model: &str, version: u64, bytes: &[u8]) {
    let dir = root.join(model).join(version.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model.onnx"), bytes).unwrap();
}

/// Writes a file beside a model's versions (`config.toml`) or inside a version (`1/ferry.json`).
pub fn put_file(root: &Path, model: &str, relative: &str, text: &str) {
    let path = root.join(model).join(relative);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// y = x · [2, -1]ᵀ + 0.5 ; x: FP32 [-1, 2], y: FP32 [-1, 1].
pub fn affine() -> Vec<u8> {
    scaled_affine(1.0)
}

/// The affine model with weights multiplied by `k` (different versions give different answers).
pub fn scaled_affine(k: f32) -> Vec<u8> {
    GraphBuilder::new("affine")
        .input("x", DataType::F32, Some(&[-1, 2]))
        .output("y", DataType::F32, Some(&[-1, 1]))
        .initializer(TensorProto::f32("w", &[2, 1], vec![2.0 * k, -k]))
        .initializer(TensorProto::f32("b", &[1], vec![0.5]))
        .node("MatMul", &["x", "w"], &["xw"], vec![])
        .node("Add", &["xw", "b"], &["y"], vec![])
        .to_bytes()
}

/// Identity on a `dtype` tensor of shape [-1, 2].
pub fn identity(dtype: DataType) -> Vec<u8> {
    GraphBuilder::new("identity")
        .input("x", dtype, Some(&[-1, 2]))
        .output("y", dtype, Some(&[-1, 2]))
        .node("Identity", &["x"], &["y"], vec![])
        .to_bytes()
}

/// Two inputs, two outputs: `sum` = a + float(b), `neg` = -a ; a: FP32 [-1, 2], b: INT64 [-1, 2].
pub fn two_io() -> Vec<u8> {
    GraphBuilder::new("two_io")
        .input("a", DataType::F32, Some(&[-1, 2]))
        .input("b", DataType::I64, Some(&[-1, 2]))
        .output("sum", DataType::F32, Some(&[-1, 2]))
        .output("neg", DataType::F32, Some(&[-1, 2]))
        .node(
            "Cast",
            &["b"],
            &["bf"],
            vec![ferry_model::onnx::AttributeProto::int("to", 1)],
        )
        .node("Add", &["a", "bf"], &["sum"], vec![])
        .node("Neg", &["a"], &["neg"], vec![])
        .to_bytes()
}

/// A 3-class softmax classifier over 2 features: `label` INT64 [-1], `probabilities` FP32 [-1, 3].
pub fn classifier() -> Vec<u8> {
    GraphBuilder::new("classifier")
        .input("features", DataType::F32, Some(&[-1, 2]))
        .output("label", DataType::I64, Some(&[-1]))
        .output("probabilities", DataType::F32, Some(&[-1, 3]))
        .initializer(TensorProto::f32(
            "w",
            &[2, 3],
            vec![1.0, 0.0, -1.0, 0.0, 1.0, -1.0],
        ))
        .initializer(TensorProto::f32("b", &[3], vec![0.0, 0.0, 0.0]))
        .node("MatMul", &["features", "w"], &["z0"], vec![])
        .node("Add", &["z0", "b"], &["z"], vec![])
        .node(
            "Softmax",
            &["z"],
            &["probabilities"],
            vec![ferry_model::onnx::AttributeProto::int("axis", 1)],
        )
        .node(
            "ArgMax",
            &["probabilities"],
            &["label"],
            vec![
                ferry_model::onnx::AttributeProto::int("axis", 1),
                ferry_model::onnx::AttributeProto::int("keepdims", 0),
            ],
        )
        .to_bytes()
}

/// x: FP32 [-1, 512] through `layers` dense 512×512 layers: slow enough to be in flight during a shutdown.
pub fn heavy(layers: usize) -> Vec<u8> {
    let mut b = GraphBuilder::new("heavy")
        .input("x", DataType::F32, Some(&[-1, 512]))
        .output(&format!("h{layers}"), DataType::F32, Some(&[-1, 512]));
    let w: Vec<u8> = (0..512 * 512)
        .flat_map(|i| (((i % 7) as f32 - 3.0) * 1e-3).to_le_bytes())
        .collect();
    b = b.initializer(TensorProto::raw("w", DataType::F32, &[512, 512], w));
    let mut prev = "x".to_string();
    for l in 1..=layers {
        let next = format!("h{l}");
        b = b.node("MatMul", &[&prev, "w"], &[&next], vec![]);
        prev = next;
    }
    b.to_bytes()
}

/// A running server and a client for it.
pub struct TestServer {
    pub base: String,
    pub grpc: String,
    pub metrics: Option<String>,
    pub client: reqwest::Client,
    pub infer: ferry_server::infer::Infer,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    pub handle: tokio::task::JoinHandle<std::io::Result<()>>,
    pub repo: Arc<TempDir>,
}

impl TestServer {
    pub async fn start(repo: TempDir) -> TestServer {
        TestServer::start_with(repo, |c| c).await
    }

    pub async fn start_with(
        repo: TempDir,
        tweak: impl FnOnce(ServeConfig) -> ServeConfig,
    ) -> TestServer {
        let engine =
            ferry_engine::OrtEngine::init(None).expect("ONNX Runtime (run through scripts/test)");
        let config = tweak(ServeConfig::for_tests(repo.0.clone()));
        let server = Server::start(config, Ok(engine)).await.unwrap();
        let base = format!("http://{}", server.local_addr());
        let grpc = format!("http://{}", server.grpc_addr());
        let metrics = server.metrics_addr().map(|a| format!("http://{a}"));
        let infer = server.infer().clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        TestServer {
            base,
            grpc,
            metrics,
            client: reqwest::Client::new(),
            infer,
            shutdown: Some(tx),
            handle,
            repo: Arc::new(repo),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The `/metrics` page as text.
    pub async fn metrics_text(&self) -> String {
        let r = self.client.get(self.url("/metrics")).send().await.unwrap();
        r.text().await.unwrap()
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let r = self.client.get(self.url(path)).send().await.unwrap();
        let status = r.status().as_u16();
        let body = r.bytes().await.unwrap();
        (
            status,
            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        )
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        self.post_raw(path, body.to_string().into_bytes(), &[])
            .await
            .into_json()
    }

    pub async fn post_raw(
        &self,
        path: &str,
        body: Vec<u8>,
        headers: &[(&str, String)],
    ) -> RawResponse {
        let mut req = self.client.post(self.url(path)).body(body);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.bytes().await.unwrap().to_vec();
        RawResponse {
            status,
            headers,
            body,
        }
    }

    pub fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub struct RawResponse {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn into_json(self) -> (u16, serde_json::Value) {
        let v = serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            panic!(
                "not JSON ({}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        });
        (self.status, v)
    }
}

/// y = x + (rows in the batch the engine ran): shows from the answer whether requests were batched together.
/// x: FP32 [-1, -1].
pub fn counts_rows() -> Vec<u8> {
    GraphBuilder::new("counts_rows")
        .input("x", DataType::F32, Some(&[-1, -1]))
        .output("y", DataType::F32, Some(&[-1, -1]))
        .initializer(TensorProto::i64("zero", &[], vec![0]))
        .node("Shape", &["x"], &["shape"], vec![])
        .node(
            "Gather",
            &["shape", "zero"],
            &["rows"],
            vec![ferry_model::onnx::AttributeProto::int("axis", 0)],
        )
        .node(
            "Cast",
            &["rows"],
            &["rows_f"],
            vec![ferry_model::onnx::AttributeProto::int("to", 1)],
        )
        .node("Add", &["x", "rows_f"], &["y"], vec![])
        .to_bytes()
}
