//! The TCP front door: HTTP/1.1 and HTTP/2 (h2c by prior knowledge, or ALPN `h2` under TLS)
//! on one port, serving one router, with graceful shutdown that lets in-flight requests end.
//!
//! Every connection is bounded: headers must arrive within `header_read_timeout` (HTTP/1.1,
//! through hyper's timer, which also runs while a kept-alive connection waits), a connection
//! with no request in flight for `idle_timeout` is closed (both protocols: a request still
//! trickling in is not in flight, so a slowloris client is closed too), HTTP/2 streams per
//! connection are capped, and at most `max_connections` are open: the rest wait in the
//! kernel's backlog. The permits of that cap are also how shutdown knows every connection ended.

use crate::http::app::App;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, watch};
use tokio_rustls::TlsAcceptor;

pub use crate::pem::TlsError;

/// Limits of every connection the front door accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Time to send a request's headers (HTTP/1.1; also the keep-alive wait).
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
    /// Streams one HTTP/2 connection may have open at once.
    pub max_concurrent_streams: u32,
}

/// A rustls server config for HTTP/2 and HTTP/1.1 from PEM certificate chain and key files.
pub fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = crate::pem::read_certs(cert)?;
    let private_key = crate::pem::read_key(key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(crate::pem::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .map_err(|e| TlsError::Invalid(format!("certificate and key do not match: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// How long an idle connection asked to close may take to do so before it is dropped.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// When a connection last had no request in flight, and how many it has now (shared by the
/// HTTP/1.1+2 and HTTP/3 servers).
pub(crate) struct Activity {
    in_flight: AtomicUsize,
    idle_since: Mutex<Instant>,
    became_idle: Notify,
}

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            became_idle: Notify::new(),
        })
    }

    /// Resolves once no request is in flight.
    pub(crate) async fn wait_idle(&self) {
        loop {
            let notified = self.became_idle.notified();
            if self.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// How long the connection has been without a request, or `None` while one runs.
    pub(crate) fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(
            self.idle_since
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed(),
        )
    }
}

/// Counts a request in flight on its connection until dropped.
pub(crate) struct InFlight(Arc<Activity>);

impl InFlight {
    pub(crate) fn enter(activity: &Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.became_idle.notify_waiters();
        }
    }
}

fn builder(limits: &ConnectionLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        // Pings find peers that vanished without closing; idle ones are closed by the watchdog.
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// Serves one accepted connection until it ends, is idle too long, or the node shuts down.
async fn serve_connection<I>(
    io: I,
    peer: std::net::SocketAddr,
    builder: auto::Builder<TokioExecutor>,
    app: Arc<App>,
    idle_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = Activity::new();
    let counted = activity.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let guard = InFlight::enter(&counted);
        let app = app.clone();
        // Boxed: hyper moves each HTTP/2 stream's future into a task of its own, and tokio
        // copies a task's future several times as it spawns it and as it ends. The request's
        // state is kilobytes (about 100 KB of copies per gRPC call unboxed); a box is one.
        Box::pin(async move {
            // HTTP/2 ends an unread body's stream on its own; HTTP/1.1 needs it settled.
            let response = if request.version() == hyper::Version::HTTP_2 {
                app.serve(request.map(axum::body::Body::new), peer).await
            } else {
                let (request, unread) = crate::http::unread::track(request);
                let mut response = app.serve(request, peer).await;
                unread.settle(&mut response).await;
                response
            };
            drop(guard);
            Ok::<_, std::convert::Infallible>(response)
        })
    });
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    let mut closing = false;
    // An idle connection is asked to close, and dropped if its peer does not finish the
    // HTTP/2 goodbye (it must answer a ping) soon after.
    let mut abandon_at: Option<tokio::time::Instant> = None;
    loop {
        let check = match activity.idle_for() {
            Some(idle) => idle_timeout.saturating_sub(idle),
            None => idle_timeout,
        };
        tokio::select! {
            ended = connection.as_mut() => return ended,
            () = async {
                match abandon_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => return Ok(()),
            () = tokio::time::sleep(check), if !closing => {
                if activity.idle_for().is_some_and(|idle| idle >= idle_timeout) {
                    closing = true;
                    abandon_at = Some(tokio::time::Instant::now() + IDLE_CLOSE_GRACE);
                    connection.as_mut().graceful_shutdown();
                }
            }
            changed = shutdown.changed(), if !closing => {
                if changed.is_err() || *shutdown.borrow() {
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting and waits up to
/// `drain_timeout` for open connections to finish their in-flight requests. With `tls`, each
/// connection's handshake uses the config current when it arrives (certificates reload).
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    tls: Option<watch::Receiver<Arc<rustls::ServerConfig>>>,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
    drain_timeout: Duration,
) {
    let builder = builder(&limits);
    let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (closing, closing_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    crate::warn_throttled!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Small request/response pairs must not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        let acceptor = tls
            .as_ref()
            .map(|config| TlsAcceptor::from(config.borrow().clone()));
        let (builder, app) = (builder.clone(), app.clone());
        let closing = closing_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let ended = match acceptor {
                None => {
                    serve_connection(stream, peer, builder, app, limits.idle_timeout, closing).await
                }
                Some(acceptor) => {
                    // The handshake is bounded like a request's headers.
                    let handshake =
                        tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream));
                    match handshake.await {
                        Ok(Ok(stream)) => {
                            serve_connection(
                                stream,
                                peer,
                                builder,
                                app,
                                limits.idle_timeout,
                                closing,
                            )
                            .await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!("no longer accepting connections; draining in-flight requests");
    let _ = closing.send(true);
    // Every connection holds a permit until it ends: all permits back means all closed.
    let all = u32::try_from(limits.max_connections.max(1)).unwrap_or(u32::MAX);
    if tokio::time::timeout(drain_timeout, connections.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            ?drain_timeout,
            "connections still open after the drain timeout; closing them"
        );
    }
}
