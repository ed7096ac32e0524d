//! `ferry top`: a terminal view of a running server, from its `/metrics` page alone. Every interval it scrapes the
//! page and shows, per model and version, the request rate, the error share, p50 and p99 latency (from the
//! histogram's bucket deltas, as Prometheus's `histogram_quantile` computes them), the mean batch size, the queue
//! depth and which features or outputs drift. Plain ANSI escapes redraw the screen; `--once` prints one frame
//! without them and exits.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_wire::metrics;

/// `ferry top` flags.
#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// The server's REST port (or its --metrics-port): `http://HOST:PORT`, or `HOST:PORT`.
    #[arg(long, env = "FERRY_TOP_URL", default_value = "http://127.0.0.1:8501")]
    pub url: String,

    /// Time between scrapes (`500ms`, `1s`, `5s`); rates are over this interval.
    #[arg(long, env = "FERRY_TOP_INTERVAL", default_value = "1s", value_parser = crate::cli::parse_duration)]
    pub interval: Duration,

    /// A bearer token with the `read` scope, when the server requires tokens for /metrics.
    #[arg(long, env = "FERRY_TOP_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Print one frame (rates over one interval) without escape codes, and exit.
    #[arg(long, env = "FERRY_TOP_ONCE", num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub once: bool,
}

/// One sample of the page: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's name (`ferry_requests_total`, `..._bucket`).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// Parses the Prometheus text format (comments and blank lines skipped; a malformed line is an error naming it).
pub fn parse(text: &str) -> anyhow::Result<Vec<Sample>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || anyhow::anyhow!("line {} of the metrics page is malformed: {line}", i + 1);
        let name_end = line
            .find(|c: char| c == '{' || c.is_whitespace())
            .ok_or_else(bad)?;
        let name = line[..name_end].to_string();
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(inner) = rest.strip_prefix('{') {
            let mut chars = inner.char_indices();
            let end = loop {
                // Between pairs: separators, then a key up to `=`, or the closing brace.
                let mut key = String::new();
                let (at, c) = loop {
                    let (at, c) = chars.next().ok_or_else(bad)?;
                    if !(c == ',' || c.is_whitespace()) {
                        break (at, c);
                    }
                };
                if c == '}' {
                    break at + 1;
                }
                key.push(c);
                loop {
                    match chars.next().ok_or_else(bad)?.1 {
                        '=' => break,
                        c => key.push(c),
                    }
                }
                if chars.next().map(|(_, c)| c) != Some('"') {
                    return Err(bad());
                }
                let mut value = String::new();
                loop {
                    match chars.next().ok_or_else(bad)?.1 {
                        '\\' => match chars.next().ok_or_else(bad)?.1 {
                            'n' => value.push('\n'),
                            other => value.push(other),
                        },
                        '"' => break,
                        other => value.push(other),
                    }
                }
                labels.insert(key.trim().to_string(), value);
            };
            rest = &inner[end..];
        }
        let value_text = rest.split_whitespace().next().ok_or_else(bad)?;
        let value = match value_text {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse::<f64>().map_err(|_| bad())?,
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    Ok(out)
}

/// One scrape, indexed for the view.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    /// When it was taken.
    pub at: Option<Instant>,
    samples: Vec<Sample>,
}

type Key = (String, String);

impl Scrape {
    /// Indexes parsed samples.
    pub fn new(samples: Vec<Sample>, at: Instant) -> Scrape {
        Scrape {
            at: Some(at),
            samples,
        }
    }

    fn key(s: &Sample) -> Option<Key> {
        let model = s.labels.get("model")?;
        let version = s.labels.get("version")?;
        (!model.is_empty() && !version.is_empty()).then(|| (model.clone(), version.clone()))
    }

    /// The sum of `name` per (model, version), over samples that pass `keep`.
    fn sum_by_version(&self, name: &str, keep: impl Fn(&Sample) -> bool) -> BTreeMap<Key, f64> {
        let mut out = BTreeMap::new();
        for s in self.samples.iter().filter(|s| s.name == name && keep(s)) {
            if let Some(k) = Scrape::key(s) {
                *out.entry(k).or_default() += s.value;
            }
        }
        out
    }

    /// Cumulative bucket counts of a histogram per (model, version), summed over its other labels, by bound.
    fn buckets(&self, name: &str) -> BTreeMap<Key, Vec<(f64, f64)>> {
        let mut by: BTreeMap<Key, BTreeMap<u64, (f64, f64)>> = BTreeMap::new();
        let bucket = format!("{name}_bucket");
        for s in self.samples.iter().filter(|s| s.name == bucket) {
            let (Some(k), Some(le)) = (Scrape::key(s), s.labels.get("le")) else {
                continue;
            };
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                match le.parse::<f64>() {
                    Ok(b) => b,
                    Err(_) => continue,
                }
            };
            by.entry(k)
                .or_default()
                .entry(bound.to_bits())
                .or_insert((bound, 0.0))
                .1 += s.value;
        }
        by.into_iter()
            .map(|(k, m)| {
                let mut v: Vec<(f64, f64)> = m.into_values().collect();
                v.sort_by(|a, b| a.0.total_cmp(&b.0));
                (k, v)
            })
            .collect()
    }

    fn total(&self, name: &str) -> Option<f64> {
        let found: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .collect();
        (!found.is_empty()).then(|| found.iter().sum())
    }
}

/// The `q` quantile of a histogram given as cumulative (bound, count) pairs, interpolating linearly within the
/// bucket it falls in (as Prometheus's `histogram_quantile`); `None` when it holds nothing.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut previous = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Some(previous.0);
            }
            let within = count - previous.1;
            let fraction = if within > 0.0 {
                (rank - previous.1) / within
            } else {
                1.0
            };
            return Some(previous.0 + (bound - previous.0) * fraction);
        }
        previous = (bound, count);
    }
    Some(previous.0)
}

/// One row of the view.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Model name.
    pub model: String,
    /// Version.
    pub version: String,
    /// State (READY, LOADING, ...).
    pub state: String,
    /// Requests per second over the interval.
    pub rate: Option<f64>,
    /// Share of those requests that failed.
    pub errors: Option<f64>,
    /// Median latency over the interval, seconds.
    pub p50: Option<f64>,
    /// 99th percentile latency over the interval, seconds.
    pub p99: Option<f64>,
    /// Mean requests per batch over the interval.
    pub batch: Option<f64>,
    /// Requests waiting now.
    pub queue: Option<f64>,
    /// Drifted features and outputs (`None`: no drift baseline).
    pub drift: Option<Vec<String>>,
}

/// The rows for `now`, with rates against `before` (when there is an earlier scrape).
pub fn rows(before: Option<&Scrape>, now: &Scrape) -> Vec<Row> {
    let seconds = before
        .and_then(|b| Some(now.at?.duration_since(b.at?).as_secs_f64()))
        .filter(|s| *s > 0.0);
    let delta = |name: &str, keep: &dyn Fn(&Sample) -> bool| -> BTreeMap<Key, f64> {
        let after = now.sum_by_version(name, keep);
        let prior = before
            .map(|b| b.sum_by_version(name, keep))
            .unwrap_or_default();
        after
            .into_iter()
            .map(|(k, v)| {
                let was = prior.get(&k).copied().unwrap_or(0.0);
                // A counter that went down means the server restarted: count from zero.
                (k, if v >= was { v - was } else { v })
            })
            .collect()
    };
    let all = delta(metrics::REQUESTS.name, &|_| true);
    let failed = delta(metrics::REQUESTS.name, &|s| {
        s.labels.get("outcome").is_some_and(|o| o != "success")
    });
    let batch_sum = delta(&format!("{}_sum", metrics::BATCH_SIZE.name), &|_| true);
    let batch_count = delta(&format!("{}_count", metrics::BATCH_SIZE.name), &|_| true);
    let latency_now = now.buckets(metrics::REQUEST_DURATION.name);
    let latency_before = before
        .map(|b| b.buckets(metrics::REQUEST_DURATION.name))
        .unwrap_or_default();
    let queue = now.sum_by_version(metrics::QUEUE_DEPTH.name, |_| true);
    let mut drift: BTreeMap<Key, Vec<String>> = BTreeMap::new();
    for (metric, label) in [
        (metrics::DRIFT_PSI.name, "feature"),
        (metrics::PREDICTION_DRIFT_PSI.name, "output"),
    ] {
        for s in now.samples.iter().filter(|s| s.name == metric) {
            if let (Some(k), Some(name)) = (Scrape::key(s), s.labels.get(label)) {
                let flags = drift.entry(k).or_default();
                if s.value > 0.2 {
                    flags.push(if label == "output" {
                        format!("{name} (predictions, psi {:.2})", s.value)
                    } else {
                        format!("{name} (psi {:.2})", s.value)
                    });
                }
            }
        }
    }
    let mut out = Vec::new();
    for s in now
        .samples
        .iter()
        .filter(|s| s.name == metrics::MODEL_STATE.name)
    {
        let Some(k) = Scrape::key(s) else { continue };
        let state = s.labels.get("state").cloned().unwrap_or_default();
        let requests = all.get(&k).copied().unwrap_or(0.0);
        let (p50, p99) = match latency_now.get(&k) {
            Some(after) if seconds.is_some() => {
                let prior = latency_before.get(&k);
                let diff: Vec<(f64, f64)> = after
                    .iter()
                    .map(|(b, c)| {
                        let was = prior
                            .and_then(|p| p.iter().find(|(pb, _)| pb == b))
                            .map_or(0.0, |(_, pc)| *pc);
                        (*b, if *c >= was { c - was } else { *c })
                    })
                    .collect();
                (quantile(0.5, &diff), quantile(0.99, &diff))
            }
            _ => (None, None),
        };
        let batches = batch_count.get(&k).copied().unwrap_or(0.0);
        out.push(Row {
            rate: seconds.map(|s| requests / s),
            errors: seconds
                .filter(|_| requests > 0.0)
                .map(|_| failed.get(&k).copied().unwrap_or(0.0) / requests),
            p50,
            p99,
            batch: (seconds.is_some() && batches > 0.0)
                .then(|| batch_sum.get(&k).copied().unwrap_or(0.0) / batches),
            queue: queue.get(&k).copied(),
            drift: drift.get(&k).cloned(),
            model: k.0,
            version: k.1,
            state,
        });
    }
    out.sort_by(|a, b| {
        (a.model.as_str(), a.version.parse::<u64>().unwrap_or(0))
            .cmp(&(b.model.as_str(), b.version.parse::<u64>().unwrap_or(0)))
    });
    out
}

/// The text of one frame.
pub fn frame(url: &str, before: Option<&Scrape>, now: &Scrape) -> String {
    let rows = rows(before, now);
    let mut out = String::new();
    let seconds = before
        .and_then(|b| Some(now.at?.duration_since(b.at?).as_secs_f64()))
        .filter(|s| *s > 0.0);
    let cpu = match (seconds, before.and_then(|b| b.total(metrics::CPU.name))) {
        (Some(s), Some(was)) => now
            .total(metrics::CPU.name)
            .map(|cpu| format!("{:.0}%", (cpu - was).max(0.0) / s * 100.0)),
        _ => None,
    };
    let rss = now
        .total(metrics::RSS.name)
        .map(|b| format!("{:.0} MiB", b / (1024.0 * 1024.0)));
    let in_flight = now.total(metrics::IN_FLIGHT.name).unwrap_or(0.0);
    let _ = writeln!(
        out,
        "ferry top  {url}  in flight {in_flight:.0}  cpu {}  rss {}  (rates over {})",
        cpu.as_deref().unwrap_or("-"),
        rss.as_deref().unwrap_or("-"),
        seconds.map_or("-".to_string(), |s| format!("{s:.1}s")),
    );
    let width = rows.iter().map(|r| r.model.len()).max().unwrap_or(5).max(5);
    let _ = writeln!(
        out,
        "{:<width$}  {:>7}  {:<11}  {:>9}  {:>6}  {:>8}  {:>8}  {:>6}  {:>5}  DRIFT",
        "MODEL", "VERSION", "STATE", "REQ/S", "ERR%", "P50 MS", "P99 MS", "BATCH", "QUEUE"
    );
    let dash = || "-".to_string();
    for r in &rows {
        let drift = match &r.drift {
            None => dash(),
            Some(flags) if flags.is_empty() => "ok".into(),
            Some(flags) => flags.join(", "),
        };
        let _ = writeln!(
            out,
            "{:<width$}  {:>7}  {:<11}  {:>9}  {:>6}  {:>8}  {:>8}  {:>6}  {:>5}  {drift}",
            r.model,
            r.version,
            r.state,
            r.rate.map_or_else(dash, |v| format!("{v:.1}")),
            r.errors.map_or_else(dash, |v| format!("{:.1}", v * 100.0)),
            r.p50.map_or_else(dash, |v| format!("{:.2}", v * 1000.0)),
            r.p99.map_or_else(dash, |v| format!("{:.2}", v * 1000.0)),
            r.batch.map_or_else(dash, |v| format!("{v:.1}")),
            r.queue.map_or_else(dash, |v| format!("{v:.0}")),
        );
    }
    if rows.is_empty() {
        out.push_str("(no model versions)\n");
    }
    out
}

fn metrics_url(url: &str) -> String {
    let base = if url.starts_with("http://") || url.starts_with("https://") {
        url.trim_end_matches('/').to_string()
    } else {
        format!("http://{}", url.trim_end_matches('/'))
    };
    if base.ends_with("/metrics") {
        base
    } else {
        format!("{base}/metrics")
    }
}

/// Runs `ferry top`.
pub fn run(args: TopArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    let url = metrics_url(&args.url);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .context("making the HTTP client")?;
    let scrape = || -> anyhow::Result<Scrape> {
        runtime.block_on(async {
            let mut request = client
                .get(&url)
                .header("accept", "text/plain; version=0.0.4");
            if let Some(token) = &args.token {
                request = request.bearer_auth(token);
            }
            let r = request
                .send()
                .await
                .with_context(|| format!("scraping {url}"))?;
            anyhow::ensure!(r.status().is_success(), "{url} answered {}", r.status());
            let text = r.text().await.with_context(|| format!("reading {url}"))?;
            Ok(Scrape::new(parse(&text)?, Instant::now()))
        })
    };
    let mut before = scrape()?;
    if args.once {
        std::thread::sleep(args.interval);
        let now = scrape()?;
        print!("{}", frame(&args.url, Some(&before), &now));
        return Ok(());
    }
    let mut stdout = std::io::stdout();
    // The first frame has no rates yet; later ones are over the interval.
    write!(stdout, "\x1b[H\x1b[2J{}", frame(&args.url, None, &before))?;
    stdout.flush()?;
    loop {
        std::thread::sleep(args.interval);
        let now = match scrape() {
            Ok(s) => s,
            Err(e) => {
                write!(
                    stdout,
                    "\x1b[H\x1b[2Jferry top  {}: {e:#}\n(retrying)\n",
                    args.url
                )?;
                stdout.flush()?;
                continue;
            }
        };
        write!(
            stdout,
            "\x1b[H\x1b[2J{}",
            frame(&args.url, Some(&before), &now)
        )?;
        stdout.flush()?;
        before = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = r#"# HELP ferry_requests_total x
# TYPE ferry_requests_total counter
ferry_requests_total{model="iris",version="1",protocol="rest_kserve",outcome="success"} 100
ferry_requests_total{model="",version="",protocol="rest_kserve",outcome="not_found"} 7
ferry_request_duration_seconds_bucket{model="iris",version="1",protocol="rest_kserve",le="0.001"} 100
ferry_request_duration_seconds_bucket{model="iris",version="1",protocol="rest_kserve",le="0.01"} 100
ferry_request_duration_seconds_bucket{model="iris",version="1",protocol="rest_kserve",le="+Inf"} 100
ferry_batch_size_sum{model="iris",version="1"} 100
ferry_batch_size_count{model="iris",version="1"} 100
ferry_model_state{model="iris",version="1",state="READY"} 1
ferry_model_state{model="we\"ird",version="2",state="UNAVAILABLE"} 1
process_cpu_seconds_total 10
"#;

    const AFTER: &str = r#"ferry_requests_total{model="iris",version="1",protocol="rest_kserve",outcome="success"} 280
ferry_requests_total{model="iris",version="1",protocol="grpc_kserve",outcome="invalid_argument"} 20
ferry_request_duration_seconds_bucket{model="iris",version="1",protocol="rest_kserve",le="0.001"} 200
ferry_request_duration_seconds_bucket{model="iris",version="1",protocol="rest_kserve",le="0.01"} 300
ferry_request_duration_seconds_bucket{model="iris",version="1",protocol="rest_kserve",le="+Inf"} 300
ferry_request_duration_seconds_bucket{model="iris",version="1",protocol="grpc_kserve",le="0.001"} 0
ferry_request_duration_seconds_bucket{model="iris",version="1",protocol="grpc_kserve",le="0.01"} 0
ferry_request_duration_seconds_bucket{model="iris",version="1",protocol="grpc_kserve",le="+Inf"} 0
ferry_batch_size_sum{model="iris",version="1"} 200
ferry_batch_size_count{model="iris",version="1"} 150
ferry_queue_depth{model="iris",version="1"} 4
ferry_feature_drift_psi{model="iris",version="1",feature="petal"} 1.5
ferry_feature_drift_psi{model="iris",version="1",feature="sepal"} 0.01
ferry_prediction_drift_psi{model="iris",version="1",output="label"} 0.3
ferry_model_state{model="iris",version="1",state="READY"} 1
ferry_model_state{model="we\"ird",version="2",state="UNAVAILABLE"} 1
process_cpu_seconds_total 11
"#;

    #[test]
    fn rates_quantiles_and_drift_from_two_scrapes() {
        let t0 = Instant::now();
        let before = Scrape::new(parse(BEFORE).unwrap(), t0);
        let after = Scrape::new(parse(AFTER).unwrap(), t0 + Duration::from_secs(2));
        let rows = rows(Some(&before), &after);
        assert_eq!(rows.len(), 2);
        let iris = &rows[0];
        assert_eq!(
            (iris.model.as_str(), iris.state.as_str()),
            ("iris", "READY")
        );
        assert_eq!(iris.rate, Some(100.0), "200 requests in 2 s");
        assert_eq!(iris.errors, Some(0.1));
        // 100 new requests under 1 ms and 100 between 1 and 10 ms: the median sits at 1 ms.
        assert!((iris.p50.unwrap() - 0.001).abs() < 1e-12, "{iris:?}");
        assert!((iris.p99.unwrap() - 0.00982).abs() < 1e-9, "{iris:?}");
        assert_eq!(iris.batch, Some(2.0));
        assert_eq!(iris.queue, Some(4.0));
        assert_eq!(
            iris.drift.as_deref().unwrap(),
            ["petal (psi 1.50)", "label (predictions, psi 0.30)"]
        );
        assert_eq!(rows[1].model, "we\"ird");
        assert_eq!(rows[1].drift, None);
        let text = frame("http://x", Some(&before), &after);
        assert!(text.contains("cpu 50%"), "{text}");
        assert!(text.lines().nth(2).unwrap().contains("100.0"), "{text}");
        // Without an earlier scrape there are no rates.
        assert_eq!(super::rows(None, &after)[0].rate, None);
    }

    #[test]
    fn quantiles_interpolate_like_prometheus() {
        let b = [(1.0, 10.0), (2.0, 20.0), (f64::INFINITY, 20.0)];
        assert_eq!(quantile(0.5, &b), Some(1.0));
        assert_eq!(quantile(0.75, &b), Some(1.5));
        assert_eq!(quantile(0.5, &[(1.0, 0.0), (f64::INFINITY, 0.0)]), None);
        assert_eq!(
            quantile(0.99, &[(1.0, 0.0), (f64::INFINITY, 5.0)]),
            Some(1.0)
        );
    }

    #[test]
    fn malformed_lines_are_named() {
        assert!(parse("ferry_x{a=\"b\" 1").is_err());
        let s = parse("a_b{x=\"1\",y=\"q\\\"\"} +Inf\nno_labels 3 1700000000").unwrap();
        assert_eq!(s[0].labels["y"], "q\"");
        assert_eq!(s[0].value, f64::INFINITY);
        assert_eq!(s[1].value, 3.0);
        assert_eq!(
            metrics_url("127.0.0.1:8501"),
            "http://127.0.0.1:8501/metrics"
        );
    }
}
