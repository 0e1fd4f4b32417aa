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
use crate::plugin::features::TableScope;
use crate::plugin::limits::{PluginLimits, clean_log_message};
use bytes::Bytes;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};
use wasmtime::component::{Resource, ResourceTable};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{Rng, WasiCtx, WasiCtxView, WasiView};

/// Why the host stopped a call: raised from host functions, the epoch callback and the memory
/// limiter, and recognised when the trap comes back.
#[derive(Debug)]
pub struct Stopped {
    /// A short label for metrics and for the failure's class.
    pub kind: &'static str,
    /// What happened, fit for the client.
    pub message: String,
}

impl Stopped {
    pub(crate) fn new(kind: &'static str, message: impl Into<String>) -> Stopped {
        Stopped {
            kind,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Stopped {}

/// The node-wide budget of plugin linear memory, charged as memories grow and released when an
/// instance is dropped.
#[derive(Debug)]
pub struct NodeMemory {
    limit: usize,
    used: AtomicUsize,
}

impl NodeMemory {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> NodeMemory {
        NodeMemory {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_charge(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// One instance's memory: every linear memory of the component counts against one cap, and
/// against the node's budget.
pub struct MemoryBudget {
    node: Arc<NodeMemory>,
    cap: usize,
    used: usize,
}

impl MemoryBudget {
    pub(crate) fn new(node: Arc<NodeMemory>, cap: usize) -> MemoryBudget {
        MemoryBudget { node, cap, used: 0 }
    }

    /// Bytes of linear memory this instance holds.
    pub fn used(&self) -> usize {
        self.used
    }
}

impl wasmtime::ResourceLimiter for MemoryBudget {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let more = desired.saturating_sub(current);
        if self.used.saturating_add(more) > self.cap {
            return Err(wasmtime::Error::new(Stopped::new(
                "memory",
                format!("tried to grow its memory past the {} byte cap", self.cap),
            )));
        }
        if !self.node.try_charge(more) {
            return Err(wasmtime::Error::new(Stopped::new(
                "node-memory",
                "the node's plugin memory budget is spent",
            )));
        }
        self.used += more;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        _desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Table sizes are bounded by the pooling allocator's slots.
        Ok(true)
    }
}

impl Drop for MemoryBudget {
    fn drop(&mut self) {
        self.node.release(self.used);
    }
}

/// The running time of one call: time its future is being polled. Time spent yielded (waiting
/// in the async run queue, or in an async WASI call) is not the plugin's doing, so it does not
/// count against the plugin's budget: under a burst, a wall-clock deadline would fail
/// well-behaved plugins that merely waited their turn. (The wall-clock cap is separate.)
///
/// Nor is time the operating system gives other threads while the call is being polled: once
/// a call has run [`CPU_CLOCK_AFTER`], it is charged the polling thread's CPU time, so a node
/// sharing its cores with a compile or a load generator does not fail a plugin that did
/// little work. Reading that clock is a system call (about 0.4 µs here), so the short calls
/// that are nearly all of them are charged by the cheap monotonic clock; that overcharges
/// them by at most the time other threads took during their first millisecond.
pub struct RunningClock {
    budget: Duration,
    state: Mutex<ClockState>,
}

/// Running time a call is charged by the monotonic clock before the thread's CPU clock takes
/// over.
pub const CPU_CLOCK_AFTER: Duration = Duration::from_millis(1);

struct ClockState {
    used: Duration,
    /// Where the stretch of running being charged began, on the clock that charges it.
    since: Mark,
}

#[derive(Clone, Copy)]
enum Mark {
    Wall(Instant),
    ThreadCpu(Duration),
}

impl Mark {
    /// The mark for a stretch starting now, on the clock that `used` calls for.
    fn now(used: Duration) -> Mark {
        if used >= CPU_CLOCK_AFTER {
            Mark::ThreadCpu(thread_cpu_time())
        } else {
            Mark::Wall(Instant::now())
        }
    }

    /// Adds the stretch since this mark to `used`; returns the mark for the stretch that
    /// starts now.
    fn charge_into(self, used: &mut Duration) -> Mark {
        match self {
            Mark::Wall(at) => {
                *used += at.elapsed();
                Mark::now(*used)
            }
            Mark::ThreadCpu(at) => {
                let now = thread_cpu_time();
                *used += now.saturating_sub(at);
                Mark::ThreadCpu(now)
            }
        }
    }
}

/// CPU time the calling thread has used.
fn thread_cpu_time() -> Duration {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    // The kernel never reports negative CPU time; a zero is harmless either way.
    Duration::new(
        u64::try_from(now.tv_sec).unwrap_or(0),
        u32::try_from(now.tv_nsec).unwrap_or(0),
    )
}

impl RunningClock {
    pub(crate) fn new(budget: Duration) -> RunningClock {
        RunningClock {
            budget,
            state: Mutex::new(ClockState {
                used: Duration::ZERO,
                since: Mark::Wall(Instant::now()),
            }),
        }
    }

    /// Adds the running time since the last resumption or charge; true once the budget is
    /// spent. Called on the thread polling the call (the epoch callback runs there too).
    pub(crate) fn charge(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let ClockState { used, since } = &mut *state;
        *since = since.charge_into(used);
        *used >= self.budget
    }

    /// The call's future is being polled again, on the calling thread.
    pub(crate) fn resumed(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.since = Mark::now(state.used);
    }

    /// The call's future returned from a poll: what ran since the last charge counts.
    pub(crate) fn paused(&self) {
        self.charge();
    }

    /// Running time charged so far.
    pub(crate) fn used(&self) -> Duration {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).used
    }
}

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
}

impl PluginShared {
    pub(crate) fn new(
        name: Arc<str>,
        limits: PluginLimits,
        tables: TableScope,
        metrics: Arc<Metrics>,
    ) -> PluginShared {
        PluginShared {
            log: Mutex::new(LogBucket::new(limits.log_burst)),
            name,
            limits,
            tables,
            metrics,
            log_dropped: AtomicU64::new(0),
        }
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
}

/// A request as the pre stage's guest sees it (the `request` resource).
pub struct RequestView {
    pub(crate) endpoint: Arc<str>,
    pub(crate) content_type: String,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Bytes,
}

/// What the post stage's guest knows of the request (the `context` resource).
pub struct ContextView {
    pub(crate) endpoint: Arc<str>,
    pub(crate) model: String,
    pub(crate) content_type: String,
    pub(crate) headers: Vec<(String, String)>,
}

impl RequestView {
    /// A request with these (already filtered) headers.
    pub fn new(
        endpoint: &str,
        content_type: &str,
        headers: Vec<(String, String)>,
        body: Bytes,
    ) -> RequestView {
        RequestView {
            endpoint: endpoint.into(),
            content_type: content_type.to_string(),
            headers,
            body,
        }
    }
}

impl ContextView {
    /// A context with these (already filtered) headers.
    pub fn new(
        endpoint: &str,
        model: &str,
        content_type: &str,
        headers: Vec<(String, String)>,
    ) -> ContextView {
        ContextView {
            endpoint: endpoint.into(),
            model: model.to_string(),
            content_type: content_type.to_string(),
            headers,
        }
    }
}

fn first_header(headers: &[(String, String)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
}

/// The first few KiB a guest writes to stderr during one call; the rest is dropped (never a trap:
/// a chatty plugin must not fail because of its own diagnostics).
#[derive(Clone)]
pub(crate) struct StderrCapture {
    buffer: Arc<Mutex<Vec<u8>>>,
    capacity: usize,
}

impl StderrCapture {
    pub(crate) fn new(capacity: usize) -> StderrCapture {
        StderrCapture {
            buffer: Arc::new(Mutex::new(Vec::new())),
            capacity,
        }
    }

    pub(crate) fn clear(&self) {
        self.buffer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    pub(crate) fn text(&self) -> String {
        let buffer = self.buffer.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&buffer).trim().to_string()
    }

    fn append(&self, bytes: &[u8]) {
        let mut buffer = self.buffer.lock().unwrap_or_else(|p| p.into_inner());
        let room = self.capacity.saturating_sub(buffer.len());
        buffer.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
}

impl IsTerminal for StderrCapture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for StderrCapture {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn wasmtime_wasi::p2::OutputStream> {
        Box::new(self.clone())
    }
}

impl tokio::io::AsyncWrite for StderrCapture {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl wasmtime_wasi::p2::OutputStream for StderrCapture {
    fn write(&mut self, bytes: Bytes) -> wasmtime_wasi::p2::StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> wasmtime_wasi::p2::StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> wasmtime_wasi::p2::StreamResult<usize> {
        Ok(64 << 10)
    }
}

#[wasmtime_wasi::async_trait]
impl wasmtime_wasi::p2::Pollable for StderrCapture {
    async fn ready(&mut self) {}
}

/// WASI randomness, counted per call.
pub struct RandomBudget {
    cap: u64,
    used: u64,
    rng: Box<dyn Rng + Send>,
}

impl RandomBudget {
    fn new(cap: u64) -> RandomBudget {
        RandomBudget {
            cap,
            used: 0,
            rng: wasmtime_wasi::thread_rng(),
        }
    }

    fn draw(&mut self, bytes: u64) -> wasmtime::Result<()> {
        self.used = self.used.saturating_add(bytes);
        if self.used > self.cap {
            return Err(wasmtime::Error::new(Stopped::new(
                "limit",
                format!(
                    "drew more than {} bytes of randomness in one call",
                    self.cap
                ),
            )));
        }
        Ok(())
    }

    fn bytes(&mut self, len: u64) -> wasmtime::Result<Vec<u8>> {
        self.draw(len)?;
        let mut out = vec![0; usize::try_from(len)?];
        self.rng.fill_bytes(&mut out);
        Ok(out)
    }
}

impl wasmtime_wasi::p2::bindings::random::random::Host for RandomBudget {
    fn get_random_bytes(&mut self, len: u64) -> wasmtime::Result<Vec<u8>> {
        self.bytes(len)
    }

    fn get_random_u64(&mut self) -> wasmtime::Result<u64> {
        self.draw(8)?;
        Ok(self.rng.next_u64())
    }
}

impl wasmtime_wasi::p2::bindings::random::insecure::Host for RandomBudget {
    fn get_insecure_random_bytes(&mut self, len: u64) -> wasmtime::Result<Vec<u8>> {
        self.bytes(len)
    }

    fn get_insecure_random_u64(&mut self) -> wasmtime::Result<u64> {
        self.draw(8)?;
        Ok(self.rng.next_u64())
    }
}

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
        self.random.used = 0;
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
        let (admitted, dropped) = shared.admit_log_line();
        let plugin = &*shared.name;
        if let Some(dropped) = dropped {
            tracing::warn!(
                plugin,
                dropped,
                "plugin log lines dropped by its rate limit"
            );
        }
        if !admitted {
            shared.log_dropped.fetch_add(1, Ordering::Relaxed);
            shared.metrics.record_plugin_log_dropped(plugin);
            return Ok(());
        }
        let message = clean_log_message(&message, shared.limits.log_message_bytes);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Keeps the thread busy until `clock` says `busy_for` has passed on it.
    fn spin(busy_for: Duration, clock: impl Fn() -> Duration) {
        let start = clock();
        while clock().saturating_sub(start) < busy_for {
            std::hint::spin_loop();
        }
    }

    #[test]
    fn a_long_call_is_charged_the_cpu_time_it_used_not_the_time_its_thread_was_descheduled() {
        let budget = Duration::from_millis(20);
        let clock = RunningClock::new(budget);
        let started = Instant::now();
        clock.resumed();
        spin(CPU_CLOCK_AFTER * 2, || started.elapsed());
        assert!(!clock.charge());
        // Off the CPU in the middle of a poll, as when the OS runs other threads.
        std::thread::sleep(budget * 2);
        assert!(!clock.charge(), "charged {:?}", clock.used());
        assert!(clock.used() < budget, "charged {:?}", clock.used());
        // Work it does itself still counts: a runaway call is stopped.
        spin(budget, thread_cpu_time);
        assert!(clock.charge(), "charged {:?}", clock.used());
    }

    #[test]
    fn the_node_budget_refuses_growth_past_its_limit_and_takes_back_what_instances_release() {
        let node = Arc::new(NodeMemory::new(100));
        let mut a = MemoryBudget::new(node.clone(), 80);
        let mut b = MemoryBudget::new(node.clone(), 80);
        use wasmtime::ResourceLimiter;
        assert!(a.memory_growing(0, 60, None).unwrap());
        // b's own cap allows 50 more, the node does not.
        let err = b.memory_growing(0, 50, None).unwrap_err();
        assert_eq!(err.downcast_ref::<Stopped>().unwrap().kind, "node-memory");
        // a's cap counts every memory of the instance together.
        let err = a.memory_growing(0, 30, None).unwrap_err();
        assert_eq!(err.downcast_ref::<Stopped>().unwrap().kind, "memory");
        drop(a);
        assert_eq!(node.used(), 0);
        assert!(b.memory_growing(0, 50, None).unwrap());
        assert_eq!(node.used(), 50);
    }

    #[test]
    fn randomness_is_counted_per_call_and_refused_past_the_cap() {
        let mut random = RandomBudget::new(64);
        assert_eq!(random.bytes(32).unwrap().len(), 32);
        assert!(random.bytes(32).is_ok());
        let err = random.bytes(1).unwrap_err();
        assert!(err.to_string().contains("more than 64 bytes"), "{err}");
        random.used = 0;
        assert!(random.bytes(64).is_ok());
    }
}
