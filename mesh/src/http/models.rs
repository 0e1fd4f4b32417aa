//! Models over OIP: metadata, readiness, Triton's model configuration, and inference
//! (`/v2/models/{model}[/versions/{version}]/...`). A name that is an endpoint's is answered
//! for the endpoint.

use crate::dispatch::timing::hop_timing;
use crate::dispatch::{Origin, spec_json};
use crate::http::body::{header_number, read_body};
use crate::http::endpoints;
use crate::http::error::ApiError;
use crate::http::respond::{TIMEOUT_HEADER, counted, json_response, oip_response};
use crate::http::state::{AppState, add_route_header, run_model};
use crate::oip::{self, HEADER_CONTENT_LENGTH};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use meshserve_host::engine::ModelVersion;
use meshserve_host::model::signature::TensorSpec;
use meshserve_host::{DataType, ErrorClass, InferError};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A model (or endpoint) name and optional version, from the path.
#[derive(Deserialize)]
pub(crate) struct ModelPath {
    pub(crate) model: String,
    pub(crate) version: Option<String>,
}

pub(crate) fn find_version(
    state: &AppState,
    path: &ModelPath,
) -> Result<Arc<ModelVersion>, ApiError> {
    let model = state
        .engine()
        .model(&path.model)
        .ok_or_else(|| InferError::ModelNotFound {
            model: path.model.clone(),
        })?;
    Ok(model.version(path.version.as_deref())?.clone())
}

pub(crate) async fn model_metadata(
    State(state): State<AppState>,
    Path(path): Path<ModelPath>,
) -> Result<Response, ApiError> {
    Ok(json_response(&metadata_of(&state, path).await?))
}

/// A model's or an endpoint's OIP metadata, here or from the mesh.
pub(crate) async fn metadata_of(state: &AppState, path: ModelPath) -> Result<Value, ApiError> {
    if let Some(endpoint) = state.endpoint(&path.model) {
        let model = ModelPath {
            model: endpoint.model.clone(),
            version: path.version.clone().or_else(|| endpoint.version.clone()),
        };
        let version = find_version(state, &model)?;
        // With a pre-plugin the endpoint takes whatever body the plugin understands.
        let inputs: Vec<Value> = match endpoint.pre {
            Some(_) => Vec::new(),
            None => version.signature.inputs.iter().map(spec_json).collect(),
        };
        let outputs: Vec<Value> = match endpoint.post {
            Some(_) => Vec::new(),
            None => version.signature.outputs.iter().map(spec_json).collect(),
        };
        return Ok(json!({
            "name": endpoint.name,
            "versions": [version.version.to_string()],
            "platform": "meshserve_endpoint",
            "model": endpoint.model,
            "inputs": inputs,
            "outputs": outputs,
            "plugins": crate::http::endpoints::plugin_versions(&endpoint),
        }));
    }
    Ok(state
        .dispatch
        .metadata(&path.model, path.version.as_deref(), Origin::Client)
        .await?)
}

pub(crate) async fn model_ready(
    State(state): State<AppState>,
    Path(path): Path<ModelPath>,
) -> Result<StatusCode, ApiError> {
    readiness(&state, &path)?;
    Ok(StatusCode::OK)
}

/// Whether a model or an endpoint can serve here (or, for a model, anywhere in the mesh).
pub(crate) fn readiness(state: &AppState, path: &ModelPath) -> Result<(), ApiError> {
    if let Some(endpoint) = state.endpoint(&path.model) {
        endpoint.readiness().map_err(|reason| {
            ApiError::from(InferError::EndpointUnavailable {
                endpoint: endpoint.name.clone(),
                reason,
            })
        })?;
        let model = ModelPath {
            model: endpoint.model.clone(),
            version: endpoint.version.clone(),
        };
        find_version(state, &model)?;
        return Ok(());
    }
    // In a mesh, a model is ready wherever it is asked when some replica serves it.
    if state.dispatch.route(&path.model).is_some() && path.version.is_none() {
        return Ok(());
    }
    find_version(state, path)?;
    Ok(())
}

/// A tensor's `dims` in a model configuration: Triton leaves the batch dimension out when the
/// model batches.
pub(crate) fn config_dims<'s>(version: &ModelVersion, shape: &'s [i64]) -> &'s [i64] {
    let skip = usize::from(version.max_batch_size > 0);
    &shape[skip.min(shape.len())..]
}

/// Triton's `TYPE_*` spelling, used by its model-configuration extension.
pub(crate) fn triton_type(datatype: DataType) -> String {
    match datatype {
        DataType::Bytes => "TYPE_STRING".to_string(),
        other => format!("TYPE_{}", other.as_str()),
    }
}

pub(crate) async fn model_config(
    State(state): State<AppState>,
    Path(path): Path<ModelPath>,
) -> Result<Response, ApiError> {
    let version = find_version(&state, &path)?;
    let io = |specs: &[TensorSpec]| {
        specs
            .iter()
            .map(|s| json!({ "name": s.name, "data_type": triton_type(s.datatype), "dims": config_dims(&version, &s.shape) }))
            .collect::<Vec<_>>()
    };
    let config = &version.config;
    Ok(json_response(&json!({
        "name": version.name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "max_batch_size": version.max_batch_size,
        "input": io(&version.signature.inputs),
        "output": io(&version.signature.outputs),
        "dynamic_batching": { "max_queue_delay_microseconds": config.max_queue_delay_us },
        "instance_group": [{ "count": config.instances, "kind": "KIND_CPU" }],
        "parameters": {
            "intra_op_threads": { "string_value": config.resolved_intra_op_threads().to_string() },
            "sessions_chosen_because": { "string_value": version.tuning },
            "queue_capacity": { "string_value": config.queue_capacity.to_string() },
            "default_timeout_us": { "string_value": config.default_timeout_us.to_string() },
        },
    })))
}

pub(crate) async fn infer(
    State(state): State<AppState>,
    Path(path): Path<ModelPath>,
    request: axum::extract::Request,
) -> Response {
    // Taken from the request, not cloned by a `HeaderMap` extractor.
    let (parts, body) = request.into_parts();
    infer_parts(
        &state,
        &path.model,
        path.version.as_deref(),
        parts.version,
        &parts.headers,
        body,
    )
    .await
}

/// Serves an OIP inference request for `model` (at `version`): an endpoint of that name, else
/// the model here or over the mesh. [`crate::http::app::App`] calls it directly for the
/// paths it recognises, the router for the rest (percent-encoded names).
pub(crate) async fn infer_parts(
    state: &AppState,
    model: &str,
    version: Option<&str>,
    http_version: http::Version,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let endpoint = state.endpoint_for_model_name(model);
    let known = endpoint.is_some() || state.dispatch.serves(model);
    let outcome = match endpoint {
        Some(route) => endpoints::serve(state, route, headers, body, started).await,
        None => run_infer(state, model, version, headers, body, started).await,
    };
    counted(
        state,
        known.then_some(model),
        http_version,
        outcome,
        started,
    )
}

async fn run_infer(
    state: &AppState,
    model: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Body,
    started: Instant,
) -> Result<Response, ApiError> {
    // An overloaded model here, or one that would answer after the deadline a header gives,
    // refuses before the body is read and decoded: the refusal costs microseconds, and the
    // CPU goes to the requests it admits.
    let timeout = header_number(headers, &TIMEOUT_HEADER)?.map(Duration::from_micros);
    state
        .engine()
        .refuse_if_overloaded(model, version, timeout, started)?;
    let read = read_body(headers, body, &state.bodies).await?;
    let body = &read.bytes;
    let json_length = header_number(headers, &HEADER_CONTENT_LENGTH)?
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    let mut decoded = oip::decode_request(model, version, body, json_length)
        .map_err(|e| ApiError::new(ErrorClass::InvalidInput, e.0))?;
    if timeout.is_some() {
        decoded.request.timeout = timeout;
    }
    let model = decoded.request.model.clone();
    let ran = run_model(state, decoded.request, headers).await?;
    let mut http = oip_response(
        &ran.response,
        &decoded.binary_outputs,
        &hop_timing(&ran),
        started,
    );
    add_route_header(state, &model, &mut http);
    Ok(http)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::{Call, Dispatch};
    use crate::http::app::App;

    /// The size of the future `call` returns, without calling it.
    fn future_size<A, F>(_call: impl FnOnce(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// HTTP/2 moves each request's future into a task, and tokio copies a task's future
    /// several times as it spawns and ends it: the futures a request lives in are kept to about
    /// a kilobyte by boxing what only some requests reach (an endpoint's pipeline, a
    /// forward over the mesh). Unboxed, they were 4.9 and 2.3 KB, and a gRPC call copied
    /// about 117 KB of them.
    #[test]
    fn a_model_request_future_stays_near_a_kilobyte() {
        let (infer_parts, dispatch, app) = request_future_sizes();
        assert!(
            infer_parts <= 1536,
            "infer_parts' future is {infer_parts} bytes"
        );
        assert!(
            dispatch <= 1536,
            "Dispatch::infer's future is {dispatch} bytes"
        );
        assert!(app <= 3072, "App::serve's future is {app} bytes");
    }

    fn request_future_sizes() -> (usize, usize, usize) {
        let infer_parts = future_size(
            |x: (&'static AppState, &'static str, &'static HeaderMap, Body)| {
                infer_parts(x.0, x.1, None, http::Version::HTTP_2, x.2, x.3)
            },
        );
        let dispatch = future_size(|x: (&'static Dispatch, Call)| x.0.infer(x.1));
        let app = future_size(|x: (&'static App, http::Request<Body>)| {
            x.0.serve(x.1, std::net::SocketAddr::from(([127, 0, 0, 1], 1)))
        });
        (infer_parts, dispatch, app)
    }
}
