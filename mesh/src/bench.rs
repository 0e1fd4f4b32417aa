//! The load generator behind `meshserve bench`: closed-loop HTTP/1.1 load with HDR-histogram
//! percentiles, the in-process ONNX Runtime loop that bounds what any server can reach, and
//! the suite that runs both side by side against a freshly started node.

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use meshserve_host::model::repository::Repository;
use meshserve_host::model::session::OnnxSession;
use meshserve_host::{DataType, Tensor};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A socket or process failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// The server answered with errors or not at all.
    #[error("{0}")]
    Server(String),
    /// The in-process model could not run.
    #[error("{0}")]
    Model(String),
}

fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let context = context.into();
    move |source| BenchError::Io { context, source }
}

/// Latencies and counts of one measured run.
pub struct Report {
    /// Requests completed with a success status.
    pub ok: u64,
    /// Requests answered with an error status.
    pub errors: u64,
    /// Rows (samples) per request.
    pub rows: u64,
    /// Measured wall time.
    pub elapsed: Duration,
    /// Latency per successful request, in µs.
    pub latency_us: Histogram<u64>,
}

impl Report {
    fn new(rows: u64) -> Report {
        Report {
            ok: 0,
            errors: 0,
            rows,
            elapsed: Duration::ZERO,
            // 1 µs to 60 s at 3 significant digits; the bounds are constants, so this cannot fail.
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3)
                .unwrap_or_else(|_| Histogram::new(3).expect("3 sigfig")),
        }
    }

    /// Successful requests per second.
    pub fn requests_per_second(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Samples (rows) per second.
    pub fn samples_per_second(&self) -> f64 {
        self.requests_per_second() * self.rows as f64
    }

    /// The latency at `quantile` (0..=1), in µs.
    pub fn percentile_us(&self, quantile: f64) -> u64 {
        self.latency_us.value_at_quantile(quantile)
    }

    fn merge(&mut self, other: &Report) {
        self.ok += other.ok;
        self.errors += other.errors;
        let _ = self.latency_us.add(&other.latency_us);
    }
}

/// A closed-loop HTTP load: `concurrency` connections, each sending its next request as soon
/// as the previous one is answered.
#[derive(Debug, Clone)]
pub struct HttpLoad {
    /// The server.
    pub addr: SocketAddr,
    /// Request path, e.g. `/v2/models/fraud/infer`.
    pub path: String,
    /// Request body (OIP JSON).
    pub body: Bytes,
    /// Rows per request, for samples/s.
    pub rows: u64,
    /// Connections, each with one request in flight.
    pub concurrency: usize,
    /// Unmeasured time first, to warm caches, connections and the batcher.
    pub warmup: Duration,
    /// Measured time.
    pub duration: Duration,
}

/// Runs `load` and returns what it measured. Must run inside a tokio runtime.
pub async fn run_http(load: &HttpLoad) -> Result<Report, BenchError> {
    let start = Instant::now();
    let measure_from = start + load.warmup;
    let end = measure_from + load.duration;
    let total = Arc::new(Mutex::new(Report::new(load.rows)));
    let mut tasks = Vec::with_capacity(load.concurrency);
    for _ in 0..load.concurrency {
        let load = load.clone();
        let total = total.clone();
        tasks.push(tokio::spawn(async move {
            let report = connection_loop(&load, measure_from, end).await?;
            total
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .merge(&report);
            Ok::<(), BenchError>(())
        }));
    }
    for task in tasks {
        task.await
            .map_err(|e| BenchError::Server(e.to_string()))??;
    }
    let mut report = std::mem::replace(
        &mut *total.lock().unwrap_or_else(|p| p.into_inner()),
        Report::new(load.rows),
    );
    report.elapsed = load.duration;
    Ok(report)
}

async fn connection_loop(
    load: &HttpLoad,
    measure_from: Instant,
    end: Instant,
) -> Result<Report, BenchError> {
    let stream = tokio::net::TcpStream::connect(load.addr)
        .await
        .map_err(io_error(format!("connect to {}", load.addr)))?;
    stream
        .set_nodelay(true)
        .map_err(io_error("set TCP_NODELAY"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| BenchError::Server(format!("HTTP handshake: {e}")))?;
    tokio::spawn(connection);
    let mut report = Report::new(load.rows);
    let host = load.addr.to_string();
    loop {
        let sent = Instant::now();
        if sent >= end {
            break;
        }
        let request = Request::post(load.path.as_str())
            .header(hyper::header::HOST, host.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(load.body.clone()))
            .map_err(|e| BenchError::Server(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| BenchError::Server(format!("request failed: {e}")))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| BenchError::Server(format!("reading response: {e}")))?
            .to_bytes();
        if sent < measure_from {
            continue;
        }
        if status.is_success() {
            report.ok += 1;
            let _ = report
                .latency_us
                .record(sent.elapsed().as_micros().max(1) as u64);
        } else {
            report.errors += 1;
            if report.errors == 1 {
                tracing::warn!(%status, body = %String::from_utf8_lossy(&body), "server answered with an error");
            }
        }
    }
    Ok(report)
}

/// Calls the model in this process, one request after another, for `duration`: the bound a
/// server cannot beat for the same request stream.
pub fn run_in_process(
    session: &mut OnnxSession,
    inputs: &[Tensor],
    rows: u64,
    warmup: Duration,
    duration: Duration,
) -> Result<Report, BenchError> {
    let mut report = Report::new(rows);
    let warm_until = Instant::now() + warmup;
    while Instant::now() < warm_until {
        session
            .run(inputs)
            .map_err(|e| BenchError::Model(e.to_string()))?;
    }
    let start = Instant::now();
    while start.elapsed() < duration {
        let t = Instant::now();
        session
            .run(inputs)
            .map_err(|e| BenchError::Model(e.to_string()))?;
        report.ok += 1;
        let _ = report
            .latency_us
            .record(t.elapsed().as_micros().max(1) as u64);
    }
    report.elapsed = start.elapsed();
    Ok(report)
}

/// Deterministic FP32 input values in [-1, 1) (no RNG crate: a fixed LCG is enough here).
pub fn sample_values(count: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// An OIP JSON body with one FP32 input of shape `[rows, width]`.
pub fn fp32_request_body(input: &str, rows: usize, width: usize) -> Bytes {
    let values = sample_values(rows * width, 7);
    let body = serde_json::json!({
        "inputs": [{ "name": input, "shape": [rows, width], "datatype": "FP32", "data": values }]
    });
    Bytes::from(body.to_string())
}

fn fp32_tensor(input: &str, rows: usize, width: usize) -> Tensor {
    let data: Vec<u8> = sample_values(rows * width, 7)
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    Tensor {
        name: input.to_string(),
        datatype: DataType::Fp32,
        shape: vec![rows as i64, width as i64],
        data: Bytes::from(data),
    }
}

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

struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16, BenchError> {
    let socket =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(io_error("find a free port"))?;
    Ok(socket
        .local_addr()
        .map_err(io_error("find a free port"))?
        .port())
}

async fn start_server(config: &SuiteConfig) -> Result<(ServerProcess, SocketAddr), BenchError> {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let child = Command::new(&config.server_binary)
        .args(["serve", "--http", &addr.to_string(), "--model-repository"])
        .arg(&config.repository)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .map_err(io_error(format!(
            "start {}",
            config.server_binary.display()
        )))?;
    let server = ServerProcess(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if health_ok(addr).await {
            return Ok((server, addr));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(BenchError::Server(format!(
        "server on {addr} did not become ready in 30 s"
    )))
}

async fn health_ok(addr: SocketAddr) -> bool {
    let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let Ok((mut sender, connection)) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    else {
        return false;
    };
    tokio::spawn(connection);
    let Ok(request) = Request::get("/v2/health/ready")
        .header(hyper::header::HOST, addr.to_string())
        .body(Full::new(Bytes::new()))
    else {
        return false;
    };
    sender
        .send_request(request)
        .await
        .is_ok_and(|r| r.status().is_success())
}

fn load_session(repository: &Path, model: &str) -> Result<OnnxSession, BenchError> {
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

    let (_server, addr) = start_server(config).await?;
    for (model, input, width, concurrency) in [
        ("fraud", "features", 32, 1),
        ("fraud", "features", 32, 64),
        ("heavy", "input", 512, 64),
    ] {
        let load = HttpLoad {
            addr,
            path: format!("/v2/models/{model}/infer"),
            body: fp32_request_body(input, 1, width),
            rows: 1,
            concurrency,
            warmup: config.warmup,
            duration: config.duration,
        };
        let report = run_http(&load).await?;
        if report.errors > 0 {
            return Err(BenchError::Server(format!(
                "{} of the {model} requests failed",
                report.errors
            )));
        }
        rows.push(Row {
            label: format!("{model}  HTTP/1.1 JSON, batch-1 requests"),
            concurrency,
            report,
        });
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "meshserve bench suite: {cores} cores, closed loop, {} s per row after {} s warm-up; load generator on the same machine",
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
    let heavy_served = &rows[4].report;
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
