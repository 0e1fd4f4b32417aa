//! `meshserve bench plugins`: what WebAssembly pre/post-processing costs.
//!
//! 1. Per-call overhead, in process: `json-features` (pre) on a ~1 KiB JSON body and
//!    `threshold` (post) on the fraud model's output, each call with a fresh instance.
//! 2. Served throughput of the fraud model through both plugins, next to the same model called
//!    with plain OIP JSON, from one freshly started node.
//! 3. That plugin endpoint's throughput while two requests keep a runaway plugin looping until
//!    its deadline, next to the same load without them.

use super::{BenchError, HttpLoad, Report, fp32_request_body, io_error, run_http, start_server};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use meshserve_host::metrics::Metrics;
use meshserve_host::plugin::bindings::{Context, Request};
use meshserve_host::plugin::features::FeatureTables;
use meshserve_host::plugin::instance::PluginSpec;
use meshserve_host::plugin::runtime::{PluginRuntime, PluginRuntimeConfig};
use meshserve_host::{DataType, Tensor};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Settings of `meshserve bench plugins`.
#[derive(Debug, Clone)]
pub struct PluginSuiteConfig {
    /// The `meshserve` binary to start as the server.
    pub server_binary: PathBuf,
    /// The model repository (must hold `fraud`).
    pub repository: PathBuf,
    /// Where the built plugins are (`json_features.wasm`, `threshold.wasm`, `sandbox_probe.wasm`).
    pub plugins: PathBuf,
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
    let fields: Vec<String> = super::sample_values(FIELDS, 11)
        .iter()
        .enumerate()
        .map(|(i, v)| format!("\"feature_{i:02}\": {v:.9}"))
        .collect();
    Bytes::from(format!("{{{}}}", fields.join(", ")))
}

fn spec(path: PathBuf, config: String, deadline_ms: u64) -> PluginSpec {
    PluginSpec {
        path,
        config,
        deadline_ms,
        memory_bytes: 64 << 20,
        fuel: None,
        dirs: Vec::new(),
        env: BTreeMap::new(),
    }
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
            .record(t.elapsed().as_micros().max(1) as u64);
    }
    report.elapsed = start.elapsed();
    Ok(report)
}

async fn per_call_overhead(
    config: &PluginSuiteConfig,
) -> Result<(Report, Report, usize), BenchError> {
    let runtime = PluginRuntime::new(
        PluginRuntimeConfig::default(),
        Arc::new(FeatureTables::default()),
        Arc::new(Metrics::new()),
    )
    .map_err(|e| BenchError::Model(e.to_string()))?;
    let pre = runtime
        .load(
            "json_features",
            &spec(
                plugin_path(config, "json_features")?,
                json_features_config(),
                50,
            ),
        )
        .map_err(|e| BenchError::Model(e.to_string()))?;
    let post = runtime
        .load(
            "threshold",
            &spec(plugin_path(config, "threshold")?, String::new(), 50),
        )
        .map_err(|e| BenchError::Model(e.to_string()))?;
    let body = json_body();
    let request = Request {
        endpoint: "bench".into(),
        content_type: "application/json".into(),
        headers: Vec::new(),
        body: body.to_vec(),
    };
    let context = Context {
        endpoint: "bench".into(),
        model: "fraud".into(),
        content_type: "application/json".into(),
        headers: Vec::new(),
    };
    let probabilities: Vec<u8> = [0.25f32, 0.75]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let outputs = vec![Tensor {
        name: "probabilities".into(),
        datatype: DataType::Fp32,
        shape: vec![1, 2],
        data: Bytes::from(probabilities),
    }];
    let pre_report = time_calls(config.warmup, config.duration, || async {
        pre.preprocess(&request)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await?;
    let post_report = time_calls(config.warmup, config.duration, || async {
        post.postprocess(&context, &outputs)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await?;
    Ok((pre_report, post_report, body.len()))
}

/// Sends requests one after another on one connection until `stop`, whatever they answer.
async fn send_until(
    addr: std::net::SocketAddr,
    path: &'static str,
    stop: Arc<AtomicBool>,
) -> Result<(), BenchError> {
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
        response
            .into_body()
            .collect()
            .await
            .map_err(|e| BenchError::Server(e.to_string()))?;
    }
    Ok(())
}

fn node_config(config: &PluginSuiteConfig, dir: &Path) -> Result<PathBuf, BenchError> {
    let text = format!(
        "model_repository = {repo:?}\n\
         [endpoints.fraud-plugins]\nmodel = \"fraud\"\n\
         pre = {{ path = {pre:?}, config = {pre_config:?} }}\n\
         post = {{ path = {post:?}, config = '{{\"output\": \"probabilities\", \"index\": 1}}' }}\n\
         [endpoints.runaway]\nmodel = \"fraud\"\n\
         pre = {{ path = {probe:?}, config = \"loop\", deadline_ms = 200 }}\n",
        repo = config.repository.display().to_string(),
        pre = plugin_path(config, "json_features")?.display().to_string(),
        pre_config = json_features_config(),
        post = plugin_path(config, "threshold")?.display().to_string(),
        probe = plugin_path(config, "sandbox_probe")?.display().to_string(),
    );
    let path = dir.join("node.toml");
    std::fs::write(&path, text).map_err(io_error("write the bench node config"))?;
    Ok(path)
}

/// Runs the plugin suite and returns the printed report.
pub async fn run_plugin_suite(config: &PluginSuiteConfig) -> Result<String, BenchError> {
    let (pre, post, body_bytes) = per_call_overhead(config).await?;

    let dir = tempfile::tempdir().map_err(io_error("create a temporary folder"))?;
    let node_config = node_config(config, dir.path())?;
    let (_server, addr) = start_server(
        &config.server_binary,
        &["--config".as_ref(), node_config.as_os_str()],
    )
    .await?;
    let load = |path: &str, body: Bytes, concurrency: usize| HttpLoad {
        addr,
        path: path.to_string(),
        body,
        rows: 1,
        concurrency,
        warmup: config.warmup,
        duration: config.duration,
    };
    let plain = run_http(&load(
        "/v2/models/fraud/infer",
        fp32_request_body("features", 1, FIELDS),
        64,
    ))
    .await?;
    let with_plugins = run_http(&load(
        "/v1/endpoints/fraud-plugins/invocations",
        json_body(),
        64,
    ))
    .await?;
    let calm = run_http(&load(
        "/v1/endpoints/fraud-plugins/invocations",
        json_body(),
        16,
    ))
    .await?;

    // Two clients keep the runaway endpoint busy: each request loops until its 200 ms deadline.
    let stop = Arc::new(AtomicBool::new(false));
    let runaways: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(send_until(
                addr,
                "/v1/endpoints/runaway/invocations",
                stop.clone(),
            ))
        })
        .collect();
    let stormy = run_http(&load(
        "/v1/endpoints/fraud-plugins/invocations",
        json_body(),
        16,
    ))
    .await;
    stop.store(true, Ordering::Relaxed);
    for runaway in runaways {
        runaway
            .await
            .map_err(|e| BenchError::Server(e.to_string()))??;
    }
    let stormy = stormy?;

    let mut out = String::new();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let _ = writeln!(
        out,
        "meshserve bench plugins: {cores} cores, {} s per row after {} s warm-up; load generator on the same machine",
        config.duration.as_secs_f64(),
        config.warmup.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "per-call overhead, fresh instance each call ({body_bytes}-byte JSON body for pre):"
    );
    for (label, r) in [
        ("json-features preprocess", &pre),
        ("threshold postprocess", &post),
    ] {
        let _ = writeln!(
            out,
            "  {label:<26} p50 {:>6} µs   p99 {:>6} µs   ({:.0} calls/s on one thread)",
            r.percentile_us(0.5),
            r.percentile_us(0.99),
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
        ("fraud through json-features + threshold", 64, &with_plugins),
        ("same, alone", 16, &calm),
        (
            "same, while 2 requests loop in a runaway plugin",
            16,
            &stormy,
        ),
    ] {
        let _ = writeln!(
            out,
            "{label:<52} {concurrency:>5} {:>9.0} {:>8} {:>8} {:>7}",
            r.requests_per_second(),
            r.percentile_us(0.5),
            r.percentile_us(0.99),
            r.errors
        );
    }
    let _ = writeln!(
        out,
        "with plugins / without: {:.2}x req/s; beside a runaway plugin / alone: {:.2}x req/s",
        with_plugins.requests_per_second() / plain.requests_per_second().max(1e-9),
        stormy.requests_per_second() / calm.requests_per_second().max(1e-9)
    );
    Ok(out)
}
