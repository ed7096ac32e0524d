//! Finding the ONNX Runtime library without `ORT_DYLIB_PATH`: `.ferry/lib` of the checkout, where
//! `scripts/fetch-onnxruntime` puts it (`scripts/test` runs it first), found from the working directory or from the
//! binary's place, and an error that says where it looked otherwise.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::common::{examples, iris_csv, scratch};

/// `ferry evaluate` on the example iris model with nothing naming the library (no Python to ask either).
fn evaluate(binary: &Path, cwd: &Path) -> Output {
    Command::new(binary)
        .args(["evaluate"])
        .arg(examples().join("models/iris/1"))
        .args([&iris_csv(), "--json"])
        .current_dir(cwd)
        .env_remove("ORT_DYLIB_PATH")
        .env_remove("FERRY_ONNXRUNTIME_LIB")
        .env_remove("VIRTUAL_ENV")
        .env("PATH", "/nonexistent")
        .output()
        .expect("the ferry binary runs")
}

fn show(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn commands_find_the_fetched_library_in_the_checkout() {
    let checkout: PathBuf = examples().join("..").canonicalize().unwrap();
    assert!(
        checkout
            .join(".ferry/lib/libonnxruntime.so.1.32.0")
            .is_file(),
        "run scripts/fetch-onnxruntime first (scripts/test does)"
    );
    let dir = scratch("library", "outside");
    let copy = dir.join("ferry");
    std::fs::copy(env!("CARGO_BIN_EXE_ferry"), &copy).unwrap();

    // A binary outside the checkout, run in a folder of it: found above the working directory.
    let out = evaluate(&copy, &checkout.join("examples"));
    assert!(out.status.success(), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"accuracy\""));

    // The binary built in the checkout's target/, run elsewhere: found above the binary.
    let out = evaluate(Path::new(env!("CARGO_BIN_EXE_ferry")), &dir);
    assert!(out.status.success(), "{}", show(&out));

    // Neither: the error names the places it looked and the fix.
    let out = evaluate(&copy, &dir);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for part in [
        "ORT_DYLIB_PATH is not set",
        &dir.join(".ferry/lib").display().to_string(),
        "scripts/fetch-onnxruntime",
        "--onnxruntime-lib",
    ] {
        assert!(stderr.contains(part), "no `{part}` in {stderr}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}
