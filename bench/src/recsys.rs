//! `meshserve-bench recsys`: the recommendation example (`examples/recsys`) served with its
//! plugins (feature lookups before the model, top-k after it), next to its ranking model run
//! in process on the same number of candidates, one call at a time: what the whole endpoint
//! costs beyond the model.

use super::suite::load_session;
use super::{BenchError, HttpLoad, Report, fp32_tensor, run_http, run_in_process, start_server};
use bytes::Bytes;
use meshserve_host::tensor::push_bytes_element;
use meshserve_host::{DataType, Tensor};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

/// Settings of `meshserve-bench recsys`.
#[derive(Debug, Clone)]
pub struct RecsysBenchConfig {
    /// The `meshserve` binary to start as the server.
    pub server_binary: PathBuf,
    /// The example's folder (its `node.toml`, `models/` and `data/`).
    pub example: PathBuf,
    /// Candidate items per request.
    pub candidates: usize,
    /// Measured time per row.
    pub duration: Duration,
    /// Unmeasured time before each row.
    pub warmup: Duration,
}

/// Features per user and per item in the example's tables.
const FEATURES: usize = 8;

/// A request body: one user and `candidates` items the tables know.
pub fn request_body(candidates: usize) -> Bytes {
    let items: Vec<String> = (0..candidates)
        .map(|i| format!("i{:05}", i * 7 % 2000))
        .collect();
    Bytes::from(serde_json::json!({ "user": "u00017", "items": items }).to_string())
}

fn item_ids(candidates: usize) -> Tensor {
    let mut data = Vec::new();
    for i in 0..candidates {
        push_bytes_element(&mut data, format!("i{i:05}").as_bytes());
    }
    Tensor::new(
        "item_id",
        DataType::Bytes,
        vec![candidates as i64],
        data.into(),
    )
    .expect("a well-formed BYTES tensor")
}

/// Runs the benchmark and returns the printed report.
pub async fn run_recsys(config: &RecsysBenchConfig) -> Result<String, BenchError> {
    let n = config.candidates;
    let mut ranker = load_session(&config.example.join("models"), "ranker")?;
    let inputs = [
        fp32_tensor("user", n, FEATURES),
        fp32_tensor("item", n, FEATURES),
        item_ids(n),
    ];
    let model = run_in_process(
        &mut ranker,
        &inputs,
        n as u64,
        config.warmup,
        config.duration,
    )?;
    drop(ranker);

    let node_config = config.example.join("node.toml");
    let (_server, addr) = start_server(
        &config.server_binary,
        &["--config".as_ref(), node_config.as_os_str()],
    )
    .await?;
    let load = |concurrency: usize| HttpLoad {
        headers: hyper::HeaderMap::new(),
        pace: super::Pace::Closed,
        protocol: super::Protocol::Http1,
        addr,
        path: "/v1/endpoints/recommend/invocations".into(),
        body: request_body(n),
        rows: n as u64,
        concurrency,
        warmup: config.warmup,
        duration: config.duration,
    };
    let single = run_http(&load(1)).await?;
    let loaded = run_http(&load(64)).await?;
    if loaded.ok == 0 || single.ok == 0 {
        return Err(BenchError::Server(
            "the recommend endpoint answered no request successfully (are the plugins built? scripts/build-plugins.sh)".into(),
        ));
    }

    let mut out = String::new();
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let _ = writeln!(
        out,
        "meshserve-bench recsys: {cores} cores, {n} candidates per request, {} s per row after {} s warm-up; load generator on the same machine",
        config.duration.as_secs_f64(),
        config.warmup.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "{:<48} {:>5} {:>9} {:>12} {:>8} {:>8} {:>7}",
        "", "conc", "req/s", "candidates/s", "p50 µs", "p99 µs", "errors"
    );
    let row = |out: &mut String, label: &str, concurrency: usize, r: &Report| {
        let _ = writeln!(
            out,
            "{label:<48} {concurrency:>5} {:>9.0} {:>12.0} {:>8} {:>8} {:>7}",
            r.requests_per_second(),
            r.samples_per_second(),
            r.percentile_us(0.5),
            r.percentile_us(0.99),
            r.errors
        );
    };
    row(
        &mut out,
        "ranker in-process ORT, one call at a time",
        1,
        &model,
    );
    row(&mut out, "recommend endpoint over HTTP/1.1", 1, &single);
    row(&mut out, "recommend endpoint over HTTP/1.1", 64, &loaded);
    let _ = writeln!(
        out,
        "served candidates/s at concurrency 64 / in-process ORT loop: {:.2}x",
        loaded.samples_per_second() / model.samples_per_second().max(1e-9)
    );
    Ok(out)
}
