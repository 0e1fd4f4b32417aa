//! The route-aware client's HTTP/3 mode: the Open Inference Protocol over HTTP/3, with no
//! mesh certificate. It trusts the CA that signed the nodes' front-door certificates, sends
//! its first request for a model to a seed, reads the `meshserve-route` header of the answer
//! and from then on goes straight to a replica's HTTP/3 address (p2c over latency and load,
//! as [`super::MeshClient`] does over `meshserve/1`). One connection per node, many streams
//! on it. A replica that cannot be reached, or that answers 404 for the model, is dropped from
//! the table and the request retried elsewhere (inference is idempotent).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use meshserve::client::http3::{Http3Client, Http3ClientConfig};
//!
//! let config = Http3ClientConfig::new(vec!["127.0.0.1:8443".parse()?], "certs/ca.pem".as_ref())?;
//! let client = Http3Client::new(config)?;
//! let body = r#"{"inputs": [{"name": "features", "shape": [1, 32], "datatype": "FP32", "data": [0.0]}]}"#;
//! let answer = client.infer("fraud", body.into(), None).await?;
//! println!("{} from {}: {}", answer.status, answer.sent_to, String::from_utf8_lossy(&answer.body));
//! # Ok(()) }
//! ```

use super::routes::RouteBook;
use crate::pem::{self, TlsError};
use crate::routing::replicas::{self, Attempt, Retry, Unanswered};
use crate::routing::retry::{self, Attempts, Failed, RetryPolicy};
use crate::routing::{ROUTE_HEADER, parse_route_header};
use crate::wire::RouteHint;
use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, Method, Request, StatusCode};
use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::{CertificateDer, ServerName};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

type SendRequest = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

/// How an HTTP/3 client reaches the mesh.
#[derive(Clone)]
pub struct Http3ClientConfig {
    /// Nodes' HTTP/3 addresses to start from; any node will do.
    pub seeds: Vec<SocketAddr>,
    /// CA certificates that signed the nodes' front-door certificates.
    pub roots: Vec<CertificateDer<'static>>,
    /// The name to verify on every node's certificate; `None` verifies the address's IP.
    pub server_name: Option<String>,
    /// Longest a request may take, all its attempts together.
    pub timeout: Duration,
    /// Largest answer body accepted, in bytes.
    pub max_body_bytes: usize,
}

impl Http3ClientConfig {
    /// Defaults: 10 s per request, answers up to 64 MiB; trusts the CA in `ca`.
    pub fn new(seeds: Vec<SocketAddr>, ca: &Path) -> Result<Http3ClientConfig, TlsError> {
        Ok(Http3ClientConfig::new_with_roots(
            seeds,
            pem::read_certs(ca)?,
        ))
    }

    /// The same defaults, trusting `roots`.
    pub fn new_with_roots(
        seeds: Vec<SocketAddr>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Http3ClientConfig {
        Http3ClientConfig {
            seeds,
            roots,
            server_name: None,
            timeout: Duration::from_secs(10),
            max_body_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Why an HTTP/3 request failed.
#[derive(Debug, thiserror::Error)]
pub enum Http3Error {
    /// The TLS settings are unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The client's UDP socket could not be opened.
    #[error("cannot open a UDP socket: {0}")]
    Socket(std::io::Error),
    /// A node could not be reached or the exchange broke off.
    #[error("{addr}: {message}")]
    Exchange {
        /// The node.
        addr: SocketAddr,
        /// What went wrong.
        message: String,
    },
    /// No answer within the time the request had left.
    #[error("{addr}: no answer within {timeout:?}")]
    Timeout {
        /// The node.
        addr: SocketAddr,
        /// The time it had.
        timeout: Duration,
    },
    /// Every attempt failed; the last reason.
    #[error("no node could take the request after {attempts} attempts: {last}")]
    Exhausted {
        /// Attempts made.
        attempts: usize,
        /// The last failure.
        last: String,
    },
}

/// An answer, whatever its status, and the node it came from.
#[derive(Debug, Clone)]
pub struct Http3Response {
    /// The HTTP status.
    pub status: StatusCode,
    /// The response headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// The HTTP/3 address the request was sent to.
    pub sent_to: SocketAddr,
}

/// An HTTP/3 client of a meshserve mesh; share it behind an `Arc` and call it concurrently.
pub struct Http3Client {
    endpoint: quinn::Endpoint,
    config: Http3ClientConfig,
    /// Open connections by node, each with an id so a closed one removes only itself.
    connections: Arc<tokio::sync::Mutex<Connections>>,
    routes: RouteBook,
    retry: RetryPolicy,
}

#[derive(Default)]
struct Connections {
    open: HashMap<SocketAddr, (u64, SendRequest)>,
    next_id: u64,
}

impl Http3Client {
    /// A client; connects lazily, on the first request to each node.
    pub fn new(config: Http3ClientConfig) -> Result<Http3Client, Http3Error> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in &config.roots {
            roots
                .add(cert.clone())
                .map_err(|e| TlsError::Invalid(format!("CA certificate: {e}")))?;
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(pem::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Invalid(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![crate::http::http3::ALPN.to_vec()];
        let crypto = QuicClientConfig::try_from(tls)
            .map_err(|e| TlsError::Invalid(format!("QUIC TLS: {e}")))?;
        let bind: SocketAddr = if config.seeds.iter().any(SocketAddr::is_ipv6) {
            "[::]:0".parse().expect("a valid literal")
        } else {
            "0.0.0.0:0".parse().expect("a valid literal")
        };
        let mut endpoint = quinn::Endpoint::client(bind).map_err(Http3Error::Socket)?;
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        Ok(Http3Client {
            endpoint,
            config,
            connections: Arc::default(),
            retry: RetryPolicy::default(),
            routes: RouteBook::new(|replica| replica.http3),
        })
    }

    /// The route the client holds for `model`.
    pub fn route(&self, model: &str) -> Option<RouteHint> {
        self.routes.route(model)
    }

    /// The open HTTP/3 connection to `addr`, or a new one.
    async fn connection(&self, addr: SocketAddr) -> Result<SendRequest, Http3Error> {
        // Held while connecting, so concurrent first requests share one connection.
        let mut connections = self.connections.lock().await;
        if let Some((_, send)) = connections.open.get(&addr) {
            return Ok(send.clone());
        }
        let exchange = |message: String| Http3Error::Exchange { addr, message };
        let name = match &self.config.server_name {
            Some(name) => name.clone(),
            None => addr.ip().to_string(),
        };
        ServerName::try_from(name.as_str()).map_err(|e| exchange(format!("server name: {e}")))?;
        let connecting = self
            .endpoint
            .connect(addr, &name)
            .map_err(|e| exchange(e.to_string()))?;
        let connection = tokio::time::timeout(self.config.timeout, connecting)
            .await
            .map_err(|_| exchange("handshake timed out".into()))?
            .map_err(|e| exchange(e.to_string()))?;
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(connection))
            .await
            .map_err(|e| exchange(e.to_string()))?;
        let id = connections.next_id;
        connections.next_id += 1;
        connections.open.insert(addr, (id, send.clone()));
        let registry = Arc::downgrade(&self.connections);
        tokio::spawn(async move {
            let closed = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
            tracing::debug!(%addr, reason = %closed, "HTTP/3 connection closed");
            if let Some(registry) = registry.upgrade() {
                forget(&registry, addr, Some(id)).await;
            }
        });
        Ok(send)
    }

    /// Sends one request to `addr` and reads the whole answer.
    pub async fn request(
        &self,
        addr: SocketAddr,
        method: Method,
        path: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Http3Response, Http3Error> {
        self.request_within(addr, method, path, headers, body, self.config.timeout)
            .await
    }

    async fn request_within(
        &self,
        addr: SocketAddr,
        method: Method,
        path: &str,
        headers: HeaderMap,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Http3Response, Http3Error> {
        let attempt = self.exchange(addr, method, path, headers, body);
        let result = match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(Http3Error::Timeout { addr, timeout }),
        };
        if result.is_err() {
            forget(&self.connections, addr, None).await;
        }
        result
    }

    async fn exchange(
        &self,
        addr: SocketAddr,
        method: Method,
        path: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Http3Response, Http3Error> {
        let exchange = |message: String| Http3Error::Exchange { addr, message };
        let mut send = self.connection(addr).await?;
        let mut request = Request::builder()
            .method(method)
            .uri(format!("https://{addr}{path}"))
            .body(())
            .map_err(|e| exchange(e.to_string()))?;
        *request.headers_mut() = headers;
        let mut stream = send
            .send_request(request)
            .await
            .map_err(|e| exchange(e.to_string()))?;
        if !body.is_empty() {
            stream
                .send_data(body)
                .await
                .map_err(|e| exchange(e.to_string()))?;
        }
        stream.finish().await.map_err(|e| exchange(e.to_string()))?;
        let response = stream
            .recv_response()
            .await
            .map_err(|e| exchange(e.to_string()))?;
        let mut body = BytesMut::new();
        while let Some(mut chunk) = stream
            .recv_data()
            .await
            .map_err(|e| exchange(e.to_string()))?
        {
            if body.len() + chunk.remaining() > self.config.max_body_bytes {
                return Err(exchange(format!(
                    "answer larger than {} bytes",
                    self.config.max_body_bytes
                )));
            }
            while chunk.has_remaining() {
                let part = chunk.chunk();
                body.extend_from_slice(part);
                let taken = part.len();
                chunk.advance(taken);
            }
        }
        let (parts, ()) = response.into_parts();
        Ok(Http3Response {
            status: parts.status,
            headers: parts.headers,
            body: body.freeze(),
            sent_to: addr,
        })
    }

    /// Runs an OIP inference on `model` (`body` is JSON, or binary tensors when
    /// `binary_header_length` says where the JSON header ends): straight to a replica when the
    /// route is known, else through a seed, which forwards and names the replicas.
    pub async fn infer(
        &self,
        model: &str,
        body: Bytes,
        binary_header_length: Option<usize>,
    ) -> Result<Http3Response, Http3Error> {
        let mut headers = HeaderMap::new();
        match binary_header_length {
            Some(length) => {
                headers.insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/octet-stream"),
                );
                headers.insert(
                    crate::oip::HEADER_CONTENT_LENGTH,
                    http::HeaderValue::from(length),
                );
            }
            None => {
                headers.insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
            }
        }
        let path = format!("/v2/models/{model}/infer");
        self.routed(model, &path, headers, body, Replay::Safe).await
    }

    /// Calls the endpoint `name` with `body` (any body its pre-plugin understands, of
    /// `content_type`) and returns its answer as it is: straight to a replica once a forwarded
    /// answer named them. Plugins need not be idempotent, so a request is sent again to
    /// another node only when the one asked answered that it does not serve the endpoint.
    pub async fn invoke(
        &self,
        name: &str,
        body: Bytes,
        content_type: &str,
    ) -> Result<Http3Response, Http3Error> {
        let mut headers = HeaderMap::new();
        let content_type = http::HeaderValue::from_str(content_type)
            .unwrap_or(http::HeaderValue::from_static("application/octet-stream"));
        headers.insert(http::header::CONTENT_TYPE, content_type);
        let path = format!("/v1/endpoints/{name}/invocations");
        self.routed(name, &path, headers, body, Replay::BeforeSent)
            .await
    }

    /// Sends one request for `key` (a model or an endpoint) to a replica the route names, or
    /// a seed, retrying another one as the mesh's rule and `replay` allow.
    async fn routed(
        &self,
        key: &str,
        path: &str,
        headers: HeaderMap,
        body: Bytes,
        replay: Replay,
    ) -> Result<Http3Response, Http3Error> {
        let model = key;
        let mut attempts = Attempts::start(&self.retry, self.config.timeout, Instant::now());
        let mut targets = self.routes.targets(model, &self.config.seeds);
        let attempt = |(key, addr): (String, SocketAddr), left: Duration| {
            let (headers, body) = (headers.clone(), body.clone());
            async move {
                let started = Instant::now();
                let pending = self.routes.start(&key, started);
                let result = self
                    .request_within(addr, Method::POST, path, headers, body, left)
                    .await;
                let now = Instant::now();
                match result {
                    Ok(response) => {
                        let hint = response
                            .headers
                            .get(ROUTE_HEADER)
                            .and_then(|v| v.to_str().ok())
                            .and_then(parse_route_header);
                        self.routes.learn(hint);
                        // A replica the route named that answers 404 no longer serves the
                        // model: another is tried under the mesh's rule (a 503 is returned as
                        // it is: `crate::routing::retry`).
                        if response.status == StatusCode::NOT_FOUND
                            && self.routes.route(model).is_some()
                        {
                            pending.finish(None, now);
                            self.routes.forget(model, addr);
                            let retryable = retry::retryable(Failed::Moved);
                            return Attempt::Failed(
                                NoAnswer::Moved(response),
                                Retry::Rule { retryable },
                            );
                        }
                        pending.finish(Some(now - started), now);
                        Attempt::Answered(response)
                    }
                    Err(e) => {
                        pending.finish(None, now);
                        self.routes.forget(model, addr);
                        let timed_out = matches!(e, Http3Error::Timeout { .. });
                        // The request may have reached the node: sent again only when that is
                        // safe.
                        let retry = match replay {
                            Replay::BeforeSent => Retry::Never,
                            Replay::Safe => Retry::Rule {
                                retryable: retry::retryable(Failed::Lost { timed_out }),
                            },
                        };
                        Attempt::Failed(NoAnswer::Lost(e), retry)
                    }
                }
            }
        };
        match replicas::run(&mut targets, &mut attempts, attempt, |_, _, _| {}).await {
            Ok(response) => Ok(response),
            // The last replica asked said it does not serve the model: that is the answer.
            Err(Unanswered {
                last: Some(NoAnswer::Moved(response)),
                ..
            }) => Ok(response),
            Err(Unanswered { last, tried }) => Err(Http3Error::Exhausted {
                attempts: tried,
                last: match last {
                    Some(NoAnswer::Lost(e)) => e.to_string(),
                    _ => "no replica or seed known".into(),
                },
            }),
        }
    }
}

/// An attempt that did not end the request.
enum NoAnswer {
    /// A replica the route named answered 404: it no longer serves the model.
    Moved(Http3Response),
    /// The exchange failed without an answer.
    Lost(Http3Error),
}

/// Whether a request may be sent to another node after an attempt failed on the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replay {
    /// Whenever the retry rule allows (inference runs twice harmlessly).
    Safe,
    /// Never once it may have been sent (endpoint plugins need not be idempotent).
    BeforeSent,
}

/// Drops the connection to `addr` (only if it is still connection `id`, when given).
async fn forget(connections: &tokio::sync::Mutex<Connections>, addr: SocketAddr, id: Option<u64>) {
    let mut connections = connections.lock().await;
    if id.is_none_or(|id| {
        connections
            .open
            .get(&addr)
            .is_some_and(|(open, _)| *open == id)
    }) {
        connections.open.remove(&addr);
    }
}
