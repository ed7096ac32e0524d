//! `ferry retrain` and `ferry rollout` as an operator runs them: the binary on temporary repositories, the plan
//! file they write, exit statuses and messages. Scoring runs ONNX Runtime: run through `scripts/test`, which sets
//! `ORT_DYLIB_PATH`.

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

use super::common::{examples, ferry, iris_csv, publish_poor_iris};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs ferry and expects `code`; returns standard output.
fn expect(code: i32, args: &[&str]) -> String {
    let out = ferry(args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "ferry {args:?}\nstdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

fn scratch(name: &str) -> PathBuf {
    super::common::scratch("retrain", name)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

/// `ferry retrain iris` on the bundled iris CSV, with `extra` arguments.
fn retrain_iris(repo: &str, extra: &[&str]) -> Output {
    let data = iris_csv();
    let mut args = vec![
        "retrain",
        "iris",
        "--model-repository",
        repo,
        "--data",
        &data,
    ];
    args.extend_from_slice(extra);
    ferry(&args)
}

fn versions(models: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(models.join("iris"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.parse::<u64>().is_ok())
        .collect();
    v.sort();
    v
}

#[test]
fn a_better_candidate_is_published_behind_a_rollout_and_a_worse_one_is_refused() {
    let dir = scratch("gate");
    let models = dir.join("models");
    publish_poor_iris(&models);
    let repo = models.to_str().unwrap();

    let summary: Value = serde_json::from_str(&expect(
        0,
        &[
            "retrain",
            "iris",
            "--model-repository",
            repo,
            "--data",
            &iris_csv(),
            "--model",
            "softmax",
            "--steps",
            "10,50,100",
            "--step-interval",
            "30s",
            "--max-error-rate",
            "2%",
            "--min-requests",
            "7",
            "--json",
        ],
    ))
    .unwrap();
    assert_eq!(summary["passed"], true, "{summary}");
    assert_eq!(summary["published"], true);
    assert_eq!(summary["version"], 2);
    assert_eq!(summary["live_version"], 1);
    assert!(summary["improvement"].as_f64().unwrap() > 0.1, "{summary}");
    assert_eq!(versions(&models), ["1", "2"]);

    let plan = read_json(&models.join("iris/rollout.json"));
    assert_eq!(
        (plan["stable"].clone(), plan["candidate"].clone()),
        (1.into(), 2.into())
    );
    assert_eq!(plan["state"], "running");
    assert_eq!(plan["steps"], serde_json::json!([10.0, 50.0, 100.0]));
    assert_eq!(plan["step_interval_secs"], 30.0);
    assert_eq!(plan["max_error_rate"], 0.02);
    assert_eq!(plan["min_requests"], 7);

    // The published version is complete and checks out: its ferry.json carries the gate and the model's sha256.
    let meta = read_json(&models.join("iris/2/ferry.json"));
    assert_eq!(meta["gate"]["passed"], true);
    assert_eq!(meta["gate"]["live_version"], 1);
    assert_eq!(meta["gate"]["holdout_rows"], 30);
    assert_eq!(meta["model_sha256"].as_str().unwrap().len(), 64);
    let evaluated: Value = serde_json::from_str(&expect(
        0,
        &[
            "evaluate",
            models.join("iris/2").to_str().unwrap(),
            &iris_csv(),
            "--json",
        ],
    ))
    .unwrap();
    assert!(evaluated["accuracy"].as_f64().unwrap() > 0.9, "{evaluated}");

    // A running rollout is not replaced without --force.
    let out = retrain_iris(repo, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is running"), "{}", stderr(&out));

    // Once version 2 is promoted it is the live version, and a candidate must beat it: a poor one is refused with
    // status 3, and nothing is written.
    expect(
        0,
        &["rollout", "promote", "iris", "--model-repository", repo],
    );
    let before = std::fs::read(models.join("iris/rollout.json")).unwrap();
    let poor = ["--epochs", "1", "--learning-rate", "0.00001"];
    let out = retrain_iris(repo, &poor);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("refused the candidate"),
        "{}",
        stderr(&out)
    );
    assert_eq!(versions(&models), ["1", "2"]);
    assert_eq!(
        std::fs::read(models.join("iris/rollout.json")).unwrap(),
        before
    );
    let out = retrain_iris(repo, &[&poor[..], &["--json"]].concat());
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let refused: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(refused["live_version"], 2);
    assert_eq!(
        (refused["passed"].clone(), refused["published"].clone()),
        (false.into(), false.into())
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_failed_publish_leaves_no_plan_waiting_and_no_rollout_replaces_an_old_plan() {
    let dir = scratch("undo");
    let models = dir.join("models");
    publish_poor_iris(&models);
    let repo = models.to_str().unwrap();
    let retrain =
        |extra: &[&str]| retrain_iris(repo, &[&["--model", "softmax"][..], extra].concat());
    // A file where version 2 would go makes publishing fail after the plan was written.
    std::fs::write(models.join("iris/2"), "in the way").unwrap();
    let out = retrain(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("publishing version 2"),
        "{}",
        stderr(&out)
    );
    let plan = read_json(&models.join("iris/rollout.json"));
    assert_eq!(plan["state"], "rolled_back", "{plan}");
    assert!(plan["history"][1]["reason"]
        .as_str()
        .unwrap()
        .contains("publishing version 2 failed"));
    // With a plan already there, a failed publish puts it back as it was. (Version numbers go past the plan's
    // versions, so the next one is 3.)
    std::fs::write(models.join("iris/3"), "in the way").unwrap();
    let before = std::fs::read(models.join("iris/rollout.json")).unwrap();
    let out = retrain(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(models.join("iris/rollout.json")).unwrap(),
        before
    );
    std::fs::remove_file(models.join("iris/2")).unwrap();
    std::fs::remove_file(models.join("iris/3")).unwrap();

    // Without a rollout, the old plan (which would keep routing to version 1) is replaced by one promoted to 3.
    let out = retrain(&["--no-rollout"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let plan = read_json(&models.join("iris/rollout.json"));
    assert_eq!(
        (
            plan["state"].clone(),
            plan["stable"].clone(),
            plan["candidate"].clone()
        ),
        ("promoted".into(), 1.into(), 3.into())
    );
    assert_eq!(versions(&models), ["1", "3"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_dry_run_decides_but_writes_nothing() {
    let dir = scratch("dry");
    let models = dir.join("models");
    publish_poor_iris(&models);
    let out = expect(
        0,
        &[
            "retrain",
            "iris",
            "--model-repository",
            models.to_str().unwrap(),
            "--data",
            &iris_csv(),
            "--model",
            "softmax",
            "--dry-run",
        ],
    );
    assert!(
        out.contains("dry run: would publish iris version 2 with a rollout from version 1"),
        "{out}"
    );
    assert_eq!(versions(&models), ["1"]);
    assert!(!models.join("iris/rollout.json").exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn payload_logs_joined_with_labels_train_a_candidate() {
    let dir = scratch("payload");
    let models = dir.join("models");
    publish_poor_iris(&models);
    // Every iris row as a logged request (one in five batched with its neighbour), and the labels by request id.
    let text = std::fs::read_to_string(iris_csv()).unwrap();
    let rows: Vec<Vec<&str>> = text
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    let (mut log, mut labels) = (String::new(), String::from("id,label\n"));
    let mut i = 0;
    while i < rows.len() {
        let batch = if i % 5 == 0 && i + 1 < rows.len() {
            2
        } else {
            1
        };
        let data: Vec<&str> = rows[i..i + batch]
            .iter()
            .flat_map(|r| r[..4].to_vec())
            .collect();
        log.push_str(&format!(
            "{{\"time\":1,\"model\":\"iris\",\"version\":1,\"id\":\"req-{i}\",\"latency_ms\":0.5,\"inputs\":{{\"features\":{{\"datatype\":\"FP32\",\"shape\":[{batch},4],\"data\":[{}]}}}},\"outputs\":{{}}}}\n",
            data.join(",")
        ));
        log.push_str("{\"time\":1,\"model\":\"other\",\"version\":1,\"id\":\"x\",\"inputs\":{}}\n");
        for (r, row) in rows[i..i + batch].iter().enumerate() {
            let id = if batch == 1 {
                format!("req-{i}")
            } else {
                format!("req-{i}:{r}")
            };
            // A few requests never got a label.
            if i % 17 != 3 {
                labels.push_str(&format!("{id},{}\n", row[4]));
            }
        }
        i += batch;
    }
    std::fs::write(dir.join("payload.jsonl"), log).unwrap();
    std::fs::write(dir.join("labels.csv"), labels).unwrap();
    let out = ferry(&[
        "retrain",
        "iris",
        "--model-repository",
        models.to_str().unwrap(),
        "--payload-log",
        dir.join("payload.jsonl").to_str().unwrap(),
        "--labels",
        dir.join("labels.csv").to_str().unwrap(),
        "--model",
        "softmax",
        "--no-rollout",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("records of iris"), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("without a rollout"),
        "{}",
        stdout(&out)
    );
    assert_eq!(versions(&models), ["1", "2"]);
    assert!(
        !models.join("iris/rollout.json").exists(),
        "--no-rollout writes no plan"
    );
    let meta = read_json(&models.join("iris/2/ferry.json"));
    assert_eq!(
        meta["features"],
        read_json(&models.join("iris/1/ferry.json"))["features"],
        "the columns take the live version's feature names"
    );
    assert!(meta["training_data"]["path"]
        .as_str()
        .unwrap()
        .contains("joined with"));

    // Mixed sources, and a log without its labels, are refused with a message.
    let out = ferry(&[
        "retrain",
        "iris",
        "--model-repository",
        models.to_str().unwrap(),
        "--payload-log",
        dir.join("payload.jsonl").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("--payload-log needs --labels"),
        "{}",
        stderr(&out)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// Copies the example iris model into `<models>/iris/<v>` for each of `versions`.
fn example_iris_versions(models: &Path, versions: &[&str]) {
    for v in versions {
        let to = models.join("iris").join(v);
        std::fs::create_dir_all(&to).unwrap();
        for f in ["model.onnx", "ferry.json"] {
            std::fs::copy(examples().join("models/iris/1").join(f), to.join(f)).unwrap();
        }
    }
}

#[test]
fn rollouts_refuse_versions_that_are_not_in_the_repository() {
    let dir = scratch("missing-versions");
    let models = dir.join("models");
    example_iris_versions(&models, &["1", "3"]);
    let repo = models.to_str().unwrap();
    let refused = |args: &[&str]| {
        let out = ferry(&[&["rollout"], args, &["--model-repository", repo]].concat());
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        stderr(&out)
    };
    let e = refused(&["start", "iris", "--version", "3", "--stable", "2"]);
    assert!(
        e.contains(
            "the stable version 2 of iris is not in the repository (versions present: 1, 3)"
        ),
        "{e}"
    );
    // A missing candidate numbered below a present version can never be published by ferry: a typo.
    let e = refused(&["start", "iris", "--version", "2"]);
    assert!(
        e.contains("version 2 of iris is not in the repository (versions present: 1, 3)"),
        "{e}"
    );
    let e = refused(&["start", "irsi", "--version", "2"]);
    assert!(e.contains("irsi has no versions"), "{e}");
    assert!(!models.join("iris/rollout.json").exists());

    // A candidate still to be published waits, but cannot be promoted before it exists.
    expect(
        0,
        &[
            "rollout",
            "start",
            "iris",
            "--version",
            "4",
            "--model-repository",
            repo,
        ],
    );
    let e = refused(&["promote", "iris"]);
    assert!(
        e.contains("cannot promote iris: its candidate, version 4, is not in the repository (versions present: 1, 3)"),
        "{e}"
    );
    let plan = read_json(&models.join("iris/rollout.json"));
    assert_eq!(plan["state"], "running");
    example_iris_versions(&models, &["4"]);
    expect(
        0,
        &["rollout", "promote", "iris", "--model-repository", repo],
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn rollouts_start_show_promote_and_roll_back() {
    let dir = scratch("rollout");
    let models = dir.join("models");
    example_iris_versions(&models, &["1", "2"]);
    let repo = models.to_str().unwrap();
    let rollout = |code: i32, args: &[&str]| {
        let mut all = vec!["rollout"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--model-repository", repo]);
        expect(code, &all)
    };
    let status =
        || -> Value { serde_json::from_str(&rollout(0, &["status", "iris", "--json"])).unwrap() };

    // No plan yet.
    let out = ferry(&["rollout", "status", "iris", "--model-repository", repo]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no rollout plan"), "{}", stderr(&out));

    // Start: the stable version defaults to the highest other version present.
    let out = rollout(
        0,
        &[
            "start",
            "iris",
            "--version",
            "2",
            "--steps",
            "5,25,50,100",
            "--step-interval",
            "60s",
            "--max-error-rate",
            "1%",
            "--max-p99-ratio",
            "1.5",
        ],
    );
    assert!(
        out.contains("started the rollout of iris version 2 (stable 1)"),
        "{out}"
    );
    let s = status();
    assert_eq!(
        (
            s["state"].clone(),
            s["stable"].clone(),
            s["candidate"].clone()
        ),
        ("running".into(), 1.into(), 2.into())
    );
    assert_eq!(s["current_step"], 0);
    assert_eq!(s["current_weight"], 5.0);
    assert_eq!(s["max_error_rate"], 0.01);
    let text = rollout(0, &["status", "iris"]);
    assert!(
        text.contains("state      running") && text.contains("step 1 of 4 (5% to the candidate)"),
        "{text}"
    );

    // A second start is refused while the first runs; --force replaces it.
    let out = ferry(&[
        "rollout",
        "start",
        "iris",
        "--version",
        "2",
        "--model-repository",
        repo,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is running"), "{}", stderr(&out));
    rollout(
        0,
        &[
            "start",
            "iris",
            "--version",
            "2",
            "--max-error-rate",
            "0.05",
            "--force",
        ],
    );
    assert_eq!(status()["max_error_rate"], 0.05);

    // Promote; then there is nothing left to promote or roll back.
    let out = rollout(0, &["promote", "iris"]);
    assert!(
        out.contains("promoted iris: version 2 takes all unversioned traffic"),
        "{out}"
    );
    let s = status();
    assert_eq!(s["state"], "promoted");
    assert_eq!(
        s["history"].as_array().unwrap().last().unwrap()["reason"],
        "by operator"
    );
    let out = ferry(&["rollout", "rollback", "iris", "--model-repository", repo]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("already promoted"),
        "{}",
        stderr(&out)
    );

    // A candidate not published yet: the plan waits for it, from the promoted version.
    let out = rollout(0, &["start", "iris", "--version", "3"]);
    assert!(
        out.contains("not in the repository yet: the rollout waits for it to load"),
        "{out}"
    );
    assert_eq!(status()["stable"], 2);
    let out = rollout(0, &["rollback", "iris"]);
    assert!(
        out.contains("rolled back iris: version 2 takes all unversioned traffic"),
        "{out}"
    );
    let text = rollout(0, &["status", "iris"]);
    assert!(
        text.contains("rolled_back") && text.contains("(by operator)"),
        "{text}"
    );

    // Bad settings are refused before anything is written.
    for bad in [
        &["--steps", "50,25,100"][..],
        &["--steps", "5,50"],
        &["--stable", "9"],
        &["--max-p99-ratio", "0.5"],
    ] {
        let mut args = vec![
            "rollout",
            "start",
            "iris",
            "--version",
            "2",
            "--model-repository",
            repo,
        ];
        args.extend_from_slice(bad);
        let out = ferry(&args);
        assert_eq!(out.status.code(), Some(1), "{bad:?}: {}", stderr(&out));
    }
    let out = ferry(&[
        "rollout",
        "start",
        "iris",
        "--version",
        "2",
        "--max-error-rate",
        "5",
        "--model-repository",
        repo,
    ]);
    assert_eq!(out.status.code(), Some(2), "clap refuses a rate above 1");
    assert_eq!(status()["state"], "rolled_back");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_example_pipeline_runs_and_flags_override_it() {
    let dir = scratch("pipeline");
    let models = dir.join("models");
    example_iris_versions(&models, &["1"]);
    let pipeline = examples().join("pipeline.toml");
    let pipeline = pipeline.to_str().unwrap();
    let repo = models.to_str().unwrap();
    let summary: Value = serde_json::from_str(&expect(
        0,
        &[
            "retrain",
            "--pipeline",
            pipeline,
            "--model-repository",
            repo,
            "--json",
        ],
    ))
    .unwrap();
    assert_eq!(summary["model"], "iris");
    assert_eq!(summary["published"], true, "{summary}");
    assert_eq!(
        summary["rollout"]["steps"],
        serde_json::json!([5.0, 25.0, 50.0, 100.0])
    );
    assert_eq!(read_json(&models.join("iris/2/ferry.json"))["model"], "mlp");
    assert_eq!(read_json(&models.join("iris/rollout.json"))["candidate"], 2);

    // Flags beat the file.
    let summary: Value = serde_json::from_str(&expect(
        0,
        &[
            "retrain",
            "--pipeline",
            pipeline,
            "--model-repository",
            repo,
            "--steps",
            "50,100",
            "--force",
            "--dry-run",
            "--json",
        ],
    ))
    .unwrap();
    assert_eq!(
        summary["rollout"]["steps"],
        serde_json::json!([50.0, 100.0])
    );
    assert_eq!(summary["version"], 3);
    assert_eq!(versions(&models), ["1", "2"]);

    // A misspelt key is a configuration error (64) naming it.
    std::fs::write(
        dir.join("bad.toml"),
        "model_name = \"iris\"\n[gate]\nmin_improvment = 0.1\n",
    )
    .unwrap();
    let out = ferry(&[
        "retrain",
        "--pipeline",
        dir.join("bad.toml").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("unknown key `gate.min_improvment`"),
        "{}",
        stderr(&out)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// The output line as compared: a fit's time (`in 0.02s`) varies from run to run.
fn without_time(line: &str) -> String {
    match (line.find(" rows in "), line.find("s (")) {
        (Some(a), Some(b)) if a < b => format!("{}{}", &line[..a + 9], &line[b + 1..]),
        _ => line.to_string(),
    }
}

#[test]
fn the_readme_retrain_example_runs_as_written() {
    let checkout = examples().join("..");
    let readme = std::fs::read_to_string(checkout.join("README.md")).unwrap();
    let section = &readme[readme.find("## Retraining and rollouts").unwrap()..];
    let start = section.find("```console\n").unwrap() + "```console\n".len();
    let block = &section[start..start + section[start..].find("```").unwrap()];
    // Its repository under /tmp/models becomes this test's own folder.
    let dir = scratch("readme");
    let models = dir.join("models").display().to_string();
    let mut runs: Vec<(Vec<String>, Vec<String>)> = Vec::new();
    for line in block.lines() {
        match line.strip_prefix("$ ") {
            Some(command) => runs.push((
                command
                    .split_whitespace()
                    .map(|w| w.replace("/tmp/models", &models))
                    .collect(),
                Vec::new(),
            )),
            None => runs
                .last_mut()
                .unwrap()
                .1
                .push(without_time(&line.replace("/tmp/models", &models))),
        }
    }
    assert_eq!(runs.len(), 2, "{block}");
    for (command, expected) in runs {
        assert_eq!(command[0], "ferry");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(&command[1..])
            .current_dir(&checkout)
            .env_remove("FERRY_MODEL_REPOSITORY")
            .output()
            .unwrap();
        let printed = stderr(&out) + &stdout(&out);
        assert!(out.status.success(), "{command:?}: {printed}");
        let mut printed: Vec<String> = printed.lines().map(without_time).collect();
        let mut expected = expected;
        printed.sort();
        expected.sort();
        assert_eq!(printed, expected, "{command:?}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}
