//! Model integrity: signed versions (`ferry sign`, `--trusted-key`) and the size limit on `model.onnx` and its
//! external data files.
//!
//! A signature covers a whole version: the model's name and version number and the sha256 of every file of the
//! version directory (`model.onnx`, `ferry.json`, `warmup/*.json`, anything else), so changing, adding or
//! removing any file, or copying the version under another model or number, breaks it. It is an Ed25519
//! signature (RFC 8032) kept beside the model in `ferry.sig`:
//!
//! ```json
//! {
//!   "format": "ferry-signature-v1",
//!   "algorithm": "ed25519",
//!   "key_id": "5f1c0e7a9b2d4c61",
//!   "model": "iris",
//!   "version": 3,
//!   "files": { "ferry.json": "<sha256 hex>", "model.onnx": "<sha256 hex>" },
//!   "signature": "<base64 of the 64-byte signature>"
//! }
//! ```
//!
//! What is signed is the text [`signed_message`] builds from the model, the version and the files (one line each,
//! `<sha256>  <path>`, sorted by path, as `sha256sum` prints them). The server never trusts `files`, `model` or
//! `version` from `ferry.sig`: it hashes what is on disk (the bytes it is about to load, for `model.onnx` and
//! `ferry.json`), rebuilds the text with the names it serves the version under, and verifies the signature with
//! the trusted key `key_id` names; the listed files only explain a failure ("model.onnx changed after signing").
//!
//! Keys are files of one line: a secret key is the 32-byte Ed25519 seed, a public key the 32-byte public key, each
//! in hex (base64 is accepted too). A key's id is the first 16 hex digits of the sha256 of its public key.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use base64::Engine as _;

use crate::{sha256_hex, validate_name, NameError};

/// Why a key could not be read or made, a version not signed, or a version refused before it loads.
#[derive(Debug, thiserror::Error)]
pub enum IntegrityError {
    /// A file (a key, a version's file, `ferry.sig`) could not be read or written.
    #[error("cannot {action} {}: {source}", .path.display())]
    Io {
        /// `read`, `write` or `create`.
        action: &'static str,
        /// The file (`model.onnx` alone for the model: the reason reaches clients).
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Key text that is neither 64 hex digits nor base64.
    #[error("not a key: expected 32 bytes in hex (64 digits) or base64")]
    KeyNotEncoded,
    /// Key text that decodes to a number of bytes other than 32.
    #[error("not a key: {0} bytes, expected 32")]
    KeyLength(usize),
    /// A key file whose contents are not a key.
    #[error("{}: {source}", .path.display())]
    BadKeyFile {
        /// The key file.
        path: PathBuf,
        /// What is wrong with its text ([`IntegrityError::KeyNotEncoded`] or [`IntegrityError::KeyLength`]).
        #[source]
        source: Box<IntegrityError>,
    },
    /// A public key file given where the secret key belongs.
    #[error("{} is a public key (the .pub file servers take with --trusted-key): sign with the secret key file{}",
        .path.display(),
        if *.secret_exists {
            format!(" beside it, {}", .secret.display())
        } else {
            format!(" it was made with (`ferry sign --generate-key {}` wrote both)", .secret.display())
        }
    )]
    PublicKeyForSecret {
        /// The `.pub` file.
        path: PathBuf,
        /// Where its secret key would be (the path without `.pub`).
        secret: PathBuf,
        /// Whether that file exists.
        secret_exists: bool,
    },
    /// A secret key file that group or others can read.
    #[error("{} is readable by other users (mode {mode:o}): `chmod 600` it", .path.display())]
    KeyReadableByOthers {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// `--generate-key` found the secret key file already there.
    #[error("{} exists; not overwriting a key", .0.display())]
    KeyExists(PathBuf),
    /// `--generate-key` found the public key file already there.
    #[error("{} exists; not overwriting it", .0.display())]
    PublicKeyExists(PathBuf),
    /// The operating system could not give random bytes for a new key.
    #[error("the operating system's random number generator failed")]
    Random,
    /// A model name that could leave the repository.
    #[error(transparent)]
    Name(#[from] NameError),
    /// Version 0.
    #[error("versions are positive integers")]
    ZeroVersion,
    /// A folder to sign that holds no model.
    #[error("the version has no model.onnx, model.gguf or Hugging Face checkpoint (config.json and model.safetensors)")]
    NoModel,
    /// A file whose name a repository cannot serve, so a signature over it would not verify from S3.
    #[error("{0}: a file name Ferry does not fetch from S3 (hidden, or not letters, digits, `-`, `_` and `.`); remove or rename it before signing")]
    UnfetchableName(String),
    /// A file name in a version folder that is not UTF-8.
    #[error("{}: a file name that is not UTF-8 ({name:?})", .folder.display())]
    NonUtf8Name {
        /// The folder holding it.
        folder: PathBuf,
        /// The name.
        name: std::ffi::OsString,
    },
    /// A symbolic link to a folder inside a version.
    #[error("{0} is a symbolic link to a folder, which a signed version cannot hold")]
    LinkToFolder(String),
    /// Folders nested deeper than a signature covers.
    #[error("{0}: folders nest deeper than {MAX_DEPTH}")]
    TooDeep(String),
    /// More files than a signature covers.
    #[error("the version has more than {MAX_FILES} files")]
    TooManyFiles,
    /// Signing the version in this folder failed.
    #[error("{}: {source}", .dir.display())]
    InFolder {
        /// The version folder.
        dir: PathBuf,
        /// Why.
        #[source]
        source: Box<IntegrityError>,
    },
    /// The signature could not be written as JSON.
    #[error(transparent)]
    Json(serde_json::Error),
    /// The version has no `ferry.sig` and the server requires one.
    #[error("the version is not signed (no {SIGNATURE_FILE}) and the server requires a signature by a trusted key (--trusted-key): sign it with `ferry sign`")]
    Unsigned,
    /// `ferry.sig` is larger than 1 MiB.
    #[error("{SIGNATURE_FILE} is larger than 1 MiB")]
    SignatureTooLarge,
    /// `ferry.sig` is not the JSON of a signature.
    #[error("{SIGNATURE_FILE} is malformed: {0}")]
    Malformed(#[source] serde_json::Error),
    /// `ferry.sig` of a format or algorithm this build does not read.
    #[error("{SIGNATURE_FILE} has format `{format}` and algorithm `{algorithm}`; this build reads `{FORMAT}` with `ed25519`")]
    UnknownFormat {
        /// Its `format`.
        format: String,
        /// Its `algorithm`.
        algorithm: String,
    },
    /// Signed by a key that is not trusted.
    #[error("signed by key {key_id}, which is not a trusted key (trusted: {})", .trusted.join(", "))]
    Untrusted {
        /// The id of the key that signed.
        key_id: String,
        /// The ids of the trusted keys.
        trusted: Vec<String>,
    },
    /// The signature in `ferry.sig` is not base64.
    #[error("{SIGNATURE_FILE}: the signature is not base64: {0}")]
    SignatureNotBase64(#[source] base64::DecodeError),
    /// The signature does not verify over the version as it is.
    #[error("the signature by key {key_id} does not match the version: {why}")]
    Mismatch {
        /// The id of the key that claims to have signed.
        key_id: String,
        /// What differs from what `ferry.sig` lists (files added, changed or removed, another model or version), or
        /// that the file itself was altered.
        why: String,
    },
    /// `model.onnx` is larger than protobuf allows.
    #[error("model.onnx is {0} bytes, larger than the {MAX_GRAPH_BYTES} bytes protobuf allows: keep the weights in external data files beside it")]
    GraphTooLarge(u64),
    /// `model.onnx` is larger than `--max-model-bytes`.
    #[error("model.onnx is {size} bytes, larger than the {max} bytes --max-model-bytes allows")]
    ModelTooLarge {
        /// Its size, in bytes.
        size: u64,
        /// The limit, in bytes.
        max: u64,
    },
    /// An external data file that `model.onnx` names cannot be read.
    #[error("cannot read the external data file {} that model.onnx names: {source}", .file.display())]
    ExternalDataUnreadable {
        /// The file, relative to the version folder.
        file: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An external data file that `model.onnx` names is not a regular file.
    #[error("the external data file {} that model.onnx names is not a regular file", .0.display())]
    ExternalDataNotAFile(PathBuf),
    /// `model.onnx` and its external data files are larger together than `--max-model-bytes`.
    #[error("model.onnx and its external data ({}) are {total} bytes, larger than the {max} bytes --max-model-bytes allows",
        .files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", "))]
    ExternalTooLarge {
        /// The external data files, relative to the version folder.
        files: Vec<PathBuf>,
        /// Their size with `model.onnx`, in bytes.
        total: u64,
        /// The limit, in bytes.
        max: u64,
    },
}

impl IntegrityError {
    fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> IntegrityError {
        let path = path.into();
        move |source| IntegrityError::Io {
            action,
            path,
            source,
        }
    }

    fn bad_key_file(path: &Path) -> impl FnOnce(IntegrityError) -> IntegrityError + '_ {
        move |e| IntegrityError::BadKeyFile {
            path: path.to_path_buf(),
            source: Box::new(e),
        }
    }
}

/// The signature file in a version directory.
pub const SIGNATURE_FILE: &str = "ferry.sig";
/// The `format` of signature files this build writes and reads.
pub const FORMAT: &str = "ferry-signature-v1";
/// The default largest model (`--max-model-bytes`): `model.onnx` and its external data files together, 16 GiB.
pub const DEFAULT_MAX_MODEL_BYTES: u64 = 16 << 30;
/// The largest `model.onnx` whatever the limit: 2 GiB, protobuf's own limit (larger models keep their weights in
/// external data files).
pub const MAX_GRAPH_BYTES: u64 = 2 << 30;
/// The most files a signed version may have, and the deepest folder nesting walked.
const MAX_FILES: usize = 10_000;
const MAX_DEPTH: usize = 16;

/// What the server checks before a model reaches an engine, beyond the sha256 in `ferry.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntegrityPolicy {
    /// When not empty, only versions signed by one of these keys load.
    pub trusted_keys: Vec<PublicKey>,
    /// A larger model (`model.onnx` and its external data files together) is refused before it is read (and, from
    /// S3, before it is fetched).
    pub max_model_bytes: u64,
}

impl Default for IntegrityPolicy {
    fn default() -> Self {
        IntegrityPolicy {
            trusted_keys: Vec::new(),
            max_model_bytes: DEFAULT_MAX_MODEL_BYTES,
        }
    }
}

/// An Ed25519 public key.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey([u8; 32]);

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.id())
    }
}

impl PublicKey {
    /// Parses a public key written in hex or base64.
    pub fn parse(text: &str) -> Result<PublicKey, IntegrityError> {
        decode_key(text).map(PublicKey)
    }

    /// Reads a public key file (`ferry sign --generate-key` writes `KEY_FILE.pub`).
    pub fn read(path: &Path) -> Result<PublicKey, IntegrityError> {
        let text = read_small(path)?;
        PublicKey::parse(&text).map_err(IntegrityError::bad_key_file(path))
    }

    /// The key's id: the first 16 hex digits of the sha256 of its bytes.
    pub fn id(&self) -> String {
        sha256_hex(&self.0)[..16].to_string()
    }

    /// The key in hex, as key files hold it.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Whether `signature` is this key's signature of `message`.
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &self.0)
            .verify(message, signature)
            .is_ok()
    }
}

/// An Ed25519 secret key (its 32-byte seed).
pub struct SigningKey {
    pair: ring::signature::Ed25519KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.public_key().id())
    }
}

impl SigningKey {
    /// The key with this seed.
    pub fn from_seed(seed: &[u8; 32]) -> SigningKey {
        SigningKey {
            pair: ring::signature::Ed25519KeyPair::from_seed_unchecked(seed)
                .expect("any 32 bytes are an Ed25519 seed"),
        }
    }

    /// A new random key and its seed (from the operating system's generator).
    pub fn generate() -> Result<(SigningKey, [u8; 32]), IntegrityError> {
        use ring::rand::SecureRandom;
        let mut seed = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| IntegrityError::Random)?;
        Ok((SigningKey::from_seed(&seed), seed))
    }

    /// Reads a secret key file. On Unix it must not be readable by group or others (as ssh insists). A file named
    /// `*.pub` is refused as the public key `--generate-key` writes (the same 64 hex digits as a seed), unless it is
    /// itself the secret key of a `*.pub.pub` beside it.
    pub fn read(path: &Path) -> Result<SigningKey, IntegrityError> {
        if path.extension().is_some_and(|e| e == "pub") {
            let own_public = PublicKey::read(&public_key_path(path));
            let seed = read_small(path).and_then(|t| decode_key(&t));
            let is_secret = matches!((own_public, seed), (Ok(p), Ok(s)) if SigningKey::from_seed(&s).public_key() == p);
            if !is_secret {
                let secret = path.with_extension("");
                return Err(IntegrityError::PublicKeyForSecret {
                    path: path.to_path_buf(),
                    secret_exists: secret.is_file(),
                    secret,
                });
            }
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)
                .map_err(IntegrityError::io("read", path))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(IntegrityError::KeyReadableByOthers {
                    path: path.to_path_buf(),
                    mode: mode & 0o777,
                });
            }
        }
        let text = read_small(path)?;
        let seed = decode_key(&text).map_err(IntegrityError::bad_key_file(path))?;
        Ok(SigningKey::from_seed(&seed))
    }

    /// Makes a new key: the seed into `path` (created, never overwritten, mode 0600) and the public key into
    /// `path.pub`. Returns the public key.
    pub fn generate_files(path: &Path) -> Result<PublicKey, IntegrityError> {
        let (key, seed) = SigningKey::generate()?;
        let public = key.public_key();
        let pub_path = public_key_path(path);
        if pub_path.exists() {
            return Err(IntegrityError::PublicKeyExists(pub_path));
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => IntegrityError::KeyExists(path.to_path_buf()),
            _ => IntegrityError::io("create", path)(e),
        })?;
        std::io::Write::write_all(&mut file, format!("{}\n", hex(&seed)).as_bytes())
            .map_err(IntegrityError::io("write", path))?;
        std::fs::write(&pub_path, format!("{}\n", public.to_hex()))
            .map_err(IntegrityError::io("write", &pub_path))?;
        Ok(public)
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        use ring::signature::KeyPair;
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(bytes)
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }
}

/// Where the public key of the secret key file `path` goes: `path.pub`.
pub fn public_key_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// The contents of `ferry.sig`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SignatureFile {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always `ed25519`.
    pub algorithm: String,
    /// The id of the key that signed (see [`PublicKey::id`]).
    pub key_id: String,
    /// The model name signed for.
    pub model: String,
    /// The version signed for.
    pub version: u64,
    /// Every file signed (path relative to the version directory, `/`-separated) and its sha256.
    pub files: BTreeMap<String, String>,
    /// The signature of [`signed_message`], in base64.
    pub signature: String,
}

/// The text that is signed: a header line, the model and version, and one `<sha256>  <path>` line per file,
/// sorted by path.
pub fn signed_message(model: &str, version: u64, files: &BTreeMap<String, String>) -> Vec<u8> {
    let mut text = format!("{FORMAT}\nmodel {model}\nversion {version}\n");
    for (path, sha) in files {
        text.push_str(&format!("{sha}  {path}\n"));
    }
    text.into_bytes()
}

/// The sha256 of every file of a version directory but `ferry.sig`, by `/`-separated relative path. `known`
/// gives the hash of a file already read (so what is checked is what loads); other files are hashed from disk.
/// Symbolic links to files count as the file they point to; a link to a folder is refused.
pub fn version_files(
    dir: &Path,
    known: &dyn Fn(&str) -> Option<String>,
) -> Result<BTreeMap<String, String>, IntegrityError> {
    let mut files = BTreeMap::new();
    let mut pending = vec![(dir.to_path_buf(), String::new(), 0usize)];
    while let Some((folder, prefix, depth)) = pending.pop() {
        let entries = std::fs::read_dir(&folder).map_err(IntegrityError::io("read", &folder))?;
        for entry in entries {
            let entry = entry.map_err(IntegrityError::io("read", &folder))?;
            let name =
                entry
                    .file_name()
                    .into_string()
                    .map_err(|name| IntegrityError::NonUtf8Name {
                        folder: folder.clone(),
                        name,
                    })?;
            let rel = format!("{prefix}{name}");
            // Hidden files (`.gitattributes` in a folder from the Hugging Face hub) are not part of a version: the
            // server never reads them and S3 fetches skip them, so signatures neither cover nor require them.
            if rel == SIGNATURE_FILE || name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            let link = entry
                .file_type()
                .map_err(IntegrityError::io("read", &path))?
                .is_symlink();
            let meta = std::fs::metadata(&path).map_err(IntegrityError::io("read", &path))?;
            if meta.is_dir() {
                if link {
                    return Err(IntegrityError::LinkToFolder(rel));
                }
                if depth + 1 >= MAX_DEPTH {
                    return Err(IntegrityError::TooDeep(rel));
                }
                pending.push((path, format!("{rel}/"), depth + 1));
            } else if meta.is_file() {
                if files.len() >= MAX_FILES {
                    return Err(IntegrityError::TooManyFiles);
                }
                let sha = match known(&rel) {
                    Some(sha) => sha,
                    None => hash_file(&path)?,
                };
                files.insert(rel, sha);
            }
        }
    }
    Ok(files)
}

fn hash_file(path: &Path) -> Result<String, IntegrityError> {
    use sha2::Digest;
    let mut file = std::fs::File::open(path).map_err(IntegrityError::io("read", path))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(IntegrityError::io("read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Signs a version directory for `model` and `version`, writing `ferry.sig`. Hidden files are not part of a version
/// (they are skipped); a file whose name a repository cannot serve (odd characters) is refused: it would not be
/// fetched from S3, so the signature would not verify there.
pub fn sign_version(
    dir: &Path,
    model: &str,
    version: u64,
    key: &SigningKey,
) -> Result<SignatureFile, IntegrityError> {
    let files = version_files(dir, &|_| None)?;
    let sig = signature_file(model, version, files, key).map_err(|e| IntegrityError::InFolder {
        dir: dir.to_path_buf(),
        source: Box::new(e),
    })?;
    let text = serde_json::to_string_pretty(&sig).map_err(IntegrityError::Json)? + "\n";
    let tmp = dir.join(format!(".{SIGNATURE_FILE}.tmp"));
    std::fs::write(&tmp, text).map_err(IntegrityError::io("write", &tmp))?;
    let path = dir.join(SIGNATURE_FILE);
    std::fs::rename(&tmp, &path).map_err(IntegrityError::io("write", path))?;
    Ok(sig)
}

/// Signs a version held in memory (files about to be published, by relative path) for `model` and `version`:
/// the contents of its `ferry.sig`, to publish with them.
pub fn sign_files(
    model: &str,
    version: u64,
    files: &[(String, Vec<u8>)],
    key: &SigningKey,
) -> Result<Vec<u8>, IntegrityError> {
    let files = files
        .iter()
        .filter(|(path, _)| path != SIGNATURE_FILE)
        .map(|(path, bytes)| (path.clone(), sha256_hex(bytes)))
        .collect();
    let sig = signature_file(model, version, files, key)?;
    Ok((serde_json::to_string_pretty(&sig).map_err(IntegrityError::Json)? + "\n").into_bytes())
}

fn signature_file(
    model: &str,
    version: u64,
    files: BTreeMap<String, String>,
    key: &SigningKey,
) -> Result<SignatureFile, IntegrityError> {
    validate_name(model)?;
    if version == 0 {
        return Err(IntegrityError::ZeroVersion);
    }
    if !files.contains_key("model.onnx")
        && !files.contains_key("model.gguf")
        && !ferry_model::hf::is_checkpoint(|f| files.contains_key(f))
    {
        return Err(IntegrityError::NoModel);
    }
    if let Some(bad) = files
        .keys()
        .find(|p| p.split('/').any(|part| validate_name(part).is_err()))
    {
        return Err(IntegrityError::UnfetchableName(bad.clone()));
    }
    let signature = key.sign(&signed_message(model, version, &files));
    Ok(SignatureFile {
        format: FORMAT.into(),
        algorithm: "ed25519".into(),
        key_id: key.public_key().id(),
        model: model.into(),
        version,
        files,
        signature: base64::engine::general_purpose::STANDARD.encode(signature),
    })
}

/// Verifies a version's `ferry.sig` against the trusted keys, for the model and version it is served as, over
/// `files` (from [`version_files`]). Returns the id of the key that signed it; the error says what failed.
pub fn verify_version(
    dir: &Path,
    model: &str,
    version: u64,
    files: &BTreeMap<String, String>,
    trusted: &[PublicKey],
) -> Result<String, IntegrityError> {
    let path = dir.join(SIGNATURE_FILE);
    let read = std::fs::File::open(&path).and_then(|f| {
        let mut text = Vec::new();
        f.take((1 << 20) + 1).read_to_end(&mut text).map(|_| text)
    });
    let text = match read {
        Ok(t) if t.len() > 1 << 20 => return Err(IntegrityError::SignatureTooLarge),
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(IntegrityError::Unsigned),
        Err(e) => return Err(IntegrityError::io("read", path)(e)),
    };
    let sig: SignatureFile = serde_json::from_slice(&text).map_err(IntegrityError::Malformed)?;
    if sig.format != FORMAT || sig.algorithm != "ed25519" {
        return Err(IntegrityError::UnknownFormat {
            format: sig.format,
            algorithm: sig.algorithm,
        });
    }
    let Some(key) = trusted.iter().find(|k| k.id() == sig.key_id) else {
        return Err(IntegrityError::Untrusted {
            key_id: sig.key_id,
            trusted: trusted.iter().map(PublicKey::id).collect(),
        });
    };
    let signature = base64::engine::general_purpose::STANDARD
        .decode(sig.signature.trim())
        .map_err(IntegrityError::SignatureNotBase64)?;
    if key.verifies(&signed_message(model, version, files), &signature) {
        return Ok(sig.key_id);
    }
    Err(IntegrityError::Mismatch {
        why: explain(&sig, model, version, files),
        key_id: sig.key_id,
    })
}

/// Why a signature does not match, from the files and names `ferry.sig` lists.
fn explain(
    sig: &SignatureFile,
    model: &str,
    version: u64,
    files: &BTreeMap<String, String>,
) -> String {
    let mut why = Vec::new();
    if sig.model != model || sig.version != version {
        why.push(format!(
            "it was signed for {} version {}, not {model} version {version}",
            sig.model, sig.version
        ));
    }
    for (path, sha) in files {
        match sig.files.get(path) {
            None => why.push(format!("{path} was added after signing")),
            Some(signed) if signed != sha => why.push(format!("{path} changed after signing")),
            Some(_) => {}
        }
    }
    for path in sig.files.keys().filter(|p| !files.contains_key(*p)) {
        why.push(format!("{path} was removed after signing"));
    }
    if why.is_empty() {
        why.push(format!(
            "{SIGNATURE_FILE} itself was altered, or made with another key"
        ));
    }
    // The names come from ferry.sig too: keep the reason short whatever it lists.
    const SHOWN: usize = 5;
    if why.len() > SHOWN {
        let more = why.len() - SHOWN;
        why.truncate(SHOWN);
        why.push(format!("{more} more differences"));
    }
    why.join("; ")
}

/// Reads `model.onnx`, refusing one larger than `max_bytes` (or than [`MAX_GRAPH_BYTES`]) before reading it (and
/// if it grows while read).
pub fn read_model(path: &Path, max_bytes: u64) -> Result<Vec<u8>, IntegrityError> {
    let max_bytes = max_bytes.min(MAX_GRAPH_BYTES);
    let too_big = |size: u64| {
        if max_bytes == MAX_GRAPH_BYTES {
            IntegrityError::GraphTooLarge(size)
        } else {
            IntegrityError::ModelTooLarge {
                size,
                max: max_bytes,
            }
        }
    };
    // The reason reaches clients: name the file, not where the repository lives.
    let unreadable = || IntegrityError::io("read", "model.onnx");
    let file = std::fs::File::open(path).map_err(unreadable())?;
    let size = file.metadata().map_err(unreadable())?.len();
    if size > max_bytes {
        return Err(too_big(size));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(unreadable())?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Refuses a model whose `model.onnx` (`graph_bytes` long) and external data files (`files`, relative to `dir`,
/// already checked to stay inside it) together exceed `max_bytes`, or whose data files are missing or not regular
/// files. Only sizes are read.
pub fn check_external_sizes(
    dir: &Path,
    graph_bytes: u64,
    files: &[PathBuf],
    max_bytes: u64,
) -> Result<(), IntegrityError> {
    let mut total = graph_bytes;
    for file in files {
        // The reason reaches clients: name the file relative to the version, not where the repository lives.
        let meta = std::fs::metadata(dir.join(file)).map_err(|source| {
            IntegrityError::ExternalDataUnreadable {
                file: file.clone(),
                source,
            }
        })?;
        if !meta.is_file() {
            return Err(IntegrityError::ExternalDataNotAFile(file.clone()));
        }
        total = total.saturating_add(meta.len());
    }
    if total > max_bytes {
        return Err(IntegrityError::ExternalTooLarge {
            files: files.to_vec(),
            total,
            max: max_bytes,
        });
    }
    Ok(())
}

fn read_small(path: &Path) -> Result<String, IntegrityError> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(4096).read_to_string(&mut text))
        .map_err(IntegrityError::io("read", path))?;
    Ok(text)
}

fn decode_key(text: &str) -> Result<[u8; 32], IntegrityError> {
    let text = text.trim();
    let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..32)
            .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("checked hex"))
            .collect()
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|_| IntegrityError::KeyNotEncoded)?
    };
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| IntegrityError::KeyLength(b.len()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn version_dir(tag: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("ferry-sig-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("warmup")).unwrap();
        std::fs::write(dir.join("model.onnx"), b"model bytes").unwrap();
        std::fs::write(dir.join("ferry.json"), br#"{"classes":["a","b"]}"#).unwrap();
        std::fs::write(dir.join("warmup/1.json"), b"{}").unwrap();
        Dir(dir)
    }
    fn verify(
        dir: &Path,
        model: &str,
        version: u64,
        keys: &[PublicKey],
    ) -> Result<String, IntegrityError> {
        let files = version_files(dir, &|_| None)?;
        verify_version(dir, model, version, &files, keys)
    }

    #[test]
    fn a_signed_version_verifies_and_any_change_is_named() {
        let dir = version_dir("change");
        let key = SigningKey::from_seed(&[7; 32]);
        let trusted = [key.public_key()];
        let sig = sign_version(&dir.0, "iris", 3, &key).unwrap();
        assert_eq!(sig.files.len(), 3);
        assert_eq!(
            verify(&dir.0, "iris", 3, &trusted).unwrap(),
            key.public_key().id()
        );

        let e = verify(&dir.0, "iris", 4, &trusted).unwrap_err().to_string();
        assert!(
            e.contains("signed for iris version 3, not iris version 4"),
            "{e}"
        );
        let e = verify(&dir.0, "other", 3, &trusted)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not other version 3"), "{e}");

        std::fs::write(dir.0.join("model.onnx"), b"model bytez").unwrap();
        let e = verify(&dir.0, "iris", 3, &trusted).unwrap_err().to_string();
        assert!(e.contains("model.onnx changed after signing"), "{e}");
        std::fs::write(dir.0.join("model.onnx"), b"model bytes").unwrap();

        std::fs::write(dir.0.join("warmup/2.json"), b"{}").unwrap();
        let e = verify(&dir.0, "iris", 3, &trusted).unwrap_err().to_string();
        assert!(e.contains("warmup/2.json was added after signing"), "{e}");
        std::fs::remove_file(dir.0.join("warmup/2.json")).unwrap();

        std::fs::remove_file(dir.0.join("ferry.json")).unwrap();
        let e = verify(&dir.0, "iris", 3, &trusted).unwrap_err().to_string();
        assert!(e.contains("ferry.json was removed after signing"), "{e}");

        for i in 0..20 {
            std::fs::write(dir.0.join(format!("extra{i}")), b"x").unwrap();
        }
        let e = verify(&dir.0, "iris", 3, &trusted).unwrap_err().to_string();
        assert!(e.contains("; 16 more differences"), "{e}");
    }

    #[test]
    fn unsigned_untrusted_and_forged_signatures_are_refused() {
        let dir = version_dir("forged");
        let key = SigningKey::from_seed(&[1; 32]);
        let other = SigningKey::from_seed(&[2; 32]);
        let e = verify(&dir.0, "m", 1, &[key.public_key()]).unwrap_err();
        assert!(matches!(e, IntegrityError::Unsigned), "{e}");
        assert!(e.to_string().contains("not signed"), "{e}");

        sign_version(&dir.0, "m", 1, &other).unwrap();
        let e = verify(&dir.0, "m", 1, &[key.public_key()]).unwrap_err();
        assert!(matches!(e, IntegrityError::Untrusted { .. }), "{e}");
        assert!(e.to_string().contains("not a trusted key"), "{e}");
        assert!(verify(&dir.0, "m", 1, &[key.public_key(), other.public_key()]).is_ok());

        // Claim the trusted key's id over the other key's signature: the files match, the signature does not.
        let path = dir.0.join(SIGNATURE_FILE);
        let mut sig: SignatureFile =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        sig.key_id = key.public_key().id();
        std::fs::write(&path, serde_json::to_vec(&sig).unwrap()).unwrap();
        let e = verify(&dir.0, "m", 1, &[key.public_key()]).unwrap_err();
        assert!(matches!(e, IntegrityError::Mismatch { .. }), "{e}");
        assert!(
            e.to_string().contains("altered, or made with another key"),
            "{e}"
        );

        std::fs::write(&path, b"{not json").unwrap();
        let e = verify(&dir.0, "m", 1, &[key.public_key()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("malformed"), "{e}");
    }

    #[test]
    fn the_hash_of_bytes_already_read_is_the_one_signed_over() {
        let dir = version_dir("known");
        let key = SigningKey::from_seed(&[3; 32]);
        sign_version(&dir.0, "m", 1, &key).unwrap();
        // The loader read different bytes than are on disk now: its hash is what counts.
        let files = version_files(&dir.0, &|p| {
            (p == "model.onnx").then(|| sha256_hex(b"other"))
        })
        .unwrap();
        let e = verify_version(&dir.0, "m", 1, &files, &[key.public_key()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.onnx changed"), "{e}");
    }

    #[test]
    fn files_signed_in_memory_verify_once_written() {
        let dir = version_dir("memory");
        let key = SigningKey::from_seed(&[5; 32]);
        let files: Vec<(String, Vec<u8>)> = ["model.onnx", "ferry.json", "warmup/1.json"]
            .iter()
            .map(|p| (p.to_string(), std::fs::read(dir.0.join(p)).unwrap()))
            .collect();
        let sig = sign_files("m", 2, &files, &key).unwrap();
        std::fs::write(dir.0.join(SIGNATURE_FILE), sig).unwrap();
        assert!(verify(&dir.0, "m", 2, &[key.public_key()]).is_ok());
        let e = sign_files("m", 2, &files[1..], &key)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no model.onnx"), "{e}");
    }

    #[test]
    fn signing_skips_hidden_files_and_refuses_folders_without_a_model() {
        let dir = version_dir("hidden");
        let key = SigningKey::from_seed(&[4; 32]);
        // A folder from the Hugging Face hub holds `.gitattributes`: not part of the version, signed or not.
        std::fs::write(dir.0.join(".gitattributes"), b"x").unwrap();
        let sig = sign_version(&dir.0, "m", 1, &key).unwrap();
        assert!(!sig.files.contains_key(".gitattributes"));
        std::fs::write(dir.0.join(".gitattributes"), b"changed").unwrap();
        assert!(verify(&dir.0, "m", 1, &[key.public_key()]).is_ok());
        std::fs::write(dir.0.join("bad name"), b"x").unwrap();
        let e = sign_version(&dir.0, "m", 1, &key).unwrap_err().to_string();
        assert!(e.contains("bad name"), "{e}");
        std::fs::remove_file(dir.0.join("bad name")).unwrap();
        std::fs::remove_file(dir.0.join("model.onnx")).unwrap();
        let e = sign_version(&dir.0, "m", 1, &key).unwrap_err().to_string();
        assert!(e.contains("no model.onnx"), "{e}");
    }

    #[test]
    fn key_files_round_trip_and_the_secret_is_private() {
        let dir = version_dir("keys");
        let path = dir.0.join("signing.key");
        let public = SigningKey::generate_files(&path).unwrap();
        assert_eq!(PublicKey::read(&public_key_path(&path)).unwrap(), public);
        assert_eq!(SigningKey::read(&path).unwrap().public_key(), public);
        let e = SigningKey::generate_files(&path).unwrap_err();
        assert!(matches!(e, IntegrityError::PublicKeyExists(_)), "{e}");
        assert!(e.to_string().contains("exists"), "{e}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let e = SigningKey::read(&path).unwrap_err();
            assert!(
                matches!(e, IntegrityError::KeyReadableByOthers { mode: 0o644, .. }),
                "{e}"
            );
            assert!(e.to_string().contains("chmod 600"), "{e}");
        }
        let b64 = base64::engine::general_purpose::STANDARD.encode(public.0);
        assert_eq!(PublicKey::parse(&format!("  {b64}\n")).unwrap(), public);
        assert!(matches!(
            PublicKey::parse("abcd"),
            Err(IntegrityError::KeyLength(3))
        ));
        assert_eq!(public.id().len(), 16);
    }

    #[test]
    fn errors_read_as_the_messages_they_replace() {
        let dir = version_dir("messages");
        let public = dir.0.join("k.pub");
        std::fs::write(
            &public,
            format!(
                "{}\n",
                SigningKey::from_seed(&[6; 32]).public_key().to_hex()
            ),
        )
        .unwrap();
        let e = SigningKey::read(&public).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{} is a public key (the .pub file servers take with --trusted-key): sign with the secret key file it was made with (`ferry sign --generate-key {}` wrote both)",
                public.display(),
                dir.0.join("k").display()
            )
        );
        std::fs::write(dir.0.join("k"), b"x").unwrap();
        let e = SigningKey::read(&public).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{} is a public key (the .pub file servers take with --trusted-key): sign with the secret key file beside it, {}",
                public.display(),
                dir.0.join("k").display()
            )
        );
        std::fs::write(&public, b"abcd").unwrap();
        let e = PublicKey::read(&public).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{}: not a key: 3 bytes, expected 32", public.display())
        );
        let e = IntegrityError::Untrusted {
            key_id: "a".into(),
            trusted: vec!["b".into(), "c".into()],
        };
        assert_eq!(
            e.to_string(),
            "signed by key a, which is not a trusted key (trusted: b, c)"
        );
        let e = check_external_sizes(
            &dir.0,
            1,
            &[PathBuf::from("ferry.json"), PathBuf::from("warmup/1.json")],
            2,
        )
        .unwrap_err();
        assert!(matches!(e, IntegrityError::ExternalTooLarge { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "model.onnx and its external data (ferry.json, warmup/1.json) are 24 bytes, larger than the 2 bytes --max-model-bytes allows"
        );
        let e = read_model(&dir.0.join("absent.onnx"), 10).unwrap_err();
        assert!(e.to_string().starts_with("cannot read model.onnx: "), "{e}");
    }

    #[test]
    fn models_over_the_limit_are_refused_before_reading() {
        let dir = version_dir("size");
        let path = dir.0.join("model.onnx");
        assert_eq!(read_model(&path, 11).unwrap(), b"model bytes");
        let e = read_model(&path, 10).unwrap_err();
        assert!(
            matches!(e, IntegrityError::ModelTooLarge { size: 11, max: 10 }),
            "{e}"
        );
        assert!(
            e.to_string().contains("11 bytes, larger than the 10 bytes"),
            "{e}"
        );
    }
}
