//! A model over 2 GB, its weights in an external data file written here from random values: it loads from the
//! mapped file (resident memory close to the weights' size, measured), answers correctly, and is refused when one
//! byte of its data changes under a trusted key, when its data is over `--max-model-bytes`, or when it names data
//! outside its version folder.
//!
//! Heavy: it writes 2.4 GB to the temporary directory and loads them (about a minute on two cores); its own test
//! binary, so that the resident memory measured is this model's alone.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use common::*;
use ferry_model::onnx::{GraphBuilder, TensorProto};
use ferry_model::DataType;
use ferry_server::integrity::{sign_version, IntegrityPolicy, SigningKey};

/// Rows and columns of each weight: 12288 × 12288 FP32 is 604 MB.
const SIDE: usize = 12288;
/// Weights: four make 2.4 GB, over protobuf's 2 GiB.
const WEIGHTS: usize = 4;
/// The pseudo-random values the weights are cut from (a prime count, so every row differs).
const POOL: usize = (1 << 24) + 43;

/// The values: a xorshift stream in [-1, 1).
fn pool() -> Vec<f32> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..POOL)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Element `index` (row-major) of weight `k`.
fn weight(pool: &[f32], k: usize, index: usize) -> f32 {
    pool[(index + k * 7_919_993) % POOL]
}

/// Writes `model.onnx` (y = Σₖ x · Wₖ, x: FP32 [-1, SIDE]) and `weights.bin` (every Wₖ, one after another, at
/// page-aligned offsets) into `dir`; returns the data file's size.
fn write_model(dir: &Path, pool: &[f32]) -> u64 {
    std::fs::create_dir_all(dir).unwrap();
    let bytes_each = (SIDE * SIDE * 4) as u64;
    let mut b = GraphBuilder::new("large")
        .input("x", DataType::F32, Some(&[-1, SIDE as i64]))
        .output("y", DataType::F32, Some(&[-1, SIDE as i64]));
    let mut file = std::io::BufWriter::with_capacity(
        1 << 22,
        std::fs::File::create(dir.join("weights.bin")).unwrap(),
    );
    let bytes: Vec<u8> = pool.iter().flat_map(|v| v.to_le_bytes()).collect();
    for k in 0..WEIGHTS {
        let name = format!("w{k}");
        b = b.initializer(TensorProto::external_range(
            &name,
            DataType::F32,
            &[SIDE as i64, SIDE as i64],
            "weights.bin",
            k as u64 * bytes_each,
            bytes_each,
        ));
        b = b.node("MatMul", &["x", &name], &[&format!("p{k}")], vec![]);
        for row in 0..SIDE {
            // The row's values in the pool, wrapping at its end.
            let start = (row * SIDE + k * 7_919_993) % POOL;
            let first = (POOL - start).min(SIDE);
            file.write_all(&bytes[4 * start..4 * (start + first)])
                .unwrap();
            file.write_all(&bytes[..4 * (SIDE - first)]).unwrap();
        }
    }
    file.flush().unwrap();
    let partial: Vec<String> = (0..WEIGHTS).map(|k| format!("p{k}")).collect();
    let partial: Vec<&str> = partial.iter().map(String::as_str).collect();
    std::fs::write(
        dir.join("model.onnx"),
        b.node("Sum", &partial, &["y"], vec![]).to_bytes(),
    )
    .unwrap();
    bytes_each * WEIGHTS as u64
}

/// A `/proc/self/status` figure in bytes (`VmRSS`, `VmHWM`).
fn status_bytes(key: &str) -> u64 {
    proc_bytes("status", key)
}

/// A figure in kB of `/proc/self/<file>`, in bytes.
fn proc_bytes(file: &str, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/self/{file}")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("{key} in /proc/self/{file}"));
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap();
    kb * 1024
}

/// A repository holding `m/1` as hard links to the files of `built` (so each server gets its own repository,
/// removed on drop, while the 2.4 GB are written once).
fn repository(built: &Path, tag: &str) -> TempDir {
    let repo = TempDir::new(tag);
    let version = repo.0.join("m/1");
    std::fs::create_dir_all(&version).unwrap();
    for e in std::fs::read_dir(built).unwrap().flatten() {
        std::fs::hard_link(e.path(), version.join(e.file_name())).unwrap();
    }
    repo
}

async fn reason(s: &TestServer) -> String {
    let (status, body) = s.get("/v1/models/m").await;
    assert_eq!(status, 200, "{body}");
    body["model_version_status"][0]["status"]["error_message"]
        .as_str()
        .unwrap()
        .to_string()
}

const GIB: f64 = (1u64 << 30) as f64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// `scripts/test` runs the server's tests again with tract built in: once is enough for 2.4 GB.
#[cfg_attr(feature = "tract", ignore = "run by the build without tract")]
async fn a_model_over_2gb_loads_from_its_external_data_and_answers() {
    let built = TempDir::new("large-built");
    let started = std::time::Instant::now();
    let pool = pool();
    let data = write_model(&built.0, &pool);
    assert!(data > 2 << 30);
    let key = SigningKey::from_seed(&[21; 32]);
    let trusted = IntegrityPolicy {
        trusted_keys: vec![key.public_key()],
        ..IntegrityPolicy::default()
    };
    sign_version(&built.0, "m", 1, &key).unwrap();
    eprintln!(
        "wrote and signed {:.2} GiB in {:.1?}",
        data as f64 / GIB,
        started.elapsed()
    );

    // Two rows: one-hot at rows 3 and SIDE - 1 of the weights, so y[r] = Σₖ Wₖ[i_r, :].
    let hot = [3usize, SIDE - 1];
    let mut x = vec![0f32; 2 * SIDE];
    for (r, i) in hot.iter().enumerate() {
        x[r * SIDE + i] = 1.0;
    }
    let expected: Vec<f32> = hot
        .iter()
        .flat_map(|i| {
            let pool = &pool;
            (0..SIDE).map(move |j| (0..WEIGHTS).map(|k| weight(pool, k, i * SIDE + j)).sum())
        })
        .collect();
    drop(pool);

    let repo = repository(&built.0, "large-serve");
    std::fs::write(repo.0.join("m/config.toml"), "instances = 2\n").unwrap();
    let rss_before = status_bytes("VmRSS");
    let pss_before = proc_bytes("smaps_rollup", "Pss:");
    // Reset the peak (VmHWM) to the current resident size.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let loading = std::time::Instant::now();
    let trusted_policy = trusted.clone();
    let s = TestServer::start_with(repo, |c| ferry_server::ServeConfig {
        integrity: trusted_policy,
        ..c
    })
    .await;
    let load_time = loading.elapsed();
    assert_eq!(reason(&s).await, "", "the signed model loads");
    let rss_loaded = status_bytes("VmRSS") - rss_before;
    let peak = status_bytes("VmHWM") - rss_before;
    // Two requests at once, so that both instances run (each maps the weights).
    let body = serde_json::json!({"inputs": [{"name": "x", "shape": [2, SIDE], "datatype": "FP32", "data": x}]});
    let answering = std::time::Instant::now();
    let (first, second) = tokio::join!(
        s.post("/v2/models/m/infer", body.clone()),
        s.post("/v2/models/m/infer", body.clone())
    );
    let answer_time = answering.elapsed();
    for (status, body) in [first, second] {
        assert_eq!(status, 200, "{body}");
        let y: Vec<f32> = body["outputs"][0]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(y.len(), expected.len());
        for (j, (got, want)) in y.iter().zip(&expected).enumerate() {
            assert!(
                (got - want).abs() <= 1e-4,
                "y[{j}] = {got}, expected {want}"
            );
        }
    }
    let rss_served = status_bytes("VmRSS") - rss_before;
    // Each instance maps the file, and VmRSS counts a page once per mapping; the proportional set size counts
    // shared pages once, as the machine holds them.
    let pss_served = proc_bytes("smaps_rollup", "Pss:").saturating_sub(pss_before);
    eprintln!(
        "weights {:.2} GiB, 2 instances: loaded in {load_time:.1?} (signature hashing included); two requests at once \
         in {answer_time:.1?}; after them VmRSS +{:.2} GiB (the mapped file counted once per instance), PSS +{:.2} \
         GiB; VmRSS +{:.2} GiB once loaded, peak (VmHWM) while loading +{:.2} GiB",
        data as f64 / GIB,
        rss_served as f64 / GIB,
        pss_served as f64 / GIB,
        rss_loaded as f64 / GIB,
        peak as f64 / GIB
    );
    let budget = 1.6 * data as f64;
    assert!(
        (rss_loaded as f64) < budget && (peak as f64) < budget && (pss_served as f64) < budget,
        "for {data} bytes of weights: loaded +{rss_loaded}, peak +{peak}, PSS +{pss_served}"
    );
    drop(s);

    // One byte of the data changed: refused under the trusted key.
    let flip = |path: &Path| {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut byte = [0u8];
        f.seek(SeekFrom::Start(data / 2)).unwrap();
        std::io::Read::read_exact(&mut f, &mut byte).unwrap();
        byte[0] ^= 1;
        f.seek(SeekFrom::Start(data / 2)).unwrap();
        f.write_all(&byte).unwrap();
    };
    flip(&built.0.join("weights.bin"));
    let s = TestServer::start_with(repository(&built.0, "large-flipped"), |c| {
        ferry_server::ServeConfig {
            integrity: trusted.clone(),
            ..c
        }
    })
    .await;
    let r = reason(&s).await;
    assert!(r.contains("weights.bin changed after signing"), "{r}");
    drop(s);
    flip(&built.0.join("weights.bin"));

    // Over --max-model-bytes by one byte, the graph and its data counted together (no key: nothing is hashed).
    let total = data + std::fs::metadata(built.0.join("model.onnx")).unwrap().len();
    let s = TestServer::start_with(repository(&built.0, "large-limit"), |c| {
        ferry_server::ServeConfig {
            integrity: IntegrityPolicy {
                max_model_bytes: total - 1,
                ..IntegrityPolicy::default()
            },
            ..c
        }
    })
    .await;
    let r = reason(&s).await;
    assert!(
        r.contains(&format!(
            "model.onnx and its external data (weights.bin) are {total} bytes, larger than the {} bytes --max-model-bytes allows",
            total - 1
        )),
        "{r}"
    );
    drop(s);
    eprintln!("whole test {:.1?}", started.elapsed());
}
