//! One loaded plugin and its calls. Every call gets a fresh `Store` with its own WASI context
//! (nothing granted unless the spec says so), memory cap, deadline and optional fuel; a trap
//! ends that call only.

use crate::metrics::Metrics;
use crate::plugin::bindings::{
    self, Answer, Context, LogLevel, Request, WitPluginError, tensor_from_plugin,
};
use crate::plugin::features::FeatureTables;
use crate::plugin::runtime::PluginRuntime;
use crate::tensor::Tensor;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use wasmtime::component::ResourceTable;
use wasmtime::{Store, StoreLimits, StoreLimitsBuilder, UpdateDeadline};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};

/// A directory a plugin may read (or write) through WASI.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DirGrant {
    /// The directory on the node.
    pub host: PathBuf,
    /// Where the plugin sees it.
    pub guest: String,
    /// Whether the plugin may write.
    #[serde(default)]
    pub writable: bool,
}

/// A plugin as an endpoint's config names it, with its sandbox.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginSpec {
    /// The component file (`.wasm`, built for wasm32-wasip2).
    pub path: PathBuf,
    /// The string the plugin reads through the `config` import.
    #[serde(default)]
    pub config: String,
    /// Running-time limit per call, in ms: time the plugin spends executing (instantiation
    /// included), not time it waits for a thread while the node is busy.
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
    /// Linear-memory cap per call, in bytes.
    #[serde(default = "default_memory_bytes")]
    pub memory_bytes: usize,
    /// Fuel budget per call (needs `plugins.fuel = true`); `None` means unmetered.
    #[serde(default)]
    pub fuel: Option<u64>,
    /// Directories granted; none by default.
    #[serde(default)]
    pub dirs: Vec<DirGrant>,
    /// Environment variables granted; none by default.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

fn default_deadline_ms() -> u64 {
    50
}

fn default_memory_bytes() -> usize {
    64 << 20
}

/// Why a plugin call failed.
#[derive(Debug, thiserror::Error)]
pub enum PluginFailure {
    /// The plugin itself rejected the input, with its own status and message.
    #[error("plugin '{plugin}' rejected the request: {message}")]
    Rejected {
        /// The plugin.
        plugin: String,
        /// The status it chose.
        status: u16,
        /// Its message.
        message: String,
    },
    /// The plugin broke: trap, panic, deadline, memory cap, fuel, or bad output.
    #[error("plugin '{plugin}' failed: {cause}")]
    Failed {
        /// The plugin.
        plugin: String,
        /// What happened, for the operator and the client.
        cause: String,
        /// A short label for metrics: deadline, memory, fuel, trap, output, busy.
        kind: &'static str,
    },
}

/// The per-call state a plugin's host imports see.
pub struct CallState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    plugin: Arc<str>,
    config: Arc<str>,
    features: Arc<FeatureTables>,
    metrics: Arc<Metrics>,
    clock: Arc<RunningClock>,
}

/// The running time of one call. Time spent yielded (waiting in the async run queue) is not
/// the plugin's doing, so it does not count against the plugin's budget: under a burst, a
/// wall-clock deadline would fail well-behaved plugins that merely waited their turn.
struct RunningClock {
    budget: Duration,
    state: Mutex<ClockState>,
}

struct ClockState {
    used: Duration,
    resumed_at: Instant,
}

impl RunningClock {
    fn new(budget: Duration) -> RunningClock {
        RunningClock {
            budget,
            state: Mutex::new(ClockState {
                used: Duration::ZERO,
                resumed_at: Instant::now(),
            }),
        }
    }

    /// Adds the time since the last resumption; true once the budget is spent.
    fn charge(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let ran = now.saturating_duration_since(state.resumed_at);
        state.used += ran;
        state.resumed_at = now;
        state.used >= self.budget
    }

    fn resumed(&self) {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .resumed_at = Instant::now();
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

fn process_start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

impl bindings::Host for CallState {
    fn log(&mut self, level: LogLevel, message: String) {
        let plugin = &*self.plugin;
        match level {
            LogLevel::Trace => tracing::trace!(plugin, "{message}"),
            LogLevel::Debug => tracing::debug!(plugin, "{message}"),
            LogLevel::Info => tracing::info!(plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(plugin, "{message}"),
            LogLevel::Error => tracing::error!(plugin, "{message}"),
        }
    }

    fn monotonic_now(&mut self) -> u64 {
        process_start().elapsed().as_nanos() as u64
    }

    fn config(&mut self) -> String {
        self.config.to_string()
    }

    fn lookup(&mut self, table: String, key: String) -> Option<Vec<u8>> {
        let found = self.features.lookup(&table, &key);
        self.metrics
            .record_lookup(&table, found.is_some(), self.features.has_table(&table));
        found.map(|b| b.to_vec())
    }
}

/// Raised by the epoch callback when a call runs past its deadline.
#[derive(Debug)]
struct DeadlineExceeded;

impl std::fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("deadline exceeded")
    }
}

impl std::error::Error for DeadlineExceeded {}

/// A plugin ready to be called: compiled, linked, and pre-instantiated.
pub struct LoadedPlugin {
    name: Arc<str>,
    digest: String,
    pre: bindings::PluginPre<CallState>,
    spec: PluginSpec,
    config: Arc<str>,
    runtime: Arc<PluginRuntime>,
}

/// Stderr kept per call, to quote a panic message in the error.
const STDERR_CAPTURE_BYTES: usize = 4096;

impl LoadedPlugin {
    pub(crate) fn new(
        name: &str,
        digest: String,
        pre: bindings::PluginPre<CallState>,
        spec: PluginSpec,
        runtime: Arc<PluginRuntime>,
    ) -> LoadedPlugin {
        LoadedPlugin {
            name: name.into(),
            config: spec.config.as_str().into(),
            digest,
            pre,
            spec,
            runtime,
        }
    }

    /// The plugin's name (its file stem unless configured).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// SHA-256 of the component file this was compiled from.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The spec it was loaded from.
    pub fn spec(&self) -> &PluginSpec {
        &self.spec
    }

    fn store(&self) -> Result<(Store<CallState>, MemoryOutputPipe), PluginFailure> {
        let stderr = MemoryOutputPipe::new(STDERR_CAPTURE_BYTES);
        let mut wasi = WasiCtx::builder();
        wasi.stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        for (key, value) in &self.spec.env {
            wasi.env(key, value);
        }
        for grant in &self.spec.dirs {
            let perms = if grant.writable {
                FsPerms::ReadWrite
            } else {
                FsPerms::ReadOnly
            };
            wasi.preopened_dir(&grant.host, &grant.guest, perms)
                .map_err(|e| {
                    self.failed(
                        "grant",
                        format!(
                            "cannot open granted directory {}: {e}",
                            grant.host.display()
                        ),
                    )
                })?;
        }
        let state = CallState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(self.spec.memory_bytes)
                .trap_on_grow_failure(true)
                .build(),
            plugin: self.name.clone(),
            config: self.config.clone(),
            features: self.runtime.features.clone(),
            metrics: self.runtime.metrics.clone(),
            clock: Arc::new(RunningClock::new(Duration::from_millis(
                self.spec.deadline_ms,
            ))),
        };
        let mut store = Store::new(&self.runtime.engine, state);
        store.limiter(|state| &mut state.limits);
        // Charge the running clock every tick and yield the thread in between: a runaway
        // plugin shares its worker thread with other requests until its budget traps it.
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|context| {
            let clock = context.data().clock.clone();
            if clock.charge() {
                return Err(wasmtime::Error::new(DeadlineExceeded));
            }
            // tokio's own yield goes to the back of the run queue; a plain wake would let the
            // runaway task be polled again first.
            Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(async move {
                    tokio::task::yield_now().await;
                    clock.resumed();
                }),
            ))
        });
        if self.runtime.config.fuel {
            store
                .set_fuel(self.spec.fuel.unwrap_or(u64::MAX))
                .map_err(|e| self.failed("fuel", e.to_string()))?;
        }
        Ok((store, stderr))
    }

    fn failed(&self, kind: &'static str, cause: String) -> PluginFailure {
        self.runtime.metrics.record_plugin_failure(&self.name, kind);
        PluginFailure::Failed {
            plugin: self.name.to_string(),
            cause,
            kind,
        }
    }

    /// Turns a trap into a failure that says what happened.
    fn trapped(&self, error: wasmtime::Error, stderr: &MemoryOutputPipe) -> PluginFailure {
        if error.downcast_ref::<DeadlineExceeded>().is_some() {
            return self.failed(
                "deadline",
                format!(
                    "ran past its {} ms deadline (running time) and was stopped",
                    self.spec.deadline_ms
                ),
            );
        }
        let text = format!("{error:#}");
        if error.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::OutOfFuel) {
            return self.failed(
                "fuel",
                format!("used up its fuel budget of {}", self.spec.fuel.unwrap_or(0)),
            );
        }
        // StoreLimits with trap_on_grow_failure reports the cap as an error message only.
        if text.contains("growing memory") {
            return self.failed(
                "memory",
                format!(
                    "tried to grow its memory past the {} byte cap",
                    self.spec.memory_bytes
                ),
            );
        }
        let said = String::from_utf8_lossy(&stderr.contents())
            .trim()
            .to_string();
        if said.contains("panicked") {
            return self.failed("panic", said);
        }
        self.failed(
            "trap",
            if said.is_empty() {
                text
            } else {
                format!("{text}; stderr: {said}")
            },
        )
    }

    fn rejected(&self, error: WitPluginError) -> PluginFailure {
        self.runtime
            .metrics
            .record_plugin_failure(&self.name, "rejected");
        PluginFailure::Rejected {
            plugin: self.name.to_string(),
            status: error.status,
            message: error.message,
        }
    }

    async fn instantiate(
        &self,
        store: &mut Store<CallState>,
        stderr: &MemoryOutputPipe,
    ) -> Result<bindings::Plugin, PluginFailure> {
        self.pre.instantiate_async(store).await.map_err(|e| {
            let text = format!("{e:#}");
            if text.contains("maximum concurrent") || text.contains("pooling") {
                self.failed("busy", format!("no free instance slot ({text})"))
            } else {
                self.trapped(e, stderr)
            }
        })
    }

    /// Waits for a free instance slot, so a burst queues instead of exhausting the pool.
    async fn slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, PluginFailure> {
        self.runtime
            .slots
            .acquire()
            .await
            .map_err(|e| self.failed("busy", e.to_string()))
    }

    /// Runs `preprocess`: a request body to input tensors.
    pub async fn preprocess(&self, request: &Request) -> Result<Vec<Tensor>, PluginFailure> {
        let _slot = self.slot().await?;
        let (mut store, stderr) = self.store()?;
        let instance = self.instantiate(&mut store, &stderr).await?;
        let answer = instance
            .call_preprocess(&mut store, request)
            .await
            .map_err(|e| self.trapped(e, &stderr))?;
        let tensors = answer.map_err(|e| self.rejected(e))?;
        tensors
            .into_iter()
            .map(|t| {
                tensor_from_plugin(t)
                    .map_err(|e| self.failed("output", format!("returned an invalid tensor: {e}")))
            })
            .collect()
    }

    /// Runs `postprocess`: output tensors to the answer.
    pub async fn postprocess(
        &self,
        context: &Context,
        outputs: &[Tensor],
    ) -> Result<PostAnswer, PluginFailure> {
        let _slot = self.slot().await?;
        let (mut store, stderr) = self.store()?;
        let instance = self.instantiate(&mut store, &stderr).await?;
        let wit: Vec<bindings::WitTensor> = outputs.iter().map(Into::into).collect();
        let answer = instance
            .call_postprocess(&mut store, context, &wit)
            .await
            .map_err(|e| self.trapped(e, &stderr))?;
        match answer.map_err(|e| self.rejected(e))? {
            Answer::Body(body) => Ok(PostAnswer::Body {
                content_type: body.content_type,
                data: body.data,
            }),
            Answer::Tensors(tensors) => tensors
                .into_iter()
                .map(|t| {
                    tensor_from_plugin(t).map_err(|e| {
                        self.failed("output", format!("returned an invalid tensor: {e}"))
                    })
                })
                .collect::<Result<_, _>>()
                .map(PostAnswer::Tensors),
        }
    }
}

/// What post-processing produced.
#[derive(Debug)]
pub enum PostAnswer {
    /// A finished body to return as it is.
    Body {
        /// Its Content-Type.
        content_type: String,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Tensors for the front door to encode.
    Tensors(Vec<Tensor>),
}
