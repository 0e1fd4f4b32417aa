//! Endpoints over HTTP: `POST /v1/endpoints/{endpoint}/invocations` (any body to the
//! pre-plugin, the post-plugin's body back as it is), the OIP route for endpoints
//! (`POST /v2/models/{endpoint}/infer`, through [`serve`], so OIP clients call endpoints
//! unchanged), and the repository API for endpoints (list, load, unload, reload). The pipeline
//! itself, here or forwarded whole, is the dispatch layer's ([`crate::dispatch::endpoint`]).

use crate::dispatch::Origin;
use crate::dispatch::endpoint::{EndpointRoute, Invocation};
use crate::http::body::{LimitedBody, header_number, read_body};
use crate::http::error::ApiError;
use crate::http::respond::{TIMEOUT_HEADER, counted, json_response};
use crate::http::state::AppState;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use meshserve_host::ErrorClass;
use meshserve_host::endpoint::{Endpoint, EndpointStatus, Endpoints};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Serves an endpoint request where `route` says: reads the body within the node's limits,
/// then hands it to the dispatch layer.
pub(crate) async fn serve(
    state: &AppState,
    route: EndpointRoute,
    headers: &HeaderMap,
    body: Body,
    started: Instant,
) -> Result<Response, ApiError> {
    let timeout = header_number(headers, &TIMEOUT_HEADER)?.map(Duration::from_micros);
    state
        .dispatch
        .refuse_if_overloaded(&route, timeout, started)?;
    // The body's share of the node's byte budget is held until the answer is made.
    let read = read_body(headers, body, &state.bodies).await?;
    let invocation = Invocation {
        headers,
        body: read.bytes.clone(),
        timeout,
        started,
    };
    let response = state.dispatch.invoke(route, invocation).await?;
    drop(read);
    Ok(response.map(Body::from))
}

/// The plugin versions an endpoint serves now, for operators: stage, name and SHA-256.
pub(crate) fn plugin_versions(endpoint: &Endpoint) -> Vec<Value> {
    endpoint
        .versions()
        .into_iter()
        .map(|v| json!({ "stage": v.stage, "plugin": v.plugin, "sha256": v.sha256, "version": v.version }))
        .collect()
}

fn status_json(status: &EndpointStatus) -> Value {
    let plugins: Vec<Value> = status
        .plugins
        .iter()
        .map(|v| json!({ "stage": v.stage, "plugin": v.plugin, "sha256": v.sha256, "version": v.version }))
        .collect();
    let mut entry = json!({
        "name": status.name,
        "model": status.model,
        "source": status.source.as_str(),
        "state": if status.ready { "READY" } else { "UNAVAILABLE" },
        "plugins": plugins,
    });
    if let Some(reason) = &status.reason {
        entry["reason"] = json!(reason);
    }
    entry
}

fn registry(state: &AppState) -> Result<Arc<Endpoints>, ApiError> {
    state.dispatch.endpoints().cloned().ok_or_else(|| {
        ApiError::new(
            ErrorClass::NotFound,
            "this node has no endpoints: it serves no plugins".to_string(),
        )
    })
}

/// `POST /v1/endpoints/{endpoint}/invocations`, for names the router had to decode.
pub async fn invocations(
    State(state): State<AppState>,
    Path(name): Path<String>,
    request: axum::extract::Request,
) -> Response {
    // Taken from the request, not cloned by a `HeaderMap` extractor.
    let (parts, body) = request.into_parts();
    invoke_parts(&state, &name, parts.version, &parts.headers, body).await
}

/// Serves an invocation of endpoint `name`. [`crate::http::app::App`] calls it directly for
/// plain names, the router ([`invocations`]) for the rest.
pub(crate) async fn invoke_parts(
    state: &AppState,
    name: &str,
    http_version: http::Version,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let (known, outcome) = match state.dispatch.endpoint_route(name, Origin::Client) {
        Ok(route) => (true, serve(state, route, headers, body, started).await),
        Err(failure) => (false, Err(ApiError::from(failure))),
    };
    counted(state, known.then_some(name), http_version, outcome, started)
}

/// `GET /v1/endpoints`: every endpoint of this node, where it is defined, whether it serves
/// and with which plugin versions.
pub async fn list(State(state): State<AppState>) -> Response {
    let entries: Vec<Value> = state
        .dispatch
        .endpoints()
        .iter()
        .flat_map(|e| e.status())
        .map(|s| status_json(&s))
        .collect();
    json_response(&Value::Array(entries))
}

/// What an admin call on one endpoint does.
#[derive(Clone, Copy)]
enum AdminAction {
    Load,
    Unload,
    Reload,
}

async fn administer(
    state: AppState,
    name: String,
    body: LimitedBody,
    action: AdminAction,
) -> Result<Response, ApiError> {
    body.json_or_default::<serde::de::IgnoredAny>("endpoint request")?;
    let endpoints = registry(&state)?;
    let target = name.clone();
    let registry = endpoints.clone();
    // Loading compiles: off the async workers.
    tokio::task::spawn_blocking(move || match action {
        AdminAction::Load => registry.load_by_name(&target),
        AdminAction::Unload => registry.unload(&target),
        AdminAction::Reload => registry.reload(&target),
    })
    .await
    .map_err(|e| ApiError::new(ErrorClass::Internal, e.to_string()))??;
    let plugins = endpoints
        .get(&name)
        .map(|e| plugin_versions(&e))
        .unwrap_or_default();
    Ok(json_response(
        &json!({ "endpoint": name, "plugins": plugins }),
    ))
}

/// `POST /v1/endpoints/{endpoint}/load`: loads a repository endpoint from its folder now,
/// also one that was unloaded.
pub async fn load(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: LimitedBody,
) -> Result<Response, ApiError> {
    administer(state, name, body, AdminAction::Load).await
}

/// `POST /v1/endpoints/{endpoint}/unload`: unloads a repository endpoint until it is loaded
/// again by name.
pub async fn unload(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: LimitedBody,
) -> Result<Response, ApiError> {
    administer(state, name, body, AdminAction::Unload).await
}

/// `POST /v1/endpoints/{endpoint}/reload`: loads the endpoint's plugin files (or folder)
/// again now.
pub async fn reload(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: LimitedBody,
) -> Result<Response, ApiError> {
    administer(state, name, body, AdminAction::Reload).await
}
