//! The SDK for meshserve WebAssembly plugins (`meshserve:plugin@0.2.0`).
//!
//! A plugin turns a request into a model's input tensors before inference ([`Preprocess`]),
//! and the model's output tensors into the answer after it ([`Postprocess`]). The node runs it
//! sandboxed: no files, network or environment unless the endpoint's config grants them, a
//! deadline and a memory cap per call, and bounds on everything it returns.
//!
//! [`Plugin::init`] runs once per instance with the endpoint's config string: parse it there.
//! The node reuses a warm instance for many calls (unless the endpoint asks for
//! `isolation = "per-call"`), so `&mut self` may keep caches between calls; it must not keep
//! anything one request must not see of another.
//!
//! A complete plugin that feeds a JSON `{"amount": 12.5, "hour": 3}` to a model with one
//! `[1, 2]` FP32 input called `features`:
//!
//! ```no_run
//! use meshserve_guest::{Error, Plugin, Pre, Preprocess, Request, Tensor};
//!
//! struct Features;
//!
//! impl Plugin for Features {
//!     fn init(_config: &str) -> Result<Self, Error> {
//!         Ok(Features)
//!     }
//! }
//!
//! impl Preprocess for Features {
//!     fn preprocess(&mut self, request: &Request) -> Result<Pre, Error> {
//!         let body: serde_json::Value = request.json()?;
//!         let field = |name: &str| {
//!             body[name].as_f64().map(|v| v as f32).ok_or_else(|| Error::bad_request(format!("'{name}' must be a number")))
//!         };
//!         Ok(vec![Tensor::fp32("features", vec![1, 2], vec![field("amount")?, field("hour")?])].into())
//!     }
//! }
//!
//! meshserve_guest::export_plugin!(Features: pre);
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
//! The WIT (`wit/plugin.wit`) is the contract; plugins in other languages implement one of its
//! worlds (`pre`, `post`, `pre-post`) with their own bindings generator.

mod tensor;

pub use tensor::{Tensor, TensorData};

/// Bindings of the three worlds. `pre` owns the shared interfaces (`types`, `host`); the other
/// two reuse them, so one `Tensor` or `Request` type serves every world.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub mod bindings {
    /// World `pre`.
    pub mod pre {
        wit_bindgen::generate!({
            path: "wit",
            world: "pre",
            pub_export_macro: true,
            export_macro_name: "__export_pre_world",
            default_bindings_module: "meshserve_guest::bindings::pre",
        });
    }

    /// World `post`. (A plugin for both stages exports both worlds: the component then
    /// implements `pre-post`.)
    pub mod post {
        wit_bindgen::generate!({
            path: "wit",
            world: "post",
            pub_export_macro: true,
            export_macro_name: "__export_post_world",
            default_bindings_module: "meshserve_guest::bindings::post",
            with: {
                "meshserve:plugin/types@0.2.0": crate::bindings::pre::meshserve::plugin::types,
                "meshserve:plugin/host@0.2.0": crate::bindings::pre::meshserve::plugin::host,
            },
        });
    }
}

pub(crate) use bindings::pre::meshserve::plugin::host as wit_host;
#[doc(hidden)]
pub use bindings::pre::meshserve::plugin::types as wit;

/// The request a pre-processing plugin receives. Every accessor asks the node, so read what you
/// need once.
pub struct Request<'a> {
    inner: &'a wit::Request,
}

impl Request<'_> {
    /// The endpoint called.
    pub fn endpoint(&self) -> String {
        self.inner.endpoint()
    }

    /// The request's Content-Type ("" when absent).
    pub fn content_type(&self) -> String {
        self.inner.content_type()
    }

    /// The first value of header `name`, if the endpoint lets this plugin see it.
    pub fn header(&self, name: &str) -> Option<String> {
        self.inner.header(name)
    }

    /// Every header this plugin may see, names in lower case.
    pub fn headers(&self) -> Vec<(String, String)> {
        self.inner.headers()
    }

    /// The body as sent.
    pub fn body(&self) -> Vec<u8> {
        self.inner.body()
    }

    /// Parses the body as JSON; a malformed body becomes a 400 naming the problem.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.body())
            .map_err(|e| Error::bad_request(format!("malformed JSON body: {e}")))
    }
}

/// What a post-processing plugin knows about the request it answers.
pub struct Context<'a> {
    inner: &'a wit::Context,
}

impl Context<'_> {
    /// The endpoint called.
    pub fn endpoint(&self) -> String {
        self.inner.endpoint()
    }

    /// The model that ran.
    pub fn model(&self) -> String {
        self.inner.model()
    }

    /// The request's Content-Type ("" when absent).
    pub fn content_type(&self) -> String {
        self.inner.content_type()
    }

    /// The first value of request header `name`, if the endpoint lets this plugin see it.
    pub fn header(&self, name: &str) -> Option<String> {
        self.inner.header(name)
    }

    /// Every request header this plugin may see.
    pub fn headers(&self) -> Vec<(String, String)> {
        self.inner.headers()
    }
}

/// A finished HTTP answer: status, headers and body, sent to the client as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// 200 to 599.
    pub status: u16,
    /// Extra headers (not framing headers, nor `server-timing` or `meshserve-*`).
    pub headers: Vec<(String, String)>,
    /// The Content-Type.
    pub content_type: String,
    /// The body.
    pub body: Vec<u8>,
}

impl Reply {
    /// A 200 JSON reply.
    pub fn json<T: serde::Serialize>(value: &T) -> Result<Reply, Error> {
        let body = serde_json::to_vec(value)
            .map_err(|e| Error::internal(format!("cannot encode the answer: {e}")))?;
        Ok(Reply {
            status: 200,
            headers: Vec::new(),
            content_type: "application/json".into(),
            body,
        })
    }

    /// The same reply with another status.
    pub fn with_status(mut self, status: u16) -> Reply {
        self.status = status;
        self
    }

    /// The same reply with one more header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }

    fn into_wit(self) -> wit::Reply {
        wit::Reply {
            status: self.status,
            headers: self.headers,
            content_type: self.content_type,
            body: self.body,
        }
    }
}

/// What pre-processing decided.
#[derive(Debug, Clone)]
pub enum Pre {
    /// Run the model on these input tensors.
    Infer(Vec<Tensor>),
    /// Answer now, without running the model.
    Reply(Reply),
}

impl From<Vec<Tensor>> for Pre {
    fn from(tensors: Vec<Tensor>) -> Pre {
        Pre::Infer(tensors)
    }
}

/// Post-processing's answer.
#[derive(Debug, Clone)]
pub enum Answer {
    /// Tensors, which the node encodes as an Open Inference Protocol response.
    Tensors(Vec<Tensor>),
    /// A finished reply.
    Reply(Reply),
}

impl Answer {
    /// A 200 JSON body.
    pub fn json<T: serde::Serialize>(value: &T) -> Result<Answer, Error> {
        Reply::json(value).map(Answer::Reply)
    }
}

/// A failure the plugin reports: a status (4xx when the client's input is at fault) and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// The HTTP status to answer with.
    pub status: u16,
    /// The message, sent to the client as `{"error": ...}` for a 4xx.
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

    fn into_wit(self) -> wit::PluginError {
        wit::PluginError {
            status: self.status,
            message: self.message,
        }
    }
}

/// A meshserve plugin: made once per instance from the endpoint's config string.
pub trait Plugin: Sized + 'static {
    /// Parses `config` (the endpoint's `config` string for this plugin). [`config_json`] does
    /// it for JSON configs.
    fn init(config: &str) -> Result<Self, Error>;
}

/// The pre stage: a request to the model's input tensors, or a direct reply.
pub trait Preprocess: Plugin {
    /// Handles one request.
    fn preprocess(&mut self, request: &Request) -> Result<Pre, Error>;
}

/// The post stage: the model's output tensors to the answer.
pub trait Postprocess: Plugin {
    /// Handles one answer.
    fn postprocess(&mut self, context: &Context, outputs: Vec<Tensor>) -> Result<Answer, Error>;
}

/// Parses a JSON config string; an empty string reads as `{}`, so a type whose fields all have
/// serde defaults needs no config at all. A bad config is a 500 naming the problem.
pub fn config_json<T: serde::de::DeserializeOwned>(config: &str) -> Result<T, Error> {
    let text = if config.trim().is_empty() {
        "{}"
    } else {
        config
    };
    serde_json::from_str(text).map_err(|e| Error::internal(format!("invalid plugin config: {e}")))
}

/// What the node offers beyond WASI: its log and feature lookups. (Time is WASI's:
/// `std::time::Instant` works.)
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

/// Where an instance keeps its plugin value between calls (one per instance; wasm has one thread).
#[doc(hidden)]
pub type Slot<P> = std::thread::LocalKey<std::cell::RefCell<Option<P>>>;

fn with_plugin<P: Plugin, R>(
    slot: &'static Slot<P>,
    run: impl FnOnce(&mut P) -> Result<R, Error>,
) -> Result<R, wit::PluginError> {
    slot.with_borrow_mut(|plugin| match plugin {
        Some(plugin) => run(plugin),
        None => Err(Error::internal("the plugin was called before init")),
    })
    .map_err(Error::into_wit)
}

#[doc(hidden)]
pub fn __init<P: Plugin>(slot: &'static Slot<P>, config: String) -> Result<(), wit::PluginError> {
    let plugin = P::init(&config).map_err(Error::into_wit)?;
    slot.set(Some(plugin));
    Ok(())
}

#[doc(hidden)]
pub fn __preprocess<P: Preprocess>(
    slot: &'static Slot<P>,
    request: &wit::Request,
) -> Result<wit::PreOutcome, wit::PluginError> {
    with_plugin(slot, |plugin| {
        plugin.preprocess(&Request { inner: request })
    })
    .map(|pre| match pre {
        Pre::Infer(tensors) => {
            wit::PreOutcome::Infer(tensors.into_iter().map(Tensor::into_wit).collect())
        }
        Pre::Reply(reply) => wit::PreOutcome::Reply(reply.into_wit()),
    })
}

#[doc(hidden)]
pub fn __postprocess<P: Postprocess>(
    slot: &'static Slot<P>,
    context: &wit::Context,
    outputs: Vec<wit::Tensor>,
) -> Result<wit::PostOutcome, wit::PluginError> {
    let outputs = outputs.into_iter().map(Tensor::from_wit).collect();
    with_plugin(slot, |plugin| {
        plugin.postprocess(&Context { inner: context }, outputs)
    })
    .map(|answer| match answer {
        Answer::Tensors(tensors) => {
            wit::PostOutcome::Tensors(tensors.into_iter().map(Tensor::into_wit).collect())
        }
        Answer::Reply(reply) => wit::PostOutcome::Reply(reply.into_wit()),
    })
}

/// Exports `$plugin` for the stages named: `export_plugin!(MyPlugin: pre)`, `(MyPlugin: post)`
/// or `(MyPlugin: pre, post)`. The type implements [`Plugin`] and the stages' traits.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty: $($stage:ident),+) => {
        ::std::thread_local! {
            static __MESHSERVE_PLUGIN: ::core::cell::RefCell<::core::option::Option<$plugin>> =
                const { ::core::cell::RefCell::new(::core::option::Option::None) };
        }

        struct __MeshserveExport;

        $( $crate::__export_stage!($plugin, $stage); )+
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __export_stage {
    ($plugin:ty, pre) => {
        impl $crate::bindings::pre::exports::meshserve::plugin::preprocess::Guest for __MeshserveExport {
            fn init(config: ::std::string::String) -> ::core::result::Result<(), $crate::wit::PluginError> {
                $crate::__init::<$plugin>(&__MESHSERVE_PLUGIN, config)
            }

            fn handle(
                request: &$crate::wit::Request,
            ) -> ::core::result::Result<$crate::wit::PreOutcome, $crate::wit::PluginError> {
                $crate::__preprocess::<$plugin>(&__MESHSERVE_PLUGIN, request)
            }
        }

        $crate::bindings::pre::__export_pre_world!(__MeshserveExport with_types_in $crate::bindings::pre);
    };
    ($plugin:ty, post) => {
        impl $crate::bindings::post::exports::meshserve::plugin::postprocess::Guest for __MeshserveExport {
            fn init(config: ::std::string::String) -> ::core::result::Result<(), $crate::wit::PluginError> {
                $crate::__init::<$plugin>(&__MESHSERVE_PLUGIN, config)
            }

            fn handle(
                context: &$crate::wit::Context,
                outputs: ::std::vec::Vec<$crate::wit::Tensor>,
            ) -> ::core::result::Result<$crate::wit::PostOutcome, $crate::wit::PluginError> {
                $crate::__postprocess::<$plugin>(&__MESHSERVE_PLUGIN, context, outputs)
            }
        }

        $crate::bindings::post::__export_post_world!(__MeshserveExport with_types_in $crate::bindings::post);
    };
}
