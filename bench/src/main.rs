//! `meshserve-bench`: the load generator and the benchmark suites, with their options. The
//! suites start nodes from the `meshserve` binary beside this one.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use meshserve_bench::mesh::MeshSuiteConfig;
use meshserve_bench::plot::{SweepPoint, latency_svg};
use meshserve_bench::plugins::PluginSuiteConfig;
use meshserve_bench::suite::SuiteConfig;
use meshserve_bench::{self as bench, HttpLoad, Protocol};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

// The load generator allocates per request across threads, as the node does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "meshserve-bench",
    version,
    about = "Load generator and benchmarks for meshserve and any OIP server"
)]
struct Cli {
    #[command(subcommand)]
    command: BenchCommand,
}

fn main() -> std::process::ExitCode {
    meshserve::process::init_logging();
    match run_bench(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshserve-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The `meshserve` binary the suites start nodes from: the one built beside this binary.
fn node_binary() -> Result<PathBuf> {
    let bench = std::env::current_exe().context("cannot find this binary")?;
    let node = bench.with_file_name(format!("meshserve{}", std::env::consts::EXE_SUFFIX));
    anyhow::ensure!(
        node.is_file(),
        "the suites start nodes from {}, which is missing: build it with `cargo build --release -p meshserve`",
        node.display()
    );
    Ok(node)
}

fn multi_thread_runtime(threads: Option<usize>, name: &str) -> Result<tokio::runtime::Runtime> {
    meshserve::process::multi_thread_runtime(threads, name)
        .context("cannot start the async runtime")
}

fn current_thread_runtime() -> Result<tokio::runtime::Runtime> {
    meshserve::process::current_thread_runtime().context("cannot start the async runtime")
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Start a node (the `meshserve` binary beside this one) and measure it next to
    /// in-process ONNX Runtime.
    Suite {
        /// Repository holding the `fraud` and `heavy` models.
        #[arg(long, default_value = "examples/models")]
        model_repository: PathBuf,
        /// Measured seconds per scenario.
        #[arg(long, default_value_t = 5.0)]
        duration_secs: f64,
        /// Warm-up seconds before each scenario.
        #[arg(long, default_value_t = 1.0)]
        warmup_secs: f64,
        /// Rounds of each node-and-floor comparison, node and floor alternating; the median
        /// round is shown.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=20))]
        rounds: u16,
        /// Serve the models with their config.toml (default: their model.onnx files alone,
        /// as a user's model arrives, with the settings the node chooses).
        #[arg(long)]
        with_config: bool,
    },
    /// Measure the node's own request path in process, without sockets: routing, body, JSON
    /// decode, the model, encode and metrics, one request at a time (`perf record` it to see
    /// where a request's time goes).
    Router {
        /// Repository holding the model.
        #[arg(long, default_value = "examples/models")]
        model_repository: PathBuf,
        /// Model to call, with a body generated from its metadata.
        #[arg(long, default_value = "fraud")]
        model: String,
        /// Rows per request.
        #[arg(long, default_value_t = 1)]
        rows: usize,
        /// Binary tensors instead of JSON data.
        #[arg(long)]
        binary: bool,
        /// Measured seconds.
        #[arg(long, default_value_t = 5.0)]
        duration_secs: f64,
        /// Warm-up seconds.
        #[arg(long, default_value_t = 1.0)]
        warmup_secs: f64,
    },
    /// Measure plugin overhead: per call in process, and served with and without plugins.
    Plugins {
        /// Repository holding the `fraud` model.
        #[arg(long, default_value = "examples/models")]
        model_repository: PathBuf,
        /// Folder of the built plugins.
        #[arg(long, default_value = "plugins/target/wasm32-wasip2/release")]
        plugins: PathBuf,
        /// The Python plugin to time (skipped when missing).
        #[arg(long, default_value = "plugins/target/python/labels.wasm")]
        python_plugin: PathBuf,
        /// Feature table of the fraud-check endpoint.
        #[arg(long, default_value = "examples/models/fraud-check/cards.csv")]
        cards: PathBuf,
        /// Measured seconds per scenario.
        #[arg(long, default_value_t = 5.0)]
        duration_secs: f64,
        /// Warm-up seconds before each scenario.
        #[arg(long, default_value_t = 1.0)]
        warmup_secs: f64,
    },
    /// Start a node and compare HTTP/1.1, HTTP/1.1 over TLS, HTTP/2 and HTTP/3 in one run.
    Protocols {
        /// Repository holding the `fraud` model.
        #[arg(long, default_value = "examples/models")]
        model_repository: PathBuf,
        /// Measured seconds per row.
        #[arg(long, default_value_t = 5.0)]
        duration_secs: f64,
        /// Warm-up seconds before each row.
        #[arg(long, default_value_t = 1.0)]
        warmup_secs: f64,
    },
    /// Start a 3-node mesh on loopback and compare direct, forwarded and route-aware requests.
    Mesh {
        /// Repository holding the `fraud` model (copied for each node).
        #[arg(long, default_value = "examples/models")]
        model_repository: PathBuf,
        /// Concurrent requests.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Measured seconds per scenario.
        #[arg(long, default_value_t = 5.0)]
        duration_secs: f64,
        /// Warm-up seconds before each scenario.
        #[arg(long, default_value_t = 1.0)]
        warmup_secs: f64,
    },
    /// Start a 3-node mesh where `heavy` takes 80% of the requests, and compare it on one
    /// fixed replica with a replica count that follows load (1 to 3).
    Skew {
        /// Repository holding `heavy` and `fraud` (copied for each node).
        #[arg(long, default_value = "examples/models")]
        model_repository: PathBuf,
        /// `heavy` clients per node (and a quarter as many `fraud` clients, at least one).
        #[arg(long, default_value_t = 8)]
        heavy_clients: usize,
        /// Measured seconds per setting.
        #[arg(long, default_value_t = 10.0)]
        duration_secs: f64,
        /// Seconds of load before measuring, for the replica count to follow it.
        #[arg(long, default_value_t = 10.0)]
        warmup_secs: f64,
    },
    /// Start a node serving examples/recsys and measure its recommend endpoint next to the
    /// ranking model in process.
    Recsys {
        /// The example's folder.
        #[arg(long, default_value = "examples/recsys")]
        example: PathBuf,
        /// Candidate items per request.
        #[arg(long, default_value_t = 100)]
        candidates: usize,
        /// Measured seconds per row.
        #[arg(long, default_value_t = 5.0)]
        duration_secs: f64,
        /// Warm-up seconds before each row.
        #[arg(long, default_value_t = 1.0)]
        warmup_secs: f64,
    },
    /// Simulate membership and placement of many nodes on virtual time (no sockets), then the
    /// load-following replica policy over as many nodes, with the crash detection time the
    /// membership simulation measured.
    Simulate {
        /// Nodes in the simulated mesh.
        #[arg(long, default_value_t = 100)]
        nodes: usize,
        /// Load-following models in the replica policy simulation.
        #[arg(long, default_value_t = 1000)]
        models: usize,
        /// Seed of the simulation's random choices and latencies.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// HTTP load against a running node or any OIP server (Triton, KServe): closed loop
    /// (--concurrency), open loop (--rate, latency from each request's due time), or an
    /// open-loop sweep over rates (--rates) that finds the highest rate meeting a p99 target.
    Http(HttpBenchArgs),
    /// Serve the floor: a bare hyper server answering a fixed OIP response, for comparisons
    /// (`bench suite` starts it itself).
    #[command(hide = true)]
    FloorServer {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
        /// Async runtime threads, as `serve --io-threads`; default: one per core.
        #[arg(long, value_name = "N")]
        io_threads: Option<usize>,
    },
}

#[derive(Args)]
struct HttpBenchArgs {
    /// The server (its UDP address for HTTP/3).
    #[arg(long, default_value = "127.0.0.1:8000")]
    addr: SocketAddr,
    /// h1 (HTTP/1.1), h2 (HTTP/2: h2c, or TLS with --tls), h3 (HTTP/3, always TLS) or grpc
    /// (the OIP over gRPC, unary, on HTTP/2).
    #[arg(long, value_enum, default_value_t = ProtocolArg::H1)]
    protocol: ProtocolArg,
    /// With grpc: each concurrent caller sends its requests one after another over its own
    /// ModelStreamInfer stream, instead of unary calls.
    #[arg(long)]
    stream: bool,
    /// Speak TLS over TCP (h1 and h2).
    #[arg(long)]
    tls: bool,
    /// CA certificate that signed the server's certificate (TLS and h3).
    #[arg(long, default_value = "certs/ca.pem")]
    ca: PathBuf,
    /// Connections the concurrent requests share (h2 and h3; h1 opens one per request).
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Model to call (the path is /v2/models/MODEL/infer unless --path says otherwise).
    #[arg(long, default_value = "fraud")]
    model: String,
    /// Request path, instead of the model's infer route (e.g. an endpoint's invocations).
    #[arg(long)]
    path: Option<String>,
    /// Request body from this file (sent as it is); default: generated from the model's
    /// metadata (GET /v2/models/MODEL), `--rows` rows of deterministic values.
    #[arg(long)]
    body: Option<PathBuf>,
    /// Generated bodies use the OIP binary tensor extension instead of JSON data.
    #[arg(long)]
    binary: bool,
    /// Extra request header, `NAME: VALUE` (repeatable).
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// Rows per generated request.
    #[arg(long, default_value_t = 1)]
    rows: usize,
    /// Requests in flight at most (closed loop: exactly).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Open loop at this many requests per second.
    #[arg(long)]
    rate: Option<f64>,
    /// Open-loop sweep over these rates, e.g. 5000,10000,20000,40000.
    #[arg(long, value_delimiter = ',')]
    rates: Vec<f64>,
    /// p99 target in µs: the sweep reports the highest rate that meets it.
    #[arg(long)]
    p99_target_us: Option<u64>,
    /// Write an SVG plot of p50/p99/p99.9 against offered rate (sweeps).
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 10.0)]
    duration_secs: f64,
    /// Unmeasured seconds before each run.
    #[arg(long, default_value_t = 1.0)]
    warmup_secs: f64,
    /// Load generator threads. One leaves the rest of the machine to a server on the same
    /// host; one thread sends about 120,000 small requests a second on the development VM,
    /// so a remote server with more cores than that needs more.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ProtocolArg {
    H1,
    H2,
    H3,
    /// The OIP over gRPC: unary ModelInfer on HTTP/2 (h2c, or TLS with --tls).
    Grpc,
}

fn run_bench(kind: BenchCommand) -> Result<()> {
    // The load generator gets one thread unless `bench http --threads` asks for more, so the
    // node under test keeps the rest of the machine.
    let runtime = current_thread_runtime()?;
    match kind {
        BenchCommand::Suite {
            model_repository,
            duration_secs,
            warmup_secs,
            rounds,
            with_config,
        } => {
            let config = SuiteConfig {
                server_binary: node_binary()?,
                repository: model_repository,
                duration: Duration::from_secs_f64(duration_secs),
                warmup: Duration::from_secs_f64(warmup_secs),
                rounds: usize::from(rounds),
                with_config,
            };
            let table = runtime.block_on(bench::suite::run_suite(&config))?;
            print!("{table}");
        }
        BenchCommand::Plugins {
            model_repository,
            plugins,
            python_plugin,
            cards,
            duration_secs,
            warmup_secs,
        } => {
            let config = PluginSuiteConfig {
                server_binary: node_binary()?,
                repository: std::fs::canonicalize(&model_repository)
                    .with_context(|| format!("model repository {}", model_repository.display()))?,
                plugins: std::fs::canonicalize(&plugins).with_context(|| {
                    format!(
                        "plugin folder {} (run scripts/build-plugins.sh)",
                        plugins.display()
                    )
                })?,
                python_plugin: std::fs::canonicalize(&python_plugin).ok(),
                cards: std::fs::canonicalize(&cards)
                    .with_context(|| format!("feature table {}", cards.display()))?,
                duration: Duration::from_secs_f64(duration_secs),
                warmup: Duration::from_secs_f64(warmup_secs),
            };
            let report = runtime.block_on(bench::plugins::run_plugin_suite(&config))?;
            print!("{report}");
        }
        BenchCommand::Router {
            model_repository,
            model,
            rows,
            binary,
            duration_secs,
            warmup_secs,
        } => {
            let measured = runtime.block_on(bench::suite::run_router_in_process(
                &model_repository,
                &model,
                rows.clamp(1, 1 << 16),
                binary,
                Duration::from_secs_f64(warmup_secs),
                Duration::from_secs_f64(duration_secs),
            ))?;
            println!(
                "{}",
                bench::suite::router_summary(&model, &measured.report, measured.mean_infer_us)
            );
        }
        BenchCommand::Protocols {
            model_repository,
            duration_secs,
            warmup_secs,
        } => {
            let config = bench::protocols::ProtocolSuiteConfig {
                server_binary: node_binary()?,
                repository: std::fs::canonicalize(&model_repository)
                    .with_context(|| format!("model repository {}", model_repository.display()))?,
                duration: Duration::from_secs_f64(duration_secs),
                warmup: Duration::from_secs_f64(warmup_secs),
            };
            let table = runtime.block_on(bench::protocols::run_protocol_suite(&config))?;
            print!("{table}");
        }
        BenchCommand::Recsys {
            example,
            candidates,
            duration_secs,
            warmup_secs,
        } => {
            let config = bench::recsys::RecsysBenchConfig {
                server_binary: node_binary()?,
                example: std::fs::canonicalize(&example)
                    .with_context(|| format!("example folder {}", example.display()))?,
                candidates: candidates.clamp(1, 1000),
                duration: Duration::from_secs_f64(duration_secs),
                warmup: Duration::from_secs_f64(warmup_secs),
            };
            let table = runtime.block_on(bench::recsys::run_recsys(&config))?;
            print!("{table}");
        }
        BenchCommand::Mesh {
            model_repository,
            concurrency,
            duration_secs,
            warmup_secs,
        } => {
            let config = MeshSuiteConfig {
                server_binary: node_binary()?,
                repository: std::fs::canonicalize(&model_repository)
                    .with_context(|| format!("model repository {}", model_repository.display()))?,
                concurrency,
                duration: Duration::from_secs_f64(duration_secs),
                warmup: Duration::from_secs_f64(warmup_secs),
            };
            let table = runtime.block_on(bench::mesh::run_mesh_suite(&config))?;
            print!("{table}");
        }
        BenchCommand::Skew {
            model_repository,
            heavy_clients,
            duration_secs,
            warmup_secs,
        } => {
            let config = bench::skew::SkewConfig {
                server_binary: node_binary()?,
                repository: std::fs::canonicalize(&model_repository)
                    .with_context(|| format!("model repository {}", model_repository.display()))?,
                heavy_clients,
                duration: Duration::from_secs_f64(duration_secs),
                warmup: Duration::from_secs_f64(warmup_secs),
            };
            let table = runtime.block_on(bench::skew::run_skew(&config))?;
            print!("{table}");
        }
        BenchCommand::Simulate {
            nodes,
            models,
            seed,
        } => {
            let started = std::time::Instant::now();
            let report = meshserve::membership::sim::run_scenario(
                nodes,
                meshserve::membership::DetectorConfig::default(),
                seed,
            );
            print!("{report}");
            println!(
                "  (simulated in {:.1} s of real time)",
                started.elapsed().as_secs_f64()
            );
            let started = std::time::Instant::now();
            let detection = report
                .crash_detected_everywhere
                .context("the membership simulation never detected the crash")?;
            let replicas = meshserve::placement::sim::run(nodes, models, detection, seed);
            print!("{replicas}");
            println!(
                "  (simulated in {:.1} s of real time)",
                started.elapsed().as_secs_f64()
            );
        }
        BenchCommand::Http(args) if args.threads > 1 => {
            multi_thread_runtime(Some(args.threads.into()), "meshserve-load")?
                .block_on(bench_http(args))?
        }
        BenchCommand::Http(args) => runtime.block_on(bench_http(args))?,
        BenchCommand::FloorServer { listen, io_threads } => {
            // The node's runtime, so a comparison at the same thread count is like for like.
            let floor_runtime =
                multi_thread_runtime(io_threads.map(|n| n.max(1)), "meshserve-floor")?;
            floor_runtime.block_on(async {
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("cannot listen on {listen}"))?;
                eprintln!("floor server on http://{listen}");
                bench::floor::serve(listener, bench::floor::FloorConfig::default()).await;
                Ok::<(), anyhow::Error>(())
            })?
        }
    }
    Ok(())
}

/// `meshserve-bench http`: one closed- or open-loop run, or an open-loop sweep over rates.
async fn bench_http(args: HttpBenchArgs) -> Result<()> {
    // HTTP/2's TLS (ALPN h2), for REST and gRPC alike.
    let h2_tls = || {
        args.tls
            .then(|| bench::tls_client(&args.ca, b"h2"))
            .transpose()
    };
    let protocol = match (args.protocol, args.tls) {
        (ProtocolArg::H1, false) => Protocol::Http1,
        (ProtocolArg::H1, true) => Protocol::Http1Tls(bench::tls_client(&args.ca, b"http/1.1")?),
        (ProtocolArg::H2, _) => Protocol::Http2 {
            connections: args.connections,
            tls: h2_tls()?,
        },
        (ProtocolArg::Grpc, _) => Protocol::Grpc {
            connections: args.connections,
            tls: h2_tls()?,
            stream: args.stream,
        },
        (ProtocolArg::H3, _) => Protocol::Http3 {
            connections: args.connections,
            roots: meshserve::pem::read_certs(&args.ca)
                .with_context(|| format!("CA certificate {}", args.ca.display()))?,
        },
    };
    if args.stream && args.protocol != ProtocolArg::Grpc {
        anyhow::bail!("--stream is a gRPC call: use it with --protocol grpc");
    }
    let mut headers = hyper::HeaderMap::new();
    for header in &args.headers {
        let (name, value) = header
            .split_once(':')
            .with_context(|| format!("header '{header}' is not NAME: VALUE"))?;
        headers.append(
            hyper::header::HeaderName::from_bytes(name.trim().as_bytes())
                .with_context(|| format!("header name in '{header}'"))?,
            hyper::header::HeaderValue::from_str(value.trim())
                .with_context(|| format!("header value in '{header}'"))?,
        );
    }
    let mut load = HttpLoad {
        addr: args.addr,
        protocol,
        path: args
            .path
            .clone()
            .unwrap_or_else(|| format!("/v2/models/{}/infer", args.model)),
        body: bytes::Bytes::new(),
        headers,
        pace: bench::Pace::Closed,
        rows: args.rows as u64,
        concurrency: args.concurrency.max(1),
        warmup: Duration::from_secs_f64(args.warmup_secs),
        duration: Duration::from_secs_f64(args.duration_secs),
    };
    match &args.body {
        Some(path) => {
            load.body = std::fs::read(path)
                .with_context(|| format!("request body {}", path.display()))?
                .into();
        }
        None => {
            let metadata = bench::get_json(&load, &format!("/v2/models/{}", args.model))
                .await
                .with_context(|| {
                    format!("metadata of model '{}' (or give --body FILE)", args.model)
                })?;
            let (body, generated) = meshserve::client::body::request_from_metadata(
                &metadata,
                args.rows.max(1),
                args.binary,
            )?;
            load.body = body;
            for (name, value) in &generated {
                load.headers.entry(name).or_insert(value.clone());
            }
        }
    }
    if matches!(load.protocol, Protocol::Grpc { .. }) {
        // The same tensors as one ModelInferRequest, on the call's path.
        load.body = bench::grpc_infer_body(&args.model, &load.body)?;
        load.path = if args.stream {
            bench::grpc_stream::GRPC_STREAM_PATH
        } else {
            bench::GRPC_INFER_PATH
        }
        .to_string();
    }
    let label = format!("{:?}", load.protocol);
    let rates: Vec<f64> = match (&args.rates[..], args.rate) {
        ([], None) => Vec::new(),
        ([], Some(rate)) => vec![rate],
        (rates, _) => rates.to_vec(),
    };
    let mut results = Vec::new();
    if rates.is_empty() {
        let report = with_progress(&load, bench::run_http(&load)).await?;
        results.push(("closed".to_string(), report));
    }
    for rate in &rates {
        load.pace = bench::Pace::Open { rate: *rate };
        if !args.json {
            eprintln!(
                "open loop at {rate:.0} req/s for {} s ...",
                load.duration.as_secs_f64()
            );
        }
        let report = with_progress(&load, bench::run_http(&load)).await?;
        results.push((format!("{rate:.0}/s"), report));
    }
    let points: Vec<SweepPoint> = results
        .iter()
        .filter_map(|(_, r)| {
            Some(SweepPoint {
                rate: r.offered_rate?,
                p50_us: r.percentile_us(0.5),
                p99_us: r.percentile_us(0.99),
                p999_us: r.percentile_us(0.999),
            })
        })
        .collect();
    let best = args.p99_target_us.and_then(|target| {
        points
            .iter()
            .filter(|p| p.p99_us <= target)
            .map(|p| p.rate)
            .fold(None, |best: Option<f64>, rate| {
                Some(best.map_or(rate, |b| b.max(rate)))
            })
    });
    if args.json {
        let runs: Vec<serde_json::Value> = results
            .iter()
            .map(|(pace, r)| {
                serde_json::json!({
                    "pace": pace,
                    "offered_rate": r.offered_rate,
                    "concurrency": load.concurrency,
                    "requests_per_second": r.requests_per_second(),
                    "samples_per_second": r.samples_per_second(),
                    "ok": r.ok,
                    "errors": r.errors,
                    "unanswered": r.unanswered,
                    "latency_us": {
                        "p50": r.percentile_us(0.5),
                        "p90": r.percentile_us(0.9),
                        "p99": r.percentile_us(0.99),
                        "p999": r.percentile_us(0.999),
                        "max": r.latency_us.max(),
                    },
                })
            })
            .collect();
        let out = serde_json::json!({
            "target": args.addr.to_string(),
            "path": load.path,
            "protocol": label,
            "runs": runs,
            "p99_target_us": args.p99_target_us,
            "highest_rate_meeting_target": best,
            "idle_cpus": bench::machine::idle_cpus(),
            "freed_memory": bench::machine::freed_memory(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{} over {label}, {} s per run{}",
            load.path,
            load.duration.as_secs_f64(),
            if rates.is_empty() {
                format!(", closed loop, concurrency {}", load.concurrency)
            } else {
                format!(", open loop, at most {} in flight", load.concurrency)
            }
        );
        for line in bench::machine::summary() {
            println!("{line}");
        }
        println!(
            "{:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>10} {:>7} {:>10}",
            "offered",
            "req/s",
            "samples/s",
            "p50 µs",
            "p90 µs",
            "p99 µs",
            "p99.9 µs",
            "errors",
            "unanswered"
        );
        for (pace, r) in &results {
            println!(
                "{:>10} {:>10.0} {:>10.0} {:>9} {:>9} {:>9} {:>10} {:>7} {:>10}",
                pace,
                r.requests_per_second(),
                r.samples_per_second(),
                r.percentile_us(0.5),
                r.percentile_us(0.9),
                r.percentile_us(0.99),
                r.percentile_us(0.999),
                r.errors,
                r.unanswered
            );
        }
        if let Some(target) = args.p99_target_us {
            match best {
                Some(rate) => println!("highest rate meeting p99 <= {target} µs: {rate:.0} req/s"),
                None => println!("no rate met p99 <= {target} µs"),
            }
        }
    }
    if let Some(path) = &args.svg {
        let title = format!("{} over {label}", load.path);
        std::fs::write(path, latency_svg(&title, &points, args.p99_target_us))
            .with_context(|| format!("cannot write {}", path.display()))?;
        if !args.json {
            println!("plot: {}", path.display());
        }
    }
    Ok(())
}

/// Runs `run`, showing the time gone on a terminal's stderr for runs of 10 s or more.
async fn with_progress<T>(load: &HttpLoad, run: impl std::future::Future<Output = T>) -> T {
    let total = load.warmup + load.duration;
    if total < Duration::from_secs(10) || !std::io::stderr().is_terminal() {
        return run.await;
    }
    let started = std::time::Instant::now();
    let ticker = tokio::spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        loop {
            ticks.tick().await;
            let gone = started.elapsed().min(total);
            eprint!(
                "\r  {:>4.0} s of {:.0} s",
                gone.as_secs_f64(),
                total.as_secs_f64()
            );
        }
    });
    let result = run.await;
    ticker.abort();
    eprintln!();
    result
}
