//! The gRPC service's answers, over the node's [`AppState`]: the same lookups, readiness and
//! dispatch as the REST handlers, so a model answers the same on every door.

use super::endpoint;
use super::peek;
use super::proto::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use super::proto::model_metadata_response::TensorMetadata;
use super::proto::repository_index_response::ModelIndex;
use super::proto::{
    DataType as ProtoDataType, InferStatistics, ModelConfig, ModelConfigRequest,
    ModelConfigResponse, ModelDynamicBatching, ModelInferRequest, ModelInferResponse, ModelInput,
    ModelMetadataRequest, ModelMetadataResponse, ModelOutput, ModelReadyRequest,
    ModelReadyResponse, ModelStatistics, ModelStatisticsRequest, ModelStatisticsResponse,
    ModelStreamInferResponse, RepositoryIndexRequest, RepositoryIndexResponse,
    RepositoryModelLoadRequest, RepositoryModelLoadResponse, RepositoryModelUnloadRequest,
    RepositoryModelUnloadResponse, ServerLiveRequest, ServerLiveResponse, ServerMetadataRequest,
    ServerMetadataResponse, ServerReadyRequest, ServerReadyResponse, StatisticDuration,
    Unsupported,
};
use super::status::status_of;
use super::tensors::{decode_request, encode_response, requested_timeout, timeout_from_micros};
use crate::dispatch::endpoint::{EndpointRoute, Invocation};
use crate::http::admin::{ClientAddr, authorize};
use crate::http::error::ApiError;
use crate::http::health::SERVER_EXTENSIONS;
use crate::http::models::{
    ModelPath, config_dims, find_version, metadata_of, readiness, triton_type,
};
use crate::http::repository;
use crate::http::state::{AppState, run_model};
use crate::http::statistics::{self, Row};
use crate::oip::HEADER_CONTENT_LENGTH;
use crate::routing::route_header;
use meshserve_host::ErrorClass;
use meshserve_host::metrics::Protocol;
use meshserve_host::metrics::totals::Tally;
use serde_json::Value;
use std::time::{Duration, Instant};
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

/// The node's gRPC door.
#[derive(Clone)]
pub struct GrpcDoor {
    state: AppState,
}

impl GrpcDoor {
    /// The door over the node's state.
    pub fn new(state: AppState) -> GrpcDoor {
        GrpcDoor { state }
    }
}

/// The service for the node's HTTP server: messages up to `max_message_bytes` (the node's
/// body limit, not tonic's 4 MiB default) are read; larger ones answer RESOURCE_EXHAUSTED.
pub fn service(door: GrpcDoor, max_message_bytes: usize) -> GrpcInferenceServiceServer<GrpcDoor> {
    GrpcInferenceServiceServer::new(door)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(usize::MAX)
}

fn path(name: String, version: String) -> ModelPath {
    ModelPath {
        model: name,
        version: (!version.is_empty()).then_some(version),
    }
}

/// gRPC's `grpc-timeout`: an integer of at most eight digits and a unit (H, M, S, m, u, n).
fn grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The sooner of two deadlines, either of which may be absent.
fn earliest(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The call's deadline from its `grpc-timeout` metadata, when it has a valid one.
fn call_deadline(headers: &http::HeaderMap) -> Option<Duration> {
    headers
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(grpc_timeout)
}

fn unsupported(what: &str) -> Status {
    Status::unimplemented(format!(
        "meshserve does not implement {what}; send tensors in the request (raw_input_contents or contents)"
    ))
}

impl GrpcDoor {
    /// Runs one inference message: `headers` are the call's metadata (deadline, trace).
    async fn infer(
        &self,
        message: ModelInferRequest,
        headers: &http::HeaderMap,
    ) -> Result<ModelInferResponse, ApiError> {
        let started = Instant::now();
        let name = message.model_name.clone();
        let version = Some(message.model_version.as_str()).filter(|v| !v.is_empty());
        // The call's deadline bounds the request's wait as much as its own timeout does.
        let timeout = earliest(
            call_deadline(headers),
            requested_timeout(&message.parameters),
        );
        let endpoint = self.admit(&name, version, timeout, started)?;
        let mut decoded =
            decode_request(message).map_err(|e| ApiError::new(ErrorClass::InvalidInput, e.0))?;
        decoded.request.timeout = timeout;
        if let Some(route) = endpoint {
            let (body, json_length) = endpoint::request_body(&decoded.request);
            let mut headers = headers.clone();
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/octet-stream"),
            );
            headers.insert(HEADER_CONTENT_LENGTH, http::HeaderValue::from(json_length));
            let invocation = Invocation {
                headers: &headers,
                body,
                timeout: decoded.request.timeout,
                started,
            };
            let response = self.state.dispatch.invoke(route, invocation).await?;
            return endpoint::answer(&name, &response, decoded.typed);
        }
        let served = run_model(&self.state, decoded.request, headers).await?;
        Ok(encode_response(served.response, decoded.typed))
    }

    /// Where a call for `name` runs (an endpoint's route, or `None` for a model), unless the
    /// model it needs is overloaded here, or would answer after the call's deadline (`timeout`
    /// from `started`): then it is refused before its tensors are converted (as REST refuses
    /// before it reads the body), and the CPU goes to the calls admitted.
    fn admit(
        &self,
        name: &str,
        version: Option<&str>,
        timeout: Option<Duration>,
        started: Instant,
    ) -> Result<Option<EndpointRoute>, ApiError> {
        let endpoint = self.state.endpoint_for_model_name(name);
        match &endpoint {
            None => self
                .state
                .engine()
                .refuse_if_overloaded(name, version, timeout, started)?,
            Some(route) => self
                .state
                .dispatch
                .refuse_if_overloaded(route, timeout, started)?,
        }
        Ok(endpoint)
    }

    /// Refuses a call (a unary one, or a stream's message) for an overloaded model (or an
    /// endpoint on one), or one that would miss its `grpc-timeout`, from what its message
    /// tells before it is decoded (`peeked`) and the call's metadata; counted as
    /// [`Self::counted_infer`] counts answers (from `started`, when the message came in).
    /// `None`: decode and run it.
    pub(super) fn refuse_undecoded(
        &self,
        peeked: &peek::Peeked<'_>,
        headers: &http::HeaderMap,
        started: Instant,
    ) -> Option<ApiError> {
        let version = Some(peeked.version).filter(|v| !v.is_empty());
        let timeout = earliest(
            call_deadline(headers),
            peeked.timeout_us.and_then(timeout_from_micros),
        );
        let refused = self.admit(peeked.model, version, timeout, started).err()?;
        self.record(peeked.model, refused.class.http_status(), started);
        Some(refused)
    }

    /// Counts an answered call in the node's request metrics, as REST counts its requests.
    fn record(&self, model: &str, status: u16, started: Instant) {
        let known = self.state.dispatch.serves(model);
        self.state.engine().metrics().record_request(
            if known { model } else { "_unknown" },
            Protocol::Grpc,
            status,
            started.elapsed(),
        );
    }

    /// Answers a unary ModelInfer call's decoded message, with the route to a node that serves
    /// its model (sent as response metadata, [`crate::routing::ROUTE_HEADER`]) when there is one.
    pub(super) async fn unary_infer(
        &self,
        message: ModelInferRequest,
        headers: &http::HeaderMap,
    ) -> Result<(ModelInferResponse, Option<http::HeaderValue>), Status> {
        let model = message.model_name.clone();
        let answer = self
            .counted_infer(message, headers)
            .await
            .map_err(status_of)?;
        let route = self
            .state
            .dispatch
            .route(&model)
            .and_then(|route| route_header(&route).parse().ok());
        Ok((answer, route))
    }

    /// [`Self::infer`], counted in the node's request metrics as REST requests are.
    pub(super) async fn counted_infer(
        &self,
        message: ModelInferRequest,
        headers: &http::HeaderMap,
    ) -> Result<ModelInferResponse, ApiError> {
        let started = Instant::now();
        let model = message.model_name.clone();
        let outcome = self.infer(message, headers).await;
        let status = match &outcome {
            Ok(_) => 200,
            Err(error) => error.class.http_status(),
        };
        self.record(&model, status, started);
        outcome
    }

    /// The node's metrics.
    pub(super) fn metrics(&self) -> &meshserve_host::metrics::Metrics {
        self.state.engine().metrics()
    }

    /// Admin authority for a repository call, as REST asks it.
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let from = request.extensions().get::<ClientAddr>().map(|a| a.0);
        let headers = request.metadata().clone().into_headers();
        authorize(&self.state.admin, &headers, from).map_err(status_of)
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for GrpcDoor {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.state.engine().is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let request = request.into_inner();
        let ready = readiness(&self.state, &path(request.name, request.version)).is_ok();
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "meshserve".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: SERVER_EXTENSIONS.iter().map(|e| e.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        let metadata = metadata_of(&self.state, path(request.name, request.version))
            .await
            .map_err(status_of)?;
        Ok(Response::new(metadata_message(&metadata)))
    }

    /// Never reached: [`super::Services`] answers this path itself ([`GrpcDoor::unary_infer`]).
    async fn model_infer(
        &self,
        _: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        Err(Status::internal(
            "ModelInfer is answered by the node's gRPC router",
        ))
    }

    /// Never reached: [`super::Services`] answers this path itself, with its messages undecoded
    /// until admission has read them ([`super::stream::answers`]), which the generated server's
    /// decoded stream cannot offer.
    async fn model_stream_infer(
        &self,
        _: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<BoxStream<ModelStreamInferResponse>>, Status> {
        Err(Status::internal(
            "ModelStreamInfer is answered by the node's gRPC router",
        ))
    }

    async fn repository_index(
        &self,
        request: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        let rows = repository::index(&self.state, request.into_inner().ready)
            .await
            .map_err(status_of)?;
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let models = rows
            .iter()
            .map(|row| ModelIndex {
                name: text(&row["name"]),
                version: text(&row["version"]),
                state: text(&row["state"]),
                reason: text(&row["reason"]),
            })
            .collect();
        Ok(Response::new(RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        repository::check_parameters(
            &request.model_name,
            request.parameters.keys().map(String::as_str),
        )
        .map_err(status_of)?;
        repository::load(&self.state, request.model_name)
            .await
            .map_err(status_of)?;
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        self.authorize(&request)?;
        repository::unload(&self.state, request.into_inner().model_name)
            .await
            .map_err(status_of)?;
        Ok(Response::new(RepositoryModelUnloadResponse {}))
    }

    async fn model_config(
        &self,
        request: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        let request = request.into_inner();
        let version =
            find_version(&self.state, &path(request.name, request.version)).map_err(status_of)?;
        let data_type = |d| {
            ProtoDataType::from_str_name(&triton_type(d)).unwrap_or(ProtoDataType::TypeInvalid)
                as i32
        };
        let config = ModelConfig {
            name: version.name.clone(),
            platform: "onnxruntime_onnx".into(),
            backend: "onnxruntime".into(),
            max_batch_size: i32::try_from(version.max_batch_size).unwrap_or(i32::MAX),
            input: version
                .signature
                .inputs
                .iter()
                .map(|s| ModelInput {
                    name: s.name.clone(),
                    data_type: data_type(s.datatype),
                    dims: config_dims(&version, &s.shape).to_vec(),
                })
                .collect(),
            output: version
                .signature
                .outputs
                .iter()
                .map(|s| ModelOutput {
                    name: s.name.clone(),
                    data_type: data_type(s.datatype),
                    dims: config_dims(&version, &s.shape).to_vec(),
                })
                .collect(),
            dynamic_batching: Some(ModelDynamicBatching {
                preferred_batch_size: Vec::new(),
                max_queue_delay_microseconds: version.config.max_queue_delay_us,
            }),
        };
        Ok(Response::new(ModelConfigResponse {
            config: Some(config),
        }))
    }

    async fn model_statistics(
        &self,
        request: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        let request = request.into_inner();
        let rows = statistics::rows(&self.state, &path(request.name, request.version))
            .map_err(status_of)?;
        Ok(Response::new(ModelStatisticsResponse {
            model_stats: rows.into_iter().map(statistics_message).collect(),
        }))
    }

    async fn system_shared_memory_status(
        &self,
        _: Request<Unsupported>,
    ) -> Result<Response<Unsupported>, Status> {
        Err(unsupported("system shared memory"))
    }

    async fn system_shared_memory_register(
        &self,
        _: Request<Unsupported>,
    ) -> Result<Response<Unsupported>, Status> {
        Err(unsupported("system shared memory"))
    }

    async fn system_shared_memory_unregister(
        &self,
        _: Request<Unsupported>,
    ) -> Result<Response<Unsupported>, Status> {
        Err(unsupported("system shared memory"))
    }

    async fn cuda_shared_memory_status(
        &self,
        _: Request<Unsupported>,
    ) -> Result<Response<Unsupported>, Status> {
        Err(unsupported("CUDA shared memory"))
    }

    async fn cuda_shared_memory_register(
        &self,
        _: Request<Unsupported>,
    ) -> Result<Response<Unsupported>, Status> {
        Err(unsupported("CUDA shared memory"))
    }

    async fn cuda_shared_memory_unregister(
        &self,
        _: Request<Unsupported>,
    ) -> Result<Response<Unsupported>, Status> {
        Err(unsupported("CUDA shared memory"))
    }

    async fn trace_setting(
        &self,
        _: Request<Unsupported>,
    ) -> Result<Response<Unsupported>, Status> {
        Err(Status::unimplemented(
            "meshserve does not implement trace settings: it takes W3C traceparent metadata",
        ))
    }

    async fn log_settings(&self, _: Request<Unsupported>) -> Result<Response<Unsupported>, Status> {
        Err(Status::unimplemented(
            "meshserve does not implement log settings: set RUST_LOG when starting the node",
        ))
    }
}

/// A row of statistics as the extension's message.
fn statistics_message(row: Row) -> ModelStatistics {
    let duration = |tally: Tally| StatisticDuration {
        count: tally.count,
        ns: tally.ns,
    };
    let [input, infer, output] = row.compute();
    let totals = row.totals;
    ModelStatistics {
        name: row.name,
        version: row.version,
        last_inference: totals.last_run_ms,
        inference_count: totals.rows,
        execution_count: totals.executions,
        inference_stats: Some(InferStatistics {
            success: Some(duration(totals.success)),
            fail: Some(duration(totals.fail)),
            queue: Some(duration(totals.queue)),
            compute_input: Some(duration(input)),
            compute_infer: Some(duration(infer)),
            compute_output: Some(duration(output)),
        }),
    }
}

/// OIP metadata (as REST answers it, here or from a replica) as the gRPC message.
fn metadata_message(metadata: &Value) -> ModelMetadataResponse {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let tensors = |key: &str| {
        metadata[key]
            .as_array()
            .map(|tensors| {
                tensors
                    .iter()
                    .map(|t| TensorMetadata {
                        name: text(&t["name"]),
                        datatype: text(&t["datatype"]),
                        shape: t["shape"]
                            .as_array()
                            .map(|dims| dims.iter().filter_map(Value::as_i64).collect())
                            .unwrap_or_default(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    ModelMetadataResponse {
        name: text(&metadata["name"]),
        versions: metadata["versions"]
            .as_array()
            .map(|v| v.iter().map(text).collect())
            .unwrap_or_default(),
        platform: text(&metadata["platform"]),
        inputs: tensors("inputs"),
        outputs: tensors("outputs"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_reads_every_unit_and_refuses_the_rest() {
        assert_eq!(grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout("1500u"), Some(Duration::from_micros(1500)));
        assert_eq!(grpc_timeout("99n"), Some(Duration::from_nanos(99)));
        for bad in ["", "m", "123456789m", "12x", "-1S", "1.5S"] {
            assert_eq!(grpc_timeout(bad), None, "{bad}");
        }
    }
}
