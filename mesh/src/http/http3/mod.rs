//! The HTTP/3 front door: the same router as HTTP/1.1 and HTTP/2, over QUIC on its own UDP
//! port and quinn endpoint, so public clients never touch the mesh port or its mutual TLS.
//!
//! Internet-facing limits, all set where a connection is accepted: at most `max_connections`
//! (more are refused), address validation by retry token once `validate_addresses_above` are
//! open (spoofed sources then cost the node one stateless packet, not a handshake), a
//! handshake and each stream's headers within `header_read_timeout`, finite flow-control
//! windows per stream and per connection (quinn's default connection window is unbounded),
//! `max_concurrent_streams` request streams per connection, a cap on the header section, and
//! connections with no request in flight for `idle_timeout` closed. The ALPN is `h3` only, so
//! a `meshserve/1` client cannot speak the mesh protocol here. No 0-RTT: rustls' early data
//! stays off, so a request can never be replayed. Every received stream goes through a
//! [`frames::FrameGuard`] ([`guarded`]), so no frame but DATA can be longer than
//! `max_header_bytes`: h3 would otherwise buffer whatever length a peer announces.

pub mod frames;
mod guarded;

use crate::http::app::App;
use crate::http::server::{Activity, InFlight};
use crate::pem::{self, TlsError};
use bytes::{Buf, Bytes};
use h3::server::RequestStream;
use http_body_util::BodyExt;
use meshserve_host::metrics::Metrics;
use quinn::crypto::rustls::QuicServerConfig;
use rustls::server::WebPkiClientVerifier;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::sync::{Semaphore, watch};

/// ALPN of HTTP/3.
pub const ALPN: &[u8] = b"h3";

/// The `Alt-Svc` value that advertises HTTP/3 on `port` of the same host.
pub fn alt_svc(port: u16) -> http::HeaderValue {
    http::HeaderValue::from_str(&format!("h3=\":{port}\"; ma=86400"))
        .expect("a port number makes a valid header value")
}

/// Limits of every HTTP/3 connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http3Limits {
    /// Time for a handshake, and for a stream's request headers.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Connections open at once; more are refused.
    pub max_connections: usize,
    /// Request streams one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Per-stream flow-control window, in bytes.
    pub stream_receive_window: u32,
    /// Per-connection flow-control window, in bytes.
    pub receive_window: u32,
    /// Largest request header section, in bytes.
    pub max_header_bytes: u64,
    /// Open connections past which new clients must validate their address first.
    pub validate_addresses_above: usize,
}

/// Who may connect, by client certificate.
pub enum ClientAuth {
    /// Anyone; no certificate asked for.
    Anyone,
    /// Anyone, and a certificate, when presented, must chain to the CA in this file.
    Optional(std::path::PathBuf),
    /// Only clients with a certificate chaining to the CA in this file.
    Required(std::path::PathBuf),
}

/// A quinn server config for HTTP/3 from PEM certificate chain and key files.
pub fn server_config(
    cert: &Path,
    key: &Path,
    clients: &ClientAuth,
    limits: &Http3Limits,
) -> Result<quinn::ServerConfig, TlsError> {
    let chain = pem::read_certs(cert)?;
    let private_key = pem::read_key(key)?;
    let builder = rustls::ServerConfig::builder_with_provider(pem::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Invalid(e.to_string()))?;
    let builder = match clients {
        ClientAuth::Anyone => builder.with_no_client_auth(),
        ClientAuth::Optional(ca) | ClientAuth::Required(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in pem::read_certs(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| TlsError::Invalid(format!("client CA {}: {e}", ca.display())))?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), pem::provider());
            let verifier = match clients {
                ClientAuth::Optional(_) => verifier.allow_unauthenticated(),
                _ => verifier,
            };
            let verifier = verifier
                .build()
                .map_err(|e| TlsError::Invalid(format!("client CA {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut tls = builder
        .with_single_cert(chain, private_key)
        .map_err(|e| TlsError::Invalid(format!("certificate and key do not match: {e}")))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // No 0-RTT: an early POST could be replayed by anyone who captured it.
    tls.max_early_data_size = 0;
    let crypto =
        QuicServerConfig::try_from(tls).map_err(|e| TlsError::Invalid(format!("QUIC TLS: {e}")))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport(limits)));
    // Connections beyond the cap are refused in `serve`; this bounds the handshakes queued
    // before it sees them.
    config.max_incoming(limits.max_connections.clamp(1, 1 << 16));
    Ok(config)
}

fn transport(limits: &Http3Limits) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(limits.max_concurrent_streams.into())
        // A client needs three: its control stream and the two QPACK streams (RFC 9114 6.2);
        // a few more leave room for extensions such as grease streams.
        .max_concurrent_uni_streams(8u32.into())
        .stream_receive_window(limits.stream_receive_window.into())
        .receive_window(limits.receive_window.into())
        .max_idle_timeout(limits.idle_timeout.try_into().ok())
        .datagram_receive_buffer_size(None);
    transport
}

/// Serves `app` over HTTP/3 on `endpoint` until `shutdown` resolves, then asks every
/// connection to finish (GOAWAY) and waits up to `drain_timeout` for in-flight requests.
pub async fn serve(
    endpoint: quinn::Endpoint,
    app: Arc<App>,
    limits: Http3Limits,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
    drain_timeout: Duration,
) {
    let max = limits.max_connections.max(1);
    let connections = Arc::new(Semaphore::new(max));
    let (closing, closing_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
            () = &mut shutdown => break,
        };
        let open = max - connections.available_permits();
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            metrics.record_connection("h3", "refused");
            tracing::debug!(peer = %incoming.remote_address(), "HTTP/3 connection refused: at max_connections");
            incoming.refuse();
            continue;
        };
        if open >= limits.validate_addresses_above
            && !incoming.remote_address_validated()
            && incoming.may_retry()
        {
            metrics.record_connection("h3", "retry");
            if let Err(e) = incoming.retry() {
                tracing::debug!(error = %e, "HTTP/3 retry failed");
            }
            continue;
        }
        let (app, metrics, closing) = (app.clone(), metrics.clone(), closing_rx.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let peer = incoming.remote_address();
            // The client's first flight is processed here: a ClientHello without ALPN `h3`
            // (a `meshserve/1` client, say) fails already.
            let connecting = match incoming.accept() {
                Ok(connecting) => connecting,
                Err(e) => {
                    metrics.record_connection("h3", "handshake_failed");
                    tracing::debug!(%peer, error = %e, "HTTP/3 handshake failed");
                    return;
                }
            };
            let connection =
                match tokio::time::timeout(limits.header_read_timeout, connecting).await {
                    Ok(Ok(connection)) => connection,
                    Ok(Err(e)) => {
                        metrics.record_connection("h3", "handshake_failed");
                        tracing::debug!(%peer, error = %e, "HTTP/3 handshake failed");
                        return;
                    }
                    Err(_) => {
                        metrics.record_connection("h3", "handshake_failed");
                        tracing::debug!(%peer, "HTTP/3 handshake timed out");
                        return;
                    }
                };
            metrics.record_connection("h3", "accepted");
            if let Err(e) = serve_connection(connection, app, limits, closing).await {
                tracing::debug!(%peer, error = %e, "HTTP/3 connection ended with an error");
            }
        });
    }
    tracing::info!("HTTP/3: no longer accepting connections; draining in-flight requests");
    let _ = closing.send(true);
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    if tokio::time::timeout(drain_timeout, connections.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            ?drain_timeout,
            "HTTP/3 connections still open after the drain timeout; closing them"
        );
    }
    endpoint.close(quinn::VarInt::from_u32(H3_NO_ERROR), b"shutting down");
}

/// HTTP/3's "no error" code, for closing a connection on purpose.
const H3_NO_ERROR: u32 = 0x100;

/// Serves one connection's requests until it ends, idles out, or the node shuts down.
async fn serve_connection(
    connection: quinn::Connection,
    app: Arc<App>,
    limits: Http3Limits,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), h3::error::ConnectionError> {
    let quic = connection.clone();
    let peer = connection.remote_address();
    let mut h3 = h3::server::builder()
        .max_field_section_size(limits.max_header_bytes)
        .build::<_, Bytes>(guarded::GuardedConnection::new(
            connection,
            limits.max_header_bytes,
        ))
        .await?;
    let activity = Activity::new();
    let mut closing = false;
    loop {
        let check = match activity.idle_for() {
            Some(idle) => limits.idle_timeout.saturating_sub(idle),
            None => limits.idle_timeout,
        };
        // While closing: once no request has been in flight for `CLOSE_LINGER`, close. The
        // linger lets the last answers' bytes be acknowledged (closing discards unsent data)
        // and lets requests the client sent before it saw GOAWAY arrive and be served.
        let linger = activity
            .idle_for()
            .map(|idle| CLOSE_LINGER.saturating_sub(idle));
        tokio::select! {
            accepted = h3.accept() => match accepted? {
                Some(resolver) => {
                    let guard = InFlight::enter(&activity);
                    let app = app.clone();
                    tokio::spawn(async move {
                        serve_request(resolver, peer, app, limits.header_read_timeout).await;
                        drop(guard);
                    });
                }
                None => return Ok(()),
            },
            () = tokio::time::sleep(check), if !closing => {
                if activity.idle_for().is_some_and(|idle| idle >= limits.idle_timeout) {
                    quic.close(quinn::VarInt::from_u32(H3_NO_ERROR), b"idle");
                    return Ok(());
                }
            }
            changed = shutdown.changed(), if !closing => {
                if changed.is_err() || *shutdown.borrow() {
                    closing = true;
                    // Streams the client may already have opened (at most the stream cap) are
                    // still served; later ones are refused with H3_REQUEST_REJECTED, which
                    // tells the client they were not processed.
                    h3.shutdown(limits.max_concurrent_streams as usize).await?;
                }
            }
            _ = quic.closed(), if closing => return Ok(()),
            // Wakes the loop when the last request ends, to start the linger.
            () = activity.wait_idle(), if closing && linger.is_none() => {}
            () = tokio::time::sleep(linger.unwrap_or_default()), if closing && linger.is_some() => {
                if activity.idle_for().is_some_and(|idle| idle >= CLOSE_LINGER) {
                    quic.close(quinn::VarInt::from_u32(H3_NO_ERROR), b"shutting down");
                    return Ok(());
                }
            }
        }
    }
}

/// How long a closing connection stays open after its last answer.
const CLOSE_LINGER: Duration = Duration::from_millis(250);

type Resolver = h3::server::RequestResolver<guarded::GuardedConnection, Bytes>;

/// Reads one request's headers (within the deadline), runs it through the router and streams
/// the answer back.
async fn serve_request(
    resolver: Resolver,
    peer: std::net::SocketAddr,
    app: Arc<App>,
    header_read_timeout: Duration,
) {
    let (request, stream) =
        match tokio::time::timeout(header_read_timeout, resolver.resolve_request()).await {
            Ok(Ok(resolved)) => resolved,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "HTTP/3 request headers unusable");
                return;
            }
            Err(_) => {
                // The resolver (and with it the stream) is dropped, which resets the stream.
                tracing::debug!("HTTP/3 request headers not received in time");
                return;
            }
        };
    let (mut send, recv) = stream.split();
    let request = request.map(|()| axum::body::Body::new(RecvBody(recv)));
    let response = app.serve(request, peer).await;
    let (parts, mut body) = response.into_parts();
    if let Err(e) = send
        .send_response(http::Response::from_parts(parts, ()))
        .await
    {
        tracing::debug!(error = %e, "HTTP/3 response headers not sent");
        return;
    }
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => {
                tracing::debug!(error = %e, "HTTP/3 response body failed");
                send.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
                return;
            }
        };
        let sent = match frame.into_data() {
            Ok(data) => send.send_data(data).await,
            Err(frame) => match frame.into_trailers() {
                Ok(trailers) => send.send_trailers(trailers).await,
                Err(_) => Ok(()),
            },
        };
        if let Err(e) = sent {
            tracing::debug!(error = %e, "HTTP/3 response body not sent");
            return;
        }
    }
    if let Err(e) = send.finish().await {
        tracing::debug!(error = %e, "HTTP/3 response not finished");
    }
}

/// A request body read from an HTTP/3 stream as it arrives.
struct RecvBody(RequestStream<guarded::GuardedRecv, Bytes>);

impl http_body::Body for RecvBody {
    type Data = Bytes;
    type Error = h3::error::StreamError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        match ready!(self.0.poll_recv_data(cx)) {
            Ok(Some(mut data)) => Poll::Ready(Some(Ok(http_body::Frame::data(
                data.copy_to_bytes(data.remaining()),
            )))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_control_windows_are_finite_and_follow_the_config() {
        let mut limits = crate::config::Http3Config::default().limits();
        // quinn's own default connection window is unbounded (2^62 - 1).
        assert!(u64::from(limits.receive_window) < 1 << 30);
        limits.stream_receive_window = 65_536;
        limits.receive_window = 131_072;
        limits.max_concurrent_streams = 7;
        let described = format!("{:?}", transport(&limits));
        for expected in [
            "stream_receive_window: 65536",
            "receive_window: 131072",
            "max_concurrent_bidi_streams: 7",
            "max_concurrent_uni_streams: 8",
        ] {
            assert!(described.contains(expected), "{expected} in {described}");
        }
    }
}
