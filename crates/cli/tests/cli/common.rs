//! Helpers the command-line tests share.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs the ferry binary without the environment settings that would redirect it.
pub fn ferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .env_remove("FERRY_MODEL_REPOSITORY")
        .env_remove("FERRY_CONFIG")
        .env_remove("FERRY_SIGN_KEY")
        .env_remove("FERRY_ADMIN_TOKEN")
        .env_remove("FERRY_TOKENS")
        .output()
        .expect("the ferry binary runs")
}

/// A fresh directory with an empty `models/` inside, unique to this process, `group` and `name`.
pub fn scratch(group: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-{group}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("models")).unwrap();
    dir
}

/// The bundled examples directory.
pub fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

/// The bundled iris CSV.
pub fn iris_csv() -> String {
    examples().join("data/iris.csv").display().to_string()
}

/// Publishes a deliberately poor iris classifier (one epoch at a tiny learning rate) as the next version of
/// `<models>/iris`.
pub fn publish_poor_iris(models: &Path) {
    let target = models.join("iris");
    let out = ferry(&[
        "train",
        &iris_csv(),
        "--model",
        "softmax",
        "--epochs",
        "1",
        "--learning-rate",
        "0.0001",
        "--publish",
        target.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(
        out.status.success(),
        "ferry train: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
