//! The QUIC transport of the mesh: one quinn endpoint per node (and per native client), mutual
//! TLS under the mesh CA ([`tls`], [`certs`]), pooled connections, and `meshserve/1` frames on
//! bidirectional streams (one stream per request). Membership packets travel as QUIC
//! datagrams on the same connections: SWIM tolerates loss and wants no retransmission.

pub mod certs;
pub mod tls;

use crate::wire::{self, Message, WireError, frame::HEADER_LEN};
use bytes::Bytes;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
pub use tls::{ALPN, MeshIdentity};

/// How long a connection attempt may take before the peer counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a mesh exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The UDP socket could not be bound.
    #[error("cannot bind the QUIC endpoint on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] crate::pem::TlsError),
    /// The peer could not be reached or refused us.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The peer.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The connection or stream broke.
    #[error("connection to {addr} lost: {reason}")]
    Lost {
        /// The peer.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The peer sent something that is not a frame.
    #[error("bad frame from {addr}: {source}")]
    Frame {
        /// The peer.
        addr: SocketAddr,
        /// What was wrong.
        source: WireError,
    },
    /// The peer at the address holds another node's certificate.
    #[error("the peer at {addr} is not node '{node}' (its certificate does not name it)")]
    NotThatNode {
        /// The peer.
        addr: SocketAddr,
        /// The node expected there.
        node: String,
    },
    /// This node is reading as many frame bytes as its budget allows.
    #[error(
        "this node is buffering too many mesh frame bytes (mesh.max_frame_bytes_in_flight); retry later"
    )]
    Busy {
        /// The peer whose frame was refused.
        addr: SocketAddr,
    },
    /// No answer in time.
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout {
        /// The peer.
        addr: SocketAddr,
        /// The time allowed.
        timeout: Duration,
    },
}

impl TransportError {
    /// Whether the peer may never have seen the request, so another replica can take it.
    /// Inference is idempotent, so every transport failure qualifies; only a bad frame (a
    /// broken peer, not a lost one) does not.
    /// Not `Busy` either: that is this node's own budget, which another replica's answer
    /// would meet too.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            TransportError::Frame { .. } | TransportError::Busy { .. }
        )
    }
}

/// The bytes of `meshserve/1` frames a node holds while reading them, node-wide: every peer
/// together, whatever its certificate, can make it buffer at most this much (one byte per
/// permit, taken as bytes arrive, so a frame that is announced but not sent costs nothing).
#[derive(Clone)]
pub struct FrameBudget(Arc<tokio::sync::Semaphore>);

impl FrameBudget {
    /// A budget of `bytes`.
    pub fn new(bytes: usize) -> FrameBudget {
        FrameBudget(Arc::new(tokio::sync::Semaphore::new(
            bytes.min(tokio::sync::Semaphore::MAX_PERMITS),
        )))
    }
}

/// A frame read off a stream, with its share of the [`FrameBudget`].
pub struct Frame {
    /// The message.
    pub message: Message,
    /// The frame's bytes, held until this is dropped.
    pub budget: BudgetHold,
}

/// A share of a [`FrameBudget`], given back when dropped.
pub struct BudgetHold(#[allow(dead_code)] Option<tokio::sync::OwnedSemaphorePermit>);

/// One pooled connection per peer address; the inner lock makes concurrent callers share one
/// handshake.
type Pool = Arc<Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<Option<quinn::Connection>>>>>>;

/// A quinn endpoint with a pool of connections to peers.
#[derive(Clone)]
pub struct MeshEndpoint {
    endpoint: quinn::Endpoint,
    /// Shared by every clone, so a reloaded identity reaches them all (quinn keeps its default
    /// client config per handle).
    client_config: Arc<std::sync::RwLock<quinn::ClientConfig>>,
    /// Whether this endpoint accepts connections (a node's) or only opens them (a client's).
    accepts: bool,
    pool: Pool,
    max_frame_bytes: usize,
    frame_budget: FrameBudget,
}

impl MeshEndpoint {
    /// A node's endpoint: accepts peers on `addr` and connects out from the same socket.
    pub fn bind(
        addr: SocketAddr,
        identity: &MeshIdentity,
        max_frame_bytes: usize,
    ) -> Result<MeshEndpoint, TransportError> {
        let endpoint = quinn::Endpoint::server(identity.server_config()?, addr)
            .map_err(|source| TransportError::Bind { addr, source })?;
        MeshEndpoint::wrap(endpoint, identity, true, max_frame_bytes)
    }

    /// A client's endpoint: connects out only, from an ephemeral port.
    pub fn client(
        identity: &MeshIdentity,
        max_frame_bytes: usize,
    ) -> Result<MeshEndpoint, TransportError> {
        let addr = SocketAddr::from(([0, 0, 0, 0], 0));
        let endpoint = quinn::Endpoint::client(addr)
            .map_err(|source| TransportError::Bind { addr, source })?;
        MeshEndpoint::wrap(endpoint, identity, false, max_frame_bytes)
    }

    fn wrap(
        endpoint: quinn::Endpoint,
        identity: &MeshIdentity,
        accepts: bool,
        max_frame_bytes: usize,
    ) -> Result<MeshEndpoint, TransportError> {
        Ok(MeshEndpoint {
            endpoint,
            client_config: Arc::new(std::sync::RwLock::new(identity.client_config()?)),
            accepts,
            pool: Arc::default(),
            max_frame_bytes,
            frame_budget: FrameBudget::new(usize::MAX),
        })
    }

    /// Bounds the frame bytes this endpoint buffers at once, over all its streams.
    pub fn with_frame_budget(mut self, bytes: usize) -> MeshEndpoint {
        self.frame_budget = FrameBudget::new(bytes);
        self
    }

    /// What the endpoint's frames may buffer at once.
    pub fn frame_budget(&self) -> &FrameBudget {
        &self.frame_budget
    }

    /// Swaps in a new identity (a reissued certificate, a new CA bundle) for every connection
    /// made from now on, both ways; pooled outgoing connections are dropped so that the next
    /// exchange reconnects with it. Connections in use finish with the identity they were made
    /// with. Nothing changes when the identity does not make a valid config.
    pub fn set_identity(&self, identity: &MeshIdentity) -> Result<(), TransportError> {
        let client = identity.client_config()?;
        let server = if self.accepts {
            Some(identity.server_config()?)
        } else {
            None
        };
        if server.is_some() {
            self.endpoint.set_server_config(server);
        }
        *self
            .client_config
            .write()
            .unwrap_or_else(|e| e.into_inner()) = client;
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).clear();
        Ok(())
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// The underlying quinn endpoint, for the accept loop.
    pub fn quinn(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// The largest frame payload accepted.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }

    /// A live connection to `addr`, reusing the pooled one. Concurrent callers for the same
    /// peer share one handshake.
    pub async fn connection(&self, addr: SocketAddr) -> Result<quinn::Connection, TransportError> {
        let slot = {
            let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            pool.entry(addr).or_default().clone()
        };
        let mut slot = slot.lock().await;
        if let Some(connection) = slot.as_ref()
            && connection.close_reason().is_none()
        {
            return Ok(connection.clone());
        }
        *slot = None;
        let connect_error = |reason: String| TransportError::Connect { addr, reason };
        let config = self
            .client_config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let connecting = self
            .endpoint
            .connect_with(config, addr, crate::transport::certs::NODE_SAN)
            .map_err(|e| connect_error(e.to_string()))?;
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| connect_error(format!("no handshake within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| connect_error(e.to_string()))?;
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// Forgets the pooled connection to `addr` (after a failure), so the next call reconnects.
    pub fn forget(&self, addr: SocketAddr) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        pool.remove(&addr);
    }

    /// Closes the pooled connection to `addr` (a peer declared down), failing its calls in
    /// flight at once so they can go to another replica.
    pub fn drop_peer(&self, addr: SocketAddr) {
        let slot = {
            let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            pool.remove(&addr)
        };
        if let Some(slot) = slot {
            tokio::spawn(async move {
                if let Some(connection) = slot.lock().await.take() {
                    connection.close(0u32.into(), b"peer declared down");
                }
            });
        }
    }

    /// Sends `request` to `addr` on a new stream of the pooled connection and reads the answer.
    pub async fn call(
        &self,
        addr: SocketAddr,
        request: &Message,
        timeout: Duration,
    ) -> Result<Message, TransportError> {
        self.exchange(addr, None, request, timeout).await
    }

    /// As [`MeshEndpoint::call`], on a connection whose certificate names node `node`: for
    /// what only that node may tell (its advert, the files of a model it advertises).
    pub async fn call_node(
        &self,
        addr: SocketAddr,
        node: &str,
        request: &Message,
        timeout: Duration,
    ) -> Result<Message, TransportError> {
        self.exchange(addr, Some(node), request, timeout).await
    }

    async fn exchange(
        &self,
        addr: SocketAddr,
        node: Option<&str>,
        request: &Message,
        timeout: Duration,
    ) -> Result<Message, TransportError> {
        let exchange = async {
            let connection = self.connection(addr).await?;
            if let Some(node) = node
                && !tls::peer_is_node(&connection, node)
            {
                return Err(TransportError::NotThatNode {
                    addr,
                    node: node.to_string(),
                });
            }
            let lost = |e: &dyn std::fmt::Display| TransportError::Lost {
                addr,
                reason: e.to_string(),
            };
            let answer = async {
                let (mut send, mut recv) = connection.open_bi().await.map_err(|e| lost(&e))?;
                send.write_all(&wire::encode(request))
                    .await
                    .map_err(|e| lost(&e))?;
                send.finish().map_err(|e| lost(&e))?;
                read_frame(&mut recv, self.max_frame_bytes, &self.frame_budget, addr)
                    .await
                    .map(|frame| frame.message)
            };
            // A stream's error says only "connection lost"; the connection says why (a
            // peer's close names its reason).
            answer
                .await
                .map_err(|e| match (e, connection.close_reason()) {
                    (TransportError::Lost { addr, .. }, Some(why)) => TransportError::Lost {
                        addr,
                        reason: why.to_string(),
                    },
                    (e, _) => e,
                })
        };
        let result = match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::Timeout { addr, timeout }),
        };
        if matches!(
            result,
            Err(TransportError::Lost { .. } | TransportError::Connect { .. })
        ) {
            self.forget(addr);
        }
        result
    }

    /// Sends a datagram to `addr` without waiting: connecting happens in the background and a
    /// failure only drops the datagram, as UDP would.
    pub fn send_datagram(&self, addr: SocketAddr, datagram: Bytes) {
        let this = self.clone();
        tokio::spawn(async move {
            match this.connection(addr).await {
                Ok(connection) => {
                    if let Err(e) = connection.send_datagram(datagram) {
                        tracing::debug!(%addr, error = %e, "datagram dropped");
                    }
                }
                Err(e) => tracing::debug!(%addr, error = %e, "datagram dropped"),
            }
        });
    }

    /// Closes every connection and stops accepting.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"node stopping");
    }
}

/// Frame buffers grow by doubling up to this size, then to the frame's length.
const DOUBLING_BYTES: usize = 256 << 10;

/// Reads one whole frame from a stream, refusing oversized or malformed ones, and one whose
/// bytes would overdraw `budget` (`Busy`, as soon as they arrive).
pub async fn read_frame(
    recv: &mut quinn::RecvStream,
    max_frame_bytes: usize,
    budget: &FrameBudget,
    addr: SocketAddr,
) -> Result<Frame, TransportError> {
    let lost = |e: &dyn std::fmt::Display| TransportError::Lost {
        addr,
        reason: e.to_string(),
    };
    let frame_error = |source| TransportError::Frame { addr, source };
    let mut header = [0u8; HEADER_LEN];
    recv.read_exact(&mut header).await.map_err(|e| lost(&e))?;
    let length = wire::frame::decode_header(&header, max_frame_bytes).map_err(frame_error)?;
    // Grow with what actually arrives: a peer announcing a large frame and sending nothing
    // must not make us allocate it. Small frames grow by doubling; past the first 256 KiB
    // the buffer takes the frame's whole length at once, so a large frame is not copied
    // from buffer to buffer (each one freed would stay resident in the allocator for a
    // while). The budget is charged for capacity, not length: capacity is what we hold.
    let mut payload: Vec<u8> = Vec::new();
    let mut held: Option<tokio::sync::OwnedSemaphorePermit> = None;
    while payload.len() < length {
        match recv.read_chunk(length - payload.len(), true).await {
            Ok(Some(chunk)) => {
                let needed = payload.len() + chunk.bytes.len();
                if needed > payload.capacity() {
                    let capacity = if needed <= DOUBLING_BYTES {
                        needed.max(payload.capacity() * 2).max(64 << 10)
                    } else {
                        length
                    }
                    .min(length);
                    let permit = u32::try_from(capacity - payload.capacity())
                        .ok()
                        .and_then(|n| budget.0.clone().try_acquire_many_owned(n).ok())
                        .ok_or(TransportError::Busy { addr })?;
                    match &mut held {
                        Some(held) => held.merge(permit),
                        None => held = Some(permit),
                    }
                    payload.reserve_exact(capacity - payload.len());
                }
                payload.extend_from_slice(&chunk.bytes);
            }
            Ok(None) => {
                return Err(TransportError::Lost {
                    addr,
                    reason: format!(
                        "stream ended after {} of {length} payload bytes",
                        payload.len()
                    ),
                });
            }
            Err(e) => return Err(lost(&e)),
        }
    }
    let message = wire::frame::decode_payload(&payload).map_err(frame_error)?;
    Ok(Frame {
        message,
        budget: BudgetHold(held),
    })
}

/// Writes one frame and closes the sending side.
pub async fn write_frame(
    send: &mut quinn::SendStream,
    message: &Message,
) -> Result<(), quinn::WriteError> {
    let (head, chunk) = wire::encode_vectored(message);
    send.write_all(&head).await?;
    if let Some(chunk) = chunk {
        send.write_chunk(chunk).await?;
    }
    let _ = send.finish();
    Ok(())
}
