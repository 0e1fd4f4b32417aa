//! The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`, wire-compatible
//! with Triton's and KServe's), as one more door over the same dispatch as REST: served on
//! the HTTP port, through the same server, limits and drain, picked out by its content type.
//!
//! The services are generated at build time from `mesh/proto`; [`tensors`] converts messages
//! (pure), [`endpoint`] turns an endpoint's call into REST's body and its answer back (pure),
//! [`peek`] reads the model a call names before its message is decoded (pure),
//! [`status`] maps failures, [`service`] answers, [`stream`] runs a streaming call, [`health`]
//! is gRPC health checking, and [`Services`] routes each call to its service.

pub mod endpoint;
pub mod health;
pub mod peek;
pub mod service;
pub mod status;
pub mod stream;
pub mod tensors;

/// The messages and service traits, generated from `mesh/proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("inference");

    /// gRPC health checking.
    pub mod health {
        tonic::include_proto!("grpc.health.v1");
    }

    /// Every service's descriptors, for server reflection.
    pub const DESCRIPTORS: &[u8] = tonic::include_file_descriptor_set!("descriptors");
}

use crate::http::body::{BodyLimits, read_body};
use crate::http::state::AppState;
use axum::body::Body;
use http::HeaderMap;
use prost::Message;
use std::time::Instant;
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;

/// A reflection service (v1, or v1alpha for older clients), whose type the crate does not name.
type Reflection = BoxCloneSyncService<
    http::Request<Body>,
    http::Response<tonic::body::Body>,
    std::convert::Infallible,
>;

/// The node's gRPC services on its HTTP port: OIP inference, health checking and reflection
/// (so `grpcurl` lists and calls them without the .proto files).
#[derive(Clone)]
pub struct Services {
    inference: proto::grpc_inference_service_server::GrpcInferenceServiceServer<service::GrpcDoor>,
    /// The door behind `inference`, asked before a unary call's message is decoded.
    door: service::GrpcDoor,
    health: proto::health::health_server::HealthServer<health::HealthDoor>,
    reflection: Reflection,
    reflection_alpha: Reflection,
    /// The node's body limits, which unary messages are read within.
    bodies: BodyLimits,
}

/// The streaming inference call's path.
const STREAM_INFER_PATH: &str = "/inference.GRPCInferenceService/ModelStreamInfer";

/// The unary inference call's path.
const INFER_PATH: &str = "/inference.GRPCInferenceService/ModelInfer";

impl Services {
    /// The services over `state`, reading messages up to the node's body limit.
    pub fn new(state: AppState) -> Services {
        let bodies = state.bodies.clone();
        let door = service::GrpcDoor::new(state.clone());
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(proto::DESCRIPTORS)
        };
        Services {
            inference: service::service(door.clone(), bodies.max_bytes),
            door,
            health: health::service(state),
            // The descriptors are compiled in: building from them cannot fail at run time
            // unless the build itself was broken, which the tests would have caught.
            reflection: BoxCloneSyncService::new(
                reflection()
                    .build_v1()
                    .expect("the compiled-in descriptors are valid"),
            ),
            reflection_alpha: BoxCloneSyncService::new(
                reflection()
                    .build_v1alpha()
                    .expect("the compiled-in descriptors are valid"),
            ),
            bodies,
        }
    }

    /// What each stream may hold of the node: its in-flight byte budget, and how long an
    /// answer may wait to be read (the body read timeout).
    fn stream_limits(&self) -> stream::StreamLimits {
        stream::StreamLimits {
            budget: self.bodies.in_flight.clone(),
            stall: self.bodies.read_timeout,
        }
    }

    /// Answers one gRPC call, by its service's path.
    pub async fn call(&self, request: http::Request<Body>) -> http::Response<Body> {
        let path = request.uri().path();
        if path == INFER_PATH {
            // Boxed: every request's future, gRPC or not, would otherwise be as large as this
            // one, and tokio copies a request's future as it spawns and ends its task.
            return Box::pin(self.infer(request)).await;
        }
        let response = if path.starts_with("/grpc.health.v1.Health/") {
            let Ok(response) = self.health.clone().oneshot(request).await;
            response
        } else if path.starts_with("/grpc.reflection.v1.ServerReflection/") {
            let Ok(response) = self.reflection.clone().oneshot(request).await;
            response
        } else if path.starts_with("/grpc.reflection.v1alpha.ServerReflection/") {
            let Ok(response) = self.reflection_alpha.clone().oneshot(request).await;
            response
        } else if path == STREAM_INFER_PATH {
            // A stream's messages are limited one by one (the message size) and in number (the
            // requests it runs at once); its body lives as long as the stream.
            let mut grpc = tonic::server::Grpc::new(stream::UndecodedRequests)
                .apply_max_message_size_config(Some(self.bodies.max_bytes), Some(usize::MAX));
            let (door, limits) = (self.door.clone(), self.stream_limits());
            let answers = tower::service_fn(move |call: tonic::Request<_>| {
                let (metadata, _, incoming) = call.into_parts();
                let answers = stream::answers(
                    door.clone(),
                    metadata.into_headers(),
                    incoming,
                    limits.clone(),
                );
                std::future::ready(Ok::<_, tonic::Status>(tonic::Response::new(answers)))
            });
            let response = grpc.streaming(answers, request).await;
            with_size_limit_status(response, self.bodies.max_bytes)
        } else {
            // A unary call's body is read as REST reads one: within the size limit, the read
            // deadline and the node's in-flight byte budget, held until it is answered.
            let (parts, body) = request.into_parts();
            let read = match read_body(&parts.headers, body, &self.bodies).await {
                Ok(read) => read,
                Err(refused) => return status::status_of(refused).into_http(),
            };
            let request = http::Request::from_parts(parts, Body::from(read.bytes.clone()));
            // The body is within the limit, so its message is within tonic's (the same).
            let Ok(response) = self.inference.clone().oneshot(request).await;
            drop(read);
            response
        };
        response.map(Body::new)
    }

    /// A unary ModelInfer call, the door's hot path, answered without tonic's generic unary
    /// machinery (a boxed future per layer, and a streaming decoder and encoder for its one
    /// message): its body is read as REST reads one (within the size limit, the read deadline
    /// and the node's in-flight byte budget, held until it is answered), refused from what
    /// [`peek`] reads before it is decoded when its model is overloaded or its deadline
    /// cannot be met, decoded by prost, and answered in one frame and its trailers.
    async fn infer(&self, request: http::Request<Body>) -> http::Response<Body> {
        let started = Instant::now();
        let (parts, body) = request.into_parts();
        let read = match read_body(&parts.headers, body, &self.bodies).await {
            Ok(read) => read,
            Err(refused) => return status::status_of(refused).into_http(),
        };
        let message = match unary_message(&read.bytes) {
            Ok(message) => message,
            Err(status) => return status.into_http(),
        };
        if let Some(peeked) = peek::peek_message(&message)
            && let Some(refused) = self.door.refuse_undecoded(&peeked, &parts.headers, started)
        {
            return status::status_of(refused).into_http();
        }
        // As tonic's own decoder answers a message that does not decode.
        let message = match proto::ModelInferRequest::decode(message) {
            Ok(message) => message,
            Err(e) => return tonic::Status::internal(e.to_string()).into_http(),
        };
        let answered = self.door.unary_infer(message, &parts.headers).await;
        drop(read);
        match answered {
            Ok((answer, route)) => framed_answer(&answer, route),
            Err(status) => status.into_http(),
        }
    }
}

/// The one message of a unary call's body, its frame (a compression flag and a length) taken
/// off. The node accepts no compression, as tonic's services here are built.
fn unary_message(body: &bytes::Bytes) -> Result<bytes::Bytes, tonic::Status> {
    let Some((&[compressed, a, b, c, d], message)) = body.split_first_chunk::<5>() else {
        return Err(tonic::Status::internal("the call carried no message"));
    };
    if compressed != 0 {
        return Err(tonic::Status::unimplemented(
            "the node accepts no compressed messages; send them uncompressed",
        ));
    }
    let length = u32::from_be_bytes([a, b, c, d]);
    if usize::try_from(length).ok() != Some(message.len()) {
        return Err(tonic::Status::internal(format!(
            "a unary call carries one whole message: its frame says {length} bytes, and {} follow",
            message.len()
        )));
    }
    Ok(body.slice(5..))
}

/// A unary call's answer: `answer` in one frame, with the route to its model as metadata, and
/// the OK status in the trailers.
fn framed_answer(
    answer: &proto::ModelInferResponse,
    route: Option<http::HeaderValue>,
) -> http::Response<Body> {
    use bytes::BufMut;
    use http_body_util::BodyExt;
    let length = answer.encoded_len();
    let mut framed = bytes::BytesMut::with_capacity(5 + length);
    framed.put_u8(0);
    framed.put_u32(u32::try_from(length).unwrap_or(u32::MAX));
    // The buffer holds the whole message: encoding cannot run out of room.
    let _ = answer.encode(&mut framed);
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let body = http_body_util::Full::new(framed.freeze())
        .with_trailers(std::future::ready(Some(Ok(trailers))));
    let mut response = http::Response::new(Body::new(body));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    if let Some(route) = route {
        response
            .headers_mut()
            .insert(crate::routing::ROUTE_HEADER, route);
    }
    response
}

/// Whether a request is a gRPC call (over HTTP/2; gRPC has no HTTP/1.1 form).
pub fn is_grpc(version: http::Version, headers: &HeaderMap) -> bool {
    version == http::Version::HTTP_2
        && headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"))
}

/// tonic answers a stream message past the decoding limit with OUT_OF_RANGE; gRPC's own
/// meaning for "too large" is RESOURCE_EXHAUSTED, which clients (and the REST door's 413)
/// expect. The service answers OUT_OF_RANGE for nothing else, so that status is this one.
/// (A unary call's body is refused by its size before tonic sees it.)
fn with_size_limit_status<B: Default>(
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt;

    fn framed(flag: u8, length: u32, message: &[u8]) -> Bytes {
        let mut body = vec![flag];
        body.extend_from_slice(&length.to_be_bytes());
        body.extend_from_slice(message);
        body.into()
    }

    #[test]
    fn a_unary_body_is_one_whole_uncompressed_message() {
        assert_eq!(
            unary_message(&framed(0, 3, b"abc")).unwrap(),
            Bytes::from_static(b"abc")
        );
        assert_eq!(unary_message(&framed(0, 0, b"")).unwrap(), Bytes::new());
        let code = |body: &Bytes| unary_message(body).unwrap_err().code();
        assert_eq!(code(&framed(1, 3, b"abc")), tonic::Code::Unimplemented);
        assert_eq!(code(&Bytes::new()), tonic::Code::Internal);
        assert_eq!(code(&Bytes::from_static(&[0, 0, 0])), tonic::Code::Internal);
        assert_eq!(code(&framed(0, 4, b"abc")), tonic::Code::Internal);
        assert_eq!(
            code(&framed(0, 2, b"abc")),
            tonic::Code::Internal,
            "a second message (or a stray byte) after the first"
        );
    }

    #[tokio::test]
    async fn an_answer_is_one_frame_then_the_ok_status_in_the_trailers() {
        let answer = proto::ModelInferResponse {
            model_name: "fraud".into(),
            id: "7".into(),
            raw_output_contents: vec![vec![1u8, 2, 3, 4].into()],
            ..Default::default()
        };
        let route = http::HeaderValue::from_static("http=127.0.0.1:8000");
        let response = framed_answer(&answer, Some(route.clone()));
        assert_eq!(response.headers()["content-type"], "application/grpc");
        assert_eq!(response.headers()[crate::routing::ROUTE_HEADER], route);
        let collected = response.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap();
        assert_eq!(trailers["grpc-status"], "0");
        let body = collected.to_bytes();
        assert_eq!(unary_message(&body).unwrap(), answer.encode_to_vec());
        let without_route = framed_answer(&answer, None);
        assert!(
            !without_route
                .headers()
                .contains_key(crate::routing::ROUTE_HEADER)
        );
    }
}
