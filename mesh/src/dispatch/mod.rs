//! The layer under the doors: a call is a model call or an endpoint call, served here or
//! forwarded, whichever door it came in by (HTTP/1.1, HTTP/2 and HTTP/3, `meshserve/1` from
//! clients and nodes). The doors only decode and encode.
//!
//! - model calls: [`Dispatch::infer`], where [`plan`] (pure) says: the engine, or a replica;
//! - endpoint calls ([`endpoint`]): `[pre-plugin] → model → [post-plugin]` here, or the whole
//!   request on a replica of the endpoint's model;
//! - how answers report their time ([`timing`]).
//!
//! Which replica and whether to retry are the cluster's ([`crate::routing`]). [`Dispatch`] is a
//! tower [`Service`] for model calls, so limits, timeouts or load shedding compose around it as
//! layers for every door at once.

pub mod endpoint;
pub mod timing;

use crate::cluster::Cluster;
use crate::wire::{Failure, FailureClass, InferCall, RouteHint};
use meshserve_host::endpoint::Endpoints;
use meshserve_host::model::signature::TensorSpec;
use meshserve_host::{Engine, InferError, InferRequest, InferResponse};
use serde_json::{Value, json};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tower::Service;

/// The W3C trace context header, carried across a mesh hop.
pub const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// The W3C `traceparent` of a request, to carry across a mesh hop.
pub fn traceparent(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Who sent a request, which decides whether it may be forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A client (HTTP, or a native `meshserve/1` client): forwarded when not served here.
    Client,
    /// Another node, which already forwarded it: served here or refused as "not here", never
    /// forwarded twice (no loops, no hops the caller cannot see).
    Node,
}

/// Where a request runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// On this node's engine (which also answers "unknown model" when nothing serves it).
    Local,
    /// On a replica elsewhere in the mesh.
    Forward,
    /// Nowhere: a forwarding node sent it to a node that no longer serves the model, and
    /// will try another replica.
    NotHere,
}

/// Where a request for a model runs: here when the engine serves the model (or there is no
/// mesh to ask), else forwarded for a client, else refused to a node.
pub fn plan(served_here: bool, in_mesh: bool, origin: Origin) -> Plan {
    match (served_here || !in_mesh, origin) {
        (true, _) => Plan::Local,
        (false, Origin::Client) => Plan::Forward,
        (false, Origin::Node) => Plan::NotHere,
    }
}

/// A request for the dispatcher.
#[derive(Debug)]
pub struct Call {
    /// The engine request.
    pub request: InferRequest,
    /// W3C `traceparent` to carry across a mesh hop.
    pub traceparent: Option<String>,
    /// Who sent it.
    pub origin: Origin,
}

/// A model's answer, and the mesh hop it took when it ran on another node.
#[derive(Debug)]
pub struct Served {
    /// The answer.
    pub response: InferResponse,
    /// Time spent on the forwarded call and the node that served it; `None` when served here.
    pub hop: Option<(Duration, String)>,
}

/// Why a model did not answer: here in the engine, or in the mesh.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// The local engine refused or failed.
    #[error(transparent)]
    Local(#[from] InferError),
    /// The mesh could not serve it, or the replica refused or failed.
    #[error("{}", .0.message)]
    Remote(Failure),
}

impl DispatchError {
    /// Whether the request's tensors did not fit the model, and why.
    pub fn invalid_input(&self) -> Option<&str> {
        match self {
            DispatchError::Local(InferError::InvalidInput(message)) => Some(message),
            DispatchError::Remote(f) if f.class == FailureClass::InvalidInput => Some(&f.message),
            _ => None,
        }
    }
}

impl From<DispatchError> for Failure {
    fn from(e: DispatchError) -> Failure {
        match e {
            DispatchError::Local(e) => Failure::from(&e),
            DispatchError::Remote(f) => f,
        }
    }
}

/// Serves or forwards requests for a node; cheap to clone.
#[derive(Clone)]
pub struct Dispatch {
    engine: Arc<Engine>,
    cluster: Option<Arc<Cluster>>,
    endpoints: Option<Arc<Endpoints>>,
}

impl Dispatch {
    /// The dispatcher of a node with `engine`, in the mesh of `cluster` if it has one, serving
    /// `endpoints` if it has any.
    pub fn new(
        engine: Arc<Engine>,
        cluster: Option<Arc<Cluster>>,
        endpoints: Option<Arc<Endpoints>>,
    ) -> Dispatch {
        Dispatch {
            engine,
            cluster,
            endpoints,
        }
    }

    /// The node's engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The node's place in the mesh, when it has one.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// The node's own endpoints, when it serves plugins.
    pub fn endpoints(&self) -> Option<&Arc<Endpoints>> {
        self.endpoints.as_ref()
    }

    /// Where `model` is served in the mesh, for route hints.
    pub fn route(&self, model: &str) -> Option<RouteHint> {
        self.cluster.as_ref()?.route(model)
    }

    /// Whether the model is served somewhere this node can reach: here or in the mesh.
    pub fn serves(&self, model: &str) -> bool {
        self.engine.model(model).is_some() || self.route(model).is_some()
    }

    fn plan(&self, model: &str, origin: Origin) -> Plan {
        plan(
            self.engine.model(model).is_some(),
            self.cluster.is_some(),
            origin,
        )
    }

    fn not_here(&self, model: &str) -> DispatchError {
        let name = self.cluster.as_ref().map_or("", |c| c.name());
        let mut failure = Failure::new(
            FailureClass::NotHere,
            format!("node '{name}' does not serve '{model}'"),
        );
        failure.route = self.route(model);
        DispatchError::Remote(failure)
    }

    /// Runs a call where [`plan`] says.
    pub async fn infer(&self, call: Call) -> Result<Served, DispatchError> {
        let model = call.request.model.as_str();
        match (self.plan(model, call.origin), &self.cluster) {
            (Plan::NotHere, _) => Err(self.not_here(model)),
            (Plan::Forward, Some(cluster)) => {
                let started = Instant::now();
                // Boxed, so the forwarding state machine (kilobytes) is not part of every
                // local request's future.
                let answer = Box::pin(
                    cluster.forward(InferCall::from_request(call.request, call.traceparent)),
                )
                .await
                .map_err(DispatchError::Remote)?;
                let hop = started.elapsed();
                let from = answer.served_by.clone();
                let (response, served_by) = answer.into_response().map_err(|e| {
                    DispatchError::Remote(Failure::new(
                        FailureClass::Internal,
                        format!("replica '{from}' sent a malformed answer: {e}"),
                    ))
                })?;
                Ok(Served {
                    response,
                    hop: Some((hop, served_by)),
                })
            }
            _ => {
                // Only a mesh member keeps a load estimate of its own replica.
                let started = self.cluster.as_ref().map(|_| Instant::now());
                let response = self.engine.infer(call.request).await?;
                if let (Some(cluster), Some(started)) = (&self.cluster, started) {
                    cluster.observe_local(started.elapsed());
                }
                Ok(Served {
                    response,
                    hop: None,
                })
            }
        }
    }

    /// A model's OIP metadata, from wherever [`plan`] says it is served.
    pub async fn metadata(
        &self,
        model: &str,
        version: Option<&str>,
        origin: Origin,
    ) -> Result<Value, DispatchError> {
        match (self.plan(model, origin), &self.cluster) {
            (Plan::NotHere, _) => Err(self.not_here(model)),
            (Plan::Forward, Some(cluster)) => cluster
                .remote_metadata(model, version.map(str::to_string))
                .await
                .map_err(DispatchError::Remote),
            _ => Ok(local_metadata(&self.engine, model, version)?),
        }
    }
}

impl Service<Call> for Dispatch {
    type Response = Served;
    type Error = DispatchError;
    type Future = Pin<Box<dyn Future<Output = Result<Served, DispatchError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), DispatchError>> {
        // Admission is the engine's (bounded queues answer 503 at once), not a wait here.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let dispatch = self.clone();
        Box::pin(async move { dispatch.infer(call).await })
    }
}

/// A tensor's OIP metadata.
pub fn spec_json(spec: &TensorSpec) -> Value {
    json!({ "name": spec.name, "datatype": spec.datatype.as_str(), "shape": spec.shape })
}

/// OIP model metadata of a model loaded in `engine`.
pub fn local_metadata(
    engine: &Engine,
    model: &str,
    version: Option<&str>,
) -> Result<Value, InferError> {
    let loaded = engine
        .model(model)
        .ok_or_else(|| InferError::ModelNotFound {
            model: model.to_string(),
        })?;
    let chosen = loaded.version(version)?;
    let versions: Vec<String> = loaded.versions.keys().map(u64::to_string).collect();
    Ok(json!({
        "name": chosen.name,
        "versions": versions,
        "platform": "onnxruntime_onnx",
        "inputs": chosen.signature.inputs.iter().map(spec_json).collect::<Vec<_>>(),
        "outputs": chosen.signature.outputs.iter().map(spec_json).collect::<Vec<_>>(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_here_runs_here_else_clients_are_forwarded_and_nodes_refused() {
        for origin in [Origin::Client, Origin::Node] {
            assert_eq!(plan(true, true, origin), Plan::Local, "{origin:?}");
            assert_eq!(
                plan(false, false, origin),
                Plan::Local,
                "without a mesh the engine answers, unknown model included"
            );
        }
        assert_eq!(plan(false, true, Origin::Client), Plan::Forward);
        assert_eq!(
            plan(false, true, Origin::Node),
            Plan::NotHere,
            "a forwarded request is never forwarded again"
        );
    }
}
