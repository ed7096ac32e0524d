//! Test helpers: a brute-force Shapley reference, random trees with their own evaluator, and their export as
//! ONNX tree-ensemble nodes. Nothing here uses the crate's algorithms.
#![allow(dead_code)]

use ferry_model::onnx::{AttributeProto, GraphBuilder, ModelProto, TensorProto};
use ferry_model::DataType;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Base value and Shapley values of every output, by enumerating all subsets:
/// v(S) = mean over background rows z of f(x_S, z_S̄), φ_i = Σ_{S∌i} |S|!(M−|S|−1)!/M! (v(S∪i) − v(S)).
pub fn brute_force(
    f: &dyn Fn(&[f64]) -> Vec<f64>,
    x: &[f64],
    background: &[Vec<f64>],
) -> Vec<(f64, Vec<f64>)> {
    let m = x.len();
    assert!(m <= 14, "brute force over {m} features");
    let value = |s: usize| -> Vec<f64> {
        let mut sum: Vec<f64> = Vec::new();
        for z in background {
            let mixed: Vec<f64> = (0..m)
                .map(|j| if s >> j & 1 == 1 { x[j] } else { z[j] })
                .collect();
            let y = f(&mixed);
            if sum.is_empty() {
                sum = vec![0.0; y.len()];
            }
            sum.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
        }
        sum.iter().map(|v| v / background.len() as f64).collect()
    };
    let values: Vec<Vec<f64>> = (0..1usize << m).map(value).collect();
    let factorial = |n: usize| (1..=n).map(|i| i as f64).product::<f64>();
    let outputs = values[0].len();
    (0..outputs)
        .map(|k| {
            let phi = (0..m)
                .map(|i| {
                    (0..1usize << m)
                        .filter(|s| s >> i & 1 == 0)
                        .map(|s| {
                            let size = s.count_ones() as usize;
                            let w = factorial(size) * factorial(m - size - 1) / factorial(m);
                            w * (values[s | 1 << i][k] - values[s][k])
                        })
                        .sum()
                })
                .collect();
            (values[0][k], phi)
        })
        .collect()
}

/// Asserts two numbers agree to `tol` relative to the larger magnitude (or 1).
pub fn close(a: f64, b: f64, tol: f64, what: &str) {
    let scale = a.abs().max(b.abs()).max(1.0);
    assert!(
        (a - b).abs() <= tol * scale,
        "{what}: {a} vs {b} (difference {})",
        (a - b).abs()
    );
}

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// A tree of the tests' own making.
#[derive(Debug, Clone)]
pub enum TestNode {
    Branch {
        feature: usize,
        threshold: f64,
        mode: &'static str,
        missing_true: bool,
        yes: Box<TestNode>,
        no: Box<TestNode>,
    },
    Leaf(Vec<(usize, f64)>),
}

pub const MODES: [&str; 6] = [
    "BRANCH_LEQ",
    "BRANCH_LT",
    "BRANCH_GTE",
    "BRANCH_GT",
    "BRANCH_EQ",
    "BRANCH_NEQ",
];

/// Feature values are drawn from this grid (and sometimes NaN), thresholds too, so equality splits matter.
pub const GRID: [f64; 5] = [0.0, 1.0, 2.0, 3.0, 4.0];

pub fn random_row(features: usize, rng: &mut ChaCha8Rng, nan: bool) -> Vec<f64> {
    (0..features)
        .map(|_| {
            if nan && rng.random_range(0..10) == 0 {
                f64::NAN
            } else {
                GRID[rng.random_range(0..GRID.len())]
            }
        })
        .collect()
}

/// A random tree of at most `depth` levels of splits; leaves add to `outputs` outputs (all of them, or one at
/// random when `sparse`).
pub fn random_tree(
    depth: usize,
    features: usize,
    outputs: usize,
    sparse: bool,
    rng: &mut ChaCha8Rng,
) -> TestNode {
    if depth == 0 || (depth < 4 && rng.random_range(0..4) == 0) {
        let values = if sparse {
            vec![(rng.random_range(0..outputs), rng.random_range(-2.0..2.0))]
        } else {
            (0..outputs)
                .map(|k| (k, rng.random_range(-2.0..2.0)))
                .collect()
        };
        return TestNode::Leaf(values);
    }
    TestNode::Branch {
        feature: rng.random_range(0..features),
        threshold: GRID[rng.random_range(0..GRID.len())]
            + if rng.random::<bool>() { 0.5 } else { 0.0 },
        mode: MODES[rng.random_range(0..MODES.len())],
        missing_true: rng.random::<bool>(),
        yes: Box::new(random_tree(depth - 1, features, outputs, sparse, rng)),
        no: Box::new(random_tree(depth - 1, features, outputs, sparse, rng)),
    }
}

/// The leaf values a row reaches, by ONNX Runtime's rule: the comparison, or NaN tracking the true branch.
pub fn evaluate(tree: &TestNode, row: &[f64]) -> Vec<(usize, f64)> {
    match tree {
        TestNode::Leaf(v) => v.clone(),
        TestNode::Branch {
            feature,
            threshold,
            mode,
            missing_true,
            yes,
            no,
        } => {
            let x = row[*feature];
            let t = *threshold;
            let holds = match *mode {
                "BRANCH_LEQ" => x <= t,
                "BRANCH_LT" => x < t,
                "BRANCH_GTE" => x >= t,
                "BRANCH_GT" => x > t,
                "BRANCH_EQ" => x == t,
                "BRANCH_NEQ" => x != t,
                _ => unreachable!(),
            };
            if holds || (x.is_nan() && *missing_true) {
                evaluate(yes, row)
            } else {
                evaluate(no, row)
            }
        }
    }
}

/// The raw margins of an ensemble: sum (or mean) over trees plus base values.
pub fn ensemble_margin(
    trees: &[TestNode],
    outputs: usize,
    base: &[f64],
    average: bool,
    row: &[f64],
) -> Vec<f64> {
    let mut out = vec![0.0; outputs];
    for t in trees {
        for (k, v) in evaluate(t, row) {
            out[k] += v;
        }
    }
    if average {
        out.iter_mut().for_each(|o| *o /= trees.len() as f64);
    }
    out.iter_mut().zip(base).for_each(|(o, b)| *o += b);
    out
}

/// The attributes of the legacy tree-ensemble operators: nodes with shuffled ids, each tree's root first and its
/// other nodes in shuffled order.
pub struct LegacyAttributes {
    pub tree_ids: Vec<i64>,
    pub node_ids: Vec<i64>,
    pub features: Vec<i64>,
    pub modes: Vec<&'static str>,
    pub values: Vec<f32>,
    pub yes: Vec<i64>,
    pub no: Vec<i64>,
    pub missing: Vec<i64>,
    pub w_tree: Vec<i64>,
    pub w_node: Vec<i64>,
    pub w_id: Vec<i64>,
    pub w_value: Vec<f32>,
}

pub fn legacy_attributes(trees: &[TestNode], rng: &mut ChaCha8Rng) -> LegacyAttributes {
    let mut a = LegacyAttributes {
        tree_ids: vec![],
        node_ids: vec![],
        features: vec![],
        modes: vec![],
        values: vec![],
        yes: vec![],
        no: vec![],
        missing: vec![],
        w_tree: vec![],
        w_node: vec![],
        w_id: vec![],
        w_value: vec![],
    };
    for (t, tree) in trees.iter().enumerate() {
        // Flatten in pre-order, then give every node a shuffled id.
        let mut flat: Vec<&TestNode> = Vec::new();
        let mut children: Vec<(usize, usize)> = Vec::new();
        fn walk<'a>(
            n: &'a TestNode,
            flat: &mut Vec<&'a TestNode>,
            children: &mut Vec<(usize, usize)>,
        ) -> usize {
            let me = flat.len();
            flat.push(n);
            children.push((0, 0));
            if let TestNode::Branch { yes, no, .. } = n {
                let y = walk(yes, flat, children);
                let f = walk(no, flat, children);
                children[me] = (y, f);
            }
            me
        }
        walk(tree, &mut flat, &mut children);
        let mut ids: Vec<i64> = (0..flat.len() as i64).map(|i| i * 3 + 7).collect();
        ids.shuffle(rng);
        let mut order: Vec<usize> = (1..flat.len()).collect();
        order.shuffle(rng);
        order.insert(0, 0);
        for &i in &order {
            a.tree_ids.push(t as i64 * 5 + 2);
            a.node_ids.push(ids[i]);
            match flat[i] {
                TestNode::Branch {
                    feature,
                    threshold,
                    mode,
                    missing_true,
                    ..
                } => {
                    a.features.push(*feature as i64);
                    a.modes.push(mode);
                    a.values.push(*threshold as f32);
                    a.yes.push(ids[children[i].0]);
                    a.no.push(ids[children[i].1]);
                    a.missing.push(i64::from(*missing_true));
                }
                TestNode::Leaf(values) => {
                    a.features.push(0);
                    a.modes.push("LEAF");
                    a.values.push(0.0);
                    a.yes.push(0);
                    a.no.push(0);
                    a.missing.push(0);
                    for &(k, v) in values {
                        a.w_tree.push(t as i64 * 5 + 2);
                        a.w_node.push(ids[i]);
                        a.w_id.push(k as i64);
                        a.w_value.push(v as f32);
                    }
                }
            }
        }
    }
    a
}

impl LegacyAttributes {
    /// The attributes of a node, `prefix` `class` or `target`.
    pub fn to_attributes(&self, prefix: &str) -> Vec<AttributeProto> {
        vec![
            AttributeProto::ints("nodes_treeids", self.tree_ids.clone()),
            AttributeProto::ints("nodes_nodeids", self.node_ids.clone()),
            AttributeProto::ints("nodes_featureids", self.features.clone()),
            AttributeProto::strings("nodes_modes", &self.modes),
            AttributeProto::floats("nodes_values", self.values.clone()),
            AttributeProto::ints("nodes_truenodeids", self.yes.clone()),
            AttributeProto::ints("nodes_falsenodeids", self.no.clone()),
            AttributeProto::ints("nodes_missing_value_tracks_true", self.missing.clone()),
            AttributeProto::ints(&format!("{prefix}_treeids"), self.w_tree.clone()),
            AttributeProto::ints(&format!("{prefix}_nodeids"), self.w_node.clone()),
            AttributeProto::ints(&format!("{prefix}_ids"), self.w_id.clone()),
            AttributeProto::floats(&format!("{prefix}_weights"), self.w_value.clone()),
        ]
    }
}

/// Trees with every threshold and weight rounded to f32, as the graph stores them.
pub fn rounded(tree: &TestNode) -> TestNode {
    match tree {
        TestNode::Leaf(v) => {
            TestNode::Leaf(v.iter().map(|&(k, w)| (k, f64::from(w as f32))).collect())
        }
        TestNode::Branch {
            feature,
            threshold,
            mode,
            missing_true,
            yes,
            no,
        } => TestNode::Branch {
            feature: *feature,
            threshold: f64::from(*threshold as f32),
            mode,
            missing_true: *missing_true,
            yes: Box::new(rounded(yes)),
            no: Box::new(rounded(no)),
        },
    }
}

/// A model of one tree-ensemble node reading `features` float features.
pub fn tree_model(
    op: &str,
    features: i64,
    attributes: Vec<AttributeProto>,
    outputs: &[&str],
) -> ModelProto {
    let mut g = GraphBuilder::new("trees")
        .opset("ai.onnx.ml", if op == "TreeEnsemble" { 5 } else { 3 })
        .input("X", DataType::F32, Some(&[-1, features]));
    for o in outputs {
        g = g.output(o, DataType::F32, None);
    }
    g.node_in("ai.onnx.ml", op, &["X"], outputs, attributes)
        .build()
}

/// The opset-5 `TreeEnsemble` attributes of regression trees with single-target leaves.
pub fn opset5_attributes(trees: &[TestNode], outputs: i64, average: bool) -> Vec<AttributeProto> {
    let mut features = vec![];
    let mut splits = vec![];
    let mut modes = vec![];
    let mut yes = vec![];
    let mut no = vec![];
    let mut yes_leaf = vec![];
    let mut no_leaf = vec![];
    let mut missing = vec![];
    let mut roots = vec![];
    let mut leaf_targets = vec![];
    let mut leaf_weights = vec![];
    // Returns (is_leaf, index).
    #[allow(clippy::too_many_arguments)]
    fn add(
        n: &TestNode,
        features: &mut Vec<i64>,
        splits: &mut Vec<f32>,
        modes: &mut Vec<u8>,
        yes: &mut Vec<i64>,
        no: &mut Vec<i64>,
        yes_leaf: &mut Vec<i64>,
        no_leaf: &mut Vec<i64>,
        missing: &mut Vec<i64>,
        leaf_targets: &mut Vec<i64>,
        leaf_weights: &mut Vec<f32>,
    ) -> (i64, i64) {
        match n {
            TestNode::Leaf(v) => {
                assert_eq!(v.len(), 1, "opset-5 leaves have one target");
                leaf_targets.push(v[0].0 as i64);
                leaf_weights.push(v[0].1 as f32);
                (1, leaf_weights.len() as i64 - 1)
            }
            TestNode::Branch {
                feature,
                threshold,
                mode,
                missing_true,
                yes: y,
                no: f,
            } => {
                let me = features.len();
                features.push(*feature as i64);
                splits.push(*threshold as f32);
                modes.push(MODES.iter().position(|m| m == mode).unwrap() as u8);
                yes.push(0);
                no.push(0);
                yes_leaf.push(0);
                no_leaf.push(0);
                missing.push(i64::from(*missing_true));
                let (yl, yi) = add(
                    y,
                    features,
                    splits,
                    modes,
                    yes,
                    no,
                    yes_leaf,
                    no_leaf,
                    missing,
                    leaf_targets,
                    leaf_weights,
                );
                let (nl, ni) = add(
                    f,
                    features,
                    splits,
                    modes,
                    yes,
                    no,
                    yes_leaf,
                    no_leaf,
                    missing,
                    leaf_targets,
                    leaf_weights,
                );
                yes[me] = yi;
                yes_leaf[me] = yl;
                no[me] = ni;
                no_leaf[me] = nl;
                (0, me as i64)
            }
        }
    }
    for t in trees {
        let (leaf, index) = add(
            t,
            &mut features,
            &mut splits,
            &mut modes,
            &mut yes,
            &mut no,
            &mut yes_leaf,
            &mut no_leaf,
            &mut missing,
            &mut leaf_targets,
            &mut leaf_weights,
        );
        assert_eq!(leaf, 0, "a root is a split");
        roots.push(index);
    }
    let n = features.len() as i64;
    vec![
        AttributeProto::ints("nodes_featureids", features),
        AttributeProto::tensor("nodes_splits", TensorProto::f32("", &[n], splits)),
        AttributeProto::tensor(
            "nodes_modes",
            TensorProto::raw("", DataType::U8, &[n], modes),
        ),
        AttributeProto::ints("nodes_truenodeids", yes),
        AttributeProto::ints("nodes_falsenodeids", no),
        AttributeProto::ints("nodes_trueleafs", yes_leaf),
        AttributeProto::ints("nodes_falseleafs", no_leaf),
        AttributeProto::ints("nodes_missing_value_tracks_true", missing),
        AttributeProto::ints("tree_roots", roots),
        AttributeProto::ints("leaf_targetids", leaf_targets),
        AttributeProto::tensor(
            "leaf_weights",
            TensorProto::f32("", &[leaf_weights.len() as i64], leaf_weights),
        ),
        AttributeProto::int("n_targets", outputs),
        AttributeProto::int("aggregate_function", if average { 0 } else { 1 }),
    ]
}
