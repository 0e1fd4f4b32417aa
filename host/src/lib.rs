//! meshserve's single-node engine.
//!
//! The request path, in module order: [`model::repository`] finds models on disk,
//! [`model::session`] runs them in ONNX Runtime ([`runtime`] finds the library),
//! [`batching`] queues and stacks requests, [`engine`] ties them together behind
//! [`Engine::infer`]; [`plugin`] runs WebAssembly pre/post-processing around it for an
//! [`endpoint`]. [`tensor`] is the one tensor type every layer shares; [`metrics`]
//! records what happened. Networking lives in the `meshserve` crate, not here.

// The one exception is loading plugins compiled by this node from its own cache (plugin::cache).
#![deny(unsafe_code)]

pub mod batching;
pub mod endpoint;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod model;
pub mod plugin;
pub mod request;
pub mod runtime;
pub mod tensor;

pub use engine::{Engine, EngineConfig};
pub use error::{ErrorClass, InferError};
pub use request::{InferRequest, InferResponse, StageTimings};
pub use tensor::{DataType, Tensor};
