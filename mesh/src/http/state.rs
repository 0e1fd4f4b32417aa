//! What every HTTP handler shares ([`AppState`]), and the one way a door runs a model:
//! through the node's dispatch, here or over the mesh.

use crate::dispatch::endpoint::EndpointRoute;
use crate::dispatch::{Call, Dispatch, DispatchError, Origin, Served, traceparent};
use crate::http::admin::AdminAccess;
use crate::http::body::BodyLimits;
use crate::routing::{ROUTE_HEADER, route_header};
use axum::extract::FromRef;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use meshserve_host::Engine;
use meshserve_host::endpoint::Endpoint;
use std::sync::Arc;
use tower::ServiceExt;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// Where calls go: models and endpoints, here or in the mesh.
    pub dispatch: Dispatch,
    /// How request bodies are read: size, time and the node-wide byte budget.
    pub bodies: BodyLimits,
    /// Who may load and unload models and reload plugins.
    pub admin: AdminAccess,
}

impl FromRef<AppState> for BodyLimits {
    fn from_ref(state: &AppState) -> BodyLimits {
        state.bodies.clone()
    }
}

impl AppState {
    /// The node's engine.
    pub fn engine(&self) -> &Arc<Engine> {
        self.dispatch.engine()
    }

    pub(crate) fn endpoint(&self, name: &str) -> Option<Arc<Endpoint>> {
        self.dispatch.endpoints()?.get(name)
    }

    /// Where an OIP inference request for `name` runs when an endpoint answers it, the same
    /// on every door: an endpoint shadows a model of its name, and the mesh's endpoints are
    /// looked up only for a name that is not a model here, so a model's requests pay one map
    /// lookup for endpoints. `None`: run the model.
    pub(crate) fn endpoint_for_model_name(&self, name: &str) -> Option<EndpointRoute> {
        if self.endpoint(name).is_some() || self.engine().model(name).is_none() {
            self.dispatch.endpoint_route(name, Origin::Client).ok()
        } else {
            None
        }
    }
}

/// Runs `request` through the node's [`Dispatch`]: here, or on a replica over the mesh (W3C
/// `traceparent` crosses the hop).
pub(crate) async fn run_model(
    state: &AppState,
    request: meshserve_host::InferRequest,
    headers: &HeaderMap,
) -> Result<Served, DispatchError> {
    let call = Call {
        request,
        traceparent: traceparent(headers),
        origin: Origin::Client,
    };
    state.dispatch.clone().oneshot(call).await
}

/// Adds the `meshserve-route` hint for `model` when the node is in a mesh that serves it.
pub(crate) fn add_route_header(state: &AppState, model: &str, response: &mut Response) {
    if let Some(route) = state.dispatch.route(model)
        && let Ok(value) = HeaderValue::from_str(&route_header(&route))
    {
        response.headers_mut().insert(ROUTE_HEADER, value);
    }
}
