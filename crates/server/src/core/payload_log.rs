//! Sampled payload logging: request and response tensors of a fraction of inferences, written as JSON lines with
//! size-based rotation, for debugging and for building new training data.
//!
//! Requests never wait for the disk: a sampled record goes into a bounded channel, and one writer thread drains it.
//! When the channel is full the record is dropped and counted.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_model::NamedTensor;
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use crate::codec::json::{FlatJson, NonFinite};

/// How payloads are logged.
#[derive(Debug, Clone, PartialEq)]
pub struct PayloadLogConfig {
    /// The log file; rotated files get `.1`, `.2`, ... appended.
    pub path: PathBuf,
    /// The fraction of inferences logged, from 0 to 1.
    pub sample_rate: f64,
    /// Rotate once the file reaches this many bytes.
    pub max_bytes: u64,
    /// How many rotated files to keep.
    pub keep: usize,
    /// Input or output names whose values are replaced by `"[redacted]"`.
    pub redact: Vec<String>,
}

/// One logged inference.
#[derive(Debug)]
pub struct PayloadRecord {
    /// The model.
    pub model: String,
    /// Its version.
    pub version: u64,
    /// The client's request id, if it sent one.
    pub id: Option<String>,
    /// Time from queueing to the answer.
    pub latency: Duration,
    /// The inputs as received.
    pub inputs: Vec<NamedTensor>,
    /// The outputs as answered.
    pub outputs: Vec<NamedTensor>,
}

/// The sampler and the writer thread's sending end.
#[derive(Debug)]
pub struct PayloadLogger {
    sender: SyncSender<PayloadRecord>,
    every: f64,
    seen: AtomicU64,
    /// Records handed to the writer.
    pub queued: AtomicU64,
    /// Records dropped because the writer fell behind.
    pub dropped: AtomicU64,
}

impl PayloadLogger {
    /// Opens (or creates) the log and starts its writer thread.
    pub fn start(config: PayloadLogConfig) -> std::io::Result<PayloadLogger> {
        let file = open(&config.path)?;
        let (sender, receiver) = sync_channel::<PayloadRecord>(1024);
        let every = if config.sample_rate > 0.0 {
            1.0 / config.sample_rate.min(1.0)
        } else {
            f64::INFINITY
        };
        std::thread::Builder::new()
            .name("ferry-payload-log".into())
            .spawn(move || {
                let mut writer = Writer {
                    config,
                    file,
                    line: Vec::new(),
                };
                for record in receiver {
                    if let Err(e) = writer.write(&record) {
                        tracing::warn!(error = %e, "cannot write the payload log");
                    }
                }
            })?;
        Ok(PayloadLogger {
            sender,
            every,
            seen: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        })
    }

    /// Whether the next inference is logged: deterministically one in every `1 / sample_rate`.
    pub fn sample(&self) -> bool {
        if !self.every.is_finite() {
            return false;
        }
        let n = self.seen.fetch_add(1, Ordering::Relaxed) as f64;
        (n / self.every).floor() != ((n + 1.0) / self.every).floor()
    }

    /// Hands a record to the writer, or drops it (and counts it) when the writer is behind.
    pub fn log(&self, record: PayloadRecord) {
        match self.sender.try_send(record) {
            Ok(()) => self.queued.fetch_add(1, Ordering::Relaxed),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

fn open(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

struct Writer {
    config: PayloadLogConfig,
    file: File,
    line: Vec<u8>,
}

impl Writer {
    fn write(&mut self, record: &PayloadRecord) -> std::io::Result<()> {
        self.line.clear();
        serde_json::to_writer(
            &mut self.line,
            &Line {
                record,
                redact: &self.config.redact,
            },
        )?;
        self.line.push(b'\n');
        let size = self.file.metadata()?.len();
        if size > 0 && size + self.line.len() as u64 > self.config.max_bytes {
            self.rotate()?;
        }
        let mut out = BufWriter::new(&self.file);
        out.write_all(&self.line)?;
        out.flush()
    }

    /// `log` → `log.1` → `log.2` ..., dropping the oldest beyond `keep`.
    fn rotate(&mut self) -> std::io::Result<()> {
        let path = &self.config.path;
        let numbered = |n: usize| PathBuf::from(format!("{}.{n}", path.display()));
        let _ = std::fs::remove_file(numbered(self.config.keep.max(1)));
        for n in (1..self.config.keep.max(1)).rev() {
            let _ = std::fs::rename(numbered(n), numbered(n + 1));
        }
        std::fs::rename(path, numbered(1))?;
        self.file = open(path)?;
        Ok(())
    }
}

struct Line<'a> {
    record: &'a PayloadRecord,
    redact: &'a [String],
}

struct Tensors<'a> {
    tensors: &'a [NamedTensor],
    redact: &'a [String],
}

struct OneTensor<'a> {
    tensor: &'a NamedTensor,
    redacted: bool,
}

impl Serialize for OneTensor<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(3))?;
        map.serialize_entry("datatype", self.tensor.tensor.dtype().kserve_name())?;
        map.serialize_entry("shape", &self.tensor.tensor.shape)?;
        if self.redacted {
            map.serialize_entry("data", "[redacted]")?;
        } else {
            map.serialize_entry("data", &FlatJson(&self.tensor.tensor.data, NonFinite::Null))?;
        }
        map.end()
    }
}

impl Serialize for Tensors<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.tensors.len()))?;
        for t in self.tensors {
            let redacted = self.redact.iter().any(|r| r == &t.name);
            map.serialize_entry(
                &t.name,
                &OneTensor {
                    tensor: t,
                    redacted,
                },
            )?;
        }
        map.end()
    }
}

impl Serialize for Line<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = self.record;
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let mut map = s.serialize_map(Some(7))?;
        map.serialize_entry("time", &time)?;
        map.serialize_entry("model", &r.model)?;
        map.serialize_entry("version", &r.version)?;
        map.serialize_entry("id", &r.id)?;
        map.serialize_entry("latency_ms", &(r.latency.as_secs_f64() * 1000.0))?;
        map.serialize_entry(
            "inputs",
            &Tensors {
                tensors: &r.inputs,
                redact: self.redact,
            },
        )?;
        map.serialize_entry(
            "outputs",
            &Tensors {
                tensors: &r.outputs,
                redact: self.redact,
            },
        )?;
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::{Tensor, TensorData};

    fn record(i: usize) -> PayloadRecord {
        let t = |name: &str, v: f32| {
            NamedTensor::new(
                name,
                Tensor::new(vec![1, 2], TensorData::F32(vec![v, v])).unwrap(),
            )
        };
        PayloadRecord {
            model: "m".into(),
            version: 1,
            id: Some(format!("r{i}")),
            latency: Duration::from_micros(1500),
            inputs: vec![t("x", 1.0), t("secret", 2.0)],
            outputs: vec![t("y", 3.0)],
        }
    }

    #[test]
    fn sampling_is_exact_and_deterministic() {
        let dir = std::env::temp_dir().join(format!("ferry-payload-sample-{}", std::process::id()));
        let config = PayloadLogConfig {
            path: dir.join("p.jsonl"),
            sample_rate: 0.25,
            max_bytes: 1 << 20,
            keep: 2,
            redact: vec![],
        };
        let logger = PayloadLogger::start(config).unwrap();
        let sampled = (0..100).filter(|_| logger.sample()).count();
        assert_eq!(sampled, 25);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn lines_are_json_redacted_and_rotated() {
        let dir = std::env::temp_dir().join(format!("ferry-payload-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("payload.jsonl");
        let config = PayloadLogConfig {
            path: path.clone(),
            sample_rate: 1.0,
            max_bytes: 600,
            keep: 2,
            redact: vec!["secret".into()],
        };
        let mut writer = Writer {
            file: open(&path).unwrap(),
            config,
            line: Vec::new(),
        };
        for i in 0..12 {
            writer.write(&record(i)).unwrap();
        }
        let current = std::fs::read_to_string(&path).unwrap();
        let line: serde_json::Value =
            serde_json::from_str(current.lines().next().unwrap()).unwrap();
        assert_eq!(line["model"], "m");
        assert_eq!(line["inputs"]["x"]["data"], serde_json::json!([1.0, 1.0]));
        assert_eq!(line["inputs"]["secret"]["data"], "[redacted]");
        assert_eq!(line["outputs"]["y"]["shape"], serde_json::json!([1, 2]));
        assert!(current.len() <= 600);
        assert!(path.with_extension("jsonl.1").exists() && path.with_extension("jsonl.2").exists());
        assert!(
            !path.with_extension("jsonl.3").exists(),
            "only `keep` rotated files stay"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
