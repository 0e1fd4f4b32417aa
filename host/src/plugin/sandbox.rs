//! The state of one plugin instance as its guest sees it, and every host function it may call,
//! each bounded: memory (per instance and node-wide), running time, WASI randomness, log volume,
//! lookup sizes, and the stderr kept to explain a panic.
//!
//! What a guest is granted (the code that makes docs/plugins.md's table true):
//! - `meshserve:plugin/host`: `log` (cut, escaped, rate-limited) and `lookup` (bounded keys);
//! - the request or context resource of the current call, with only the headers its config lists;
//! - WASI clocks (monotonic and wall) and random (at most `limits.random_bytes` per call);
//! - WASI stdout (discarded), stderr (the first few KiB of each call kept for error reports),
//!   an empty stdin, no arguments;
//! - nothing else unless granted: no environment, no directories, and sockets and name lookups
//!   are always refused.

use crate::metrics::Metrics;
use crate::plugin::bindings::{self, LogLevel};
use crate::plugin::clock::RunningClock;
use crate::plugin::features::TableScope;
use crate::plugin::limits::{PluginLimits, clean_log_message};
use crate::plugin::memory::MemoryBudget;
use crate::plugin::random::RandomBudget;
use crate::plugin::stdio::StderrCapture;
use crate::plugin::stopped::Stopped;
use crate::plugin::views::{ContextView, RequestView, first_header};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wasmtime::component::{Resource, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// The log lines one plugin may still write: a token bucket shared by all its instances.
pub(crate) struct LogBucket {
    tokens: f64,
    refilled_at: Instant,
    dropped: u64,
    reported_at: Instant,
}

impl LogBucket {
    fn new(burst: u32) -> LogBucket {
        let now = Instant::now();
        LogBucket {
            tokens: f64::from(burst),
            refilled_at: now,
            dropped: 0,
            reported_at: now,
        }
    }
}

/// What every instance of one loaded plugin shares.
pub struct PluginShared {
    pub(crate) name: Arc<str>,
    pub(crate) limits: PluginLimits,
    pub(crate) tables: TableScope,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) log: Mutex<LogBucket>,
    pub(crate) log_dropped: AtomicU64,
    /// The request headers its entry grants (`headers`), to tell an author who asks for
    /// another one why it reads as absent.
    granted_headers: Vec<String>,
    /// Whether that was said already: once per loaded version.
    told_of_ungranted_header: AtomicBool,
}

impl PluginShared {
    pub(crate) fn new(
        name: Arc<str>,
        limits: PluginLimits,
        tables: TableScope,
        metrics: Arc<Metrics>,
        granted_headers: Vec<String>,
    ) -> PluginShared {
        PluginShared {
            log: Mutex::new(LogBucket::new(limits.log_burst)),
            name,
            limits,
            tables,
            metrics,
            log_dropped: AtomicU64::new(0),
            granted_headers,
            told_of_ungranted_header: AtomicBool::new(false),
        }
    }

    /// Says in the log, once per loaded version, that the plugin asked for a request header
    /// its entry does not grant: it reads as absent, and the author would otherwise look for
    /// the fault in their own code.
    fn asked_for_header(&self, name: &str) {
        let granted = self
            .granted_headers
            .iter()
            .any(|h| h.eq_ignore_ascii_case(name));
        if granted || self.told_of_ungranted_header.swap(true, Ordering::Relaxed) {
            return;
        }
        let header = clean_log_message(name, HEADER_NAME_LOGGED_BYTES);
        tracing::warn!(
            plugin = &*self.name,
            header,
            "the plugin asked for a request header its entry does not grant, so it reads as absent; add it to `headers = [...]` in the plugin's entry to grant it (said once per plugin version)"
        );
    }

    /// Takes one log line from the bucket. When lines were dropped, at most once a second it
    /// also returns how many, for one summary line.
    fn admit_log_line(&self) -> (bool, Option<u64>) {
        let mut bucket = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let rate = f64::from(self.limits.log_lines_per_second);
        let elapsed = now
            .saturating_duration_since(bucket.refilled_at)
            .as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(f64::from(self.limits.log_burst));
        bucket.refilled_at = now;
        let admitted = bucket.tokens >= 1.0;
        if admitted {
            bucket.tokens -= 1.0;
        } else {
            bucket.dropped += 1;
        }
        let report = if bucket.dropped > 0
            && now.saturating_duration_since(bucket.reported_at) >= Duration::from_secs(1)
        {
            bucket.reported_at = now;
            Some(std::mem::take(&mut bucket.dropped))
        } else {
            None
        };
        (admitted, report)
    }

    /// Whether one more line about this plugin may enter the node's log: the plugin's own log
    /// calls and the node's lines about its failures share one rate limit, so a plugin that
    /// fails on every request cannot flood the log either. A dropped line is counted.
    pub(crate) fn admit_line(&self) -> bool {
        let (admitted, dropped) = self.admit_log_line();
        let plugin = &*self.name;
        if let Some(dropped) = dropped {
            tracing::warn!(
                plugin,
                dropped,
                "plugin log lines dropped by its rate limit"
            );
        }
        if !admitted {
            self.log_dropped.fetch_add(1, Ordering::Relaxed);
            self.metrics.record_plugin_log_dropped(plugin);
        }
        admitted
    }

    /// Text from the guest (a message, its stderr, a trap naming its functions) as it may
    /// enter the log: cut to `log_message_bytes`, control characters escaped.
    pub(crate) fn loggable(&self, text: &str) -> String {
        clean_log_message(text, self.limits.log_message_bytes)
    }
}

/// The most of a header name a guest asked for that enters the log.
const HEADER_NAME_LOGGED_BYTES: usize = 128;

/// The store data of one plugin instance.
pub struct CallState {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) memory: MemoryBudget,
    pub(crate) random: RandomBudget,
    pub(crate) shared: Arc<PluginShared>,
    pub(crate) clock: Arc<RunningClock>,
    pub(crate) stderr: StderrCapture,
}

impl CallState {
    pub(crate) fn new(
        wasi: WasiCtx,
        memory: MemoryBudget,
        shared: Arc<PluginShared>,
        stderr: StderrCapture,
    ) -> CallState {
        CallState {
            wasi,
            table: ResourceTable::new(),
            memory,
            random: RandomBudget::new(shared.limits.random_bytes),
            shared,
            clock: Arc::new(RunningClock::new(Duration::MAX)),
            stderr,
        }
    }

    /// Resets what one call may spend: a fresh running-time budget and randomness allowance,
    /// and an empty stderr.
    pub(crate) fn begin_call(&mut self, deadline: Duration) {
        self.clock = Arc::new(RunningClock::new(deadline));
        self.random.reset();
        self.stderr.clear();
    }

    fn too_long(what: &str, len: usize, limit: usize) -> wasmtime::Error {
        wasmtime::Error::new(Stopped::new(
            "limit",
            format!("passed a {what} of {len} bytes; the limit is {limit}"),
        ))
    }
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl bindings::TypesHost for CallState {}

impl bindings::HostRequest for CallState {
    fn endpoint(&mut self, this: Resource<RequestView>) -> wasmtime::Result<String> {
        Ok(self.table.get(&this)?.endpoint.to_string())
    }

    fn content_type(&mut self, this: Resource<RequestView>) -> wasmtime::Result<String> {
        Ok(self.table.get(&this)?.content_type.clone())
    }

    fn header(
        &mut self,
        this: Resource<RequestView>,
        name: String,
    ) -> wasmtime::Result<Option<String>> {
        self.shared.asked_for_header(&name);
        Ok(first_header(&self.table.get(&this)?.headers, &name))
    }

    fn headers(&mut self, this: Resource<RequestView>) -> wasmtime::Result<Vec<(String, String)>> {
        Ok(self.table.get(&this)?.headers.clone())
    }

    fn body(&mut self, this: Resource<RequestView>) -> wasmtime::Result<Vec<u8>> {
        Ok(self.table.get(&this)?.body.to_vec())
    }

    fn drop(&mut self, this: Resource<RequestView>) -> wasmtime::Result<()> {
        self.table.delete(this)?;
        Ok(())
    }
}

impl bindings::HostContext for CallState {
    fn endpoint(&mut self, this: Resource<ContextView>) -> wasmtime::Result<String> {
        Ok(self.table.get(&this)?.endpoint.to_string())
    }

    fn model(&mut self, this: Resource<ContextView>) -> wasmtime::Result<String> {
        Ok(self.table.get(&this)?.model.clone())
    }

    fn content_type(&mut self, this: Resource<ContextView>) -> wasmtime::Result<String> {
        Ok(self.table.get(&this)?.content_type.clone())
    }

    fn header(
        &mut self,
        this: Resource<ContextView>,
        name: String,
    ) -> wasmtime::Result<Option<String>> {
        self.shared.asked_for_header(&name);
        Ok(first_header(&self.table.get(&this)?.headers, &name))
    }

    fn headers(&mut self, this: Resource<ContextView>) -> wasmtime::Result<Vec<(String, String)>> {
        Ok(self.table.get(&this)?.headers.clone())
    }

    fn drop(&mut self, this: Resource<ContextView>) -> wasmtime::Result<()> {
        self.table.delete(this)?;
        Ok(())
    }
}

impl bindings::Host for CallState {
    fn log(&mut self, level: LogLevel, message: String) -> wasmtime::Result<()> {
        let shared = &self.shared;
        if !shared.admit_line() {
            return Ok(());
        }
        let plugin = &*shared.name;
        let message = shared.loggable(&message);
        match level {
            LogLevel::Trace => tracing::trace!(plugin, "{message}"),
            LogLevel::Debug => tracing::debug!(plugin, "{message}"),
            LogLevel::Info => tracing::info!(plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(plugin, "{message}"),
            LogLevel::Error => tracing::error!(plugin, "{message}"),
        }
        Ok(())
    }

    fn lookup(&mut self, table: String, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        let limits = &self.shared.limits;
        if table.len() > limits.table_name_bytes {
            return Err(Self::too_long(
                "lookup table name",
                table.len(),
                limits.table_name_bytes,
            ));
        }
        if key.len() > limits.lookup_key_bytes {
            return Err(Self::too_long(
                "lookup key",
                key.len(),
                limits.lookup_key_bytes,
            ));
        }
        let tables = &self.shared.tables;
        let found = tables.lookup(&table, &key);
        self.shared
            .metrics
            .record_lookup(&table, found.is_some(), tables.has_table(&table));
        Ok(found.map(|b| b.to_vec()))
    }
}
