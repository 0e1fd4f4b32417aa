//! `meshserve-bench skew`: a 3-node mesh on loopback where one model takes 80% of the
//! requests, measured twice: with that model on a fixed single replica (`replicas = 1`), and
//! with its replica count following load (`min_replicas = 1, max_replicas = 3`). HTTP clients
//! on every node send `heavy` (8-row binary tensors) and `fraud` (one row, JSON) four to one;
//! after a warm-up long enough for the count to settle, the requests answered per second,
//! their p99 and the replica count reached are compared.

use super::mesh::{MeshNode, bench_identity, mesh_client, start_three};
use super::{BenchError, HttpLoad, Pace, Protocol, Report, fp32_request_body, run_http};
use bytes::Bytes;
use meshserve::client::{ClientConfig, MeshClient};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Rows per `heavy` request.
const HEAVY_ROWS: usize = 8;

/// `heavy`'s width.
const HEAVY_WIDTH: usize = 512;

/// Settings of `meshserve-bench skew`.
#[derive(Debug, Clone)]
pub struct SkewConfig {
    /// The `meshserve` binary to start as the nodes.
    pub server_binary: PathBuf,
    /// Repository holding `heavy` and `fraud`; each node gets its own copy.
    pub repository: PathBuf,
    /// `heavy` clients per node (a quarter as many `fraud` clients, at least one).
    pub heavy_clients: usize,
    /// Measured time per setting.
    pub duration: Duration,
    /// Unmeasured time first, for the replica count to follow the load.
    pub warmup: Duration,
}

/// `heavy`'s config.toml in each setting.
const SETTINGS: [(&str, &str); 2] = [
    (
        "fixed (replicas = 1)",
        "max_batch_size = 64\nreplicas = 1\n",
    ),
    (
        "load-following (1 to 3)",
        "max_batch_size = 64\nmin_replicas = 1\nmax_replicas = 3\ntarget_in_flight = 2.0\n",
    ),
];

/// A binary-tensor OIP body of `rows` rows for `heavy`, and the header that says where its
/// JSON ends.
fn heavy_body(rows: usize) -> (Bytes, hyper::HeaderMap) {
    let header = format!(
        r#"{{"inputs":[{{"name":"input","shape":[{rows},{HEAVY_WIDTH}],"datatype":"FP32","parameters":{{"binary_data_size":{}}}}}]}}"#,
        rows * HEAVY_WIDTH * 4
    );
    let mut body = header.clone().into_bytes();
    body.extend((0..rows * HEAVY_WIDTH).flat_map(|i| ((i % 7) as f32 * 0.1).to_le_bytes()));
    let mut headers = hyper::HeaderMap::new();
    headers.insert(
        "inference-header-content-length",
        hyper::header::HeaderValue::from(header.len()),
    );
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/octet-stream"),
    );
    (Bytes::from(body), headers)
}

/// The replica count of `heavy` as `node` sees it: its policy's count when it follows load,
/// else the replicas its route names.
async fn heavy_replicas(probe: &MeshClient, node: &MeshNode) -> Option<usize> {
    let status = probe.status(node.quic).await.ok()?;
    if let Some(scaled) = status.scaling.iter().find(|s| s.model == "heavy") {
        return Some(usize::from(scaled.count));
    }
    status
        .routes
        .routes
        .iter()
        .find(|r| r.model == "heavy")
        .map(|r| r.replicas.len())
}

/// Sums the reports of concurrent loads into one (their rates add up).
fn combined(reports: &[Report]) -> Report {
    let mut all = Report::new(reports.first().map_or(1, |r| r.rows));
    for report in reports {
        all.merge(report);
    }
    all.elapsed = reports.iter().map(|r| r.elapsed).max().unwrap_or_default();
    all
}

/// Runs both settings and returns the table.
pub async fn run_skew(config: &SkewConfig) -> Result<String, BenchError> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "one model takes 80% of the requests: 3 nodes on loopback, {} heavy + {} fraud HTTP/1.1 clients per node, {:.0} s measured after {:.0} s",
        config.heavy_clients,
        (config.heavy_clients / 4).max(1),
        config.duration.as_secs_f64(),
        config.warmup.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "{:<26} {:>10} {:>10} {:>10} {:>11} {:>11} {:>8} {:>9}",
        "heavy", "heavy/s", "fraud/s", "total/s", "heavy p99", "fraud p99", "errors", "replicas"
    );
    for (label, heavy_config) in SETTINGS {
        let root = tempfile::tempdir().map_err(super::io_error("create a temporary folder"))?;
        let prepare = |repo: &Path| {
            std::fs::write(repo.join("heavy/config.toml"), heavy_config)
                .map_err(super::io_error("write heavy's config"))
        };
        let (nodes, certs) = start_three(
            &config.server_binary,
            &config.repository,
            root.path(),
            prepare,
        )
        .await?;
        let probe = mesh_client(ClientConfig::new(
            vec![nodes[0].quic],
            bench_identity(&certs)?,
        ))?;
        // Every node sees heavy served before the load starts.
        let ready_by = Instant::now() + Duration::from_secs(30);
        loop {
            let mut served = 0;
            for node in &nodes {
                served += usize::from(heavy_replicas(&probe, node).await.is_some_and(|n| n >= 1));
            }
            if served == nodes.len() {
                break;
            }
            if Instant::now() > ready_by {
                return Err(BenchError::Server(
                    "heavy was not served within 30 s".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (heavy, headers) = heavy_body(HEAVY_ROWS);
        let load = |node: &MeshNode, model: &str, body: Bytes, headers, clients| HttpLoad {
            addr: node.http,
            protocol: Protocol::Http1,
            path: format!("/v2/models/{model}/infer"),
            body,
            headers,
            pace: Pace::Closed,
            rows: 1,
            concurrency: clients,
            warmup: config.warmup,
            duration: config.duration,
        };
        let mut loads = Vec::new();
        for node in &nodes {
            loads.push(load(
                node,
                "heavy",
                heavy.clone(),
                headers.clone(),
                config.heavy_clients,
            ));
            loads.push(load(
                node,
                "fraud",
                fp32_request_body("features", 1, 32),
                hyper::HeaderMap::new(),
                (config.heavy_clients / 4).max(1),
            ));
        }
        let results = futures_util::future::join_all(loads.iter().map(run_http)).await;
        let mut heavy_reports = Vec::new();
        let mut fraud_reports = Vec::new();
        for (i, result) in results.into_iter().enumerate() {
            let report = result?;
            if i % 2 == 0 {
                heavy_reports.push(report);
            } else {
                fraud_reports.push(report);
            }
        }
        let (heavy, fraud) = (combined(&heavy_reports), combined(&fraud_reports));
        let replicas = heavy_replicas(&probe, &nodes[0]).await.unwrap_or(0);
        let rate = |r: &Report| r.ok as f64 / r.elapsed.as_secs_f64().max(1e-9);
        let p99 = |r: &Report| {
            format!(
                "{:.2} ms",
                r.latency_us.value_at_quantile(0.99) as f64 / 1000.0
            )
        };
        let _ = writeln!(
            out,
            "{:<26} {:>10.0} {:>10.0} {:>10.0} {:>11} {:>11} {:>8} {:>9}",
            label,
            rate(&heavy),
            rate(&fraud),
            rate(&heavy) + rate(&fraud),
            p99(&heavy),
            p99(&fraud),
            heavy.errors + fraud.errors,
            replicas
        );
    }
    Ok(out)
}
