//! Criterion benches of the request path's hot spots: tensor JSON decode and encode, binary decode, batch
//! concatenation and split, and the batching policy. Compare before and after any change to these paths:
//! `cargo bench -p ferry-server --bench hot_paths`.

#![allow(missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferry_model::{DataType, TensorData};
use ferry_server::batching::queue::{Decision, Entry, Limits, State};
use ferry_server::protocol::json::{
    decode_data, decode_leaves, leaves, FlatJson, NestedJson, NonFinite,
};

const ROWS: usize = 32;
const COLS: usize = 64;

fn sample() -> Vec<f32> {
    (0..ROWS * COLS).map(|i| (i as f32 * 0.37).sin()).collect()
}

fn json_decode(c: &mut Criterion) {
    let body = serde_json::to_vec(&serde_json::json!({
        "inputs": [{"name": "x", "shape": [ROWS, COLS], "datatype": "FP32", "data": sample()}]
    }))
    .unwrap();
    let mut g = c.benchmark_group("json");
    g.throughput(Throughput::Elements((ROWS * COLS) as u64));
    let raw = serde_json::to_string(&sample()).unwrap();
    g.bench_function("decode_fp32_32x64_streaming", |b| {
        b.iter(|| {
            decode_data(
                DataType::F32,
                black_box(&raw),
                ROWS * COLS,
                &ferry_server::infer::Budget::for_request(raw.len()),
            )
            .unwrap()
        })
    });
    g.bench_function("decode_fp32_32x64_tree", |b| {
        b.iter(|| {
            let v: serde_json::Value = serde_json::from_slice(black_box(&body)).unwrap();
            let mut items = Vec::with_capacity(ROWS * COLS);
            leaves(&v["inputs"][0]["data"], &mut items);
            decode_leaves(DataType::F32, &items, false).unwrap()
        })
    });
    let data = TensorData::F32(sample());
    g.bench_function("encode_flat_fp32_32x64", |b| {
        b.iter(|| serde_json::to_vec(&FlatJson(black_box(&data), NonFinite::Tokens)).unwrap())
    });
    g.bench_function("encode_nested_fp32_32x64", |b| {
        b.iter(|| {
            serde_json::to_vec(&NestedJson {
                data: black_box(&data),
                shape: &[ROWS, COLS],
                start: 0,
                b64: false,
            })
            .unwrap()
        })
    });
    g.finish();
}

fn binary(c: &mut Criterion) {
    let mut raw = Vec::new();
    TensorData::F32(sample()).write_le_bytes(&mut raw);
    let mut g = c.benchmark_group("binary");
    g.throughput(Throughput::Bytes(raw.len() as u64));
    g.bench_function("decode_fp32_32x64", |b| {
        b.iter(|| TensorData::from_le_bytes(DataType::F32, black_box(&raw)).unwrap())
    });
    let data = TensorData::F32(sample());
    g.bench_function("encode_fp32_32x64", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(raw.len());
            black_box(&data).write_le_bytes(&mut out);
            out
        })
    });
    g.finish();
}

fn batch(c: &mut Criterion) {
    let parts: Vec<TensorData> = (0..ROWS)
        .map(|r| TensorData::F32(vec![r as f32; COLS]))
        .collect();
    let refs: Vec<&TensorData> = parts.iter().collect();
    let joined = TensorData::concat(&refs).unwrap();
    let mut g = c.benchmark_group("batch");
    g.bench_function("concat_32_rows_of_64", |b| {
        b.iter(|| TensorData::concat(black_box(&refs)).unwrap())
    });
    g.bench_function("split_32_rows_of_64", |b| {
        b.iter(|| {
            (0..ROWS)
                .map(|r| black_box(&joined).slice(r * COLS..(r + 1) * COLS))
                .collect::<Vec<_>>()
        })
    });
    g.finish();
}

fn queue(c: &mut Criterion) {
    let limits = Limits {
        max_batch_size: 32,
        max_queue_delay: Duration::from_micros(500),
        preferred_batch_sizes: vec![],
        max_queue_size: 4096,
        max_batch_tokens: usize::MAX,
    };
    c.bench_function("queue/push_64_cut_2_batches", |b| {
        b.iter(|| {
            let mut state: State<u32> = State::new(limits.clone());
            let now = Instant::now();
            for i in 0..64 {
                let key = vec![(DataType::F32, vec![COLS])];
                let _ = state.push(Entry {
                    item: i,
                    rows: 1,
                    tokens: 0,
                    key,
                    enqueued: now,
                    deadline: None,
                    solo: false,
                });
            }
            let mut batches = 0;
            while let Decision::Batch(b, _) = state.next_batch(now) {
                batches += b.len();
            }
            batches
        })
    });
}

fn drift(c: &mut Criterion) {
    use ferry_model::{NamedTensor, Tensor};
    use ferry_server::drift::{Drift, FeatureBaseline};
    let baseline: Vec<FeatureBaseline> = (0..10)
        .map(|f| FeatureBaseline {
            name: format!("f{f}"),
            edges: (0..=10).map(f64::from).collect(),
            shares: vec![0.1; 10],
        })
        .collect();
    let d = Drift::new(baseline, "x".into(), 2000, 1);
    let one_row = vec![NamedTensor::new(
        "x",
        Tensor::new(
            vec![1, 10],
            TensorData::F32((0..10).map(|i| i as f32).collect()),
        )
        .unwrap(),
    )];
    c.bench_function("drift/observe_1x10", |b| {
        b.iter(|| d.observe(black_box(&one_row)))
    });
    c.bench_function("drift/report_10_features", |b| b.iter(|| d.report()));
    // Prediction drift on a classifier's label output and a regressor's value, one sampled row each.
    use ferry_server::drift::{PredictionBaseline, PredictionBins};
    let p = Drift::from_parts(
        None,
        vec![
            PredictionBaseline {
                output: "label".into(),
                bins: PredictionBins::Classes(vec![
                    "setosa".into(),
                    "versicolor".into(),
                    "virginica".into(),
                ]),
                shares: vec![0.3, 0.3, 0.4, 0.0],
            },
            PredictionBaseline {
                output: "prediction".into(),
                bins: PredictionBins::Edges((0..=10).map(f64::from).collect()),
                shares: vec![0.1; 10],
            },
        ],
        2000,
        1,
    )
    .unwrap();
    let outputs = vec![
        NamedTensor::new(
            "label",
            Tensor::new(
                vec![1],
                TensorData::Bytes(vec![b"virginica".to_vec()].into()),
            )
            .unwrap(),
        ),
        NamedTensor::new(
            "prediction",
            Tensor::new(vec![1, 1], TensorData::F32(vec![4.5])).unwrap(),
        ),
    ];
    c.bench_function("drift/observe_outputs_label_and_value", |b| {
        b.iter(|| p.observe_outputs(black_box(&outputs)))
    });
}

fn metrics(c: &mut Criterion) {
    let m = ferry_server::metrics::Metrics::default();
    let series = m.version_series("iris", 1);
    c.bench_function("metrics/record_one_request", |b| {
        b.iter(|| {
            let mut r = m.request(ferry_server::metrics::Protocol::KserveRest);
            r.version(black_box(&series));
            r.body_bytes(120);
            r.response_bytes(180);
            r.finish(ferry_server::metrics::Outcome::Success);
        })
    });
    c.bench_function("metrics/record_one_batch", |b| {
        let waits = [std::time::Duration::from_micros(40)];
        b.iter(|| series.batch(black_box(&waits), std::time::Duration::from_micros(30), 1))
    });
}

criterion_group!(benches, json_decode, binary, batch, queue, drift, metrics);
criterion_main!(benches);
