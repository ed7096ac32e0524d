//! ONNX Runtime backend tests on models built in code. They need the library: run them through `scripts/test`,
//! which fetches it and sets `ORT_DYLIB_PATH`.

use ferry_engine::{Backend, EngineOptions, OrtEngine};
use ferry_model::onnx::{AttributeProto, GraphBuilder, TensorProto};
use ferry_model::{DataType, NamedTensor, Tensor, TensorData, ValueKind};

fn engine() -> OrtEngine {
    OrtEngine::init(None).expect("ONNX Runtime must be available (run scripts/test)")
}

/// y = x · [2, -1]ᵀ + 0.5 ; x: FP32 [-1, 2].
fn affine() -> Vec<u8> {
    GraphBuilder::new("affine")
        .input("x", DataType::F32, Some(&[-1, 2]))
        .output("y", DataType::F32, Some(&[-1, 1]))
        .initializer(TensorProto::f32("w", &[2, 1], vec![2.0, -1.0]))
        .initializer(TensorProto::f32("b", &[1], vec![0.5]))
        .node("MatMul", &["x", "w"], &["xw"], vec![])
        .node("Add", &["xw", "b"], &["y"], vec![])
        .to_bytes()
}

#[test]
fn affine_model_matches_hand_computation() {
    let model = affine();
    let backend = engine().load(&model, &EngineOptions::default()).unwrap();
    let sig = backend.signature();
    assert_eq!(sig.inputs[0].shape, Some(vec![-1, 2]));
    assert_eq!(sig.outputs[0].dtype, DataType::F32);
    let x = Tensor::new(vec![2, 2], TensorData::F32(vec![1.0, 2.0, 3.0, 4.0])).unwrap();
    let out = backend.predict(vec![NamedTensor::new("x", x)]).unwrap();
    assert_eq!(out[0].tensor.shape, vec![2, 1]);
    assert_eq!(out[0].tensor.data, TensorData::F32(vec![0.5, 2.5]));
}

#[test]
fn identity_round_trips_every_type() {
    let samples = vec![
        TensorData::Bool(vec![true, false]),
        TensorData::U8(vec![1, 255]),
        TensorData::U16(vec![1, 65535]),
        TensorData::U32(vec![1, u32::MAX]),
        TensorData::U64(vec![1, u64::MAX]),
        TensorData::I8(vec![-1, 127]),
        TensorData::I16(vec![-1, 300]),
        TensorData::I32(vec![-1, i32::MAX]),
        TensorData::I64(vec![-1, i64::MAX]),
        TensorData::F16(vec![half::f16::from_f32(0.5), half::f16::from_f32(-2.0)]),
        TensorData::F32(vec![0.25, -1e30]),
        TensorData::F64(vec![0.1, 1e300]),
        TensorData::Bytes(vec![b"hello".to_vec(), "é".as_bytes().to_vec()]),
    ];
    for data in samples {
        let dtype = data.dtype();
        let model = GraphBuilder::new("identity")
            .input("x", dtype, Some(&[-1]))
            .output("y", dtype, Some(&[-1]))
            .node("Identity", &["x"], &["y"], vec![])
            .to_bytes();
        let backend = engine().load(&model, &EngineOptions::default()).unwrap();
        let out = backend
            .predict(vec![NamedTensor::new(
                "x",
                Tensor::new(vec![2], data.clone()).unwrap(),
            )])
            .unwrap();
        assert_eq!(out[0].tensor.data, data, "{dtype}");
    }
}

#[test]
fn zipmap_output_becomes_a_dense_tensor_with_keys() {
    let model = GraphBuilder::new("zipmap")
        .opset("ai.onnx.ml", 3)
        .input("p", DataType::F32, Some(&[-1, 3]))
        .node_in(
            "ai.onnx.ml",
            "ZipMap",
            &["p"],
            &["probs"],
            vec![AttributeProto::ints("classlabels_int64s", vec![0, 1, 2])],
        )
        .build();
    // ZipMap's output is a sequence of maps, which the tensor-only builder cannot declare: write the output
    // type by hand as `seq(map(int64, float))`.
    let mut model = model;
    let graph = model.graph.as_mut().unwrap();
    graph.output.push(ferry_model::onnx::ValueInfoProto {
        name: "probs".into(),
        r#type: None,
    });
    let bytes = prost::Message::encode_to_vec(&model);
    let backend = match engine().load(&bytes, &EngineOptions::default()) {
        Ok(b) => b,
        Err(e) => panic!("{e}"),
    };
    assert!(matches!(
        backend.signature().outputs[0].kind,
        ValueKind::MapSequence { key: DataType::I64 }
    ));
    let p = Tensor::new(
        vec![2, 3],
        TensorData::F32(vec![0.1, 0.2, 0.7, 0.5, 0.4, 0.1]),
    )
    .unwrap();
    let out = backend.predict(vec![NamedTensor::new("p", p)]).unwrap();
    assert_eq!(out[0].tensor.shape, vec![2, 3]);
    assert_eq!(
        out[0].keys.as_deref(),
        Some(&["0".to_string(), "1".into(), "2".into()][..])
    );
    assert_eq!(
        out[0].tensor.data,
        TensorData::F32(vec![0.1, 0.2, 0.7, 0.5, 0.4, 0.1])
    );
}

#[test]
fn corrupt_model_is_a_load_error() {
    let err = engine()
        .load(b"this is not onnx", &EngineOptions::default())
        .unwrap_err();
    assert!(err.to_string().starts_with("model failed to load"), "{err}");
}

/// tract and ONNX Runtime give the same answers on the same models.
#[cfg(feature = "tract")]
mod tract {
    use super::*;
    use ferry_engine::TractBackend;

    #[test]
    fn affine_matches_onnxruntime() {
        let model = affine();
        let tract = TractBackend::load(&model, &EngineOptions::default()).unwrap();
        let ort = engine().load(&model, &EngineOptions::default()).unwrap();
        assert_eq!(tract.signature(), ort.signature());
        assert_eq!(tract.engine_name(), "tract");
        let x = Tensor::new(
            vec![3, 2],
            TensorData::F32(vec![1.0, 2.0, 3.0, 4.0, -5.0, 0.25]),
        )
        .unwrap();
        let a = tract
            .predict(vec![NamedTensor::new("x", x.clone())])
            .unwrap();
        let b = ort.predict(vec![NamedTensor::new("x", x)]).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn identity_on_every_numeric_type() {
        for data in [
            TensorData::Bool(vec![true, false]),
            TensorData::U8(vec![1, 255]),
            TensorData::I16(vec![-1, 300]),
            TensorData::I64(vec![-1, i64::MAX]),
            TensorData::F64(vec![0.1, 1e300]),
        ] {
            let dtype = data.dtype();
            let model = GraphBuilder::new("identity")
                .input("x", dtype, Some(&[-1]))
                .output("y", dtype, Some(&[-1]))
                .node("Identity", &["x"], &["y"], vec![])
                .to_bytes();
            let tract = TractBackend::load(&model, &EngineOptions::default()).unwrap();
            let out = tract
                .predict(vec![NamedTensor::new(
                    "x",
                    Tensor::new(vec![2], data.clone()).unwrap(),
                )])
                .unwrap();
            assert_eq!(out[0].tensor.data, data, "{dtype}");
        }
    }

    #[test]
    fn corrupt_model_is_a_load_error() {
        let err = TractBackend::load(b"garbage", &EngineOptions::default()).unwrap_err();
        assert!(err.to_string().starts_with("model failed to load"), "{err}");
    }
}
