//! Answers as every route writes them: JSON, OIP responses with their `Server-Timing`, and
//! the request count each answer adds to the metrics.

use crate::dispatch::Served;
use crate::http::error::ApiError;
use crate::http::oip::{self, HEADER_CONTENT_LENGTH, OutputEncoding};
use crate::http::state::AppState;
use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use meshserve_host::InferResponse;
use serde_json::Value;
use std::time::{Duration, Instant};

/// Header that lets a client set a request deadline without touching the body, in µs.
pub const TIMEOUT_HEADER: HeaderName = HeaderName::from_static("meshserve-timeout-us");

// Header names as constants: a `&str` name is parsed (and a custom one allocated) per use.
pub(crate) const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

pub(crate) fn json_response(value: &Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
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

/// The mesh hop of a forwarded answer as a `Server-Timing` part (empty when served here).
pub(crate) fn hop_timing(served: &Served) -> String {
    match &served.hop {
        Some((hop, node)) => format!("forward;dur={};desc=\"{node}\", ", Ms(*hop)),
        None => String::new(),
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
