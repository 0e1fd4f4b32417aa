//! `meshserve-bench suite`: the single-node engine next to in-process ONNX Runtime.

use super::{
    BenchError, HttpLoad, Report, floor, fp32_request_body, fp32_tensor, io_error, run_http,
    run_in_process, start_floor, start_server,
};
use meshserve_host::model::repository::Repository;
use meshserve_host::model::session::OnnxSession;
use meshserve_host::model::tuning;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Settings of `meshserve-bench suite`.
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
    /// Rounds of each node-and-floor comparison, node and floor alternating, of which the
    /// median (by the compared figure) is shown: on a shared, noisy machine one pair of runs
    /// can be minutes apart in what the machine gives them.
    pub rounds: usize,
    /// Serve the models with their config.toml; without it (the default) the node gets only
    /// their `model.onnx` files, as a user's model arrives, and chooses its own settings.
    pub with_config: bool,
}

/// A repository holding only the latest `model.onnx` of each of `models`, no config.toml.
fn without_configs(repository: &Path, models: &[&str]) -> Result<tempfile::TempDir, BenchError> {
    let copy = tempfile::tempdir().map_err(io_error("create a repository"))?;
    let repo = Repository::new(repository);
    for model in models {
        let version = repo.versions(model).last().copied().ok_or_else(|| {
            BenchError::Model(format!("model '{model}' not in {}", repository.display()))
        })?;
        let folder = copy.path().join(model).join(version.to_string());
        std::fs::create_dir_all(&folder).map_err(io_error("create a model folder"))?;
        std::fs::copy(repo.model_path(model, version), folder.join("model.onnx"))
            .map_err(io_error("copy a model"))?;
    }
    Ok(copy)
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
    // The first of the sessions the node itself would load, with the threads it would choose.
    let (mut sessions, _) = tuning::load_sessions(
        runtime,
        &repo.model_path(model, version),
        &config,
        tuning::Machine::here(),
    )
    .map_err(|e| BenchError::Model(e.to_string()))?;
    Ok(sessions.swap_remove(0))
}

/// Roughly what an HTTP/1.1 request line and headers add to a body (for the ping-pong's sizes).
const HTTP_HEAD_BYTES: usize = 120;

/// The open-loop rows' offered rates: a light load, and about half what the node serves
/// closed-loop on the 2-core development machine, where the tail should still be short.
const OPEN_RATES: [f64; 2] = [10_000.0, 30_000.0];

/// One row of the suite's table.
struct Row {
    label: String,
    concurrency: usize,
    report: Report,
    /// The server process's CPU time per answered request (all its threads).
    server_cpu_us: Option<f64>,
}

/// Runs `load` against `server` and measures the server's CPU time per request over the
/// whole run (warm-up included, counted at the measured rate).
async fn measured(
    server: &super::ServerProcess,
    load: &HttpLoad,
) -> Result<(Report, Option<f64>), BenchError> {
    let (cpu_before, started) = (server.cpu_time(), std::time::Instant::now());
    let report = run_http(load).await?;
    let wall = started.elapsed().as_secs_f64();
    let cpu_us = match (cpu_before, server.cpu_time()) {
        (Some(before), Some(after)) => {
            let requests = report.requests_per_second() * wall;
            (requests > 0.0).then(|| (after - before).as_secs_f64() * 1e6 / requests)
        }
        _ => None,
    };
    Ok((report, cpu_us))
}

/// The figure a node-and-floor round is compared by: the node's p50 over the floor's, in µs,
/// at concurrency 1; its p99 over the floor's in the open loop; its req/s over the floor's
/// otherwise.
fn compared_figure(pace: super::Pace, concurrency: usize, node: &Report, floor: &Report) -> f64 {
    match pace {
        super::Pace::Open { .. } => {
            node.percentile_us(0.99) as f64 / floor.percentile_us(0.99).max(1) as f64
        }
        super::Pace::Closed if concurrency == 1 => {
            node.percentile_us(0.5) as f64 - floor.percentile_us(0.5) as f64
        }
        super::Pace::Closed => node.requests_per_second() / floor.requests_per_second().max(1e-9),
    }
}

/// The index of the round whose figure is the median; of an even count's two middles, the
/// one less favourable to the node (the lower when `higher_is_better`).
pub(crate) fn median_round(figures: &[f64], higher_is_better: bool) -> usize {
    let mut order: Vec<usize> = (0..figures.len()).collect();
    order.sort_by(|&a, &b| figures[a].total_cmp(&figures[b]));
    let middle = if higher_is_better {
        figures.len().saturating_sub(1) / 2
    } else {
        figures.len() / 2
    };
    order[middle.min(figures.len().saturating_sub(1))]
}

/// A node's report, or an error when a closed-loop run had failed requests: a ratio of
/// failures is no measurement. An open-loop run keeps them: past the node's capacity (30,000/s
/// is past it on a slower 2-core machine) admission refuses what it cannot answer in time,
/// which is the node working as designed, and the table shows the count beside the
/// latencies of the answered requests instead of the suite stopping without a table.
fn checked(report: Report, pace: super::Pace, model: &str) -> Result<Report, BenchError> {
    if report.errors > 0 && pace == super::Pace::Closed {
        return Err(BenchError::Server(format!(
            "{} of the {model} requests failed",
            report.errors
        )));
    }
    Ok(report)
}

/// Runs the suite of the single-node issue and returns the printed table.
pub async fn run_suite(config: &SuiteConfig) -> Result<String, BenchError> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let bare = if config.with_config {
        None
    } else {
        Some(without_configs(&config.repository, &["fraud", "heavy"])?)
    };
    let config = &SuiteConfig {
        repository: bare
            .as_ref()
            .map_or_else(|| config.repository.clone(), |dir| dir.path().to_path_buf()),
        ..config.clone()
    };
    let wrk = super::wrk::find();
    let mut rows = Vec::new();

    // The in-process limits first, with the machine quiet.
    let mut fraud = load_session(&config.repository, "fraud")?;
    let fraud_input = [fp32_tensor("features", 1, 32)];
    rows.push(Row {
        label: "fraud  in-process ORT, batch 1".into(),
        concurrency: 1,
        report: run_in_process(&mut fraud, &fraud_input, 1, config.warmup, config.duration)?,
        server_cpu_us: None,
    });
    drop(fraud);
    let mut heavy = load_session(&config.repository, "heavy")?;
    let heavy_input = [fp32_tensor("input", 1, 512)];
    rows.push(Row {
        label: "heavy  in-process ORT, batch 1".into(),
        concurrency: 1,
        report: run_in_process(&mut heavy, &heavy_input, 1, config.warmup, config.duration)?,
        server_cpu_us: None,
    });
    drop(heavy);
    // The node's own request path, without sockets or a second process.
    let router_path = run_router_in_process(
        &config.repository,
        "fraud",
        1,
        false,
        config.warmup,
        config.duration,
    )
    .await?;
    let fraud_body = fp32_request_body("features", 1, 32);

    // The kernel's floor under every HTTP row: the same exchange without HTTP or a runtime.
    let request_bytes = fraud_body.len() + HTTP_HEAD_BYTES;
    let ping_pong_row = rows.len();
    rows.push(Row {
        label: "loopback TCP ping-pong, no HTTP".into(),
        concurrency: 1,
        report: floor::loopback_ping_pong(
            request_bytes,
            floor::FIXED_RESPONSE.len() + HTTP_HEAD_BYTES,
            config.warmup,
            config.duration,
        )
        .map_err(io_error("loopback ping-pong"))?,
        server_cpu_us: None,
    });
    let router_row = rows.len();
    rows.push(Row {
        label: "fraud  HTTP router in process, no sockets".into(),
        concurrency: 1,
        report: router_path.report,
        server_cpu_us: None,
    });

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
    let open_labels = OPEN_RATES.map(|rate| format!("open loop {rate:.0}/s"));
    let open = |at: usize| super::Pace::Open {
        rate: OPEN_RATES[at],
    };
    // The same three loads on the node and on the floor, with the async runtime at its
    // default (a thread per core) and at one thread, so each ratio compares like with like.
    let fraud_loads = [
        (closed, 1, "HTTP/1.1 JSON, batch 1"),
        (closed, 64, "HTTP/1.1 JSON, batch 1"),
        (open(0), 256, open_labels[0].as_str()),
        (open(1), 256, open_labels[1].as_str()),
    ];
    let rounds = config.rounds.max(1);
    let mut pairs = Vec::new();
    for threads in [None, Some(1)] {
        let tag = match threads {
            None => String::new(),
            Some(n) => format!("{n} io thread, "),
        };
        let node_args = match threads {
            None => vec![],
            Some(n) => vec!["--io-threads".to_string(), n.to_string()],
        };
        let mut args: Vec<&std::ffi::OsStr> =
            vec!["--model-repository".as_ref(), config.repository.as_os_str()];
        args.extend(node_args.iter().map(std::ffi::OsStr::new));
        // Both servers up at once, the idle one costing nothing, so each round measures the
        // node and the floor within seconds of each other.
        let (server, addr) = start_server(&config.server_binary, &args).await?;
        // The floor: a bare hyper server answering a fixed OIP response, same load, same client.
        let (floor_server, floor_addr) = start_floor(threads).await?;
        let mut node_rows = Vec::new();
        let mut floor_rows = Vec::new();
        let mut round_ratios = Vec::new();
        for (pace, concurrency, what) in fraud_loads {
            let mut measured_rounds = Vec::with_capacity(rounds);
            for _ in 0..rounds {
                let node = measured(&server, &load(addr, "fraud", 32, pace, concurrency)).await?;
                let node = (checked(node.0, pace, "fraud")?, node.1);
                let floor = measured(
                    &floor_server,
                    &load(floor_addr, "fraud", 32, pace, concurrency),
                )
                .await?;
                measured_rounds.push((node, floor));
            }
            let mut ratios: Vec<f64> = measured_rounds
                .iter()
                .map(|((node, _), (floor, _))| compared_figure(pace, concurrency, node, floor))
                .collect();
            let median = median_round(&ratios, pace == closed && concurrency > 1);
            let ((node, node_cpu), (floor, floor_cpu)) = measured_rounds.swap_remove(median);
            ratios.sort_by(f64::total_cmp);
            round_ratios.push(ratios);
            node_rows.push(Row {
                label: format!("fraud  {tag}{what}"),
                concurrency,
                report: node,
                server_cpu_us: node_cpu,
            });
            let what = if pace == closed {
                "bare hyper, fixed response"
            } else {
                what
            };
            floor_rows.push(Row {
                label: format!("floor  {tag}{what}"),
                concurrency,
                report: floor,
                server_cpu_us: floor_cpu,
            });
        }
        // The concurrency-64 comparison again with wrk, node and floor alternating.
        let mut wrk_rounds = Vec::new();
        if let Some(wrk) = &wrk {
            let fraud_path = "/v2/models/fraud/infer";
            let body = fp32_request_body("features", 1, 32);
            for _ in 0..rounds {
                let run = |addr| {
                    super::wrk::closed_loop(wrk, addr, fraud_path, &body, 64, config.duration)
                };
                let node = run(addr).await?;
                if node.errors > 0 {
                    return Err(BenchError::Server(format!(
                        "{} of wrk's fraud requests failed",
                        node.errors
                    )));
                }
                let floor = run(floor_addr).await?;
                wrk_rounds.push((node.requests_per_second, floor.requests_per_second));
            }
        }
        drop(floor_server);
        // Heavy after fraud's rows, so its batches cannot linger into them.
        if threads.is_none() {
            let (report, server_cpu_us) =
                measured(&server, &load(addr, "heavy", 512, closed, 64)).await?;
            let report = checked(report, closed, "heavy")?;
            node_rows.push(Row {
                label: "heavy  HTTP/1.1 JSON, batch 1".into(),
                concurrency: 64,
                report,
                server_cpu_us,
            });
        }
        drop(server);
        let node_at = rows.len();
        rows.extend(node_rows);
        let floor_at = rows.len();
        rows.extend(floor_rows);
        pairs.push((threads, node_at, floor_at, round_ratios, wrk_rounds));
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "meshserve-bench suite: {cores} cores, closed loop unless said, {} s per row after {} s warm-up; load generator on the same machine; node and floor alternate, {rounds} rounds per comparison, the median round shown",
        config.duration.as_secs_f64(),
        config.warmup.as_secs_f64()
    );
    for line in super::machine::summary() {
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(
        out,
        "{:<50} {:>5} {:>9} {:>9} {:>8} {:>8} {:>10} {:>7}",
        "scenario", "conc", "req/s", "samples/s", "p50 µs", "p99 µs", "server CPU", "errors"
    );
    for row in &rows {
        let r = &row.report;
        let cpu = row
            .server_cpu_us
            .map_or_else(|| "-".to_string(), |us| format!("{us:.1} µs"));
        let _ = writeln!(
            out,
            "{:<50} {:>5} {:>9.0} {:>9.0} {:>8} {:>8} {:>10} {:>7}",
            row.label,
            row.concurrency,
            r.requests_per_second(),
            r.samples_per_second(),
            r.percentile_us(0.5),
            r.percentile_us(0.99),
            cpu,
            r.errors
        );
    }
    let fraud_raw = &rows[0].report;
    let heavy_raw = &rows[1].report;
    let ping_pong = &rows[ping_pong_row].report;
    for (threads, node, floor, round_ratios, wrk_rounds) in &pairs {
        let (node, floor) = (*node, *floor);
        let [fraud_c1, fraud_c64] = [node, node + 1].map(|i| &rows[i].report);
        let [floor_c1, floor_c64] = [floor, floor + 1].map(|i| &rows[i].report);
        let runtime = match threads {
            None => "a thread per core".to_string(),
            Some(n) => format!("{n} io thread"),
        };
        // Every round's figure, lowest first: how far one measurement can be trusted.
        let spread = |load: usize, decimals: usize| {
            round_ratios[load]
                .iter()
                .map(|r| format!("{r:.decimals$}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let _ = writeln!(
            out,
            "fraud / floor, {runtime}: req/s at concurrency 64 = {:.2}x (rounds: {}); p50 at concurrency 1 = {} vs {} µs (+{}; rounds: {} µs)",
            fraud_c64.requests_per_second() / floor_c64.requests_per_second().max(1e-9),
            spread(1, 2),
            fraud_c1.percentile_us(0.5),
            floor_c1.percentile_us(0.5),
            fraud_c1
                .percentile_us(0.5)
                .saturating_sub(floor_c1.percentile_us(0.5)),
            spread(0, 0),
        );
        for (at, rate) in OPEN_RATES.iter().enumerate() {
            let (fraud_open, floor_open) =
                (&rows[node + 2 + at].report, &rows[floor + 2 + at].report);
            let _ = writeln!(
                out,
                "fraud / floor, {runtime}: open-loop p99 at {rate:.0}/s = {:.2}x (rounds: {}; {} vs {} µs, {} and {} unanswered){}",
                fraud_open.percentile_us(0.99) as f64
                    / floor_open.percentile_us(0.99).max(1) as f64,
                spread(2 + at, 2),
                fraud_open.percentile_us(0.99),
                floor_open.percentile_us(0.99),
                fraud_open.unanswered,
                floor_open.unanswered,
                refused_note(fraud_open)
            );
        }
        if !wrk_rounds.is_empty() {
            let mut ratios: Vec<f64> = wrk_rounds
                .iter()
                .map(|(node, floor)| node / floor.max(1e-9))
                .collect();
            let (node_rps, floor_rps) = wrk_rounds[median_round(&ratios, true)];
            ratios.sort_by(f64::total_cmp);
            let shown: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
            let _ = writeln!(
                out,
                "wrk cross-check, {runtime}: req/s at concurrency 64 = {node_rps:.0} vs {floor_rps:.0} = {:.2}x (rounds: {})",
                node_rps / floor_rps.max(1e-9),
                shown.join(" ")
            );
        }
    }
    let (node, floor) = (pairs[0].1, pairs[0].2);
    let fraud_c1 = &rows[node].report;
    let _ = writeln!(
        out,
        "fraud: server-added p50 latency at concurrency 1 = {} µs (HTTP p50 {} µs − in-process p50 {} µs); of it the kernel's loopback round trip is {} µs and bare HTTP adds {} µs",
        fraud_c1
            .percentile_us(0.5)
            .saturating_sub(fraud_raw.percentile_us(0.5)),
        fraud_c1.percentile_us(0.5),
        fraud_raw.percentile_us(0.5),
        ping_pong.percentile_us(0.5),
        rows[floor]
            .report
            .percentile_us(0.5)
            .saturating_sub(ping_pong.percentile_us(0.5))
    );
    let cpu = |i: usize| rows[i].server_cpu_us.unwrap_or(f64::NAN);
    let ort_us = 1e6 / fraud_raw.requests_per_second().max(1e-9);
    let _ = writeln!(
        out,
        "fraud at concurrency 64, server CPU per request: node {:.1} µs, floor {:.1} µs, of the node's extra {:.1} µs the model call in process is {ort_us:.1} µs",
        cpu(node + 1),
        cpu(floor + 1),
        cpu(node + 1) - cpu(floor + 1),
    );
    let _ = writeln!(
        out,
        "{}",
        router_summary("fraud", &rows[router_row].report, router_path.mean_infer_us)
    );
    let heavy_served = &rows[node + 2 + OPEN_RATES.len()].report;
    let _ = writeln!(
        out,
        "heavy: served with dynamic batching / in-process single-request loop = {:.2}x samples/s",
        heavy_served.samples_per_second() / heavy_raw.samples_per_second().max(1e-9)
    );
    Ok(out)
}

/// What [`run_router_in_process`] measured.
pub struct RouterReport {
    /// Latency per request through the router.
    pub report: Report,
    /// Mean time in the model per request, as the engine reports it (`Server-Timing`).
    pub mean_infer_us: f64,
}

/// The node's request path without sockets: the HTTP router (routing, body, JSON decode,
/// dispatch, the model, encode, metrics) called in a loop on this thread, one request at a
/// time, with the node's default limits and a body generated from the model's metadata.
/// Minus the model's own time, what remains is what the node itself costs per request.
pub async fn run_router_in_process(
    repository: &Path,
    model: &str,
    rows: usize,
    binary: bool,
    warmup: Duration,
    duration: Duration,
) -> Result<RouterReport, BenchError> {
    use meshserve::dispatch::Dispatch;
    use meshserve::dispatch::timing::SERVER_TIMING;
    use meshserve::http::app::App;
    use meshserve::http::state::AppState;
    use meshserve_host::engine::{Engine, EngineConfig};

    let engine = Engine::new(
        &EngineConfig {
            repository: repository.to_path_buf(),
            onnxruntime_library: None,
        },
        std::sync::Arc::new(meshserve_host::metrics::Metrics::new()),
    )
    .map_err(|e| BenchError::Model(e.to_string()))?;
    let engine = std::sync::Arc::new(engine);
    engine
        .load(model)
        .map_err(|e| BenchError::Model(e.to_string()))?;
    let metadata = meshserve::dispatch::local_metadata(&engine, model, None)
        .map_err(|e| BenchError::Model(e.to_string()))?;
    let (body, headers) = meshserve::client::body::request_from_metadata(&metadata, rows, binary)?;
    let app = std::sync::Arc::new(App::new(AppState {
        dispatch: Dispatch::new(engine.clone(), None, None),
        bodies: meshserve::config::HttpConfig::default().body_limits(),
        admin: meshserve::http::admin::AdminAccess::LoopbackOnly,
    }));
    let path = format!("/v2/models/{model}/infer");
    let peer = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    // One request; returns the model's time from the answer's `Server-Timing`, in µs.
    let call = || {
        let mut request = http::Request::post(path.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::CONTENT_LENGTH, body.len())
            .body(axum::body::Body::from(body.clone()));
        if let Ok(request) = &mut request {
            request.headers_mut().extend(headers.clone());
        }
        let app = app.clone();
        async move {
            let request = request.map_err(|e| BenchError::Server(e.to_string()))?;
            let response = app.serve(request, peer).await;
            let status = response.status();
            let infer_us = response
                .headers()
                .get(SERVER_TIMING)
                .and_then(|v| v.to_str().ok())
                .and_then(infer_ms)
                .map_or(0.0, |ms| ms * 1e3);
            let answer = http_body_util::BodyExt::collect(response.into_body())
                .await
                .map_err(|e| BenchError::Server(e.to_string()))?;
            if status != http::StatusCode::OK {
                return Err(BenchError::Server(format!(
                    "the router answered {status}: {}",
                    String::from_utf8_lossy(&answer.to_bytes())
                )));
            }
            Ok(infer_us)
        }
    };
    let mut report = Report::new(rows as u64);
    let warm_until = std::time::Instant::now() + warmup;
    while std::time::Instant::now() < warm_until {
        call().await?;
    }
    let mut infer_us = 0.0;
    let start = std::time::Instant::now();
    while start.elapsed() < duration {
        let t = std::time::Instant::now();
        infer_us += call().await?;
        report.ok += 1;
        let _ = report
            .latency_us
            .record(t.elapsed().as_micros().max(1) as u64);
    }
    report.elapsed = start.elapsed();
    tokio::task::spawn_blocking(move || engine.shutdown())
        .await
        .map_err(|e| BenchError::Server(e.to_string()))?;
    Ok(RouterReport {
        mean_infer_us: infer_us / report.ok.max(1) as f64,
        report,
    })
}

/// The `infer` stage of a `Server-Timing` value, in ms.
fn infer_ms(timing: &str) -> Option<f64> {
    timing
        .split(',')
        .map(str::trim)
        .find_map(|part| part.strip_prefix("infer;dur="))
        .and_then(|rest| rest.split(';').next())
        .and_then(|ms| ms.parse().ok())
}

/// What an open-loop row's p99 leaves out: the requests the node refused (past its capacity
/// admission answers 503 at once, and those answers are not latencies); empty when none was.
fn refused_note(report: &Report) -> String {
    if report.errors == 0 {
        return String::new();
    }
    let offered = report.ok + report.errors + report.unanswered;
    format!(
        "; past the node's capacity: it refused {} of {offered} requests ({:.1}%), and the p99 is of those it answered",
        report.errors,
        100.0 * report.errors as f64 / offered.max(1) as f64
    )
}

/// The per-request summary line of a router run: its latencies and the model's mean time.
pub fn router_summary(model: &str, report: &Report, mean_infer_us: f64) -> String {
    let mean = 1e6 / report.requests_per_second().max(1e-9);
    format!(
        "{model} through the router in process, per request: {mean:.1} µs mean (p50 {} µs, p99 {} µs), of which the model {:.1} µs: the node's own work is {:.1} µs",
        report.percentile_us(0.5),
        report.percentile_us(0.99),
        mean_infer_us,
        mean - mean_infer_us,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_round_is_the_middle_figure_or_the_less_favourable_middle_of_an_even_count() {
        assert_eq!(median_round(&[0.71], true), 0);
        assert_eq!(median_round(&[0.75, 0.65, 0.70], true), 2);
        assert_eq!(median_round(&[0.75, 0.65, 0.70], false), 2);
        // Of two middles, the one less favourable to the node: the lower throughput ratio,
        // the higher latency ratio.
        assert_eq!(median_round(&[0.9, 0.6, 0.8, 0.7], true), 3);
        assert_eq!(median_round(&[0.9, 0.6, 0.8, 0.7], false), 2);
        // A round that failed to measure (NaN) sorts last instead of panicking.
        assert_eq!(median_round(&[f64::NAN, 0.5, 0.6], true), 2);
    }

    #[test]
    fn refusals_fail_a_closed_loop_row_but_are_counted_in_an_open_loop_row() {
        let refused = || {
            let mut report = Report::new(1);
            report.ok = 900;
            report.errors = 100;
            report
        };
        let open = super::super::Pace::Open { rate: 30_000.0 };
        let closed = super::super::Pace::Closed;
        assert!(checked(refused(), closed, "fraud").is_err());
        let kept = checked(refused(), open, "fraud").expect("an open-loop row keeps its refusals");
        assert_eq!(kept.errors, 100);
        let note = refused_note(&kept);
        assert!(
            note.contains("refused 100 of 1000 requests (10.0%)"),
            "{note}"
        );
        assert_eq!(refused_note(&Report::new(1)), "");
    }

    #[test]
    fn infer_ms_reads_the_infer_stage_of_server_timing() {
        let timing = r#"queue;dur=0.000, infer;dur=0.012;desc="batch 1", total;dur=0.030"#;
        assert_eq!(infer_ms(timing), Some(0.012));
        assert_eq!(infer_ms("total;dur=1.000"), None);
    }

    #[tokio::test]
    async fn the_router_path_answers_every_request_and_splits_off_the_model_time() {
        let repository = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models");
        let measured = run_router_in_process(
            &repository,
            "fraud",
            2,
            false,
            Duration::ZERO,
            Duration::from_millis(200),
        )
        .await
        .unwrap();
        assert!(measured.report.ok > 10, "{} requests", measured.report.ok);
        assert_eq!(measured.report.latency_us.len(), measured.report.ok);
        let mean_us = 1e6 / measured.report.requests_per_second();
        assert!(
            measured.mean_infer_us > 0.0 && measured.mean_infer_us < mean_us,
            "model {} µs of {mean_us} µs",
            measured.mean_infer_us
        );
        let line = router_summary("fraud", &measured.report, measured.mean_infer_us);
        assert!(line.contains("the node's own work is"), "{line}");
    }
}
