//! The model repository as files: what the server and the command line share about it.
//!
//! - [`source`]: where a repository lives (a local directory or an S3-compatible bucket), scanning it, reading a
//!   model's small files, fetching a version into a local cache, writing files and publishing versions.
//! - [`integrity`]: `ferry.sig` signatures over a version's files (Ed25519), keys, and the checks a version passes
//!   before it loads (trusted keys, size limits).
//! - [`rollout`]: `rollout.json`, a model's staged rollout plan, its gates and decisions, the sticky routing of
//!   requests between the stable version and the candidate, and [`rollout::unversioned_target`], the one rule
//!   for which version serves a request that names none (the server routes by it; `ferry rollout` and
//!   `ferry retrain` read the live version from it).
//! - Names: [`validate_name`] and [`parse_version`], the rules for model and version names, [`sha256_hex`], and
//!   [`toml_error_position`] for errors in TOML files.
//!
//! Errors are typed, one per module: [`NameError`], [`source::SourceError`], [`integrity::IntegrityError`] and
//! [`rollout::PlanError`] (a caller matches on the variant; the text of each is what the reason reads as).
//!
//! It knows nothing of serving: no engine, protocol or listener.

pub mod integrity;
pub mod rollout;
pub mod source;

pub use integrity::IntegrityError;
pub use rollout::PlanError;
pub use source::SourceError;

/// A model, label or file name that could name something outside the repository root (see [`validate_name`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid model name `{}`: use letters, digits, `-`, `_` and `.`, not starting with `.`",
    .name.escape_debug()
)]
pub struct NameError {
    /// The name refused.
    pub name: String,
}

/// " (line L, column C)" for a TOML error (a model's `config.toml`, or Ferry's own configuration file) that has a position in `text` (both from 1; the column counts characters),
/// else "".
pub fn toml_error_position(e: &toml::de::Error, text: &str) -> String {
    let Some(span) = e.span() else {
        return String::new();
    };
    let before = text.get(..span.start).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    format!(
        " (line {}, column {})",
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1
    )
}

/// Checks a model or label name: it must not be able to name anything outside the repository root.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(NameError {
            name: name.to_string(),
        })
    }
}

/// Parses a version directory or URL segment: a positive integer.
pub fn parse_version(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u64>().ok().filter(|v| *v > 0)
}

/// Hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
