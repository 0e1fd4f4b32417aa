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
//!
//! Messages arrive undecoded ([`UndecodedRequests`]) and are admitted from what [`peek`]
//! reads of them: one for an overloaded model (or one that would miss its deadline) is
//! answered UNAVAILABLE in its place without being decoded; only an admitted one is.

use super::peek;
use super::proto::{ModelInferRequest, ModelInferResponse, ModelStreamInferResponse};
use super::service::GrpcDoor;
use crate::http::body::reserve;
use crate::http::error::ApiError;
use bytes::{Buf, Bytes};
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use prometheus_client::metrics::gauge::Gauge;
use prost::Message;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic::codegen::BoxStream;
use tonic::{Status, Streaming};

/// Requests of one stream run at once.
pub const IN_FLIGHT: usize = 64;

/// Answers that may wait for the client before the stream stops reading requests.
pub const ANSWERS_BUFFERED: usize = 8;

/// What a stream's task needs from the node.
#[derive(Clone)]
pub struct StreamLimits {
    /// The node's in-flight byte budget, which each message is charged to until answered.
    pub budget: Arc<Semaphore>,
    /// How long an answer may wait for the client to read it.
    pub stall: Duration,
}

/// ModelStreamInfer's codec: answers are encoded by prost, and requests are handed over as
/// their bytes, for admission to read before they are decoded.
#[derive(Debug, Default, Clone, Copy)]
pub struct UndecodedRequests;

impl Codec for UndecodedRequests {
    type Encode = ModelStreamInferResponse;
    type Decode = Bytes;
    type Encoder = tonic_prost::ProstEncoder<ModelStreamInferResponse>;
    type Decoder = WholeMessage;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        WholeMessage
    }
}

/// Hands over each message's bytes as they came (tonic has checked its size already).
#[derive(Debug, Clone, Copy)]
pub struct WholeMessage;

impl Decoder for WholeMessage {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, message: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(message.copy_to_bytes(message.remaining())))
    }
}

/// Runs a stream's requests; returns its answers.
pub fn answers(
    door: GrpcDoor,
    headers: http::HeaderMap,
    incoming: Streaming<Bytes>,
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
    mut incoming: Streaming<Bytes>,
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
            message = incoming.next(), if reading && running.len() < IN_FLIGHT => {
                match message.map(|message| admit(&door, message?, &headers, &limits.budget)) {
                    Some(Ok(work)) => {
                        let (door, headers) = (door.clone(), headers.clone());
                        running.push_back(async move { answer(&door, work, &headers).await });
                    }
                    Some(Err(status)) => {
                        reading = false;
                        failure = Some(status);
                    }
                    None => reading = false,
                }
            }
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

/// What a stream's message comes to before it runs.
enum Work {
    /// Decoded and admitted, with its bytes charged to the node's budget (or why they could
    /// not be).
    Run {
        message: ModelInferRequest,
        charge: Result<OwnedSemaphorePermit, ApiError>,
    },
    /// Refused before it was decoded: its answer carries the model and id it named.
    Refused {
        model_name: String,
        id: String,
        refusal: ApiError,
    },
}

/// Admits one of a stream's messages: refused from what [`peek`] reads of it, or decoded and
/// charged. A message that does not decode ends the stream, with the status tonic's own
/// decoder gives one (INTERNAL).
fn admit(
    door: &GrpcDoor,
    message: Bytes,
    headers: &http::HeaderMap,
    budget: &Arc<Semaphore>,
) -> Result<Work, Status> {
    let started = Instant::now();
    if let Some(peeked) = peek::peek_message(&message)
        && let Some(refusal) = door.refuse_undecoded(&peeked, headers, started)
    {
        return Ok(Work::Refused {
            model_name: peeked.model.to_string(),
            id: String::from_utf8_lossy(peeked.id).into_owned(),
            refusal,
        });
    }
    let charge = reserve(budget, u32::try_from(message.len()).unwrap_or(u32::MAX));
    let message =
        ModelInferRequest::decode(message).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Work::Run { message, charge })
}

/// One request's answer in the stream: its response, or its error in its place (the stream
/// goes on).
async fn answer(door: &GrpcDoor, work: Work, headers: &http::HeaderMap) -> Answer {
    let (model_name, id, outcome) = match work {
        Work::Run { message, charge } => {
            let (model_name, id) = (message.model_name.clone(), message.id.clone());
            let outcome = match charge {
                // The bytes stay charged until the request is answered.
                Ok(_held) => door.counted_infer(message, headers).await,
                Err(refused) => Err(refused),
            };
            (model_name, id, outcome)
        }
        Work::Refused {
            model_name,
            id,
            refusal,
        } => (model_name, id, Err(refusal)),
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
