//! Every bad-CSV case gives a clear error that names the line and the column; and the settings that do not fit
//! the data are refused before training.

use std::path::PathBuf;

use ferry_train::data::Target;
use ferry_train::{fit, load_csv, Impute, LoadOptions, ModelKind, TrainError, TrainOptions};

fn write_csv(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-csv-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Loading `text` with `options` fails with a message containing every one of `expected`.
fn check(name: &str, text: &str, options: LoadOptions, expected: &[&str]) {
    let err = load_csv(&write_csv(name, text), &options).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, TrainError::Data { .. }), "{name}: {err:?}");
    for e in expected {
        assert!(message.contains(e), "{name}: `{message}` lacks `{e}`");
    }
}

fn target(t: &str) -> LoadOptions {
    LoadOptions {
        target: Some(t.into()),
        ..LoadOptions::default()
    }
}

#[test]
fn bad_files_name_line_and_column() {
    let d = LoadOptions::default;
    check(
        "missing.csv",
        "a,b,y\n1,2,0\n3,,1\n",
        d(),
        &["line 3", "column `b`", "missing value", "--impute"],
    );
    check(
        "na.csv",
        "a,b,y\n1,2,0\nNA,4,1\n",
        d(),
        &["line 3", "column `a`", "missing value"],
    );
    check(
        "text.csv",
        "a,b,y\n1,2,0\n3,four,1\n5,6,0\n",
        d(),
        &["line 3", "column `b`", "`four` is not a number"],
    );
    check(
        "inf.csv",
        "a,y\n1,0\ninf,1\n",
        d(),
        &["line 3", "column `a`", "`inf` is not a number"],
    );
    check("ragged.csv", "a,b,y\n1,2,0\n3,4\n", d(), &["line 3"]);
    check(
        "no-target.csv",
        "a,b,y\n1,2,0\n3,4,\n",
        d(),
        &["line 3", "column `y`", "missing target"],
    );
    check("empty.csv", "", d(), &["empty"]);
    check("header-only.csv", "a,b,y\n", d(), &["0 data rows"]);
    check("one-row.csv", "a,b,y\n1,2,3\n", d(), &["1 data rows"]);
    check(
        "dup.csv",
        "a,a,y\n1,2,0\n3,4,1\n",
        d(),
        &["column `a` appears twice"],
    );
    check(
        "target.csv",
        "a,b,y\n1,2,0\n3,4,1\n",
        target("z"),
        &["target column `z` is not in the header"],
    );
    let drop = LoadOptions {
        drop: vec!["nope".into()],
        ..LoadOptions::default()
    };
    check(
        "drop.csv",
        "a,b,y\n1,2,0\n3,4,1\n",
        drop,
        &["--drop column `nope`"],
    );
    let drop_all = LoadOptions {
        drop: vec!["a".into()],
        ..LoadOptions::default()
    };
    check(
        "drop-all.csv",
        "a,y\n1,0\n3,1\n",
        drop_all,
        &["no feature columns"],
    );
    let impute = LoadOptions {
        impute: Some(Impute::Mean),
        ..LoadOptions::default()
    };
    check(
        "all-missing.csv",
        "a,b,y\n1,,0\n3,,1\n",
        impute.clone(),
        &["column `b` has no values"],
    );
    // Imputation fills features only: a text cell is still an error.
    check(
        "impute-text.csv",
        "a,y\n1,0\nx,1\n",
        impute,
        &["line 3", "`x` is not a number"],
    );
}

#[test]
fn drop_and_target_choose_the_columns() {
    let path = write_csv(
        "cols.csv",
        "id,label,x,z\nr1,cat,1,2\nr2,dog,3,4\nr3,cat,5,6\n",
    );
    let options = LoadOptions {
        target: Some("label".into()),
        drop: vec!["id".into()],
        ..LoadOptions::default()
    };
    let data = load_csv(&path, &options).unwrap();
    assert_eq!(data.features, vec!["x", "z"]);
    assert_eq!(data.target_name, "label");
    assert_eq!(data.x.row(2).to_vec(), vec![5.0, 6.0]);
    assert_eq!(
        data.target,
        Target::Labels {
            classes: vec!["cat".into(), "dog".into()],
            index: vec![0, 1, 0],
        }
    );
    // Without --drop the text column is a non-numeric feature.
    let err = load_csv(&path, &target("label")).unwrap_err().to_string();
    assert!(
        err.contains("line 2, column `id`: `r1` is not a number"),
        "{err}"
    );
}

#[test]
fn numeric_classes_keep_numeric_order_and_hash_the_file() {
    let text = "x,digit\n1,10\n2,2\n3,10\n4,1.0\n";
    let data = load_csv(&write_csv("digits.csv", text), &LoadOptions::default()).unwrap();
    let classes = data.classes().unwrap();
    assert_eq!(classes.names, vec!["1.0", "2", "10"]);
    assert_eq!(classes.index, vec![2, 1, 2, 0]);
    // sha256 of the exact bytes.
    assert_eq!(
        data.sha256,
        "e9124352a93ffba16fb6c3e5d406765e0795749087ebc6d315741d3e265f4dac"
    );
}

#[test]
fn settings_that_do_not_fit_the_data_are_refused() {
    let three = write_csv("three.csv", "x,y\n1,a\n2,b\n3,c\n4,a\n5,b\n6,c\n");
    let data = load_csv(&three, &LoadOptions::default()).unwrap();
    let err = fit(&data, &TrainOptions::new(ModelKind::Logistic), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("logistic is binary"), "{err}");
    let err = fit(&data, &TrainOptions::new(ModelKind::Linear), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("not numeric"), "{err}");
    let one = write_csv("one.csv", "x,y\n1,a\n2,a\n3,a\n");
    let data = load_csv(&one, &LoadOptions::default()).unwrap();
    let err = fit(&data, &TrainOptions::new(ModelKind::Softmax), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("single class"), "{err}");
    let mut bad = TrainOptions::new(ModelKind::Mlp);
    bad.validation_fraction = 0.95;
    let err = fit(&data, &bad, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("--validation-fraction"), "{err}");
}
