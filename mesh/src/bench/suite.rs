//! `meshserve bench suite`: the single-node engine next to in-process ONNX Runtime.

use super::{
    BenchError, HttpLoad, Report, fp32_request_body, fp32_tensor, run_http, run_in_process,
    start_floor, start_server,
};
use meshserve_host::model::repository::Repository;
use meshserve_host::model::session::OnnxSession;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Settings of `meshserve bench suite`.
#[derive(Debug, Clone)]
pub struct SuiteConfig {
    /// The `meshserve` binary to start as the server.
    pub server_binary: PathBuf,
    /// The model repository to serve and to load in-process (must hold `fraud` and `heavy`).
    pub repository: PathBuf,
    /// Measured time per scenario.
    pub duration: Duration,
    /// Unmeasured time before each scenario.
    pub warmup: Duration,
}

pub(super) fn load_session(repository: &Path, model: &str) -> Result<OnnxSession, BenchError> {
    let runtime =
        meshserve_host::runtime::init(None).map_err(|e| BenchError::Model(e.to_string()))?;
    let repo = Repository::new(repository);
    let version = repo.versions(model).last().copied().ok_or_else(|| {
        BenchError::Model(format!("model '{model}' not in {}", repository.display()))
    })?;
    let config = repo
        .config(model)
        .map_err(|e| BenchError::Model(e.to_string()))?;
    OnnxSession::load(runtime, &repo.model_path(model, version), &config)
        .map_err(|e| BenchError::Model(e.to_string()))
}

/// The open-loop rows' offered rate.
const OPEN_RATE: f64 = 20_000.0;

/// One row of the suite's table.
struct Row {
    label: String,
    concurrency: usize,
    report: Report,
}

/// Runs the suite of the single-node issue and returns the printed table.
pub async fn run_suite(config: &SuiteConfig) -> Result<String, BenchError> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut rows = Vec::new();

    // The in-process limits first, with the machine quiet.
    let mut fraud = load_session(&config.repository, "fraud")?;
    let fraud_input = [fp32_tensor("features", 1, 32)];
    rows.push(Row {
        label: "fraud  in-process ORT, batch 1".into(),
        concurrency: 1,
        report: run_in_process(&mut fraud, &fraud_input, 1, config.warmup, config.duration)?,
    });
    drop(fraud);
    let mut heavy = load_session(&config.repository, "heavy")?;
    let heavy_input = [fp32_tensor("input", 1, 512)];
    rows.push(Row {
        label: "heavy  in-process ORT, batch 1".into(),
        concurrency: 1,
        report: run_in_process(&mut heavy, &heavy_input, 1, config.warmup, config.duration)?,
    });
    drop(heavy);

    let (_server, addr) = start_server(
        &config.server_binary,
        &["--model-repository".as_ref(), config.repository.as_os_str()],
    )
    .await?;
    // Closed loop unless an open-loop rate is given (latency then from each request's release).
    let load = |addr: SocketAddr, model: &str, width: usize, pace, concurrency| HttpLoad {
        headers: hyper::HeaderMap::new(),
        pace,
        protocol: super::Protocol::Http1,
        addr,
        path: format!("/v2/models/{model}/infer"),
        body: fp32_request_body(
            if model == "heavy" {
                "input"
            } else {
                "features"
            },
            1,
            width,
        ),
        rows: 1,
        concurrency,
        warmup: config.warmup,
        duration: config.duration,
    };
    let closed = super::Pace::Closed;
    let open = super::Pace::Open { rate: OPEN_RATE };
    let open_label = format!("open loop {OPEN_RATE:.0}/s");
    // The fraud rows first, so heavy's batches cannot linger into them.
    let scenarios = [
        ("fraud", 32, closed, 1, "HTTP/1.1 JSON, batch-1 requests"),
        ("fraud", 32, closed, 64, "HTTP/1.1 JSON, batch-1 requests"),
        ("fraud", 32, open, 256, open_label.as_str()),
        ("heavy", 512, closed, 64, "HTTP/1.1 JSON, batch-1 requests"),
    ];
    for (model, width, pace, concurrency, what) in scenarios {
        let report = run_http(&load(addr, model, width, pace, concurrency)).await?;
        if report.errors > 0 {
            return Err(BenchError::Server(format!(
                "{} of the {model} requests failed",
                report.errors
            )));
        }
        rows.push(Row {
            label: format!("{model}  {what}"),
            concurrency,
            report,
        });
    }
    drop(_server);

    // The floor: a bare hyper server answering a fixed OIP response, same load, same client.
    let (_floor, floor_addr) = start_floor(&config.server_binary).await?;
    for (pace, concurrency, what) in [
        (closed, 1, "bare hyper, fixed OIP response"),
        (closed, 64, "bare hyper, fixed OIP response"),
        (open, 256, open_label.as_str()),
    ] {
        rows.push(Row {
            label: format!("floor  {what}"),
            concurrency,
            report: run_http(&load(floor_addr, "fraud", 32, pace, concurrency)).await?,
        });
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "meshserve bench suite: {cores} cores, closed loop unless said, {} s per row after {} s warm-up; load generator on the same machine",
        config.duration.as_secs_f64(),
        config.warmup.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "{:<40} {:>5} {:>11} {:>11} {:>9} {:>9}",
        "scenario", "conc", "req/s", "samples/s", "p50 µs", "p99 µs"
    );
    for row in &rows {
        let r = &row.report;
        let _ = writeln!(
            out,
            "{:<40} {:>5} {:>11.0} {:>11.0} {:>9} {:>9}",
            row.label,
            row.concurrency,
            r.requests_per_second(),
            r.samples_per_second(),
            r.percentile_us(0.5),
            r.percentile_us(0.99)
        );
    }
    let fraud_raw = &rows[0].report;
    let heavy_raw = &rows[1].report;
    let fraud_c1 = &rows[2].report;
    let fraud_c64 = &rows[3].report;
    let fraud_open = &rows[4].report;
    let heavy_served = &rows[5].report;
    let floor_c1 = &rows[6].report;
    let floor_c64 = &rows[7].report;
    let floor_open = &rows[8].report;
    let _ = writeln!(
        out,
        "fraud / floor: req/s at concurrency 64 = {:.2}x; p50 at concurrency 1 = {} µs vs {} µs; open-loop p99 at {OPEN_RATE:.0}/s = {:.2}x ({} µs vs {} µs, {} and {} unanswered)",
        fraud_c64.requests_per_second() / floor_c64.requests_per_second().max(1e-9),
        fraud_c1.percentile_us(0.5),
        floor_c1.percentile_us(0.5),
        fraud_open.percentile_us(0.99) as f64 / floor_open.percentile_us(0.99).max(1) as f64,
        fraud_open.percentile_us(0.99),
        floor_open.percentile_us(0.99),
        fraud_open.unanswered,
        floor_open.unanswered
    );
    let _ = writeln!(
        out,
        "fraud: server-added p50 latency at concurrency 1 = {} µs (HTTP p50 {} µs − in-process p50 {} µs)",
        fraud_c1
            .percentile_us(0.5)
            .saturating_sub(fraud_raw.percentile_us(0.5)),
        fraud_c1.percentile_us(0.5),
        fraud_raw.percentile_us(0.5)
    );
    let _ = writeln!(
        out,
        "heavy: served with dynamic batching / in-process single-request loop = {:.2}x samples/s",
        heavy_served.samples_per_second() / heavy_raw.samples_per_second().max(1e-9)
    );
    Ok(out)
}
