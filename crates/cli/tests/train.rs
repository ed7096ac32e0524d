//! `ferry train` and `ferry evaluate` as a user runs them: the binary, real files, `--json` output, publishing
//! versions, and the exit status and message of a bad file. `ferry evaluate` needs ONNX Runtime: run through
//! `scripts/test`, which sets `ORT_DYLIB_PATH`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn ferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .expect("the ferry binary runs")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "ferry failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/data")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn train_then_evaluate_a_classifier() {
    let dir = scratch("iris");
    let out = dir.join("model");
    let trained = json(&ferry(&[
        "train",
        &example("iris.csv"),
        "--model",
        "softmax",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]));
    assert!(trained["accuracy"].as_f64().unwrap() > 0.85, "{trained}");
    assert_eq!(trained["hyper_parameters"]["optimizer"], "adam");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("ferry.json")).unwrap()).unwrap();
    assert_eq!(
        meta["classes"],
        serde_json::json!(["setosa", "versicolor", "virginica"])
    );
    assert_eq!(meta["features"].as_array().unwrap().len(), 4);
    assert_eq!(meta["feature_stats"][0]["count"], 135);
    assert_eq!(meta["training_data"]["sha256"].as_str().unwrap().len(), 64);
    let evaluated = json(&ferry(&[
        "evaluate",
        out.to_str().unwrap(),
        &example("iris.csv"),
        "--json",
    ]));
    assert!(evaluated["accuracy"].as_f64().unwrap() > 0.9, "{evaluated}");
    assert_eq!(evaluated["confusion"].as_array().unwrap().len(), 3);
    // The human form prints the same accuracy.
    let text = ferry(&["evaluate", out.to_str().unwrap(), &example("iris.csv")]);
    let text = String::from_utf8(text.stdout).unwrap();
    let accuracy = evaluated["accuracy"].as_f64().unwrap();
    assert!(text.contains(&format!("accuracy {accuracy:.6}")), "{text}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn publish_writes_successive_versions_of_a_regressor() {
    let repo = scratch("repo");
    let model = repo.join("diabetes");
    for expected in ["1", "2"] {
        let out = json(&ferry(&[
            "train",
            &example("diabetes.csv"),
            "--model",
            "linear",
            "--publish",
            model.to_str().unwrap(),
            "--json",
        ]));
        assert_eq!(out["model_dir"], model.join(expected).display().to_string());
        assert!(out["r2"].as_f64().unwrap() > 0.3, "{out}");
    }
    let evaluated = json(&ferry(&[
        "evaluate",
        model.join("2").to_str().unwrap(),
        &example("diabetes.csv"),
        "--json",
    ]));
    assert!(evaluated["r2"].as_f64().unwrap() > 0.45, "{evaluated}");
    assert!(evaluated["rmse"].as_f64().unwrap() > 0.0);
    std::fs::remove_dir_all(repo).unwrap();
}

#[test]
fn a_bad_file_fails_with_line_and_column() {
    let dir = scratch("bad");
    let csv = dir.join("bad.csv");
    std::fs::write(&csv, "a,b,y\n1,2,0\n3,oops,1\n").unwrap();
    let out = ferry(&[
        "train",
        csv.to_str().unwrap(),
        "--model",
        "logistic",
        "--out",
        dir.join("m").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 3, column `b`: `oops` is not a number"),
        "{stderr}"
    );
    assert!(!dir.join("m").exists());
    // --out or --publish is required.
    let out = ferry(&["train", csv.to_str().unwrap(), "--model", "logistic"]);
    assert_eq!(out.status.code(), Some(2));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn optimize_prints_the_table_and_publishes_the_best() {
    let repo = scratch("optimize");
    let model = repo.join("iris");
    let out = ferry(&[
        "optimize",
        "search",
        &example("iris.csv"),
        "--model",
        "softmax",
        "--try-learning-rate",
        "0.01,0.000001",
        "--try-epochs",
        "1,300",
        "--folds",
        "3",
        "--publish",
        model.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("scored by 3-fold cross-validation"),
        "{stdout}"
    );
    let best: Vec<&str> = stdout.lines().filter(|l| l.starts_with('*')).collect();
    assert_eq!(best.len(), 1, "{stdout}");
    assert!(
        best[0].contains("learning_rate=0.01 epochs=300"),
        "{stdout}"
    );
    assert!(model.join("1").join("model.onnx").exists());
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("1").join("ferry.json")).unwrap())
            .unwrap();
    assert_eq!(meta["hyper_parameters"]["learning_rate"], 0.01);
    std::fs::remove_dir_all(repo).unwrap();
}

#[test]
fn settings_come_from_the_config_file_and_the_environment() {
    let dir = scratch("config");
    let config = dir.join("ferry.toml");
    std::fs::write(&config, "[train]\nepochs = 3\njson = true\nseed = 7\n").unwrap();
    let out = json(&ferry(&[
        "--config",
        config.to_str().unwrap(),
        "train",
        &example("iris.csv"),
        "--model",
        "softmax",
        "--seed",
        "9",
        "--out",
        dir.join("m").to_str().unwrap(),
    ]));
    assert_eq!(out["hyper_parameters"]["epochs"], 3);
    // A flag wins over the file.
    assert_eq!(out["hyper_parameters"]["seed"], 9);
    let env = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["train", &example("iris.csv"), "--model", "softmax", "--out"])
        .arg(dir.join("m"))
        .env("FERRY_TRAIN_EPOCHS", "2")
        .env("FERRY_TRAIN_JSON", "true")
        .output()
        .unwrap();
    assert_eq!(json(&env)["hyper_parameters"]["epochs"], 2);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn quantize_writes_a_smaller_model_only_when_the_score_holds() {
    let dir = scratch("quantize");
    let float = dir.join("float");
    json(&ferry(&[
        "train",
        &example("digits.csv"),
        "--model",
        "mlp",
        "--hidden",
        "64",
        "--epochs",
        "30",
        "--out",
        float.to_str().unwrap(),
        "--json",
    ]));
    let int8 = dir.join("int8");
    let c = json(&ferry(&[
        "optimize",
        "quantize",
        float.to_str().unwrap(),
        &example("digits.csv"),
        "--out",
        int8.to_str().unwrap(),
        "--max-accuracy-drop",
        "0.02",
        "--json",
    ]));
    assert!(
        c["int8_bytes"].as_u64().unwrap() * 2 < c["float_bytes"].as_u64().unwrap(),
        "{c}"
    );
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(int8.join("ferry.json")).unwrap()).unwrap();
    assert_eq!(meta["quantization"]["tensors"], 2);
    // The int8 model serves and evaluates like any other.
    let evaluated = json(&ferry(&[
        "evaluate",
        int8.to_str().unwrap(),
        &example("digits.csv"),
        "--json",
    ]));
    assert_eq!(evaluated["accuracy"], c["int8_score"]);
    // A bar no model can meet: refused, nothing written.
    let refused = dir.join("refused");
    let out = ferry(&[
        "optimize",
        "quantize",
        float.to_str().unwrap(),
        &example("digits.csv"),
        "--out",
        refused.to_str().unwrap(),
        "--max-accuracy-drop=-1",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not written"));
    assert!(!refused.exists());
    std::fs::remove_dir_all(dir).unwrap();
}
