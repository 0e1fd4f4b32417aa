//! The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`, wire-compatible
//! with Triton's and KServe's), as one more door over the same dispatch as REST: served on
//! the HTTP port, through the same server, limits and drain, picked out by its content type.
//!
//! The service is generated at build time from `mesh/proto/inference.proto`;
//! [`tensors`] converts messages (pure), [`status`] maps failures, [`service`] answers.

pub mod service;
pub mod status;
pub mod tensors;

/// The messages and the service trait, generated from `mesh/proto/inference.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("inference");
}

use http::HeaderMap;

/// Whether a request is a gRPC call (over HTTP/2; gRPC has no HTTP/1.1 form).
pub fn is_grpc(version: http::Version, headers: &HeaderMap) -> bool {
    version == http::Version::HTTP_2
        && headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"))
}

/// tonic answers a message past the decoding limit with OUT_OF_RANGE; gRPC's own meaning for
/// "too large" is RESOURCE_EXHAUSTED, which clients (and the REST door's 413) expect. The
/// service answers OUT_OF_RANGE for nothing else, so that status is this one.
pub fn with_size_limit_status<B: Default>(
    response: http::Response<B>,
    max_message_bytes: usize,
) -> http::Response<B> {
    let out_of_range = response
        .headers()
        .get("grpc-status")
        .is_some_and(|code| code.as_bytes() == b"11");
    if !out_of_range {
        return response;
    }
    tonic::Status::resource_exhausted(format!(
        "the request message is larger than the node accepts ({max_message_bytes} bytes, http.max_body_bytes)"
    ))
    .into_http()
}
