//! The route-aware Rust client of a meshserve mesh.
//!
//! It connects to any seed node over `meshserve/1` (QUIC, mutual TLS with a client certificate
//! of the mesh CA), learns where each model lives from the route hints that come back with
//! every answer (or from [`MeshClient::refresh`]), and from then on sends each request straight
//! to a replica, chosen by power of two choices over peak-EWMA latency × outstanding requests.
//! When a replica is unreachable or says it no longer serves the model, the client drops it
//! from its table and retries once on another replica or a seed, under the mesh's retry rule
//! (deadline, budget, `Retry-After`: [`crate::routing::retry`]): inference is idempotent.
//! Endpoints ([`MeshClient::invoke`]) are called the same way, except that a call goes to a
//! second node only when the first cannot have started it: plugins need not be idempotent.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use meshserve::client::{ClientConfig, MeshClient};
//! use meshserve::transport::{MeshIdentity, certs::Role};
//! use meshserve_host::{DataType, InferRequest, Tensor};
//!
//! let identity = MeshIdentity::from_dir("certs".as_ref(), Role::Client, "app")?;
//! let client = MeshClient::new(ClientConfig::new(vec!["127.0.0.1:7000".parse()?], identity))?;
//! let features = Tensor::new("features", DataType::Fp32, vec![1, 32], vec![0u8; 128].into())?;
//! let answer = client
//!     .infer(InferRequest { model: "fraud".into(), inputs: vec![features], ..Default::default() })
//!     .await?;
//! println!("{} answered: {:?}", answer.served_by, answer.response.outputs[0].shape);
//! # Ok(()) }
//! ```

pub mod body;
pub mod http3;
mod routes;

use crate::routing::replicas::{self, Attempt, Retry, Unanswered};
use crate::routing::retry::{self, Attempts, Failed, RetryPolicy};
use crate::routing::{ROUTE_HEADER, parse_route_header};
use crate::transport::{MeshEndpoint, MeshIdentity, TransportError};
use crate::wire::{
    EndpointAnswer, EndpointCall, Failure, FailureClass, InferCall, Message, RouteHint,
    WireTensorError, frame,
};
use meshserve_host::{InferRequest, InferResponse};
use routes::RouteBook;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How a client reaches the mesh.
#[derive(Clone)]
pub struct ClientConfig {
    /// Nodes to start from; any node of the mesh will do.
    pub seeds: Vec<SocketAddr>,
    /// The client's certificate, key and the mesh CA.
    pub identity: MeshIdentity,
    /// Longest a request may take, all its attempts together, when it sets no `timeout`
    /// itself; also the limit of route and status queries.
    pub timeout: Duration,
    /// Largest answer accepted, in bytes.
    pub max_frame_bytes: usize,
}

impl ClientConfig {
    /// Defaults: 10 s per request.
    pub fn new(seeds: Vec<SocketAddr>, identity: MeshIdentity) -> ClientConfig {
        ClientConfig {
            seeds,
            identity,
            timeout: Duration::from_secs(10),
            max_frame_bytes: frame::DEFAULT_MAX_FRAME_BYTES,
        }
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The client's endpoint could not start.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The mesh answered with a failure.
    #[error("{}", .0.message)]
    Failed(Failure),
    /// Every attempt failed to reach a node; the last reason.
    #[error("no node could take the request after {attempts} attempts: {last}")]
    Exhausted {
        /// Attempts made.
        attempts: usize,
        /// The last failure.
        last: String,
    },
    /// An answer whose tensors do not match their shapes.
    #[error("malformed answer: {0}")]
    Malformed(#[from] WireTensorError),
}

/// A successful answer and where it came from.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The inference result.
    pub response: InferResponse,
    /// The node that ran the model.
    pub served_by: String,
    /// The node the request was sent to (differs from `served_by` when it was forwarded).
    pub sent_to: SocketAddr,
}

/// An endpoint's answer and where the call was sent.
#[derive(Debug, Clone)]
pub struct Invoked {
    /// Status, headers and body as the endpoint's door made them; `answer.node` ran it.
    pub answer: EndpointAnswer,
    /// The node the call was sent to (differs from `answer.node` when it was forwarded).
    pub sent_to: SocketAddr,
}

/// A route-aware client; cheap to share behind an `Arc`, safe to call concurrently.
pub struct MeshClient {
    endpoint: MeshEndpoint,
    config: ClientConfig,
    routes: RouteBook,
    retry: RetryPolicy,
}

impl MeshClient {
    /// A client; connects lazily, on the first request.
    pub fn new(config: ClientConfig) -> Result<MeshClient, ClientError> {
        let endpoint = MeshEndpoint::client(&config.identity, config.max_frame_bytes)?;
        Ok(MeshClient {
            endpoint,
            config,
            routes: RouteBook::new(|replica| Some(replica.quic)),
            retry: RetryPolicy::default(),
        })
    }

    /// The route the client holds for `model`.
    pub fn route(&self, model: &str) -> Option<RouteHint> {
        self.routes.route(model)
    }

    /// Fetches the whole route table from the first seed that answers.
    pub async fn refresh(&self) -> Result<(), ClientError> {
        let mut last = String::from("no seeds configured");
        for seed in &self.config.seeds {
            match self
                .endpoint
                .call(*seed, &Message::RouteQuery, self.config.timeout)
                .await
            {
                Ok(Message::Routes(table)) => {
                    for route in table.routes {
                        self.routes.learn(Some(route));
                    }
                    return Ok(());
                }
                Ok(other) => last = format!("{seed} answered {other:?}"),
                Err(e) => last = e.to_string(),
            }
        }
        Err(ClientError::Exhausted {
            attempts: self.config.seeds.len(),
            last,
        })
    }

    /// Runs `request` on the mesh: straight to a replica when the route is known, else through
    /// a seed (which forwards and tells us the route). A failed attempt is retried once on
    /// another replica or seed under the mesh's retry rule ([`crate::routing::retry`]), within
    /// the request's deadline (its `timeout`, else [`ClientConfig::timeout`]).
    pub async fn infer(&self, request: InferRequest) -> Result<Answer, ClientError> {
        let model = request.model.clone();
        let call = InferCall::from_request(request, None);
        let timeout = call.timeout_or(self.config.timeout);
        let message = Message::Infer(call);
        let mut attempts = Attempts::start(&self.retry, timeout, Instant::now());
        let mut targets = self.routes.targets(&model, &self.config.seeds);
        let attempt = |(key, addr): (String, SocketAddr), left: Duration| {
            let (model, message) = (&model, &message);
            async move {
                let started = Instant::now();
                let pending = self.routes.start(&key, started);
                let result = self.endpoint.call(addr, message, left).await;
                let now = Instant::now();
                match result {
                    Ok(Message::Answer(answer)) => {
                        pending.finish(Some(now - started), now);
                        self.routes.learn(answer.route.clone());
                        match answer.into_response() {
                            Ok((response, served_by)) => Attempt::Answered(Answer {
                                response,
                                served_by,
                                sent_to: addr,
                            }),
                            Err(e) => Attempt::Failed(e.into(), Retry::Never),
                        }
                    }
                    Ok(Message::Failure(failure)) => {
                        let retryable = retry::retryable(Failed::Answered(&failure));
                        if retryable {
                            // Declined (moved, unloading, shutting down): not a latency to learn.
                            pending.finish(None, now);
                            self.routes.forget(model, addr);
                        } else {
                            pending.finish(Some(now - started), now);
                        }
                        self.routes.learn(failure.route.clone());
                        Attempt::Failed(ClientError::Failed(failure), Retry::Rule { retryable })
                    }
                    Ok(other) => {
                        pending.finish(None, now);
                        Attempt::Failed(unexpected(addr, &other), Retry::Never)
                    }
                    Err(e) => {
                        pending.finish(None, now);
                        self.routes.forget(model, addr);
                        let retryable = retry::retryable(Failed::Transport(&e));
                        Attempt::Failed(e.into(), Retry::Rule { retryable })
                    }
                }
            }
        };
        replicas::run(&mut targets, &mut attempts, attempt, |_, _, _| {})
            .await
            .map_err(gave_up)
    }

    /// Calls the endpoint `name` with `body` (of `content_type`: any body its pre-plugin
    /// understands) and returns its answer as its door made it: straight to a replica once an
    /// answer named them, else through a seed, which forwards it whole. Plugins need not be
    /// idempotent, so a call goes to another node only when the one asked could not have
    /// started it: unreachable, or it answered that it does not run the endpoint.
    pub async fn invoke(
        &self,
        name: &str,
        body: bytes::Bytes,
        content_type: &str,
    ) -> Result<Invoked, ClientError> {
        let timeout = self.config.timeout;
        let message = Message::Invoke(EndpointCall {
            endpoint: name.to_string(),
            headers: vec![("content-type".into(), content_type.into())],
            body,
            timeout_us: Some(u64::try_from(timeout.as_micros()).unwrap_or(u64::MAX)),
        });
        let mut attempts = Attempts::start(&self.retry, timeout, Instant::now());
        let mut targets = self.routes.targets(name, &self.config.seeds);
        let attempt = |(key, addr): (String, SocketAddr), left: Duration| {
            let message = &message;
            async move {
                let started = Instant::now();
                let pending = self.routes.start(&key, started);
                let result = self.endpoint.call(addr, message, left).await;
                let now = Instant::now();
                match result {
                    Ok(Message::Invoked(answer)) => {
                        pending.finish(Some(now - started), now);
                        let hint = answer
                            .headers
                            .iter()
                            .find(|(name, _)| name == ROUTE_HEADER)
                            .and_then(|(_, value)| parse_route_header(value));
                        self.routes.learn(hint);
                        Attempt::Answered(Invoked {
                            answer,
                            sent_to: addr,
                        })
                    }
                    // Only a node that declined the call (it does not run the endpoint) is
                    // sure not to have started it.
                    Ok(Message::Failure(failure)) if failure.class == FailureClass::NotHere => {
                        pending.finish(None, now);
                        self.routes.forget(name, addr);
                        let retryable = retry::retryable(Failed::Answered(&failure));
                        Attempt::Failed(ClientError::Failed(failure), Retry::Rule { retryable })
                    }
                    Ok(Message::Failure(failure)) => {
                        pending.finish(None, now);
                        Attempt::Failed(ClientError::Failed(failure), Retry::Never)
                    }
                    Ok(other) => {
                        pending.finish(None, now);
                        Attempt::Failed(unexpected(addr, &other), Retry::Never)
                    }
                    Err(e) => {
                        pending.finish(None, now);
                        self.routes.forget(name, addr);
                        let retry = if matches!(e, TransportError::Connect { .. }) {
                            Retry::Rule {
                                retryable: retry::retryable(Failed::Transport(&e)),
                            }
                        } else {
                            Retry::Never
                        };
                        Attempt::Failed(e.into(), retry)
                    }
                }
            }
        };
        replicas::run(&mut targets, &mut attempts, attempt, |_, _, _| {})
            .await
            .map_err(gave_up)
    }

    /// Asks `node` for its view of the mesh.
    pub async fn status(&self, node: SocketAddr) -> Result<crate::wire::MeshStatus, ClientError> {
        match self.query(node, &Message::StatusQuery).await? {
            Message::Status(status) => Ok(status),
            other => Err(unexpected(node, &other)),
        }
    }

    /// A model's OIP metadata (JSON), from `node` or the replica it asks.
    pub async fn metadata(&self, node: SocketAddr, model: &str) -> Result<String, ClientError> {
        let query = Message::MetadataQuery(crate::wire::MetadataQuery {
            model: model.to_string(),
            version: None,
        });
        match self.query(node, &query).await? {
            Message::Metadata(json) => Ok(json),
            other => Err(unexpected(node, &other)),
        }
    }

    /// Asks `node` how loaded each model it serves is.
    pub async fn loads(&self, node: SocketAddr) -> Result<crate::wire::NodeLoads, ClientError> {
        match self.query(node, &Message::LoadQuery).await? {
            Message::Loads(loads) => Ok(loads),
            other => Err(unexpected(node, &other)),
        }
    }

    async fn query(&self, node: SocketAddr, query: &Message) -> Result<Message, ClientError> {
        match self.endpoint.call(node, query, self.config.timeout).await? {
            Message::Failure(failure) => Err(ClientError::Failed(failure)),
            answer => Ok(answer),
        }
    }
}

fn unexpected(node: SocketAddr, answer: &Message) -> ClientError {
    ClientError::Exhausted {
        attempts: 1,
        last: format!("{node} answered {}", answer.kind()),
    }
}

/// What a request that got no answer ends with: the mesh's own failure and a malformed answer
/// as they are; otherwise (nothing reached, or a broken peer) how many were tried and why the
/// last failed.
fn gave_up(unanswered: Unanswered<ClientError>) -> ClientError {
    let tried = unanswered.tried;
    match unanswered.last {
        Some(e @ (ClientError::Failed(_) | ClientError::Malformed(_))) => e,
        Some(ClientError::Exhausted { last, .. }) => ClientError::Exhausted {
            attempts: tried,
            last,
        },
        Some(e) => ClientError::Exhausted {
            attempts: tried,
            last: e.to_string(),
        },
        None => ClientError::Exhausted {
            attempts: 0,
            last: "no replica or seed known".into(),
        },
    }
}
