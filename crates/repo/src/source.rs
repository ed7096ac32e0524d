//! Where a model repository lives: a local directory, or an S3-compatible bucket (`s3://bucket/prefix`) whose
//! versions are fetched into a local cache before they load.
//!
//! Both kinds answer the same questions: which models and versions are there and has any changed (a
//! [`Listing`] with a fingerprint per version), what do a model's small files say (`config.toml`, `rollout.json`),
//! where is a version on local disk, and how to write a file or publish a version (for rollouts and `ferry
//! retrain`). Credentials and endpoints for S3 come from the standard `AWS_*` environment variables
//! (`AWS_ENDPOINT_URL` for a server other than AWS).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::{parse_version, validate_name, NameError};

/// Why a repository could not be opened, scanned, read or written.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A local repository path that is not a directory.
    #[error("model repository {spec} is not a directory")]
    NotADirectory {
        /// The repository as the user named it.
        spec: String,
    },
    /// An `s3://` URL without a bucket.
    #[error("{spec}: no bucket name (expected s3://bucket/prefix)")]
    NoBucket {
        /// The repository as the user named it.
        spec: String,
    },
    /// The S3 client could not be set up from the URL and the `AWS_*` environment.
    #[error("{spec}: cannot set up the S3 client: {source}")]
    S3Client {
        /// The repository as the user named it.
        spec: String,
        /// Why.
        #[source]
        source: Box<object_store::Error>,
    },
    /// A model, label or file name that could leave the repository.
    #[error(transparent)]
    Name(#[from] NameError),
    /// A file or folder on local disk (the repository, or the cache of an S3 one) could not be read or written.
    #[error("cannot {action} {}: {source}", .path.display())]
    Io {
        /// What was being done: `read`, `write`, `create`, `read model repository`, `create the cache`.
        action: &'static str,
        /// The path (for a model's file, `model/name` relative to the repository).
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A version fetched into the cache could not be renamed from its `.partial` folder.
    #[error("cannot move {} into place: {source}", .path.display())]
    MoveIntoPlace {
        /// The `.partial` folder.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The object store refused or failed a request.
    #[error("{url}: cannot {action}{}: {source}", .key.as_ref().map(|k| format!(" {k}")).unwrap_or_default())]
    ObjectStore {
        /// The repository's URL.
        url: String,
        /// `read`, `write` or `list`.
        action: &'static str,
        /// The object (or the prefix listed); `None` when the whole repository was listed.
        key: Option<String>,
        /// Why.
        #[source]
        source: Box<object_store::Error>,
    },
    /// An object listed a moment ago is gone.
    #[error("{url}: {key} vanished while fetching")]
    Vanished {
        /// The repository's URL.
        url: String,
        /// The object.
        key: String,
    },
    /// A version's objects are larger together than the limit; nothing was fetched.
    #[error("{url}: the files of {prefix} are {total} bytes, larger than the {max} bytes --max-model-bytes allows; not fetched")]
    TooLarge {
        /// The repository's URL.
        url: String,
        /// The version's prefix.
        prefix: String,
        /// Their size together, in bytes.
        total: u64,
        /// The limit, in bytes.
        max: u64,
    },
    /// Publishing a version number that is taken.
    #[error("version {version} of {model} already exists")]
    VersionExists {
        /// The model.
        model: String,
        /// The version.
        version: u64,
    },
    /// The blocking task that scans a local repository failed (panicked or was cancelled).
    #[error("scanning the repository failed: {0}")]
    ScanTask(#[source] tokio::task::JoinError),
}

impl SourceError {
    fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> SourceError {
        let path = path.into();
        move |source| SourceError::Io {
            action,
            path,
            source,
        }
    }
}

/// What a scan found for one model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelListing {
    /// The text of `config.toml`, when present (`Err` with the reason when it could not be read: shown as the
    /// model's load failure, so kept as text).
    pub config: Option<Result<String, String>>,
    /// The text of `rollout.json`, when present.
    pub rollout: Option<Result<String, String>>,
    /// Versions present (with a `model.onnx`) and a fingerprint of their files: it changes when any file does.
    pub versions: BTreeMap<u64, String>,
    /// What is wrong with the folder's layout when it holds no version the server can load (a `model.onnx` outside
    /// a numbered folder, a version folder without one, a number spelled `01`): logged, and shown wherever the
    /// model's missing versions are.
    pub layout: Option<String>,
}

/// What a scan found: every model by name.
pub type Listing = BTreeMap<String, ModelListing>;

/// A model repository.
#[derive(Clone)]
pub enum Repository {
    /// A directory on this machine.
    Local(PathBuf),
    /// An S3-compatible bucket, with versions cached under a local directory.
    S3(Arc<S3Repository>),
}

/// An S3-compatible repository.
pub struct S3Repository {
    url: String,
    store: Arc<dyn object_store::ObjectStore>,
    prefix: String,
    cache: PathBuf,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

type ObjPath = object_store::path::Path;

impl Repository {
    /// Opens `spec`: a directory, or `s3://bucket/prefix` (cached under `cache_dir`).
    pub fn open(spec: &str, cache_dir: &Path) -> Result<Repository, SourceError> {
        let Some(rest) = spec.strip_prefix("s3://") else {
            let path = PathBuf::from(spec);
            if !path.is_dir() {
                return Err(SourceError::NotADirectory {
                    spec: spec.to_string(),
                });
            }
            return Ok(Repository::Local(path));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(SourceError::NoBucket {
                spec: spec.to_string(),
            });
        }
        let mut builder = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
        let endpoint = std::env::var("AWS_ENDPOINT_URL")
            .or_else(|_| std::env::var("AWS_ENDPOINT"))
            .unwrap_or_default();
        if endpoint.starts_with("http://") {
            builder = builder.with_allow_http(true);
        }
        if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err() {
            builder = builder.with_region("us-east-1");
        } else if let Ok(region) = std::env::var("AWS_DEFAULT_REGION") {
            if std::env::var("AWS_REGION").is_err() {
                builder = builder.with_region(region);
            }
        }
        let store = builder.build().map_err(|source| SourceError::S3Client {
            spec: spec.to_string(),
            source: Box::new(source),
        })?;
        let cache = cache_dir.join(sanitize(bucket)).join(sanitize(prefix));
        Ok(Repository::S3(Arc::new(S3Repository {
            url: spec.to_string(),
            store: Arc::new(store),
            prefix: prefix.trim_matches('/').to_string(),
            cache,
        })))
    }

    /// The repository as the user named it.
    pub fn describe(&self) -> String {
        match self {
            Repository::Local(p) => p.display().to_string(),
            Repository::S3(s) => s.url.clone(),
        }
    }

    /// Lists every model, its small files and its versions' fingerprints.
    pub async fn scan(&self) -> Result<Listing, SourceError> {
        match self {
            Repository::Local(root) => {
                let root = root.clone();
                tokio::task::spawn_blocking(move || scan_local(&root))
                    .await
                    .map_err(SourceError::ScanTask)?
            }
            Repository::S3(s3) => s3.scan().await,
        }
    }

    /// The version's directory on local disk (fetched into the cache first for S3), ready to load.
    pub async fn fetch_version(&self, model: &str, version: u64) -> Result<PathBuf, SourceError> {
        self.fetch_version_within(model, version, u64::MAX).await
    }

    /// Like [`Repository::fetch_version`], but refuses (before downloading anything) a version from S3 whose
    /// objects (`model.onnx`, its external data files and the rest) are larger than `max_file_bytes` together.
    pub async fn fetch_version_within(
        &self,
        model: &str,
        version: u64,
        max_file_bytes: u64,
    ) -> Result<PathBuf, SourceError> {
        validate_name(model)?;
        match self {
            Repository::Local(root) => Ok(root.join(model).join(version.to_string())),
            Repository::S3(s3) => s3.fetch_version(model, version, max_file_bytes).await,
        }
    }

    /// Reads a file of a model (`config.toml`, `rollout.json`); `None` when it does not exist.
    pub async fn read_file(&self, model: &str, name: &str) -> Result<Option<Vec<u8>>, SourceError> {
        validate_name(model)?;
        validate_name(name)?;
        match self {
            Repository::Local(root) => match std::fs::read(root.join(model).join(name)) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(SourceError::io("read", format!("{model}/{name}"))(e)),
            },
            Repository::S3(s3) => s3.get(&s3.key(&[model, name])).await,
        }
    }

    /// Writes a file of a model, replacing it atomically.
    pub async fn write_file(
        &self,
        model: &str,
        name: &str,
        bytes: Vec<u8>,
    ) -> Result<(), SourceError> {
        validate_name(model)?;
        validate_name(name)?;
        match self {
            Repository::Local(root) => {
                let dir = root.join(model);
                std::fs::create_dir_all(&dir).map_err(SourceError::io("create", &dir))?;
                write_atomic(&dir.join(name), &bytes)
            }
            Repository::S3(s3) => s3.put(&s3.key(&[model, name]), bytes).await,
        }
    }

    /// The versions present for a model (with a `model.onnx`), ascending.
    pub async fn versions(&self, model: &str) -> Result<Vec<u64>, SourceError> {
        validate_name(model)?;
        let listing = self.scan().await?;
        Ok(listing
            .get(model)
            .map(|m| m.versions.keys().copied().collect())
            .unwrap_or_default())
    }

    /// Publishes a new version: writes its files (`model.onnx` or `model.gguf` last, so a scan never sees a half-written version).
    /// Fails when the version exists.
    pub async fn publish_version(
        &self,
        model: &str,
        version: u64,
        files: Vec<(String, Vec<u8>)>,
    ) -> Result<(), SourceError> {
        validate_name(model)?;
        if self.versions(model).await?.contains(&version) {
            return Err(SourceError::VersionExists {
                model: model.to_string(),
                version,
            });
        }
        let mut files = files;
        files.sort_by_key(|(name, _)| name == "model.onnx" || name == "model.gguf");
        for (name, _) in &files {
            for part in name.split('/') {
                validate_name(part)?;
            }
        }
        match self {
            Repository::Local(root) => {
                let dir = root.join(model).join(version.to_string());
                for (name, bytes) in files {
                    let path = dir.join(&name);
                    if let Some(parent) = path.parent() {
                        std::fs::create_dir_all(parent)
                            .map_err(SourceError::io("create", parent))?;
                    }
                    write_atomic(&path, &bytes)?;
                }
                Ok(())
            }
            Repository::S3(s3) => {
                let v = version.to_string();
                for (name, bytes) in files {
                    s3.put(&s3.key(&[model, &v, &name]), bytes).await?;
                }
                Ok(())
            }
        }
    }
}

/// The file path components of an object key below a version's prefix, when every one is a plain name (no `..`,
/// `.`, empty or hidden part, no separators or odd characters), so the file lands inside the version's folder.
fn local_parts(rel: &str) -> Option<Vec<&str>> {
    let parts: Vec<&str> = rel.split('/').collect();
    (!parts.is_empty() && parts.iter().all(|p| validate_name(p).is_ok())).then_some(parts)
}

fn sanitize(text: &str) -> String {
    let s: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() {
        "_".into()
    } else {
        s
    }
}

/// A name no other writer (another process, another container whose process is also PID 1) picks.
fn unique_suffix() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}.{nanos}.{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SourceError> {
    let tmp = path.with_extension(format!("tmp.{}", unique_suffix()));
    std::fs::write(&tmp, bytes).map_err(SourceError::io("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(SourceError::io("write", path))
}

fn read_small(path: &Path) -> Option<Result<String, String>> {
    match std::fs::read_to_string(path) {
        Ok(t) => Some(Ok(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(Err(SourceError::io("read", path)(e).to_string())),
    }
}

fn scan_local(root: &Path) -> Result<Listing, SourceError> {
    let entries =
        std::fs::read_dir(root).map_err(SourceError::io("read model repository", root))?;
    let mut listing = Listing::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !entry.path().is_dir() {
            continue;
        }
        if let Err(reason) = validate_name(&name) {
            // Said once per directory, not at every scan.
            static WARNED: parking_lot::Mutex<BTreeSet<PathBuf>> =
                parking_lot::Mutex::new(BTreeSet::new());
            let first = WARNED.lock().insert(entry.path());
            if first {
                tracing::warn!(path = %entry.path().display(), %reason, "skipping directory in the model repository");
            }
            continue;
        }
        let dir = entry.path();
        let mut model = ModelListing {
            config: read_small(&dir.join("config.toml")),
            rollout: read_small(&dir.join(crate::rollout::PLAN_FILE)),
            versions: BTreeMap::new(),
            layout: None,
        };
        let mut problems = Vec::new();
        for v in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let file = v.file_name().to_string_lossy().into_owned();
            if !v.path().is_dir() {
                if file.ends_with(".onnx") {
                    problems.push(format!(
                        "{name}/{file} is not in a version folder (versions are numbered folders: {name}/1/model.onnx)"
                    ));
                }
                continue;
            }
            let Some(version) = parse_version(&file) else {
                continue;
            };
            if version.to_string() != file {
                problems.push(format!(
                    "version folder {name}/{file} is skipped: name it {version} (no leading zeros)"
                ));
                continue;
            }
            // A version exists once its model.onnx does (publishers write it last), or as a Hugging Face checkpoint
            // that loading imports.
            let path = v.path();
            if path.join("model.onnx").is_file()
                || path.join("model.gguf").is_file()
                || ferry_model::hf::is_checkpoint(|f| path.join(f).is_file())
            {
                model.versions.insert(version, fingerprint_local(&path));
            } else {
                problems.push(format!(
                    "version folder {name}/{file} has no model.onnx, model.gguf or Hugging Face checkpoint"
                ));
            }
        }
        if parse_version(&name).is_some() && dir.join("model.onnx").is_file() {
            problems.clear();
            problems.push(format!(
                "{} looks like one model's folder (it holds version folders): point --model-repository at the folder \
                 that holds model folders",
                root.display()
            ));
        }
        if !problems.is_empty() {
            let layout = problems.join("; ");
            static WARNED: parking_lot::Mutex<BTreeSet<String>> =
                parking_lot::Mutex::new(BTreeSet::new());
            if WARNED.lock().insert(layout.clone()) {
                tracing::warn!(model = %name, %layout, "model folder holds something that is not a version");
            }
            // Shown to clients only when it explains why nothing loads.
            if model.versions.is_empty() {
                model.layout = Some(layout);
            }
        }
        listing.insert(name, model);
    }
    Ok(listing)
}

/// Names, sizes and modification times of a version's files, in its subfolders too (`warmup/`, external data
/// kept in a folder), down to the depth a signature covers.
fn fingerprint_local(dir: &Path) -> String {
    let mut parts = Vec::new();
    let mut pending = vec![(dir.to_path_buf(), 0)];
    while let Some((sub, depth)) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&sub) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() && depth < 16 {
                pending.push((e.path(), depth + 1));
            }
            if !meta.is_file() {
                continue;
            }
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            parts.push(format!(
                "{}:{}:{mtime}",
                e.path().strip_prefix(dir).unwrap_or(&e.path()).display(),
                meta.len()
            ));
        }
    }
    parts.sort();
    parts.join("|")
}

impl S3Repository {
    fn key(&self, parts: &[&str]) -> ObjPath {
        let mut key = self.prefix.clone();
        for p in parts {
            if !key.is_empty() {
                key.push('/');
            }
            key.push_str(p);
        }
        ObjPath::from(key)
    }

    /// The error for a failed `action` (`read`, `write`, `list`) on `key` (`None`: the whole repository).
    fn failed(
        &self,
        action: &'static str,
        key: Option<&ObjPath>,
    ) -> impl FnOnce(object_store::Error) -> SourceError {
        let url = self.url.clone();
        let key = key.map(ToString::to_string);
        move |source| SourceError::ObjectStore {
            url,
            action,
            key,
            source: Box::new(source),
        }
    }

    async fn get(&self, key: &ObjPath) -> Result<Option<Vec<u8>>, SourceError> {
        match self.store.get(key).await {
            Ok(r) => r
                .bytes()
                .await
                .map(|b| Some(b.to_vec()))
                .map_err(self.failed("read", Some(key))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.failed("read", Some(key))(e)),
        }
    }

    async fn put(&self, key: &ObjPath, bytes: Vec<u8>) -> Result<(), SourceError> {
        self.store
            .put(key, bytes.into())
            .await
            .map(|_| ())
            .map_err(self.failed("write", Some(key)))
    }

    /// Streams one object into a file, chunk by chunk (external data files run to gigabytes: never held whole).
    async fn download(&self, key: &ObjPath, path: &Path) -> Result<(), SourceError> {
        use futures_util::TryStreamExt;
        use std::io::Write;
        let mut stream = match self.store.get(key).await {
            Ok(r) => r.into_stream(),
            Err(object_store::Error::NotFound { .. }) => {
                return Err(SourceError::Vanished {
                    url: self.url.clone(),
                    key: key.to_string(),
                })
            }
            Err(e) => return Err(self.failed("read", Some(key))(e)),
        };
        let write_error = |e: std::io::Error| SourceError::io("write", path)(e);
        let mut file = std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(path).map_err(write_error)?,
        );
        while let Some(chunk) = stream
            .try_next()
            .await
            .map_err(self.failed("read", Some(key)))?
        {
            file.write_all(&chunk).map_err(write_error)?;
        }
        file.flush().map_err(write_error)
    }

    /// Every object under the prefix, as (path relative to the prefix, size, etag).
    async fn list_all(&self) -> Result<Vec<(String, u64, String)>, SourceError> {
        use futures_util::TryStreamExt;
        let prefix = (!self.prefix.is_empty()).then(|| ObjPath::from(self.prefix.as_str()));
        let objects: Vec<object_store::ObjectMeta> = self
            .store
            .list(prefix.as_ref())
            .try_collect()
            .await
            .map_err(self.failed("list", None))?;
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        Ok(objects
            .into_iter()
            .filter_map(|o| {
                let key = o.location.as_ref();
                (key.len() > strip).then(|| {
                    (
                        key[strip..].to_string(),
                        o.size,
                        o.e_tag.unwrap_or_else(|| {
                            o.last_modified
                                .timestamp_nanos_opt()
                                .unwrap_or(0)
                                .to_string()
                        }),
                    )
                })
            })
            .collect())
    }

    async fn scan(&self) -> Result<Listing, SourceError> {
        let mut listing = Listing::new();
        let mut files: BTreeMap<(String, u64), Vec<String>> = BTreeMap::new();
        let mut has_model: BTreeMap<(String, u64), bool> = BTreeMap::new();
        let mut small: Vec<(String, String)> = Vec::new();
        for (rel, size, etag) in self.list_all().await? {
            let parts: Vec<&str> = rel.split('/').collect();
            let Some(model) = parts.first().filter(|m| validate_name(m).is_ok()) else {
                continue;
            };
            match parts.as_slice() {
                [_, file] if *file == "config.toml" || *file == crate::rollout::PLAN_FILE => {
                    listing.entry(model.to_string()).or_default();
                    small.push((model.to_string(), file.to_string()));
                }
                [_, v, rest @ ..] if !rest.is_empty() => {
                    let Some(version) = parse_version(v) else {
                        continue;
                    };
                    listing.entry(model.to_string()).or_default();
                    let key = (model.to_string(), version);
                    if rest == ["model.onnx"]
                        || rest == ["model.gguf"]
                        || rest == ["model.safetensors"]
                        || rest == ["model.safetensors.index.json"]
                    {
                        has_model.insert(key.clone(), true);
                    }
                    files
                        .entry(key)
                        .or_default()
                        .push(format!("{}:{size}:{etag}", rest.join("/")));
                }
                _ => {}
            }
        }
        for ((model, version), mut parts) in files {
            if !has_model.contains_key(&(model.clone(), version)) {
                continue;
            }
            parts.sort();
            listing
                .entry(model)
                .or_default()
                .versions
                .insert(version, parts.join("|"));
        }
        for (model, file) in small {
            let text = self
                .get(&self.key(&[&model, &file]))
                .await
                .map(|b| b.map(|b| String::from_utf8_lossy(&b).into_owned()));
            let entry = listing.entry(model).or_default();
            let value = match text {
                Ok(Some(t)) => Some(Ok(t)),
                Ok(None) => None,
                Err(e) => Some(Err(e.to_string())),
            };
            if file == "config.toml" {
                entry.config = value;
            } else {
                entry.rollout = value;
            }
        }
        Ok(listing)
    }

    /// Downloads a version's files into a fresh cache directory (never over a directory a loaded version came from).
    async fn fetch_version(
        &self,
        model: &str,
        version: u64,
        max_file_bytes: u64,
    ) -> Result<PathBuf, SourceError> {
        use futures_util::TryStreamExt;
        let v = version.to_string();
        let prefix = self.key(&[model, &v]);
        let objects: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(self.failed("list", Some(&prefix)))?;
        let strip = prefix.as_ref().len() + 1;
        let relative = |o: &object_store::ObjectMeta| {
            o.location.as_ref()[strip.min(o.location.as_ref().len())..].to_string()
        };
        // Only the objects that will be fetched count (see `local_parts`).
        let total = objects
            .iter()
            .filter(|o| local_parts(&relative(o)).is_some())
            .fold(0u64, |t, o| t.saturating_add(o.size));
        if total > max_file_bytes {
            return Err(SourceError::TooLarge {
                url: self.url.clone(),
                prefix: prefix.to_string(),
                total,
                max: max_file_bytes,
            });
        }
        // Downloaded under a `.partial` name and renamed when complete, so a half-fetched version never looks
        // whole; named by process so two processes sharing the cache never remove each other's copies.
        let mine = format!("{v}.{}.", std::process::id());
        let dir = self
            .cache
            .join(model)
            .join(format!("{mine}{}", unique_suffix()));
        let partial = dir.with_extension("partial");
        std::fs::create_dir_all(&partial).map_err(SourceError::io("create the cache", &dir))?;
        let fetched: Result<(), SourceError> = async {
        for o in objects {
            let rel = relative(&o);
            let Some(parts) = local_parts(&rel) else {
                tracing::warn!(object = %o.location, "skipping an object whose name cannot be a file name");
                continue;
            };
            let path = parts.iter().fold(partial.clone(), |p, part| p.join(part));
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(SourceError::io("create", parent))?;
            }
            self.download(&o.location, &path).await?;
        }
        Ok(())
        }
        .await;
        if let Err(e) = fetched {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
        std::fs::rename(&partial, &dir).map_err(|source| SourceError::MoveIntoPlace {
            path: partial.clone(),
            source,
        })?;
        // This process's earlier fetches of this version are no longer needed once this one exists (a loaded
        // session keeps its own copy of the model in memory).
        if let Ok(entries) = std::fs::read_dir(self.cache.join(model)) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&mine) && e.path() != dir {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStore;

    #[test]
    fn object_keys_that_could_leave_the_version_folder_are_not_files() {
        for bad in [
            "../../etc/passwd",
            "warmup/../../../etc/passwd",
            "..",
            ".",
            "./model.onnx",
            "/etc/passwd",
            "",
            "a//b",
            "warmup/",
            ".hidden",
            "warmup/.x.json",
            "%2E%2E/x",
            "..\\..\\x",
            "a b",
        ] {
            assert_eq!(local_parts(bad), None, "{bad:?}");
        }
        assert_eq!(local_parts("model.onnx"), Some(vec!["model.onnx"]));
        assert_eq!(local_parts("warmup/1.json"), Some(vec!["warmup", "1.json"]));
    }

    #[test]
    fn errors_read_as_the_messages_they_replace() {
        let list = SourceError::ObjectStore {
            url: "s3://b/p".into(),
            action: "list",
            key: None,
            source: Box::new(object_store::Error::NotImplemented),
        };
        assert_eq!(
            list.to_string(),
            "s3://b/p: cannot list: Operation not yet implemented."
        );
        let read = SourceError::ObjectStore {
            url: "s3://b/p".into(),
            action: "read",
            key: Some("p/m/config.toml".into()),
            source: Box::new(object_store::Error::NotImplemented),
        };
        assert_eq!(
            read.to_string(),
            "s3://b/p: cannot read p/m/config.toml: Operation not yet implemented."
        );
        let io = SourceError::io("read", "m/config.toml")(std::io::Error::other("boom"));
        assert_eq!(io.to_string(), "cannot read m/config.toml: boom");
        assert!(std::error::Error::source(&io).is_some());
        let missing = std::env::temp_dir().join(format!("ferry-no-repo-{}", std::process::id()));
        let spec = missing.display().to_string();
        let e = Repository::open(&spec, &missing).unwrap_err();
        assert!(matches!(e, SourceError::NotADirectory { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            format!("model repository {spec} is not a directory")
        );
        let e = Repository::open("s3:///p", &missing).unwrap_err();
        assert_eq!(
            e.to_string(),
            "s3:///p: no bucket name (expected s3://bucket/prefix)"
        );
    }

    #[test]
    fn a_fingerprint_follows_files_in_subfolders() {
        let dir = std::env::temp_dir().join(format!("ferry-fingerprint-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data/deeper")).unwrap();
        std::fs::write(dir.join("model.onnx"), b"m").unwrap();
        std::fs::write(dir.join("data/deeper/w.bin"), b"1234").unwrap();
        let before = fingerprint_local(&dir);
        assert!(before.contains("data/deeper/w.bin:4:"), "{before}");
        std::fs::write(dir.join("data/deeper/w.bin"), b"12345").unwrap();
        assert_ne!(fingerprint_local(&dir), before);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn files_under(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut pending = vec![root.to_path_buf()];
        while let Some(dir) = pending.pop() {
            for e in std::fs::read_dir(&dir).unwrap().flatten() {
                if e.path().is_dir() {
                    pending.push(e.path());
                } else {
                    out.push(e.path().strip_prefix(root).unwrap().display().to_string());
                }
            }
        }
        out.sort();
        out
    }

    #[tokio::test]
    async fn an_s3_fetch_writes_only_plain_names_inside_the_version_folder() {
        let store = Arc::new(object_store::memory::InMemory::new());
        for key in [
            "p/m/1/model.onnx",
            "p/m/1/warmup/1.json",
            "p/m/1/../../escaped",
            "p/m/1/warmup/../../../escaped",
            "p/m/1/.hidden",
            "p/m/1/%2e%2e/x",
        ] {
            store
                .put(&ObjPath::from(key), b"data".to_vec().into())
                .await
                .unwrap();
        }
        let cache = std::env::temp_dir().join(format!("ferry-s3-fetch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&cache);
        let repo = S3Repository {
            url: "s3://bucket/p".into(),
            store,
            prefix: "p".into(),
            cache: cache.join("bucket"),
        };
        let dir = repo.fetch_version("m", 1, u64::MAX).await.unwrap();
        assert!(dir.starts_with(cache.join("bucket/m")), "{}", dir.display());
        assert_eq!(files_under(&dir), ["model.onnx", "warmup/1.json"]);
        // Nothing landed anywhere else under the cache either.
        assert_eq!(files_under(&cache).len(), 2, "{:?}", files_under(&cache));

        // The limit holds for the version's files together (model.onnx and warmup/1.json: 8 bytes).
        assert!(repo.fetch_version("m", 1, 8).await.is_ok());
        let e = repo.fetch_version("m", 1, 7).await.unwrap_err();
        assert!(
            matches!(
                e,
                SourceError::TooLarge {
                    total: 8,
                    max: 7,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("are 8 bytes, larger than the 7 bytes"),
            "{e}"
        );
        std::fs::remove_dir_all(&cache).unwrap();
    }
}
