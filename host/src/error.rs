//! The errors a request can meet in the engine, each with the class a front door maps to a
//! status code. Front doors translate [`ErrorClass`] in one place; nothing else picks codes.

use std::time::Duration;

/// How a failure should be reported to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The model or version does not exist here (HTTP 404).
    NotFound,
    /// The request is malformed or does not fit the model (HTTP 400).
    InvalidInput,
    /// The body is larger than the node accepts (HTTP 413).
    TooLarge,
    /// The client did not send its request in time (HTTP 408).
    RequestTimeout,
    /// The node cannot take the request now; retry later (HTTP 503 with `Retry-After`).
    Unavailable,
    /// The request's deadline passed before it ran (HTTP 504).
    DeadlineExceeded,
    /// The model or a plugin failed while running (HTTP 500).
    Internal,
    /// A plugin rejected the request with this 4xx status.
    PluginStatus(u16),
    /// An admin operation without valid credentials (HTTP 401).
    Unauthorized,
    /// An admin operation from where it is not allowed (HTTP 403).
    Forbidden,
}

impl ErrorClass {
    /// The HTTP status of this class, the one number every door and metric uses for it.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorClass::NotFound => 404,
            ErrorClass::InvalidInput => 400,
            ErrorClass::TooLarge => 413,
            ErrorClass::RequestTimeout => 408,
            ErrorClass::Unavailable => 503,
            ErrorClass::DeadlineExceeded => 504,
            ErrorClass::Internal => 500,
            ErrorClass::Unauthorized => 401,
            ErrorClass::Forbidden => 403,
            // Only a 4xx is a plugin's to pick; the number may also come from a peer's frame.
            ErrorClass::PluginStatus(code) if (400..500).contains(&code) => code,
            ErrorClass::PluginStatus(_) => 400,
        }
    }
}

/// A request that failed in the engine.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// No model of that name is loaded.
    #[error("unknown model '{model}'")]
    ModelNotFound {
        /// The name asked for.
        model: String,
    },
    /// No endpoint of that name is known here.
    #[error("unknown endpoint '{endpoint}'")]
    EndpointNotFound {
        /// The name asked for.
        endpoint: String,
    },
    /// The model is loaded but not in that version.
    #[error("model '{model}' has no version '{version}' loaded")]
    VersionNotFound {
        /// The model.
        model: String,
        /// The version asked for.
        version: String,
    },
    /// The request does not fit the model's signature.
    #[error("{0}")]
    InvalidInput(String),
    /// The model's queue is full.
    #[error("model '{model}' is overloaded: {depth} requests queued; retry later")]
    QueueFull {
        /// The model.
        model: String,
        /// Requests waiting.
        depth: usize,
    },
    /// The queue ahead predicts an answer after the request's deadline: refused at once.
    #[error(
        "model '{model}' would answer in about {predicted_us} µs, after this request's deadline of {timeout_us} µs: refused without waiting; retry later or with a longer deadline"
    )]
    WouldMissDeadline {
        /// The model.
        model: String,
        /// The answer the queue predicted, from now.
        predicted_us: u64,
        /// The request's deadline, from its arrival.
        timeout_us: u64,
    },
    /// The request has no deadline and the queue ahead predicts a longer wait than the
    /// model's bound on queueing: refused at once.
    #[error(
        "model '{model}' is overloaded: a request would wait about {predicted_us} µs in its queue, over its bound of {bound_us} µs; refused without waiting; retry later"
    )]
    WouldWaitTooLong {
        /// The model.
        model: String,
        /// The wait the queue predicted, from now.
        predicted_us: u64,
        /// The model's bound on queueing.
        bound_us: u64,
    },
    /// The model is being unloaded or the node is stopping.
    #[error("model '{model}' is unloading or the node is shutting down")]
    Closed {
        /// The model.
        model: String,
    },
    /// The deadline passed before the model answered.
    #[error(
        "request to '{model}' passed its deadline of {timeout_us} µs after {waited_us} µs; {}",
        if *ran { "it was running, and its result was discarded" } else { "it was not run" }
    )]
    DeadlineExceeded {
        /// The model.
        model: String,
        /// Time from queueing to the deadline.
        waited_us: u64,
        /// The deadline it had.
        timeout_us: u64,
        /// Whether a session had started it.
        ran: bool,
    },
    /// An endpoint's plugin is not loaded (bad file, failed compile).
    #[error("endpoint '{endpoint}' is unavailable: {reason}")]
    EndpointUnavailable {
        /// The endpoint.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// A reload of an endpoint failed, and the version it would have replaced keeps serving.
    #[error("endpoint '{endpoint}' was not reloaded; its previous version keeps serving: {reason}")]
    EndpointNotReplaced {
        /// The endpoint.
        endpoint: String,
        /// Why the new version did not load.
        reason: String,
    },
    /// A plugin refused the request with its own status.
    #[error("plugin '{plugin}' rejected the request: {message}")]
    PluginRejected {
        /// The plugin.
        plugin: String,
        /// The status it chose.
        status: u16,
        /// Its message.
        message: String,
    },
    /// A plugin trapped, ran out of time, memory or fuel, or returned nonsense.
    #[error("plugin '{plugin}' failed: {cause}")]
    PluginFailed {
        /// The plugin.
        plugin: String,
        /// What happened.
        cause: String,
    },
    /// A plugin could not get an instance in time, or the node's plugin memory is spent.
    #[error("plugin '{plugin}' is busy: {cause}; retry later")]
    PluginBusy {
        /// The plugin.
        plugin: String,
        /// Why.
        cause: String,
        /// When a retry may succeed.
        retry_after: Duration,
    },
    /// ONNX Runtime failed.
    #[error("model '{model}' failed: {message}")]
    Runtime {
        /// The model.
        model: String,
        /// What failed.
        message: String,
    },
}

impl InferError {
    /// How a front door reports this error.
    pub fn class(&self) -> ErrorClass {
        match self {
            InferError::ModelNotFound { .. }
            | InferError::EndpointNotFound { .. }
            | InferError::VersionNotFound { .. } => ErrorClass::NotFound,
            InferError::InvalidInput(_) | InferError::EndpointNotReplaced { .. } => {
                ErrorClass::InvalidInput
            }
            InferError::QueueFull { .. }
            | InferError::WouldMissDeadline { .. }
            | InferError::WouldWaitTooLong { .. }
            | InferError::Closed { .. }
            | InferError::EndpointUnavailable { .. }
            | InferError::PluginBusy { .. } => ErrorClass::Unavailable,
            InferError::PluginRejected { status, .. } if (400..500).contains(status) => {
                ErrorClass::PluginStatus(*status)
            }
            InferError::PluginRejected { .. } | InferError::PluginFailed { .. } => {
                ErrorClass::Internal
            }
            InferError::DeadlineExceeded { .. } => ErrorClass::DeadlineExceeded,
            InferError::Runtime { .. } => ErrorClass::Internal,
        }
    }

    /// When a client should retry an `Unavailable` error.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            InferError::QueueFull { .. } | InferError::Closed { .. } => {
                Some(Duration::from_secs(1))
            }
            InferError::PluginBusy { retry_after, .. } => Some(*retry_after),
            // By then the queue ahead of it has run, as far as the prediction knows.
            InferError::WouldMissDeadline { predicted_us, .. }
            | InferError::WouldWaitTooLong { predicted_us, .. } => {
                Some(Duration::from_micros(*predicted_us))
            }
            _ => None,
        }
    }
}
