//! The Open Inference Protocol v2 REST API (plus Triton's repository and model-configuration
//! extensions and `/metrics`) as one axum router, shared by every HTTP version.

use crate::dispatch::timing::hop_timing;
use crate::dispatch::{Origin, spec_json};
use crate::http::admin;
use crate::http::body::{LimitedBody, header_number, read_body, refuse_body};
use crate::http::endpoints;
use crate::http::error::ApiError;
use crate::http::respond::{TIMEOUT_HEADER, counted, json_response, oip_response};
use crate::http::state::{AppState, add_route_header, run_model};
use crate::oip::{self, HEADER_CONTENT_LENGTH};
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use meshserve_host::engine::{IndexEntry, ModelLoadError, ModelVersion};
use meshserve_host::model::signature::TensorSpec;
use meshserve_host::{DataType, ErrorClass, InferError};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Builds the router. Every route reads its body through [`read_body`] (size, time and the
/// node's byte budget), in its handler or, for routes that take none, in [`refuse_body`].
pub fn router(state: AppState) -> Router {
    let admin = Router::new()
        .route("/v2/repository/models/{model}/load", post(load_model))
        .route("/v2/repository/models/{model}/unload", post(unload_model))
        .route("/v1/endpoints/{endpoint}/load", post(endpoints::load))
        .route("/v1/endpoints/{endpoint}/unload", post(endpoints::unload))
        .route("/v1/endpoints/{endpoint}/reload", post(endpoints::reload))
        .route_layer(axum::middleware::from_fn_with_state(
            state.admin.clone(),
            admin::require_admin,
        ));
    let reads = Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(server_ready))
        .route("/v2/models/{model}", get(model_metadata))
        .route("/v2/models/{model}/versions/{version}", get(model_metadata))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(model_ready),
        )
        .route("/v2/models/{model}/config", get(model_config))
        .route(
            "/v2/models/{model}/versions/{version}/config",
            get(model_config),
        )
        .route("/v1/endpoints", get(endpoints::list))
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            state.bodies.clone(),
            refuse_body,
        ));
    Router::new()
        .merge(admin)
        .merge(reads)
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/versions/{version}/infer", post(infer))
        .route("/v2/repository/index", post(repository_index))
        .route(
            "/v1/endpoints/{endpoint}/invocations",
            post(endpoints::invocations),
        )
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

#[derive(Deserialize)]
struct ModelPath {
    model: String,
    version: Option<String>,
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        ErrorClass::NotFound,
        format!("no route for {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let message = format!("{method} is not allowed on {}", uri.path());
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(header::CONTENT_TYPE, "application/json")],
        json!({ "error": message }).to_string(),
    )
        .into_response()
}

async fn server_metadata() -> Response {
    json_response(&json!({
        "name": "meshserve",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data", "model_repository", "model_configuration"],
    }))
}

async fn server_ready(State(state): State<AppState>) -> Result<StatusCode, ApiError> {
    if state.engine().is_ready() {
        Ok(StatusCode::OK)
    } else {
        Err(ApiError::new(
            ErrorClass::Unavailable,
            "node is starting or shutting down",
        ))
    }
}

fn find_version(state: &AppState, path: &ModelPath) -> Result<Arc<ModelVersion>, ApiError> {
    let model = state
        .engine()
        .model(&path.model)
        .ok_or_else(|| InferError::ModelNotFound {
            model: path.model.clone(),
        })?;
    Ok(model.version(path.version.as_deref())?.clone())
}

async fn model_metadata(
    State(state): State<AppState>,
    Path(path): Path<ModelPath>,
) -> Result<Response, ApiError> {
    if let Some(endpoint) = state.endpoint(&path.model) {
        let model = ModelPath {
            model: endpoint.model.clone(),
            version: path.version.clone().or_else(|| endpoint.version.clone()),
        };
        let version = find_version(&state, &model)?;
        // With a pre-plugin the endpoint takes whatever body the plugin understands.
        let inputs: Vec<Value> = match endpoint.pre {
            Some(_) => Vec::new(),
            None => version.signature.inputs.iter().map(spec_json).collect(),
        };
        let outputs: Vec<Value> = match endpoint.post {
            Some(_) => Vec::new(),
            None => version.signature.outputs.iter().map(spec_json).collect(),
        };
        return Ok(json_response(&json!({
            "name": endpoint.name,
            "versions": [version.version.to_string()],
            "platform": "meshserve_endpoint",
            "model": endpoint.model,
            "inputs": inputs,
            "outputs": outputs,
            "plugins": crate::http::endpoints::plugin_versions(&endpoint),
        })));
    }
    let metadata = state
        .dispatch
        .metadata(&path.model, path.version.as_deref(), Origin::Client)
        .await?;
    Ok(json_response(&metadata))
}

async fn model_ready(
    State(state): State<AppState>,
    Path(path): Path<ModelPath>,
) -> Result<StatusCode, ApiError> {
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
        find_version(&state, &model)?;
        return Ok(StatusCode::OK);
    }
    // In a mesh, a model is ready wherever it is asked when some replica serves it.
    if state.dispatch.route(&path.model).is_some() && path.version.is_none() {
        return Ok(StatusCode::OK);
    }
    find_version(&state, &path)?;
    Ok(StatusCode::OK)
}

/// Triton's `TYPE_*` spelling, used by its model-configuration extension.
fn triton_type(datatype: DataType) -> String {
    match datatype {
        DataType::Bytes => "TYPE_STRING".to_string(),
        other => format!("TYPE_{}", other.as_str()),
    }
}

async fn model_config(
    State(state): State<AppState>,
    Path(path): Path<ModelPath>,
) -> Result<Response, ApiError> {
    let version = find_version(&state, &path)?;
    // Triton leaves the batch dimension out of `dims` when the model batches.
    let skip = usize::from(version.max_batch_size > 0);
    let io = |specs: &[TensorSpec]| {
        specs
            .iter()
            .map(|s| json!({ "name": s.name, "data_type": triton_type(s.datatype), "dims": &s.shape[skip.min(s.shape.len())..] }))
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
            "queue_capacity": { "string_value": config.queue_capacity.to_string() },
            "default_timeout_us": { "string_value": config.default_timeout_us.to_string() },
        },
    })))
}

async fn infer(
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
    headers: &HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    // An endpoint shadows a model of its name; the mesh's endpoints are looked up only for a
    // name that is not a model here, so a model's requests pay one map lookup for endpoints.
    let endpoint = if state.endpoint(model).is_some() || state.engine().model(model).is_none() {
        state.dispatch.endpoint_route(model, Origin::Client).ok()
    } else {
        None
    };
    let known = endpoint.is_some() || state.dispatch.serves(model);
    let outcome = match endpoint {
        Some(route) => endpoints::serve(state, route, headers, body, started).await,
        None => run_infer(state, model, version, headers, body, started).await,
    };
    counted(state, known.then_some(model), outcome, started)
}

async fn run_infer(
    state: &AppState,
    model: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Body,
    started: Instant,
) -> Result<Response, ApiError> {
    let read = read_body(headers, body, &state.bodies).await?;
    let body = &read.bytes;
    let json_length = header_number(headers, &HEADER_CONTENT_LENGTH)?
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    let mut decoded = oip::decode_request(model, version, body, json_length)
        .map_err(|e| ApiError::new(ErrorClass::InvalidInput, e.0))?;
    if let Some(us) = header_number(headers, &TIMEOUT_HEADER)? {
        decoded.request.timeout = Some(Duration::from_micros(us));
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

#[derive(Deserialize, Default)]
struct IndexRequest {
    #[serde(default)]
    ready: bool,
}

/// The body of Triton's load and unload requests (`tritonclient` sends `{}`, or parameters).
#[derive(Deserialize, Default)]
struct RepositoryRequest {
    #[serde(default)]
    parameters: serde_json::Map<String, Value>,
}

impl RepositoryRequest {
    /// Refuses what the node cannot honour rather than ignoring it: a model's configuration
    /// and files come from its folder in the repository.
    fn check(&self, model: &str) -> Result<(), ApiError> {
        match self
            .parameters
            .keys()
            .find(|k| *k == "config" || k.starts_with("file:"))
        {
            Some(key) => Err(ApiError::new(
                ErrorClass::InvalidInput,
                format!(
                    "load parameter '{key}' is not supported: change the files in the repository folder of '{model}' instead"
                ),
            )),
            None => Ok(()),
        }
    }
}

async fn repository_index(
    State(state): State<AppState>,
    body: LimitedBody,
) -> Result<Response, ApiError> {
    let filter: IndexRequest = body.json_or_default("index request")?;
    let engine = state.engine().clone();
    let index = tokio::task::spawn_blocking(move || engine.index())
        .await
        .map_err(|e| ApiError::new(ErrorClass::Internal, e.to_string()))?;
    let entries: Vec<Value> = index
        .iter()
        .filter(|e| e.ready || !filter.ready)
        .flat_map(index_rows)
        .collect();
    Ok(json_response(&Value::Array(entries)))
}

fn index_rows(entry: &IndexEntry) -> Vec<Value> {
    if entry.versions.is_empty() {
        return vec![json!({ "name": entry.name, "state": "UNAVAILABLE", "reason": entry.reason })];
    }
    entry
        .versions
        .iter()
        .map(|v| json!({ "name": entry.name, "version": v.to_string(), "state": "READY", "reason": "" }))
        .collect()
}

async fn load_model(
    State(state): State<AppState>,
    Path(model): Path<String>,
    body: LimitedBody,
) -> Result<Response, ApiError> {
    body.json_or_default::<RepositoryRequest>("load request")?
        .check(&model)?;
    let engine = state.engine().clone();
    let name = model.clone();
    tokio::task::spawn_blocking(move || engine.load(&name))
        .await
        .map_err(|e| ApiError::new(ErrorClass::Internal, e.to_string()))?
        .map_err(|e| {
            let class = match e {
                ModelLoadError::NotInRepository { .. } => ErrorClass::NotFound,
                _ => ErrorClass::InvalidInput,
            };
            ApiError::new(class, format!("failed to load '{model}': {e}"))
        })?;
    Ok(json_response(&json!({})))
}

async fn unload_model(
    State(state): State<AppState>,
    Path(model): Path<String>,
    body: LimitedBody,
) -> Result<Response, ApiError> {
    body.json_or_default::<RepositoryRequest>("unload request")?;
    // Off the async workers: an unload waits for a load of another model to finish.
    let engine = state.engine().clone();
    tokio::task::spawn_blocking(move || engine.unload(&model))
        .await
        .map_err(|e| ApiError::new(ErrorClass::Internal, e.to_string()))??;
    Ok(json_response(&json!({})))
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.engine().metrics().encode(),
    )
        .into_response()
}
