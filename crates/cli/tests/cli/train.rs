//! `ferry train` and `ferry evaluate` as a user runs them: the binary, real files, `--json` output, publishing
//! versions, and the exit status and message of a bad file. `ferry evaluate` needs ONNX Runtime: run through
//! `scripts/test`, which sets `ORT_DYLIB_PATH`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::common::ferry;

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
    // The prediction drift baseline: class frequencies of the model's answers on its 135 training rows.
    let p = &meta["prediction_stats"][0];
    assert_eq!(p["output"], "label");
    assert_eq!(p["kind"], "categorical");
    assert_eq!(p["rows"], 135);
    assert_eq!(p["classes"], meta["classes"]);
    assert_eq!(p["label_counts"], serde_json::json!([45, 45, 45]));
    let predicted: u64 = p["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .sum();
    assert_eq!(predicted, 135);
    // The background: 100 of the 135 training rows, in the model's feature order, as the file gave them.
    assert_eq!(trained["background_rows"], 100);
    let background = ferry_train::read_background(&out.join("background.csv")).unwrap();
    assert_eq!(
        serde_json::json!(background.features),
        meta["features"],
        "the header names ferry.json's features"
    );
    assert_eq!(background.rows, 100);
    let iris = std::fs::read_to_string(example("iris.csv")).unwrap();
    let first = background
        .row(0)
        .iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(",");
    assert!(
        iris.lines().any(|l| l.starts_with(&format!("{first},"))),
        "{first} is an iris row"
    );
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
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("2/ferry.json")).unwrap()).unwrap();
    let p = &meta["prediction_stats"][0];
    assert_eq!(
        (&p["output"], &p["kind"]),
        (&"prediction".into(), &"numeric".into())
    );
    assert_eq!(p["histogram"]["edges"].as_array().unwrap().len(), 11);
    assert!(p["std"].as_f64().unwrap() > 0.0);
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
fn a_missing_file_or_a_broken_model_is_reported_once() {
    let dir = scratch("missing");
    let missing = dir.join("missing.csv");
    let iris_model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/models/iris/1");
    let broken = dir.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::copy(iris_model.join("ferry.json"), broken.join("ferry.json")).unwrap();
    std::fs::write(broken.join("model.onnx"), b"not a model").unwrap();
    let iris = example("iris.csv");
    let (out_dir, nope) = (dir.join("m"), dir.join("nope"));
    let runs: [(Vec<&str>, &str); 4] = [
        (
            vec![
                "train",
                missing.to_str().unwrap(),
                "--model",
                "softmax",
                "--out",
                out_dir.to_str().unwrap(),
            ],
            "No such file or directory",
        ),
        (
            vec![
                "evaluate",
                iris_model.to_str().unwrap(),
                missing.to_str().unwrap(),
            ],
            "No such file or directory",
        ),
        (
            vec!["evaluate", nope.to_str().unwrap(), &iris],
            "No such file or directory",
        ),
        (
            vec!["evaluate", broken.to_str().unwrap(), &iris],
            "protobuf parsing failed",
        ),
    ];
    for (args, cause) in runs {
        let out = ferry(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.matches(cause).count(), 1, "{args:?}: {stderr}");
        assert_eq!(
            stderr.lines().filter(|l| l.starts_with("ferry: ")).count(),
            1,
            "{stderr}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_classifier_refuses_a_continuous_target_unless_told() {
    let dir = scratch("continuous");
    let out = dir.join("m");
    // diabetes.csv: the target is a disease score, 214 distinct whole numbers in 442 rows.
    for model in ["softmax", "logistic"] {
        let run = ferry(&[
            "train",
            &example("diabetes.csv"),
            "--model",
            model,
            "--out",
            out.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("looks continuous")
                && stderr.contains("214 distinct values in 442 rows")
                && stderr.contains("--model linear")
                && stderr.contains("--task classification"),
            "{stderr}"
        );
        assert!(!out.exists());
    }
    // Values that are not whole numbers are not classes either.
    let csv = dir.join("fractions.csv");
    std::fs::write(&csv, "x,y\n1,0.5\n2,1.5\n3,0.5\n4,1.5\n").unwrap();
    let run = ferry(&[
        "train",
        csv.to_str().unwrap(),
        "--model",
        "softmax",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("0.5 is not a whole number"), "{stderr}");
    // --task classification says they are classes.
    json(&ferry(&[
        "train",
        &example("diabetes.csv"),
        "--model",
        "softmax",
        "--task",
        "classification",
        "--epochs",
        "1",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]));
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

#[test]
fn quantize_refuses_a_model_it_cannot_shrink() {
    // Softmax on iris has 12 weights: int8 saves 36 bytes and the DequantizeLinear node and scales cost more.
    let dir = scratch("quantize-small");
    let float = dir.join("float");
    json(&ferry(&[
        "train",
        &example("iris.csv"),
        "--model",
        "softmax",
        "--out",
        float.to_str().unwrap(),
        "--json",
    ]));
    let int8 = dir.join("int8");
    let out = ferry(&[
        "optimize",
        "quantize",
        float.to_str().unwrap(),
        &example("iris.csv"),
        "--out",
        int8.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let float_bytes = std::fs::metadata(float.join("model.onnx")).unwrap().len();
    assert!(
        stderr.contains("not written: the int8 model (")
            && stderr.contains(&format!(
                "is not smaller than the float model ({float_bytes} bytes)"
            )),
        "{stderr}"
    );
    assert!(!int8.exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn train_reads_payload_logs_joined_with_labels() {
    let dir = scratch("payload");
    // A log as `ferry serve --payload-log` writes it: iris rows, one request of two rows, another model's record.
    let rows: Vec<Vec<String>> = std::fs::read_to_string(example("iris.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect();
    let mut log = String::new();
    let mut labels = String::from("id,label\n");
    for (i, r) in rows.iter().enumerate() {
        let values = r[..4].join(",");
        log.push_str(&format!(
            r#"{{"time":1,"model":"iris","version":1,"id":"req-{i}","latency_ms":0.5,"inputs":{{"features":{{"datatype":"FP32","shape":[1,4],"data":[{values}]}}}},"outputs":{{}}}}"#
        ));
        log.push('\n');
        // Every tenth request never got its label.
        if i % 10 != 9 {
            labels.push_str(&format!("req-{i},{}\n", r[4]));
        }
    }
    log.push_str(r#"{"time":1,"model":"other","version":1,"id":"x","latency_ms":0.5,"inputs":{"x":{"datatype":"FP32","shape":[1],"data":[1]}},"outputs":{}}"#);
    log.push('\n');
    std::fs::write(dir.join("payload.jsonl"), log).unwrap();
    std::fs::write(dir.join("labels.csv"), labels).unwrap();
    let log_arg = dir.join("payload.jsonl").display().to_string();
    let labels_arg = dir.join("labels.csv").display().to_string();
    let out = dir.join("model");
    // Two models in the log: which one must be said.
    let refused = ferry(&[
        "train",
        "--payload-log",
        &log_arg,
        "--labels",
        &labels_arg,
        "--model",
        "softmax",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("--payload-model") && message.contains("iris, other"),
        "{message}"
    );
    let trained = json(&ferry(&[
        "train",
        "--payload-log",
        &log_arg,
        "--labels",
        &labels_arg,
        "--payload-model",
        "iris",
        "--model",
        "softmax",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]));
    assert!(trained["accuracy"].as_f64().unwrap() > 0.8, "{trained}");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("ferry.json")).unwrap()).unwrap();
    assert_eq!(meta["training_data"]["rows"], 135, "15 rows had no label");
    assert_eq!(meta["features"][0], "features_0");
    assert_eq!(meta["target"], "label");
    assert!(meta["training_data"]["path"]
        .as_str()
        .unwrap()
        .contains("joined with"));
    // Published into a model that has a version, the columns take that version's feature names.
    let repo = dir.join("repo");
    let published = json(&ferry(&[
        "train",
        &example("iris.csv"),
        "--model",
        "softmax",
        "--publish",
        repo.join("iris").to_str().unwrap(),
        "--json",
    ]));
    assert!(published["accuracy"].as_f64().is_some());
    let again = json(&ferry(&[
        "train",
        "--payload-log",
        &log_arg,
        "--labels",
        &labels_arg,
        "--model",
        "softmax",
        "--publish",
        repo.join("iris").to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(
        again["model_dir"],
        repo.join("iris/2").display().to_string()
    );
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo.join("iris/2/ferry.json")).unwrap()).unwrap();
    assert_eq!(meta["features"][0], "sepal_length_cm");
    // DATA.csv and --payload-log exclude each other, and a log needs labels.
    let both = ferry(&[
        "train",
        &example("iris.csv"),
        "--payload-log",
        &log_arg,
        "--labels",
        &labels_arg,
        "--model",
        "softmax",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!both.status.success());
    let alone = ferry(&[
        "train",
        "--payload-log",
        &log_arg,
        "--model",
        "softmax",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!alone.status.success());
    assert!(String::from_utf8_lossy(&alone.stderr).contains("--labels"));
    std::fs::remove_dir_all(dir).unwrap();
}
