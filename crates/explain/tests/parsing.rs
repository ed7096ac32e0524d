//! Recognising graphs: ferry train's linear exports, tree ensembles, other models, and hostile files.

mod common;

use common::*;
use ferry_explain::model::{Aggregate, EnsembleKind, LinearSpace, PostTransform, MAX_OUTPUTS};
use ferry_explain::{recognise, tree, GraphError, Recognised};
use ferry_model::onnx::{AttributeProto, GraphBuilder, ModelProto, TensorProto};
use ferry_model::DataType;

/// A classifier as `ferry train` exports it: Gemm → Softmax → probabilities, ArgMax → Gather → label.
fn classifier(w: Vec<f32>, b: Vec<f32>, features: i64, classes: &[&str]) -> ModelProto {
    let k = classes.len() as i64;
    let names = TensorProto {
        name: "classes".into(),
        dims: vec![k],
        data_type: DataType::Bytes.onnx_code(),
        string_data: classes.iter().map(|c| c.as_bytes().to_vec()).collect(),
        ..Default::default()
    };
    GraphBuilder::new("ferry_softmax")
        .input("features", DataType::F32, Some(&[-1, features]))
        .initializer(TensorProto::f32("W0", &[features, k], w))
        .initializer(TensorProto::f32("B0", &[k], b))
        .node("Gemm", &["features", "W0", "B0"], &["logits"], vec![])
        .initializer(names)
        .node(
            "Softmax",
            &["logits"],
            &["probabilities"],
            vec![AttributeProto::int("axis", 1)],
        )
        .node(
            "ArgMax",
            &["probabilities"],
            &["index"],
            vec![
                AttributeProto::int("axis", 1),
                AttributeProto::int("keepdims", 0),
            ],
        )
        .node(
            "Gather",
            &["classes", "index"],
            &["label"],
            vec![AttributeProto::int("axis", 0)],
        )
        .output("label", DataType::Bytes, Some(&[-1]))
        .output("probabilities", DataType::F32, Some(&[-1, k]))
        .build()
}

fn linear_of(model: &ModelProto) -> ferry_explain::LinearModel {
    match recognise(model).unwrap() {
        Recognised::Linear(m) => m,
        other => panic!("not linear: {other:?}"),
    }
}

fn other_reason(model: &ModelProto) -> String {
    match recognise(model).unwrap() {
        Recognised::Other { reason } => reason,
        other => panic!("recognised as {other:?}"),
    }
}

#[test]
fn softmax_classifiers_are_linear_in_logit_space() {
    // W is [features, classes] (transB = 0): W[j][k].
    let w = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let m = linear_of(&classifier(w, vec![0.5, -0.5, 0.0], 2, &["a", "b", "c"]));
    assert_eq!((m.features, m.outputs), (2, 3));
    assert!(!m.trans_b && !m.binary_pair && m.impute.is_none());
    // Stored as [outputs, features].
    assert_eq!(m.weights, vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    assert_eq!(m.bias, vec![0.5, -0.5, 0.0]);
    assert_eq!(
        m.space,
        LinearSpace::Softmax {
            logits: "logits".into(),
            probabilities: "probabilities".into()
        }
    );
    assert_eq!(m.margin(&[1.0, 1.0]), vec![5.5, 6.5, 9.0]);
}

#[test]
fn binary_logistic_exports_are_a_pair_whose_first_margin_is_zero() {
    // ferry train writes the single logit z as (0, z).
    let m = linear_of(&classifier(
        vec![0.0, 1.5, 0.0, -2.0],
        vec![0.0, 0.25],
        2,
        &["no", "yes"],
    ));
    assert!(m.binary_pair);
    assert_eq!(m.margin(&[2.0, 1.0]), vec![0.0, 3.0 - 2.0 + 0.25]);
}

#[test]
fn weights_are_read_from_raw_data_transposed_or_dequantized() {
    // transB = 1 with B = [outputs, features] in little-endian raw bytes, alpha and beta applied.
    let w: Vec<f32> = vec![1.0, -2.0, 0.5, 4.0, 0.0, 3.0];
    let raw: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
    let model = GraphBuilder::new("raw")
        .input("x", DataType::F32, Some(&[-1, 3]))
        .initializer(TensorProto::raw("W", DataType::F32, &[2, 3], raw))
        .initializer(TensorProto::raw(
            "C",
            DataType::F64,
            &[1, 2],
            [1.0f64, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect(),
        ))
        .node(
            "Gemm",
            &["x", "W", "C"],
            &["y"],
            vec![
                AttributeProto::int("transB", 1),
                AttributeProto::float("alpha", 2.0),
                AttributeProto::float("beta", 0.5),
            ],
        )
        .output("y", DataType::F32, Some(&[-1, 2]))
        .build();
    let m = linear_of(&model);
    assert!(m.trans_b);
    assert_eq!(m.weights, vec![2.0, -4.0, 1.0, 8.0, 0.0, 6.0]);
    assert_eq!(m.bias, vec![0.5, 1.0]);
    assert_eq!(m.space, LinearSpace::Output { output: "y".into() });

    // ferry train's int8 export: DequantizeLinear(int8, per-row scale, zero point) feeds the Gemm.
    let q: Vec<i8> = vec![1, -2, 3, 4, 5, -6];
    let model = GraphBuilder::new("int8")
        .input("x", DataType::F32, Some(&[-1, 3]))
        .initializer(TensorProto::raw(
            "Wq",
            DataType::I8,
            &[3, 2],
            q.iter().map(|v| *v as u8).collect(),
        ))
        .initializer(TensorProto::f32("Ws", &[3], vec![0.5, 0.25, 2.0]))
        .initializer(TensorProto::raw("Wz", DataType::I8, &[3], vec![0, 0, 0]))
        .initializer(TensorProto::f32("B", &[2], vec![0.0, 1.0]))
        .node(
            "DequantizeLinear",
            &["Wq", "Ws", "Wz"],
            &["W"],
            vec![AttributeProto::int("axis", 0)],
        )
        .node("Gemm", &["x", "W", "B"], &["y"], vec![])
        .output("y", DataType::F32, Some(&[-1, 2]))
        .build();
    let m = linear_of(&model);
    // W = [[0.5, -1], [0.75, 1], [10, -12]] as [features, outputs]; stored [outputs, features].
    assert_eq!(m.weights, vec![0.5, 0.75, 10.0, -1.0, 1.0, -12.0]);
}

#[test]
fn networks_and_other_graphs_are_not_linear() {
    let base = || {
        GraphBuilder::new("mlp")
            .input("x", DataType::F32, Some(&[-1, 2]))
            .initializer(TensorProto::f32("W0", &[2, 2], vec![1.0, 0.0, 0.0, 1.0]))
            .initializer(TensorProto::f32("B0", &[2], vec![0.0, 0.0]))
            .initializer(TensorProto::f32("W1", &[2, 1], vec![1.0, 1.0]))
            .initializer(TensorProto::f32("B1", &[1], vec![0.0]))
    };
    let mlp = base()
        .node("Gemm", &["x", "W0", "B0"], &["z0"], vec![])
        .node("Relu", &["z0"], &["a0"], vec![])
        .node("Gemm", &["a0", "W1", "B1"], &["prediction"], vec![])
        .output("prediction", DataType::F32, Some(&[-1, 1]))
        .build();
    assert!(other_reason(&mlp).contains("2 Gemm"));
    let relu_after = base()
        .node("Gemm", &["x", "W0", "B0"], &["z0"], vec![])
        .node("Relu", &["z0"], &["prediction"], vec![])
        .output("prediction", DataType::F32, Some(&[-1, 2]))
        .build();
    assert!(other_reason(&relu_after).contains("Relu"));
    let scaled_input = base()
        .node("Mul", &["x", "x"], &["sq"], vec![])
        .node("Gemm", &["sq", "W0", "B0"], &["prediction"], vec![])
        .output("prediction", DataType::F32, Some(&[-1, 2]))
        .build();
    other_reason(&scaled_input);
    let weights_from_input = GraphBuilder::new("bilinear")
        .input("x", DataType::F32, Some(&[-1, 2]))
        .input("w", DataType::F32, Some(&[2, 2]))
        .node("Gemm", &["x", "w"], &["y"], vec![])
        .output("y", DataType::F32, None)
        .build();
    other_reason(&weights_from_input);
    assert_eq!(recognise(&ModelProto::default()), Err(GraphError::NoGraph));
}

#[test]
fn malformed_linear_graphs_are_errors() {
    let model = GraphBuilder::new("short")
        .input("x", DataType::F32, Some(&[-1, 3]))
        .initializer(TensorProto::f32("W", &[3, 2], vec![1.0; 5]))
        .node("Gemm", &["x", "W"], &["y"], vec![])
        .output("y", DataType::F32, None)
        .build();
    assert!(matches!(recognise(&model), Err(GraphError::Tensor { .. })));
    let huge = GraphBuilder::new("huge")
        .input("x", DataType::F32, Some(&[-1, 3]))
        .initializer(TensorProto::f32("W", &[1 << 40, 1 << 40], vec![1.0; 4]))
        .node("Gemm", &["x", "W"], &["y"], vec![])
        .output("y", DataType::F32, None)
        .build();
    assert!(matches!(recognise(&huge), Err(GraphError::TooLarge { .. })));
    let wrong_width = GraphBuilder::new("wide")
        .input("x", DataType::F32, Some(&[-1, 4]))
        .initializer(TensorProto::f32("W", &[3, 2], vec![1.0; 6]))
        .node("Gemm", &["x", "W"], &["y"], vec![])
        .output("y", DataType::F32, None)
        .build();
    assert!(matches!(
        recognise(&wrong_width),
        Err(GraphError::Node { .. })
    ));
}

/// A small valid regressor: one tree, node 0 splits feature 1 at 0.5 into leaves 1 (true) and 2.
fn small_tree() -> Vec<AttributeProto> {
    vec![
        AttributeProto::ints("nodes_treeids", vec![0, 0, 0]),
        AttributeProto::ints("nodes_nodeids", vec![0, 1, 2]),
        AttributeProto::ints("nodes_featureids", vec![1, 0, 0]),
        AttributeProto::strings("nodes_modes", &["BRANCH_LEQ", "LEAF", "LEAF"]),
        AttributeProto::floats("nodes_values", vec![0.5, 0.0, 0.0]),
        AttributeProto::ints("nodes_truenodeids", vec![1, 0, 0]),
        AttributeProto::ints("nodes_falsenodeids", vec![2, 0, 0]),
        AttributeProto::ints("target_treeids", vec![0, 0]),
        AttributeProto::ints("target_nodeids", vec![1, 2]),
        AttributeProto::ints("target_ids", vec![0, 0]),
        AttributeProto::floats("target_weights", vec![10.0, 20.0]),
        AttributeProto::int("n_targets", 1),
        AttributeProto::floats("base_values", vec![1.0]),
    ]
}

fn with(mut attributes: Vec<AttributeProto>, replace: AttributeProto) -> Vec<AttributeProto> {
    attributes.retain(|a| a.name != replace.name);
    attributes.push(replace);
    attributes
}

fn regressor(attributes: Vec<AttributeProto>) -> ModelProto {
    tree_model("TreeEnsembleRegressor", 3, attributes, &["variable"])
}

#[test]
fn a_tree_regressor_is_read_with_its_semantics() {
    let Recognised::Trees(e) = recognise(&regressor(small_tree())).unwrap() else {
        panic!("not trees")
    };
    assert_eq!((e.features, e.outputs, e.trees.len()), (3, 1, 1));
    assert_eq!(e.aggregate, Aggregate::Sum);
    assert_eq!(e.post_transform, PostTransform::None);
    assert_eq!(e.kind, EnsembleKind::Regressor);
    assert_eq!(e.raw(&[9.0, 0.5, 9.0]), vec![11.0]);
    assert_eq!(e.raw(&[9.0, 0.6, 9.0]), vec![21.0]);
    // NaN goes false unless missing values track true.
    assert_eq!(e.raw(&[0.0, f64::NAN, 0.0]), vec![21.0]);
    let tracks = regressor(with(
        small_tree(),
        AttributeProto::ints("nodes_missing_value_tracks_true", vec![1, 0, 0]),
    ));
    let Recognised::Trees(t) = recognise(&tracks).unwrap() else {
        panic!("not trees")
    };
    assert_eq!(t.raw(&[0.0, f64::NAN, 0.0]), vec![11.0]);
    // A feature that decides alone gets all of the difference.
    let e2 = tree::explain(&e, &[0.0, 0.0, 0.0], &[0.0, 1.0, 0.0, 0.0, 0.0, 0.0]).unwrap();
    assert_eq!(e2.rows[0][0].base_value, 16.0);
    assert_eq!(e2.rows[0][0].values, vec![0.0, -5.0, 0.0]);
    // Cast and Identity between input and trees are fine; a doubles tensor of thresholds too.
    let doubles = with(
        small_tree(),
        AttributeProto::tensor(
            "nodes_values_as_tensor",
            TensorProto {
                name: String::new(),
                dims: vec![3],
                data_type: DataType::F64.onnx_code(),
                double_data: vec![0.5, 0.0, 0.0],
                ..Default::default()
            },
        ),
    )
    .into_iter()
    .filter(|a| a.name != "nodes_values")
    .collect();
    let cast = GraphBuilder::new("cast")
        .opset("ai.onnx.ml", 3)
        .input("X", DataType::F32, Some(&[-1, 3]))
        .node("Cast", &["X"], &["Xd"], vec![AttributeProto::int("to", 11)])
        .node_in(
            "ai.onnx.ml",
            "TreeEnsembleRegressor",
            &["Xd"],
            &["variable"],
            doubles,
        )
        .output("variable", DataType::F64, None)
        .build();
    assert!(matches!(recognise(&cast).unwrap(), Recognised::Trees(_)));
}

#[test]
fn trees_after_a_transform_or_aggregated_by_min_are_other_models() {
    let scaled = GraphBuilder::new("scaled")
        .opset("ai.onnx.ml", 3)
        .input("X", DataType::F32, Some(&[-1, 3]))
        .node_in(
            "ai.onnx.ml",
            "Scaler",
            &["X"],
            &["S"],
            vec![AttributeProto::floats("scale", vec![2.0])],
        )
        .node_in(
            "ai.onnx.ml",
            "TreeEnsembleRegressor",
            &["S"],
            &["variable"],
            small_tree(),
        )
        .output("variable", DataType::F32, None)
        .build();
    assert!(other_reason(&scaled).contains("transformed"));
    let min = regressor(with(
        small_tree(),
        AttributeProto::string("aggregate_function", "MIN"),
    ));
    assert!(other_reason(&min).contains("MIN"));
}

#[test]
fn hostile_tree_ensembles_are_errors_not_panics() {
    let cases: Vec<(&str, Vec<AttributeProto>)> = vec![
        (
            "child out of range",
            with(
                small_tree(),
                AttributeProto::ints("nodes_truenodeids", vec![7, 0, 0]),
            ),
        ),
        (
            "cycle",
            with(
                small_tree(),
                AttributeProto::ints("nodes_truenodeids", vec![0, 0, 0]),
            ),
        ),
        (
            "node count mismatch",
            with(
                small_tree(),
                AttributeProto::ints("nodes_featureids", vec![1, 0]),
            ),
        ),
        (
            "mode count mismatch",
            with(
                small_tree(),
                AttributeProto::strings("nodes_modes", &["BRANCH_LEQ"]),
            ),
        ),
        (
            "unknown mode",
            with(
                small_tree(),
                AttributeProto::strings("nodes_modes", &["BRANCH_XX", "LEAF", "LEAF"]),
            ),
        ),
        (
            "weight on a branch",
            with(
                small_tree(),
                AttributeProto::ints("target_nodeids", vec![0, 2]),
            ),
        ),
        (
            "weight on a missing node",
            with(
                small_tree(),
                AttributeProto::ints("target_nodeids", vec![1, 9]),
            ),
        ),
        (
            "target out of range",
            with(small_tree(), AttributeProto::ints("target_ids", vec![0, 3])),
        ),
        (
            "weights count mismatch",
            with(
                small_tree(),
                AttributeProto::floats("target_weights", vec![1.0]),
            ),
        ),
        (
            "duplicate node",
            with(
                small_tree(),
                AttributeProto::ints("nodes_nodeids", vec![0, 1, 1]),
            ),
        ),
        (
            "huge n_targets",
            with(small_tree(), AttributeProto::int("n_targets", 1 << 40)),
        ),
        (
            "negative n_targets",
            with(small_tree(), AttributeProto::int("n_targets", -1)),
        ),
        (
            "huge feature id",
            with(
                small_tree(),
                AttributeProto::ints("nodes_featureids", vec![1 << 40, 0, 0]),
            ),
        ),
        (
            "negative feature id",
            with(
                small_tree(),
                AttributeProto::ints("nodes_featureids", vec![-1, 0, 0]),
            ),
        ),
        (
            "feature beyond the input",
            with(
                small_tree(),
                AttributeProto::ints("nodes_featureids", vec![3, 0, 0]),
            ),
        ),
        (
            "base values count",
            with(
                small_tree(),
                AttributeProto::floats("base_values", vec![1.0, 2.0]),
            ),
        ),
        ("no nodes", vec![AttributeProto::int("n_targets", 1)]),
        (
            "split tree ids",
            with(
                with(
                    small_tree(),
                    AttributeProto::ints("nodes_treeids", vec![0, 1, 0]),
                ),
                AttributeProto::ints("target_treeids", vec![1, 0]),
            ),
        ),
    ];
    for (what, attributes) in cases {
        let result = recognise(&regressor(attributes));
        assert!(result.is_err(), "{what}: {result:?}");
    }
    let huge = recognise(&regressor(with(
        small_tree(),
        AttributeProto::int("n_targets", 1 << 40),
    )));
    assert!(matches!(huge, Err(GraphError::TooLarge { limit, .. }) if limit == MAX_OUTPUTS as u64));

    // The opset-5 operator: a root out of range, a cycle through interior nodes, a leaf index out of range.
    let mut rng = rng(11);
    let t = loop {
        let t = random_tree(3, 3, 1, true, &mut rng);
        if matches!(t, TestNode::Branch { .. }) {
            break t;
        }
    };
    let good = opset5_attributes(&[t], 1, false);
    assert!(matches!(
        recognise(&tree_model("TreeEnsemble", 3, good.clone(), &["Y"])).unwrap(),
        Recognised::Trees(_)
    ));
    let n = good
        .iter()
        .find(|a| a.name == "nodes_featureids")
        .unwrap()
        .ints
        .len();
    let bad = [
        with(
            good.clone(),
            AttributeProto::ints("tree_roots", vec![n as i64]),
        ),
        with(
            good.clone(),
            AttributeProto::ints("nodes_truenodeids", vec![0; n]),
        )
        .into_iter()
        .map(|mut a| {
            if a.name == "nodes_trueleafs" {
                a.ints = vec![0; n];
            }
            a
        })
        .collect(),
        with(
            good.clone(),
            AttributeProto::ints("nodes_falsenodeids", vec![1 << 33; n]),
        ),
        with(
            good.clone(),
            AttributeProto::ints("nodes_trueleafs", vec![0; n + 1]),
        ),
    ];
    for (i, attributes) in bad.into_iter().enumerate() {
        let result = recognise(&tree_model("TreeEnsemble", 3, attributes, &["Y"]));
        assert!(result.is_err(), "opset-5 case {i}: {result:?}");
    }
}

#[test]
fn a_very_deep_tree_is_read_and_explained_without_recursion() {
    // A chain of 200,000 splits: node i splits feature i % 4 and either ends in a leaf or continues.
    let depth = 200_000i64;
    let n = 2 * depth + 1;
    let mut modes = Vec::with_capacity(n as usize);
    let (mut features, mut yes, mut no, mut values) = (vec![], vec![], vec![], vec![]);
    let (mut w_nodes, mut w_values) = (vec![], vec![]);
    for i in 0..depth {
        // Branch node 2i: true → leaf 2i+1, false → next branch 2i+2.
        modes.push("BRANCH_LT");
        features.push(i % 4);
        values.push((i % 7) as f32);
        yes.push(2 * i + 1);
        no.push(2 * i + 2);
        modes.push("LEAF");
        features.push(0);
        values.push(0.0);
        yes.push(0);
        no.push(0);
        w_nodes.push(2 * i + 1);
        w_values.push(i as f32);
    }
    modes.push("LEAF");
    features.push(0);
    values.push(0.0);
    yes.push(0);
    no.push(0);
    w_nodes.push(n - 1);
    w_values.push(-1.0);
    let attributes = vec![
        AttributeProto::ints("nodes_treeids", vec![0; n as usize]),
        AttributeProto::ints("nodes_nodeids", (0..n).collect()),
        AttributeProto::ints("nodes_featureids", features),
        AttributeProto::strings("nodes_modes", &modes),
        AttributeProto::floats("nodes_values", values),
        AttributeProto::ints("nodes_truenodeids", yes),
        AttributeProto::ints("nodes_falsenodeids", no),
        AttributeProto::ints("target_treeids", vec![0; w_nodes.len()]),
        AttributeProto::ints("target_ids", vec![0; w_nodes.len()]),
        AttributeProto::ints("target_nodeids", w_nodes),
        AttributeProto::floats("target_weights", w_values),
        AttributeProto::int("n_targets", 1),
    ];
    let Recognised::Trees(e) = recognise(&tree_model(
        "TreeEnsembleRegressor",
        4,
        attributes,
        &["variable"],
    ))
    .unwrap() else {
        panic!("not trees")
    };
    assert_eq!(e.node_count(), n as usize);
    let x = [10.0, 10.0, 10.0, 10.0];
    let z = [0.5, 3.5, 6.5, 2.5];
    let answer = tree::explain(&e, &x, &z).unwrap();
    let a = &answer.rows[0][0];
    close(a.total(), e.raw(&x)[0], 1e-9, "additivity");
    close(a.base_value, e.raw(&z)[0], 1e-9, "base");
}
