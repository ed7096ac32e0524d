//! `ferry bench`: a load generator in the spirit of Triton's perf_analyzer, for any KServe v2 server (Ferry,
//! Triton, MLServer, ...) over REST (JSON or binary tensors) or gRPC.
//!
//! It reads the model's metadata, builds one request of `--batch` rows once, then either sweeps concurrency levels
//! (closed loop: each worker sends its next request when the previous answer arrives) or sends at a fixed rate
//! (open loop; latency is measured from the scheduled send time, so a slow server cannot hide its queueing).
//! Requests sent during `--warmup` are not counted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::ValueEnum;
use ferry_wire::inference::{
    grpc_inference_service_client::GrpcInferenceServiceClient,
    model_infer_request::InferInputTensor, ModelInferRequest, ModelMetadataRequest,
};
use serde_json::{json, Value};

use crate::cli::parse_duration;

/// Wire protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    /// KServe v2 REST.
    Rest,
    /// KServe v2 gRPC.
    Grpc,
}

/// `ferry bench` flags.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The model to call.
    #[arg(long, env = "FERRY_BENCH_MODEL")]
    pub model: String,

    /// A specific version (default: the server's choice).
    #[arg(long, env = "FERRY_BENCH_MODEL_VERSION")]
    pub model_version: Option<String>,

    /// The server: `http://HOST:PORT` (REST) or `HOST:PORT` (gRPC).
    #[arg(long, env = "FERRY_BENCH_URL", default_value = "http://127.0.0.1:8501")]
    pub url: String,

    /// REST or gRPC.
    #[arg(long, env = "FERRY_BENCH_PROTOCOL", value_enum, default_value_t = Protocol::Rest)]
    pub protocol: Protocol,

    /// REST only: send inputs and ask for outputs with the binary tensor extension instead of JSON.
    #[arg(long, env = "FERRY_BENCH_BINARY")]
    pub binary: bool,

    /// Rows per request (the first dimension of every input).
    #[arg(long, env = "FERRY_BENCH_BATCH", default_value_t = 1)]
    pub batch: usize,

    /// Concurrency levels to sweep (closed loop), comma-separated.
    #[arg(
        long,
        env = "FERRY_BENCH_CONCURRENCY",
        value_delimiter = ',',
        default_value = "1,8,64"
    )]
    pub concurrency: Vec<usize>,

    /// Send at this many requests per second instead (open loop); overrides --concurrency.
    #[arg(long, env = "FERRY_BENCH_RATE")]
    pub rate: Option<f64>,

    /// How long each measurement runs.
    #[arg(long, env = "FERRY_BENCH_DURATION", default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Traffic sent before each measurement and not counted (`0` for none).
    #[arg(long, env = "FERRY_BENCH_WARMUP", default_value = "2s", value_parser = crate::cli::parse_duration_or_zero)]
    pub warmup: Duration,

    /// Print one JSON object per measurement instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One measurement.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    /// `concurrency` or `rate`.
    pub mode: &'static str,
    /// The concurrency level or the target rate.
    pub level: f64,
    /// Successful requests per second.
    pub requests_per_second: f64,
    /// Rows per second (requests × batch).
    pub rows_per_second: f64,
    /// Median latency, milliseconds.
    pub p50_ms: f64,
    /// 90th percentile latency, milliseconds.
    pub p90_ms: f64,
    /// 99th percentile latency, milliseconds.
    pub p99_ms: f64,
    /// Successful requests.
    pub ok: usize,
    /// Failed requests (non-200 or transport errors).
    pub errors: usize,
}

/// A prepared request that can be sent many times.
#[derive(Clone)]
enum Caller {
    Rest {
        client: reqwest::Client,
        url: String,
        body: bytes::Bytes,
        header_len: Option<usize>,
    },
    Grpc {
        client: GrpcInferenceServiceClient<tonic::transport::Channel>,
        request: Box<ModelInferRequest>,
    },
}

impl Caller {
    /// The REST request, ready to send (panics for gRPC: callers match on the variant first).
    fn rest_request(&self) -> reqwest::RequestBuilder {
        let Caller::Rest {
            client,
            url,
            body,
            header_len,
        } = self
        else {
            unreachable!("rest_request on a gRPC caller")
        };
        let req = client.post(url.as_str()).body(body.clone());
        match header_len {
            Some(n) => req
                .header("content-type", "application/octet-stream")
                .header("inference-header-content-length", n.to_string()),
            None => req.header("content-type", "application/json"),
        }
    }

    /// Sends the request once and says why it failed, for the check before measuring.
    async fn check(&mut self) -> anyhow::Result<()> {
        match self {
            Caller::Rest { url, .. } => {
                let url = url.clone();
                let r = self
                    .rest_request()
                    .send()
                    .await
                    .with_context(|| format!("POST {url}"))?;
                refused("POST", &url, r).await.map(drop)
            }
            Caller::Grpc { client, request } => {
                client
                    .model_infer((**request).clone())
                    .await
                    .map_err(|s| anyhow::anyhow!("ModelInfer: {:?}: {}", s.code(), s.message()))?;
                Ok(())
            }
        }
    }

    async fn call(&mut self) -> bool {
        match self {
            Caller::Rest { .. } => match self.rest_request().send().await {
                Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                Err(_) => false,
            },
            Caller::Grpc { client, request } => {
                client.model_infer((**request).clone()).await.is_ok()
            }
        }
    }
}

/// One input as the metadata describes it: name, datatype, shape with the batch filled in.
struct InputSpec {
    name: String,
    datatype: String,
    shape: Vec<i64>,
}

fn fill_shape(shape: &[i64], batch: usize) -> Vec<i64> {
    shape
        .iter()
        .enumerate()
        .map(|(i, d)| {
            if *d >= 0 {
                *d
            } else if i == 0 {
                batch as i64
            } else {
                1
            }
        })
        .collect()
}

/// Deterministic input values (a small linear congruential sequence in [-1, 1)).
fn values(n: usize) -> Vec<f64> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect()
}

fn element(datatype: &str, v: f64) -> Value {
    match datatype {
        "FP32" | "FP64" | "FP16" => json!(v),
        "BOOL" => json!(v > 0.0),
        "BYTES" => json!(format!("{v:.3}")),
        d if d.starts_with("UINT") => json!((v.abs() * 10.0) as u64),
        _ => json!((v * 10.0) as i64),
    }
}

fn raw_bytes(datatype: &str, vals: &[f64]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    for v in vals {
        match datatype {
            "FP32" => out.extend_from_slice(&(*v as f32).to_le_bytes()),
            "FP64" => out.extend_from_slice(&v.to_le_bytes()),
            "INT64" => out.extend_from_slice(&((*v * 10.0) as i64).to_le_bytes()),
            "INT32" => out.extend_from_slice(&((*v * 10.0) as i32).to_le_bytes()),
            other => bail!("--binary and gRPC benchmarks support FP32, FP64, INT32 and INT64 inputs, not {other}"),
        }
    }
    Ok(out)
}

async fn metadata(args: &BenchArgs) -> anyhow::Result<Vec<InputSpec>> {
    let parse = |inputs: &[Value]| -> anyhow::Result<Vec<InputSpec>> {
        inputs
            .iter()
            .map(|i| {
                Ok(InputSpec {
                    name: i["name"]
                        .as_str()
                        .context("input without a name")?
                        .to_string(),
                    datatype: i["datatype"]
                        .as_str()
                        .context("input without a datatype")?
                        .to_string(),
                    shape: i["shape"]
                        .as_array()
                        .context("input without a shape")?
                        .iter()
                        .map(|d| {
                            d.as_i64()
                                .or_else(|| d.as_str().and_then(|s| s.parse().ok()))
                                .context("bad dimension")
                        })
                        .collect::<anyhow::Result<_>>()?,
                })
            })
            .collect()
    };
    match args.protocol {
        Protocol::Rest => {
            let url = format!(
                "{}/v2/models/{}",
                args.url.trim_end_matches('/'),
                args.model
            );
            let answer = reqwest::get(&url)
                .await
                .with_context(|| format!("GET {url}"))?;
            let meta: Value = refused("GET", &url, answer)
                .await?
                .json()
                .await
                .context("reading model metadata")?;
            parse(
                meta["inputs"]
                    .as_array()
                    .context("metadata without inputs")?,
            )
        }
        Protocol::Grpc => {
            let mut client = GrpcInferenceServiceClient::connect(args.url.clone())
                .await
                .context("connecting over gRPC")?;
            let meta = client
                .model_metadata(ModelMetadataRequest {
                    name: args.model.clone(),
                    version: args.model_version.clone().unwrap_or_default(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("ModelMetadata: {:?}: {}", s.code(), s.message()))?
                .into_inner();
            Ok(meta
                .inputs
                .into_iter()
                .map(|i| InputSpec {
                    name: i.name,
                    datatype: i.datatype,
                    shape: i.shape,
                })
                .collect())
        }
    }
}

/// The server's URL with a scheme: `host:port` alone means `http://host:port`.
fn with_scheme(url: &str) -> String {
    if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    }
}

async fn caller(args: &BenchArgs, inputs: &[InputSpec]) -> anyhow::Result<Caller> {
    match args.protocol {
        Protocol::Rest => {
            let mut json_inputs = Vec::new();
            let mut binary = Vec::new();
            for i in inputs {
                let shape = fill_shape(&i.shape, args.batch);
                let n: i64 = shape.iter().product();
                let vals = values(n as usize);
                if args.binary {
                    let raw = raw_bytes(&i.datatype, &vals)?;
                    json_inputs.push(json!({"name": i.name, "shape": shape, "datatype": i.datatype, "parameters": {"binary_data_size": raw.len()}}));
                    binary.extend(raw);
                } else {
                    let data: Vec<Value> = vals.iter().map(|v| element(&i.datatype, *v)).collect();
                    json_inputs.push(json!({"name": i.name, "shape": shape, "datatype": i.datatype, "data": data}));
                }
            }
            let mut request = json!({"inputs": json_inputs});
            if args.binary {
                request["parameters"] = json!({"binary_data_output": true});
            }
            let mut body = serde_json::to_vec(&request)?;
            let header_len = args.binary.then_some(body.len());
            body.extend(binary);
            let url = match &args.model_version.clone() {
                Some(v) => format!(
                    "{}/v2/models/{}/versions/{v}/infer",
                    args.url.trim_end_matches('/'),
                    args.model
                ),
                None => format!(
                    "{}/v2/models/{}/infer",
                    args.url.trim_end_matches('/'),
                    args.model
                ),
            };
            let client = rest_client()?;
            Ok(Caller::Rest {
                client,
                url,
                body: body.into(),
                header_len,
            })
        }
        Protocol::Grpc => {
            let mut tensors = Vec::new();
            let mut raw = Vec::new();
            for i in inputs {
                let shape = fill_shape(&i.shape, args.batch);
                let n: i64 = shape.iter().product();
                raw.push(raw_bytes(&i.datatype, &values(n as usize))?);
                tensors.push(InferInputTensor {
                    name: i.name.clone(),
                    datatype: i.datatype.clone(),
                    shape,
                    ..Default::default()
                });
            }
            let request = ModelInferRequest {
                model_name: args.model.clone(),
                model_version: args.model_version.clone().unwrap_or_default(),
                inputs: tensors,
                raw_input_contents: raw,
                ..Default::default()
            };
            let client = GrpcInferenceServiceClient::connect(args.url.clone())
                .await
                .context("connecting over gRPC")?;
            Ok(Caller::Grpc {
                client,
                request: Box::new(request),
            })
        }
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn report(
    mode: &'static str,
    level: f64,
    mut latencies: Vec<u64>,
    errors: usize,
    elapsed: Duration,
    batch: usize,
) -> Report {
    latencies.sort_unstable();
    let ok = latencies.len();
    let rps = ok as f64 / elapsed.as_secs_f64();
    Report {
        mode,
        level,
        requests_per_second: rps,
        rows_per_second: rps * batch as f64,
        p50_ms: percentile(&latencies, 0.50),
        p90_ms: percentile(&latencies, 0.90),
        p99_ms: percentile(&latencies, 0.99),
        ok,
        errors,
    }
}

/// An HTTP client that keeps one idle connection.
fn rest_client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .tcp_nodelay(true)
        .build()
}

/// Closed loop: `concurrency` workers, each with its own connection.
async fn closed_loop(
    args: &BenchArgs,
    template: &Caller,
    concurrency: usize,
) -> anyhow::Result<Report> {
    // Every worker's client is made before the clock starts: making a thousand takes seconds.
    let mut callers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        callers.push(match template {
            // A gRPC channel is one HTTP/2 connection: give each worker its own, as separate clients would have.
            Caller::Grpc { request, .. } => Caller::Grpc {
                client: GrpcInferenceServiceClient::connect(args.url.clone()).await?,
                request: request.clone(),
            },
            // One client per worker, holding one keep-alive connection, as separate clients would (a shared pool
            // opens extra connections whenever a worker asks before its previous connection is back).
            Caller::Rest {
                url,
                body,
                header_len,
                ..
            } => Caller::Rest {
                client: rest_client()?,
                url: url.clone(),
                body: body.clone(),
                header_len: *header_len,
            },
        });
    }
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let mut workers = Vec::with_capacity(concurrency);
    for mut caller in callers {
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0usize;
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let ok = caller.call().await;
                if sent >= measure_from {
                    if ok {
                        latencies.push(sent.elapsed().as_micros() as u64);
                    } else {
                        errors += 1;
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (l, e) = w.await?;
        latencies.extend(l);
        errors += e;
    }
    Ok(report(
        "concurrency",
        concurrency as f64,
        latencies,
        errors,
        args.duration,
        args.batch,
    ))
}

/// Open loop: one request every 1/rate seconds, whatever the answers do.
async fn open_loop(args: &BenchArgs, template: &Caller, rate: f64) -> anyhow::Result<Report> {
    anyhow::ensure!(
        rate.is_finite() && (0.01..=1_000_000.0).contains(&rate),
        "--rate must be between 0.01 and 1000000 requests per second"
    );
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let results = Arc::new(parking_lot::Mutex::new((Vec::new(), 0usize)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut next = start;
    while next < end {
        tokio::time::sleep_until(next.into()).await;
        let scheduled = next;
        let mut caller = template.clone();
        let results = results.clone();
        tasks.spawn(async move {
            let ok = caller.call().await;
            if scheduled >= measure_from {
                let mut r = results.lock();
                if ok {
                    r.0.push(scheduled.elapsed().as_micros() as u64);
                } else {
                    r.1 += 1;
                }
            }
        });
        next += interval;
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let (latencies, errors) = std::mem::take(&mut *results.lock());
    Ok(report(
        "rate",
        rate,
        latencies,
        errors,
        args.duration,
        args.batch,
    ))
}

/// The answer if it is a success; else an error with its status and the server's message (the `error` of a JSON
/// body, else the body).
async fn refused(
    method: &str,
    url: &str,
    answer: reqwest::Response,
) -> anyhow::Result<reqwest::Response> {
    let status = answer.status();
    if status.is_success() {
        return Ok(answer);
    }
    let text = answer.text().await.unwrap_or_default();
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| text.trim().to_string());
    bail!("{method} {url}: {status}: {message}")
}

/// Runs the benchmark and prints its table (or JSON lines).
pub fn run(mut args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.batch >= 1, "--batch must be at least 1");
    args.url = with_scheme(&args.url);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let inputs = metadata(&args).await?;
        let template = caller(&args, &inputs).await?;
        let mut template_check = template.clone();
        template_check
            .check()
            .await
            .with_context(|| format!("the first request to model `{}` failed", args.model))?;
        let runs: Vec<Option<usize>> = match args.rate {
            Some(_) => vec![None],
            None => args.concurrency.iter().copied().map(Some).collect(),
        };
        if !args.json {
            println!(
                "{} {} {} batch {}{}",
                args.model,
                match args.protocol {
                    Protocol::Rest => "REST",
                    Protocol::Grpc => "gRPC",
                },
                if args.protocol == Protocol::Rest && !args.binary {
                    "JSON"
                } else {
                    "binary"
                },
                args.batch,
                if args.rate.is_some() {
                    ""
                } else {
                    ", closed loop"
                }
            );
            println!(
                "{:>12} {:>12} {:>10} {:>10} {:>10} {:>8}",
                "level", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors"
            );
        }
        for run in runs {
            let r = match (run, args.rate) {
                (Some(c), _) => closed_loop(&args, &template, c.max(1)).await?,
                (None, Some(rate)) => open_loop(&args, &template, rate).await?,
                (None, None) => unreachable!("runs are built from --rate or --concurrency"),
            };
            if args.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                let level = if r.mode == "rate" {
                    format!("{} rps", r.level)
                } else {
                    format!("c={}", r.level)
                };
                println!(
                    "{:>12} {:>12.1} {:>10.3} {:>10.3} {:>10.3} {:>8}",
                    level, r.requests_per_second, r.p50_ms, r.p90_ms, r.p99_ms, r.errors
                );
            }
        }
        Ok(())
    })
}
