//! One body reader for every route, on every door: each POST route refuses a body over
//! `max_body_bytes` (413) and one slower than `body_read_timeout_ms` (408), over HTTP/1.1,
//! HTTP/2 and HTTP/3, and a route that takes no body refuses one. Before this, the repository
//! index read its body unbounded and untimed, so unfinished bodies there held connections and
//! memory past every limit.

mod support;

use bytes::{Buf, Bytes};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use support::{TestNode, make_certs, plugin, start_with_config};
use tokio::sync::mpsc;

const MAX_BODY: usize = 4096;
const READ_TIMEOUT: Duration = Duration::from_millis(600);

/// Every POST route, at a path that reaches its handler (admin routes from loopback).
const POST_ROUTES: &[&str] = &[
    "/v2/models/fraud/infer",
    "/v2/models/fraud/versions/1/infer",
    "/v2/models/top/infer",
    "/v1/endpoints/top/invocations",
    "/v2/repository/index",
    "/v2/repository/models/fraud/load",
    "/v2/repository/models/fraud/unload",
    "/v1/endpoints/top/reload",
];

fn node(certs: &std::path::Path) -> (TestNode, tempfile::TempDir) {
    plugin("top_k");
    start_with_config(&format!(
        r#"
[http]
listen = "127.0.0.1:0"
max_body_bytes = {MAX_BODY}
body_read_timeout_ms = {}

[http3]
listen = "127.0.0.1:0"
tls_cert = "{}"
tls_key = "{}"

[endpoints.top]
model = "fraud"
post = {{ path = "{{plugins}}/top_k.wasm", config = '{{"labels": ["legit", "fraud"], "k": 2}}' }}
"#,
        READ_TIMEOUT.as_millis(),
        certs.join("server.pem").display(),
        certs.join("server.key").display(),
    ))
}

/// A request body fed from a channel: it ends when the sender is dropped.
struct Fed(mpsc::Receiver<Bytes>);

impl http_body::Body for Fed {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(http_body::Frame::data(b))))
    }
}

#[derive(Clone, Copy, Debug)]
enum Tcp {
    Http1,
    Http2,
}

/// Sends `chunks` as the body of `POST path` (or `method`), keeping the body open for
/// `hold` after the last chunk; the response status and how long it took.
async fn over_tcp(
    addr: SocketAddr,
    protocol: Tcp,
    method: &str,
    path: &str,
    content_length: Option<usize>,
    chunks: Vec<Bytes>,
    hold: Duration,
) -> (u16, Duration) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let io = TokioIo::new(stream);
    let (tx, rx) = mpsc::channel(16);
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json");
    if let Some(n) = content_length {
        request = request.header("content-length", n);
    }
    let request = request.body(Fed(rx)).unwrap();
    let started = Instant::now();
    tokio::spawn(async move {
        for chunk in chunks {
            if tx.send(chunk).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(hold).await;
        drop(tx);
    });
    let response = match protocol {
        Tcp::Http1 => {
            let (mut send, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(connection);
            send.send_request(request).await
        }
        Tcp::Http2 => {
            let (mut send, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(connection);
            send.send_request(request).await
        }
    };
    let response = response.unwrap_or_else(|e| panic!("{protocol:?} {path}: {e}"));
    let status = response.status().as_u16();
    let _ = response.into_body().collect().await;
    (status, started.elapsed())
}

fn h3_config(certs: &std::path::Path) -> quinn::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in meshserve::pem::read_certs(&certs.join("ca.pem")).unwrap() {
        roots.add(cert).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(meshserve::pem::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ))
}

/// The same over HTTP/3 on a fresh connection.
async fn over_h3(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    method: &str,
    path: &str,
    chunks: Vec<Bytes>,
    hold: Duration,
) -> (u16, Duration) {
    let connection = endpoint.connect(addr, "127.0.0.1").unwrap().await.unwrap();
    let (mut driver, mut send) = h3::client::new(h3_quinn::Connection::new(connection))
        .await
        .unwrap();
    tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
    let request = http::Request::builder()
        .method(method)
        .uri(format!("https://127.0.0.1{path}"))
        .body(())
        .unwrap();
    let started = Instant::now();
    let stream = send.send_request(request).await.unwrap();
    let (mut sender, mut receiver) = stream.split();
    tokio::spawn(async move {
        for chunk in chunks {
            if sender.send_data(chunk).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(hold).await;
        let _ = sender.finish().await;
    });
    let response = receiver.recv_response().await.unwrap();
    while let Ok(Some(mut chunk)) = receiver.recv_data().await {
        chunk.advance(chunk.remaining());
    }
    (response.status().as_u16(), started.elapsed())
}

/// A body larger than the limit, in frames of 1 KiB.
fn large() -> Vec<Bytes> {
    vec![Bytes::from(vec![b' '; 1024]); 2 * MAX_BODY / 1024]
}

/// A few bytes of a body, the rest never sent in time.
fn trickle() -> Vec<Bytes> {
    vec![Bytes::from_static(b"{\"in")]
}

/// Far longer than the read timeout: a body still open when the node must have answered.
const STALL: Duration = Duration::from_secs(10);

fn check_slow(label: &str, (status, took): (u16, Duration)) {
    assert_eq!(status, 408, "{label}: a slow body is 408");
    assert!(
        took < READ_TIMEOUT + Duration::from_millis(1500),
        "{label}: answered after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_post_route_bounds_its_body_in_size_and_time_on_every_http_version() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path(), &[], &[], &["127.0.0.1"]);
    let (node, _dir) = node(certs.path());
    let h3_addr = node.http3.expect("HTTP/3 is on");
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(h3_config(certs.path()));

    for path in POST_ROUTES {
        for protocol in [Tcp::Http1, Tcp::Http2] {
            let label = format!("{protocol:?} POST {path}");
            // Declared too large: refused before a byte of it is read.
            let (status, _) = over_tcp(
                node.addr,
                protocol,
                "POST",
                path,
                Some(2 * MAX_BODY),
                large(),
                Duration::ZERO,
            )
            .await;
            assert_eq!(status, 413, "{label} with a large declared length");
            // Undeclared, too large as it arrives.
            let (status, _) =
                over_tcp(node.addr, protocol, "POST", path, None, large(), STALL).await;
            assert_eq!(status, 413, "{label} with a large streamed body");
            check_slow(
                &label,
                over_tcp(
                    node.addr,
                    protocol,
                    "POST",
                    path,
                    Some(100),
                    trickle(),
                    STALL,
                )
                .await,
            );
        }
        let label = format!("HTTP/3 POST {path}");
        let (status, _) = over_h3(&endpoint, h3_addr, "POST", path, large(), STALL).await;
        assert_eq!(status, 413, "{label} with a large body");
        check_slow(
            &label,
            over_h3(&endpoint, h3_addr, "POST", path, trickle(), STALL).await,
        );
    }

    // Routes that take no body refuse one, and still answer without one.
    for path in ["/v2/health/live", "/v2/models/fraud", "/metrics"] {
        for protocol in [Tcp::Http1, Tcp::Http2] {
            let body = vec![Bytes::from_static(b"{}")];
            let (status, _) = over_tcp(
                node.addr,
                protocol,
                "GET",
                path,
                Some(2),
                body,
                Duration::ZERO,
            )
            .await;
            assert_eq!(status, 413, "{protocol:?} GET {path} with a body");
            let (status, _) = over_tcp(
                node.addr,
                protocol,
                "GET",
                path,
                None,
                Vec::new(),
                Duration::ZERO,
            )
            .await;
            assert_eq!(status, 200, "{protocol:?} GET {path}");
        }
        let (status, _) = over_h3(
            &endpoint,
            h3_addr,
            "GET",
            path,
            vec![Bytes::from_static(b"{}")],
            Duration::ZERO,
        )
        .await;
        assert_eq!(status, 413, "HTTP/3 GET {path} with a body");
        let (status, _) =
            over_h3(&endpoint, h3_addr, "GET", path, Vec::new(), Duration::ZERO).await;
        assert_eq!(status, 200, "HTTP/3 GET {path}");
    }

    // The node still serves, and the model unloaded above loads again.
    let http = reqwest::Client::new();
    let load = http
        .post(node.url("/v2/repository/models/fraud/load"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(load.status(), 200, "tritonclient's load body is accepted");
    let override_config = http
        .post(node.url("/v2/repository/models/fraud/load"))
        .body(r#"{"parameters":{"config":"{}"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(override_config.status(), 400);
    let live = http.get(node.url("/v2/health/live")).send().await.unwrap();
    assert_eq!(live.status(), 200);
}

/// One HTTP/1.1 response read off a raw connection: its status, whether it said
/// `connection: close`, or `None` when the connection closed before a response came.
async fn read_response(
    stream: &mut tokio::io::BufReader<tokio::net::TcpStream>,
) -> Option<(u16, bool)> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let mut line = String::new();
    if stream.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let status: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
    let (mut length, mut close) = (0usize, false);
    loop {
        line.clear();
        stream.read_line(&mut line).await.ok()?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().ok()?,
            "connection" => close |= value.trim().eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await.ok()?;
    Some((status, close))
}

#[tokio::test]
async fn answers_given_before_the_body_is_read_keep_an_http1_connection_usable_or_close_it_cleanly()
{
    use tokio::io::AsyncWriteExt;
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path(), &[], &[], &["127.0.0.1"]);
    let (node, _dir) = node(certs.path());
    // Early answers: an unknown model or endpoint, a version not served, a route that takes no
    // body, a body over the limit but small enough to drain; then one declared far too large,
    // sent without its body (the client waits for the 413, as `expect: 100-continue` would).
    let small = format!(r#"{{"inputs": [], "padding": "{}"}}"#, "x".repeat(2000));
    let cases: Vec<(&str, usize, bool, u16)> = vec![
        ("POST /v2/models/nope/infer", small.len(), true, 404),
        (
            "POST /v1/endpoints/nope/invocations",
            small.len(),
            true,
            404,
        ),
        (
            "POST /v2/models/fraud/versions/9/infer",
            small.len(),
            true,
            404,
        ),
        ("GET /v2/models/fraud/ready", small.len(), true, 413),
        ("POST /v2/models/fraud/infer", 2 * MAX_BODY, true, 413),
        ("POST /v2/models/fraud/infer", 1 << 20, false, 413),
    ];
    let connect = || async {
        let stream = tokio::net::TcpStream::connect(node.addr).await.unwrap();
        // Head and body go as two writes, which Nagle's algorithm would hold for an ACK.
        stream.set_nodelay(true).unwrap();
        tokio::io::BufReader::new(stream)
    };
    let mut stream = connect().await;
    let (mut reused, mut closed_cleanly) = (0, 0);
    for round in 0..300 {
        let (line, length, send_body, expected) = cases[round % cases.len()];
        let head = format!(
            "{line} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n\r\n"
        );
        // Every other request sends its body a moment after its head, so that the answer is
        // written while the body is still on its way.
        if let Err(e) = stream.get_mut().write_all(head.as_bytes()).await {
            panic!(
                "request {round} ({line}): the last answer kept the connection, which then failed: {e}"
            );
        }
        if round % 2 == 1 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if send_body {
            let body = if length == small.len() {
                small.clone()
            } else {
                "y".repeat(length)
            };
            stream.get_mut().write_all(body.as_bytes()).await.unwrap();
        }
        let (status, close) = read_response(&mut stream).await.unwrap_or_else(|| {
            panic!("request {round} ({line}): the connection closed without an answer")
        });
        assert_eq!(status, expected, "request {round} ({line})");
        if close {
            closed_cleanly += 1;
            stream = connect().await;
        } else {
            reused += 1;
        }
    }
    // Small bodies are drained and the connection kept; the one far too large closes it,
    // saying so.
    assert_eq!(closed_cleanly, 300 / cases.len(), "reused {reused}");
    assert_eq!(reused, 300 - 300 / cases.len());
}
