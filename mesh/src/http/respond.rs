//! Answers as every route writes them: JSON, OIP responses with their `Server-Timing`, and
//! the request count each answer adds to the metrics.

use crate::dispatch::timing::{Ms, SERVER_TIMING, server_timing};
use crate::http::error::ApiError;
use crate::http::state::AppState;
use crate::oip::{self, OutputEncoding};
use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use meshserve_host::InferResponse;
use meshserve_host::metrics::Protocol;
use serde_json::Value;
use std::time::Instant;

/// Header that lets a client set a request deadline without touching the body, in µs.
pub const TIMEOUT_HEADER: HeaderName = HeaderName::from_static("meshserve-timeout-us");

pub(crate) fn json_response(value: &Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

/// The protocol label of a REST request that came by HTTP `version`.
pub(crate) fn rest_protocol(version: http::Version) -> Protocol {
    match version {
        http::Version::HTTP_2 => Protocol::Http2,
        http::Version::HTTP_3 => Protocol::Http3,
        _ => Protocol::Http1,
    }
}

/// Turns an outcome into the response and counts it under `name`, or under `_unknown` when
/// the name is not a loaded model or endpoint: client-chosen names must not grow the metrics.
/// A response without `Server-Timing` (an error) gets the node's total time in one, so a
/// refusal says how soon it came.
pub(crate) fn counted(
    state: &AppState,
    name: Option<&str>,
    version: http::Version,
    outcome: Result<Response, ApiError>,
    started: Instant,
) -> Response {
    let mut response = outcome.unwrap_or_else(IntoResponse::into_response);
    if !response.headers().contains_key(SERVER_TIMING)
        && let Ok(timing) = HeaderValue::try_from(format!("total;dur={}", Ms(started.elapsed())))
    {
        response.headers_mut().insert(SERVER_TIMING, timing);
    }
    state.engine().metrics().record_request(
        name.unwrap_or("_unknown"),
        rest_protocol(version),
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

/// Encodes an OIP response with its `Server-Timing` header; `extra_timing` holds stages that
/// ran outside the engine (the mesh hop), already formatted.
pub(crate) fn oip_response(
    response: &InferResponse,
    encoding: &OutputEncoding,
    extra_timing: &str,
    started: Instant,
) -> Response {
    let mut http = oip::encode_response(response, encoding).into_http();
    if let Ok(timing) =
        HeaderValue::try_from(server_timing(response, extra_timing, started.elapsed()))
    {
        http.headers_mut().insert(SERVER_TIMING, timing);
    }
    http.map(Body::from)
}
