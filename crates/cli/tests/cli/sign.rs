//! `ferry sign` and `ferry retrain --sign-key` as an operator runs them; the signatures they write are checked as
//! the server checks them (`ferry_repo::integrity`). Scoring in `ferry retrain` runs ONNX Runtime: run through
//! `scripts/test`, which sets `ORT_DYLIB_PATH`.

use std::path::{Path, PathBuf};

use ferry_repo::integrity::{verify_version, version_files, IntegrityError, PublicKey};

use super::common::{ferry, iris_csv, publish_poor_iris};

fn expect(code: i32, args: &[&str]) -> String {
    let out = ferry(args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "ferry {args:?}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn scratch(name: &str) -> PathBuf {
    super::common::scratch("sign", name)
}

fn verify(dir: &Path, model: &str, version: u64, key: &Path) -> Result<String, IntegrityError> {
    let key = PublicKey::read(key).unwrap();
    let files = version_files(dir, &|_| None)?;
    verify_version(dir, model, version, &files, &[key])
}

#[test]
fn sign_and_retrain_write_signatures_the_server_accepts() {
    let dir = scratch("flow");
    let models = dir.join("models");
    let key = dir.join("signing.key");
    let public = dir.join("signing.key.pub");
    let out = expect(0, &["sign", "--generate-key", key.to_str().unwrap()]);
    assert!(out.contains("key id"), "{out}");

    publish_poor_iris(&models);
    let v1 = models.join("iris/1");
    assert!(matches!(
        verify(&v1, "iris", 1, &public),
        Err(IntegrityError::Unsigned)
    ));
    let out = expect(
        0,
        &["sign", v1.to_str().unwrap(), "--key", key.to_str().unwrap()],
    );
    assert!(out.contains("signed iris version 1"), "{out}");
    assert!(verify(&v1, "iris", 1, &public).is_ok());

    // A version staged under another folder name is signed for the name and number it will have.
    let staged = dir.join(".incoming-7");
    std::fs::create_dir_all(&staged).unwrap();
    for f in ["model.onnx", "ferry.json"] {
        std::fs::copy(v1.join(f), staged.join(f)).unwrap();
    }
    let args = [
        "sign",
        staged.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ];
    assert!(expect(1, &args).contains("--model-version"));
    expect(
        0,
        &[&args[..], &["--model", "iris", "--model-version", "7"]].concat(),
    );
    assert!(verify(&staged, "iris", 7, &public).is_ok());

    // ferry retrain signs what it publishes.
    let repo = models.to_str().unwrap();
    expect(
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
            "--no-rollout",
            "--sign-key",
            key.to_str().unwrap(),
            "--quiet",
        ],
    );
    let v2 = models.join("iris/2");
    assert!(v2.join("ferry.sig").exists());
    assert!(verify(&v2, "iris", 2, &public).is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[cfg(unix)]
#[test]
fn a_readable_secret_key_stops_retrain_before_training() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("perm");
    let key = dir.join("k");
    expect(0, &["sign", "--generate-key", key.to_str().unwrap()]);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = expect(
        1,
        &[
            "retrain",
            "iris",
            "--model-repository",
            dir.join("models").to_str().unwrap(),
            "--data",
            &iris_csv(),
            "--sign-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(out.contains("chmod 600"), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_public_key_given_as_the_signing_key_is_refused_naming_the_secret_one() {
    let dir = scratch("public");
    let v1 = dir.join("models/iris/1");
    std::fs::create_dir_all(&v1).unwrap();
    std::fs::write(v1.join("model.onnx"), b"not really a model").unwrap();
    let key = dir.join("signing.key");
    expect(0, &["sign", "--generate-key", key.to_str().unwrap()]);
    let public = dir.join("signing.key.pub");
    let out = expect(
        1,
        &[
            "sign",
            v1.to_str().unwrap(),
            "--key",
            public.to_str().unwrap(),
        ],
    );
    assert!(
        out.contains("is a public key")
            && out.contains(&format!(
                "sign with the secret key file beside it, {}",
                key.display()
            ))
            && !out.contains("chmod"),
        "{out}"
    );
    assert!(!v1.join("ferry.sig").exists());
    // A secret key that happens to be named *.pub (its public key is *.pub.pub) still signs.
    let odd = dir.join("odd.pub");
    expect(0, &["sign", "--generate-key", odd.to_str().unwrap()]);
    expect(
        0,
        &["sign", v1.to_str().unwrap(), "--key", odd.to_str().unwrap()],
    );
    assert!(verify(&v1, "iris", 1, &dir.join("odd.pub.pub")).is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}
