//! A raw HTTP/2 client for gRPC's ModelStreamInfer whose flow control the test controls:
//! messages go in one by one, answers and the call's final status come out as they arrive;
//! and gRPC's message frame, which unary probes send too.

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshserve::http::grpc::proto::ModelStreamInferResponse;
use prost::Message;
use std::convert::Infallible;
use std::net::SocketAddr;
use tokio::sync::mpsc;

/// The streaming inference call's path.
pub const STREAM_PATH: &str = "/inference.GRPCInferenceService/ModelStreamInfer";

/// An HTTP/2 connection to a node.
pub type Connection = hyper::client::conn::http2::SendRequest<BoxBody<Bytes, Infallible>>;

/// An HTTP/2 connection whose receive windows are HTTP/2's smallest (64 KiB), and which
/// hands back no window until the test reads a body.
pub async fn connect(addr: SocketAddr) -> Connection {
    connect_with_window(addr, 65_535).await
}

/// An HTTP/2 connection whose receive windows are `window` bytes.
pub async fn connect_with_window(addr: SocketAddr, window: u32) -> Connection {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (connection, driver) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(window)
        .initial_connection_window_size(window)
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(driver);
    connection
}

/// `message` in gRPC's frame: uncompressed, its length first.
pub fn frame(message: &[u8]) -> Bytes {
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    framed.into()
}

/// An open ModelStreamInfer call: messages go in through `send`, answers come in `body`.
pub struct Stream {
    /// `None` once the client has finished sending.
    pub outgoing: Option<mpsc::Sender<Bytes>>,
    body: Incoming,
    pending: BytesMut,
}

/// Opens a ModelStreamInfer call on `connection`.
pub async fn open(connection: &Connection) -> Stream {
    let (send, outgoing) = mpsc::channel::<Bytes>(16);
    let frames = futures_util::stream::unfold(outgoing, |mut outgoing| async move {
        let message = outgoing.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(message)), outgoing))
    });
    let request = hyper::Request::post(format!("http://localhost{STREAM_PATH}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(StreamBody::new(frames).boxed())
        .unwrap();
    let response = connection.clone().send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    Stream {
        outgoing: Some(send),
        body: response.into_body(),
        pending: BytesMut::new(),
    }
}

/// What a stream's reader found: its answers in order, and the call's final status.
pub enum Read {
    Answer(ModelStreamInferResponse),
    End(Option<String>),
}

impl Stream {
    pub async fn send(&self, message: Bytes) {
        let outgoing = self.outgoing.as_ref().expect("still sending");
        outgoing
            .send(message)
            .await
            .expect("the request body is open");
    }

    /// Ends the client's half of the stream.
    pub fn finish(&mut self) {
        self.outgoing = None;
    }

    pub async fn read(&mut self) -> Read {
        loop {
            if self.pending.len() >= 5 {
                let length = u32::from_be_bytes(self.pending[1..5].try_into().unwrap()) as usize;
                if self.pending.len() >= 5 + length {
                    self.pending.advance(5);
                    let message = self.pending.split_to(length);
                    return Read::Answer(ModelStreamInferResponse::decode(message).unwrap());
                }
            }
            match self.body.frame().await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.pending.extend_from_slice(&data),
                    Err(frame) => {
                        let status = frame
                            .trailers_ref()
                            .and_then(|t| t.get("grpc-status"))
                            .map(|s| s.to_str().unwrap().to_string());
                        return Read::End(status);
                    }
                },
                Some(Err(e)) => panic!("the stream failed: {e}"),
                None => return Read::End(None),
            }
        }
    }

    pub async fn answer(&mut self) -> ModelStreamInferResponse {
        match self.read().await {
            Read::Answer(answer) => answer,
            Read::End(status) => panic!("the stream ended with {status:?} before its answer"),
        }
    }
}
