//! The `meshserve/1` service: accepts connections from nodes and native clients (mutual TLS
//! already checked by the handshake), reads membership datagrams from nodes, and answers one
//! frame per bidirectional stream: the mesh's own questions (routes, status, loads, adverts,
//! model transfers) here, calls that run models and endpoints through the node's [`Calls`].

use crate::cluster::handshakes::{HANDSHAKE_TIMEOUT, Turned};
use crate::cluster::{Cluster, bundle};
use crate::membership::Membership;
use crate::transport::certs::Role;
use crate::transport::{Frame, TransportError, read_frame, tls, write_frame};
use crate::wire::{
    Failure, FailureClass, FetchChunk, FetchModel, Message, ModelFiles, WIRE_VERSION, WireError,
};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;

/// Answers the frames of `meshserve/1` that run models and endpoints: the node's door for
/// them (`crate::mesh1`), over its dispatch. The cluster only carries them, so it depends on
/// no door and no dispatch.
pub trait Calls: Send + Sync + 'static {
    /// The answer to `message` (`Infer`, `Invoke` or `MetadataQuery`) from a peer of `role`.
    fn answer(&self, message: Message, role: Role)
    -> Pin<Box<dyn Future<Output = Message> + Send>>;
}

/// Accepts connections until the endpoint closes.
pub(super) async fn serve(cluster: Arc<Cluster>) {
    let metrics = cluster.engine.metrics().clone();
    while let Some(incoming) = cluster.endpoint.quinn().accept().await {
        let peer = incoming.remote_address();
        let proven = incoming.remote_address_validated();
        // Only a shown address is looked up: a member's is not the node's cap's to hold.
        let member = proven && cluster.is_member_address(peer.ip());
        let handshake = match cluster.handshakes.admit(peer.ip(), proven, member) {
            Ok(handshake) => handshake,
            Err(Turned::Unproven) => {
                metrics.record_connection(MESH, "retry");
                // Not shown to be the sender's address, so `may_retry` holds.
                if let Err(e) = incoming.retry() {
                    tracing::debug!(%peer, error = %e, "mesh retry failed");
                }
                continue;
            }
            Err(turned) => {
                metrics.record_connection(MESH, "refused");
                crate::warn_throttled!(%peer, reason = %turned, "mesh handshake refused");
                incoming.refuse();
                continue;
            }
        };
        let (cluster, metrics) = (cluster.clone(), metrics.clone());
        tokio::spawn(async move {
            let connection = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
                Ok(Ok(connection)) => connection,
                // A TLS failure either way: the peer has no certificate of our mesh CA, or
                // does not trust ours (a node of another mesh).
                Ok(Err(e)) if is_tls_refusal(&e) => {
                    metrics.record_connection(MESH, "handshake_failed");
                    crate::warn_throttled!(%peer, error = %e, "mesh connection refused");
                    return;
                }
                // The peer gave up (a connect timeout while we were starting, a restart).
                Ok(Err(e)) => {
                    metrics.record_connection(MESH, "handshake_failed");
                    tracing::debug!(%peer, error = %e, "mesh handshake abandoned");
                    return;
                }
                // Dropping the handshake closes it.
                Err(_) => {
                    metrics.record_connection(MESH, "handshake_timed_out");
                    tracing::debug!(%peer, "mesh handshake timed out");
                    return;
                }
            };
            drop(handshake);
            let role = tls::peer_role(&connection);
            // Each connection holds a place while it is open: a client one of the clients'
            // shared places, a node one of its certificate's own. The handshake granted a
            // client's share of streams and window (`tls::CLIENT_GRANT`); only a node's
            // certificate earns more.
            let (_node_place, _client_place) = if role == Role::Node {
                let place = tls::peer_certificate_digest(&connection).and_then(|holder| {
                    cluster
                        .node_connections
                        .hold(holder, CONNECTIONS_PER_NODE_CERTIFICATE)
                });
                let Some(place) = place else {
                    metrics.record_connection(MESH, "refused");
                    crate::warn_throttled!(%peer, "mesh node connection refused: its certificate holds as many as a node may");
                    connection.close(0u32.into(), NODE_CONNECTIONS_REFUSAL);
                    return;
                };
                tls::NODE_GRANT.widen(&connection);
                tokio::spawn(read_datagrams(cluster.clone(), connection.clone()));
                (Some(place), None)
            } else {
                let Ok(place) = cluster.client_connections.clone().try_acquire_owned() else {
                    metrics.record_connection(MESH, "refused");
                    crate::warn_throttled!(%peer, "mesh client connection refused: at mesh.max_client_connections");
                    connection.close(0u32.into(), CLIENT_CONNECTIONS_REFUSAL);
                    return;
                };
                tokio::spawn(close_on_datagram(connection.clone()));
                (None, Some(place))
            };
            metrics.record_connection(MESH, "accepted");
            while let Ok((send, recv)) = connection.accept_bi().await {
                let exchange = answer(cluster.clone(), send, recv, role, peer);
                tokio::spawn(exchange);
            }
        });
    }
}

/// The `protocol` label of the mesh port's connections in `meshserve_connections_total`.
const MESH: &str = "mesh";

fn is_tls_refusal(error: &quinn::ConnectionError) -> bool {
    // QUIC carries TLS alerts as error codes 0x100..=0x1ff (RFC 9001, section 4.8).
    let is_alert = |code: quinn::TransportErrorCode| (0x100..=0x1ff).contains(&u64::from(code));
    match error {
        quinn::ConnectionError::TransportError(e) => is_alert(e.code),
        quinn::ConnectionError::ConnectionClosed(close) => is_alert(close.error_code),
        _ => false,
    }
}

/// Closes a client's connection at its first datagram. Membership is between nodes, so a
/// client has none to send and nothing reads them: left open, each of its connections could
/// fill a datagram buffer (1 MiB) of the node's memory for as long as it lasts.
async fn close_on_datagram(connection: quinn::Connection) {
    if connection.read_datagram().await.is_ok() {
        let peer = connection.remote_address();
        crate::warn_throttled!(%peer, "a client sent a datagram; its connection is closed");
        connection.close(0u32.into(), CLIENT_DATAGRAM_REFUSAL);
    }
}

/// The reason a client's connection is closed at its first datagram.
pub const CLIENT_DATAGRAM_REFUSAL: &[u8] = b"clients send no datagrams";

/// Connections one node certificate may hold open at once. A node dials a peer on one pooled
/// connection: two while a replaced one lingers, or where it knows the peer under two
/// addresses (a seed's name and its advertised address).
pub const CONNECTIONS_PER_NODE_CERTIFICATE: usize = 8;

/// The reason a node's connection is closed as it arrives, when its certificate holds
/// [`CONNECTIONS_PER_NODE_CERTIFICATE`] already.
pub const NODE_CONNECTIONS_REFUSAL: &[u8] =
    b"this node certificate holds as many connections as a node may";

/// The reason a client's connection is closed as it arrives, when clients hold
/// `mesh.max_client_connections` already.
pub const CLIENT_CONNECTIONS_REFUSAL: &[u8] =
    b"the node holds as many client connections as it allows (mesh.max_client_connections)";

// A datagram counts only as the word of the node the peer's certificate names (checked once
// per claimed name and connection); the first refusal on a connection is logged.
async fn read_datagrams(cluster: Arc<Cluster>, connection: quinn::Connection) {
    let peer = connection.remote_address();
    let mut certified: Option<Arc<str>> = None;
    let mut refusal_logged = false;
    while let Ok(datagram) = connection.read_datagram().await {
        match datagram.first() {
            Some(&WIRE_VERSION) => {
                let packet = datagram.slice(1..);
                let claimed = match Membership::claimed_sender(&packet) {
                    Ok(claimed) => claimed,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "membership datagram dropped");
                        continue;
                    }
                };
                let sender = match certified.as_ref().filter(|name| ***name == *claimed) {
                    Some(name) => name.clone(),
                    None if tls::peer_is_node(&connection, &claimed) => {
                        let name: Arc<str> = claimed.into();
                        certified = Some(name.clone());
                        name
                    }
                    None => {
                        if !refusal_logged {
                            tracing::warn!(%peer, %claimed, "membership datagram claims a node its sender's certificate does not name; dropped");
                            refusal_logged = true;
                        }
                        continue;
                    }
                };
                if cluster.packets.try_send((sender, packet)).is_err() {
                    tracing::debug!(%peer, "membership queue full; datagram dropped");
                }
            }
            other => tracing::debug!(
                peer = %connection.remote_address(),
                version = ?other,
                "membership datagram of another wire version dropped"
            ),
        }
    }
}

async fn answer(
    cluster: Arc<Cluster>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    role: Role,
    peer: SocketAddr,
) {
    // A peer that announces a frame and trickles it must not hold the stream (and its
    // buffer) for long.
    let read = tokio::time::timeout(
        cluster.frame_read_timeout,
        read_frame(
            &mut recv,
            cluster.endpoint.max_frame_bytes(),
            cluster.endpoint.frame_budget(),
            peer,
        ),
    );
    let Ok(read) = read.await else {
        crate::warn_throttled!(%peer, "frame not received in time; stream dropped");
        let _ = recv.stop(0u32.into());
        let failure = Failure::new(
            FailureClass::InvalidInput,
            format!(
                "the frame did not arrive within {} ms (mesh.frame_read_timeout_ms)",
                cluster.frame_read_timeout.as_millis()
            ),
        );
        let _ = write_frame(&mut send, &Message::Failure(failure)).await;
        return;
    };
    // The frame's budget is held until the answer is sent: its tensors live that long.
    let (read, _held) = match read {
        Ok(Frame { message, budget }) => (Ok(message), Some(budget)),
        Err(e) => (Err(e), None),
    };
    // A fetch slot is held until its answer is written: the bytes read live that long.
    let mut fetch_slot = None;
    let reply = match read {
        Ok(call @ (Message::Infer(_) | Message::Invoke(_) | Message::MetadataQuery(_))) => {
            match cluster.calls.get() {
                Some(calls) => calls.answer(call, role).await,
                None => {
                    let mut failure = Failure::new(
                        FailureClass::Unavailable,
                        format!(
                            "node '{}' is starting; it serves no calls yet",
                            cluster.name
                        ),
                    );
                    failure.retry_after_ms = Some(100);
                    Message::Failure(failure)
                }
            }
        }
        Ok(Message::RouteQuery) => Message::Routes(cluster.view().routes()),
        Ok(Message::StatusQuery) => Message::Status(cluster.status()),
        Ok(Message::LoadQuery) => Message::Loads(cluster.loads()),
        Ok(Message::FetchModel(fetch)) if role == Role::Node => {
            let (reply, slot) = cluster.model_files(fetch).await;
            fetch_slot = slot;
            reply
        }
        Ok(Message::FetchManifest(fetch)) if role == Role::Node => cluster.manifest(fetch).await,
        Ok(Message::FetchChunk(chunk)) if role == Role::Node => {
            let (reply, slot) = cluster.chunk(chunk).await;
            fetch_slot = slot;
            reply
        }
        Ok(Message::AdvertQuery) if role == Role::Node => match cluster.own_advert() {
            Some(advert) => Message::Advert((*advert).clone()),
            None => Message::Failure(Failure::new(
                FailureClass::Unavailable,
                "this node has not made its advert yet",
            )),
        },
        Ok(other) => Message::Failure(Failure::new(
            FailureClass::InvalidInput,
            format!("unexpected message {}", other.kind()),
        )),
        Err(TransportError::Frame { source, .. }) => {
            crate::warn_throttled!(%peer, error = %source, "bad frame refused");
            let class = match source {
                WireError::TooLarge { .. } => FailureClass::TooLarge,
                _ => FailureClass::InvalidInput,
            };
            // Nothing more will be read from this stream.
            let _ = recv.stop(0u32.into());
            Message::Failure(Failure::new(class, source.to_string()))
        }
        Err(busy @ TransportError::Busy { .. }) => {
            tracing::debug!(%peer, "frame refused: mesh.max_frame_bytes_in_flight spent");
            let _ = recv.stop(0u32.into());
            let mut failure = Failure::new(FailureClass::Unavailable, busy.to_string());
            failure.retry_after_ms = Some(1000);
            Message::Failure(failure)
        }
        Err(e) => {
            tracing::debug!(%peer, error = %e, "stream ended before a whole frame");
            return;
        }
    };
    if let Err(e) = write_frame(&mut send, &reply).await {
        tracing::debug!(%peer, error = %e, "could not send the answer");
    }
    drop(fetch_slot);
}

/// Largest chunk a holder reads for one request; with [`super::MAX_FETCHES_SERVED`] it bounds
/// what serving transfers holds in memory.
const MAX_CHUNK_SERVED: usize = 8 << 20;

/// How long a chunk request waits for a fetch slot before it is told to come back.
const FETCH_SLOT_WAIT: Duration = Duration::from_secs(5);

impl Cluster {
    /// The listing of our `model` if its files are at digest `wanted`, from the digest cache
    /// (file sizes and times; the files are hashed only when they changed).
    async fn version(
        self: &Arc<Self>,
        model: &str,
        wanted: [u8; 32],
    ) -> Result<Vec<bundle::Listed>, Failure> {
        let cluster = self.clone();
        let name = model.to_string();
        let listing = tokio::task::spawn_blocking(move || {
            cluster
                .digests
                .listing(cluster.engine.repository().root(), &name)
        })
        .await
        .map_err(|e| Failure::new(FailureClass::Internal, e.to_string()))?;
        match listing {
            Ok((listing, digest)) if digest == wanted => Ok(listing),
            Ok(_) => Err(Failure::new(
                FailureClass::NotFound,
                format!(
                    "model '{model}' here is not version {}",
                    bundle::hex(&wanted)
                ),
            )),
            Err(e) => Err(Failure::new(
                FailureClass::NotFound,
                format!("model '{model}' is not here: {e}"),
            )),
        }
    }

    /// A fetch slot, waiting up to `wait` for one; past it, a failure telling the peer when
    /// to come back.
    async fn fetch_slot(&self, wait: Duration) -> Result<OwnedSemaphorePermit, Failure> {
        match tokio::time::timeout(wait, self.fetches_served.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => {
                let mut failure = Failure::new(
                    FailureClass::Unavailable,
                    "this node is serving as many model fetches as it allows; retry later",
                );
                failure.retry_after_ms = Some(1000);
                Err(failure)
            }
        }
    }

    /// A model's files in one frame, for peers that fetch the whole folder at once (older
    /// nodes): only when ours have the digest asked for and fit in a frame, both checked
    /// before a byte is read.
    async fn model_files(
        self: &Arc<Self>,
        fetch: FetchModel,
    ) -> (Message, Option<OwnedSemaphorePermit>) {
        let answer = async {
            let slot = self.fetch_slot(Duration::ZERO).await?;
            let listing = self.version(&fetch.model, fetch.digest).await?;
            let size: u64 = listing.iter().map(|f| f.size).sum();
            let limit = self.endpoint.max_frame_bytes();
            if usize::try_from(size).map_or(true, |size| size.saturating_add(64 << 10) > limit) {
                return Err(Failure::new(
                    FailureClass::TooLarge,
                    format!(
                        "model '{}' ({size} bytes) exceeds the frame limit of {limit} bytes (mesh.max_frame_bytes); fetch it in chunks",
                        fetch.model
                    ),
                ));
            }
            let root = self.engine.repository().root().to_path_buf();
            let model = fetch.model.clone();
            let files = tokio::task::spawn_blocking(move || bundle::read(&root, &model))
                .await
                .map_err(|e| Failure::new(FailureClass::Internal, e.to_string()))?
                .map_err(|e| Failure::new(FailureClass::NotFound, e.to_string()))?;
            // The folder may have changed since the cache looked at it.
            if bundle::digest(&files) != fetch.digest {
                return Err(Failure::new(
                    FailureClass::NotFound,
                    format!("model '{}' changed while it was read", fetch.model),
                ));
            }
            let files = Message::ModelFiles(ModelFiles {
                model: fetch.model.clone(),
                digest: fetch.digest,
                files,
            });
            Ok((files, Some(slot)))
        };
        answer
            .await
            .unwrap_or_else(|failure| (Message::Failure(failure), None))
    }

    /// The manifest of our `model` at the digest asked for: the first step of a chunked
    /// transfer. Reads no file (unless they changed and must be hashed again).
    async fn manifest(self: &Arc<Self>, fetch: FetchModel) -> Message {
        match self.version(&fetch.model, fetch.digest).await {
            Ok(listing) => {
                Message::Manifest(bundle::manifest(&fetch.model, fetch.digest, &listing))
            }
            Err(failure) => Message::Failure(failure),
        }
    }

    /// One byte range of one file of our `model`, if the model is still at the digest asked
    /// for and the file and range are in its listing. The path is looked up in the listing,
    /// never joined to the repository as the peer sent it.
    async fn chunk(self: &Arc<Self>, chunk: FetchChunk) -> (Message, Option<OwnedSemaphorePermit>) {
        let answer = async {
            let limit =
                MAX_CHUNK_SERVED.min(self.endpoint.max_frame_bytes().saturating_sub(64 << 10));
            let length = chunk.length as usize;
            if length > limit {
                return Err(Failure::new(
                    FailureClass::TooLarge,
                    format!("chunks of at most {limit} bytes are served; {length} asked"),
                ));
            }
            let slot = self.fetch_slot(FETCH_SLOT_WAIT).await?;
            let listing = self.version(&chunk.model, chunk.digest).await?;
            let file = listing
                .into_iter()
                .find(|f| f.path == chunk.path)
                .filter(|f| {
                    chunk
                        .offset
                        .checked_add(chunk.length.into())
                        .is_some_and(|end| end <= f.size)
                })
                .ok_or_else(|| {
                    Failure::new(
                        FailureClass::InvalidInput,
                        format!(
                            "model '{}' has no bytes {}+{} of '{}'",
                            chunk.model, chunk.offset, chunk.length, chunk.path
                        ),
                    )
                })?;
            let root = self.engine.repository().root().to_path_buf();
            let FetchChunk { model, offset, .. } = chunk;
            let data = tokio::task::spawn_blocking(move || {
                bundle::read_range(&root, &model, &file.path, offset, length)
            })
            .await
            .map_err(|e| Failure::new(FailureClass::Internal, e.to_string()))?
            .map_err(|e| Failure::new(FailureClass::NotFound, e.to_string()))?;
            Ok((Message::Chunk(data.into()), Some(slot)))
        };
        answer
            .await
            .unwrap_or_else(|failure| (Message::Failure(failure), None))
    }
}
