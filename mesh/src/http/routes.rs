//! The Open Inference Protocol v2 REST API (plus Triton's repository and model-configuration
//! extensions, the endpoints API and `/metrics`) as one axum router, shared by every HTTP
//! version: the route table, with one handler module per resource ([`crate::http::health`],
//! [`crate::http::models`], [`crate::http::repository`], [`crate::http::endpoints`]).

use crate::http::body::refuse_body;
use crate::http::error::ApiError;
use crate::http::health::{metrics, server_metadata, server_ready};
use crate::http::models::{infer, model_config, model_metadata, model_ready};
use crate::http::repository::{load_model, repository_index, unload_model};
use crate::http::state::AppState;
use crate::http::{admin, endpoints, statistics};
use axum::Router;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use meshserve_host::ErrorClass;
use serde_json::json;

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
        .route("/v2/models/stats", get(statistics::all_stats))
        .route("/v2/models/{model}/stats", get(statistics::model_stats))
        .route(
            "/v2/models/{model}/versions/{version}/stats",
            get(statistics::model_stats),
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
