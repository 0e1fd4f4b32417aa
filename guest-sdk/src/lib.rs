//! The SDK for meshserve WebAssembly plugins.
//!
//! A plugin turns a request body into a model's input tensors before inference
//! (`preprocess`), and the model's output tensors into the answer after it (`postprocess`).
//! The node runs it sandboxed: no files, network or environment unless the endpoint's config
//! grants them, a deadline and a memory cap per call, and a fresh instance every call.
//!
//! A complete plugin that feeds a JSON `{"amount": 12.5, "hour": 3}` to a model with one
//! `[1, 2]` FP32 input called `features`:
//!
//! ```no_run
//! use meshserve_guest::{Error, Plugin, Request, Tensor};
//!
//! struct Features;
//!
//! impl Plugin for Features {
//!     fn preprocess(request: Request) -> Result<Vec<Tensor>, Error> {
//!         let body: serde_json::Value = request.json()?;
//!         let field = |name: &str| {
//!             body[name].as_f64().map(|v| v as f32).ok_or_else(|| Error::bad_request(format!("'{name}' must be a number")))
//!         };
//!         Ok(vec![Tensor::fp32("features", vec![1, 2], vec![field("amount")?, field("hour")?])])
//!     }
//! }
//!
//! meshserve_guest::export_plugin!(Features);
//! ```
//!
//! Build it with `cargo build --target wasm32-wasip2 --release` (crate type `cdylib`), and
//! name the `.wasm` in an endpoint of the node config:
//!
//! ```toml
//! [endpoints.score]
//! model = "fraud"
//! pre = { path = "target/wasm32-wasip2/release/features.wasm", config = "" }
//! ```
//!
//! The WIT world (`wit/plugin.wit`) is the contract; plugins in other languages implement the
//! same world with their own bindings generator.

mod tensor;

pub use tensor::{Tensor, TensorData};

#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_plugin_world",
        default_bindings_module: "meshserve_guest::bindings",
    });
}

use bindings::meshserve::plugin::{host as wit_host, types as wit};

/// The request a pre-processing plugin receives.
#[derive(Debug, Clone)]
pub struct Request {
    /// The endpoint called.
    pub endpoint: String,
    /// The request's Content-Type ("" when absent).
    pub content_type: String,
    /// Headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The body as sent.
    pub body: Vec<u8>,
}

impl Request {
    /// Parses the body as JSON; a malformed body becomes a 400 naming the problem.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.body)
            .map_err(|e| Error::bad_request(format!("malformed JSON body: {e}")))
    }

    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What a post-processing plugin knows about the request it answers.
#[derive(Debug, Clone)]
pub struct Context {
    /// The endpoint called.
    pub endpoint: String,
    /// The model that ran.
    pub model: String,
    /// The request's Content-Type.
    pub content_type: String,
    /// The request's headers.
    pub headers: Vec<(String, String)>,
}

/// Post-processing's answer.
#[derive(Debug, Clone)]
pub enum Answer {
    /// A finished response body.
    Body {
        /// Its Content-Type.
        content_type: String,
        /// Its bytes.
        data: Vec<u8>,
    },
    /// Tensors, which the node encodes as an Open Inference Protocol response.
    Tensors(Vec<Tensor>),
}

impl Answer {
    /// A JSON body.
    pub fn json<T: serde::Serialize>(value: &T) -> Result<Answer, Error> {
        let data = serde_json::to_vec(value)
            .map_err(|e| Error::internal(format!("cannot encode the answer: {e}")))?;
        Ok(Answer::Body {
            content_type: "application/json".into(),
            data,
        })
    }
}

/// A failure the plugin reports: a status (4xx when the client's input is at fault) and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// The HTTP status to answer with.
    pub status: u16,
    /// The message, sent to the client as `{"error": ...}`.
    pub message: String,
}

impl Error {
    /// 400: the request is malformed.
    pub fn bad_request(message: impl Into<String>) -> Error {
        Error {
            status: 400,
            message: message.into(),
        }
    }

    /// 422: the request is well-formed but its content cannot be used.
    pub fn unprocessable(message: impl Into<String>) -> Error {
        Error {
            status: 422,
            message: message.into(),
        }
    }

    /// 500: the plugin itself cannot go on.
    pub fn internal(message: impl Into<String>) -> Error {
        Error {
            status: 500,
            message: message.into(),
        }
    }
}

/// A meshserve plugin. Implement the stage you need; the other answers 500 "not implemented".
pub trait Plugin {
    /// Request to input tensors.
    fn preprocess(request: Request) -> Result<Vec<Tensor>, Error> {
        let _ = request;
        Err(Error::internal("this plugin does not implement preprocess"))
    }

    /// Output tensors to the answer.
    fn postprocess(context: Context, outputs: Vec<Tensor>) -> Result<Answer, Error> {
        let _ = (context, outputs);
        Err(Error::internal(
            "this plugin does not implement postprocess",
        ))
    }
}

/// What the node offers: its log, a clock, the plugin's config string, and feature lookups.
pub mod host {
    use super::wit_host;

    /// Logs at info level in the node's log, tagged with the plugin's name.
    pub fn info(message: &str) {
        wit_host::log(wit_host::LogLevel::Info, message);
    }

    /// Logs a warning.
    pub fn warn(message: &str) {
        wit_host::log(wit_host::LogLevel::Warn, message);
    }

    /// Logs an error.
    pub fn error(message: &str) {
        wit_host::log(wit_host::LogLevel::Error, message);
    }

    /// Logs at debug level.
    pub fn debug(message: &str) {
        wit_host::log(wit_host::LogLevel::Debug, message);
    }

    /// Monotonic nanoseconds since an arbitrary start.
    pub fn monotonic_now() -> u64 {
        wit_host::monotonic_now()
    }

    /// The config string the endpoint gives this plugin.
    pub fn config() -> String {
        wit_host::config()
    }

    /// The config string parsed as JSON; an empty string reads as `{}`, so a type whose
    /// fields all have serde defaults needs no config at all. A bad config is a 500.
    pub fn config_json<T: serde::de::DeserializeOwned>() -> Result<T, crate::Error> {
        let text = config();
        let text = if text.trim().is_empty() {
            "{}"
        } else {
            text.as_str()
        };
        serde_json::from_str(text)
            .map_err(|e| crate::Error::internal(format!("invalid plugin config: {e}")))
    }

    /// The bytes stored under `key` in the feature table `table`.
    pub fn lookup(table: &str, key: &str) -> Option<Vec<u8>> {
        wit_host::lookup(table, key)
    }

    /// A feature-table value stored as little-endian f32s (the node's default format).
    pub fn lookup_f32(table: &str, key: &str) -> Option<Vec<f32>> {
        let bytes = lookup(table, key)?;
        Some(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    }
}

#[doc(hidden)]
pub fn __preprocess<P: Plugin>(
    request: wit::Request,
) -> Result<Vec<wit::Tensor>, wit::PluginError> {
    let request = Request {
        endpoint: request.endpoint,
        content_type: request.content_type,
        headers: request.headers,
        body: request.body,
    };
    P::preprocess(request)
        .map(|tensors| tensors.into_iter().map(Tensor::into_wit).collect())
        .map_err(into_wit_error)
}

#[doc(hidden)]
pub fn __postprocess<P: Plugin>(
    context: wit::Context,
    outputs: Vec<wit::Tensor>,
) -> Result<wit::Answer, wit::PluginError> {
    let context = Context {
        endpoint: context.endpoint,
        model: context.model,
        content_type: context.content_type,
        headers: context.headers,
    };
    let outputs = outputs.into_iter().map(Tensor::from_wit).collect();
    match P::postprocess(context, outputs).map_err(into_wit_error)? {
        Answer::Body { content_type, data } => {
            Ok(wit::Answer::Body(wit::Body { content_type, data }))
        }
        Answer::Tensors(tensors) => Ok(wit::Answer::Tensors(
            tensors.into_iter().map(Tensor::into_wit).collect(),
        )),
    }
}

fn into_wit_error(error: Error) -> wit::PluginError {
    wit::PluginError {
        status: error.status,
        message: error.message,
    }
}

/// Exports `$plugin` (a type implementing [`Plugin`]) as the component's plugin world.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        struct __MeshserveExport;

        impl $crate::bindings::Guest for __MeshserveExport {
            fn preprocess(
                request: $crate::bindings::meshserve::plugin::types::Request,
            ) -> ::core::result::Result<
                ::std::vec::Vec<$crate::bindings::meshserve::plugin::types::Tensor>,
                $crate::bindings::meshserve::plugin::types::PluginError,
            > {
                $crate::__preprocess::<$plugin>(request)
            }

            fn postprocess(
                context: $crate::bindings::meshserve::plugin::types::Context,
                outputs: ::std::vec::Vec<$crate::bindings::meshserve::plugin::types::Tensor>,
            ) -> ::core::result::Result<
                $crate::bindings::meshserve::plugin::types::Answer,
                $crate::bindings::meshserve::plugin::types::PluginError,
            > {
                $crate::__postprocess::<$plugin>(context, outputs)
            }
        }

        $crate::bindings::__export_plugin_world!(__MeshserveExport with_types_in $crate::bindings);
    };
}
