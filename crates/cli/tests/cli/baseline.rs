//! `ferry baseline` writes per-feature statistics into a model's ferry.json and keeps what was there, and a seeded
//! sample of the data's rows as background.csv.

use std::process::Command;

use super::common::ferry;

#[test]
fn baseline_adds_feature_stats_and_keeps_other_keys() {
    let dir = std::env::temp_dir().join(format!("ferry-baseline-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("ferry.json"),
        r#"{"classes": ["a", "b"], "note": "kept"}"#,
    )
    .unwrap();
    let data = dir.join("data.csv");
    std::fs::write(&data, "x,y,label\n1,10,a\n2,20,b\n3,30,a\n4,40,b\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["baseline", dir.to_str().unwrap(), data.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ferry.json")).unwrap()).unwrap();
    assert_eq!(meta["note"], "kept");
    assert_eq!(meta["classes"], serde_json::json!(["a", "b"]));
    assert_eq!(meta["features"], serde_json::json!(["x", "y"]));
    let stats = meta["feature_stats"].as_array().unwrap();
    assert_eq!(stats.len(), 2);
    assert_eq!(stats[1]["name"], "y");
    assert_eq!(stats[1]["mean"], 25.0);
    assert_eq!(
        stats[1]["histogram"]["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .sum::<u64>(),
        4
    );
    // Fewer rows than the default 100: all of them, in the model's feature order.
    let background = ferry_train::read_background(&dir.join("background.csv")).unwrap();
    assert_eq!(background.features, ["x", "y"]);
    assert_eq!(
        background.values,
        [1.0, 10.0, 2.0, 20.0, 3.0, 30.0, 4.0, 40.0]
    );
    // A seeded sample: the same seed, the same rows.
    let baseline = |rows: &str, seed: &str| {
        let (dir, data) = (dir.to_str().unwrap(), data.to_str().unwrap());
        ferry(&[
            "baseline",
            dir,
            data,
            "--background-rows",
            rows,
            "--seed",
            seed,
        ])
    };
    let sample = |seed: &str| {
        assert!(baseline("2", seed).status.success());
        ferry_train::read_background(&dir.join("background.csv")).unwrap()
    };
    let first = sample("3");
    assert_eq!(first.rows, 2);
    assert_eq!(sample("3"), first);
    let out = baseline("1001", "0");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("from 0 to 1000"));
    // A missing directory is a clear error.
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "baseline",
            dir.join("nope").to_str().unwrap(),
            data.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a model version directory"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn baseline_runs_the_model_for_its_prediction_baseline() {
    let dir = std::env::temp_dir().join(format!("ferry-baseline-model-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/data/iris.csv");
    let trained = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "train",
            data.to_str().unwrap(),
            "--model",
            "softmax",
            "--quiet",
            "--out",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        trained.status.success(),
        "{}",
        String::from_utf8_lossy(&trained.stderr)
    );
    // As if the model came from elsewhere: only its class list stays.
    std::fs::write(dir.join("ferry.json"), r#"{"note": "kept"}"#).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("baseline")
        .arg(&dir)
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("and 1 output (label)"), "{said}");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ferry.json")).unwrap()).unwrap();
    assert_eq!(meta["note"], "kept");
    // `label` (one string per row) is tracked; `probabilities` (three columns) is not.
    let stats = meta["prediction_stats"].as_array().unwrap();
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0]["output"], "label");
    assert_eq!(stats[0]["kind"], "categorical");
    assert_eq!(stats[0]["rows"], 150);
    assert_eq!(
        stats[0]["classes"],
        serde_json::json!(["setosa", "versicolor", "virginica"])
    );
    // --no-predictions leaves the model alone.
    std::fs::write(dir.join("ferry.json"), "{}").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("baseline")
        .arg(&dir)
        .arg(&data)
        .arg("--no-predictions")
        .output()
        .unwrap();
    assert!(out.status.success());
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ferry.json")).unwrap()).unwrap();
    assert!(meta.get("prediction_stats").is_none());
    let _ = std::fs::remove_dir_all(dir);
}
