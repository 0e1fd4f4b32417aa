//! Endpoints over HTTP: `[pre-plugin] → model → [post-plugin]`, served both on the OIP route
//! (`POST /v2/models/{endpoint}/infer`, so OIP clients call endpoints unchanged) and on
//! `POST /v1/endpoints/{endpoint}/invocations`, which hands any body to the pre-plugin and
//! returns the post-plugin's body as it is.

use crate::http::error::ApiError;
use crate::http::oip::{self, OutputEncoding};
use crate::http::routes::{
    AppState, LimitedBody, Ms, SERVER_TIMING, TIMEOUT_HEADER, counted, header_number, hop_timing,
    json_response, oip_response, read_body, run_model,
};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use meshserve_host::endpoint::{
    Endpoint, EndpointPlugins, EndpointStatus, Endpoints, postprocess, preprocess,
};
use meshserve_host::plugin::instance::{PluginReply, PostAnswer, PreAnswer};
use meshserve_host::{ErrorClass, InferError, InferRequest};
use serde_json::{Value, json};
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

/// Names the plugin versions that made an answer: `pre=NAME@SHA12 post=NAME@SHA12`.
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
            let server_timing =
                crate::http::routes::server_timing(&response, &timing, started.elapsed());
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

fn find(state: &AppState, name: &str) -> Result<Arc<Endpoint>, ApiError> {
    registry(state)?.get(name).ok_or_else(|| {
        ApiError::from(InferError::EndpointNotFound {
            endpoint: name.to_string(),
        })
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
    let (known, outcome) = match find(&state, &name) {
        Ok(endpoint) => (
            true,
            invoke(&state, &endpoint, &headers, body, started).await,
        ),
        Err(e) => (false, Err(e)),
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
