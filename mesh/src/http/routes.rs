//! The Open Inference Protocol v2 REST API (plus Triton's repository and model-configuration
//! extensions and `/metrics`) as one axum router, shared by every HTTP version.

use crate::dispatch::{Call, Dispatch, DispatchError, Origin, Served, spec_json};
use crate::http::admin::{self, AdminAccess};
use crate::http::endpoints;
use crate::http::error::ApiError;
use crate::http::oip::{self, HEADER_CONTENT_LENGTH, OutputEncoding};
use crate::routing::{ROUTE_HEADER, route_header};
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use meshserve_host::endpoint::{Endpoint, Endpoints};
use meshserve_host::engine::{IndexEntry, ModelLoadError, ModelVersion};
use meshserve_host::model::signature::TensorSpec;
use meshserve_host::{DataType, Engine, ErrorClass, InferError, InferResponse};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower::ServiceExt;

/// Header that lets a client set a request deadline without touching the body, in µs.
pub const TIMEOUT_HEADER: HeaderName = HeaderName::from_static("meshserve-timeout-us");

// Header names as constants: a `&str` name is parsed (and a custom one allocated) per use.
pub(crate) const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// Where requests for models go: the engine, or the mesh.
    pub dispatch: Dispatch,
    /// How request bodies are read: size, time and the node-wide byte budget.
    pub bodies: BodyLimits,
    /// The node's endpoints (plugins around models), if any are configured.
    pub endpoints: Option<Arc<Endpoints>>,
    /// Who may load and unload models and reload plugins.
    pub admin: AdminAccess,
}

impl AppState {
    /// The node's engine.
    pub fn engine(&self) -> &Arc<Engine> {
        self.dispatch.engine()
    }

    fn endpoint(&self, name: &str) -> Option<Arc<Endpoint>> {
        self.endpoints.as_ref()?.get(name)
    }
}

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

pub(crate) fn json_response(value: &Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
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

/// How request bodies are read.
#[derive(Clone)]
pub struct BodyLimits {
    /// Largest request body accepted, in bytes; larger is 413.
    pub max_bytes: usize,
    /// Time to receive a body once its headers arrived; slower is 408.
    pub read_timeout: Duration,
    /// Bytes buffered at once over all requests; one permit a byte.
    pub in_flight: Arc<tokio::sync::Semaphore>,
}

impl BodyLimits {
    /// Limits of `max_bytes` per body, `read_timeout`, and `max_in_flight` bytes node-wide.
    pub fn new(max_bytes: usize, read_timeout: Duration, max_in_flight: usize) -> BodyLimits {
        BodyLimits {
            max_bytes,
            read_timeout,
            in_flight: Arc::new(tokio::sync::Semaphore::new(
                max_in_flight.min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
        }
    }
}

/// A request body and its share of the node's body budget, given back when dropped: keep it
/// while the body (or what was decoded from it) is in use.
pub(crate) struct ReadBody {
    pub(crate) bytes: Bytes,
    _budget: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Reads a body within `limits`: larger than `max_bytes` is a 413 before the rest is read,
/// slower than `read_timeout` a 408, and past the node's in-flight byte budget a 503.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limits: &BodyLimits,
) -> Result<ReadBody, ApiError> {
    let limit = limits.max_bytes;
    let too_large = || {
        ApiError::new(
            ErrorClass::TooLarge,
            format!("request body exceeds the limit of {limit} bytes (max_body_bytes)"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut budget: Option<tokio::sync::OwnedSemaphorePermit> = None;
    let mut take = |bytes: usize| -> Result<(), ApiError> {
        let Ok(bytes) = u32::try_from(bytes) else {
            return Err(too_large());
        };
        let permit = limits
            .in_flight
            .clone()
            .try_acquire_many_owned(bytes)
            .map_err(|_| {
                let mut error = ApiError::new(
                    ErrorClass::Unavailable,
                    "the node is buffering too many request bytes (max_body_bytes_in_flight); retry later",
                );
                error.retry_after = Some(Duration::from_secs(1));
                error
            })?;
        match &mut budget {
            Some(held) => held.merge(permit),
            None => budget = Some(permit),
        }
        Ok(())
    };
    let mut body = Limited::new(body, limit);
    // A small body arrives as one frame: keep that frame's bytes as they are, and copy
    // into one buffer only when a second frame comes.
    let mut first: Option<Bytes> = None;
    let mut collected = bytes::BytesMut::new();
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = match frame {
                Ok(frame) => frame,
                Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
                    return Err(too_large());
                }
                Err(e) => {
                    return Err(ApiError::new(
                        ErrorClass::InvalidInput,
                        format!("could not read the request body: {e}"),
                    ));
                }
            };
            if let Ok(data) = frame.into_data() {
                take(data.len())?;
                if collected.is_empty() && first.is_none() {
                    first = Some(data);
                    continue;
                }
                if let Some(first) = first.take() {
                    let expected = declared.map_or(0, |n| usize::try_from(n).unwrap_or(0));
                    collected.reserve(expected.min(limit).max(first.len() + data.len()));
                    collected.extend_from_slice(&first);
                }
                collected.extend_from_slice(&data);
            }
        }
        Ok(())
    };
    match tokio::time::timeout(limits.read_timeout, read).await {
        Ok(Ok(())) => Ok(ReadBody {
            bytes: first.unwrap_or_else(|| collected.freeze()),
            _budget: budget,
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ApiError::new(
            ErrorClass::RequestTimeout,
            format!(
                "the request body did not arrive within {} ms (body_read_timeout_ms)",
                limits.read_timeout.as_millis()
            ),
        )),
    }
}

/// A request body read by [`read_body`] within the node's [`BodyLimits`]: the extractor of
/// every route that takes a body and does not stream it elsewhere.
pub struct LimitedBody(pub(crate) ReadBody);

impl axum::extract::FromRequest<AppState> for LimitedBody {
    type Rejection = ApiError;

    async fn from_request(
        request: axum::extract::Request,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let (parts, body) = request.into_parts();
        read_body(&parts.headers, body, &state.bodies)
            .await
            .map(LimitedBody)
    }
}

impl LimitedBody {
    /// The body as an optional JSON document of type `T`: empty (or only whitespace) is
    /// `T::default()`, malformed JSON a 400 naming `what`.
    pub(crate) fn json_or_default<T: serde::de::DeserializeOwned + Default>(
        &self,
        what: &str,
    ) -> Result<T, ApiError> {
        let bytes = &self.0.bytes;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(T::default());
        }
        serde_json::from_slice(bytes)
            .map_err(|e| ApiError::new(ErrorClass::InvalidInput, format!("malformed {what}: {e}")))
    }
}

/// Middleware of the routes that take no body: a request that brings one is refused (413)
/// rather than left unread, and waiting for the end of an empty body is bounded by the body
/// read timeout like any other body.
async fn refuse_body(
    State(limits): State<BodyLimits>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let none = BodyLimits {
        max_bytes: 0,
        ..limits
    };
    match read_body(&parts.headers, body, &none).await {
        Ok(_) => {
            next.run(axum::extract::Request::from_parts(parts, Body::empty()))
                .await
        }
        Err(mut error) => {
            if error.class == ErrorClass::TooLarge {
                error.message = format!(
                    "{} {} takes no request body",
                    parts.method,
                    parts.uri.path()
                );
            }
            error.into_response()
        }
    }
}

pub(crate) fn header_number(
    headers: &HeaderMap,
    name: &HeaderName,
) -> Result<Option<u64>, ApiError> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorClass::InvalidInput,
                        format!("header {name} must be a non-negative integer"),
                    )
                })
        })
        .transpose()
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
    let endpoint = match state.endpoint(model) {
        Some(endpoint) => Some(endpoints::Route::Here(endpoint)),
        None if state.engine().model(model).is_none() => endpoints::route(state, model),
        None => None,
    };
    let known = endpoint.is_some() || state.dispatch.serves(model);
    let outcome = match endpoint {
        Some(route) => endpoints::serve(state, route, headers, body, started).await,
        None => run_infer(state, model, version, headers, body, started).await,
    };
    counted(state, known.then_some(model), outcome, started)
}

/// Turns an outcome into the response and counts it under `name`, or under `_unknown` when
/// the name is not a loaded model or endpoint: client-chosen names must not grow the metrics.
pub(crate) fn counted(
    state: &AppState,
    name: Option<&str>,
    outcome: Result<Response, ApiError>,
    started: Instant,
) -> Response {
    let response = outcome.unwrap_or_else(IntoResponse::into_response);
    state.engine().metrics().record_request(
        name.unwrap_or("_unknown"),
        response.status().as_u16(),
        started.elapsed(),
    );
    response
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

/// The mesh hop of a forwarded answer as a `Server-Timing` part (empty when served here).
pub(crate) fn hop_timing(served: &Served) -> String {
    match &served.hop {
        Some((hop, node)) => format!("forward;dur={};desc=\"{node}\", ", Ms(*hop)),
        None => String::new(),
    }
}

/// Runs `request` through the node's [`Dispatch`]: here, or on a replica over the mesh (W3C
/// `traceparent` crosses the hop).
pub(crate) async fn run_model(
    state: &AppState,
    request: meshserve_host::InferRequest,
    headers: &HeaderMap,
) -> Result<Served, DispatchError> {
    let traceparent = headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let call = Call {
        request,
        traceparent,
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

/// Encodes an OIP response with its `Server-Timing` header; `extra_timing` holds stages that
/// ran outside the engine (plugins), already formatted.
pub(crate) fn oip_response(
    response: &InferResponse,
    encoding: &OutputEncoding,
    extra_timing: &str,
    started: Instant,
) -> Response {
    let encoded = oip::encode_response(response, encoding);
    let mut http = Response::new(Body::from(encoded.body));
    let headers = http.headers_mut();
    match encoded.json_length {
        Some(n) => {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            headers.insert(HEADER_CONTENT_LENGTH, HeaderValue::from(n));
        }
        None => {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
    }
    if let Ok(timing) =
        HeaderValue::try_from(server_timing(response, extra_timing, started.elapsed()))
    {
        headers.insert(SERVER_TIMING, timing);
    }
    http
}

/// The W3C `Server-Timing` value for a response: plugin stages, queue wait, inference, total.
pub(crate) fn server_timing(response: &InferResponse, extra: &str, total: Duration) -> String {
    let t = &response.timings;
    format!(
        "{extra}queue;dur={}, infer;dur={};desc=\"batch {}\", total;dur={}",
        Ms(t.queue),
        Ms(t.infer),
        t.batch_size,
        Ms(total)
    )
}

/// A duration as `Server-Timing` writes it: milliseconds with three decimals. Integer
/// arithmetic, because `{:.3}` on an `f64` takes the exact (big-number) formatting path, which
/// showed in the hot path's profile.
pub(crate) struct Ms(pub Duration);

impl std::fmt::Display for Ms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Rounded to the nearest microsecond, as `{:.3}` would.
        let us = (self.0.as_nanos() + 500) / 1000;
        write!(f, "{}.{:03}", us / 1000, us % 1000)
    }
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

#[cfg(test)]
mod tests {
    use super::{BodyLimits, Ms, read_body};
    use axum::body::Body;
    use bytes::Bytes;
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use std::time::Duration;

    /// A body that arrives in these frames, one per poll.
    struct Frames(VecDeque<Bytes>);

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(http_body::Frame::data(b))))
        }
    }

    #[tokio::test]
    async fn a_body_in_one_frame_is_kept_as_is_and_frames_are_joined_in_order() {
        let limits = BodyLimits::new(1024, Duration::from_secs(1), 4096);
        let headers = http::HeaderMap::new();
        let single = Bytes::from_static(b"{\"inputs\":[]}");
        let read = read_body(
            &headers,
            Body::new(Frames([single.clone()].into())),
            &limits,
        )
        .await
        .unwrap();
        assert_eq!(read.bytes, single);
        assert_eq!(
            read.bytes.as_ptr(),
            single.as_ptr(),
            "one frame is not copied"
        );
        drop(read);
        let parts = [&b"{\"in"[..], b"puts\"", b":[]}"].map(Bytes::from_static);
        let read = read_body(&headers, Body::new(Frames(parts.into())), &limits)
            .await
            .unwrap();
        assert_eq!(read.bytes.as_ref(), b"{\"inputs\":[]}");
        // The budget counts every frame's bytes while the body is held.
        assert_eq!(limits.in_flight.available_permits(), 4096 - 13);
        drop(read);
        assert_eq!(limits.in_flight.available_permits(), 4096);
    }

    #[test]
    fn server_timing_durations_are_milliseconds_with_three_decimals() {
        assert_eq!(Ms(Duration::from_micros(1_234_567)).to_string(), "1234.567");
        assert_eq!(Ms(Duration::from_micros(42)).to_string(), "0.042");
        assert_eq!(Ms(Duration::from_nanos(499)).to_string(), "0.000");
        assert_eq!(Ms(Duration::from_nanos(1_500)).to_string(), "0.002");
        assert_eq!(
            Ms(Duration::from_nanos(999_999_600)).to_string(),
            "1000.000"
        );
        assert_eq!(Ms(Duration::from_secs(2)).to_string(), "2000.000");
    }
}
