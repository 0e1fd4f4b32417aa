//! The `meshserve/1` door: frames that run models and endpoints, from native clients and from
//! nodes that forward, decoded into calls of the node's [`Dispatch`] and its answers encoded
//! back. The cluster carries the frames ([`Calls`]); a node's frames (already forwarded once)
//! are served here or refused as "not here", a client's may be forwarded.

use crate::cluster::Calls;
use crate::dispatch::endpoint::{Invocation, ran_on};
use crate::dispatch::{Call, Dispatch, DispatchError, Origin};
use crate::http::error::ApiError;
use crate::transport::certs::Role;
use crate::wire::{
    EndpointAnswer, EndpointCall, Failure, FailureClass, InferAnswer, InferCall, Message,
    MetadataQuery, WireTensor,
};
use axum::response::IntoResponse;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use meshserve_host::metrics::Protocol;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};
use tower::ServiceExt;
use tracing::Instrument;

/// The door: answers model, endpoint and metadata calls through the node's dispatch.
pub struct Door {
    dispatch: Dispatch,
}

impl Door {
    /// The door of a node with this dispatch.
    pub fn new(dispatch: Dispatch) -> Door {
        Door { dispatch }
    }
}

impl Calls for Door {
    fn answer(
        &self,
        message: Message,
        role: Role,
    ) -> Pin<Box<dyn Future<Output = Message> + Send>> {
        let dispatch = self.dispatch.clone();
        Box::pin(async move {
            match message {
                Message::Infer(call) => infer(&dispatch, call, role).await,
                Message::Invoke(call) => invoke(&dispatch, call, origin_of(role)).await,
                Message::MetadataQuery(query) => metadata(&dispatch, query, role).await,
                other => Message::Failure(Failure::new(
                    FailureClass::InvalidInput,
                    format!("unexpected message {}", other.kind()),
                )),
            }
        })
    }
}

/// A node's request was forwarded already; a client's may be.
fn origin_of(role: Role) -> Origin {
    match role {
        Role::Node => Origin::Node,
        Role::Client => Origin::Client,
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

async fn metadata(dispatch: &Dispatch, query: MetadataQuery, role: Role) -> Message {
    let metadata = dispatch
        .metadata(&query.model, query.version.as_deref(), origin_of(role))
        .await;
    match metadata {
        Ok(metadata) => Message::Metadata(metadata.to_string()),
        Err(e) => Message::Failure(with_route(dispatch, &query.model, e)),
    }
}

/// Serves an inference call: a node's call (already forwarded) is served here or refused as
/// "not here", a client's may be forwarded.
async fn infer(dispatch: &Dispatch, call: InferCall, role: Role) -> Message {
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
                    metrics.record_request(&model, Protocol::Mesh, 200, started.elapsed());
                    node_name(dispatch)
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
                metrics.record_request(&model, Protocol::Mesh, status, started.elapsed());
            }
            Message::Failure(with_route(dispatch, &model, e))
        }
    }
}

fn node_name(dispatch: &Dispatch) -> String {
    dispatch
        .cluster()
        .map_or_else(String::new, |c| c.name().to_string())
}

/// Runs an endpoint call whole: an unknown endpoint (or, from a node, one not served here) is
/// a failure the caller acts on; once it runs, every answer, an error included, comes back as
/// the HTTP-shaped answer a client of the forwarding node receives unchanged.
async fn invoke(dispatch: &Dispatch, call: EndpointCall, origin: Origin) -> Message {
    let started = Instant::now();
    let route = match dispatch.endpoint_route(&call.endpoint, origin) {
        Ok(route) => route,
        Err(failure) => return Message::Failure(failure),
    };
    let mut headers = HeaderMap::new();
    for (name, value) in &call.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.append(name, value);
        }
    }
    let invocation = Invocation {
        headers: &headers,
        body: call.body,
        timeout: call.timeout_us.map(Duration::from_micros),
        started,
    };
    let (status, answer_headers, body, node) = match dispatch.invoke(route, invocation).await {
        Ok(response) => {
            let node = ran_on(&response).map_or_else(|| node_name(dispatch), str::to_string);
            let (parts, body) = response.into_parts();
            (parts.status, parts.headers, body, node)
        }
        Err(e) => {
            let (parts, body) = ApiError::from(e).into_response().into_parts();
            // An error's body is a short JSON message.
            let body = axum::body::to_bytes(body, 64 << 10)
                .await
                .unwrap_or_else(|_| Bytes::new());
            (parts.status, parts.headers, body, node_name(dispatch))
        }
    };
    dispatch.engine().metrics().record_request(
        &call.endpoint,
        Protocol::Mesh,
        status.as_u16(),
        started.elapsed(),
    );
    Message::Invoked(EndpointAnswer {
        node,
        status: status.as_u16(),
        headers: answer_headers
            .iter()
            .filter_map(|(n, v)| Some((n.to_string(), v.to_str().ok()?.to_string())))
            .collect(),
        body,
    })
}
