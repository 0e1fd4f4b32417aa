//! The one place where failures become HTTP responses: `{"error": "..."}` with the status of
//! the failure's [`ErrorClass`], plus `Retry-After` where retrying helps.

use crate::dispatch::DispatchError;
use crate::wire::Failure;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use meshserve_host::{ErrorClass, InferError};
use std::time::Duration;

/// An error answer of the HTTP front door.
#[derive(Debug)]
pub struct ApiError {
    /// What went wrong, for the client.
    pub class: ErrorClass,
    /// The message sent as `{"error": message}`.
    pub message: String,
    /// Sent as `Retry-After` (whole seconds, at least 1).
    pub retry_after: Option<Duration>,
}

impl ApiError {
    /// An error of `class` with `message`.
    pub fn new(class: ErrorClass, message: impl Into<String>) -> ApiError {
        ApiError {
            class,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The status code for this error.
    pub fn status(&self) -> StatusCode {
        status_of(self.class)
    }
}

/// The HTTP status of each error class.
pub fn status_of(class: ErrorClass) -> StatusCode {
    StatusCode::from_u16(class.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

impl From<InferError> for ApiError {
    fn from(e: InferError) -> ApiError {
        ApiError {
            class: e.class(),
            retry_after: e.retry_after(),
            message: e.to_string(),
        }
    }
}

impl From<DispatchError> for ApiError {
    fn from(e: DispatchError) -> ApiError {
        match e {
            DispatchError::Local(e) => e.into(),
            DispatchError::Remote(f) => f.into(),
        }
    }
}

impl From<Failure> for ApiError {
    fn from(failure: Failure) -> ApiError {
        ApiError {
            class: failure.error_class(),
            retry_after: failure.retry_after_ms.map(Duration::from_millis),
            message: failure.message,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = serde_json::json!({ "error": self.message }).to_string();
        let mut response =
            (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        if let Some(after) = self.retry_after {
            // Whole seconds, rounded up: a client retrying sooner would be refused again.
            let seconds = u64::try_from(after.as_millis().div_ceil(1000)).unwrap_or(u64::MAX);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        response
    }
}
