//! The one place where failures become HTTP responses: `{"error": "..."}` with the status of
//! the failure's [`ErrorClass`], plus `Retry-After` where retrying helps.

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
    match class {
        ErrorClass::NotFound => StatusCode::NOT_FOUND,
        ErrorClass::InvalidInput => StatusCode::BAD_REQUEST,
        ErrorClass::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorClass::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
        ErrorClass::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorClass::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        ErrorClass::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorClass::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorClass::Forbidden => StatusCode::FORBIDDEN,
        ErrorClass::PluginStatus(code) => {
            StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST)
        }
    }
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
            let seconds = after.as_secs().max(1);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
