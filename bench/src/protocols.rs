//! `meshserve-bench protocols`: one node, one model, the same closed-loop load over HTTP/1.1,
//! HTTP/1.1 over TLS, HTTP/2 (h2c and TLS) and HTTP/3, in one run, so the ratios between them
//! hold for one machine state.
//!
//! Two nodes are started one after the other from the same binary and repository, both
//! serving HTTP/3: the first with plain TCP (HTTP/1.1, h2c), the second with TLS on TCP.

use super::{BenchError, HttpLoad, Protocol, Report, ServerProcess, fp32_request_body, io_error};
use meshserve::client::http3::{Http3Client, Http3ClientConfig};
use meshserve::transport::certs::MeshCa;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Settings of `meshserve-bench protocols`.
#[derive(Debug, Clone)]
pub struct ProtocolSuiteConfig {
    /// The `meshserve` binary to start as the server.
    pub server_binary: PathBuf,
    /// The model repository (must hold `fraud`).
    pub repository: PathBuf,
    /// Measured time per row.
    pub duration: Duration,
    /// Unmeasured time before each row.
    pub warmup: Duration,
}

/// A port free for both TCP and UDP on loopback.
fn free_port() -> Result<u16, BenchError> {
    for _ in 0..32 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").map_err(io_error("find a port"))?;
        let port = tcp.local_addr().map_err(io_error("find a port"))?.port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(BenchError::Server("no free port for TCP and UDP".into()))
}

/// Starts a node with `config` (TOML) and waits until it answers health over HTTP/3.
async fn start_node(
    binary: &Path,
    dir: &Path,
    name: &str,
    config: &str,
    h3: SocketAddr,
) -> Result<ServerProcess, BenchError> {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).map_err(io_error(format!("write {}", path.display())))?;
    let child = Command::new(binary)
        .args(["serve", "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .map_err(io_error(format!("start {}", binary.display())))?;
    let server = ServerProcess(child);
    let mut probe = Http3ClientConfig::new(vec![h3], &dir.join("ca.pem"))
        .map_err(|e| BenchError::Server(e.to_string()))?;
    probe.timeout = Duration::from_millis(500);
    let probe = Http3Client::new(probe).map_err(|e| BenchError::Server(e.to_string()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let ready = probe
            .request(
                h3,
                http::Method::GET,
                "/v2/health/ready",
                Default::default(),
                Default::default(),
            )
            .await;
        if ready.is_ok_and(|r| r.status.is_success()) {
            return Ok(server);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(BenchError::Server(format!(
        "node {name} did not become ready in 30 s"
    )))
}

struct Row {
    label: String,
    concurrency: usize,
    report: Report,
}

/// Runs the comparison and returns the printed table with the ratios.
pub async fn run_protocol_suite(config: &ProtocolSuiteConfig) -> Result<String, BenchError> {
    let dir = tempfile::tempdir().map_err(io_error("make a temporary folder"))?;
    let ca = MeshCa::create().map_err(|e| BenchError::Server(e.to_string()))?;
    ca.issue_server_to(dir.path(), &["127.0.0.1".to_string()])
        .map_err(|e| BenchError::Server(e.to_string()))?;
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.cert_pem()).map_err(io_error("write the CA"))?;
    let roots =
        meshserve::pem::read_certs(&ca_path).map_err(|e| BenchError::Server(e.to_string()))?;
    let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    let node_config = |tcp: SocketAddr, h3: SocketAddr, tls: bool| {
        let tcp_tls = if tls {
            format!("tls_cert = {cert:?}\ntls_key = {key:?}\n")
        } else {
            String::new()
        };
        format!(
            "model_repository = {:?}\n[http]\nlisten = \"{tcp}\"\n{tcp_tls}[http3]\nlisten = \"{h3}\"\ntls_cert = {cert:?}\ntls_key = {key:?}\n",
            config.repository
        )
    };
    let body = fp32_request_body("features", 1, 32);
    let mut rows = Vec::new();
    for tls in [false, true] {
        let tcp = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let h3 = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let name = if tls { "tls" } else { "plain" };
        let _node = start_node(
            &config.server_binary,
            dir.path(),
            name,
            &node_config(tcp, h3, tls),
            h3,
        )
        .await?;
        let mut protocols = if tls {
            vec![
                (
                    tcp,
                    Protocol::Http1Tls(super::tls_client(&ca_path, b"http/1.1")?),
                ),
                (
                    tcp,
                    Protocol::Http2 {
                        connections: 1,
                        tls: Some(super::tls_client(&ca_path, b"h2")?),
                    },
                ),
            ]
        } else {
            vec![
                (tcp, Protocol::Http1),
                (
                    tcp,
                    Protocol::Http2 {
                        connections: 1,
                        tls: None,
                    },
                ),
            ]
        };
        if !tls {
            protocols.push((
                h3,
                Protocol::Http3 {
                    connections: 1,
                    roots: roots.clone(),
                },
            ));
        }
        for concurrency in [1, 64] {
            for (addr, protocol) in &protocols {
                let load = HttpLoad {
                    headers: hyper::HeaderMap::new(),
                    pace: super::Pace::Closed,
                    protocol: protocol.clone(),
                    addr: *addr,
                    path: "/v2/models/fraud/infer".into(),
                    body: body.clone(),
                    rows: 1,
                    concurrency,
                    warmup: config.warmup,
                    duration: config.duration,
                };
                let report = super::run_http(&load).await?;
                if report.errors > 0 {
                    return Err(BenchError::Server(format!(
                        "{} requests over {protocol:?} failed",
                        report.errors
                    )));
                }
                rows.push(Row {
                    label: format!("{protocol:?}"),
                    concurrency,
                    report,
                });
            }
        }
    }

    let find = |label: &str, concurrency: usize| {
        rows.iter()
            .find(|r| r.label == label && r.concurrency == concurrency)
            .map(|r| &r.report)
    };
    let mut out = String::new();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let _ = writeln!(
        out,
        "meshserve-bench protocols: fraud, batch-1 JSON, {cores} cores, closed loop, {} s per row after {} s warm-up; load generator on the same machine",
        config.duration.as_secs_f64(),
        config.warmup.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "{:<20} {:>5} {:>10} {:>8} {:>8} {:>9}",
        "protocol", "conc", "req/s", "p50 µs", "p99 µs", "vs h1 r/s"
    );
    for row in &rows {
        let r = &row.report;
        let h1 = find("HTTP/1.1", row.concurrency).map_or(f64::NAN, Report::requests_per_second);
        let _ = writeln!(
            out,
            "{:<20} {:>5} {:>10.0} {:>8} {:>8} {:>8.2}x",
            row.label,
            row.concurrency,
            r.requests_per_second(),
            r.percentile_us(0.5),
            r.percentile_us(0.99),
            r.requests_per_second() / h1
        );
    }
    if let (Some(h3_64), Some(h1_64), Some(h3_1), Some(tls_1)) = (
        find("HTTP/3", 64),
        find("HTTP/1.1", 64),
        find("HTTP/3", 1),
        find("HTTP/1.1 over TLS", 1),
    ) {
        let _ = writeln!(
            out,
            "HTTP/3 / HTTP/1.1 req/s at concurrency 64: {:.2}x; HTTP/3 p50 / HTTP/1.1-over-TLS p50 at concurrency 1: {:.2}x",
            h3_64.requests_per_second() / h1_64.requests_per_second().max(1e-9),
            h3_1.percentile_us(0.5) as f64 / tls_1.percentile_us(0.5).max(1) as f64
        );
    }
    Ok(out)
}
