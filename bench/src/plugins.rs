//! `meshserve-bench plugins`: what WebAssembly pre/post-processing costs.
//!
//! 1. Per-call overhead, in process, in both isolation modes: the `noop` plugin (what the
//!    plugin machinery itself costs), `json-features` (pre) on a ~1 KiB JSON body
//!    and `threshold` (post) on the fraud model's output; and the Python `labels` plugin.
//! 2. Served throughput at concurrency 64 of the plain fraud model next to `fraud-ranked`
//!    (json-features + top-k) and `fraud-check` (fraud-features with a feature lookup +
//!    threshold), from one freshly started node, the three alternating in three rounds (the
//!    ratios are each round's; the median is reported with all three).
//! 3. A plugin endpoint's throughput while two clients keep a hostile plugin busy, next to
//!    the same load without them: a runaway looping until its deadline, a 48 MiB lookup key,
//!    a reply of 100,000 headers, an `init` failing with a 16 MiB message on every call, and a
//!    million pollables (`sandbox-probe` behaviours; each fails only its own request).

use super::suite::median_round;
use super::{BenchError, HttpLoad, Report, fp32_request_body, io_error, run_http, start_server};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use meshserve::client::body::sample_values;
use meshserve_host::metrics::Metrics;
use meshserve_host::plugin::features::FeatureTables;
use meshserve_host::plugin::instance::{LoadedPlugin, Stage};
use meshserve_host::plugin::runtime::{PluginRuntime, PluginRuntimeConfig};
use meshserve_host::plugin::spec::{Isolation, PluginSpec};
use meshserve_host::plugin::views::{ContextView, RequestView};
use meshserve_host::{DataType, Tensor};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Rounds of the served comparison (bare model, fraud-ranked, fraud-check at concurrency 64).
const SERVED_ROUNDS: usize = 3;

/// Settings of `meshserve-bench plugins`.
#[derive(Debug, Clone)]
pub struct PluginSuiteConfig {
    /// The `meshserve` binary to start as the server.
    pub server_binary: PathBuf,
    /// The model repository (must hold `fraud`).
    pub repository: PathBuf,
    /// Where the built plugins are (`noop.wasm`, `json_features.wasm`, `threshold.wasm`,
    /// `sandbox_probe.wasm`, `top_k.wasm`, `fraud_features.wasm`).
    pub plugins: PathBuf,
    /// The Python `labels` plugin, if built.
    pub python_plugin: Option<PathBuf>,
    /// The card feature table the fraud-check endpoint looks up.
    pub cards: PathBuf,
    /// Measured time per scenario.
    pub duration: Duration,
    /// Unmeasured time before each scenario.
    pub warmup: Duration,
}

const FIELDS: usize = 32;

fn json_features_config() -> String {
    let fields: Vec<String> = (0..FIELDS).map(|i| format!("\"feature_{i:02}\"")).collect();
    format!(
        "{{\"input\": \"features\", \"fields\": [{}]}}",
        fields.join(", ")
    )
}

/// A JSON object of 32 named numbers: about 1 KiB.
fn json_body() -> Bytes {
    let fields: Vec<String> = sample_values(FIELDS, 11)
        .iter()
        .enumerate()
        .map(|(i, v)| format!("\"feature_{i:02}\": {v:.9}"))
        .collect();
    Bytes::from(format!("{{{}}}", fields.join(", ")))
}

fn plugin_path(config: &PluginSuiteConfig, name: &str) -> Result<PathBuf, BenchError> {
    let path = config.plugins.join(format!("{name}.wasm"));
    if path.is_file() {
        Ok(path)
    } else {
        Err(BenchError::Model(format!(
            "{} is missing: run scripts/build-plugins.sh",
            path.display()
        )))
    }
}

async fn time_calls<F, Fut>(
    warmup: Duration,
    duration: Duration,
    mut call: F,
) -> Result<Report, BenchError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let warm_until = Instant::now() + warmup;
    while Instant::now() < warm_until {
        call().await.map_err(BenchError::Model)?;
    }
    let mut report = Report::new(1);
    let start = Instant::now();
    while start.elapsed() < duration {
        let t = Instant::now();
        call().await.map_err(BenchError::Model)?;
        report.ok += 1;
        let _ = report
            .latency_us
            .record(t.elapsed().as_nanos().max(1) as u64);
    }
    report.elapsed = start.elapsed();
    Ok(report)
}

/// One row of the per-call table: latencies recorded in nanoseconds.
struct CallRow {
    label: String,
    report: Report,
}

fn request(body: &Bytes) -> RequestView {
    RequestView::new("bench", "application/json", Vec::new(), body.clone())
}

fn context() -> ContextView {
    ContextView::new("bench", "fraud", "application/json", Vec::new())
}

fn fraud_output() -> Vec<Tensor> {
    let probabilities: Vec<u8> = [0.25f32, 0.75]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    vec![Tensor {
        name: "probabilities".into(),
        datatype: DataType::Fp32,
        shape: vec![1, 2],
        data: Bytes::from(probabilities),
    }]
}

async fn time_pre(
    config: &PluginSuiteConfig,
    plugin: &LoadedPlugin,
    body: &Bytes,
) -> Result<Report, BenchError> {
    time_calls(config.warmup, config.duration, || async {
        plugin
            .preprocess(request(body))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await
}

async fn time_post(
    config: &PluginSuiteConfig,
    plugin: &LoadedPlugin,
    outputs: &[Tensor],
) -> Result<Report, BenchError> {
    time_calls(config.warmup, config.duration, || async {
        plugin
            .postprocess(context(), outputs)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await
}

async fn per_call_overhead(
    config: &PluginSuiteConfig,
) -> Result<(Vec<CallRow>, usize), BenchError> {
    let failed =
        |e: meshserve_host::plugin::runtime::PluginLoadError| BenchError::Model(e.to_string());
    let runtime = PluginRuntime::new(
        PluginRuntimeConfig::default(),
        Arc::new(FeatureTables::default()),
        Arc::new(Metrics::new()),
    )
    .map_err(failed)?;
    let body = json_body();
    let outputs = fraud_output();
    let mut rows = Vec::new();
    for (mode, isolation) in [
        ("reuse", Isolation::Reuse),
        ("per-call", Isolation::PerCall),
    ] {
        let load = |name: &str, stage: Stage, plugin_config: String| {
            let mut spec = PluginSpec::new(plugin_path(config, name)?);
            spec.config = plugin_config;
            spec.isolation = isolation;
            runtime.load(name, stage, &spec, None).map_err(failed)
        };
        let noop = load("noop", Stage::Pre, String::new())?;
        let pre = load("json_features", Stage::Pre, json_features_config())?;
        let post = load("threshold", Stage::Post, String::new())?;
        // fraud-check's pre-plugin, on an unknown card (no table loaded: the lookup misses).
        let transaction = load("fraud_features", Stage::Pre, String::new())?;
        rows.push(CallRow {
            label: format!("no-op (pre), {mode}"),
            report: time_pre(config, &noop, &body).await?,
        });
        rows.push(CallRow {
            label: format!("threshold (post), {mode}"),
            report: time_post(config, &post, &outputs).await?,
        });
        rows.push(CallRow {
            label: format!("json-features (pre), {mode}"),
            report: time_pre(config, &pre, &body).await?,
        });
        rows.push(CallRow {
            label: format!("fraud-features (pre), {mode}"),
            report: time_pre(config, &transaction, &transaction_body()).await?,
        });
    }
    if let Some(python) = &config.python_plugin {
        let mut spec = PluginSpec::new(python);
        spec.config = r#"{"labels": ["legit", "fraud"]}"#.into();
        spec.deadline_ms = 1000;
        let labels = runtime
            .load("labels", Stage::Post, &spec, None)
            .map_err(failed)?;
        rows.push(CallRow {
            label: "Python labels (post), reuse".into(),
            report: time_post(config, &labels, &outputs).await?,
        });
    }
    Ok((rows, body.len()))
}

/// What a hostile endpoint answered its attackers.
#[derive(Debug, Default, Clone, Copy)]
struct Attacked {
    /// Calls that ran and failed (or, unexpectedly, succeeded).
    ran: u64,
    /// Calls refused at once with 503 while the plugin's failure budget refilled.
    paused: u64,
}

/// Sends requests one after another on one connection until `stop`, whatever they answer,
/// waiting out a 503's `Retry-After` as HTTP clients and load balancers do: a client that
/// ignores it floods the node with cheap requests, which costs what any cheap request costs
/// and says nothing about the plugin.
async fn send_until(
    addr: std::net::SocketAddr,
    path: &'static str,
    stop: Arc<AtomicBool>,
) -> Result<Attacked, BenchError> {
    let mut attacked = Attacked::default();
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(io_error("connect"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| BenchError::Server(e.to_string()))?;
    tokio::spawn(connection);
    while !stop.load(Ordering::Relaxed) {
        let request = hyper::Request::post(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(Full::new(Bytes::from_static(b"{}")))
            .map_err(|e| BenchError::Server(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| BenchError::Server(e.to_string()))?;
        if response.status() == hyper::StatusCode::SERVICE_UNAVAILABLE {
            attacked.paused += 1;
            let seconds = response
                .headers()
                .get(hyper::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .unwrap_or(1);
            tokio::time::sleep(Duration::from_secs(seconds.min(2))).await;
        } else {
            attacked.ran += 1;
        }
        response
            .into_body()
            .collect()
            .await
            .map_err(|e| BenchError::Server(e.to_string()))?;
    }
    Ok(attacked)
}

/// Hostile endpoints of the bench node, each kept busy by two clients in turn: what it does
/// and the endpoint's path.
const HOSTILE: [(&str, &str); 5] = [
    (
        "a runaway (loops to its deadline)",
        "/v1/endpoints/runaway/invocations",
    ),
    ("a 48 MiB lookup key", "/v1/endpoints/huge-key/invocations"),
    (
        "100,000 reply headers",
        "/v1/endpoints/many-headers/invocations",
    ),
    (
        "init failing with 16 MiB",
        "/v1/endpoints/failing-init/invocations",
    ),
    ("a million pollables", "/v1/endpoints/pollables/invocations"),
];

fn node_config(config: &PluginSuiteConfig, dir: &Path) -> Result<PathBuf, BenchError> {
    let path = |name: &str| plugin_path(config, name).map(|p| p.display().to_string());
    let state = dir.join("state");
    std::fs::create_dir_all(&state).map_err(io_error("create the probe's state folder"))?;
    let text = format!(
        "model_repository = {repo:?}\n\
         [features.cards]\npath = {cards:?}\n\
         [endpoints.fraud-ranked]\nmodel = \"fraud\"\n\
         pre = {{ path = {json:?}, config = {json_config:?} }}\n\
         post = {{ path = {top_k:?}, config = '{{\"labels\": [\"legit\", \"fraud\"], \"k\": 2}}' }}\n\
         [endpoints.fraud-check]\nmodel = \"fraud\"\n\
         pre = {{ path = {features:?}, config = '{{\"table\": \"cards\"}}' }}\n\
         post = {{ path = {threshold:?}, config = '{{\"output\": \"probabilities\", \"index\": 1}}' }}\n\
         [endpoints.runaway]\nmodel = \"fraud\"\n\
         pre = {{ path = {probe:?}, config = \"loop\", deadline_ms = 200 }}\n\
         [endpoints.huge-key]\nmodel = \"fraud\"\n\
         pre = {{ path = {probe:?}, config = \"lookup-key:50331648\", deadline_ms = 5000, memory_bytes = 134217728 }}\n\
         [endpoints.many-headers]\nmodel = \"fraud\"\n\
         pre = {{ path = {probe:?}, config = \"many-headers:100000\", deadline_ms = 5000 }}\n\
         [endpoints.failing-init]\nmodel = \"fraud\"\n\
         pre = {{ path = {probe:?}, config = \"init-fail-later:16777216\", isolation = \"per-call\", start_deadline_ms = 5000, dirs = [{{ host = {state:?}, guest = \"/state\", writable = true }}] }}\n\
         [endpoints.pollables]\nmodel = \"fraud\"\n\
         pre = {{ path = {probe:?}, config = \"pollables:1000000\", deadline_ms = 5000 }}\n",
        repo = config.repository.display().to_string(),
        cards = config.cards.display().to_string(),
        json = path("json_features")?,
        json_config = json_features_config(),
        top_k = path("top_k")?,
        features = path("fraud_features")?,
        threshold = path("threshold")?,
        probe = path("sandbox_probe")?,
        state = state.display().to_string(),
    );
    let path = dir.join("node.toml");
    std::fs::write(&path, text).map_err(io_error("write the bench node config"))?;
    Ok(path)
}

/// A card transaction as fraud-features reads it.
fn transaction_body() -> Bytes {
    Bytes::from_static(
        br#"{"card": "card-0001", "amount": 120.5, "hour": 23, "merchant_risk": 0.3, "foreign": true, "online": false}"#,
    )
}

/// Runs the plugin suite and returns the printed report.
pub async fn run_plugin_suite(config: &PluginSuiteConfig) -> Result<String, BenchError> {
    let (calls, body_bytes) = per_call_overhead(config).await?;

    let dir = tempfile::tempdir().map_err(io_error("create a temporary folder"))?;
    let node_config = node_config(config, dir.path())?;
    let (_server, addr) = start_server(
        &config.server_binary,
        &["--config".as_ref(), node_config.as_os_str()],
    )
    .await?;
    let load = |path: &str, body: Bytes, concurrency: usize| HttpLoad {
        headers: hyper::HeaderMap::new(),
        pace: super::Pace::Closed,
        protocol: super::Protocol::Http1,
        addr,
        path: path.to_string(),
        body,
        rows: 1,
        concurrency,
        warmup: config.warmup,
        duration: config.duration,
    };
    let ratio =
        |a: &Report, b: &Report| a.requests_per_second() / b.requests_per_second().max(1e-9);
    // The bare model and the two endpoints alternate: on a noisy machine one row swings
    // between rounds by more than the plugins cost, so each ratio compares rows of one round.
    let mut rounds = Vec::with_capacity(SERVED_ROUNDS);
    for _ in 0..SERVED_ROUNDS {
        let plain = run_http(&load(
            "/v2/models/fraud/infer",
            fp32_request_body("features", 1, FIELDS),
            64,
        ))
        .await?;
        let ranked = run_http(&load(
            "/v1/endpoints/fraud-ranked/invocations",
            json_body(),
            64,
        ))
        .await?;
        let checked = run_http(&load(
            "/v1/endpoints/fraud-check/invocations",
            transaction_body(),
            64,
        ))
        .await?;
        rounds.push((plain, ranked, checked));
    }
    let mut ranked_ratios: Vec<f64> = rounds.iter().map(|(p, r, _)| ratio(r, p)).collect();
    let mut checked_ratios: Vec<f64> = rounds.iter().map(|(p, _, c)| ratio(c, p)).collect();
    let (plain, ranked, checked) = rounds.swap_remove(median_round(&checked_ratios, true));
    ranked_ratios.sort_by(f64::total_cmp);
    checked_ratios.sort_by(f64::total_cmp);
    let calm = run_http(&load(
        "/v1/endpoints/fraud-ranked/invocations",
        json_body(),
        16,
    ))
    .await?;

    // Two clients keep each hostile endpoint busy while fraud-ranked is measured.
    let mut beside = Vec::new();
    for (hostile, path) in HOSTILE {
        let stop = Arc::new(AtomicBool::new(false));
        let attackers: Vec<_> = (0..2)
            .map(|_| tokio::spawn(send_until(addr, path, stop.clone())))
            .collect();
        let measured = run_http(&load(
            "/v1/endpoints/fraud-ranked/invocations",
            json_body(),
            16,
        ))
        .await;
        stop.store(true, Ordering::Relaxed);
        let mut attacked = Attacked::default();
        for attacker in attackers {
            let one = attacker
                .await
                .map_err(|e| BenchError::Server(e.to_string()))??;
            attacked.ran += one.ran;
            attacked.paused += one.paused;
        }
        beside.push((
            hostile,
            format!("fraud-ranked beside {hostile}"),
            measured?,
            attacked,
        ));
    }

    let mut out = String::new();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let _ = writeln!(
        out,
        "meshserve-bench plugins: {cores} cores, {} s per row after {} s warm-up; load generator on the same machine",
        config.duration.as_secs_f64(),
        config.warmup.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "per-call overhead in process, one call at a time ({body_bytes}-byte JSON body for pre; fraud-features: a {}-byte transaction of an unknown card):",
        transaction_body().len()
    );
    let us = |ns: u64| ns as f64 / 1000.0;
    for row in &calls {
        let r = &row.report;
        let _ = writeln!(
            out,
            "  {:<34} p50 {:>8.1} µs   p99 {:>8.1} µs   ({:.0} calls/s)",
            row.label,
            us(r.percentile_us(0.5)),
            us(r.percentile_us(0.99)),
            r.requests_per_second()
        );
    }
    let _ = writeln!(
        out,
        "{:<52} {:>5} {:>9} {:>8} {:>8} {:>7}",
        "served over HTTP/1.1", "conc", "req/s", "p50 µs", "p99 µs", "errors"
    );
    for (label, concurrency, r) in [
        ("fraud, plain OIP JSON", 64, &plain),
        ("fraud-ranked: json-features + top-k", 64, &ranked),
        (
            "fraud-check: fraud-features (lookup) + threshold",
            64,
            &checked,
        ),
        ("fraud-ranked alone", 16, &calm),
    ]
    .into_iter()
    .chain(
        beside
            .iter()
            .map(|(_, label, r, _)| (label.as_str(), 16, r)),
    ) {
        let _ = writeln!(
            out,
            "{label:<52} {concurrency:>5} {:>9.0} {:>8} {:>8} {:>7}",
            r.requests_per_second(),
            r.percentile_us(0.5),
            r.percentile_us(0.99),
            r.errors
        );
    }
    let rounds_of = |ratios: &[f64]| {
        ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let median = |ratios: &[f64]| ratios[median_round(ratios, true)];
    let _ = writeln!(
        out,
        "req/s with plugins / plain model, median of {SERVED_ROUNDS} alternating rounds (the table shows fraud-check's median round): fraud-ranked {:.2}x (rounds: {}), fraud-check {:.2}x (rounds: {})",
        median(&ranked_ratios),
        rounds_of(&ranked_ratios),
        median(&checked_ratios),
        rounds_of(&checked_ratios),
    );
    let seconds = (config.warmup + config.duration).as_secs_f64();
    let attacks: Vec<String> = beside
        .iter()
        .map(|(hostile, _, _, a)| {
            format!(
                "{hostile}: {:.0} ran and failed, {:.0} paused",
                a.ran as f64 / seconds,
                a.paused as f64 / seconds
            )
        })
        .collect();
    let _ = writeln!(
        out,
        "hostile calls per second (the plugin pauses once its failures spend failure_budget_ms): {}",
        attacks.join("; ")
    );
    let beside: Vec<String> = beside
        .iter()
        .map(|(hostile, _, r, _)| format!("{hostile} {:.2}x", ratio(r, &calm)))
        .collect();
    let _ = writeln!(
        out,
        "fraud-ranked beside a hostile plugin / alone: {}",
        beside.join(", ")
    );
    Ok(out)
}
