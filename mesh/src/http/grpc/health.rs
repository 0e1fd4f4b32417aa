//! gRPC health checking (`grpc.health.v1.Health`), as Kubernetes gRPC probes call it: service
//! "" is the node's readiness (as `/v2/health/ready`), any other name a model's or an
//! endpoint's (as `/v2/models/{name}/ready`).

use super::proto::health::health_check_response::ServingStatus;
use super::proto::health::health_server::{Health, HealthServer};
use super::proto::health::{HealthCheckRequest, HealthCheckResponse};
use crate::http::models::{ModelPath, readiness};
use crate::http::state::AppState;
use futures_util::stream;
use meshserve_host::ErrorClass;
use std::time::Duration;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

/// How often a watch looks at the status it reports changes of.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// The health service over the node's state.
#[derive(Clone)]
pub struct HealthDoor {
    state: AppState,
}

/// The service for the node's HTTP server.
pub fn service(state: AppState) -> HealthServer<HealthDoor> {
    HealthServer::new(HealthDoor { state })
}

impl HealthDoor {
    fn status(&self, service: &str) -> ServingStatus {
        if service.is_empty() {
            return match self.state.engine().is_ready() {
                true => ServingStatus::Serving,
                false => ServingStatus::NotServing,
            };
        }
        let path = ModelPath {
            model: service.to_string(),
            version: None,
        };
        match readiness(&self.state, &path) {
            Ok(()) => ServingStatus::Serving,
            Err(e) if e.class == ErrorClass::NotFound => ServingStatus::ServiceUnknown,
            Err(_) => ServingStatus::NotServing,
        }
    }
}

fn answer(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status as i32,
    }
}

#[tonic::async_trait]
impl Health for HealthDoor {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = request.into_inner().service;
        match self.status(&service) {
            ServingStatus::ServiceUnknown => Err(Status::not_found(format!(
                "no model or endpoint '{service}' here"
            ))),
            status => Ok(Response::new(answer(status))),
        }
    }

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<BoxStream<HealthCheckResponse>>, Status> {
        let service = request.into_inner().service;
        let door = self.clone();
        // The status now, then each change of it.
        let changes = stream::unfold(None, move |last| {
            let (door, service) = (door.clone(), service.clone());
            async move {
                loop {
                    let now = door.status(&service);
                    if Some(now) != last {
                        return Some((Ok(answer(now)), Some(now)));
                    }
                    tokio::time::sleep(WATCH_INTERVAL).await;
                }
            }
        });
        Ok(Response::new(Box::pin(changes)))
    }
}
