//! The exposition served at `GET /metrics`: the Prometheus text format (0.0.4) or OpenMetrics 1.0.0, negotiated on
//! `Accept`, written from the registry's series, the labelled families and the figures of the moment
//! ([`Snapshot`]), with the process's own figures from /proc.

use super::*;

/// The two exposition formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format, version 0.0.4.
    Prometheus,
    /// OpenMetrics 1.0.0.
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics when it accepts `application/openmetrics-text` at least
    /// as much as `text/plain`, else the Prometheus text format.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Prometheus;
        };
        let (mut open, mut text) = (0.0f64, 0.0f64);
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let mut q = 1.0;
            for p in parts {
                if let Some(v) = p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")) {
                    q = v.trim().parse::<f64>().unwrap_or(0.0);
                }
            }
            match media.as_str() {
                "application/openmetrics-text" => open = open.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if open > 0.0 && open >= text {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }

    /// The `Content-Type` of a page in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

impl Metrics {
    /// The exposition in `format`, with the figures of the moment in `now`.
    pub fn render(&self, now: &Snapshot, format: Format) -> String {
        let mut out = Page {
            text: String::with_capacity(16384),
            format,
        };
        let series: Vec<Arc<VersionSeries>> = self.versions.read().values().cloned().collect();

        // Requests by outcome: the lock-free series, then the labelled path.
        out.header(&REQUESTS);
        for s in &series {
            for (p, ps) in Protocol::ALL.iter().zip(&s.protocols) {
                for (o, n) in Outcome::ALL.iter().zip(&ps.outcomes) {
                    let n = n.load(Ordering::Relaxed);
                    if n > 0 {
                        let labels = [
                            s.model.clone(),
                            s.version.to_string(),
                            p.label().to_string(),
                            o.label().to_string(),
                        ];
                        out.sample(REQUESTS.name, REQUESTS.labels, &labels, None, n);
                    }
                }
            }
        }
        out.counters(&REQUESTS, &self.requests, false);

        out.header(&REQUEST_DURATION);
        for s in &series {
            for (p, ps) in Protocol::ALL.iter().zip(&s.protocols) {
                let labels = [
                    s.model.clone(),
                    s.version.to_string(),
                    p.label().to_string(),
                ];
                out.atomic_histogram(&REQUEST_DURATION, &labels, &ps.duration, 1e-9);
            }
        }
        out.histograms(
            &REQUEST_DURATION,
            &self.request_duration,
            DURATION_BUCKETS,
            false,
        );

        for (d, pick) in [
            (
                &QUEUE_DURATION,
                (|s: &VersionSeries| &s.queue) as fn(&VersionSeries) -> &AtomicHistogram,
            ),
            (&COMPUTE_DURATION, |s| &s.compute),
            (&BATCH_SIZE, |s| &s.batch_size),
            (&TEXT_REQUEST_TOKENS, |s| &s.text_request_tokens),
            (&TEXT_BATCH_TOKENS, |s| &s.text_batch_tokens),
            (&TOKENIZE_DURATION, |s| &s.tokenize),
            (&LLM_TIME_TO_FIRST_TOKEN, |s| &s.llm_first_token),
            (&LLM_INTER_TOKEN, |s| &s.llm_inter_token),
            (&LLM_REQUEST_DURATION, |s| &s.llm_request),
        ] {
            out.header(d);
            let counts = [
                BATCH_SIZE.name,
                TEXT_REQUEST_TOKENS.name,
                TEXT_BATCH_TOKENS.name,
            ];
            let scale = if counts.contains(&d.name) { 1.0 } else { 1e-9 };
            for s in &series {
                let labels = [s.model.clone(), s.version.to_string()];
                out.atomic_histogram(d, &labels, pick(s), scale);
            }
        }

        // Language models: token counters, and the engines' gauges for the versions loaded now.
        let llm: Vec<(&VersionSeries, Option<ferry_llm::Stats>)> = series
            .iter()
            .map(|s| (&**s, s.llm_stats()))
            .filter(|(s, stats)| {
                stats.is_some() || s.llm_request.snapshot().0.iter().any(|c| *c > 0)
            })
            .collect();
        out.header(&LLM_TOKENS);
        for (s, _) in &llm {
            for (kind, n) in [
                ("prompt", &s.llm_prompt_tokens),
                ("generated", &s.llm_generated_tokens),
            ] {
                let labels = [s.model.clone(), s.version.to_string(), kind.to_string()];
                out.sample(
                    LLM_TOKENS.name,
                    LLM_TOKENS.labels,
                    &labels,
                    None,
                    n.load(Ordering::Relaxed),
                );
            }
        }
        out.header(&LLM_SEQUENCES);
        for (s, stats) in &llm {
            let Some(stats) = stats else { continue };
            for (state, n) in [("running", stats.running), ("waiting", stats.waiting)] {
                let labels = [s.model.clone(), s.version.to_string(), state.to_string()];
                out.sample(
                    LLM_SEQUENCES.name,
                    LLM_SEQUENCES.labels,
                    &labels,
                    None,
                    n as u64,
                );
            }
        }
        out.header(&LLM_KV_CACHE_TOKENS);
        for (s, stats) in &llm {
            let Some(stats) = stats else { continue };
            for (kind, n) in [
                ("used", stats.kv_used_tokens),
                ("reserved", stats.kv_reserved_tokens),
                ("budget", stats.kv_budget_tokens),
            ] {
                let labels = [s.model.clone(), s.version.to_string(), kind.to_string()];
                out.sample(
                    LLM_KV_CACHE_TOKENS.name,
                    LLM_KV_CACHE_TOKENS.labels,
                    &labels,
                    None,
                    n as u64,
                );
            }
        }

        out.header(&TEXT_TOKENS);
        for s in &series {
            for (kind, n) in [("text", &s.text_tokens), ("padding", &s.padding_tokens)] {
                let n = n.load(Ordering::Relaxed);
                if s.text_batch_tokens.snapshot().0.iter().any(|c| *c > 0) {
                    out.sample(
                        TEXT_TOKENS.name,
                        TEXT_TOKENS.labels,
                        &[s.model.clone(), s.version.to_string(), kind.to_string()],
                        None,
                        n,
                    );
                }
            }
        }

        for (d, pick) in [
            (
                &REQUEST_BYTES,
                (|p: &ProtocolSeries| &p.request_bytes) as fn(&ProtocolSeries) -> &AtomicU64,
            ),
            (&RESPONSE_BYTES, |p| &p.response_bytes),
        ] {
            out.header(d);
            let mut by_model: BTreeMap<(&str, &str), u64> = BTreeMap::new();
            for s in &series {
                for (p, ps) in Protocol::ALL.iter().zip(&s.protocols) {
                    let n = pick(ps).load(Ordering::Relaxed);
                    if n > 0 {
                        *by_model.entry((s.model.as_str(), p.label())).or_default() += n;
                    }
                }
            }
            for ((model, protocol), n) in by_model {
                out.sample(
                    d.name,
                    d.labels,
                    &[model.to_string(), protocol.to_string()],
                    None,
                    n,
                );
            }
        }

        out.header(&IN_FLIGHT);
        out.sample(
            IN_FLIGHT.name,
            &[],
            &[],
            None,
            self.in_flight.load(Ordering::Relaxed),
        );
        out.header(&QUEUE_DEPTH);
        for (model, version, _, depth) in &now.versions {
            if let Some(depth) = depth {
                let labels = [model.clone(), version.to_string()];
                out.sample(QUEUE_DEPTH.name, QUEUE_DEPTH.labels, &labels, None, depth);
            }
        }
        out.header(&MODEL_STATE);
        for (model, version, state, _) in &now.versions {
            let labels = [model.clone(), version.to_string(), (*state).to_string()];
            out.sample(MODEL_STATE.name, MODEL_STATE.labels, &labels, None, 1);
        }
        out.histograms(&LOAD_DURATION, &self.load_duration, DURATION_BUCKETS, true);
        out.counters(&LOAD_FAILURES, &self.load_failures, true);

        for (d, value) in [
            (
                &DRIFT_PSI,
                (|f: &crate::metrics::drift::FeatureDrift| f.psi)
                    as fn(&crate::metrics::drift::FeatureDrift) -> f64,
            ),
            (&DRIFT_KS, |f| f.ks),
        ] {
            out.header(d);
            for (model, version, report) in &now.drift {
                for f in &report.features {
                    let labels = [model.clone(), version.to_string(), f.name.clone()];
                    out.sample(d.name, d.labels, &labels, None, Float(value(f)));
                }
            }
        }
        for (d, value) in [
            (
                &PREDICTION_DRIFT_PSI,
                (|p: &crate::metrics::drift::PredictionDrift| Some(p.psi))
                    as fn(&crate::metrics::drift::PredictionDrift) -> Option<f64>,
            ),
            (&PREDICTION_DRIFT_KS, |p| p.ks),
        ] {
            out.header(d);
            for (model, version, report) in &now.drift {
                for p in &report.predictions {
                    if let Some(v) = value(p) {
                        let labels = [model.clone(), version.to_string(), p.output.clone()];
                        out.sample(d.name, d.labels, &labels, None, Float(v));
                    }
                }
            }
        }

        out.header(&FEATURE_IMPORTANCE);
        for (model, version, figures) in &now.importance {
            let sources = [
                ("background", Some(&figures.background)),
                ("live", figures.live.as_ref()),
            ];
            for (source, values) in sources {
                for (name, v) in figures.features.iter().zip(values.into_iter().flatten()) {
                    let labels = [
                        model.clone(),
                        version.to_string(),
                        name.clone(),
                        source.to_string(),
                    ];
                    out.sample(
                        FEATURE_IMPORTANCE.name,
                        FEATURE_IMPORTANCE.labels,
                        &labels,
                        None,
                        Float(*v),
                    );
                }
            }
        }
        out.header(&DRIFT_ATTRIBUTION);
        for (model, version, figures) in &now.importance {
            for (name, v) in figures.features.iter().zip(figures.drift.iter().flatten()) {
                let labels = [model.clone(), version.to_string(), name.clone()];
                out.sample(
                    DRIFT_ATTRIBUTION.name,
                    DRIFT_ATTRIBUTION.labels,
                    &labels,
                    None,
                    Float(*v),
                );
            }
        }

        out.counters(&ROLLOUT_DECISIONS, &self.rollout_decisions, true);
        out.header(&ROLLOUT_STATE);
        for (model, version, state, _) in &now.rollouts {
            let labels = [model.clone(), version.to_string(), (*state).to_string()];
            out.sample(ROLLOUT_STATE.name, ROLLOUT_STATE.labels, &labels, None, 1);
        }
        out.header(&ROLLOUT_WEIGHT);
        for (model, version, _, weight) in &now.rollouts {
            let labels = [model.clone(), version.to_string()];
            out.sample(
                ROLLOUT_WEIGHT.name,
                ROLLOUT_WEIGHT.labels,
                &labels,
                None,
                Float(*weight),
            );
        }
        out.counters(&SHADOW_REQUESTS, &self.shadow_requests, true);
        {
            let compared = self.shadow_compared.lock();
            for (d, pick) in [
                (
                    &SHADOW_AGREEMENT,
                    (|a: &crate::metrics::shadow::Agreement| a.agreement_ratio())
                        as fn(&crate::metrics::shadow::Agreement) -> Option<f64>,
                ),
                (&SHADOW_DIFFERENCE, |a| a.mean_absolute_difference()),
            ] {
                out.header(d);
                for (labels, a) in compared.iter() {
                    if let Some(v) = pick(a) {
                        out.sample(d.name, d.labels, labels, None, Float(v));
                    }
                }
            }
        }
        out.header(&PAYLOAD_RECORDS);
        if let Some((queued, dropped)) = now.payload {
            for (outcome, n) in [("queued", queued), ("dropped", dropped)] {
                out.sample(
                    PAYLOAD_RECORDS.name,
                    PAYLOAD_RECORDS.labels,
                    &[outcome.to_string()],
                    None,
                    n,
                );
            }
        }
        let process = process_stats();
        for (d, v) in [
            (&CPU, process.cpu_seconds),
            (&RSS, process.rss_bytes),
            (&FDS, process.fds),
            (&THREADS, process.threads),
        ] {
            if let Some(v) = v {
                out.header(d);
                out.sample(d.name, &[], &[], None, Float(v));
            }
        }
        out.header(&START_TIME);
        let start = self
            .started
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        out.sample(START_TIME.name, &[], &[], None, Float(start));
        out.header(&BUILD_INFO);
        out.sample(
            BUILD_INFO.name,
            BUILD_INFO.labels,
            &[env!("CARGO_PKG_VERSION").to_string()],
            None,
            1,
        );
        if self.options.triton {
            self.render_triton(&mut out, &series, now);
        }
        if format == Format::OpenMetrics {
            out.text.push_str("# EOF\n");
        }
        out.text
    }

    /// Triton's families, from the same series: counts over every protocol, durations as cumulative microseconds of
    /// successful requests (as Triton reports them), pending requests from the queue depth.
    fn render_triton(&self, out: &mut Page, series: &[Arc<VersionSeries>], now: &Snapshot) {
        let sum = |s: &VersionSeries, pick: &dyn Fn(&ProtocolSeries) -> u64| -> u64 {
            s.protocols.iter().map(pick).sum()
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        type Value<'a> = &'a dyn Fn(&VersionSeries) -> u64;
        let families: [(&MetricDef, Value<'_>); 7] = [
            (&NV_SUCCESS, &|s| sum(s, &|p| load(&p.outcomes[0]))),
            (&NV_FAILURE, &|s| {
                sum(s, &|p| p.outcomes[1..].iter().map(load).sum())
            }),
            (&NV_COUNT, &|s| load(&s.rows)),
            (&NV_EXEC_COUNT, &|s| s.batch_size.snapshot().0.iter().sum()),
            (&NV_REQUEST_DURATION, &|s| load(&s.success_request_us)),
            (&NV_QUEUE_DURATION, &|s| load(&s.success_queue_us)),
            (&NV_COMPUTE_INFER_DURATION, &|s| load(&s.success_compute_us)),
        ];
        for (d, value) in families {
            out.header(d);
            for s in series {
                let labels = [s.model.clone(), s.version.to_string()];
                out.sample(d.name, d.labels, &labels, None, value(s));
            }
        }
        out.header(&NV_PENDING);
        for (model, version, _, depth) in &now.versions {
            if let Some(depth) = depth {
                let labels = [model.clone(), version.to_string()];
                out.sample(NV_PENDING.name, NV_PENDING.labels, &labels, None, depth);
            }
        }
    }
}

/// A float sample value, written as both formats require (`+Inf`, `-Inf`, `NaN`).
struct Float(f64);

impl std::fmt::Display for Float {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            v if v.is_nan() => f.write_str("NaN"),
            v if v == f64::INFINITY => f.write_str("+Inf"),
            v if v == f64::NEG_INFINITY => f.write_str("-Inf"),
            v => write!(f, "{v}"),
        }
    }
}

/// The page being written, in one of the two formats.
struct Page {
    text: String,
    format: Format,
}

impl Page {
    /// `# HELP`, `# TYPE` (and, in OpenMetrics, `# UNIT`) of a family. OpenMetrics names a counter's family
    /// without `_total` (its samples keep it) and an info family without `_info`; a counter whose name lacks `_total`
    /// (Triton's) is typed `unknown` there, so its samples keep exactly the names dashboards query.
    fn header(&mut self, d: &MetricDef) {
        let (family, kind) = match self.format {
            Format::Prometheus => (d.name, d.kind),
            Format::OpenMetrics => match d.kind {
                "counter" => match d.name.strip_suffix("_total") {
                    Some(family) => (family, "counter"),
                    None => (d.name, "unknown"),
                },
                "gauge" => match d.name.strip_suffix("_info") {
                    Some(family) => (family, "info"),
                    None => (d.name, "gauge"),
                },
                other => (d.name, other),
            },
        };
        let _ = writeln!(
            self.text,
            "# HELP {family} {}\n# TYPE {family} {kind}",
            d.help
        );
        if self.format == Format::OpenMetrics {
            if let Some(unit) = ["seconds", "bytes"]
                .into_iter()
                .find(|u| family.ends_with(&format!("_{u}")))
            {
                let _ = writeln!(self.text, "# UNIT {family} {unit}");
            }
        }
    }

    fn sample(
        &mut self,
        name: &str,
        names: &[&str],
        values: &[String],
        le: Option<&str>,
        value: impl std::fmt::Display,
    ) {
        let _ = writeln!(self.text, "{name}{} {value}", label_text(names, values, le));
    }

    fn counters(&mut self, d: &MetricDef, f: &Family<u64>, with_header: bool) {
        if with_header {
            self.header(d);
        }
        for (labels, v) in f.series.lock().iter() {
            self.sample(d.name, d.labels, labels, None, v);
        }
    }

    fn histogram_lines(
        &mut self,
        d: &MetricDef,
        labels: &[String],
        bounds: impl Iterator<Item = String>,
        counts: &[u64],
        sum: impl std::fmt::Display,
    ) {
        let (bucket, count, sum_name) = (
            format!("{}_bucket", d.name),
            format!("{}_count", d.name),
            format!("{}_sum", d.name),
        );
        let mut cumulative = 0;
        for (b, c) in bounds.zip(counts) {
            cumulative += c;
            self.sample(&bucket, d.labels, labels, Some(&b), cumulative);
        }
        let total: u64 = counts.iter().sum();
        self.sample(&bucket, d.labels, labels, Some("+Inf"), total);
        self.sample(&sum_name, d.labels, labels, None, sum);
        self.sample(&count, d.labels, labels, None, total);
    }

    fn histograms(
        &mut self,
        d: &MetricDef,
        f: &Family<Histogram>,
        bounds: &[f64],
        with_header: bool,
    ) {
        if with_header {
            self.header(d);
        }
        for (labels, h) in f.series.lock().iter() {
            // Values past the last bound are only in the count: give them their own slot so `+Inf` is the sum.
            let mut counts = h.counts.clone();
            counts.push(h.count - h.counts.iter().sum::<u64>());
            self.histogram_lines(
                d,
                labels,
                bounds.iter().map(|b| b.to_string()),
                &counts,
                Float(h.sum),
            );
        }
    }

    /// A lock-free histogram's lines, when it has observed anything; `scale` turns its unit into the exported one.
    fn atomic_histogram(
        &mut self,
        d: &MetricDef,
        labels: &[String],
        h: &AtomicHistogram,
        scale: f64,
    ) {
        let (counts, sum) = h.snapshot();
        if counts.iter().all(|c| *c == 0) {
            return;
        }
        let bounds = h.le.iter().map(f64::to_string);
        self.histogram_lines(d, labels, bounds, &counts, Float(sum as f64 * scale));
    }
}

/// `{a="x",b="y"}` with values escaped as both formats require; `le` appended for histogram buckets.
fn label_text(names: &[&str], values: &[String], le: Option<&str>) -> String {
    let mut parts: Vec<String> = names
        .iter()
        .zip(values)
        .map(|(n, v)| {
            format!(
                "{n}=\"{}\"",
                v.replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n")
            )
        })
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

#[derive(Debug, Default)]
struct ProcessStats {
    cpu_seconds: Option<f64>,
    rss_bytes: Option<f64>,
    fds: Option<f64>,
    threads: Option<f64>,
}

/// Reads the process's own figures from /proc (Linux); absent elsewhere.
fn process_stats() -> ProcessStats {
    let mut p = ProcessStats::default();
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name (which may contain spaces) start after the last ')'.
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of the full line, 12 and 13 after the state field here.
            if let (Some(u), Some(s)) = (
                fields.get(11).and_then(|v| v.parse::<f64>().ok()),
                fields.get(12).and_then(|v| v.parse::<f64>().ok()),
            ) {
                // Linux reports clock ticks at USER_HZ, which is 100 on every supported architecture.
                p.cpu_seconds = Some((u + s) / 100.0);
            }
        }
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        for line in status.lines() {
            let value = |l: &str| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            };
            if line.starts_with("VmRSS:") {
                p.rss_bytes = value(line).map(|kb| kb * 1024.0);
            } else if line.starts_with("Threads:") {
                p.threads = value(line);
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        p.fds = Some(dir.count() as f64);
    }
    p
}
