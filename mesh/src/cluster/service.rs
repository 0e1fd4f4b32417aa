//! The `meshserve/1` service: accepts connections from nodes and native clients (mutual TLS
//! already checked by the handshake), reads membership datagrams from nodes, and answers one
//! frame per bidirectional stream.

use crate::cluster::{Cluster, bundle};
use crate::dispatch::{Call, Dispatch, DispatchError, Origin};
use crate::membership::Membership;
use crate::transport::certs::Role;
use crate::transport::{Frame, TransportError, read_frame, tls, write_frame};
use crate::wire::{
    Failure, FailureClass, FetchChunk, FetchModel, InferAnswer, InferCall, Message, ModelFiles,
    WIRE_VERSION, WireError, WireTensor,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::OwnedSemaphorePermit;
use tower::ServiceExt;
use tracing::Instrument;

/// Accepts connections until the endpoint closes; requests for models go through `dispatch`.
pub(super) async fn serve(cluster: Arc<Cluster>, dispatch: Dispatch) {
    while let Some(incoming) = cluster.endpoint.quinn().accept().await {
        let cluster = cluster.clone();
        let dispatch = dispatch.clone();
        tokio::spawn(async move {
            let peer = incoming.remote_address();
            let connection = match incoming.await {
                Ok(connection) => connection,
                // A TLS failure either way: the peer has no certificate of our mesh CA, or
                // does not trust ours (a node of another mesh).
                Err(e) if is_tls_refusal(&e) => {
                    tracing::warn!(%peer, error = %e, "mesh connection refused");
                    return;
                }
                // The peer gave up (a connect timeout while we were starting, a restart).
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "mesh handshake abandoned");
                    return;
                }
            };
            let role = tls::peer_role(&connection);
            match role {
                Role::Node => {
                    tokio::spawn(read_datagrams(cluster.clone(), connection.clone()));
                }
                Role::Client => {
                    connection.set_max_concurrent_bi_streams(tls::CLIENT_MAX_STREAMS.into());
                    connection.set_receive_window(tls::CLIENT_CONNECTION_WINDOW.into());
                }
            }
            while let Ok((send, recv)) = connection.accept_bi().await {
                let exchange = answer(cluster.clone(), dispatch.clone(), send, recv, role, peer);
                tokio::spawn(exchange);
            }
        });
    }
}

fn is_tls_refusal(error: &quinn::ConnectionError) -> bool {
    // QUIC carries TLS alerts as error codes 0x100..=0x1ff (RFC 9001, section 4.8).
    let is_alert = |code: quinn::TransportErrorCode| (0x100..=0x1ff).contains(&u64::from(code));
    match error {
        quinn::ConnectionError::TransportError(e) => is_alert(e.code),
        quinn::ConnectionError::ConnectionClosed(close) => is_alert(close.error_code),
        _ => false,
    }
}

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
    dispatch: Dispatch,
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
        tracing::warn!(%peer, "frame not received in time; stream dropped");
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
        Ok(Message::Infer(call)) => serve_call(&dispatch, call, role).await,
        Ok(Message::RouteQuery) => Message::Routes(cluster.view().routes()),
        Ok(Message::StatusQuery) => Message::Status(cluster.status()),
        Ok(Message::LoadQuery) => Message::Loads(cluster.loads()),
        Ok(Message::FetchModel(fetch)) if role == Role::Node => {
            let (reply, slot) = cluster.model_files(fetch).await;
            fetch_slot = slot;
            reply
        }
        Ok(Message::FetchManifest(fetch)) if role == Role::Node => cluster.manifest(fetch).await,
        Ok(Message::Invoke(call)) => match cluster.endpoint_runner.get() {
            Some(runner) => match runner.run(call, origin_of(role)).await {
                Ok(answer) => Message::Invoked(answer),
                Err(failure) => Message::Failure(failure),
            },
            None => Message::Failure(Failure::new(
                FailureClass::NotHere,
                format!("node '{}' serves no endpoints yet", cluster.name),
            )),
        },
        Ok(Message::FetchChunk(chunk)) if role == Role::Node => {
            let (reply, slot) = cluster.chunk(chunk).await;
            fetch_slot = slot;
            reply
        }
        Ok(Message::AdvertQuery) if role == Role::Node => {
            match cluster
                .view()
                .members
                .first()
                .and_then(|me| me.advert.clone())
            {
                Some(advert) => Message::Advert(advert),
                None => Message::Failure(Failure::new(
                    FailureClass::Unavailable,
                    "this node has not made its advert yet",
                )),
            }
        }
        Ok(Message::MetadataQuery(query)) => {
            let metadata = dispatch
                .metadata(&query.model, query.version.as_deref(), origin_of(role))
                .await;
            match metadata {
                Ok(metadata) => Message::Metadata(metadata.to_string()),
                Err(e) => Message::Failure(with_route(&dispatch, &query.model, e)),
            }
        }
        Ok(other) => Message::Failure(Failure::new(
            FailureClass::InvalidInput,
            format!("unexpected message {}", other.kind()),
        )),
        Err(TransportError::Frame { source, .. }) => {
            tracing::warn!(%peer, error = %source, "bad frame refused");
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

/// A failure to send back, with the route to the model (so the caller learns where it is).
fn with_route(dispatch: &Dispatch, model: &str, error: DispatchError) -> Failure {
    let mut failure = Failure::from(error);
    if failure.route.is_none() {
        failure.route = dispatch.route(model);
    }
    failure
}

/// A node's request was forwarded already; a client's may be.
fn origin_of(role: Role) -> Origin {
    match role {
        Role::Node => Origin::Node,
        Role::Client => Origin::Client,
    }
}

/// Serves an inference call that arrived over the mesh, through the node's [`Dispatch`]: a
/// node's call (already forwarded) is served here or refused as "not here", a client's may be
/// forwarded.
async fn serve_call(dispatch: &Dispatch, call: InferCall, role: Role) -> Message {
    let started = Instant::now();
    let model = call.model.clone();
    // Whoever sets the flag only narrows what is done (served here or refused), so a client
    // claiming it gains nothing.
    let origin = if call.forwarded {
        Origin::Node
    } else {
        Origin::Client
    };
    let (request, traceparent) = match call.into_request() {
        Ok(parts) => parts,
        Err(mut failure) => {
            failure.route = dispatch.route(&model);
            return Message::Failure(failure);
        }
    };
    let span = tracing::debug_span!("mesh_infer", %model, traceparent = traceparent.as_deref().unwrap_or(""));
    let call = Call {
        request,
        traceparent,
        origin,
    };
    let outcome = dispatch.clone().oneshot(call).instrument(span).await;
    let metrics = dispatch.engine().metrics();
    match outcome {
        Ok(served) => {
            let served_by = match served.hop {
                Some((_, node)) => node,
                None => {
                    let source = match role {
                        Role::Node => "node",
                        Role::Client => "client",
                    };
                    metrics.record_mesh_served(&model, source);
                    metrics.record_request(&model, 200, started.elapsed());
                    dispatch
                        .cluster()
                        .map_or_else(String::new, |c| c.name().to_string())
                }
            };
            let response = served.response;
            Message::Answer(InferAnswer {
                id: response.id,
                model_name: response.model_name,
                model_version: response.model_version,
                outputs: response.outputs.into_iter().map(WireTensor::from).collect(),
                timings: response.timings.into(),
                served_by,
                route: dispatch.route(&model),
            })
        }
        Err(e) => {
            if let DispatchError::Local(local) = &e {
                let status = local.class().http_status();
                metrics.record_request(&model, status, started.elapsed());
            }
            Message::Failure(with_route(dispatch, &model, e))
        }
    }
}
