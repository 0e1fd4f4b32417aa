//! `meshserve-bench mesh`: a 3-node mesh on loopback, `fraud` placed on one node, measured
//! from a client that (a) sends straight to the owner, (b) sends to another node, which
//! forwards, and (c) is route-aware and starts at that other node. All three speak
//! `meshserve/1` over QUIC, so the only difference is the path; the same two paths over
//! HTTP/1.1 follow for reference, and the `fraud-check` endpoint (pre-plugin, model,
//! post-plugin) asked at the owner and at another node, which forwards the request whole.

use super::{BenchError, HttpLoad, Report, fp32_request_body, fp32_tensor, run_http};
use bytes::Bytes;
use meshserve::client::{ClientConfig, MeshClient};
use meshserve::transport::certs::{MeshCa, Role};
use meshserve::transport::{MeshEndpoint, MeshIdentity};
use meshserve::wire::{InferCall, Message, frame::DEFAULT_MAX_FRAME_BYTES};
use meshserve_host::InferRequest;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The endpoint measured, a folder of the example repository.
const ENDPOINT: &str = "fraud-check";

/// A card transaction, as fraud-check takes it.
const TRANSACTION: &[u8] =
    br#"{"card": "card-0003", "amount": 950.0, "hour": 3, "merchant_risk": 0.8, "foreign": true}"#;

/// The bench's client identity, from the mesh CA folder `certs`.
pub(crate) fn bench_identity(certs: &Path) -> Result<MeshIdentity, BenchError> {
    MeshIdentity::from_dir(certs, Role::Client, "bench")
        .map_err(|e| BenchError::Server(e.to_string()))
}

/// A route-aware client, or why it could not start.
pub(crate) fn mesh_client(config: ClientConfig) -> Result<MeshClient, BenchError> {
    MeshClient::new(config).map_err(|e| BenchError::Server(e.to_string()))
}

/// Settings of `meshserve-bench mesh`.
#[derive(Debug, Clone)]
pub struct MeshSuiteConfig {
    /// The `meshserve` binary to start as the nodes.
    pub server_binary: PathBuf,
    /// Repository holding `fraud`; each node gets its own copy.
    pub repository: PathBuf,
    /// Concurrent requests per scenario.
    pub concurrency: usize,
    /// Measured time per scenario.
    pub duration: Duration,
    /// Unmeasured time before each scenario.
    pub warmup: Duration,
}

fn copy_tree(from: &Path, to: &Path) -> Result<(), BenchError> {
    std::fs::create_dir_all(to).map_err(super::io_error(format!("create {}", to.display())))?;
    let entries =
        std::fs::read_dir(from).map_err(super::io_error(format!("read {}", from.display())))?;
    for entry in entries {
        let entry = entry.map_err(super::io_error("read a directory entry"))?;
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)
                .map_err(super::io_error(format!("copy to {}", target.display())))?;
        }
    }
    Ok(())
}

fn free_udp_port() -> Result<u16, BenchError> {
    let socket =
        std::net::UdpSocket::bind("127.0.0.1:0").map_err(super::io_error("find a UDP port"))?;
    Ok(socket
        .local_addr()
        .map_err(super::io_error("find a UDP port"))?
        .port())
}

/// One node of a mesh a benchmark started (stopped when dropped).
pub(crate) struct MeshNode {
    _process: super::ServerProcess,
    /// Its name.
    pub(crate) name: String,
    /// Its HTTP address.
    pub(crate) http: SocketAddr,
    /// Its mesh address.
    pub(crate) quic: SocketAddr,
}

/// Starts nodes a, b and c on loopback under `root` (a CA, node certificates and a client
/// certificate `bench` in `root/certs`, which it returns), each with its own copy of
/// `repository` changed by `prepare`, b and c joining through a.
pub(crate) async fn start_three(
    binary: &Path,
    repository: &Path,
    root: &Path,
    prepare: impl Fn(&Path) -> Result<(), BenchError>,
) -> Result<(Vec<MeshNode>, PathBuf), BenchError> {
    let certs = root.join("certs");
    let ca = MeshCa::open_or_create(&certs)
        .map_err(|e| BenchError::Server(e.to_string()))?
        .0;
    for name in ["a", "b", "c"] {
        ca.issue_to(&certs, Role::Node, name)
            .map_err(|e| BenchError::Server(e.to_string()))?;
    }
    ca.issue_to(&certs, Role::Client, "bench")
        .map_err(|e| BenchError::Server(e.to_string()))?;
    let mut nodes = Vec::new();
    let mut seed: Option<SocketAddr> = None;
    for name in ["a", "b", "c"] {
        let repo = root.join(format!("models-{name}"));
        copy_tree(repository, &repo)?;
        prepare(&repo)?;
        let quic = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
        let mut args: Vec<std::ffi::OsString> = vec![
            "--model-repository".into(),
            repo.into_os_string(),
            "--quic".into(),
            quic.to_string().into(),
            "--certs".into(),
            certs.clone().into_os_string(),
            "--name".into(),
            name.into(),
        ];
        if let Some(seed) = seed {
            args.push("--seed".into());
            args.push(seed.to_string().into());
        }
        let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        let (process, http) = super::start_server(binary, &refs).await?;
        seed.get_or_insert(quic);
        nodes.push(MeshNode {
            _process: process,
            name: name.to_string(),
            http,
            quic,
        });
    }
    Ok((nodes, certs))
}

/// Runs `call` in a closed loop on `concurrency` tasks and measures it.
async fn closed_loop<F, Fut>(
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    call: F,
) -> Report
where
    F: Fn() -> Fut + Clone + 'static,
    Fut: Future<Output = bool> + 'static,
{
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let total = Arc::new(Mutex::new(Report::new(1)));
    let mut tasks = Vec::new();
    let local = tokio::task::LocalSet::new();
    for _ in 0..concurrency {
        let (call, total) = (call.clone(), total.clone());
        tasks.push(local.spawn_local(async move {
            let mut mine = Report::new(1);
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let ok = call().await;
                if sent >= measure_from {
                    if ok {
                        mine.ok += 1;
                        let _ = mine
                            .latency_us
                            .record(sent.elapsed().as_micros().max(1) as u64);
                    } else {
                        mine.errors += 1;
                    }
                }
            }
            total.lock().unwrap_or_else(|e| e.into_inner()).merge(&mine);
        }));
    }
    local
        .run_until(async {
            for task in tasks {
                let _ = task.await;
            }
        })
        .await;
    let mut report = std::mem::replace(
        &mut *total.lock().unwrap_or_else(|e| e.into_inner()),
        Report::new(1),
    );
    report.elapsed = duration;
    report
}

fn row(out: &mut String, label: &str, report: &Report) {
    let _ = writeln!(
        out,
        "{label:<52} {:>9.0} {:>8} {:>8} {:>7}",
        report.requests_per_second(),
        report.percentile_us(0.5),
        report.percentile_us(0.99),
        report.errors
    );
}

/// Starts the mesh, runs the scenarios and returns the printed table.
pub async fn run_mesh_suite(config: &MeshSuiteConfig) -> Result<String, BenchError> {
    let root = tempfile::tempdir().map_err(super::io_error("create a temporary folder"))?;
    // fraud on one node, so two of the three forward.
    let one_replica = |repo: &Path| {
        let fraud_config = repo.join("fraud/config.toml");
        let text = std::fs::read_to_string(&fraud_config).unwrap_or_default();
        let mut text: String = text
            .lines()
            .filter(|l| !l.starts_with("replicas"))
            .map(|l| format!("{l}\n"))
            .collect();
        text.push_str("replicas = 1\n");
        std::fs::write(&fraud_config, text).map_err(super::io_error("write the model config"))
    };
    let (nodes, certs) = start_three(
        &config.server_binary,
        &config.repository,
        root.path(),
        one_replica,
    )
    .await?;

    let identity = bench_identity(&certs)?;
    let probe = mesh_client(ClientConfig::new(vec![nodes[0].quic], identity.clone()))?;
    let owner = wait_for_single_owner(&probe, &nodes).await?;
    let owner_node = nodes
        .iter()
        .find(|n| n.name == owner)
        .ok_or_else(|| BenchError::Server(format!("owner {owner} is not a started node")))?;
    let other = nodes
        .iter()
        .find(|n| n.name != owner)
        .ok_or_else(|| BenchError::Server("no non-owner node".into()))?;

    let request = InferRequest {
        model: "fraud".into(),
        inputs: vec![fp32_tensor("features", 1, 32)],
        ..Default::default()
    };
    let call = Arc::new(Message::Infer(InferCall::from_request(
        request.clone(),
        None,
    )));
    let endpoint = MeshEndpoint::client(&identity, DEFAULT_MAX_FRAME_BYTES)
        .map_err(|e| BenchError::Server(e.to_string()))?;
    let plain = |target: SocketAddr| {
        let (endpoint, call) = (endpoint.clone(), call.clone());
        move || {
            let (endpoint, call) = (endpoint.clone(), call.clone());
            async move {
                matches!(
                    endpoint.call(target, &call, Duration::from_secs(10)).await,
                    Ok(Message::Answer(_))
                )
            }
        }
    };
    let (c, warmup, duration) = (config.concurrency, config.warmup, config.duration);
    let direct = closed_loop(c, warmup, duration, plain(owner_node.quic)).await;
    let forwarded = closed_loop(c, warmup, duration, plain(other.quic)).await;
    let mut route_config = ClientConfig::new(vec![other.quic], identity.clone());
    route_config.timeout = Duration::from_secs(10);
    let aware = Arc::new(mesh_client(route_config)?);
    let aware_call = {
        let (aware, request) = (aware.clone(), request.clone());
        move || {
            let (aware, request) = (aware.clone(), request.clone());
            async move { aware.infer(request).await.is_ok() }
        }
    };
    let route_aware = closed_loop(c, warmup, duration, aware_call).await;
    // The endpoint over meshserve/1: a client that knows only the owner, and a route-aware
    // one that starts at the other node (forwarded whole once, then direct).
    let has_endpoint = config
        .repository
        .join(ENDPOINT)
        .join("endpoint.toml")
        .is_file();
    let endpoint_clients = if has_endpoint {
        let invoking = |seed: SocketAddr| -> Result<_, BenchError> {
            let mut config = ClientConfig::new(vec![seed], identity.clone());
            config.timeout = Duration::from_secs(10);
            let client = Arc::new(mesh_client(config)?);
            Ok(move || {
                let client = client.clone();
                async move {
                    client
                        .invoke(
                            ENDPOINT,
                            Bytes::from_static(TRANSACTION),
                            "application/json",
                        )
                        .await
                        .is_ok_and(|i| i.answer.status == 200)
                }
            })
        };
        Some((
            closed_loop(c, warmup, duration, invoking(owner_node.quic)?).await,
            closed_loop(c, warmup, duration, invoking(other.quic)?).await,
        ))
    } else {
        None
    };

    let http = |addr: SocketAddr| HttpLoad {
        headers: hyper::HeaderMap::new(),
        pace: super::Pace::Closed,
        protocol: super::Protocol::Http1,
        addr,
        path: "/v2/models/fraud/infer".into(),
        body: fp32_request_body("features", 1, 32),
        rows: 1,
        concurrency: c,
        warmup,
        duration,
    };
    let http_direct = run_http(&http(owner_node.http)).await?;
    let http_forwarded = run_http(&http(other.http)).await?;
    // The fraud-check endpoint (a repository folder every node holds): run whole on the owner
    // of fraud, asked there or forwarded whole by the other node.
    let endpoint_rows = if has_endpoint {
        let invocation = |addr: SocketAddr| HttpLoad {
            path: format!("/v1/endpoints/{ENDPOINT}/invocations"),
            body: Bytes::from_static(TRANSACTION),
            ..http(addr)
        };
        Some((
            run_http(&invocation(owner_node.http)).await?,
            run_http(&invocation(other.http)).await?,
        ))
    } else {
        None
    };

    let mut out = String::new();
    let _ = writeln!(
        out,
        "meshserve-bench mesh: 3 nodes on loopback, fraud on {owner} only, batch-1 requests, concurrency {c}, {:.0} s per row\n",
        duration.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "{:<52} {:>9} {:>8} {:>8} {:>7}",
        "scenario", "req/s", "p50 µs", "p99 µs", "errors"
    );
    row(&mut out, "(a) meshserve/1 straight to the owner", &direct);
    row(
        &mut out,
        "(b) meshserve/1 to a non-owner, forwarded",
        &forwarded,
    );
    row(
        &mut out,
        "(c) route-aware client, starting at the non-owner",
        &route_aware,
    );
    row(&mut out, "    HTTP/1.1 straight to the owner", &http_direct);
    row(
        &mut out,
        "    HTTP/1.1 to a non-owner, forwarded",
        &http_forwarded,
    );
    if let Some((direct, aware)) = &endpoint_clients {
        row(
            &mut out,
            "(d) meshserve/1 fraud-check straight to the owner",
            direct,
        );
        row(
            &mut out,
            "(e) route-aware fraud-check, from the non-owner",
            aware,
        );
    }
    if let Some((endpoint_direct, endpoint_forwarded)) = &endpoint_rows {
        row(
            &mut out,
            "    HTTP/1.1 fraud-check straight to the owner",
            endpoint_direct,
        );
        row(
            &mut out,
            "    HTTP/1.1 fraud-check to a non-owner, whole",
            endpoint_forwarded,
        );
    }
    let ratio = |a: u64, b: u64| a as f64 / b.max(1) as f64;
    let _ = writeln!(
        out,
        "\n(c)/(a): p50 latency {:.2}x, p99 latency {:.2}x, throughput {:.2}x",
        ratio(route_aware.percentile_us(0.5), direct.percentile_us(0.5)),
        ratio(route_aware.percentile_us(0.99), direct.percentile_us(0.99)),
        route_aware.requests_per_second() / direct.requests_per_second().max(1e-9)
    );
    let _ = writeln!(
        out,
        "(b)/(a): p50 latency {:.2}x (the forwarding hop)",
        ratio(forwarded.percentile_us(0.5), direct.percentile_us(0.5))
    );
    if let Some((direct, aware)) = &endpoint_clients {
        let _ = writeln!(
            out,
            "(e)/(d): p50 latency {:.2}x, throughput {:.2}x",
            ratio(aware.percentile_us(0.5), direct.percentile_us(0.5)),
            aware.requests_per_second() / direct.requests_per_second().max(1e-9)
        );
    }
    if let Some((endpoint_direct, endpoint_forwarded)) = &endpoint_rows {
        let per_second = |r: &Report| r.requests_per_second().max(1e-9);
        let _ = writeln!(
            out,
            "fraud-check forwarded whole / straight to the owner: throughput {:.2}x, p50 latency {:.2}x",
            endpoint_forwarded.requests_per_second() / per_second(endpoint_direct),
            ratio(
                endpoint_forwarded.percentile_us(0.5),
                endpoint_direct.percentile_us(0.5)
            )
        );
        let _ = writeln!(
            out,
            "fraud-check (pre + model + post) / the bare model, both at the owner: throughput {:.2}x",
            endpoint_direct.requests_per_second() / per_second(&http_direct)
        );
    } else {
        let _ = writeln!(
            out,
            "(no {ENDPOINT} folder in the repository, or its components are not built: no endpoint rows; run scripts/build-plugins.sh)"
        );
    }
    Ok(out)
}

/// Waits until every node agrees that exactly one node serves `fraud`; returns its name.
async fn wait_for_single_owner(
    probe: &MeshClient,
    nodes: &[MeshNode],
) -> Result<String, BenchError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let mut owners = Vec::new();
        for node in nodes {
            let Ok(status) = probe.status(node.quic).await else {
                break;
            };
            let serving: Vec<String> = status
                .members
                .iter()
                .filter_map(|m| m.advert.as_ref())
                .filter(|a| a.serving.iter().any(|s| s == "fraud"))
                .map(|a| a.node.clone())
                .collect();
            if status.members.len() == nodes.len() && serving.len() == 1 {
                owners.push(serving[0].clone());
            }
        }
        if owners.len() == nodes.len() && owners.iter().all(|o| *o == owners[0]) {
            return Ok(owners[0].clone());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(BenchError::Server(
        "the mesh did not settle with one owner of 'fraud' in 30 s".into(),
    ))
}
