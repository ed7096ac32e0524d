//! Every method against an independent brute-force Shapley computation of the same interventional game.

mod common;

use common::*;
use ferry_explain::kernel::{self, KernelOptions};
use ferry_explain::model::{EnsembleKind, LinearSpace};
use ferry_explain::{linear, recognise, tree, Explanation, Method, Recognised};
use ferry_model::onnx::{AttributeProto, GraphBuilder, TensorProto};
use ferry_model::DataType;
use rand::RngExt;

fn flat(rows: &[Vec<f64>]) -> Vec<f64> {
    rows.iter().flatten().copied().collect()
}

/// Compares an explanation with the brute-force values of `f`, and checks additivity against `f(x)`.
fn check_against_brute_force(
    e: &Explanation,
    f: &dyn Fn(&[f64]) -> Vec<f64>,
    rows: &[Vec<f64>],
    background: &[Vec<f64>],
    tol: f64,
) {
    assert_eq!(e.rows.len(), rows.len());
    assert_eq!(e.background_rows, background.len());
    for (r, x) in rows.iter().enumerate() {
        let expected = brute_force(f, x, background);
        let fx = f(x);
        assert_eq!(e.rows[r].len(), expected.len(), "outputs");
        for (k, (base, phi)) in expected.iter().enumerate() {
            let got = &e.rows[r][k];
            close(
                got.base_value,
                *base,
                tol,
                &format!("row {r} output {k} base"),
            );
            for (j, p) in phi.iter().enumerate() {
                close(
                    got.values[j],
                    *p,
                    tol,
                    &format!("row {r} output {k} feature {j}"),
                );
            }
            close(
                got.total(),
                fx[k],
                1e-9,
                &format!("row {r} output {k} additivity"),
            );
        }
    }
}

#[test]
fn linear_attributions_equal_brute_force_with_imputation() {
    let mut rng = rng(1);
    let (features, outputs) = (6, 3);
    // ferry train's layout: W as [features, outputs], transB = 0.
    let w: Vec<f32> = (0..features * outputs)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    let b: Vec<f32> = (0..outputs).map(|_| rng.random_range(-1.0..1.0)).collect();
    let fill: Vec<f32> = (0..features).map(|_| rng.random_range(-1.0..1.0)).collect();
    let model = GraphBuilder::new("linear")
        .input("features", DataType::F32, Some(&[-1, features as i64]))
        .initializer(TensorProto::f32(
            "impute_values",
            &[features as i64],
            fill.clone(),
        ))
        .initializer(TensorProto::f32(
            "W0",
            &[features as i64, outputs as i64],
            w.clone(),
        ))
        .initializer(TensorProto::f32("B0", &[outputs as i64], b.clone()))
        .node("IsNaN", &["features"], &["missing"], vec![])
        .node(
            "Where",
            &["missing", "impute_values", "features"],
            &["imputed"],
            vec![],
        )
        .node("Gemm", &["imputed", "W0", "B0"], &["prediction"], vec![])
        .output("prediction", DataType::F32, Some(&[-1, outputs as i64]))
        .build();
    let Recognised::Linear(lm) = recognise(&model).unwrap() else {
        panic!("not linear")
    };
    assert_eq!(
        lm.space,
        LinearSpace::Output {
            output: "prediction".into()
        }
    );
    // The test's own model: margin_k = Σ_j W[j][k] x̃_j + b_k.
    let f = |x: &[f64]| -> Vec<f64> {
        (0..outputs)
            .map(|k| {
                f64::from(b[k])
                    + (0..features)
                        .map(|j| {
                            let v = if x[j].is_nan() {
                                f64::from(fill[j])
                            } else {
                                x[j]
                            };
                            f64::from(w[j * outputs + k]) * v
                        })
                        .sum::<f64>()
            })
            .collect()
    };
    let background: Vec<Vec<f64>> = (0..7)
        .map(|_| (0..features).map(|_| rng.random_range(-3.0..3.0)).collect())
        .collect();
    let mut rows: Vec<Vec<f64>> = (0..3)
        .map(|_| (0..features).map(|_| rng.random_range(-3.0..3.0)).collect())
        .collect();
    rows[1][2] = f64::NAN;
    let mut bg = background.clone();
    bg[0][4] = f64::NAN;
    let e = linear::explain(&lm, &flat(&rows), &flat(&bg)).unwrap();
    assert_eq!(e.method, Method::Linear);
    assert_eq!(e.method.name(), "linear");
    // The brute force sees the imputed background (a NaN there is its fill value too).
    check_against_brute_force(&e, &f, &rows, &bg, 1e-9);
    // Without imputation a NaN is refused, not explained as NaN.
    let mut plain = lm.clone();
    plain.impute = None;
    assert!(linear::explain(&plain, &flat(&rows), &flat(&background)).is_err());
    assert!(linear::explain(&lm, &flat(&rows), &[]).is_err());
}

/// Explains random ensembles exported as ONNX nodes and compares with the brute force over the tests' own
/// evaluator.
#[allow(clippy::too_many_arguments)]
fn check_trees(
    seed: u64,
    op: &str,
    trees: Vec<TestNode>,
    outputs: usize,
    base: Vec<f64>,
    average: bool,
    features: usize,
    extra: Vec<AttributeProto>,
    model_outputs: &[&str],
) {
    let mut rng = rng(seed);
    let trees: Vec<TestNode> = trees.iter().map(rounded).collect();
    let mut attributes = if op == "TreeEnsemble" {
        opset5_attributes(&trees, outputs as i64, average)
    } else {
        let prefix = if op == "TreeEnsembleClassifier" {
            "class"
        } else {
            "target"
        };
        legacy_attributes(&trees, &mut rng).to_attributes(prefix)
    };
    attributes.extend(extra);
    let model = tree_model(op, features as i64, attributes, model_outputs);
    let Recognised::Trees(ensemble) = recognise(&model).unwrap() else {
        panic!("not trees")
    };
    assert_eq!(ensemble.outputs, outputs);
    assert_eq!(ensemble.features, features);
    assert_eq!(ensemble.trees.len(), trees.len());
    let f = |x: &[f64]| ensemble_margin(&trees, outputs, &base, average, x);
    let background: Vec<Vec<f64>> = (0..6)
        .map(|_| random_row(features, &mut rng, true))
        .collect();
    let rows: Vec<Vec<f64>> = (0..4)
        .map(|_| random_row(features, &mut rng, true))
        .collect();
    for x in rows.iter().chain(&background) {
        let (a, b) = (ensemble.raw(x), f(x));
        for k in 0..outputs {
            close(a[k], b[k], 1e-12, "raw margin");
        }
    }
    let e = tree::explain(&ensemble, &flat(&rows), &flat(&background)).unwrap();
    assert_eq!(e.method, Method::TreeInterventional);
    check_against_brute_force(&e, &f, &rows, &background, 1e-9);
}

#[test]
fn tree_shap_equals_brute_force_for_a_regressor_of_several_targets() {
    let mut rng = rng(2);
    let trees: Vec<TestNode> = (0..4)
        .map(|_| random_tree(5, 7, 2, false, &mut rng))
        .collect();
    let base = vec![0.25, -1.5];
    let extra = vec![
        AttributeProto::int("n_targets", 2),
        AttributeProto::floats("base_values", vec![0.25, -1.5]),
    ];
    check_trees(
        20,
        "TreeEnsembleRegressor",
        trees,
        2,
        base,
        false,
        7,
        extra,
        &["variable"],
    );
}

#[test]
fn tree_shap_equals_brute_force_for_an_averaging_forest() {
    let mut rng = rng(3);
    let trees: Vec<TestNode> = (0..5)
        .map(|_| random_tree(4, 6, 1, false, &mut rng))
        .collect();
    let extra = vec![
        AttributeProto::int("n_targets", 1),
        AttributeProto::string("aggregate_function", "AVERAGE"),
    ];
    check_trees(
        30,
        "TreeEnsembleRegressor",
        trees,
        1,
        vec![0.0],
        true,
        6,
        extra,
        &["variable"],
    );
}

#[test]
fn tree_shap_equals_brute_force_for_a_multiclass_classifier() {
    let mut rng = rng(4);
    // Gradient-boosting style: each leaf scores one class; plus dense leaves.
    let mut trees: Vec<TestNode> = (0..3)
        .map(|_| random_tree(5, 8, 3, true, &mut rng))
        .collect();
    trees.extend((0..2).map(|_| random_tree(4, 8, 3, false, &mut rng)));
    let extra = vec![
        AttributeProto::strings("classlabels_strings", &["a", "b", "c"]),
        AttributeProto::floats("base_values", vec![0.5, -0.25, 1.0]),
        AttributeProto::string("post_transform", "SOFTMAX"),
    ];
    check_trees(
        40,
        "TreeEnsembleClassifier",
        trees,
        3,
        vec![0.5, -0.25, 1.0],
        false,
        8,
        extra,
        &["label", "probabilities"],
    );
}

#[test]
fn tree_shap_equals_brute_force_for_a_binary_boosted_classifier_of_one_column() {
    let mut rng = rng(5);
    let trees: Vec<TestNode> = (0..4)
        .map(|_| random_tree(4, 5, 1, true, &mut rng))
        .collect();
    let extra = vec![
        AttributeProto::ints("classlabels_int64s", vec![0, 1]),
        AttributeProto::floats("base_values", vec![-0.3]),
        AttributeProto::string("post_transform", "LOGISTIC"),
    ];
    let mut rng2 = common::rng(50);
    let t: Vec<TestNode> = trees.iter().map(rounded).collect();
    let attributes = {
        let mut a = legacy_attributes(&t, &mut rng2).to_attributes("class");
        a.extend(extra.clone());
        a
    };
    let model = tree_model(
        "TreeEnsembleClassifier",
        5,
        attributes,
        &["label", "probabilities"],
    );
    let Recognised::Trees(e) = recognise(&model).unwrap() else {
        panic!("not trees")
    };
    assert_eq!(
        e.kind,
        EnsembleKind::Classifier {
            labels: vec!["0".into(), "1".into()],
            binary_single_column: true
        }
    );
    check_trees(
        50,
        "TreeEnsembleClassifier",
        trees,
        1,
        vec![f64::from(-0.3f32)],
        false,
        5,
        extra,
        &["label", "probabilities"],
    );
}

#[test]
fn tree_shap_equals_brute_force_for_the_opset5_operator() {
    let mut rng = rng(6);
    let trees: Vec<TestNode> = (0..3)
        .map(|_| loop {
            let t = random_tree(5, 6, 2, true, &mut rng);
            if matches!(t, TestNode::Branch { .. }) {
                break t;
            }
        })
        .collect();
    check_trees(
        60,
        "TreeEnsemble",
        trees.clone(),
        2,
        vec![0.0, 0.0],
        false,
        6,
        vec![],
        &["Y"],
    );
    check_trees(
        61,
        "TreeEnsemble",
        trees,
        2,
        vec![0.0, 0.0],
        true,
        6,
        vec![],
        &["Y"],
    );
}

#[test]
fn tree_shap_is_additive_on_larger_ensembles() {
    // Too many features for the brute force: additivity and the raw output only.
    let mut rng = rng(7);
    let features = 30;
    let trees: Vec<TestNode> = (0..40)
        .map(|_| random_tree(6, features, 2, false, &mut rng))
        .collect();
    let trees: Vec<TestNode> = trees.iter().map(rounded).collect();
    let mut attributes = legacy_attributes(&trees, &mut rng).to_attributes("target");
    attributes.push(AttributeProto::int("n_targets", 2));
    let model = tree_model(
        "TreeEnsembleRegressor",
        features as i64,
        attributes,
        &["variable"],
    );
    let Recognised::Trees(ensemble) = recognise(&model).unwrap() else {
        panic!("not trees")
    };
    let background: Vec<Vec<f64>> = (0..50)
        .map(|_| random_row(features, &mut rng, true))
        .collect();
    let rows: Vec<Vec<f64>> = (0..5)
        .map(|_| random_row(features, &mut rng, true))
        .collect();
    let e = tree::explain(&ensemble, &flat(&rows), &flat(&background)).unwrap();
    for (r, x) in rows.iter().enumerate() {
        let fx = ensemble_margin(&trees, 2, &[0.0, 0.0], false, x);
        for (a, f) in e.rows[r].iter().zip(&fx) {
            close(a.total(), *f, 1e-9, "additivity");
        }
    }
}

/// A nonlinear model with interactions, two outputs.
fn nonlinear(x: &[f64]) -> Vec<f64> {
    let m = x.len();
    let mut a = (x[0] * x[1]).sin() + x[2] * x[2] - (x[3] * x[m - 1] / 5.0).exp();
    for (j, v) in x.iter().enumerate().skip(4) {
        a += (j as f64 * 0.3) * v.tanh() * x[j % 3];
    }
    let b = x.iter().copied().fold(f64::MIN, f64::max) + x[1] * x[2] * x[0];
    vec![a, b]
}

fn batch_model(
    features: usize,
    calls: &std::cell::RefCell<Vec<usize>>,
) -> impl FnMut(&[f32], usize) -> Result<Vec<f32>, String> + '_ {
    move |data: &[f32], rows: usize| {
        assert_eq!(data.len(), rows * features);
        calls.borrow_mut().push(rows);
        Ok(data
            .chunks_exact(features)
            .flat_map(|r| {
                let x: Vec<f64> = r.iter().map(|&v| f64::from(v)).collect();
                nonlinear(&x).into_iter().map(|v| v as f32)
            })
            .collect())
    }
}

fn f32_rows(rows: &[Vec<f64>]) -> (Vec<f32>, Vec<Vec<f64>>) {
    let flat: Vec<f32> = rows.iter().flatten().map(|&v| v as f32).collect();
    let widened = rows
        .iter()
        .map(|r| r.iter().map(|&v| f64::from(v as f32)).collect())
        .collect();
    (flat, widened)
}

/// `count` random rows as the model takes them (f32) and as the brute force sees them (the same values).
fn random_rows(
    rng: &mut rand_chacha::ChaCha8Rng,
    count: usize,
    features: usize,
) -> (Vec<f32>, Vec<Vec<f64>>) {
    let rows: Vec<Vec<f64>> = (0..count)
        .map(|_| (0..features).map(|_| rng.random_range(-1.5..1.5)).collect())
        .collect();
    f32_rows(&rows)
}

/// The brute force of the f32 model the closure runs.
fn f32_model(x: &[f64]) -> Vec<f64> {
    let x: Vec<f64> = x.iter().map(|&v| f64::from(v as f32)).collect();
    nonlinear(&x)
        .into_iter()
        .map(|v| f64::from(v as f32))
        .collect()
}

#[test]
fn exact_kernel_shap_equals_brute_force_and_does_not_depend_on_batch_size() {
    let mut rng = rng(8);
    let features = 6;
    let (bg, background) = random_rows(&mut rng, 5, features);
    let (xs, rows) = random_rows(&mut rng, 3, features);
    let calls = std::cell::RefCell::new(Vec::new());
    let options = KernelOptions {
        max_rows_per_call: 37,
        ..KernelOptions::default()
    };
    let e = kernel::explain(&xs, &bg, features, &options, batch_model(features, &calls)).unwrap();
    assert_eq!(e.method, Method::KernelExact);
    assert_eq!(e.coalitions, 64);
    // The background once, then per row x and 62 coalitions of 5 rows.
    assert_eq!(e.model_rows, 5 + 3 * (1 + 62 * 5));
    assert!(calls.borrow().iter().all(|&r| r <= 37));
    assert_eq!(calls.borrow().iter().sum::<usize>() as u64, e.model_rows);
    check_against_brute_force(&e, &f32_model, &rows, &background, 1e-6);

    let one_batch = KernelOptions {
        max_rows_per_call: 100_000,
        ..KernelOptions::default()
    };
    let calls = std::cell::RefCell::new(Vec::new());
    let again = kernel::explain(
        &xs,
        &bg,
        features,
        &one_batch,
        batch_model(features, &calls),
    )
    .unwrap();
    assert_eq!(calls.borrow().len(), 1);
    assert_eq!(again, e, "the batch size changed the answer");
}

#[test]
fn the_regression_with_every_coalition_is_exact() {
    // Sampling allowed (exact enumeration off) but a budget covering every coalition: the weighted regression
    // with the efficiency constraint gives the Shapley values.
    let mut rng = rng(9);
    let features = 7;
    let (bg, background) = random_rows(&mut rng, 4, features);
    let (xs, rows) = random_rows(&mut rng, 2, features);
    let options = KernelOptions {
        exact_max_features: 0,
        coalitions: 1 << 20,
        ..KernelOptions::default()
    };
    let calls = std::cell::RefCell::new(Vec::new());
    let e = kernel::explain(&xs, &bg, features, &options, batch_model(features, &calls)).unwrap();
    assert_eq!(e.method, Method::KernelExact);
    assert_eq!(e.coalitions, 128);
    check_against_brute_force(&e, &f32_model, &rows, &background, 1e-6);
}

/// The largest error of sampled KernelSHAP over every attribution of two rows, relative to the largest
/// attribution of its row (over both outputs); checks additivity and the base value on the way.
fn sampled_error(budget: usize, seed: u64) -> (f64, Explanation) {
    let mut rng = rng(10);
    let features = 12;
    let (bg, background) = random_rows(&mut rng, 6, features);
    let (xs, rows) = random_rows(&mut rng, 2, features);
    let options = KernelOptions {
        exact_max_features: 8,
        coalitions: budget,
        seed,
        ..KernelOptions::default()
    };
    let calls = std::cell::RefCell::new(Vec::new());
    let e = kernel::explain(&xs, &bg, features, &options, batch_model(features, &calls)).unwrap();
    assert_eq!(e.method, Method::KernelSampled);
    assert!(e.coalitions <= budget as u64 + 2);
    assert!(e.model_rows <= 6 + 2 * (1 + budget as u64 * 6));
    let mut worst = 0.0f64;
    for (r, x) in rows.iter().enumerate() {
        let expected = brute_force(&f32_model, x, &background);
        let fx = f32_model(x);
        let largest = expected
            .iter()
            .flat_map(|(_, phi)| phi.iter())
            .fold(0.0f64, |a, p| a.max(p.abs()));
        for (k, (base, phi)) in expected.iter().enumerate() {
            let got = &e.rows[r][k];
            close(got.base_value, *base, 1e-6, "base");
            close(got.total(), fx[k], 1e-6, "additivity");
            for (j, p) in phi.iter().enumerate() {
                worst = worst.max((got.values[j] - p).abs() / largest);
            }
        }
    }
    (worst, e)
}

#[test]
fn sampled_kernel_shap_is_close_to_brute_force_additive_and_seeded() {
    // 12 features (4094 coalitions). Stated tolerance: with 600 coalitions (sizes 1, 2, 10 and 11 enumerated
    // whole, 444 sampled) every attribution is within 6% of the largest attribution of its row (measured: 3.9%);
    // with 3000, within 1.5% (measured: 0.6%), and closer than with 600.
    let (coarse, e) = sampled_error(600, 7);
    let (fine, _) = sampled_error(3000, 7);
    eprintln!("sampled KernelSHAP: worst relative error {coarse:.4} with 600 coalitions, {fine:.4} with 3000");
    assert!(coarse <= 0.06, "600 coalitions: {coarse}");
    assert!(
        fine <= 0.015 && fine < coarse,
        "3000 coalitions: {fine} (600: {coarse})"
    );
    assert_eq!(e.method.name(), "kernel_sampled");
    // The same seed gives the same answer; another seed another estimate.
    assert_eq!(sampled_error(600, 7).1, e);
    assert_ne!(sampled_error(600, 8).1.rows, e.rows);
}

#[test]
fn features_equal_to_every_background_row_get_nothing_and_cost_nothing() {
    let features = 5;
    let background: Vec<f32> = vec![1.0, 2.0, 3.0, 4.0, 5.0, 1.0, 0.0, 3.0, -4.0, 5.0];
    let x: Vec<f32> = vec![1.0, 7.0, 3.0, 4.0, 5.0]; // only features 1 and 3 vary
    let calls = std::cell::RefCell::new(Vec::new());
    let e = kernel::explain(
        &x,
        &background,
        features,
        &KernelOptions::default(),
        batch_model(features, &calls),
    )
    .unwrap();
    assert_eq!(e.coalitions, 4);
    assert_eq!(e.model_rows, 2 + 1 + 2 * 2);
    for a in &e.rows[0] {
        assert_eq!(a.values[0], 0.0);
        assert_eq!(a.values[2], 0.0);
        assert_eq!(a.values[4], 0.0);
    }
}

#[test]
fn kernel_shap_refuses_bad_requests_before_running_the_model() {
    let features = 3;
    let never = |_: &[f32], _: usize| -> Result<Vec<f32>, String> { panic!("the model ran") };
    let rows = vec![0.0f32; 6];
    let bg = vec![1.0f32; 3];
    assert!(kernel::explain(&rows, &[], features, &KernelOptions::default(), never).is_err());
    assert!(kernel::explain(&rows[..5], &bg, features, &KernelOptions::default(), never).is_err());
    let tiny = KernelOptions {
        max_model_rows: 5,
        ..KernelOptions::default()
    };
    assert!(matches!(
        kernel::explain(&rows, &bg, features, &tiny, never),
        Err(kernel::KernelError::Explain(
            ferry_explain::ExplainError::TooLarge { .. }
        ))
    ));
    // A sampling budget beyond the row limit is refused before any coalition is drawn.
    let wide: Vec<f32> = (0..40).map(|i| i as f32).collect();
    let greedy = KernelOptions {
        coalitions: 1 << 40,
        ..KernelOptions::default()
    };
    assert!(matches!(
        kernel::explain(&wide, &[0.0; 40], 40, &greedy, never),
        Err(kernel::KernelError::Explain(
            ferry_explain::ExplainError::TooLarge { .. }
        ))
    ));
    // A model answering the wrong number of values is an error, as is the model's own failure.
    let wrong = |_: &[f32], n: usize| -> Result<Vec<f32>, String> { Ok(vec![0.0; n + 1]) };
    assert!(kernel::explain(&rows, &bg, features, &KernelOptions::default(), wrong).is_err());
    let failing = |_: &[f32], _: usize| -> Result<Vec<f32>, String> { Err("engine down".into()) };
    assert!(matches!(
        kernel::explain(&rows, &bg, features, &KernelOptions::default(), failing),
        Err(kernel::KernelError::Model(m)) if m == "engine down"
    ));
}
