//! A client of the OIP's streaming call (`ModelStreamInfer`) for the load generator: one
//! long-lived HTTP/2 stream per concurrent caller, one message out and its answer back at a
//! time, so a stream's figures compare with unary calls at the same concurrency.

use crate::BenchError;
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::StatusCode;
use hyper::body::Frame;
use std::convert::Infallible;
use tokio::sync::mpsc;

/// The streaming call's path.
pub const GRPC_STREAM_PATH: &str = "/inference.GRPCInferenceService/ModelStreamInfer";

/// A request body the caller writes into while it is being sent.
pub type StreamingBody = BoxBody<Bytes, Infallible>;

/// An HTTP/2 connection whose requests have [`StreamingBody`] bodies.
pub type StreamConnection = hyper::client::conn::http2::SendRequest<StreamingBody>;

/// Marks a request's headers as a gRPC call's.
pub fn mark_grpc(headers: &mut hyper::HeaderMap) {
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/grpc"),
    );
    headers.insert(
        hyper::header::TE,
        hyper::header::HeaderValue::from_static("trailers"),
    );
}

/// One open `ModelStreamInfer` call.
pub struct GrpcStream {
    messages: mpsc::Sender<Bytes>,
    answers: hyper::body::Incoming,
    /// Answer bytes read but not yet a whole message.
    pending: BytesMut,
}

fn failed(what: impl std::fmt::Display) -> BenchError {
    BenchError::Server(format!("gRPC stream: {what}"))
}

impl GrpcStream {
    /// Opens the call at `path` (normally [`GRPC_STREAM_PATH`]) on `connection` (`authority` as
    /// in the URI, `scheme` http or https).
    pub async fn open(
        connection: &StreamConnection,
        scheme: &str,
        authority: &str,
        path: &str,
        headers: &hyper::HeaderMap,
    ) -> Result<GrpcStream, BenchError> {
        let (messages, outgoing) = mpsc::channel::<Bytes>(1);
        let frames = futures_util::stream::unfold(outgoing, |mut outgoing| async move {
            let message = outgoing.recv().await?;
            Some((Ok::<_, Infallible>(Frame::data(message)), outgoing))
        });
        let mut request = hyper::Request::post(format!("{scheme}://{authority}{path}"))
            .body(StreamBody::new(frames).boxed())
            .map_err(failed)?;
        *request.headers_mut() = headers.clone();
        mark_grpc(request.headers_mut());
        // The server answers the headers at once; its messages come as requests are sent.
        let response = connection
            .clone()
            .send_request(request)
            .await
            .map_err(failed)?;
        if let Some(code) = response.headers().get("grpc-status") {
            return Err(failed(format!(
                "refused with grpc-status {}",
                String::from_utf8_lossy(code.as_bytes())
            )));
        }
        Ok(GrpcStream {
            messages,
            answers: response.into_body(),
            pending: BytesMut::new(),
        })
    }

    /// Sends one gRPC-framed `ModelInferRequest` and waits for its answer: 200 with the
    /// answer's bytes, or 500 when the answer carries an error message.
    pub async fn call(&mut self, framed: Bytes) -> Result<(StatusCode, Bytes), BenchError> {
        self.messages
            .send(framed)
            .await
            .map_err(|_| failed("the request stream closed"))?;
        loop {
            if let Some(message) = self.take_message() {
                // `error_message` is field 1, written first (tag 0x0A) and only when set.
                let status = match message.first() {
                    Some(0x0A) => StatusCode::INTERNAL_SERVER_ERROR,
                    _ => StatusCode::OK,
                };
                return Ok((status, message));
            }
            match self.answers.frame().await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.pending.extend_from_slice(&data),
                    Err(frame) => {
                        let code = frame
                            .trailers_ref()
                            .and_then(|t| t.get("grpc-status"))
                            .map(|c| String::from_utf8_lossy(c.as_bytes()).into_owned());
                        return Err(failed(format!("ended with grpc-status {code:?}")));
                    }
                },
                Some(Err(e)) => return Err(failed(e)),
                None => return Err(failed("ended before its answer")),
            }
        }
    }

    /// The next whole gRPC message of the answers, if one has arrived.
    fn take_message(&mut self) -> Option<Bytes> {
        let header = self.pending.get(..5)?;
        let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if self.pending.len() < 5 + length {
            return None;
        }
        self.pending.advance(5);
        Some(self.pending.split_to(length).freeze())
    }
}
