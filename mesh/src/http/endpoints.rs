//! Endpoints over HTTP: `[pre-plugin] → model → [post-plugin]`, served both on the OIP route
//! (`POST /v2/models/{endpoint}/infer`, so OIP clients call endpoints unchanged) and on
//! `POST /v1/endpoints/{endpoint}/invocations`, which hands any body to the pre-plugin and
//! returns the post-plugin's body as it is.

use crate::dispatch::{EndpointRunner, Origin};
use crate::http::body::{LimitedBody, header_number, read_body};
use crate::http::error::ApiError;
use crate::http::oip::{self, OutputEncoding};
use crate::http::respond::{
    Ms, SERVER_TIMING, TIMEOUT_HEADER, counted, hop_timing, json_response, oip_response,
    server_timing,
};
use crate::http::state::{AppState, run_model};
use crate::routing::{ROUTE_HEADER, route_header};
use crate::wire::{EndpointAnswer, EndpointCall, EndpointEntry, Failure, FailureClass};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use meshserve_host::endpoint::{
    Endpoint, EndpointPlugins, EndpointStatus, Endpoints, Source, postprocess, preprocess,
};
use meshserve_host::plugin::instance::{PluginReply, PostAnswer, PreAnswer};
use meshserve_host::{ErrorClass, InferError, InferRequest};
use serde_json::{Value, json};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Per-request plugin timings, for the `Server-Timing` header.
#[derive(Default)]
struct PluginTimings {
    pre: Option<Duration>,
    post: Option<Duration>,
    /// The mesh hop, already formatted, when the model ran on another node.
    hop: String,
}

impl PluginTimings {
    fn header_parts(&self) -> String {
        let mut parts = String::new();
        if let Some(pre) = self.pre {
            parts.push_str(&format!("pre;dur={}, ", Ms(pre)));
        }
        parts.push_str(&self.hop);
        if let Some(post) = self.post {
            parts.push_str(&format!("post;dur={}, ", Ms(post)));
        }
        parts
    }
}

fn header_pairs(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .iter()
        .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?)))
}

/// A plugin's own reply as an HTTP response (its headers were checked when it returned them).
fn reply_response(reply: PluginReply, server_timing: &str) -> Response {
    let mut http = Response::new(Body::from(reply.body));
    *http.status_mut() = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::OK);
    let headers = http.headers_mut();
    for (name, value) in &reply.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.append(name, value);
        }
    }
    let content_type = HeaderValue::from_str(&reply.content_type)
        .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_TYPE, content_type);
    if let Ok(value) = HeaderValue::from_str(server_timing) {
        headers.insert(SERVER_TIMING, value);
    }
    http
}

/// Names the plugin versions that made an answer: `pre=NAME@SHA12+CFG8 post=NAME@SHA12+CFG8`
/// (component digest, then the config's when it has one).
pub const PLUGINS_HEADER: HeaderName = HeaderName::from_static("meshserve-plugins");

/// Serves one call of `endpoint`; the answer names the plugin versions that made it.
pub async fn invoke(
    state: &AppState,
    endpoint: &Arc<Endpoint>,
    headers: &HeaderMap,
    body: Body,
    started: Instant,
) -> Result<Response, ApiError> {
    // The pre and post versions this request runs with, taken together.
    let plugins = endpoint.plugins()?;
    if !state.dispatch.serves(&endpoint.model) {
        return Err(InferError::EndpointUnavailable {
            endpoint: endpoint.name.clone(),
            reason: format!(
                "its model '{}' is not loaded on this node or served by the mesh",
                endpoint.model
            ),
        }
        .into());
    }
    let mut response = run_pipeline(state, endpoint, &plugins, headers, body, started).await?;
    if let Ok(tag) = HeaderValue::from_str(&plugins.tag)
        && !plugins.tag.is_empty()
    {
        response.headers_mut().insert(PLUGINS_HEADER, tag);
    }
    Ok(response)
}

async fn run_pipeline(
    state: &AppState,
    endpoint: &Arc<Endpoint>,
    plugins: &EndpointPlugins,
    headers: &HeaderMap,
    body: Body,
    started: Instant,
) -> Result<Response, ApiError> {
    let read = read_body(headers, body, &state.bodies).await?;
    let body = read.bytes.clone();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let mut timings = PluginTimings::default();
    let metrics = state.engine().metrics();

    let (mut request, encoding) = match &plugins.pre {
        Some(pre) => {
            let view = endpoint.request_view(pre, content_type, header_pairs(headers), body);
            let t = Instant::now();
            let answer = preprocess(pre, view).await;
            let elapsed = t.elapsed();
            metrics.record_plugin_stage(&endpoint.name, "pre", elapsed);
            timings.pre = Some(elapsed);
            let inputs = match answer? {
                PreAnswer::Infer(inputs) => inputs,
                PreAnswer::Reply(reply) => {
                    let timing = format!(
                        "{}total;dur={}",
                        timings.header_parts(),
                        Ms(started.elapsed())
                    );
                    return Ok(reply_response(reply, &timing));
                }
            };
            let request = InferRequest {
                model: endpoint.model.clone(),
                version: endpoint.version.clone(),
                inputs,
                ..InferRequest::default()
            };
            (request, OutputEncoding::Json)
        }
        None => decode_oip(endpoint, headers, &body)?,
    };
    if let Some(us) = header_number(headers, &TIMEOUT_HEADER)? {
        request.timeout = Some(Duration::from_micros(us));
    }
    let ran = run_model(state, request, headers).await.map_err(|e| {
        match (e.invalid_input(), &plugins.pre) {
            // Tensors a pre-plugin made that the model refuses are the plugin's fault, not the client's.
            (Some(message), Some(pre)) => ApiError::from(InferError::PluginFailed {
                plugin: pre.name().to_string(),
                cause: format!("returned tensors the model does not accept: {message}"),
            }),
            _ => ApiError::from(e),
        }
    })?;
    timings.hop = hop_timing(&ran);
    let mut response = ran.response;
    response.model_name = endpoint.name.clone();

    let Some(post) = &plugins.post else {
        let timing = timings.header_parts();
        return Ok(oip_response(&response, &encoding, &timing, started));
    };
    let context = endpoint.context_view(post, content_type, header_pairs(headers));
    let t = Instant::now();
    let answer = postprocess(post, context, &response.outputs).await;
    let elapsed = t.elapsed();
    metrics.record_plugin_stage(&endpoint.name, "post", elapsed);
    timings.post = Some(elapsed);
    let timing = timings.header_parts();
    match answer? {
        PostAnswer::Tensors(outputs) => {
            response.outputs = outputs;
            Ok(oip_response(&response, &encoding, &timing, started))
        }
        PostAnswer::Reply(reply) => {
            let server_timing = server_timing(&response, &timing, started.elapsed());
            Ok(reply_response(reply, &server_timing))
        }
    }
}

fn decode_oip(
    endpoint: &Endpoint,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(InferRequest, OutputEncoding), ApiError> {
    let json_length = header_number(headers, &oip::HEADER_CONTENT_LENGTH)?
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    let decoded = oip::decode_request(
        &endpoint.model,
        endpoint.version.as_deref(),
        body,
        json_length,
    )
    .map_err(|e| ApiError::new(ErrorClass::InvalidInput, e.0))?;
    Ok((decoded.request, decoded.binary_outputs))
}

/// Where an endpoint request runs.
pub(crate) enum Route {
    /// On this node's own endpoint.
    Here(Arc<Endpoint>),
    /// Whole, on a replica of the endpoint's model: this node has no such endpoint, or has
    /// the mesh's (a repository folder) without its model.
    Replica(EndpointEntry),
}

/// Where a request for the endpoint `name` runs; `None` when no endpoint of that name is
/// known here or in the mesh.
pub(crate) fn route(state: &AppState, name: &str) -> Option<Route> {
    let local = state.endpoints.as_ref().and_then(|e| e.get(name));
    let mesh = state
        .dispatch
        .cluster()
        .and_then(|c| c.view().endpoint(name).cloned());
    match (local, mesh) {
        (Some(endpoint), Some(entry))
            if endpoint.source == Source::Repository
                && state.engine().model(&endpoint.model).is_none() =>
        {
            Some(Route::Replica(entry))
        }
        (Some(endpoint), _) => Some(Route::Here(endpoint)),
        (None, Some(entry)) => Some(Route::Replica(entry)),
        (None, None) => None,
    }
}

/// Serves an endpoint request where [`route`] says, here or forwarded whole to a replica.
pub(crate) async fn serve(
    state: &AppState,
    route: Route,
    headers: &HeaderMap,
    body: Body,
    started: Instant,
) -> Result<Response, ApiError> {
    match route {
        Route::Here(endpoint) => invoke(state, &endpoint, headers, body, started).await,
        Route::Replica(entry) => forward(state, &entry, headers, body, started).await,
    }
}

/// Request headers a forwarded endpoint request carries: what the pipeline reads, and what
/// the endpoint's plugins may see.
fn passed_on(headers: &HeaderMap, granted: &[String]) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(name, _)| {
            let name = name.as_str();
            name == header::CONTENT_TYPE.as_str()
                || name == oip::HEADER_CONTENT_LENGTH.as_str()
                || name == "traceparent"
                || granted.iter().any(|g| g == name)
        })
        .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_string())))
        .collect()
}

/// Forwards an endpoint request whole to a replica of its model, which runs pre → model →
/// post; its answer comes back unchanged, with the route to the replicas and the hop timed.
async fn forward(
    state: &AppState,
    entry: &EndpointEntry,
    headers: &HeaderMap,
    body: Body,
    started: Instant,
) -> Result<Response, ApiError> {
    let cluster = state.dispatch.cluster().ok_or_else(|| {
        ApiError::from(InferError::EndpointNotFound {
            endpoint: entry.name.clone(),
        })
    })?;
    let read = read_body(headers, body, &state.bodies).await?;
    let deadline = header_number(headers, &TIMEOUT_HEADER)?.map(Duration::from_micros);
    let left = deadline.map(|d| d.saturating_sub(started.elapsed()));
    if let (Some(deadline), Some(Duration::ZERO)) = (deadline, left) {
        return Err(InferError::DeadlineExceeded {
            model: entry.name.clone(),
            waited_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            timeout_us: u64::try_from(deadline.as_micros()).unwrap_or(u64::MAX),
            ran: false,
        }
        .into());
    }
    let call = EndpointCall {
        endpoint: entry.name.clone(),
        headers: passed_on(headers, &entry.headers),
        body: read.bytes.clone(),
        timeout_us: left.map(|l| u64::try_from(l.as_micros()).unwrap_or(u64::MAX)),
    };
    let sent = Instant::now();
    let timeout = left.unwrap_or(cluster.forward_timeout());
    let (answer, route) = cluster
        .forward_endpoint(&entry.model, call, timeout)
        .await?;
    let hop = sent.elapsed();
    let mut response = Response::new(Body::from(answer.body));
    *response.status_mut() =
        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let out = response.headers_mut();
    for (name, value) in &answer.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) && name != header::CONTENT_LENGTH
            && name != header::TRANSFER_ENCODING
            && name != header::CONNECTION
        {
            out.append(name, value);
        }
    }
    // The replica's own stages follow the hop, as for a forwarded model.
    let replica_timing = out
        .get(SERVER_TIMING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let timing = format!(
        "forward;dur={};desc=\"{}\", {replica_timing}",
        Ms(hop),
        answer.node
    );
    if let Ok(value) = HeaderValue::from_str(timing.trim_end_matches([',', ' '])) {
        out.insert(SERVER_TIMING, value);
    }
    if let Ok(value) = HeaderValue::from_str(&route_header(&route)) {
        out.insert(ROUTE_HEADER, value);
    }
    response.extensions_mut().insert(RanOn(answer.node));
    Ok(response)
}

/// On a forwarded endpoint answer: the replica that ran it.
#[derive(Debug, Clone)]
struct RanOn(String);

/// This node's own endpoints, run whole for requests other nodes forward here.
pub struct LocalEndpoints(pub AppState);

impl EndpointRunner for LocalEndpoints {
    fn run(
        &self,
        call: EndpointCall,
        origin: Origin,
    ) -> Pin<Box<dyn Future<Output = Result<EndpointAnswer, Failure>> + Send + 'static>> {
        let state = self.0.clone();
        Box::pin(async move {
            let started = Instant::now();
            let node = state
                .dispatch
                .cluster()
                .map(|c| c.name().to_string())
                .unwrap_or_default();
            // A node's request runs here or nowhere (it was forwarded once already); a
            // client's goes where an HTTP client's would.
            let route = match origin {
                Origin::Node => state
                    .endpoints
                    .as_ref()
                    .and_then(|e| e.get(&call.endpoint))
                    .map(Route::Here),
                Origin::Client => route(&state, &call.endpoint),
            };
            let Some(route) = route else {
                let (class, message) = match origin {
                    Origin::Node => (
                        FailureClass::NotHere,
                        format!("node '{node}' does not serve endpoint '{}'", call.endpoint),
                    ),
                    Origin::Client => (
                        FailureClass::NotFound,
                        format!("unknown endpoint '{}'", call.endpoint),
                    ),
                };
                return Err(Failure::new(class, message));
            };
            if call.timeout_us == Some(0) {
                return Err(Failure::new(
                    FailureClass::DeadlineExceeded,
                    format!(
                        "endpoint '{}' arrived past its deadline; not run",
                        call.endpoint
                    ),
                ));
            }
            let mut headers = HeaderMap::new();
            for (name, value) in &call.headers {
                if let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(value),
                ) {
                    headers.append(name, value);
                }
            }
            if let Some(us) = call.timeout_us {
                headers.insert(TIMEOUT_HEADER, HeaderValue::from(us));
            }
            let outcome = serve(&state, route, &headers, Body::from(call.body), started).await;
            let response = counted(&state, Some(call.endpoint.as_str()), outcome, started);
            let (parts, body) = response.into_parts();
            let node = parts
                .extensions
                .get::<RanOn>()
                .map_or(node, |r| r.0.clone());
            // Our own answer, bounded by the plugins' output limits.
            let body = axum::body::to_bytes(body, usize::MAX)
                .await
                .map_err(|e| Failure::new(FailureClass::Internal, e.to_string()))?;
            let headers = parts
                .headers
                .iter()
                .filter_map(|(n, v)| Some((n.to_string(), v.to_str().ok()?.to_string())))
                .collect();
            Ok(EndpointAnswer {
                node,
                status: parts.status.as_u16(),
                headers,
                body,
            })
        })
    }
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
    state.endpoints.clone().ok_or_else(|| {
        ApiError::new(
            ErrorClass::NotFound,
            "this node has no endpoints: it serves no plugins".to_string(),
        )
    })
}

/// `POST /v1/endpoints/{endpoint}/invocations`.
pub async fn invocations(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let (known, outcome) = match route(&state, &name) {
        Some(route) => (true, serve(&state, route, &headers, body, started).await),
        None => (
            false,
            Err(InferError::EndpointNotFound {
                endpoint: name.clone(),
            }
            .into()),
        ),
    };
    counted(&state, known.then_some(name.as_str()), outcome, started)
}

/// `GET /v1/endpoints`: every endpoint of this node, where it is defined, whether it serves
/// and with which plugin versions.
pub async fn list(State(state): State<AppState>) -> Response {
    let entries: Vec<Value> = state
        .endpoints
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
