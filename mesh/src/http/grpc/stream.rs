//! `ModelStreamInfer`: one task per stream reads the client's requests, runs up to
//! [`IN_FLIGHT`] of them at once and hands their answers, in the order the requests came, to
//! the response through a small channel. Everything a stream holds is bounded:
//! - requests: at most [`IN_FLIGHT`] run at once, and each message's bytes are charged to the
//!   node's in-flight byte budget until it is answered (past it, that request answers
//!   UNAVAILABLE in its place);
//! - answers: at most [`ANSWERS_BUFFERED`] wait for the client, plus what HTTP/2 buffers;
//! - time: a client that leaves its answers unread for the stall limit loses the stream: its
//!   running requests are dropped (the engine skips queued work whose caller is gone), no more
//!   of its messages are read, and the stream ends with RESOURCE_EXHAUSTED when it is read.
//!
//! A client that cancels its stream (or goes away) drops the response, which stops the task
//! the same way.

use super::proto::{ModelInferRequest, ModelInferResponse, ModelStreamInferResponse};
use super::service::GrpcDoor;
use crate::http::body::reserve;
use crate::http::error::ApiError;
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use prometheus_client::metrics::gauge::Gauge;
use prost::Message;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::codegen::BoxStream;
use tonic::{Status, Streaming};

/// Requests of one stream run at once.
pub const IN_FLIGHT: usize = 64;

/// Answers that may wait for the client before the stream stops reading requests.
pub const ANSWERS_BUFFERED: usize = 8;

/// What a stream's task needs from the node.
pub struct StreamLimits {
    /// The node's in-flight byte budget, which each message is charged to until answered.
    pub budget: Arc<Semaphore>,
    /// How long an answer may wait for the client to read it.
    pub stall: Duration,
}

/// Runs a stream's requests; returns its answers.
pub fn answers(
    door: GrpcDoor,
    headers: http::HeaderMap,
    incoming: Streaming<ModelInferRequest>,
    limits: StreamLimits,
) -> BoxStream<ModelStreamInferResponse> {
    let (answers, mut receiver) = mpsc::channel(ANSWERS_BUFFERED);
    // How the stream ended when the task could not say so in order: the client stopped
    // reading, so the channel was full.
    let ended: Arc<Mutex<Option<Status>>> = Arc::default();
    tokio::spawn(run(door, headers, incoming, limits, answers, ended.clone()));
    Box::pin(futures_util::stream::poll_fn(move |cx| {
        receiver.poll_recv(cx).map(|answer| {
            answer.or_else(|| {
                let status = ended.lock().unwrap_or_else(|p| p.into_inner()).take();
                status.map(Err)
            })
        })
    }))
}

type Answer = Result<ModelStreamInferResponse, Status>;

async fn run(
    door: GrpcDoor,
    headers: http::HeaderMap,
    mut incoming: Streaming<ModelInferRequest>,
    limits: StreamLimits,
    answers: mpsc::Sender<Answer>,
    ended: Arc<Mutex<Option<Status>>>,
) {
    let _open = OpenStream::count(door.metrics().grpc_streams().clone());
    let headers = Arc::new(headers);
    let mut running = FuturesOrdered::new();
    // Set once no more requests will be read: the client finished, or sent a message that is
    // not one (whose status ends the stream after the answers before it).
    let mut reading = true;
    let mut failure: Option<Status> = None;
    while reading || !running.is_empty() {
        tokio::select! {
            biased;
            () = answers.closed() => return,
            Some(answer) = running.next(), if !running.is_empty() => {
                if !deliver(&answers, answer, limits.stall, &ended).await {
                    return;
                }
            }
            message = incoming.next(), if reading && running.len() < IN_FLIGHT => match message {
                Some(Ok(message)) => {
                    let charge = charge(&limits.budget, &message);
                    let (door, headers) = (door.clone(), headers.clone());
                    running.push_back(async move { answer(&door, message, &headers, charge).await });
                }
                Some(Err(status)) => {
                    reading = false;
                    failure = Some(status);
                }
                None => reading = false,
            },
        }
    }
    if let Some(status) = failure {
        let _ = deliver(&answers, Err(status), limits.stall, &ended).await;
    }
}

/// Counts a stream in the node's gauge of open streams while it lives.
struct OpenStream(Gauge);

impl OpenStream {
    fn count(gauge: Gauge) -> OpenStream {
        gauge.inc();
        OpenStream(gauge)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Hands one answer to the response; false when the stream is over (the client went away, or
/// left its answers unread for `stall`).
async fn deliver(
    answers: &mpsc::Sender<Answer>,
    answer: Answer,
    stall: Duration,
    ended: &Mutex<Option<Status>>,
) -> bool {
    match tokio::time::timeout(stall, answers.send(answer)).await {
        Ok(sent) => sent.is_ok(),
        Err(_) => {
            tracing::warn!(
                stall_ms = stall.as_millis() as u64,
                "a gRPC stream's client left its answers unread; the stream is dropped"
            );
            *ended.lock().unwrap_or_else(|p| p.into_inner()) = Some(Status::resource_exhausted(
                format!(
                    "the stream's answers were not read for {} ms (http.body_read_timeout_ms); it was stopped",
                    stall.as_millis()
                ),
            ));
            false
        }
    }
}

/// A message's bytes taken from the node's budget, or why they could not be.
fn charge(
    budget: &Arc<Semaphore>,
    message: &ModelInferRequest,
) -> Result<OwnedSemaphorePermit, ApiError> {
    reserve(
        budget,
        u32::try_from(message.encoded_len()).unwrap_or(u32::MAX),
    )
}

/// One request's answer in the stream: its response, or its error in its place (the stream
/// goes on).
async fn answer(
    door: &GrpcDoor,
    message: ModelInferRequest,
    headers: &http::HeaderMap,
    charge: Result<OwnedSemaphorePermit, ApiError>,
) -> Answer {
    let (model_name, id) = (message.model_name.clone(), message.id.clone());
    let outcome = match charge {
        // The bytes stay charged until the request is answered.
        Ok(_held) => door.counted_infer(message, headers).await,
        Err(refused) => Err(refused),
    };
    Ok(match outcome {
        Ok(answer) => ModelStreamInferResponse {
            error_message: String::new(),
            infer_response: Some(answer),
        },
        Err(error) => ModelStreamInferResponse {
            error_message: error.message,
            infer_response: Some(ModelInferResponse {
                model_name,
                id,
                ..Default::default()
            }),
        },
    })
}
