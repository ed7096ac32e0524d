//! The conformance suite: what the server relies on from a [`Backend`], written once and run over every backend.
//!
//! Each check below is a function of a [`Subject`] (a way to load a model, and the engine's [`Capabilities`]);
//! the `conformance!` macro makes one `#[test]` per check and per backend, so a failure names both
//! (`onnxruntime::strings`, `tract::zero_rows`). ONNX Runtime always runs (it needs the library: run through
//! `scripts/test`, which fetches it and sets `ORT_DYLIB_PATH`); tract runs with the `tract` feature
//! (`cargo test -p ferry-engine --features tract`). Where an engine legitimately differs, its capabilities say so
//! and the check asserts what that engine does instead (a load error, say): nothing is skipped silently.
//!
//! A new backend gets a subject function and one `mod` line at the bottom.

use ferry_engine::{Backend, EngineError, EngineOptions};
use ferry_model::onnx::{AttributeProto, GraphBuilder, TensorProto};
use ferry_model::{DataType, NamedTensor, Signature, Tensor, TensorData, ValueKind};

/// Prepares serialized ONNX with default options.
type Load = fn(&[u8]) -> Result<Box<dyn Backend>, EngineError>;

/// A backend under test.
struct Subject {
    /// What [`Backend::engine_name`] says.
    engine: &'static str,
    /// How this backend loads a model.
    load: Load,
    /// Where this engine differs from the full contract.
    caps: Capabilities,
}

/// What an engine can do beyond the common contract.
struct Capabilities {
    /// Runs operators that read strings (`CategoryMapper`). Without it such a model fails to load.
    string_ops: bool,
    /// Runs `ZipMap` (a sequence of maps, served as a dense tensor with keys). Without it, a load error.
    map_sequences: bool,
}

fn onnxruntime() -> Subject {
    Subject {
        engine: "onnxruntime",
        load: |model| {
            let engine = ferry_engine::OrtEngine::init(None)
                .expect("ONNX Runtime must be available (run scripts/test)");
            Ok(Box::new(engine.load(model, &EngineOptions::default())?))
        },
        caps: Capabilities {
            string_ops: true,
            map_sequences: true,
        },
    }
}

#[cfg(feature = "tract")]
fn tract() -> Subject {
    Subject {
        engine: "tract",
        load: |model| {
            Ok(Box::new(ferry_engine::TractBackend::load(
                model,
                &EngineOptions::default(),
            )?))
        },
        caps: Capabilities {
            string_ops: true,
            // tract has no ZipMap (nor sequences or maps at all): scikit-learn classifiers exported with their
            // default ZipMap need ONNX Runtime.
            map_sequences: false,
        },
    }
}

// ---- Models, built in code ----

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

/// A small dense layer: p = sigmoid(x · W + b) ; x: FP32 [-1, 3], p: FP32 [-1, 2].
fn dense() -> Vec<u8> {
    GraphBuilder::new("dense")
        .input("x", DataType::F32, Some(&[-1, 3]))
        .output("p", DataType::F32, Some(&[-1, 2]))
        .initializer(TensorProto::f32(
            "w",
            &[3, 2],
            vec![0.3, -1.2, 0.7, 0.05, -0.4, 2.5],
        ))
        .initializer(TensorProto::f32("b", &[2], vec![0.1, -0.2]))
        .node("MatMul", &["x", "w"], &["xw"], vec![])
        .node("Add", &["xw", "b"], &["z"], vec![])
        .node("Sigmoid", &["z"], &["p"], vec![])
        .to_bytes()
}

/// Two inputs and two outputs, neither in alphabetical order: `b` FP32 [-1, 3] and `a` INT64 [-1, -1] in;
/// `y2` = b · 2 and `y1` = a out, in that order.
fn two_by_two() -> Vec<u8> {
    GraphBuilder::new("two_by_two")
        .input("b", DataType::F32, Some(&[-1, 3]))
        .input("a", DataType::I64, Some(&[-1, -1]))
        .output("y2", DataType::F32, Some(&[-1, 3]))
        .output("y1", DataType::I64, Some(&[-1, -1]))
        .initializer(TensorProto::f32("two", &[], vec![2.0]))
        .node("Mul", &["b", "two"], &["y2"], vec![])
        .node("Identity", &["a"], &["y1"], vec![])
        .to_bytes()
}

/// y = x, for any element type; x: [-1, -1].
fn identity(dtype: DataType) -> Vec<u8> {
    GraphBuilder::new("identity")
        .input("x", dtype, Some(&[-1, -1]))
        .output("y", dtype, Some(&[-1, -1]))
        .node("Identity", &["x"], &["y"], vec![])
        .to_bytes()
}

/// Strings to ids: `cat` → 1, `dog` → 2, anything else → -1 ; s: BYTES [-1].
fn category_mapper() -> Vec<u8> {
    GraphBuilder::new("categories")
        .opset("ai.onnx.ml", 1)
        .input("s", DataType::Bytes, Some(&[-1]))
        .output("id", DataType::I64, Some(&[-1]))
        .node_in(
            "ai.onnx.ml",
            "CategoryMapper",
            &["s"],
            &["id"],
            vec![
                AttributeProto::strings("cats_strings", &["cat", "dog"]),
                AttributeProto::ints("cats_int64s", vec![1, 2]),
                AttributeProto::int("default_int64", -1),
            ],
        )
        .to_bytes()
}

/// scikit-learn's probabilities as a sequence of maps: `probs` = ZipMap(p) ; p: FP32 [-1, 3].
fn zipmap() -> Vec<u8> {
    let mut model = GraphBuilder::new("zipmap")
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
    // ZipMap's output is a sequence of maps, which the tensor-only builder cannot declare: an output without a
    // type, which the engine infers.
    let graph = model.graph.as_mut().unwrap();
    graph.output.push(ferry_model::onnx::ValueInfoProto {
        name: "probs".into(),
        r#type: None,
    });
    prost::Message::encode_to_vec(&model)
}

// ---- Helpers ----

fn tensor(shape: &[usize], data: TensorData) -> Tensor {
    Tensor::new(shape.to_vec(), data).unwrap()
}

fn input(name: &str, shape: &[usize], data: TensorData) -> NamedTensor {
    NamedTensor::new(name, tensor(shape, data))
}

fn f32s(t: &NamedTensor) -> &[f32] {
    match &t.tensor.data {
        TensorData::F32(v) => v,
        other => panic!("`{}` is {}, not FP32", t.name, other.dtype()),
    }
}

/// `n` values in [-2, 2), the same on every run.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-6, "{what}: element {i}: {x} vs {y}");
    }
}

fn load(s: &Subject, model: &[u8]) -> Box<dyn Backend> {
    (s.load)(model).unwrap_or_else(|e| panic!("{}: {e}", s.engine))
}

/// What a backend without a capability must do with a model that needs it: refuse it at load, as a load error (the
/// version is UNAVAILABLE with the reason), never at its first request.
fn refused_at_load(s: &Subject, model: &[u8]) {
    match (s.load)(model) {
        Err(EngineError::Load(_)) => {}
        Err(other) => panic!("{}: expected a load error, got {other:?}", s.engine),
        Ok(_) => panic!(
            "{}: loads a model its capabilities say it cannot run",
            s.engine
        ),
    }
}

// ---- The checks ----

fn engine_name(s: &Subject) {
    assert_eq!(load(s, &affine()).engine_name(), s.engine);
}

fn corrupt_model_is_a_load_error(s: &Subject) {
    let err = (s.load)(b"this is not onnx").err().expect("garbage loaded");
    assert!(matches!(err, EngineError::Load(_)), "{err:?}");
    assert!(err.to_string().starts_with("model failed to load"), "{err}");
}

/// Names and element types in graph order, `-1` for every dynamic dimension, fixed ones kept.
fn signature(s: &Subject) {
    let backend = load(s, &two_by_two());
    let spec = |name: &str, dtype, shape: &[i64]| {
        ferry_model::TensorSpec::tensor(name, dtype, shape.to_vec())
    };
    assert_eq!(
        backend.signature(),
        &Signature {
            inputs: vec![
                spec("b", DataType::F32, &[-1, 3]),
                spec("a", DataType::I64, &[-1, -1]),
            ],
            outputs: vec![
                spec("y2", DataType::F32, &[-1, 3]),
                spec("y1", DataType::I64, &[-1, -1]),
            ],
        }
    );
}

/// Outputs come in signature order, whatever order the inputs came in.
fn outputs_in_signature_order(s: &Subject) {
    let backend = load(s, &two_by_two());
    let a = input("a", &[1, 2], TensorData::I64(vec![7, -7]));
    let b = input("b", &[1, 3], TensorData::F32(vec![0.5, 1.0, -3.0]));
    for inputs in [vec![b.clone(), a.clone()], vec![a, b]] {
        let out = backend.predict(inputs).unwrap();
        let names: Vec<&str> = out.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["y2", "y1"]);
        assert_eq!(
            out[0].tensor,
            tensor(&[1, 3], TensorData::F32(vec![1.0, 2.0, -6.0]))
        );
        assert_eq!(out[1].tensor, tensor(&[1, 2], TensorData::I64(vec![7, -7])));
        assert!(out.iter().all(|o| o.keys.is_none()));
    }
}

fn affine_matches_hand_computation(s: &Subject) {
    let backend = load(s, &affine());
    let out = backend
        .predict(vec![input(
            "x",
            &[2, 2],
            TensorData::F32(vec![1.0, 2.0, 3.0, 4.0]),
        )])
        .unwrap();
    assert_eq!(out[0].name, "y");
    assert_eq!(
        out[0].tensor,
        tensor(&[2, 1], TensorData::F32(vec![0.5, 2.5]))
    );
}

/// Every element type Ferry carries passes through `Identity` unchanged, at rank 2, extremes included.
fn every_dtype_round_trips(s: &Subject) {
    let samples = vec![
        TensorData::Bool(vec![true, false, false, true]),
        TensorData::U8(vec![0, 1, 128, 255]),
        TensorData::U16(vec![0, 1, 300, u16::MAX]),
        TensorData::U32(vec![0, 1, 70_000, u32::MAX]),
        TensorData::U64(vec![0, 1, 1 << 40, u64::MAX]),
        TensorData::I8(vec![i8::MIN, -1, 0, i8::MAX]),
        TensorData::I16(vec![i16::MIN, -1, 300, i16::MAX]),
        TensorData::I32(vec![i32::MIN, -1, 0, i32::MAX]),
        TensorData::I64(vec![i64::MIN, -1, 0, i64::MAX]),
        TensorData::F16(vec![
            half::f16::from_f32(0.5),
            half::f16::from_f32(-2.0),
            half::f16::MAX,
            half::f16::MIN_POSITIVE,
        ]),
        TensorData::F32(vec![0.25, -1e30, f32::MIN_POSITIVE, f32::INFINITY]),
        TensorData::F64(vec![0.1, 1e300, -0.0, f64::NEG_INFINITY]),
        TensorData::Bytes(
            vec![
                b"hello".to_vec(),
                "é".as_bytes().to_vec(),
                Vec::new(),
                "a longer string, with spaces".into(),
            ]
            .into(),
        ),
    ];
    assert_eq!(samples.len(), 13, "one sample per DataType");
    for data in samples {
        let dtype = data.dtype();
        let backend = load(s, &identity(dtype));
        assert_eq!(backend.signature().inputs[0].dtype, dtype);
        assert_eq!(backend.signature().outputs[0].dtype, dtype);
        let out = backend
            .predict(vec![input("x", &[2, 2], data.clone())])
            .unwrap_or_else(|e| panic!("{dtype}: {e}"));
        assert_eq!(out[0].tensor, tensor(&[2, 2], data), "{dtype}");
    }
}

/// A batch of N rows gives what the N rows give one at a time: the server's batching depends on it.
fn batch_equals_single_rows(s: &Subject) {
    let backend = load(s, &dense());
    let rows = 9;
    let x = values(rows * 3, 1);
    let batch = backend
        .predict(vec![input("x", &[rows, 3], TensorData::F32(x.clone()))])
        .unwrap();
    assert_eq!(batch[0].tensor.shape, vec![rows, 2]);
    for r in 0..rows {
        let one = backend
            .predict(vec![input(
                "x",
                &[1, 3],
                TensorData::F32(x[r * 3..r * 3 + 3].to_vec()),
            )])
            .unwrap();
        assert_eq!(one[0].tensor.shape, vec![1, 2]);
        assert_close(
            f32s(&one[0]),
            &f32s(&batch[0])[r * 2..r * 2 + 2],
            &format!("row {r}"),
        );
    }
}

/// Inputs the signature refuses are `InvalidInput` naming the input (a client's 400, not a panic or a 500), and the
/// backend serves normally afterwards.
fn refused_inputs_are_invalid_input(s: &Subject) {
    let backend = load(s, &two_by_two());
    let a = || input("a", &[1, 2], TensorData::I64(vec![1, 2]));
    let b = || input("b", &[1, 3], TensorData::F32(vec![1.0, 2.0, 3.0]));
    let cases: Vec<(&str, Vec<NamedTensor>, &str)> = vec![
        (
            "wrong dtype",
            vec![
                a(),
                input("b", &[1, 3], TensorData::F64(vec![1.0, 2.0, 3.0])),
            ],
            "`b`",
        ),
        (
            "wrong rank",
            vec![a(), input("b", &[3], TensorData::F32(vec![1.0, 2.0, 3.0]))],
            "`b`",
        ),
        (
            "wrong fixed dimension",
            vec![a(), input("b", &[1, 2], TensorData::F32(vec![1.0, 2.0]))],
            "`b`",
        ),
        ("missing input", vec![b()], "`a`"),
        ("no inputs", vec![], "`b`"),
        (
            "unknown input",
            vec![a(), b(), input("c", &[1], TensorData::F32(vec![0.0]))],
            "`c`",
        ),
        ("repeated input", vec![a(), b(), a()], "`a`"),
    ];
    for (case, inputs, names) in cases {
        match backend.predict(inputs) {
            Err(EngineError::InvalidInput(m)) => assert!(m.contains(names), "{case}: {m}"),
            other => panic!("{case}: expected InvalidInput, got {other:?}"),
        }
    }
    let strings = load(s, &identity(DataType::Bytes));
    let bad = input(
        "x",
        &[1, 1],
        TensorData::Bytes(vec![vec![0xff, 0xfe]].into()),
    );
    match strings.predict(vec![bad]) {
        Err(EngineError::InvalidInput(m)) => {
            assert!(m.contains("`x`") && m.contains("UTF-8"), "{m}")
        }
        other => panic!("invalid UTF-8: expected InvalidInput, got {other:?}"),
    }
    assert!(
        backend.predict(vec![a(), b()]).is_ok(),
        "serves after refusals"
    );
}

/// A batch of zero rows (the server's validation does not refuse one) is answered with zero rows, the other
/// dimensions as the model computes them, by every backend.
fn zero_rows(s: &Subject) {
    let backend = load(s, &dense());
    let out = backend
        .predict(vec![input("x", &[0, 3], TensorData::F32(vec![]))])
        .unwrap();
    assert_eq!(out[0].tensor, tensor(&[0, 2], TensorData::F32(vec![])));
}

/// Several threads predicting on one backend at once each get their own answer.
fn concurrent_predictions(s: &Subject) {
    let backend = load(s, &dense());
    let threads = 8;
    let calls = 25;
    let expected: Vec<Vec<f32>> = (0..threads)
        .map(|t| {
            let x = values(4 * 3, 100 + t as u64);
            f32s(
                &backend
                    .predict(vec![input("x", &[4, 3], TensorData::F32(x))])
                    .unwrap()[0],
            )
            .to_vec()
        })
        .collect();
    std::thread::scope(|scope| {
        for (t, want) in expected.iter().enumerate() {
            let backend = &backend;
            scope.spawn(move || {
                let x = values(4 * 3, 100 + t as u64);
                for call in 0..calls {
                    let out = backend
                        .predict(vec![input("x", &[4, 3], TensorData::F32(x.clone()))])
                        .unwrap();
                    assert_eq!(f32s(&out[0]), &want[..], "thread {t}, call {call}");
                }
            });
        }
    });
}

/// BYTES tensors: through `Identity` (in [`every_dtype_round_trips`]) and into an operator that reads them.
fn strings(s: &Subject) {
    let model = category_mapper();
    if !s.caps.string_ops {
        return refused_at_load(s, &model);
    }
    let backend = load(s, &model);
    let words: Vec<Vec<u8>> = ["dog", "cat", "", "bird", "é"]
        .iter()
        .map(|w| w.as_bytes().to_vec())
        .collect();
    let out = backend
        .predict(vec![input("s", &[5], TensorData::Bytes(words.into()))])
        .unwrap();
    assert_eq!(
        out[0].tensor,
        tensor(&[5], TensorData::I64(vec![2, 1, -1, -1, -1]))
    );
}

/// scikit-learn's ZipMap: a sequence of maps answered as a dense `[rows, keys]` tensor with its keys.
fn map_sequences(s: &Subject) {
    let model = zipmap();
    if !s.caps.map_sequences {
        return refused_at_load(s, &model);
    }
    let backend = load(s, &model);
    assert!(matches!(
        backend.signature().outputs[0].kind,
        ValueKind::MapSequence { key: DataType::I64 }
    ));
    let p = TensorData::F32(vec![0.1, 0.2, 0.7, 0.5, 0.4, 0.1]);
    let out = backend
        .predict(vec![input("p", &[2, 3], p.clone())])
        .unwrap();
    assert_eq!(out[0].tensor, tensor(&[2, 3], p));
    assert_eq!(
        out[0].keys.as_deref(),
        Some(&["0".to_string(), "1".into(), "2".into()][..])
    );
}

/// One `#[test]` per check for the subject `$subject`.
macro_rules! conformance {
    ($subject:expr; $($check:ident),* $(,)?) => {
        $(
            #[test]
            fn $check() {
                super::$check(&$subject);
            }
        )*
    };
    ($subject:expr) => {
        conformance!($subject;
            engine_name,
            corrupt_model_is_a_load_error,
            signature,
            outputs_in_signature_order,
            affine_matches_hand_computation,
            every_dtype_round_trips,
            batch_equals_single_rows,
            refused_inputs_are_invalid_input,
            zero_rows,
            concurrent_predictions,
            strings,
            map_sequences,
        );
    };
}

mod onnxruntime {
    conformance!(super::onnxruntime());
}

#[cfg(feature = "tract")]
mod tract {
    conformance!(super::tract());

    /// Beyond the contract: the two engines give the same answers on the same model.
    #[test]
    fn agrees_with_onnxruntime() {
        use super::*;
        let model = dense();
        let tract = load(&super::tract(), &model);
        let ort = load(&super::onnxruntime(), &model);
        assert_eq!(tract.signature(), ort.signature());
        let x = || vec![input("x", &[5, 3], TensorData::F32(values(15, 7)))];
        let (a, b) = (tract.predict(x()).unwrap(), ort.predict(x()).unwrap());
        assert_eq!(a[0].tensor.shape, b[0].tensor.shape);
        assert_close(f32s(&a[0]), f32s(&b[0]), "tract vs onnxruntime");
    }
}
