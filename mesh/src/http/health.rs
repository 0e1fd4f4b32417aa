//! The node as a whole: OIP server metadata and health (`/v2`, `/v2/health/live`,
//! `/v2/health/ready`) and Prometheus metrics (`/metrics`).

use crate::http::error::ApiError;
use crate::http::respond::json_response;
use crate::http::state::AppState;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use meshserve_host::ErrorClass;
use serde_json::json;

/// The OIP extensions the node serves, as server metadata lists them on every door.
pub(crate) const SERVER_EXTENSIONS: [&str; 4] = [
    "binary_tensor_data",
    "model_repository",
    "model_configuration",
    "statistics",
];

pub(crate) async fn server_metadata() -> Response {
    json_response(&json!({
        "name": "meshserve",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": SERVER_EXTENSIONS,
    }))
}

pub(crate) async fn server_ready(State(state): State<AppState>) -> Result<StatusCode, ApiError> {
    if state.engine().is_ready() {
        Ok(StatusCode::OK)
    } else {
        Err(ApiError::new(
            ErrorClass::Unavailable,
            "node is starting or shutting down",
        ))
    }
}

pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.engine().metrics().encode(),
    )
        .into_response()
}
