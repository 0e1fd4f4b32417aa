//! `meshserve-bench`, the load generator and benchmarks of meshserve, a crate of their own so
//! the product crate holds the product: closed-loop HTTP/1.1, HTTP/2 and HTTP/3 load with HDR-histogram
//! percentiles, the in-process ONNX Runtime loop that bounds what any server can reach, and
//! the suites that run them side by side against a freshly started node ([`suite`] for the
//! engine, [`plugins`] for WebAssembly plugins, [`protocols`] for HTTP/1.1, HTTP/2 and
//! HTTP/3).

pub mod floor;
pub mod grpc_stream;
pub mod machine;
pub mod mesh;
pub mod plot;
pub mod plugins;
pub mod protocols;
pub mod recsys;
pub mod skew;
pub mod suite;
pub mod wrk;

use bytes::Bytes;
use grpc_stream::{GrpcStream, StreamConnection};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use meshserve::client::body::{InputJson, RequestJson, sample_values};
use meshserve::client::http3::{Http3Client, Http3ClientConfig};
use meshserve_host::model::session::OnnxSession;
use meshserve_host::{DataType, Tensor};
use std::net::SocketAddr;
use std::path::Path;
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
    /// A request body cannot be made from the model's metadata.
    #[error(transparent)]
    Metadata(#[from] meshserve::client::body::MetadataError),
}

pub(crate) fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
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
    /// Latency per successful request, in µs; in an open loop, from when it was due.
    pub latency_us: Histogram<u64>,
    /// Open loop: the rate requests were due at.
    pub offered_rate: Option<f64>,
    /// Open loop: requests due in the measured window that had no answer when the run
    /// stopped (still queued, or in flight); counted in the latencies at their age then.
    pub unanswered: u64,
}

impl Report {
    /// Calls `call` for `warmup`, then times each call for `duration`, one after another on
    /// this thread; the first error ends the run.
    fn time_each<E>(
        rows: u64,
        warmup: Duration,
        duration: Duration,
        mut call: impl FnMut() -> Result<(), E>,
    ) -> Result<Report, E> {
        let mut report = Report::new(rows);
        let warm_until = Instant::now() + warmup;
        while Instant::now() < warm_until {
            call()?;
        }
        let start = Instant::now();
        while start.elapsed() < duration {
            let t = Instant::now();
            call()?;
            report.ok += 1;
            let _ = report
                .latency_us
                .record(t.elapsed().as_micros().max(1) as u64);
        }
        report.elapsed = start.elapsed();
        Ok(report)
    }

    fn new(rows: u64) -> Report {
        Report {
            ok: 0,
            errors: 0,
            rows,
            offered_rate: None,
            unanswered: 0,
            elapsed: Duration::ZERO,
            // 1 µs to 60 s at 3 significant digits.
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3)
                .expect("constant histogram bounds are valid"),
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
        self.unanswered += other.unanswered;
        let _ = self.latency_us.add(&other.latency_us);
    }
}

/// Which HTTP a load speaks, and over how many connections.
#[derive(Clone, Default)]
pub enum Protocol {
    /// HTTP/1.1, one connection per concurrent request; TLS with this client config.
    #[default]
    Http1,
    /// HTTP/1.1 over TLS.
    Http1Tls(Arc<rustls::ClientConfig>),
    /// HTTP/2 (h2c, prior knowledge), the concurrent requests spread over `connections`.
    Http2 {
        /// Connections to open.
        connections: usize,
        /// TLS (ALPN `h2`) with this client config; `None` for h2c.
        tls: Option<Arc<rustls::ClientConfig>>,
    },
    /// The OIP over gRPC on HTTP/2, the concurrent calls spread over `connections`; `body` is
    /// the gRPC-framed `ModelInferRequest` ([`grpc_infer_body`]).
    Grpc {
        /// Connections to open.
        connections: usize,
        /// TLS (ALPN `h2`) with this client config; `None` for h2c.
        tls: Option<Arc<rustls::ClientConfig>>,
        /// Each concurrent caller sends its requests over its own `ModelStreamInfer` stream,
        /// one at a time, instead of unary `ModelInfer` calls.
        stream: bool,
    },
    /// HTTP/3, the concurrent requests spread over `connections`.
    Http3 {
        /// Connections to open.
        connections: usize,
        /// CA certificates that signed the server's certificate.
        roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    },
}

impl std::fmt::Debug for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Http1 => "HTTP/1.1",
            Protocol::Http1Tls(_) => "HTTP/1.1 over TLS",
            Protocol::Http2 { tls: None, .. } => "HTTP/2 (h2c)",
            Protocol::Http2 { tls: Some(_), .. } => "HTTP/2 over TLS",
            Protocol::Grpc {
                tls: None,
                stream: false,
                ..
            } => "gRPC (h2c)",
            Protocol::Grpc {
                tls: Some(_),
                stream: false,
                ..
            } => "gRPC over TLS",
            Protocol::Grpc {
                tls: None,
                stream: true,
                ..
            } => "gRPC stream (h2c)",
            Protocol::Grpc {
                tls: Some(_),
                stream: true,
                ..
            } => "gRPC stream over TLS",
            Protocol::Http3 { .. } => "HTTP/3",
        })
    }
}

/// A TLS client config that trusts the CA certificates in `ca` and offers `alpn`.
pub fn tls_client(ca: &Path, alpn: &[u8]) -> Result<Arc<rustls::ClientConfig>, BenchError> {
    let invalid = |e: String| BenchError::Server(format!("TLS client: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    for cert in meshserve::pem::read_certs(ca).map_err(|e| invalid(e.to_string()))? {
        roots.add(cert).map_err(|e| invalid(e.to_string()))?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(meshserve::pem::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

/// How a load paces its requests.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum Pace {
    /// Closed loop: each of `concurrency` clients sends its next request as soon as the
    /// previous one is answered. Shows throughput; hides queueing (a slow server slows the
    /// clients down with it).
    #[default]
    Closed,
    /// Open loop: requests fall due at `rate` per second, evenly spaced, whatever the server
    /// does; `concurrency` caps those in flight. Latency runs from when a request was due, so
    /// one that waited for a free slot counts its wait (no coordinated omission), and past
    /// the server's capacity the percentiles grow instead of the send rate dropping.
    Open {
        /// Requests per second.
        rate: f64,
    },
}

/// An HTTP load: `concurrency` requests in flight at most, paced by `pace`.
#[derive(Debug, Clone)]
pub struct HttpLoad {
    /// The server.
    pub addr: SocketAddr,
    /// The protocol, TLS and connections.
    pub protocol: Protocol,
    /// Request path, e.g. `/v2/models/fraud/infer`.
    pub path: String,
    /// Request body (OIP JSON, or binary tensors with `headers` saying so).
    pub body: Bytes,
    /// Request headers; `content-type: application/json` unless given.
    pub headers: hyper::HeaderMap,
    /// Closed or open loop.
    pub pace: Pace,
    /// Rows per request, for samples/s.
    pub rows: u64,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Unmeasured time first, to warm caches, connections and the batcher.
    pub warmup: Duration,
    /// Measured time.
    pub duration: Duration,
}

/// Open-loop pacing: a thread of its own releases the `i`-th request at `start + i / rate`
/// (a tokio timer's millisecond would bunch 20 requests into each tick at 20,000/s), stamped
/// with the moment it was released. Clients take released requests in order; one that waits
/// because every client is busy waits in the queue, and that wait counts in its latency.
/// What the pacer's own sleep adds (tens of µs) does not: latency runs from the release.
struct Pacer {
    released: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<Instant>>,
}

impl Pacer {
    fn start(start: Instant, rate: f64, end: Instant) -> Result<Pacer, BenchError> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let interval = 1.0 / rate;
        std::thread::Builder::new()
            .name("bench-pacer".into())
            .spawn(move || {
                let due = |i: u64| start + Duration::from_secs_f64(i as f64 * interval);
                let mut next = 0u64;
                while due(next) < end {
                    let now = Instant::now();
                    if due(next) > now {
                        std::thread::sleep(due(next) - now);
                    }
                    let now = Instant::now();
                    while due(next) <= now && due(next) < end {
                        if tx.send(now).is_err() {
                            return;
                        }
                        next += 1;
                    }
                }
            })
            .map_err(io_error("start the pacing thread"))?;
        Ok(Pacer {
            released: tokio::sync::Mutex::new(rx),
        })
    }

    /// The next released request's release time; `None` once the pacer is done and every
    /// request it released has been taken.
    async fn take(&self) -> Option<Instant> {
        self.released.lock().await.recv().await
    }
}

/// How long an open loop keeps answering what fell due before the end of its window.
fn drain_time(duration: Duration) -> Duration {
    (duration / 2).max(Duration::from_secs(1))
}

/// Runs `load` and returns what it measured. Must run inside a tokio runtime.
pub async fn run_http(load: &HttpLoad) -> Result<Report, BenchError> {
    // Every connection first: an open loop's clock must not start while the generator is
    // still connecting, or its own set-up would count as the server's queueing. HTTP/2 and
    // HTTP/3 share their connections among the concurrent requests; HTTP/1.1 needs one each.
    let workers = load.concurrency.max(1);
    let connections = match &load.protocol {
        Protocol::Http2 { connections, .. }
        | Protocol::Grpc { connections, .. }
        | Protocol::Http3 { connections, .. } => (*connections).max(1),
        Protocol::Http1 | Protocol::Http1Tls(_) => workers,
    };
    let mut callers = Vec::with_capacity(workers);
    if let Protocol::Grpc {
        tls, stream: true, ..
    } = &load.protocol
    {
        let mut opened = Vec::with_capacity(connections);
        for _ in 0..connections {
            opened.push(stream_connection(load.addr, tls.as_ref()).await?);
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        let authority = load.addr.to_string();
        for worker in 0..workers {
            let connection = &opened[worker % opened.len()];
            let stream =
                GrpcStream::open(connection, scheme, &authority, &load.path, &load.headers).await?;
            callers.push(Caller::Stream(stream));
        }
    } else {
        let mut opened = Vec::with_capacity(connections);
        for _ in 0..connections {
            opened.push(Sender::connect(load).await?);
        }
        for worker in 0..workers {
            callers.push(Caller::Shared(opened[worker % opened.len()].clone()));
        }
    }
    let start = Instant::now();
    let window = Window {
        measure_from: start + load.warmup,
        end: start + load.warmup + load.duration,
        stop: start + load.warmup + load.duration + drain_time(load.duration),
    };
    let pacer = match load.pace {
        Pace::Open { rate } if rate > 0.0 => Some(Arc::new(Pacer::start(start, rate, window.end)?)),
        _ => None,
    };
    let total = Arc::new(Mutex::new(Report::new(load.rows)));
    let mut tasks = Vec::with_capacity(callers.len());
    for caller in callers {
        let load = load.clone();
        let total = total.clone();
        let pacer = pacer.clone();
        tasks.push(tokio::spawn(async move {
            let report = request_loop(&load, caller, pacer.as_deref(), window).await?;
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
    if let Pace::Open { rate } = load.pace {
        report.offered_rate = Some(rate);
    }
    Ok(report)
}

/// The times a run is measured between: requests due (or sent) from `measure_from` until
/// `end` count; an open loop stops waiting for answers at `stop`.
#[derive(Debug, Clone, Copy)]
struct Window {
    measure_from: Instant,
    end: Instant,
    stop: Instant,
}

/// Boxed TCP or TLS stream, so one HTTP handshake serves both.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// `GET path` on `load`'s server, over its protocol, as JSON (a model's metadata).
pub async fn get_json(load: &HttpLoad, path: &str) -> Result<serde_json::Value, BenchError> {
    let sender = Sender::connect(load).await?;
    let (status, body) = sender
        .exchange(load, hyper::Method::GET, path, Bytes::new())
        .await?;
    if !status.is_success() {
        return Err(BenchError::Server(format!(
            "GET {path}: {status}: {}",
            String::from_utf8_lossy(&body)
        )));
    }
    serde_json::from_slice(&body)
        .map_err(|e| BenchError::Server(format!("GET {path}: not JSON: {e}")))
}

/// `load`'s headers, with a JSON content type unless it sets one.
fn request_headers(load: &HttpLoad) -> hyper::HeaderMap {
    let mut headers = load.headers.clone();
    headers
        .entry(hyper::header::CONTENT_TYPE)
        .or_insert(hyper::header::HeaderValue::from_static("application/json"));
    headers
}

/// One connection's way of sending a request (HTTP/2 and HTTP/3 ones are shared).
#[derive(Clone)]
enum Sender {
    Http1(Arc<tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<Full<Bytes>>>>),
    /// HTTP/2 through `h2` itself: hyper's client pipes a request body from a task of its
    /// own once the stream has opened, so each request went out as two writes (HEADERS, then
    /// DATA), each waking the server; `h2` sends a body given with the request in the same
    /// write, as gRPC's own clients (and h2load) do.
    Http2(h2::client::SendRequest<Bytes>),
    Http3(Arc<Http3Client>),
}

impl Sender {
    async fn tcp(
        addr: SocketAddr,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> Result<Box<dyn Io>, BenchError> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(io_error(format!("connect to {addr}")))?;
        stream
            .set_nodelay(true)
            .map_err(io_error("set TCP_NODELAY"))?;
        let Some(tls) = tls else {
            return Ok(Box::new(stream));
        };
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, stream)
            .await
            .map_err(io_error(format!("TLS handshake with {addr}")))?;
        Ok(Box::new(stream))
    }

    async fn connect(load: &HttpLoad) -> Result<Sender, BenchError> {
        let handshake = |e: hyper::Error| BenchError::Server(format!("HTTP handshake: {e}"));
        match &load.protocol {
            Protocol::Http1 | Protocol::Http1Tls(_) => {
                let tls = match &load.protocol {
                    Protocol::Http1Tls(tls) => Some(tls),
                    _ => None,
                };
                let io = Sender::tcp(load.addr, tls).await?;
                let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                    .await
                    .map_err(handshake)?;
                tokio::spawn(connection);
                Ok(Sender::Http1(Arc::new(tokio::sync::Mutex::new(sender))))
            }
            Protocol::Http2 { tls, .. } | Protocol::Grpc { tls, .. } => {
                let io = Sender::tcp(load.addr, tls.as_ref()).await?;
                let (sender, connection) = h2::client::handshake(io)
                    .await
                    .map_err(|e| BenchError::Server(format!("HTTP/2 handshake: {e}")))?;
                tokio::spawn(connection);
                Ok(Sender::Http2(sender))
            }
            Protocol::Http3 { roots, .. } => {
                let config = Http3ClientConfig::new_with_roots(vec![load.addr], roots.clone());
                let client = Http3Client::new(config)
                    .map_err(|e| BenchError::Server(format!("HTTP/3 client: {e}")))?;
                Ok(Sender::Http3(Arc::new(client)))
            }
        }
    }

    /// Sends `load`'s request and returns the answer's status and body.
    async fn send(&self, load: &HttpLoad) -> Result<(StatusCode, Bytes), BenchError> {
        self.exchange(load, hyper::Method::POST, &load.path, load.body.clone())
            .await
    }

    /// Sends `method path` with `body` (and `load`'s headers) over this connection.
    async fn exchange(
        &self,
        load: &HttpLoad,
        method: hyper::Method,
        path: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), BenchError> {
        let failed = |e: String| BenchError::Server(format!("request failed: {e}"));
        let response = match self {
            Sender::Http3(client) => {
                let answer = client
                    .request(load.addr, method, path, request_headers(load), body)
                    .await
                    .map_err(|e| failed(e.to_string()))?;
                return Ok((answer.status, answer.body));
            }
            Sender::Http1(sender) => {
                let mut request = Request::builder()
                    .method(method)
                    .uri(path)
                    .body(Full::new(body))
                    .map_err(|e| failed(e.to_string()))?;
                *request.headers_mut() = request_headers(load);
                request.headers_mut().insert(
                    hyper::header::HOST,
                    hyper::header::HeaderValue::from_str(&load.addr.to_string())
                        .map_err(|e| failed(e.to_string()))?,
                );
                sender.lock().await.send_request(request).await
            }
            Sender::Http2(sender) => {
                let scheme = match &load.protocol {
                    Protocol::Http2 { tls: Some(_), .. } | Protocol::Grpc { tls: Some(_), .. } => {
                        "https"
                    }
                    _ => "http",
                };
                let grpc =
                    matches!(load.protocol, Protocol::Grpc { .. }) && method == hyper::Method::POST;
                let mut request = Request::builder()
                    .method(method)
                    .uri(format!("{scheme}://{}{path}", load.addr))
                    .body(())
                    .map_err(|e| failed(e.to_string()))?;
                *request.headers_mut() = request_headers(load);
                if grpc {
                    grpc_stream::mark_grpc(request.headers_mut());
                }
                return h2_exchange(sender, request, body, grpc).await;
            }
        }
        .map_err(|e| failed(e.to_string()))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| BenchError::Server(format!("reading response: {e}")))?
            .to_bytes();
        Ok((status, body))
    }
}

/// How one concurrent caller sends: over a connection it may share, or over its own stream.
enum Caller {
    Shared(Sender),
    Stream(GrpcStream),
}

impl Caller {
    async fn send(&mut self, load: &HttpLoad) -> Result<(StatusCode, Bytes), BenchError> {
        match self {
            Caller::Shared(sender) => sender.send(load).await,
            Caller::Stream(stream) => stream.call(load.body.clone()).await,
        }
    }
}

/// An HTTP/2 connection for streaming calls, over TCP or TLS.
async fn stream_connection(
    addr: SocketAddr,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<StreamConnection, BenchError> {
    let io = Sender::tcp(addr, tls).await?;
    let (connection, driver) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| BenchError::Server(format!("HTTP handshake: {e}")))?;
    tokio::spawn(driver);
    Ok(connection)
}

/// One request over an HTTP/2 connection, its body (if any) sent with its headers; a gRPC
/// answer is reported by [`grpc_status`].
async fn h2_exchange(
    sender: &h2::client::SendRequest<Bytes>,
    request: Request<()>,
    body: Bytes,
    grpc: bool,
) -> Result<(StatusCode, Bytes), BenchError> {
    let failed = |e: h2::Error| BenchError::Server(format!("request failed: {e}"));
    let mut sender = sender.clone().ready().await.map_err(failed)?;
    let (response, mut send) = sender
        .send_request(request, body.is_empty())
        .map_err(failed)?;
    if !body.is_empty() {
        send.send_data(body, true).map_err(failed)?;
    }
    let response = response.await.map_err(failed)?;
    let status = response.status();
    let in_headers = response.headers().get("grpc-status").cloned();
    let mut received = response.into_body();
    let mut answer = bytes::BytesMut::new();
    let reading = |e: h2::Error| BenchError::Server(format!("reading response: {e}"));
    while let Some(chunk) = received.data().await {
        let chunk = chunk.map_err(reading)?;
        received
            .flow_control()
            .release_capacity(chunk.len())
            .map_err(reading)?;
        answer.extend_from_slice(&chunk);
    }
    let answer = answer.freeze();
    if !grpc {
        return Ok((status, answer));
    }
    let trailers = received.trailers().await.map_err(reading)?;
    let code = in_headers.or_else(|| trailers.and_then(|t| t.get("grpc-status").cloned()));
    Ok((grpc_status(code.as_ref()), answer))
}

/// A gRPC answer as the HTTP status its `grpc-status` means (in the trailers, or in the
/// headers of a trailers-only answer), so the report counts failures as it does for REST.
fn grpc_status(code: Option<&hyper::header::HeaderValue>) -> StatusCode {
    match code.map(|c| c.as_bytes()) {
        Some(b"0") => StatusCode::OK,
        // UNAVAILABLE and RESOURCE_EXHAUSTED: the node's "try later".
        Some(b"14") | Some(b"8") => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The path of the OIP unary inference call over gRPC.
pub const GRPC_INFER_PATH: &str = "/inference.GRPCInferenceService/ModelInfer";

/// An OIP JSON infer body for `model` as one gRPC-framed `ModelInferRequest` (tensors in
/// `raw_input_contents`, as tritonclient sends them).
pub fn grpc_infer_body(model: &str, json: &Bytes) -> Result<Bytes, BenchError> {
    use meshserve::http::grpc::proto::ModelInferRequest;
    use meshserve::http::grpc::proto::model_infer_request::InferInputTensor;
    use prost::Message;
    let decoded = meshserve::oip::decode_request(model, None, json, None)
        .map_err(|e| BenchError::Server(format!("the request body: {e}")))?;
    let mut message = ModelInferRequest {
        model_name: model.to_string(),
        ..Default::default()
    };
    for tensor in decoded.request.inputs {
        message.inputs.push(InferInputTensor {
            name: tensor.name,
            datatype: tensor.datatype.as_str().to_string(),
            shape: tensor.shape,
            ..Default::default()
        });
        message.raw_input_contents.push(tensor.data);
    }
    let encoded = message.encode_to_vec();
    let length = u32::try_from(encoded.len())
        .map_err(|_| BenchError::Server("the request is over 4 GiB".into()))?;
    let mut framed = Vec::with_capacity(5 + encoded.len());
    framed.push(0); // not compressed
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(&encoded);
    Ok(framed.into())
}

async fn request_loop(
    load: &HttpLoad,
    mut caller: Caller,
    pacer: Option<&Pacer>,
    window: Window,
) -> Result<Report, BenchError> {
    let mut report = Report::new(load.rows);
    let age_us = |since: Instant, at: Instant| (at - since).as_micros().max(1) as u64;
    loop {
        // When the request's latency starts: its send (closed loop) or its release (open).
        let since = match pacer {
            None => {
                let now = Instant::now();
                if now >= window.end {
                    break;
                }
                now
            }
            Some(pacer) => {
                let Some(since) = pacer.take().await else {
                    break;
                };
                if Instant::now() >= window.stop {
                    // Still queued when the run stops: unanswered, at its age then.
                    if since >= window.measure_from {
                        report.unanswered += 1;
                        let _ = report.latency_us.record(age_us(since, window.stop));
                    }
                    continue;
                }
                since
            }
        };
        let answer = match pacer {
            None => Some(caller.send(load).await?),
            Some(_) => match tokio::time::timeout_at(window.stop.into(), caller.send(load)).await {
                Ok(answer) => Some(answer?),
                Err(_) => None,
            },
        };
        if since < window.measure_from {
            continue;
        }
        match answer {
            None => {
                report.unanswered += 1;
                let _ = report.latency_us.record(age_us(since, window.stop));
            }
            Some((status, _)) if status.is_success() => {
                report.ok += 1;
                let _ = report.latency_us.record(age_us(since, Instant::now()));
            }
            Some((status, body)) => {
                report.errors += 1;
                if report.errors == 1 {
                    tracing::warn!(%status, body = %String::from_utf8_lossy(&body), "server answered with an error");
                }
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
    Report::time_each(rows, warmup, duration, || {
        session
            .run(inputs)
            .map(drop)
            .map_err(|e| BenchError::Model(e.to_string()))
    })
}

/// An OIP JSON body with one FP32 input of shape `[rows, width]`.
pub fn fp32_request_body(input: &str, rows: usize, width: usize) -> Bytes {
    let values = sample_values(rows * width, 7);
    let body = RequestJson {
        inputs: vec![InputJson {
            name: input,
            shape: vec![rows as i64, width as i64],
            datatype: "FP32",
            parameters: None,
            data: Some(serde_json::json!(values)),
        }],
    };
    Bytes::from(serde_json::to_string(&body).unwrap_or_default())
}

pub(crate) fn fp32_tensor(input: &str, rows: usize, width: usize) -> Tensor {
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

/// A `meshserve serve` child process, killed when dropped.
pub struct ServerProcess(Child);

impl ServerProcess {
    /// CPU time the process has used (see [`process_cpu_time`]).
    pub fn cpu_time(&self) -> Option<Duration> {
        process_cpu_time(self.0.id())
    }
}

/// CPU time process `pid` has used in all its threads, ended ones included (from
/// `/proc/<pid>/stat`, in 10 ms ticks; `None` where there is no such file).
pub fn process_cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: count fields after it.
    let after_name = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime, fields 14 and 15 of the line, in USER_HZ ticks (100 per second in the
    // /proc ABI on every architecture Linux runs on).
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

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

/// Starts `meshserve-bench floor-server` (this binary) on a free port, a process of its own as
/// the node is, and waits until it answers.
pub(crate) async fn start_floor(
    io_threads: Option<usize>,
) -> Result<(ServerProcess, SocketAddr), BenchError> {
    let binary = std::env::current_exe().map_err(io_error("find meshserve-bench itself"))?;
    spawn_ready(&binary, |addr| {
        let mut args: Vec<std::ffi::OsString> = vec![
            "floor-server".into(),
            "--listen".into(),
            addr.to_string().into(),
        ];
        if let Some(threads) = io_threads {
            args.extend(["--io-threads".into(), threads.to_string().into()]);
        }
        args
    })
    .await
}

/// Starts `binary serve --http <free port> <args>` and waits until it reports ready.
pub async fn start_server(
    binary: &Path,
    args: &[&std::ffi::OsStr],
) -> Result<(ServerProcess, SocketAddr), BenchError> {
    spawn_ready(binary, |addr| {
        let mut all: Vec<std::ffi::OsString> =
            vec!["serve".into(), "--http".into(), addr.to_string().into()];
        all.extend(args.iter().map(|a| a.to_os_string()));
        all
    })
    .await
}

/// Starts `binary` with the arguments `args` makes for a free loopback port, and waits (30 s
/// at most) until it answers its readiness route there.
async fn spawn_ready(
    binary: &Path,
    args: impl FnOnce(SocketAddr) -> Vec<std::ffi::OsString>,
) -> Result<(ServerProcess, SocketAddr), BenchError> {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let child = Command::new(binary)
        .args(args(addr))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .map_err(io_error(format!("start {}", binary.display())))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grpc_body_is_one_framed_message_with_the_same_tensors() {
        use prost::Message;
        let json = fp32_request_body("features", 2, 32);
        let framed = grpc_infer_body("fraud", &json).unwrap();
        assert_eq!(framed[0], 0, "not compressed");
        let length = u32::from_be_bytes([framed[1], framed[2], framed[3], framed[4]]) as usize;
        assert_eq!(length, framed.len() - 5);
        let message =
            meshserve::http::grpc::proto::ModelInferRequest::decode(&framed[5..]).unwrap();
        assert_eq!(message.model_name, "fraud");
        let sent = meshserve::http::grpc::tensors::decode_request(message).unwrap();
        let want = meshserve::oip::decode_request("fraud", None, &json, None).unwrap();
        assert_eq!(sent.request.inputs, want.request.inputs);
    }

    #[test]
    fn the_fp32_body_names_its_datatype_before_its_data() {
        let text = String::from_utf8(fp32_request_body("x", 1, 2).to_vec()).unwrap();
        assert!(
            text.find("\"datatype\"").unwrap() < text.find("\"data\"").unwrap(),
            "{text}"
        );
    }
    use floor::FloorConfig;

    /// A floor server of known capacity: one request at a time, 2 ms each (500 req/s).
    async fn slow_server() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(floor::serve(
            listener,
            FloorConfig {
                service_time: Duration::from_millis(2),
                capacity: 1,
            },
        ));
        addr
    }

    fn open_load(addr: SocketAddr, rate: f64) -> HttpLoad {
        HttpLoad {
            addr,
            protocol: Protocol::Http1,
            path: "/v2/models/fraud/infer".into(),
            body: fp32_request_body("features", 1, 32),
            headers: hyper::HeaderMap::new(),
            pace: Pace::Open { rate },
            rows: 1,
            concurrency: 32,
            warmup: Duration::ZERO,
            duration: Duration::from_secs(1),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn past_capacity_the_open_loop_reports_queueing_not_a_lower_send_rate() {
        let addr = slow_server().await;
        let under = run_http(&open_load(addr, 100.0)).await.unwrap();
        let over = run_http(&open_load(addr, 1500.0)).await.unwrap();
        for (report, rate) in [(&under, 100.0), (&over, 1500.0)] {
            let accounted = report.ok + report.errors + report.unanswered;
            assert!(
                (accounted as f64 - rate).abs() <= 2.0,
                "every request due in the window is accounted for at {rate}/s: {accounted}"
            );
            assert_eq!(report.offered_rate, Some(rate));
        }
        assert_eq!(under.unanswered, 0);
        assert!(
            under.percentile_us(0.99) < 50_000,
            "{}",
            under.percentile_us(0.99)
        );
        // 1500/s into 500/s: the backlog grows all second long, and the latency from the due
        // time shows it, for the answered and the unanswered alike.
        assert!(
            over.percentile_us(0.99) > 20 * under.percentile_us(0.99)
                && over.percentile_us(0.99) > 300_000,
            "p99 {} µs over capacity, {} µs under",
            over.percentile_us(0.99),
            under.percentile_us(0.99)
        );
        assert!(over.unanswered > 0, "the backlog outlived the drain");
        assert!(
            over.requests_per_second() < 1100.0,
            "answered at about the server's capacity: {}",
            over.requests_per_second()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_floor_server_answers_the_fixed_oip_response() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(floor::serve(listener, FloorConfig::default()));
        let load = HttpLoad {
            pace: Pace::Closed,
            concurrency: 2,
            duration: Duration::from_millis(300),
            ..open_load(addr, 1.0)
        };
        let sender = Sender::connect(&load).await.unwrap();
        let (status, body) = sender.send(&load).await.unwrap();
        assert_eq!(status, 200);
        let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(answer["outputs"][0]["name"], "probabilities");
        let report = run_http(&load).await.unwrap();
        assert!(report.ok > 10 && report.errors == 0, "{} ok", report.ok);
    }
}
