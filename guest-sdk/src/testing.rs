//! Testing a plugin natively, with `cargo test`, without a node.
//!
//! Outside WebAssembly the host functions are answered here instead of by a node: [`host`]
//! lookups read the tables a test put in with [`put_table`] or [`put_table_f32`], and log lines
//! are kept for [`take_logs`]. [`request`] and [`context`] build what a stage receives.
//! Everything is per thread, and `cargo test` runs each test on a thread of its own, so tests
//! do not see each other's tables or logs.
//!
//! ```
//! use meshserve_guest::testing;
//! use meshserve_guest::{Error, Plugin, Pre, Preprocess, Request, Tensor, host};
//!
//! struct Card;
//!
//! impl Plugin for Card {
//!     fn init(_config: &str) -> Result<Self, Error> {
//!         Ok(Card)
//!     }
//! }
//!
//! impl Preprocess for Card {
//!     fn preprocess(&mut self, request: &Request) -> Result<Pre, Error> {
//!         let card = request.header("x-card").unwrap_or_default();
//!         let history = host::lookup_f32("cards", &card).unwrap_or_default();
//!         host::info(&format!("card {card}: {} values", history.len()));
//!         Ok(vec![Tensor::fp32("history", vec![1, history.len() as i64], history)].into())
//!     }
//! }
//!
//! testing::put_table_f32("cards", "c1", &[0.5, 2.0]);
//! let request = testing::request().header("X-Card", "c1").build();
//! let pre = Card::init("").unwrap().preprocess(&request).unwrap();
//! assert_eq!(pre.tensors().unwrap()[0].as_f32(), Some(&[0.5, 2.0][..]));
//! assert_eq!(testing::take_logs(), vec![(testing::LogLevel::Info, "card c1: 2 values".to_string())]);
//! ```
//!
//! [`host`]: crate::host

use crate::{Context, Request};
use std::cell::RefCell;
use std::collections::HashMap;

/// A log line's level, as the node logs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogLevel {
    /// `host::trace` (only the WIT has it).
    Trace,
    /// `host::debug`.
    Debug,
    /// `host::info`.
    Info,
    /// `host::warn`.
    Warn,
    /// `host::error`.
    Error,
}

#[derive(Default)]
struct Stubs {
    tables: HashMap<String, HashMap<String, Vec<u8>>>,
    logs: Vec<(LogLevel, String)>,
}

thread_local! {
    static STUBS: RefCell<Stubs> = RefCell::new(Stubs::default());
}

/// Stores `value` under `key` in table `table`, for `host::lookup` on this thread.
pub fn put_table(table: &str, key: &str, value: impl Into<Vec<u8>>) {
    STUBS.with_borrow_mut(|stubs| {
        stubs
            .tables
            .entry(table.to_string())
            .or_default()
            .insert(key.to_string(), value.into());
    });
}

/// Stores f32 values as the node's tables do (little-endian), for `host::lookup_f32`.
pub fn put_table_f32(table: &str, key: &str, values: &[f32]) {
    put_table(
        table,
        key,
        values
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>(),
    );
}

/// Every line logged on this thread since the last call, oldest first.
pub fn take_logs() -> Vec<(LogLevel, String)> {
    STUBS.with_borrow_mut(|stubs| std::mem::take(&mut stubs.logs))
}

/// Forgets this thread's tables and logs.
pub fn reset() {
    STUBS.with_borrow_mut(|stubs| *stubs = Stubs::default());
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn log(level: LogLevel, message: &str) {
    STUBS.with_borrow_mut(|stubs| stubs.logs.push((level, message.to_string())));
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn lookup(table: &str, key: &str) -> Option<Vec<u8>> {
    STUBS.with_borrow(|stubs| stubs.tables.get(table)?.get(key).cloned())
}

/// What a built request or context holds. Header names are kept in lower case, as the node
/// gives them; in a test every header is granted.
#[derive(Debug, Clone, Default)]
pub(crate) struct Fields {
    pub(crate) endpoint: String,
    pub(crate) model: String,
    pub(crate) content_type: String,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Fields {
    pub(crate) fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }
}

/// A request for a pre stage: endpoint `test`, Content-Type `application/json`, no headers and
/// an empty body until set.
pub fn request() -> RequestBuilder {
    RequestBuilder(Fields {
        endpoint: "test".into(),
        content_type: "application/json".into(),
        ..Fields::default()
    })
}

/// A context for a post stage: endpoint and model `test`, Content-Type `application/json`,
/// no headers until set.
pub fn context() -> ContextBuilder {
    ContextBuilder(Fields {
        endpoint: "test".into(),
        model: "test".into(),
        content_type: "application/json".into(),
        ..Fields::default()
    })
}

/// The setters a request and a context share.
macro_rules! shared_setters {
    () => {
        /// The endpoint called.
        pub fn endpoint(mut self, name: impl Into<String>) -> Self {
            self.0.endpoint = name.into();
            self
        }

        /// The request's Content-Type.
        pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
            self.0.content_type = content_type.into();
            self
        }

        /// One more request header.
        pub fn header(mut self, name: &str, value: impl Into<String>) -> Self {
            self.0
                .headers
                .push((name.to_ascii_lowercase(), value.into()));
            self
        }
    };
}

/// Builds a [`Request`]; see [`request`].
#[derive(Debug, Clone)]
pub struct RequestBuilder(Fields);

impl RequestBuilder {
    shared_setters!();

    /// The body, as sent.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.0.body = body.into();
        self
    }

    /// The body as JSON (Content-Type `application/json`).
    pub fn json(self, value: &serde_json::Value) -> Self {
        self.content_type("application/json")
            .body(value.to_string())
    }

    /// The request.
    pub fn build(self) -> Request<'static> {
        Request::local(self.0)
    }
}

/// Builds a [`Context`]; see [`context`].
#[derive(Debug, Clone)]
pub struct ContextBuilder(Fields);

impl ContextBuilder {
    shared_setters!();

    /// The model that ran.
    pub fn model(mut self, name: impl Into<String>) -> Self {
        self.0.model = name.into();
        self
    }

    /// The context.
    pub fn build(self) -> Context<'static> {
        Context::local(self.0)
    }
}
