//! What the engine takes and gives back, independent of any wire format.

use crate::tensor::Tensor;
use std::time::Duration;

/// One inference request, already decoded by a front door.
#[derive(Debug, Clone, Default)]
pub struct InferRequest {
    /// The model to run.
    pub model: String,
    /// The version; `None` means the newest loaded.
    pub version: Option<String>,
    /// The client's request id, echoed back.
    pub id: Option<String>,
    /// One tensor per model input, any order.
    pub inputs: Vec<Tensor>,
    /// Outputs wanted, by name; `None` means all.
    pub outputs: Option<Vec<String>>,
    /// How long the request may wait before it is dropped unrun; `None` uses the model's default.
    pub timeout: Option<Duration>,
}

/// Where a request's time went inside the engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StageTimings {
    /// From entering the queue to the start of its batch.
    pub queue: Duration,
    /// Running the batch: stacking, ONNX Runtime, splitting.
    pub infer: Duration,
    /// Requests in the batch it ran in.
    pub batch_size: usize,
}

/// A successful inference.
#[derive(Debug, Clone)]
pub struct InferResponse {
    /// The model that answered.
    pub model_name: String,
    /// The version that answered.
    pub model_version: String,
    /// The request's id, echoed.
    pub id: Option<String>,
    /// The requested outputs, in the order asked for (or model order).
    pub outputs: Vec<Tensor>,
    /// Where the time went.
    pub timings: StageTimings,
}
