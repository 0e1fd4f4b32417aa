//! The HTTP/3 front door's limits for internet-facing QUIC, each attacked with a raw QUIC
//! client on loopback; the port's separation from the mesh; and the Rust client's HTTP/3 mode
//! following route hints. (The OIP surface over HTTP/3 is covered with a third-party client in
//! `mesh/tests/python/test_http3.py`.)

mod support;

use bytes::{Buf, Bytes};
use meshserve::client::http3::{Http3Client, Http3ClientConfig};
use meshserve::client::{ClientConfig, MeshClient};
use meshserve::transport::MeshIdentity;
use meshserve::transport::certs::Role;
use quinn::crypto::rustls::QuicClientConfig;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{TestNode, make_certs, metric_sum, start_with_config, workspace_root};

/// A CA with a front-door certificate for 127.0.0.1, a node `a` and a client `app`.
fn certs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path(), &["a", "b"], &["app"], &["127.0.0.1"]);
    dir
}

/// A node over the example models serving HTTP/3 with `settings` added to `[http3]`.
fn h3_node(certs: &Path, settings: &str) -> (TestNode, tempfile::TempDir) {
    let (node, dir) = start_with_config(&format!(
        "[http3]\nlisten = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n{settings}\n",
        certs.join("server.pem").display(),
        certs.join("server.key").display(),
    ));
    assert!(
        node.http3.is_some(),
        "the node announces its HTTP/3 address"
    );
    (node, dir)
}

/// A raw QUIC client speaking ALPN `h3`, trusting the test CA, optionally with a client
/// certificate.
fn quic_client(certs: &Path, client_cert: Option<&str>) -> quinn::Endpoint {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client_config(certs, client_cert));
    endpoint
}

fn client_config(certs: &Path, client_cert: Option<&str>) -> quinn::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in meshserve::pem::read_certs(&certs.join("ca.pem")).unwrap() {
        roots.add(cert).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(meshserve::pem::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut tls = match client_cert {
        None => builder.with_no_client_auth(),
        Some(name) => builder
            .with_client_auth_cert(
                meshserve::pem::read_certs(&certs.join(format!("client-{name}.pem"))).unwrap(),
                meshserve::pem::read_key(&certs.join(format!("client-{name}.key"))).unwrap(),
            )
            .unwrap(),
    };
    tls.alpn_protocols = vec![b"h3".to_vec()];
    quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()))
}

async fn connect(endpoint: &quinn::Endpoint, addr: SocketAddr) -> quinn::Connection {
    endpoint
        .connect(addr, "127.0.0.1")
        .unwrap()
        .await
        .expect("handshake")
}

/// GET `path` over HTTP/3 on an established QUIC connection; the status, or why it failed.
async fn h3_get(connection: quinn::Connection, path: &str) -> Result<u16, String> {
    let (mut driver, mut send) = h3::client::new(h3_quinn::Connection::new(connection))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
    let request = http::Request::get(format!("https://127.0.0.1{path}"))
        .body(())
        .unwrap();
    let mut stream = send
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    stream.finish().await.map_err(|e| e.to_string())?;
    let response = stream.recv_response().await.map_err(|e| e.to_string())?;
    while let Some(mut chunk) = stream.recv_data().await.map_err(|e| e.to_string())? {
        chunk.advance(chunk.remaining());
    }
    Ok(response.status().as_u16())
}

/// `meshserve_connections_total{protocol="h3", outcome}` in a metrics exposition.
fn h3_connections(metrics: &str, outcome: &str) -> f64 {
    metric_sum(
        metrics,
        "meshserve_connections_total",
        &[("protocol", "h3"), ("outcome", outcome)],
    )
}

fn h3_client(certs: &Path, seeds: Vec<SocketAddr>) -> Http3Client {
    let mut config = Http3ClientConfig::new(seeds, &certs.join("ca.pem")).unwrap();
    config.timeout = Duration::from_secs(5);
    Http3Client::new(config).unwrap()
}

fn fraud_body() -> Bytes {
    let text =
        std::fs::read_to_string(workspace_root().join("examples/references/fraud.json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    Bytes::from(serde_json::json!({ "inputs": reference["cases"][0]["inputs"] }).to_string())
}

/// A QUIC variable-length integer, 4-byte form.
fn varint4(value: u32) -> [u8; 4] {
    (value | 0x8000_0000).to_be_bytes()
}

#[tokio::test]
async fn streams_past_the_per_connection_cap_wait_and_are_then_served() {
    let certs = certs();
    let (node, _dir) = h3_node(certs.path(), "max_concurrent_streams = 4");
    let addr = node.http3.unwrap();
    let connection = connect(&quic_client(certs.path(), None), addr).await;
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(connection.open_bi().await.unwrap());
    }
    let fifth = tokio::time::timeout(Duration::from_millis(500), connection.open_bi()).await;
    assert!(
        fifth.is_err(),
        "a fifth stream must wait for the server's credit"
    );
    drop(open);

    // A client that wants 32 requests at once gets them all answered, four at a time.
    let client = Arc::new(h3_client(certs.path(), vec![addr]));
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.infer("fraud", fraud_body(), None).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap().status, 200);
    }
}

#[tokio::test]
async fn request_headers_that_trickle_are_dropped_at_the_deadline() {
    let certs = certs();
    let (node, _dir) = h3_node(certs.path(), "header_read_timeout_ms = 400");
    let addr = node.http3.unwrap();
    let connection = connect(&quic_client(certs.path(), None), addr).await;
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    // A HEADERS frame announcing 32 bytes, of which 5 arrive.
    send.write_all(&[0x01, 0x20, 1, 2, 3, 4, 5]).await.unwrap();
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1024)).await;
    let waited = started.elapsed();
    let answer = ended.expect("the server ends the stream");
    assert!(
        answer.as_ref().map_or(true, |bytes| bytes.is_empty()),
        "no response on a stream without headers: {answer:?}"
    );
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "ended after {waited:?}, deadline 400 ms"
    );
    // The connection itself keeps serving.
    assert_eq!(h3_get(connection, "/v2/health/live").await, Ok(200));
}

#[tokio::test]
async fn an_oversized_header_frame_is_stopped_before_it_is_buffered() {
    let certs = certs();
    let (node, _dir) = h3_node(certs.path(), "");
    let addr = node.http3.unwrap();
    let connection = connect(&quic_client(certs.path(), None), addr).await;
    let (mut send, _recv) = connection.open_bi().await.unwrap();
    // HEADERS, announcing 512 MiB (the limit is 64 KiB), then as much of it as will go.
    let mut frame = vec![0x01];
    frame.extend(varint4(512 << 20));
    send.write_all(&frame).await.unwrap();
    let chunk = vec![0u8; 64 * 1024];
    let written = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Err(e) = send.write_all(&chunk).await {
                return e;
            }
        }
    })
    .await
    .expect("the server stops the stream instead of reading 512 MiB");
    assert_eq!(
        written,
        quinn::WriteError::Stopped(quinn::VarInt::from_u32(0x107)),
        "stopped with H3_EXCESSIVE_LOAD"
    );
    assert_eq!(h3_get(connection, "/v2/health/live").await, Ok(200));
}

#[tokio::test]
async fn connections_without_requests_are_closed_even_when_kept_alive() {
    let certs = certs();
    let (node, _dir) = h3_node(certs.path(), "idle_timeout_ms = 500");
    // QUIC keep-alives hold the transport open; only the server's watchdog can end it.
    let mut config = client_config(certs.path(), None);
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_millis(100)));
    config.transport_config(Arc::new(transport));
    let connection = quic_client(certs.path(), None)
        .connect_with(config, node.http3.unwrap(), "127.0.0.1")
        .unwrap()
        .await
        .unwrap();
    let started = Instant::now();
    let reason = tokio::time::timeout(Duration::from_secs(5), connection.closed())
        .await
        .expect("an idle connection is closed");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "closed after {:?}",
        started.elapsed()
    );
    assert!(
        matches!(&reason, quinn::ConnectionError::ApplicationClosed(close) if close.error_code == quinn::VarInt::from_u32(0x100)),
        "closed with H3_NO_ERROR, got {reason:?}"
    );
}

#[tokio::test]
async fn connections_past_the_cap_are_refused_until_one_closes() {
    let certs = certs();
    let (node, _dir) = h3_node(certs.path(), "max_connections = 2");
    let addr = node.http3.unwrap();
    let client = quic_client(certs.path(), None);
    let first = connect(&client, addr).await;
    let _second = connect(&client, addr).await;
    let third = tokio::time::timeout(
        Duration::from_secs(5),
        client.connect(addr, "127.0.0.1").unwrap(),
    )
    .await
    .expect("refused, not ignored");
    assert!(
        matches!(third, Err(quinn::ConnectionError::ConnectionClosed(_))),
        "{third:?}"
    );
    first.close(quinn::VarInt::from_u32(0x100), b"done");
    let mut served = Err(String::new());
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Ok(Ok(connection)) = tokio::time::timeout(
            Duration::from_secs(2),
            client.connect(addr, "127.0.0.1").unwrap(),
        )
        .await
        else {
            continue;
        };
        served = h3_get(connection, "/v2/health/live").await;
        break;
    }
    assert_eq!(served, Ok(200), "a slot frees when a connection closes");
    let metrics = node.metrics().await;
    let count = |outcome| h3_connections(&metrics, outcome);
    assert!(count("refused") >= 1.0);
    assert_eq!(count("retry"), 0.0, "below validate_addresses_above");
}

#[tokio::test]
async fn under_load_clients_prove_their_address_with_a_retry_token() {
    let certs = certs();
    let (node, _dir) = h3_node(certs.path(), "validate_addresses_above = 0");
    let client = h3_client(certs.path(), vec![node.http3.unwrap()]);
    let answer = client.infer("fraud", fraud_body(), None).await.unwrap();
    assert_eq!(answer.status, 200);
    let metrics = node.metrics().await;
    let count = |outcome| h3_connections(&metrics, outcome);
    assert_eq!(count("retry"), 1.0, "one retry token sent");
    assert_eq!(count("accepted"), 1.0, "then the validated connection");
}

#[tokio::test]
async fn a_client_certificate_can_be_required() {
    let certs = certs();
    let (node, _dir) = h3_node(
        certs.path(),
        &format!(
            "client_ca = \"{}\"\nrequire_client_cert = true",
            certs.path().join("ca.pem").display()
        ),
    );
    let addr = node.http3.unwrap();
    let anonymous = quic_client(certs.path(), None);
    let refused = match anonymous.connect(addr, "127.0.0.1").unwrap().await {
        // TLS 1.3: the client may finish its side before the server refuses it.
        Ok(connection) => h3_get(connection, "/v2/health/live").await,
        Err(e) => Err(e.to_string()),
    };
    assert!(refused.is_err(), "{refused:?}");
    let holder = quic_client(certs.path(), Some("app"));
    let connection = connect(&holder, addr).await;
    assert_eq!(h3_get(connection, "/v2/health/live").await, Ok(200));
}

#[tokio::test]
async fn the_http3_port_speaks_neither_meshserve_1_nor_membership() {
    let certs = certs();
    let (node, _dir) = h3_node(certs.path(), "");
    let addr = node.http3.unwrap();
    // A mesh client with a valid client certificate asks for the mesh's status...
    let identity = MeshIdentity::from_dir(certs.path(), Role::Client, "app").unwrap();
    let mut config = ClientConfig::new(vec![addr], identity);
    config.timeout = Duration::from_secs(3);
    let status = MeshClient::new(config).unwrap().status(addr).await;
    assert!(
        status.is_err(),
        "meshserve/1 over the HTTP/3 port: {status:?}"
    );
    // ...and a node certificate tries to join through it.
    let node_identity = MeshIdentity::from_dir(certs.path(), Role::Node, "b").unwrap();
    let endpoint = meshserve::transport::MeshEndpoint::client(&node_identity, 1 << 20).unwrap();
    let joined = endpoint.connection(addr).await;
    assert!(joined.is_err(), "a node cannot connect to the HTTP/3 port");
    // The node counts each refusal once its side of the handshake ends, which may be just
    // after the client saw it.
    let deadline = Instant::now() + Duration::from_secs(5);
    let metrics = loop {
        let metrics = node.metrics().await;
        if h3_connections(&metrics, "handshake_failed") >= 2.0 || Instant::now() > deadline {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        h3_connections(&metrics, "handshake_failed") >= 2.0,
        "both refused in the handshake (no common ALPN)"
    );
    assert_eq!(h3_connections(&metrics, "accepted"), 0.0);
}

#[tokio::test]
async fn the_http3_client_follows_route_hints_to_the_replica_for_models_and_endpoints() {
    let certs = certs();
    let root = tempfile::tempdir().unwrap();
    let empty = root.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let owner_models = root.path().join("models");
    support::copy_tree(
        &workspace_root().join("examples/models/fraud"),
        &owner_models.join("fraud"),
    );
    // fraud on one replica, placed on the owner: the node names are chosen so that rendezvous
    // hashing picks the owner's, and the front (which fetches what is placed on it) stays a
    // front.
    let config = owner_models.join("fraud/config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("replicas = 2", "replicas = 1")).unwrap();
    let owner_name = meshserve::placement::replicas("fraud", ["a", "b"], 1)[0];
    let front_name = if owner_name == "a" { "b" } else { "a" };
    support::plugin("threshold");
    support::copy_tree(
        &workspace_root().join("examples/models/fraud-check"),
        &owner_models.join("fraud-check"),
    );
    let cert = certs.path().join("server.pem");
    let key = certs.path().join("server.key");
    let common = |name: &'static str| {
        vec![
            "--quic".to_string(),
            "127.0.0.1:0".into(),
            "--certs".into(),
            certs.path().display().to_string(),
            "--name".into(),
            name.into(),
            "--http3".into(),
            "127.0.0.1:0".into(),
            "--http3-cert".into(),
            cert.display().to_string(),
            "--http3-key".into(),
            key.display().to_string(),
        ]
    };
    let args = common(front_name);
    let front = TestNode::start(&empty, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let front_quic = front.mesh_addr().unwrap().to_string();
    let mut args = common(owner_name);
    args.extend(["--seed".to_string(), front_quic]);
    let owner = TestNode::start(
        &owner_models,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let (front_h3, owner_h3) = (front.http3.unwrap(), owner.http3.unwrap());

    let client = h3_client(certs.path(), vec![front_h3]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        let answer = client.infer("fraud", fraud_body(), None).await.unwrap();
        if answer.status == 200 || Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(
        first.sent_to, front_h3,
        "the first request goes to the seed"
    );
    let route = client
        .route("fraud")
        .expect("the answer's route hint is kept");
    assert_eq!(route.replicas.len(), 1);
    assert_eq!(route.replicas[0].http3, Some(owner_h3));

    let mesh_served = |metrics: &str| {
        metric_sum(
            metrics,
            "meshserve_mesh_served_requests_total",
            &[("model", "fraud")],
        )
    };
    let before = mesh_served(&owner.metrics().await);
    for _ in 0..5 {
        let answer = client.infer("fraud", fraud_body(), None).await.unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(
            answer.sent_to, owner_h3,
            "later requests go straight to the replica"
        );
    }
    assert_eq!(
        mesh_served(&owner.metrics().await),
        before,
        "none of them crossed the mesh"
    );

    // The endpoint beside fraud on its owner: the seed forwards the first call whole and names
    // the replica; the second goes there directly.
    let transaction = Bytes::from_static(br#"{"card": "card-0003", "amount": 950.0}"#);
    let calls = [
        (
            front_h3,
            "the first call goes to the seed, which forwards it",
        ),
        (owner_h3, "the second goes straight to the replica"),
    ];
    for (expected, why) in calls {
        let answer = client
            .invoke("fraud-check", transaction.clone(), "application/json")
            .await
            .unwrap();
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        assert_eq!(answer.sent_to, expected, "{why}");
        let timing = answer.headers["server-timing"].to_str().unwrap();
        assert_eq!(
            timing.starts_with("forward;"),
            expected == front_h3,
            "{timing}"
        );
        let decision: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        assert!(decision["decision"].is_string(), "{decision}");
    }
    assert_eq!(
        client.route("fraud-check").unwrap().replicas[0].http3,
        Some(owner_h3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_every_http3_request_in_flight_then_exits() {
    let certs = certs();
    let repo = support::copy_examples();
    // One thread and no batching across requests: 64-row requests queue up behind each other
    // (none inline: the test is about a real queue at SIGTERM).
    std::fs::write(
        repo.path().join("heavy/config.toml"),
        "max_batch_size = 64\nmax_queue_delay_us = 0\nintra_op_threads = 1\ninline_blocking_max_us = 0\nmax_queue_wait_us = 0\n",
    )
    .unwrap();
    let (cert, key) = (
        certs.path().join("server.pem"),
        certs.path().join("server.key"),
    );
    // No grace period: the queue is answered by the drain alone, after GOAWAY.
    let config = repo.path().join("node.toml");
    std::fs::write(&config, "shutdown_grace_ms = 0\n").unwrap();
    let mut node = TestNode::start(
        repo.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--http3",
            "127.0.0.1:0",
            "--http3-cert",
            cert.to_str().unwrap(),
            "--http3-key",
            key.to_str().unwrap(),
        ],
    );
    let client = Arc::new(h3_client(certs.path(), vec![node.http3.unwrap()]));
    let body = Bytes::from(
        serde_json::json!({"inputs": [{"name": "input", "shape": [64, 512], "datatype": "FP32", "data": vec![0.25; 64 * 512]}]})
            .to_string(),
    );
    let requests: Vec<_> = (0..48)
        .map(|_| {
            let (client, body) = (client.clone(), body.clone());
            tokio::spawn(async move {
                let answer = client.infer("heavy", body, None).await;
                (answer, Instant::now())
            })
        })
        .collect();
    // SIGTERM once a real queue waits (some requests may still be uploading: their streams
    // are open, so the drain must serve them too).
    let waiting_since = Instant::now();
    let queued = loop {
        let metrics = node.metrics().await;
        let queued = metric_sum(&metrics, "meshserve_queue_depth", &[("model", "heavy")]);
        if queued >= 8.0 {
            break queued;
        }
        assert!(
            waiting_since.elapsed() < Duration::from_secs(20),
            "no queue formed"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let signalled = Instant::now();
    node.signal_term();
    let (status, log) = tokio::task::spawn_blocking(move || {
        let status = node.wait_for_exit(Duration::from_secs(60));
        (status, node.log_text())
    })
    .await
    .unwrap();
    let mut answered_after_signal = 0.0;
    for request in requests {
        let (answer, at) = request.await.unwrap();
        assert_eq!(answer.expect("a request in flight was lost").status, 200);
        if at > signalled {
            answered_after_signal += 1.0;
        }
    }
    assert!(
        answered_after_signal >= queued,
        "{answered_after_signal} answered after SIGTERM, {queued} were queued"
    );
    assert!(status.success(), "exit status {status:?}");
    assert!(log.contains("HTTP/3: no longer accepting"), "{log}");
    assert!(
        signalled.elapsed() < Duration::from_secs(15),
        "drained, not timed out"
    );
}

#[tokio::test]
async fn meshserve_infer_fills_a_request_from_the_models_metadata() {
    let certs = certs();
    let (node, _dir) = h3_node(certs.path(), "");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_meshserve"))
        .args([
            "infer",
            "--http3",
            &node.http3.unwrap().to_string(),
            "--model",
            "mixed",
        ])
        .arg("--ca")
        .arg(certs.path().join("ca.pem"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{text}");
    assert!(text.contains("HTTP/3 200"), "{text}");
    // Every input of the model filled (INT64 ids, BOOL mask), so every output answered.
    for name in ["masked_sum", "any", "mean"] {
        assert!(text.contains(&format!("\"name\":\"{name}\"")), "{text}");
    }
}
