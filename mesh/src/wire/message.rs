//! What travels in `meshserve/1` frames and membership datagrams.
//!
//! Every type is plain data with serde derives; postcard encodes enum variants by their index
//! and fields in declaration order, so **only append** variants and never reorder fields: the
//! test vectors in `mesh/tests/wire_vectors.txt` fail when an encoding changes. Tensors travel
//! as their OIP binary layout (the engine's own), so converting to and from
//! [`meshserve_host::Tensor`] moves the bytes without touching them.

use bytes::Bytes;
use meshserve_host::tensor::TensorError;
use meshserve_host::{
    DataType, ErrorClass, InferError, InferRequest, InferResponse, StageTimings, Tensor,
};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::time::Duration;

/// One frame's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Run a model (client or forwarding node → serving node).
    Infer(InferCall),
    /// A successful inference.
    Answer(InferAnswer),
    /// A failed request.
    Failure(Failure),
    /// Ask a node for its route table.
    RouteQuery,
    /// Which nodes serve which models.
    Routes(RouteTable),
    /// Ask a node for its view of the mesh.
    StatusQuery,
    /// A node's view of the mesh.
    Status(MeshStatus),
    /// Ask a node for a model's files, by digest (nodes only).
    FetchModel(FetchModel),
    /// A model's files.
    ModelFiles(ModelFiles),
    /// Ask a node for a model's OIP metadata.
    MetadataQuery(MetadataQuery),
    /// A model's OIP metadata document, as JSON text.
    Metadata(String),
    /// Ask a node for its own advert (nodes only).
    AdvertQuery,
    /// A node's own advert, answering [`Message::AdvertQuery`].
    Advert(NodeAdvert),
    /// Ask a node how loaded each model it serves is.
    LoadQuery,
    /// A node's load per model it serves, answering [`Message::LoadQuery`].
    Loads(NodeLoads),
    /// Ask a node which files make up a model's folder, by digest (nodes only): the first
    /// step of a chunked transfer.
    FetchManifest(FetchModel),
    /// A model folder's files and sizes, answering [`Message::FetchManifest`].
    Manifest(ModelManifest),
    /// Ask a node for a byte range of one file of a model's folder (nodes only).
    FetchChunk(FetchChunk),
    /// The bytes of a [`Message::FetchChunk`], exactly as many as asked for.
    Chunk(Bytes),
    /// A whole endpoint request, forwarded by a node that does not serve the endpoint to a
    /// replica of its model, which runs pre → model → post (node certificates only).
    Invoke(EndpointCall),
    /// The endpoint's answer, as its door would send it.
    Invoked(EndpointAnswer),
}

impl Message {
    /// The variant's name, for errors and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Infer(_) => "Infer",
            Message::Answer(_) => "Answer",
            Message::Failure(_) => "Failure",
            Message::RouteQuery => "RouteQuery",
            Message::Routes(_) => "Routes",
            Message::StatusQuery => "StatusQuery",
            Message::Status(_) => "Status",
            Message::FetchModel(_) => "FetchModel",
            Message::ModelFiles(_) => "ModelFiles",
            Message::MetadataQuery(_) => "MetadataQuery",
            Message::Metadata(_) => "Metadata",
            Message::AdvertQuery => "AdvertQuery",
            Message::Advert(_) => "Advert",
            Message::LoadQuery => "LoadQuery",
            Message::Loads(_) => "Loads",
            Message::FetchManifest(_) => "FetchManifest",
            Message::Manifest(_) => "Manifest",
            Message::FetchChunk(_) => "FetchChunk",
            Message::Chunk(_) => "Chunk",
            Message::Invoke(_) => "Invoke",
            Message::Invoked(_) => "Invoked",
        }
    }
}

/// One node's load per model it serves, from its own metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeLoads {
    /// The node.
    pub node: String,
    /// One entry per model loaded there.
    pub models: Vec<ModelLoadReport>,
}

/// One model's load on one node: its queue now, its requests over the last seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelLoadReport {
    /// The model.
    pub model: String,
    /// Requests waiting in its queue.
    pub queue_depth: u64,
    /// Requests answered per second over the last seconds.
    pub requests_per_second: f64,
    /// Their 99th percentile latency in µs; `None` when there were none.
    pub p99_us: Option<u64>,
    /// How long a request joining its queue now would wait, in µs, as admission predicts it
    /// (newest version); `None` before it has run.
    pub predicted_wait_us: Option<u64>,
}

/// Which model's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataQuery {
    /// The model.
    pub model: String,
    /// Its version; `None` means the newest.
    pub version: Option<String>,
}

/// A request for a model's files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchModel {
    /// The model.
    pub model: String,
    /// The SHA-256 of its files, as advertised (see `cluster::bundle::digest`).
    pub digest: [u8; 32],
}

/// Every file of a model's folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelFiles {
    /// The model.
    pub model: String,
    /// Their digest.
    pub digest: [u8; 32],
    /// The files.
    pub files: Vec<ModelFile>,
}

/// The files of a model's folder at one digest, without their bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelManifest {
    /// The model.
    pub model: String,
    /// The digest the files hash to.
    pub digest: [u8; 32],
    /// Each file, in path order.
    pub files: Vec<ManifestFile>,
}

/// One file of a [`ModelManifest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Path relative to the model's folder, `/`-separated.
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
}

/// A byte range of one file of a model's folder at one digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchChunk {
    /// The model.
    pub model: String,
    /// The digest of the folder the range is read from; a holder whose files changed refuses.
    pub digest: [u8; 32],
    /// The file, as named in the manifest.
    pub path: String,
    /// The first byte.
    pub offset: u64,
    /// How many bytes.
    pub length: u32,
}

/// One file of a model's folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelFile {
    /// Path relative to the model's folder, `/`-separated.
    pub path: String,
    /// Its bytes.
    pub data: Bytes,
}

/// A tensor on the wire: the OIP binary layout of [`Tensor`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireTensor {
    /// Input or output name.
    pub name: String,
    /// The datatype's code (see [`datatype_code`]).
    pub datatype: u8,
    /// Dimensions.
    pub shape: Vec<i64>,
    /// Elements in OIP binary layout.
    pub data: Bytes,
}

/// An inference call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferCall {
    /// The client's request id, echoed.
    pub id: Option<String>,
    /// The model.
    pub model: String,
    /// The version; `None` means the newest.
    pub version: Option<String>,
    /// Inputs.
    pub inputs: Vec<WireTensor>,
    /// Outputs wanted; `None` means all.
    pub outputs: Option<Vec<String>>,
    /// How long the request may wait before it is dropped unrun, in µs.
    pub timeout_us: Option<u64>,
    /// W3C trace context of the caller, carried across the hop.
    pub traceparent: Option<String>,
    /// Set by a node that forwards: the receiver must serve it or refuse, never forward again.
    pub forwarded: bool,
}

/// A successful inference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferAnswer {
    /// The request id, echoed.
    pub id: Option<String>,
    /// The model that answered.
    pub model_name: String,
    /// Its version.
    pub model_version: String,
    /// Outputs.
    pub outputs: Vec<WireTensor>,
    /// Where the time went on the serving node.
    pub timings: WireTimings,
    /// The node that ran the model.
    pub served_by: String,
    /// Where the model lives, so the caller can go there directly next time.
    pub route: Option<RouteHint>,
}

/// Stage timings of the serving node, in µs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireTimings {
    /// Waiting in the batcher's queue.
    pub queue_us: u64,
    /// Running the batch.
    pub infer_us: u64,
    /// Requests in that batch.
    pub batch_size: u32,
}

/// The class of a failure, as on the HTTP side, plus the mesh's own "not here".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureClass {
    /// Unknown model or version (404).
    NotFound,
    /// Malformed request (400).
    InvalidInput,
    /// Too large (413).
    TooLarge,
    /// Overloaded or stopping; retry (503).
    Unavailable,
    /// Deadline passed before running (504).
    DeadlineExceeded,
    /// The model or a plugin failed (500).
    Internal,
    /// A plugin's own 4xx.
    PluginStatus(u16),
    /// This node does not serve the model; the failure's route says who does.
    NotHere,
}

/// A failed request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// What kind of failure.
    pub class: FailureClass,
    /// For the operator and the client.
    pub message: String,
    /// When retrying makes sense, after how long, in ms.
    pub retry_after_ms: Option<u64>,
    /// Where the model lives, when this node knows.
    pub route: Option<RouteHint>,
}

/// A node that serves a model.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Replica {
    /// Its node name.
    pub node: String,
    /// Its QUIC (`meshserve/1`) address.
    pub quic: SocketAddr,
    /// Its HTTP address.
    pub http: SocketAddr,
    /// Its HTTP/3 address, when it serves HTTP/3.
    pub http3: Option<SocketAddr>,
}

impl From<&NodeAdvert> for Replica {
    fn from(advert: &NodeAdvert) -> Replica {
        Replica {
            node: advert.node.clone(),
            quic: advert.quic,
            http: advert.http,
            http3: advert.http3,
        }
    }
}

/// Where one model is served, as of a placement epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteHint {
    /// The model.
    pub model: String,
    /// Identifies the membership the placement was computed from; equal on converged nodes.
    pub epoch: u64,
    /// Its replicas, in placement order.
    pub replicas: Vec<Replica>,
}

/// Routes of every model a node knows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteTable {
    /// The placement epoch.
    pub epoch: u64,
    /// One entry per model.
    pub routes: Vec<RouteHint>,
}

/// What one node advertises to the mesh: fetched from the node itself when its
/// [`AdvertNotice`] announces a newer sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAdvert {
    /// The node's name.
    pub node: String,
    /// Which start of the node this is (later starts win).
    pub generation: u64,
    /// Increases with every change of one generation's advert other than its load figures, so
    /// newer replaces older.
    pub sequence: u64,
    /// The QUIC address.
    pub quic: SocketAddr,
    /// The HTTP address.
    pub http: SocketAddr,
    /// The HTTP/3 address, when the node serves HTTP/3.
    pub http3: Option<SocketAddr>,
    /// Models whose files this node holds, and their replica counts.
    pub catalog: Vec<CatalogEntry>,
    /// Models loaded and serving now.
    pub serving: Vec<String>,
    /// Requests queued across its models.
    pub queue_depth: u32,
    /// Its EWMA request latency, in µs.
    pub ewma_latency_us: u32,
    /// Endpoints whose folders this node holds in its repository.
    pub endpoints: Vec<EndpointEntry>,
    /// The node is stopping: nothing is placed on it any more, and it serves what it has
    /// until others serve it and its doors have drained.
    pub leaving: bool,
    /// Requests in flight and predicted queue wait for the models it serves that have more
    /// than one replica (load-following ones included), over its last meter period (load
    /// figures, like `queue_depth`).
    pub in_flight: Vec<ModelInFlight>,
    /// Models this node declines to serve: they would take it past its memory budget for
    /// models, so placement passes it over for them.
    pub declined: Vec<String>,
}

/// One model's load on one node, for a model with more than one replica: what the mesh's
/// replica policy sums and what the other nodes' balancers weigh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInFlight {
    /// The model.
    pub model: String,
    /// Requests in flight, times 1,000: the time-average over the node's last complete meter
    /// period (the sum of the latencies of the requests it answered in that period, over the
    /// period).
    pub milli: u32,
    /// How long a request joining its queue when the advert was made would wait before it
    /// runs, as the node's admission predicts it, in µs (0 when it would not wait or the
    /// model has not run yet).
    pub wait_us: u32,
}

impl NodeAdvert {
    /// An advert of `node` at `addr` (mesh and HTTP) that holds, serves and reports nothing:
    /// first generation, first sequence. Simulations and tests fill in what they need.
    pub fn empty(node: &str, addr: SocketAddr) -> NodeAdvert {
        NodeAdvert {
            node: node.to_string(),
            generation: 1,
            sequence: 0,
            quic: addr,
            http: addr,
            http3: None,
            catalog: Vec::new(),
            serving: Vec::new(),
            queue_depth: 0,
            ewma_latency_us: 0,
            endpoints: Vec::new(),
            leaving: false,
            in_flight: Vec::new(),
            declined: Vec::new(),
        }
    }
}

/// A client's endpoint request as it came (the headers the endpoint's plugins may see, and
/// those the pipeline reads), for a replica to run whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointCall {
    /// The endpoint.
    pub endpoint: String,
    /// Request headers passed on, lowercase names.
    pub headers: Vec<(String, String)>,
    /// The request body, untouched.
    pub body: Bytes,
    /// Time left for the request, in µs, when it has a deadline.
    pub timeout_us: Option<u64>,
}

/// An endpoint's answer: status, headers and body as the replica's door made them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointAnswer {
    /// The node that ran it.
    pub node: String,
    /// The HTTP status.
    pub status: u16,
    /// The answer's headers (the transfer's own, such as `content-length`, left out).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
}

/// An endpoint a node holds: a folder of its repository beside the models (definition,
/// components, tables), fetched by digest like a model and placed with its model.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EndpointEntry {
    /// The endpoint's name (its folder's).
    pub name: String,
    /// The model it runs.
    pub model: String,
    /// The SHA-256 of its folder's files.
    pub digest: [u8; 32],
    /// The files' total size, in bytes.
    pub bytes: u64,
    /// Request headers its plugins may see (lowercase): what a node forwarding a request for
    /// it passes on.
    pub headers: Vec<String>,
}

/// What a node tells each member directly (a membership datagram): which version of its
/// advert is current, and its load now. A member holding an older version fetches the advert
/// from the node itself ([`Message::AdvertQuery`]), so an advert's content only ever comes
/// from the node its certificate names, and a catalog of any size fits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvertNotice {
    /// The node's name.
    pub node: String,
    /// Its generation.
    pub generation: u64,
    /// The sequence of its current advert.
    pub sequence: u64,
    /// Its QUIC address.
    pub quic: SocketAddr,
    /// Requests queued across its models.
    pub queue_depth: u32,
    /// Its EWMA request latency, in µs.
    pub ewma_latency_us: u32,
    /// Load figures per model with more than one replica (see
    /// [`NodeAdvert::in_flight`]), the busiest first, as many as fit in a datagram.
    pub in_flight: Vec<ModelInFlight>,
}

impl From<&NodeAdvert> for AdvertNotice {
    fn from(advert: &NodeAdvert) -> AdvertNotice {
        AdvertNotice {
            node: advert.node.clone(),
            generation: advert.generation,
            sequence: advert.sequence,
            quic: advert.quic,
            queue_depth: advert.queue_depth,
            ewma_latency_us: advert.ewma_latency_us,
            in_flight: advert.in_flight.clone(),
        }
    }
}

/// A model a node holds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CatalogEntry {
    /// The model's name.
    pub model: String,
    /// How many nodes should serve it; 0 means every node of the mesh.
    pub replicas: u16,
    /// The SHA-256 of its files, by which other nodes fetch them.
    pub digest: [u8; 32],
    /// The files' total size, in bytes.
    pub bytes: u64,
    /// When the replica count follows load: its bounds and target (then `replicas` is the
    /// minimum).
    pub scaling: Option<Scaling>,
}

/// How a model's replica count follows load, as its publisher's config says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Scaling {
    /// The fewest replicas.
    pub min: u16,
    /// The most replicas.
    pub max: u16,
    /// Requests in flight one replica is meant to carry, times 1,000.
    pub target_in_flight_milli: u32,
    /// Seconds the load must stay low before a replica is removed.
    pub down_window_s: u32,
}

/// A member as one node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Its name.
    pub node: String,
    /// `alive`, `suspect` or `down`.
    pub state: String,
    /// Its last advert, if one arrived.
    pub advert: Option<NodeAdvert>,
}

/// A node's view of the mesh, for `meshserve status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshStatus {
    /// The answering node.
    pub node: String,
    /// Every member it knows, itself included.
    pub members: Vec<MemberStatus>,
    /// Placement: the routes of every model.
    pub routes: RouteTable,
    /// The models whose replica count follows load, as this node's policy decides them.
    pub scaling: Vec<ScaleStatus>,
}

/// One model's load-following replica count, as one node decides it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScaleStatus {
    /// The model.
    pub model: String,
    /// Its bounds and target.
    pub scaling: Scaling,
    /// The count decided.
    pub count: u16,
    /// Requests in flight over its replicas at the last sample, times 1,000.
    pub in_flight_milli: u32,
    /// The last change, in words ("1 -> 3: why"), if there was one.
    pub last_change: Option<String>,
}

/// The stable code of each datatype on the wire.
pub fn datatype_code(datatype: DataType) -> u8 {
    match datatype {
        DataType::Bool => 0,
        DataType::Uint8 => 1,
        DataType::Uint16 => 2,
        DataType::Uint32 => 3,
        DataType::Uint64 => 4,
        DataType::Int8 => 5,
        DataType::Int16 => 6,
        DataType::Int32 => 7,
        DataType::Int64 => 8,
        DataType::Fp16 => 9,
        DataType::Fp32 => 10,
        DataType::Fp64 => 11,
        DataType::Bytes => 12,
    }
}

/// The datatype of a wire code.
pub fn datatype_of(code: u8) -> Option<DataType> {
    DataType::ALL
        .into_iter()
        .find(|d| datatype_code(*d) == code)
}

impl From<Tensor> for WireTensor {
    fn from(tensor: Tensor) -> WireTensor {
        WireTensor {
            name: tensor.name,
            datatype: datatype_code(tensor.datatype),
            shape: tensor.shape,
            data: tensor.data,
        }
    }
}

/// Why a wire tensor is not a valid tensor.
#[derive(Debug, thiserror::Error)]
pub enum WireTensorError {
    /// Unknown datatype code.
    #[error("tensor '{name}': unknown datatype code {code}")]
    UnknownDatatype {
        /// The tensor.
        name: String,
        /// The code.
        code: u8,
    },
    /// Bytes that do not match the shape.
    #[error(transparent)]
    Invalid(#[from] TensorError),
}

impl TryFrom<WireTensor> for Tensor {
    type Error = WireTensorError;

    fn try_from(wire: WireTensor) -> Result<Tensor, WireTensorError> {
        let datatype = datatype_of(wire.datatype).ok_or(WireTensorError::UnknownDatatype {
            name: wire.name.clone(),
            code: wire.datatype,
        })?;
        Ok(Tensor::new(wire.name, datatype, wire.shape, wire.data)?)
    }
}

impl InferCall {
    /// The engine request this call asks for; a tensor that does not match its shape is an
    /// invalid-input failure.
    pub fn into_request(self) -> Result<(InferRequest, Option<String>), Failure> {
        let inputs = self
            .inputs
            .into_iter()
            .map(Tensor::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Failure::new(FailureClass::InvalidInput, e.to_string()))?;
        let request = InferRequest {
            model: self.model,
            version: self.version,
            id: self.id,
            inputs,
            outputs: self.outputs,
            timeout: self.timeout_us.map(Duration::from_micros),
        };
        Ok((request, self.traceparent))
    }

    /// How long the caller gives this call: its own timeout, else `default` (0 means no
    /// timeout given, as it does in the engine).
    pub fn timeout_or(&self, default: Duration) -> Duration {
        self.timeout_us
            .filter(|&us| us > 0)
            .map_or(default, Duration::from_micros)
    }

    /// The call that carries `request` over the mesh.
    pub fn from_request(request: InferRequest, traceparent: Option<String>) -> InferCall {
        InferCall {
            id: request.id,
            model: request.model,
            version: request.version,
            inputs: request.inputs.into_iter().map(WireTensor::from).collect(),
            outputs: request.outputs,
            timeout_us: request
                .timeout
                .map(|t| u64::try_from(t.as_micros()).unwrap_or(u64::MAX)),
            traceparent,
            forwarded: false,
        }
    }
}

impl InferAnswer {
    /// The engine response this answer carries, and the node that served it; tensors that do
    /// not match their shapes are refused.
    pub fn into_response(self) -> Result<(InferResponse, String), WireTensorError> {
        let outputs = self
            .outputs
            .into_iter()
            .map(Tensor::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let response = InferResponse {
            model_name: self.model_name,
            model_version: self.model_version,
            id: self.id,
            outputs,
            timings: self.timings.into(),
        };
        Ok((response, self.served_by))
    }
}

impl From<StageTimings> for WireTimings {
    fn from(t: StageTimings) -> WireTimings {
        WireTimings {
            queue_us: u64::try_from(t.queue.as_micros()).unwrap_or(u64::MAX),
            infer_us: u64::try_from(t.infer.as_micros()).unwrap_or(u64::MAX),
            batch_size: u32::try_from(t.batch_size).unwrap_or(u32::MAX),
        }
    }
}

impl From<WireTimings> for StageTimings {
    fn from(t: WireTimings) -> StageTimings {
        StageTimings {
            queue: Duration::from_micros(t.queue_us),
            infer: Duration::from_micros(t.infer_us),
            batch_size: t.batch_size as usize,
        }
    }
}

impl Failure {
    /// A failure without retry advice or route.
    pub fn new(class: FailureClass, message: impl Into<String>) -> Failure {
        Failure {
            class,
            message: message.into(),
            retry_after_ms: None,
            route: None,
        }
    }

    /// The error class a front door reports; "not here" is a 404 to an HTTP client, since a
    /// node only says it after it could not forward.
    pub fn error_class(&self) -> ErrorClass {
        match self.class {
            FailureClass::NotFound | FailureClass::NotHere => ErrorClass::NotFound,
            FailureClass::InvalidInput => ErrorClass::InvalidInput,
            FailureClass::TooLarge => ErrorClass::TooLarge,
            FailureClass::Unavailable => ErrorClass::Unavailable,
            FailureClass::DeadlineExceeded => ErrorClass::DeadlineExceeded,
            FailureClass::Internal => ErrorClass::Internal,
            FailureClass::PluginStatus(code) => ErrorClass::PluginStatus(code),
        }
    }
}

impl From<&InferError> for Failure {
    fn from(e: &InferError) -> Failure {
        let class = match e.class() {
            ErrorClass::NotFound => FailureClass::NotFound,
            ErrorClass::InvalidInput => FailureClass::InvalidInput,
            ErrorClass::TooLarge => FailureClass::TooLarge,
            // Only the HTTP front door reads bodies and checks admin authority; were one of
            // these ever sent, the client was at fault.
            ErrorClass::RequestTimeout | ErrorClass::Unauthorized | ErrorClass::Forbidden => {
                FailureClass::InvalidInput
            }
            ErrorClass::Unavailable => FailureClass::Unavailable,
            ErrorClass::DeadlineExceeded => FailureClass::DeadlineExceeded,
            ErrorClass::Internal => FailureClass::Internal,
            ErrorClass::PluginStatus(code) => FailureClass::PluginStatus(code),
        };
        Failure {
            class,
            message: e.to_string(),
            retry_after_ms: e
                .retry_after()
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            route: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_datatype_has_a_distinct_code() {
        for datatype in DataType::ALL {
            assert_eq!(datatype_of(datatype_code(datatype)), Some(datatype));
        }
        assert_eq!(datatype_of(13), None);
    }

    #[test]
    fn a_wire_tensor_with_wrong_bytes_is_refused() {
        let wire = WireTensor {
            name: "x".into(),
            datatype: datatype_code(DataType::Fp32),
            shape: vec![1, 2],
            data: Bytes::from_static(&[0; 4]),
        };
        let e = Tensor::try_from(wire).unwrap_err();
        assert!(e.to_string().contains("needs 8 bytes"), "{e}");
    }
}
