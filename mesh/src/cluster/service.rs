//! The `meshserve/1` service: accepts connections from nodes and native clients (mutual TLS
//! already checked by the handshake), reads membership datagrams from nodes, and answers one
//! frame per bidirectional stream.

use crate::cluster::{Cluster, bundle};
use crate::http::error::status_of;
use crate::http::routes::model_metadata_json;
use crate::membership::Membership;
use crate::transport::certs::Role;
use crate::transport::{TransportError, read_frame, tls, write_frame};
use crate::wire::{
    Failure, FailureClass, FetchModel, InferAnswer, InferCall, Message, ModelFiles, WIRE_VERSION,
    WireError, WireTensor,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

/// Accepts connections until the endpoint closes.
pub(super) async fn serve(cluster: Arc<Cluster>) {
    while let Some(incoming) = cluster.endpoint.quinn().accept().await {
        let cluster = cluster.clone();
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
            if role == Role::Node {
                tokio::spawn(read_datagrams(cluster.clone(), connection.clone()));
            }
            while let Ok((send, recv)) = connection.accept_bi().await {
                tokio::spawn(answer(cluster.clone(), send, recv, role, peer));
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
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    role: Role,
    peer: SocketAddr,
) {
    // A peer that announces a frame and trickles it must not hold the stream (and its
    // buffer) for long.
    let read = tokio::time::timeout(
        cluster.frame_read_timeout,
        read_frame(&mut recv, cluster.endpoint.max_frame_bytes(), peer),
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
    let reply = match read {
        Ok(Message::Infer(call)) => cluster.serve_call(call, role).await,
        Ok(Message::RouteQuery) => Message::Routes(cluster.view().routes()),
        Ok(Message::StatusQuery) => Message::Status(cluster.status()),
        Ok(Message::FetchModel(fetch)) if role == Role::Node => cluster.model_files(fetch).await,
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
            match model_metadata_json(&cluster.engine, &query.model, query.version.as_deref()) {
                Ok(metadata) => Message::Metadata(metadata.to_string()),
                Err(e) => {
                    let mut failure = Failure::from(&e);
                    failure.route = cluster.route(&query.model);
                    Message::Failure(failure)
                }
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
        Err(e) => {
            tracing::debug!(%peer, error = %e, "stream ended before a whole frame");
            return;
        }
    };
    if let Err(e) = write_frame(&mut send, &reply).await {
        tracing::debug!(%peer, error = %e, "could not send the answer");
    }
}

impl Cluster {
    /// A model's files for a peer that was placed the model, if ours have the digest it asks
    /// for and fit in a frame.
    async fn model_files(&self, fetch: FetchModel) -> Message {
        let root = self.engine.repository().root().to_path_buf();
        let model = fetch.model.clone();
        let read = tokio::task::spawn_blocking(move || {
            meshserve_host::model::repository::Repository::check_name(&model)
                .map_err(|e| e.to_string())?;
            bundle::read(&root, &model).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        let files = match read {
            Ok(files) => files,
            Err(e) => {
                return Message::Failure(Failure::new(
                    FailureClass::NotFound,
                    format!("model '{}' is not here: {e}", fetch.model),
                ));
            }
        };
        if bundle::digest(&files) != fetch.digest {
            return Message::Failure(Failure::new(
                FailureClass::NotFound,
                format!(
                    "model '{}' here is not version {}",
                    fetch.model,
                    bundle::hex(&fetch.digest)
                ),
            ));
        }
        let size: usize = files.iter().map(|f| f.data.len() + f.path.len()).sum();
        if size + 1024 > self.endpoint.max_frame_bytes() {
            return Message::Failure(Failure::new(
                FailureClass::TooLarge,
                format!(
                    "model '{}' ({size} bytes) exceeds the frame limit of {} bytes (mesh.max_frame_bytes)",
                    fetch.model,
                    self.endpoint.max_frame_bytes()
                ),
            ));
        }
        Message::ModelFiles(ModelFiles {
            model: fetch.model,
            digest: fetch.digest,
            files,
        })
    }

    /// Serves an inference call that arrived over the mesh: here when the model is loaded,
    /// else forwarded for a client, else refused as "not here" to a forwarding node (which
    /// then tries another replica), never forwarded twice.
    async fn serve_call(&self, call: InferCall, role: Role) -> Message {
        let started = Instant::now();
        let model = call.model.clone();
        let metrics = self.engine.metrics().clone();
        let source = match role {
            Role::Node => "node",
            Role::Client => "client",
        };
        if self.engine.model(&model).is_none() {
            if call.forwarded {
                let mut failure = Failure::new(
                    FailureClass::NotHere,
                    format!("node '{}' does not serve '{model}'", self.name),
                );
                failure.route = self.route(&model);
                return Message::Failure(failure);
            }
            return match self.forward(call).await {
                Ok(answer) => Message::Answer(answer),
                Err(failure) => Message::Failure(failure),
            };
        }
        let route = self.route(&model);
        let (request, traceparent) = match call.into_request() {
            Ok(parts) => parts,
            Err(mut failure) => {
                failure.route = route;
                return Message::Failure(failure);
            }
        };
        let span = tracing::debug_span!("mesh_infer", %model, traceparent = traceparent.as_deref().unwrap_or(""));
        let outcome = self.engine.infer(request).instrument(span).await;
        let elapsed = started.elapsed();
        match outcome {
            Ok(response) => {
                self.observe_local(elapsed);
                metrics.record_mesh_served(&model, source);
                metrics.record_request(&model, 200, elapsed);
                Message::Answer(InferAnswer {
                    id: response.id,
                    model_name: response.model_name,
                    model_version: response.model_version,
                    outputs: response.outputs.into_iter().map(WireTensor::from).collect(),
                    timings: response.timings.into(),
                    served_by: self.name.clone(),
                    route,
                })
            }
            Err(e) => {
                let mut failure = Failure::from(&e);
                metrics.record_request(&model, status_of(e.class()).as_u16(), elapsed);
                failure.route = route;
                Message::Failure(failure)
            }
        }
    }
}
