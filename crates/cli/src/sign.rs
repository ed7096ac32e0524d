//! `ferry sign`: Ed25519 signatures of model versions (`ferry.sig`), and the keys that make them. Servers started
//! with `--trusted-key` load only versions signed by one of their keys (`ferry_repo::integrity`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use ferry_repo::integrity::{self, IntegrityPolicy, PublicKey, SigningKey};

/// `ferry sign` flags.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  ferry sign --generate-key signing.key                       # signing.key (secret, mode 0600) and signing.key.pub
  ferry sign models/iris/3 --key signing.key                  # writes models/iris/3/ferry.sig
  ferry sign staging/.incoming-4 --key signing.key --model iris --model-version 4
  ferry serve --model-repository models --trusted-key signing.key.pub")]
pub struct SignArgs {
    /// The version folder to sign (`<repository>/<model>/<version>`). Every file in it is covered: model.onnx or model.gguf,
    /// ferry.json, warmup/ requests and anything else.
    #[arg(value_name = "VERSION_DIR", required_unless_present = "generate_key")]
    pub version_dir: Option<PathBuf>,

    /// The secret key file (a 32-byte Ed25519 seed in hex, as --generate-key writes it; mode 0600).
    #[arg(
        long,
        value_name = "KEY_FILE",
        required_unless_present = "generate_key"
    )]
    pub key: Option<PathBuf>,

    /// Make a new key instead of signing: the secret seed into KEY_FILE (created with mode 0600, never
    /// overwritten) and the public key into KEY_FILE.pub, the file servers take with --trusted-key.
    #[arg(long, value_name = "KEY_FILE", conflicts_with_all = ["key", "version_dir"])]
    pub generate_key: Option<PathBuf>,

    /// The model the signature is for (default: the name of VERSION_DIR's parent folder). A signature binds the
    /// model name and version, so a signed version copied under another name or number does not verify.
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,

    /// The version the signature is for (default: VERSION_DIR's own name), to sign a version staged under
    /// another name before it is renamed into place.
    #[arg(long, value_name = "N")]
    pub model_version: Option<u64>,
}

/// Runs `ferry sign`.
pub fn run(args: SignArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.generate_key {
        let public = SigningKey::generate_files(path)?;
        println!(
            "wrote the secret key to {} (keep it private) and the public key to {} (key id {}); start servers with --trusted-key {}",
            path.display(),
            integrity::public_key_path(path).display(),
            public.id(),
            integrity::public_key_path(path).display(),
        );
        return Ok(());
    }
    let (Some(dir), Some(key_path)) = (&args.version_dir, &args.key) else {
        anyhow::bail!("give VERSION_DIR and --key KEY_FILE (or --generate-key KEY_FILE)");
    };
    let key = SigningKey::read(key_path)?;
    let (model, version) = names(dir, args.model.as_deref(), args.model_version)?;
    let sig = integrity::sign_version(dir, &model, version, &key)
        .with_context(|| format!("signing {}", dir.display()))?;
    println!(
        "signed {model} version {version} ({} files) with key {}: {}",
        sig.files.len(),
        sig.key_id,
        dir.join(integrity::SIGNATURE_FILE).display()
    );
    Ok(())
}

/// The model name and version a folder is signed for: the flags, else its parent's name and its own.
fn names(dir: &Path, model: Option<&str>, version: Option<u64>) -> anyhow::Result<(String, u64)> {
    let absolute = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let version = match version {
        Some(v) => v,
        None => absolute
            .file_name()
            .and_then(|n| ferry_repo::parse_version(&n.to_string_lossy()))
            .with_context(|| {
                format!(
                    "{} is not named like a version (a positive integer): give --model-version",
                    dir.display()
                )
            })?,
    };
    let model = match model {
        Some(m) => m.to_string(),
        None => absolute
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .context("cannot tell the model name from the path: give --model")?,
    };
    ferry_repo::validate_name(&model)?;
    anyhow::ensure!(version > 0, "versions are positive integers");
    Ok((model, version))
}

/// The server's integrity policy from `--trusted-key` files and `--max-model-bytes`.
pub fn policy(trusted_keys: &[PathBuf], max_model_bytes: u64) -> anyhow::Result<IntegrityPolicy> {
    let mut keys: Vec<PublicKey> = Vec::new();
    for path in trusted_keys {
        let key = PublicKey::read(path).context("--trusted-key")?;
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    Ok(IntegrityPolicy {
        trusted_keys: keys,
        max_model_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_path_unless_given() {
        let p = Path::new("/repo/iris/3");
        assert_eq!(names(p, None, None).unwrap(), ("iris".into(), 3));
        assert_eq!(
            names(Path::new("/s/.incoming-4"), Some("iris"), Some(4)).unwrap(),
            ("iris".into(), 4)
        );
        assert!(names(Path::new("/s/.incoming-4"), Some("iris"), None).is_err());
        assert!(names(Path::new("/s/.m/4"), None, None).is_err());
        assert!(names(p, Some("../x"), None).is_err());
    }
}
