//! Benchmark peers behind the same HTTP stack as Ferry (axum on tokio), for `bench/serving`:
//!
//! - `ceiling PORT`: parses a KServe v2 JSON inference request into a JSON tree and answers a constant. No server
//!   that speaks JSON over HTTP on this machine can be faster; it is the ceiling for any such server.
//! - `ceiling PORT --mlp WEIGHTS`: runs a dense MLP (relu hidden layers, linear output) with plain Rust loops on the
//!   request's `data`, the way a hand-written Rust service would, without an inference engine. WEIGHTS is a file of
//!   little-endian f32: a u32 layer count, then per layer u32 rows, u32 cols, rows×cols weights (row-major, input
//!   dimension first), cols biases.
//!
//! Both also answer `GET /v2/models/{model}` with fixed KServe v2 metadata, so a load generator that reads metadata
//! first (`ferry bench`) can drive them: one input described by `--input NAME:DATATYPE:SHAPE` (shape
//! comma-separated, -1 for a dynamic dimension; default `input:FP32:-1,K` with K the MLP's input width, or
//! `features:FP32:-1,4` without `--mlp`).
//!
//! Run it with `cargo run --release -p ferry-server --example ceiling -- PORT [--mlp WEIGHTS] [--input SPEC]`.

#![allow(missing_docs)]

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

struct Layer {
    rows: usize,
    cols: usize,
    weights: Vec<f32>,
    bias: Vec<f32>,
}

fn read_layers(path: &str) -> Vec<Layer> {
    let raw = std::fs::read(path).expect("weights file");
    let mut layers = Vec::new();
    let mut pos = 0;
    let read_u32 = |pos: &mut usize| {
        let v = u32::from_le_bytes(raw[*pos..*pos + 4].try_into().expect("4 bytes"));
        *pos += 4;
        v as usize
    };
    let read_f32s = |pos: &mut usize, n: usize| {
        let v: Vec<f32> = raw[*pos..*pos + 4 * n]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        *pos += 4 * n;
        v
    };
    let count = read_u32(&mut pos);
    for _ in 0..count {
        let rows = read_u32(&mut pos);
        let cols = read_u32(&mut pos);
        let weights = read_f32s(&mut pos, rows * cols);
        let bias = read_f32s(&mut pos, cols);
        layers.push(Layer {
            rows,
            cols,
            weights,
            bias,
        });
    }
    layers
}

/// Plain loops: for each row, x ← relu(x·W + b) for hidden layers, x·W + b for the last. The loops run in the order
/// that walks W row by row (y += x_i · W_i), as a careful hand-written service would; the compiler vectorises the
/// inner loop. No BLAS, no engine.
fn mlp(layers: &[Layer], input: &[f32], batch: usize) -> Vec<f32> {
    let mut x = input.to_vec();
    for (l, layer) in layers.iter().enumerate() {
        let mut y = vec![0f32; batch * layer.cols];
        for r in 0..batch {
            let out = &mut y[r * layer.cols..(r + 1) * layer.cols];
            out.copy_from_slice(&layer.bias);
            for i in 0..layer.rows {
                let xi = x[r * layer.rows + i];
                let w = &layer.weights[i * layer.cols..(i + 1) * layer.cols];
                for (o, wij) in out.iter_mut().zip(w) {
                    *o += xi * wij;
                }
            }
            if l + 1 < layers.len() {
                out.iter_mut().for_each(|v| *v = v.max(0.0));
            }
        }
        x = y;
    }
    x
}

async fn constant(body: Bytes) -> axum::response::Response {
    use axum::response::IntoResponse;
    match serde_json::from_slice::<Value>(&body) {
        Ok(_) => axum::Json(json!({"model_name": "ceiling", "model_version": "1", "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 1], "data": [0.0]}]})).into_response(),
        Err(e) => (axum::http::StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

async fn plain_mlp(State(layers): State<Arc<Vec<Layer>>>, body: Bytes) -> axum::response::Response {
    use axum::response::IntoResponse;
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return axum::http::StatusCode::BAD_REQUEST.into_response();
    };
    let input = &request["inputs"][0];
    let batch = input["shape"][0].as_u64().unwrap_or(1) as usize;
    let data: Vec<f32> = input["data"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_f64())
                .map(|v| v as f32)
                .collect()
        })
        .unwrap_or_default();
    let layers = layers.clone();
    let out = tokio::task::spawn_blocking(move || mlp(&layers, &data, batch))
        .await
        .expect("mlp task");
    let cols = out.len() / batch.max(1);
    axum::Json(json!({"model_name": "mlp", "model_version": "1", "outputs": [{"name": "logits", "datatype": "FP32", "shape": [batch, cols], "data": out}]})).into_response()
}

/// KServe v2 model metadata for one input given as `NAME:DATATYPE:SHAPE`.
fn metadata(spec: &str) -> Value {
    let mut parts = spec.splitn(3, ':');
    let (name, datatype, shape) = (
        parts.next().unwrap_or("input"),
        parts.next().unwrap_or("FP32"),
        parts.next().unwrap_or("-1"),
    );
    let shape: Vec<i64> = shape
        .split(',')
        .map(|d| d.trim().parse().expect("--input shape: integers"))
        .collect();
    json!({"name": "model", "versions": ["1"], "platform": "ceiling", "inputs": [{"name": name, "datatype": datatype, "shape": shape}], "outputs": []})
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port: u16 = args
        .get(1)
        .and_then(|p| p.parse().ok())
        .expect("usage: ceiling PORT [--mlp WEIGHTS] [--input NAME:DATATYPE:SHAPE]");
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .map(|i| args[i + 1].clone())
    };
    let (app, default_input) = match flag("--mlp") {
        Some(path) => {
            let layers = Arc::new(read_layers(&path));
            let width = layers.first().map_or(1, |l| l.rows);
            (
                Router::new()
                    .route("/v2/models/{model}/infer", post(plain_mlp))
                    .with_state(layers),
                format!("input:FP32:-1,{width}"),
            )
        }
        None => (
            Router::new().route("/v2/models/{model}/infer", post(constant)),
            "features:FP32:-1,4".to_string(),
        ),
    };
    let meta = metadata(&flag("--input").unwrap_or(default_input));
    let app = app.route(
        "/v2/models/{model}",
        get(move || {
            let meta = meta.clone();
            async move { axum::Json(meta) }
        }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind");
    axum::serve(listener, app).await.expect("serve");
}
