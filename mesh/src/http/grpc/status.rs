//! The one table from meshserve's error classes to gRPC status codes, beside the HTTP one
//! ([`crate::http::error`]): the same failure gets the same meaning on every door.

use crate::http::error::ApiError;
use meshserve_host::ErrorClass;
use tonic::{Code, Status};

/// The gRPC code of each error class.
pub fn code_of(class: ErrorClass) -> Code {
    match class {
        ErrorClass::NotFound => Code::NotFound,
        ErrorClass::InvalidInput => Code::InvalidArgument,
        ErrorClass::TooLarge => Code::ResourceExhausted,
        ErrorClass::RequestTimeout | ErrorClass::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorClass::Unavailable => Code::Unavailable,
        ErrorClass::Internal => Code::Internal,
        ErrorClass::Unauthorized => Code::Unauthenticated,
        ErrorClass::Forbidden => Code::PermissionDenied,
        ErrorClass::PluginStatus(status) => match status {
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::NotFound,
            408 => Code::DeadlineExceeded,
            413 | 429 => Code::ResourceExhausted,
            _ => Code::InvalidArgument,
        },
    }
}

/// The status for an error. Where HTTP sends `Retry-After`, the status carries gRPC's retry
/// pushback (`grpc-retry-pushback-ms`, which gRPC clients with a retry policy honour).
pub fn status_of(error: ApiError) -> Status {
    let mut status = Status::new(code_of(error.class), error.message);
    if let Some(after) = error.retry_after
        && let Ok(value) = after.as_millis().max(1).to_string().parse()
    {
        status
            .metadata_mut()
            .insert("grpc-retry-pushback-ms", value);
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn every_class_has_the_code_its_http_status_means() {
        assert_eq!(code_of(ErrorClass::NotFound), Code::NotFound);
        assert_eq!(code_of(ErrorClass::InvalidInput), Code::InvalidArgument);
        assert_eq!(code_of(ErrorClass::TooLarge), Code::ResourceExhausted);
        assert_eq!(
            code_of(ErrorClass::DeadlineExceeded),
            Code::DeadlineExceeded
        );
        assert_eq!(code_of(ErrorClass::Unavailable), Code::Unavailable);
        assert_eq!(code_of(ErrorClass::Internal), Code::Internal);
        assert_eq!(code_of(ErrorClass::Unauthorized), Code::Unauthenticated);
        assert_eq!(code_of(ErrorClass::Forbidden), Code::PermissionDenied);
        assert_eq!(
            code_of(ErrorClass::PluginStatus(422)),
            Code::InvalidArgument
        );
        assert_eq!(
            code_of(ErrorClass::PluginStatus(429)),
            Code::ResourceExhausted
        );
    }

    #[test]
    fn an_unavailable_answer_says_when_to_retry() {
        let mut error = ApiError::new(ErrorClass::Unavailable, "queue full");
        error.retry_after = Some(Duration::from_millis(250));
        let status = status_of(error);
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), "queue full");
        assert_eq!(
            status.metadata().get("grpc-retry-pushback-ms").unwrap(),
            "250"
        );
    }
}
