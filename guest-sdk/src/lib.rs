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

#![warn(missing_docs)]

mod tensor;
pub mod testing;

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

#[cfg(target_arch = "wasm32")]
pub(crate) use bindings::pre::meshserve::plugin::host as wit_host;
#[doc(hidden)]
pub use bindings::pre::meshserve::plugin::types as wit;

/// Where a [`Request`] or [`Context`] reads from: the node, or what a test built.
enum Source<'a, T> {
    Node(&'a T),
    Local(testing::Fields),
}

/// The request a pre-processing plugin receives. In a plugin, every accessor asks the node, so
/// read what you need once; in a test, [`testing::request`] builds one.
pub struct Request<'a> {
    inner: Source<'a, wit::Request>,
}

impl Request<'_> {
    pub(crate) fn local(fields: testing::Fields) -> Request<'static> {
        Request {
            inner: Source::Local(fields),
        }
    }

    /// The endpoint called.
    pub fn endpoint(&self) -> String {
        match &self.inner {
            Source::Node(request) => request.endpoint(),
            Source::Local(fields) => fields.endpoint.clone(),
        }
    }

    /// The request's Content-Type ("" when absent).
    pub fn content_type(&self) -> String {
        match &self.inner {
            Source::Node(request) => request.content_type(),
            Source::Local(fields) => fields.content_type.clone(),
        }
    }

    /// The first value of header `name` (case-insensitive), if the endpoint lets this plugin
    /// see it (`headers = [...]` in its entry).
    pub fn header(&self, name: &str) -> Option<String> {
        match &self.inner {
            Source::Node(request) => request.header(name),
            Source::Local(fields) => fields.header(name),
        }
    }

    /// Every header this plugin may see, names in lower case.
    pub fn headers(&self) -> Vec<(String, String)> {
        match &self.inner {
            Source::Node(request) => request.headers(),
            Source::Local(fields) => fields.headers.clone(),
        }
    }

    /// The body as sent.
    pub fn body(&self) -> Vec<u8> {
        match &self.inner {
            Source::Node(request) => request.body(),
            Source::Local(fields) => fields.body.clone(),
        }
    }

    /// Parses the body as JSON; a malformed body becomes a 400 naming the problem.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.body())
            .map_err(|e| Error::bad_request(format!("malformed JSON body: {e}")))
    }
}

/// What a post-processing plugin knows about the request it answers; in a test,
/// [`testing::context`] builds one.
pub struct Context<'a> {
    inner: Source<'a, wit::Context>,
}

impl Context<'_> {
    pub(crate) fn local(fields: testing::Fields) -> Context<'static> {
        Context {
            inner: Source::Local(fields),
        }
    }

    /// The endpoint called.
    pub fn endpoint(&self) -> String {
        match &self.inner {
            Source::Node(context) => context.endpoint(),
            Source::Local(fields) => fields.endpoint.clone(),
        }
    }

    /// The model that ran.
    pub fn model(&self) -> String {
        match &self.inner {
            Source::Node(context) => context.model(),
            Source::Local(fields) => fields.model.clone(),
        }
    }

    /// The request's Content-Type ("" when absent).
    pub fn content_type(&self) -> String {
        match &self.inner {
            Source::Node(context) => context.content_type(),
            Source::Local(fields) => fields.content_type.clone(),
        }
    }

    /// The first value of request header `name`, if the endpoint lets this plugin see it.
    pub fn header(&self, name: &str) -> Option<String> {
        match &self.inner {
            Source::Node(context) => context.header(name),
            Source::Local(fields) => fields.header(name),
        }
    }

    /// Every request header this plugin may see.
    pub fn headers(&self) -> Vec<(String, String)> {
        match &self.inner {
            Source::Node(context) => context.headers(),
            Source::Local(fields) => fields.headers.clone(),
        }
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

    /// The body parsed as JSON (for tests).
    pub fn body_json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_slice(&self.body)
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

impl Pre {
    /// The tensors to run the model on, unless this is a direct reply.
    pub fn tensors(&self) -> Option<&[Tensor]> {
        match self {
            Pre::Infer(tensors) => Some(tensors),
            Pre::Reply(_) => None,
        }
    }

    /// The direct reply, if this is one.
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            Pre::Reply(reply) => Some(reply),
            Pre::Infer(_) => None,
        }
    }
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

    /// The tensors, unless this is a finished reply.
    pub fn tensors(&self) -> Option<&[Tensor]> {
        match self {
            Answer::Tensors(tensors) => Some(tensors),
            Answer::Reply(_) => None,
        }
    }

    /// The finished reply, if this is one.
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            Answer::Reply(reply) => Some(reply),
            Answer::Tensors(_) => None,
        }
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
/// `std::time::Instant` works.) Outside WebAssembly, as in `cargo test`, [`testing`] answers
/// them instead.
pub mod host {
    use crate::testing::LogLevel;

    /// Logs at info level in the node's log, tagged with the plugin's name.
    pub fn info(message: &str) {
        backend::log(LogLevel::Info, message);
    }

    /// Logs a warning.
    pub fn warn(message: &str) {
        backend::log(LogLevel::Warn, message);
    }

    /// Logs an error.
    pub fn error(message: &str) {
        backend::log(LogLevel::Error, message);
    }

    /// Logs at debug level.
    pub fn debug(message: &str) {
        backend::log(LogLevel::Debug, message);
    }

    /// The bytes stored under `key` in the feature table `table`.
    pub fn lookup(table: &str, key: &str) -> Option<Vec<u8>> {
        backend::lookup(table, key)
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

    #[cfg(target_arch = "wasm32")]
    mod backend {
        use super::LogLevel;
        use crate::wit_host;

        pub(super) fn log(level: LogLevel, message: &str) {
            let level = match level {
                LogLevel::Trace => wit_host::LogLevel::Trace,
                LogLevel::Debug => wit_host::LogLevel::Debug,
                LogLevel::Info => wit_host::LogLevel::Info,
                LogLevel::Warn => wit_host::LogLevel::Warn,
                LogLevel::Error => wit_host::LogLevel::Error,
            };
            wit_host::log(level, message);
        }

        pub(super) fn lookup(table: &str, key: &str) -> Option<Vec<u8>> {
            wit_host::lookup(table, key)
        }
    }

    #[cfg(not(target_arch = "wasm32"))]
    mod backend {
        pub(super) use crate::testing::{log, lookup};
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
        plugin.preprocess(&Request {
            inner: Source::Node(request),
        })
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
        plugin.postprocess(
            &Context {
                inner: Source::Node(context),
            },
            outputs,
        )
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
///
/// Only a WebAssembly build exports anything; a native build (`cargo test`) only checks that
/// the type implements the stages named.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty: $($stage:ident),+) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            ::std::thread_local! {
                static __MESHSERVE_PLUGIN: ::core::cell::RefCell<::core::option::Option<$plugin>> =
                    const { ::core::cell::RefCell::new(::core::option::Option::None) };
            }

            struct __MeshserveExport;

            $( $crate::__export_stage!($plugin, $stage); )+
        };

        #[cfg(not(target_arch = "wasm32"))]
        const _: () = {
            $( $crate::__check_stage!($plugin, $stage); )+
        };
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __check_stage {
    ($plugin:ty, pre) => {
        const _: fn() = || {
            fn implements<P: $crate::Preprocess>() {}
            implements::<$plugin>();
        };
    };
    ($plugin:ty, post) => {
        const _: fn() = || {
            fn implements<P: $crate::Postprocess>() {}
            implements::<$plugin>();
        };
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
