//! Post-training int8 quantization of the weights of `Gemm` and `MatMul`, with standard ONNX operators: each
//! float weight initializer becomes an INT8 tensor with one scale per row or per column, whichever reconstructs
//! it better (symmetric, zero point 0),
//! and a `DequantizeLinear` node that restores the float weight the unchanged `Gemm`/`MatMul` reads. Weights
//! take a quarter of the space; activations stay float, so every engine that runs opset 13 runs the result.
//!
//! [`compare`] measures what it costs: file size, latency and score of both models on the same rows.

use std::time::Instant;

use ferry_engine::OrtEngine;
use ferry_model::onnx::{AttributeProto, ModelProto, NodeProto, TensorProto};
use ferry_model::DataType;
use prost::Message;

use crate::data::Dataset;
use crate::evaluate::{score_model, OnnxModel};
use crate::export::Metadata;
use crate::search::score;
use crate::TrainError;

fn invalid(message: String) -> TrainError {
    TrainError::Config(format!("cannot quantize: {message}"))
}

fn float_values(t: &TensorProto) -> Option<Vec<f32>> {
    if t.data_type != DataType::F32.onnx_code() {
        return None;
    }
    if !t.float_data.is_empty() {
        return Some(t.float_data.clone());
    }
    if t.raw_data.len().is_multiple_of(4) && !t.raw_data.is_empty() {
        return Some(
            t.raw_data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        );
    }
    None
}

/// The int8 codes and per-column scales of a row-major [rows, cols] matrix, quantized along `axis` (1: one
/// scale per column; 0: one per row).
pub fn quantize_matrix(
    values: &[f32],
    rows: usize,
    cols: usize,
    axis: usize,
) -> (Vec<i8>, Vec<f32>) {
    let channels = if axis == 1 { cols } else { rows };
    let channel = |i: usize| if axis == 1 { i % cols } else { i / cols };
    let mut max = vec![0f32; channels];
    for (i, v) in values.iter().enumerate() {
        let c = channel(i);
        max[c] = max[c].max(v.abs());
    }
    let scales: Vec<f32> = max
        .iter()
        .map(|m| if *m > 0.0 { m / 127.0 } else { 1.0 })
        .collect();
    let codes = values
        .iter()
        .enumerate()
        .map(|(i, v)| (v / scales[channel(i)]).round().clamp(-127.0, 127.0) as i8)
        .collect();
    (codes, scales)
}

/// Sum of squared differences between `values` and their dequantized codes.
fn reconstruction_error(
    values: &[f32],
    codes: &[i8],
    scales: &[f32],
    cols: usize,
    axis: usize,
) -> f64 {
    values
        .iter()
        .zip(codes)
        .enumerate()
        .map(|(i, (v, c))| {
            let scale = if axis == 1 {
                scales[i % cols]
            } else {
                scales[i / cols]
            };
            f64::from(v - f32::from(*c) * scale).powi(2)
        })
        .sum()
}

/// Rewrites every float 2-D weight initializer read by a `Gemm` or `MatMul` as int8 plus `DequantizeLinear`;
/// returns the new model and how many tensors were quantized.
pub fn quantize_weights(model: &[u8]) -> Result<(Vec<u8>, usize), TrainError> {
    let mut model =
        ModelProto::decode(model).map_err(|e| invalid(format!("not an ONNX model: {e}")))?;
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty())
        .map_or(0, |o| o.version);
    if opset < 13 {
        return Err(invalid(format!(
            "per-column DequantizeLinear needs opset 13 or later, the model imports {opset}"
        )));
    }
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| invalid("the model has no graph".into()))?;
    let mut targets: Vec<String> = Vec::new();
    for node in &graph.node {
        if !node.domain.is_empty() || !matches!(node.op_type.as_str(), "Gemm" | "MatMul") {
            continue;
        }
        let Some(weight) = node.input.get(1) else {
            continue;
        };
        if !targets.contains(weight) {
            targets.push(weight.clone());
        }
    }
    let mut dequantize = Vec::new();
    for name in &targets {
        let Some(index) = graph.initializer.iter().position(|t| &t.name == name) else {
            continue;
        };
        let tensor = &graph.initializer[index];
        let Some(values) = float_values(tensor) else {
            continue;
        };
        if tensor.dims.len() != 2 {
            continue;
        }
        let (rows, cols) = (tensor.dims[0] as usize, tensor.dims[1] as usize);
        // One scale per row or per column, whichever reconstructs the weights better: folded standardization
        // gives first-layer rows (input features) very different ranges, later layers vary by column.
        let (axis, (codes, scales)) = [0, 1]
            .into_iter()
            .map(|axis| (axis, quantize_matrix(&values, rows, cols, axis)))
            .min_by(|a, b| {
                let err = |(axis, (c, s)): &(usize, (Vec<i8>, Vec<f32>))| {
                    reconstruction_error(&values, c, s, cols, *axis)
                };
                err(a).total_cmp(&err(b))
            })
            .expect("two candidates");
        let channels = scales.len() as i64;
        let (q, s, z) = (
            format!("{name}_quantized"),
            format!("{name}_scale"),
            format!("{name}_zero_point"),
        );
        let dims = tensor.dims.clone();
        graph.initializer.remove(index);
        graph.initializer.push(TensorProto::raw(
            &q,
            DataType::I8,
            &dims,
            codes.iter().map(|c| *c as u8).collect(),
        ));
        graph
            .initializer
            .push(TensorProto::f32(&s, &[channels], scales));
        graph.initializer.push(TensorProto::raw(
            &z,
            DataType::I8,
            &[channels],
            vec![0; channels as usize],
        ));
        dequantize.push(NodeProto {
            input: vec![q, s, z],
            output: vec![name.clone()],
            name: format!("DequantizeLinear_{name}"),
            op_type: "DequantizeLinear".into(),
            attribute: vec![AttributeProto::int("axis", axis as i64)],
            domain: String::new(),
        });
    }
    let count = dequantize.len();
    // Dequantization reads only initializers, so it can run first: the graph stays topologically sorted.
    dequantize.append(&mut graph.node);
    graph.node = dequantize;
    Ok((model.encode_to_vec(), count))
}

/// Size, latency and score of the float model and its int8 version on the same rows.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Comparison {
    /// Weight tensors quantized.
    pub tensors: usize,
    /// `accuracy` or `r2`.
    pub metric: String,
    /// The float model's score.
    pub float_score: f64,
    /// The int8 model's score.
    pub int8_score: f64,
    /// float − int8 score.
    pub drop: f64,
    /// File sizes in bytes.
    pub float_bytes: usize,
    /// See `float_bytes`.
    pub int8_bytes: usize,
    /// Median milliseconds to run a batch of `latency_rows` rows.
    pub float_latency_ms: f64,
    /// See `float_latency_ms`.
    pub int8_latency_ms: f64,
    /// Rows in the latency batch (the data's first rows, at most 1024).
    pub latency_rows: usize,
}

fn median_latency_ms(model: &OnnxModel, dataset: &Dataset, rows: usize) -> Result<f64, TrainError> {
    let batch = dataset.x.slice_axis(ndarray::Axis(0), (0..rows).into());
    model.run(batch)?;
    let mut times = Vec::with_capacity(21);
    for _ in 0..21 {
        let started = Instant::now();
        model.run(batch)?;
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Runs both models through ONNX Runtime on `dataset` and compares them.
pub fn compare(
    engine: &OrtEngine,
    meta: &Metadata,
    dataset: &Dataset,
    float_model: &[u8],
    int8_model: &[u8],
    tensors: usize,
) -> Result<Comparison, TrainError> {
    let f = OnnxModel::load(engine, float_model)?;
    let q = OnnxModel::load(engine, int8_model)?;
    let float_report = score_model(&f, meta, dataset)?;
    let int8_report = score_model(&q, meta, dataset)?;
    let rows = dataset.rows().min(1024);
    let (float_score, int8_score) = (score(&float_report), score(&int8_report));
    Ok(Comparison {
        tensors,
        metric: match float_report {
            crate::fit::Report::Classification(_) => "accuracy".into(),
            crate::fit::Report::Regression(_) => "r2".into(),
        },
        float_score,
        int8_score,
        drop: float_score - int8_score,
        float_bytes: float_model.len(),
        int8_bytes: int8_model.len(),
        float_latency_ms: median_latency_ms(&f, dataset, rows)?,
        int8_latency_ms: median_latency_ms(&q, dataset, rows)?,
        latency_rows: rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_column_codes_round_trip_within_half_a_step() {
        let values = [0.5f32, -2.0, 0.25, 1.0, 0.0, -0.001];
        let (codes, scales) = quantize_matrix(&values, 3, 2, 1);
        assert_eq!(scales, vec![0.5 / 127.0, 2.0 / 127.0]);
        assert_eq!(codes[0], 127);
        assert_eq!(codes[1], -127);
        for (i, v) in values.iter().enumerate() {
            let back = f32::from(codes[i]) * scales[i % 2];
            assert!(
                (back - v).abs() <= scales[i % 2] / 2.0 + 1e-7,
                "{v} -> {back}"
            );
        }
    }

    #[test]
    fn all_zero_channel_gets_unit_scale() {
        let (codes, scales) = quantize_matrix(&[0.0, 0.0], 2, 1, 1);
        assert_eq!(scales, vec![1.0]);
        assert_eq!(codes, vec![0, 0]);
    }
}
