//! One loaded plugin at one endpoint stage, its pool of instances, and its calls.
//!
//! With `isolation = "reuse"` (the default) a call takes a warm instance from the pool: its
//! deadline, fuel, randomness allowance and captured stderr are reset, and after the call it
//! goes back, unless it trapped, served `max_calls_per_instance` calls or grew past
//! `recycle_memory_bytes`; a discarded instance is replaced off the request path. With
//! `"per-call"` every call instantiates a fresh instance (fast, from the pooling allocator)
//! and drops it. Instances never cross endpoints or stages: each stage of each endpoint loads
//! its own [`LoadedPlugin`].
//!
//! Every call is bounded in running time (epoch ticks charge a clock that stops while the call
//! is yielded, see [`RunningClock`]; starting an instance has a budget of its own), in
//! wall-clock time (a call blocked in WASI is dropped), in concurrency (per
//! plugin, then node-wide instance slots; a call that waits too long is answered 503), and in
//! what it returns ([`crate::plugin::limits`]). The client sees a short failure; wasm
//! backtraces and host details go to the log.

use crate::plugin::bindings::{WitPluginError, WitTensor, tensor_from_plugin};
use crate::plugin::clock::RunningClock;
use crate::plugin::failures::FailureBudget;
use crate::plugin::features::TableScope;
use crate::plugin::memory::MemoryBudget;
use crate::plugin::node::{IdlePool, PluginNode};
use crate::plugin::outcome::{
    InitFunc, PostHandle, PostOutcome, PreHandle, PreOutcome, Reply, Tensors,
};
use crate::plugin::sandbox::{CallState, PluginShared};
use crate::plugin::spec::{Isolation, PluginSpec};
use crate::plugin::stdio::StderrCapture;
use crate::plugin::stopped::Stopped;
use crate::plugin::views::{ContextView, RequestView};
use crate::tensor::Tensor;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::component::{ComponentExportIndex, InstancePre, Resource};
use wasmtime::{CallHook, Store, UpdateDeadline};
use wasmtime_wasi::{FsPerms, WasiCtx};

/// Which side of the model a plugin serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Request to input tensors.
    Pre,
    /// Output tensors to the answer.
    Post,
}

impl Stage {
    /// `pre` or `post`.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Pre => "pre",
            Stage::Post => "post",
        }
    }

    /// The interface a component exports to serve this stage.
    pub fn interface(self) -> &'static str {
        match self {
            Stage::Pre => "meshserve:plugin/preprocess@0.2.0",
            Stage::Post => "meshserve:plugin/postprocess@0.2.0",
        }
    }
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
    /// The plugin broke: trap, panic, deadline, memory cap, fuel, a limit, or bad output.
    #[error("plugin '{plugin}' failed: {cause}")]
    Failed {
        /// The plugin.
        plugin: String,
        /// What happened, short, for the client.
        cause: String,
        /// A short label for metrics: deadline, wall-clock, memory, fuel, limit, panic, trap,
        /// output, init.
        kind: &'static str,
    },
    /// No instance could be had in time, the node's plugin memory is spent, or the plugin's
    /// failing calls spent their budget: retry later.
    #[error("plugin '{plugin}' is busy: {cause}")]
    Busy {
        /// The plugin.
        plugin: String,
        /// Why.
        cause: String,
        /// When a retry may succeed.
        retry_after: Duration,
    },
}

/// A reply a plugin built, checked against its limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginReply {
    /// 200 to 599.
    pub status: u16,
    /// Extra headers (never framing or meshserve's own).
    pub headers: Vec<(String, String)>,
    /// The Content-Type.
    pub content_type: String,
    /// The body.
    pub body: Vec<u8>,
}

/// What pre-processing produced.
#[derive(Debug)]
pub enum PreAnswer {
    /// The model's input tensors.
    Infer(Vec<Tensor>),
    /// A reply to send without running the model.
    Reply(PluginReply),
}

/// What post-processing produced.
#[derive(Debug)]
pub enum PostAnswer {
    /// Tensors for the front door to encode.
    Tensors(Vec<Tensor>),
    /// A finished reply.
    Reply(PluginReply),
}

/// Stderr kept per call, to quote a panic message in the log.
const STDERR_CAPTURE_BYTES: usize = 4096;

/// How long a long call rests after each slice it runs: it then runs about a third of the time.
const LONG_CALL_REST: Duration = Duration::from_millis(3);

/// The longest panic message quoted to a client.
const CLIENT_PANIC_CHARS: usize = 200;

/// Where a stage's `init` and `handle` are among a component's exports.
pub(crate) struct StageIndices {
    init: ComponentExportIndex,
    handle: ComponentExportIndex,
}

/// A live instance's `handle` of its stage.
enum StageGuest {
    Pre(PreHandle),
    Post(PostHandle),
}

/// A live instance with its store, and the node-wide slot it holds.
struct Instance {
    store: Store<CallState>,
    guest: StageGuest,
    calls: u64,
    _slot: OwnedSemaphorePermit,
}

/// Everything one loaded plugin's calls and its refill tasks share.
pub(crate) struct Core {
    name: Arc<str>,
    stage: Stage,
    digest: String,
    pre: InstancePre<CallState>,
    indices: StageIndices,
    spec: PluginSpec,
    shared: Arc<PluginShared>,
    node: Arc<PluginNode>,
    idle: Mutex<Vec<Instance>>,
    calls: Arc<Semaphore>,
    failures: FailureBudget,
}

/// A plugin ready to be called at one endpoint stage: compiled, linked, pre-instantiated,
/// with its pool of instances.
pub struct LoadedPlugin {
    core: Arc<Core>,
}

impl LoadedPlugin {
    pub(crate) fn new(
        name: &str,
        stage: Stage,
        digest: String,
        (pre, indices): (InstancePre<CallState>, StageIndices),
        spec: PluginSpec,
        tables: TableScope,
        node: Arc<PluginNode>,
    ) -> LoadedPlugin {
        let name: Arc<str> = name.into();
        let shared = Arc::new(PluginShared::new(
            name.clone(),
            spec.limits.clone(),
            tables,
            node.metrics.clone(),
            spec.headers.clone(),
        ));
        let core = Arc::new(Core {
            name,
            stage,
            digest,
            pre,
            indices,
            calls: Arc::new(Semaphore::new(spec.max_instances.max(1) as usize)),
            failures: FailureBudget::new(spec.failure_budget(), Instant::now()),
            spec,
            shared,
            node,
            idle: Mutex::new(Vec::new()),
        });
        let pool: Arc<dyn IdlePool> = core.clone();
        core.node.register_pool(Arc::downgrade(&pool));
        LoadedPlugin { core }
    }

    /// Creates one instance and runs its `init`, so a config the plugin refuses is found at
    /// load rather than by the first request; with `reuse` the instance then waits warm.
    pub async fn warm_up(&self) -> Result<(), PluginFailure> {
        let instance = self.core.instantiate().await?;
        if self.core.spec.isolation == Isolation::Reuse {
            self.core.put_back(instance);
        }
        Ok(())
    }

    /// The plugin's name (its file stem).
    pub fn name(&self) -> &str {
        &self.core.name
    }

    /// The stage it serves.
    pub fn stage(&self) -> Stage {
        self.core.stage
    }

    /// SHA-256 of the component file this was compiled from.
    pub fn digest(&self) -> &str {
        &self.core.digest
    }

    /// The spec it was loaded from.
    pub fn spec(&self) -> &PluginSpec {
        &self.core.spec
    }

    /// Warm instances waiting for a call now.
    pub fn idle_instances(&self) -> usize {
        self.core.idle_len()
    }

    /// Runs the pre stage on a request.
    pub async fn preprocess(&self, request: RequestView) -> Result<PreAnswer, PluginFailure> {
        let core = &self.core;
        let (_permit, mut instance) = core.checkout().await?;
        let handle = core.begin(&mut instance, request)?;
        let borrowed = Resource::new_borrow(handle.rep());
        let StageGuest::Pre(guest) = instance.guest else {
            return Err(core.failed("load", "is not a pre-processing plugin", None));
        };
        let clock = instance.store.data().clock.clone();
        let call = guest.call_async(&mut instance.store, (borrowed,));
        let ended = call_within(&core.node, core.wall_timeout(Phase::Call), clock, call).await;
        let (outcome,) = core.finish(instance, handle, ended)?;
        match outcome.map_err(|e| core.rejected(e))? {
            PreOutcome::Infer(tensors) => core.tensors(tensors).map(PreAnswer::Infer),
            PreOutcome::Reply(reply) => core.reply(reply).map(PreAnswer::Reply),
        }
    }

    /// Runs the post stage on the model's outputs.
    pub async fn postprocess(
        &self,
        context: ContextView,
        outputs: &[Tensor],
    ) -> Result<PostAnswer, PluginFailure> {
        let core = &self.core;
        let (_permit, mut instance) = core.checkout().await?;
        let handle = core.begin(&mut instance, context)?;
        let borrowed = Resource::new_borrow(handle.rep());
        let StageGuest::Post(guest) = instance.guest else {
            return Err(core.failed("load", "is not a post-processing plugin", None));
        };
        let wit: Vec<WitTensor> = outputs.iter().map(Into::into).collect();
        let clock = instance.store.data().clock.clone();
        let call = guest.call_async(&mut instance.store, (borrowed, wit));
        let ended = call_within(&core.node, core.wall_timeout(Phase::Call), clock, call).await;
        let (outcome,) = core.finish(instance, handle, ended)?;
        match outcome.map_err(|e| core.rejected(e))? {
            PostOutcome::Tensors(tensors) => core.tensors(tensors).map(PostAnswer::Tensors),
            PostOutcome::Reply(reply) => core.reply(reply).map(PostAnswer::Reply),
        }
    }
}

/// How a bounded call ended: its result, or the wall-clock cap.
enum Ended<T> {
    Returned(wasmtime::Result<T>),
    WallClock,
}

/// What a running-time budget pays for: starting an instance (instantiation and `init`), or
/// one call.
#[derive(Debug, Clone, Copy)]
enum Phase {
    Start,
    Call,
}

impl Phase {
    /// Qualifies a limit in messages: "start-up " or nothing.
    fn label(self) -> &'static str {
        match self {
            Phase::Start => "start-up ",
            Phase::Call => "",
        }
    }
}

/// Runs one guest call (or instantiation) under its wall-clock cap, charging `clock` only for
/// the time it is being polled: time yielded to other tasks, or spent waiting in an async WASI
/// call (a sleep, a poll), is not the plugin's running time.
async fn call_within<T>(
    node: &PluginNode,
    wall_timeout: Duration,
    clock: Arc<RunningClock>,
    call: impl std::future::Future<Output = wasmtime::Result<T>>,
) -> Ended<T> {
    // The epoch ticks (charging the clock, yielding, stopping runaways) while this runs.
    let _ticking = node.ticker.running();
    let started = tokio::time::Instant::now();
    let mut call = std::pin::pin!(call);
    // Most calls end in their first poll: the wall-clock timer is made only for one that does
    // not (a timer takes a slot in the runtime's timer wheel and gives it back).
    let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    std::future::poll_fn(|cx| {
        clock.resumed();
        let poll = call.as_mut().poll(cx);
        clock.paused();
        if let Poll::Ready(result) = poll {
            return Poll::Ready(Ended::Returned(result));
        }
        let timer =
            timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(started + wall_timeout)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Ended::WallClock),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

impl IdlePool for Core {
    fn release_idle(&self) -> bool {
        let taken = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        taken.is_some()
    }
}

impl Core {
    fn deadline(&self, phase: Phase) -> Duration {
        Duration::from_millis(match phase {
            Phase::Start => self.spec.start_deadline_ms,
            Phase::Call => self.spec.deadline_ms,
        })
    }

    fn wall_timeout(&self, phase: Phase) -> Duration {
        match phase {
            Phase::Start => self.spec.start_wall_timeout(),
            Phase::Call => self.spec.wall_timeout(),
        }
    }

    fn idle_len(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// A call permit of this plugin and an instance to run on.
    async fn checkout(self: &Arc<Self>) -> Result<(OwnedSemaphorePermit, Instance), PluginFailure> {
        if let Some(pause) = self
            .failures
            .in_debt()
            .then(|| self.failures.paused(Instant::now()))
            .flatten()
        {
            return Err(self.busy_for(
                format!(
                    "its failing calls spent more than its {} ms per second; calls resume in {} ms",
                    self.spec.failure_budget().as_millis(),
                    pause.as_millis().max(1)
                ),
                pause,
            ));
        }
        // A free permit needs no timer: most calls find one.
        let permit = match self.calls.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let wait = Duration::from_millis(self.spec.queue_timeout_ms);
                match tokio::time::timeout(wait, self.calls.clone().acquire_owned()).await {
                    Ok(Ok(permit)) => permit,
                    _ => {
                        return Err(self.busy(format!(
                            "all {} of its instances stayed in use for {} ms",
                            self.spec.max_instances, self.spec.queue_timeout_ms
                        )));
                    }
                }
            }
        };
        let reused = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let instance = match reused {
            Some(instance) => instance,
            None => self.instantiate().await?,
        };
        Ok((permit, instance))
    }

    /// Creates an instance and runs its `init`: a store with the plugin's sandbox, a node-wide
    /// slot, and the guest's exports of this stage.
    async fn instantiate(self: &Arc<Self>) -> Result<Instance, PluginFailure> {
        let wait = Duration::from_millis(self.spec.queue_timeout_ms);
        let slot = self
            .node
            .instance_slot(wait)
            .await
            .map_err(|()| self.busy("the node has no free plugin instance slot".into()))?;
        let mut store = self.store()?;
        self.reset_budgets(&mut store, Phase::Start)?;
        let clock = store.data().clock.clone();
        let started = self.start(store, slot).await;
        if started.is_err() {
            self.failures.charge(clock.used(), Instant::now());
        }
        started
    }

    /// Instantiates in `store` and runs `init`, within the start-up budgets.
    async fn start(
        self: &Arc<Self>,
        mut store: Store<CallState>,
        slot: OwnedSemaphorePermit,
    ) -> Result<Instance, PluginFailure> {
        let clock = store.data().clock.clone();
        let wall = self.wall_timeout(Phase::Start);
        let instance = match call_within(
            &self.node,
            wall,
            clock.clone(),
            self.pre.instantiate_async(&mut store),
        )
        .await
        {
            Ended::Returned(Ok(instance)) => instance,
            Ended::Returned(Err(e)) => return Err(self.trapped(e, &store, Phase::Start)),
            Ended::WallClock => return Err(self.wall_clock_exceeded(&store, Phase::Start)),
        };
        let mut exports = || -> wasmtime::Result<(InitFunc, StageGuest)> {
            let init = instance.get_typed_func(&mut store, self.indices.init)?;
            let handle = self.indices.handle;
            let guest = match self.stage {
                Stage::Pre => StageGuest::Pre(instance.get_typed_func(&mut store, handle)?),
                Stage::Post => StageGuest::Post(instance.get_typed_func(&mut store, handle)?),
            };
            Ok((init, guest))
        };
        let (init, guest) = exports().map_err(|e| {
            self.failed("load", "does not export its stage", Some(format!("{e:#}")))
        })?;
        let config = self.spec.config.clone();
        let init = call_within(
            &self.node,
            wall,
            clock,
            init.call_async(&mut store, (config,)),
        )
        .await;
        match init {
            Ended::Returned(Ok((Ok(()),))) => {}
            Ended::Returned(Ok((Err(e),))) => {
                return Err(self.failed(
                    "init",
                    &format!("init refused its config: {}", short(&e.message)),
                    Some(e.message),
                ));
            }
            Ended::Returned(Err(e)) => return Err(self.trapped(e, &store, Phase::Start)),
            Ended::WallClock => return Err(self.wall_clock_exceeded(&store, Phase::Start)),
        }
        Ok(Instance {
            store,
            guest,
            calls: 0,
            _slot: slot,
        })
    }

    fn store(&self) -> Result<Store<CallState>, PluginFailure> {
        let stderr = StderrCapture::new(STDERR_CAPTURE_BYTES);
        let mut wasi = WasiCtx::builder();
        wasi.stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .max_random_size(self.spec.limits.random_bytes);
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
                        "cannot open a granted directory",
                        Some(format!("{}: {e}", grant.host.display())),
                    )
                })?;
        }
        let state = CallState::new(
            wasi.build(),
            MemoryBudget::new(self.node.memory.clone(), self.spec.memory_bytes),
            self.shared.clone(),
            stderr,
        );
        let mut store = Store::new(&self.node.engine, state);
        store.limiter(|state| &mut state.memory);
        store.set_max_component_handles(self.spec.limits.resources);
        // What the guest hands the host is charged against host-call fuel before it is copied.
        // Its host calls while it runs get the small argument budget, and what it returns the
        // larger output budget: wasmtime reads the fuel when it starts copying, so it is set
        // as each host call begins (the guest cannot run between that and the copy) and as
        // the guest returns, before its answer is copied.
        let arguments = self.spec.limits.argument_budget();
        let answer = self.copy_budget();
        store.set_hostcall_fuel(answer);
        store.call_hook(move |mut context, hook| {
            match hook {
                CallHook::CallingHost => context.set_hostcall_fuel(arguments),
                CallHook::ReturningFromWasm => context.set_hostcall_fuel(answer),
                CallHook::CallingWasm | CallHook::ReturningFromHost => {}
            }
            Ok(())
        });
        // Charge the running clock every tick and yield the thread in between: a runaway
        // plugin shares its worker thread with other requests until its budget traps it. A
        // call that has run longer than `long_call_after_ms` also rests between its slices, so
        // a few long calls cannot take the node's threads from many short requests (a slice is
        // a tick, about a millisecond, while a short request needs tens of microseconds).
        let long_call = self.node.long_call_after;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |context| {
            let clock = context.data().clock.clone();
            if clock.charge() {
                return Err(wasmtime::Error::new(Stopped::new(
                    "deadline",
                    "ran past its deadline (running time) and was stopped",
                )));
            }
            let rest = clock.used() >= long_call;
            // After a rest the next tick comes at a random phase; two ticks make a whole slice.
            let slice = if rest { 2 } else { 1 };
            Ok(UpdateDeadline::YieldCustom(
                slice,
                Box::pin(async move {
                    if rest {
                        tokio::time::sleep(LONG_CALL_REST).await;
                    } else {
                        // tokio's own yield goes to the back of the run queue; a plain wake
                        // would let the runaway task be polled again first.
                        tokio::task::yield_now().await;
                    }
                }),
            ))
        });
        Ok(store)
    }

    /// Gives a store a fresh running-time budget, randomness allowance, fuel and stderr.
    fn reset_budgets(
        &self,
        store: &mut Store<CallState>,
        phase: Phase,
    ) -> Result<(), PluginFailure> {
        store.data_mut().begin_call(self.deadline(phase));
        // A store's epoch deadline is absolute: left as the last call set it, an instance used
        // again after a tick would yield at once, on every first call after each tick.
        store.set_epoch_deadline(1);
        if self.node.fuel {
            store
                .set_fuel(self.spec.fuel.unwrap_or(u64::MAX))
                .map_err(|e| self.failed("fuel", "cannot set its fuel", Some(e.to_string())))?;
        }
        Ok(())
    }

    /// Resets the instance's per-call budgets and hands it the call's resource.
    fn begin<T: Send + 'static>(
        &self,
        instance: &mut Instance,
        view: T,
    ) -> Result<Resource<T>, PluginFailure> {
        self.reset_budgets(&mut instance.store, Phase::Call)?;
        instance
            .store
            .data_mut()
            .table
            .push(view)
            .map_err(|e| self.failed("trap", "cannot take the request", Some(e.to_string())))
    }

    /// Ends a call: a trapped or timed-out instance is discarded (and replaced off the request
    /// path); a healthy one goes back to the pool unless it is due for recycling.
    fn finish<T: Send + 'static, R>(
        self: &Arc<Self>,
        mut instance: Instance,
        handle: Resource<T>,
        ended: Ended<R>,
    ) -> Result<R, PluginFailure> {
        let result = match ended {
            Ended::Returned(Ok(value)) => Ok(value),
            Ended::Returned(Err(e)) => Err(self.trapped(e, &instance.store, Phase::Call)),
            Ended::WallClock => Err(self.wall_clock_exceeded(&instance.store, Phase::Call)),
        };
        if result.is_err() {
            let running = instance.store.data().clock.used();
            self.failures.charge(running, Instant::now());
            drop(instance);
            if self.spec.isolation == Isolation::Reuse {
                self.refill();
            }
            return result;
        }
        // The guest only borrowed the resource; the table entry is ours to remove.
        let _ = instance.store.data_mut().table.delete(handle);
        instance.calls += 1;
        let worn = instance.calls >= self.spec.max_calls_per_instance
            || instance.store.data().memory.used() > self.spec.recycle_memory();
        match self.spec.isolation {
            Isolation::PerCall => drop(instance),
            Isolation::Reuse if worn => {
                drop(instance);
                self.refill();
            }
            Isolation::Reuse => self.put_back(instance),
        }
        result
    }

    /// Returns a used instance to the pool; when the pool is full, the longest idle one goes.
    fn put_back(&self, instance: Instance) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() >= self.spec.max_instances as usize {
            idle.remove(0);
        }
        idle.push(instance);
    }

    /// Starts one instance in the background when none is idle, so the next call finds one
    /// warm. Needs a tokio runtime; without one the next call instantiates inline.
    fn refill(self: &Arc<Self>) {
        if self.idle_len() > 0 {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let core = Arc::downgrade(self);
        handle.spawn(async move {
            let Some(core) = core.upgrade() else { return };
            if let Ok(instance) = core.instantiate().await {
                // Only into an empty pool: a fresh instance never displaces a used one.
                let mut idle = core.idle.lock().unwrap_or_else(|p| p.into_inner());
                if idle.is_empty() {
                    idle.push(instance);
                }
            }
        });
    }

    /// See [`crate::plugin::limits::PluginLimits::copy_budget`].
    fn copy_budget(&self) -> usize {
        let limits = &self.spec.limits;
        limits.copy_budget(limits.output_budget(self.spec.memory_bytes))
    }

    fn tensors(&self, tensors: Tensors) -> Result<Vec<Tensor>, PluginFailure> {
        let budget = self.spec.limits.output_budget(self.spec.memory_bytes);
        self.spec
            .limits
            .check_tensors(&tensors, budget)
            .map_err(|e| self.failed("output", &e, None))?;
        tensors
            .into_vec()
            .into_iter()
            .map(|t| {
                tensor_from_plugin(t).map_err(|e| {
                    self.failed("output", &format!("returned an invalid tensor: {e}"), None)
                })
            })
            .collect()
    }

    fn reply(&self, reply: Reply) -> Result<PluginReply, PluginFailure> {
        let budget = self.spec.limits.output_budget(self.spec.memory_bytes);
        self.spec
            .limits
            .check_reply(&reply, budget)
            .map_err(|e| self.failed("output", &e, None))?;
        Ok(PluginReply {
            status: reply.status,
            headers: reply.headers.into_vec(),
            content_type: reply.content_type,
            body: reply.body,
        })
    }

    /// A failure: counted, logged with its detail, and returned with only the short cause.
    fn failed(&self, kind: &'static str, cause: &str, detail: Option<String>) -> PluginFailure {
        self.node.metrics.record_plugin_failure(&self.name, kind);
        if self.shared.admit_line() {
            let detail = detail.as_deref().map(|d| self.shared.loggable(d));
            tracing::warn!(plugin = %self.name, stage = self.stage.as_str(), kind, cause = self.shared.loggable(cause), detail = detail.as_deref().unwrap_or(""), "plugin call failed");
        }
        PluginFailure::Failed {
            plugin: self.name.to_string(),
            cause: cause.to_string(),
            kind,
        }
    }

    fn busy(&self, cause: String) -> PluginFailure {
        self.busy_for(cause, Duration::from_secs(1))
    }

    /// A refusal the client may retry after `retry_after`.
    fn busy_for(&self, cause: String, retry_after: Duration) -> PluginFailure {
        self.node.metrics.record_plugin_failure(&self.name, "busy");
        if self.shared.admit_line() {
            tracing::warn!(plugin = %self.name, stage = self.stage.as_str(), cause, "plugin call refused: busy");
        }
        PluginFailure::Busy {
            plugin: self.name.to_string(),
            cause,
            retry_after,
        }
    }

    fn rejected(&self, error: WitPluginError) -> PluginFailure {
        self.node
            .metrics
            .record_plugin_failure(&self.name, "rejected");
        PluginFailure::Rejected {
            plugin: self.name.to_string(),
            status: error.status,
            message: short(&error.message),
        }
    }

    fn wall_clock_exceeded(&self, store: &Store<CallState>, phase: Phase) -> PluginFailure {
        let ran = store.data().clock.used();
        self.failed(
            "wall-clock",
            &format!(
                "ran past its {} ms {}wall-clock limit (it had run {} ms; it was blocked or sleeping) and was stopped",
                self.wall_timeout(phase).as_millis(),
                phase.label(),
                ran.as_millis()
            ),
            None,
        )
    }

    /// Turns a trap into a failure that says what happened, short for the client.
    fn trapped(
        &self,
        error: wasmtime::Error,
        store: &Store<CallState>,
        phase: Phase,
    ) -> PluginFailure {
        let detail = without_panic_frames(&format!("{error:#}"));
        let stderr = store.data().stderr.text();
        // Stderr (a panic's message and place) first: the log keeps only the start.
        let detail = if stderr.is_empty() {
            detail
        } else {
            format!("stderr: {stderr}; {detail}")
        };
        if let Some(stopped) = error.downcast_ref::<Stopped>() {
            return match stopped.kind {
                "node-memory" => self.busy(stopped.message.clone()),
                "deadline" => self.failed(
                    "deadline",
                    &format!(
                        "ran past its {} ms {}deadline (running time) and was stopped",
                        self.deadline(phase).as_millis(),
                        phase.label()
                    ),
                    None,
                ),
                kind => self.failed(kind, &stopped.message, Some(detail)),
            };
        }
        if let Some(exit) = error.downcast_ref::<wasmtime_wasi::I32Exit>() {
            return self.failed("trap", &format!("exited with status {}", exit.0), None);
        }
        if detail.contains(HOSTCALL_FUEL_SPENT) {
            // Arguments run out of fuel inside the guest's run (the error carries its wasm
            // backtrace); an answer, after the guest returned.
            if error.downcast_ref::<wasmtime::WasmBacktrace>().is_some() {
                let limits = &self.spec.limits;
                return self.failed(
                    "limit",
                    &format!(
                        "passed more than {} bytes to one host call; the limit is {} (call_argument_bytes)",
                        limits.argument_budget(),
                        limits.call_argument_bytes
                    ),
                    None,
                );
            }
            let output = self.spec.limits.output_budget(self.spec.memory_bytes);
            return self.failed(
                "limit",
                &format!(
                    "moved more than {} bytes out of its memory in one step; the output limit is {output}",
                    self.copy_budget()
                ),
                None,
            );
        }
        if detail.contains(HANDLE_LIMIT_EXCEEDED) {
            let limit = self.spec.limits.resources;
            return self.failed(
                "limit",
                &format!(
                    "held more than {limit} host resources at once (pollables, streams, files); the limit is {limit} (resources)"
                ),
                None,
            );
        }
        if detail.contains("maximum concurrent") || detail.contains("pooling allocator") {
            return self.busy("the node has no free plugin instance slot".into());
        }
        if let Some(trap) = error.downcast_ref::<wasmtime::Trap>() {
            if *trap == wasmtime::Trap::OutOfFuel {
                return self.failed(
                    "fuel",
                    &format!("used up its fuel budget of {}", self.spec.fuel.unwrap_or(0)),
                    None,
                );
            }
            if let Some(message) = panic_message(&stderr) {
                let cause = self.located(format!("panicked: {message}"), &stderr);
                return self.failed("panic", &cause, Some(detail));
            }
            let cause = self.located(format!("trapped: {trap}"), &stderr);
            return self.failed("trap", &cause, Some(detail));
        }
        self.failed("trap", "trapped", Some(detail))
    }

    /// With the plugin's `debug` switch on, `cause` followed by where in its source the guest
    /// failed, as far as its stderr tells.
    fn located(&self, cause: String, stderr: &str) -> String {
        match failure_location(stderr) {
            Some(location) if self.spec.debug => format!("{cause} (at {location})"),
            _ => cause,
        }
    }
}

/// How wasmtime says a guest tried to copy more than its host-call fuel allows (the error type
/// is private to wasmtime, so its text is what can be recognised; `mesh/tests/plugin_limits.rs`
/// pins it).
const HOSTCALL_FUEL_SPENT: &str = "fuel allocated for hostcalls has been exhausted";

/// How wasmtime says a guest created a resource handle past its store's limit (pinned by the
/// same test).
const HANDLE_LIMIT_EXCEEDED: &str = "store handle limit exceeded";

/// The message of a Rust panic as std prints it to stderr (`thread '…' panicked at FILE:LINE:`
/// then the message), cut for a client.
fn panic_message(stderr: &str) -> Option<String> {
    let (_, after) = stderr.split_once("panicked at ")?;
    let message = after.lines().nth(1).unwrap_or("").trim();
    Some(short(message))
}

/// A trap's text without the frames of the guest's panic and abort machinery, which top every
/// panic's backtrace: the log keeps only the start of a line, and the plugin's own frames are
/// what its author needs.
fn without_panic_frames(detail: &str) -> String {
    const MACHINERY: [&str; 7] = [
        "abort",
        "std[",
        "std::",
        "core[",
        "core::",
        "__rust",
        "rust_panic",
    ];
    let Some((head, frames)) = detail.split_once("wasm backtrace:\n") else {
        return detail.to_string();
    };
    let frames: Vec<&str> = frames.lines().collect();
    let machinery = |frame: &&&str| {
        frame
            .split_once('!')
            .is_some_and(|(_, function)| MACHINERY.iter().any(|m| function.starts_with(m)))
    };
    let skipped = frames.iter().take_while(machinery).count();
    if skipped == 0 {
        return detail.to_string();
    }
    format!(
        "{head}wasm backtrace ({skipped} frames of panic machinery left out):\n{}",
        frames[skipped..].join("\n")
    )
}

/// Where in its source a guest failed, from what it wrote to stderr: a Rust panic's
/// `FILE:LINE:COL`, or the innermost frame of a Python traceback with the exception it ends
/// with. Cut for a client.
fn failure_location(stderr: &str) -> Option<String> {
    // componentize-py prints the traceback, then its runtime panics: the traceback says more.
    if let Some((_, traceback)) = stderr.rsplit_once("Traceback (most recent call last):") {
        let lines: Vec<&str> = traceback.lines().collect();
        let frame = lines
            .iter()
            .rposition(|l| l.trim_start().starts_with("File \""))?;
        let (file, rest) = lines[frame]
            .trim_start()
            .strip_prefix("File \"")?
            .split_once('"')?;
        let line = rest.trim_start_matches(", line ").split(',').next()?.trim();
        // The exception is the first line after the frame that is not indented.
        let exception = lines[frame..]
            .iter()
            .find(|l| !l.is_empty() && !l.starts_with(' '))?;
        return Some(short(&format!("{file}:{line}: {}", exception.trim())));
    }
    let (_, after) = stderr.split_once("panicked at ")?;
    let location = after.lines().next()?.trim().trim_end_matches(':');
    Some(short(location))
}

/// A guest's text cut to a length fit for an error response, control characters escaped.
fn short(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(CLIENT_PANIC_CHARS)
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect();
    if text.chars().count() > CLIENT_PANIC_CHARS {
        out.push('…');
    }
    out
}

/// Loads the exports `stage` needs from a pre-instantiated component, or says why it cannot.
pub(crate) fn stage_indices(
    pre: &InstancePre<CallState>,
    stage: Stage,
) -> Result<StageIndices, String> {
    // The world a plugin is built for is named after its stage.
    let interface = stage.interface();
    let missing = |name: &str| {
        let stage = stage.as_str();
        format!(
            "is configured as a {stage} stage but does not export {interface}#{name}: build it \
             for world '{stage}' (Rust: meshserve_guest::export_plugin!(T: {stage}))"
        )
    };
    let component = pre.component();
    let export = |name: &str| {
        component
            .get_export_index(None, interface)
            .and_then(|exported| component.get_export_index(Some(&exported), name))
            .ok_or_else(|| missing(name))
    };
    Ok(StageIndices {
        init: export("init")?,
        handle: export("handle")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_is_quoted_short_and_without_its_location() {
        let stderr = "thread '<unnamed>' panicked at src/lib.rs:95:24:\nsandbox-probe was told to panic\nnote: run with `RUST_BACKTRACE=1`";
        assert_eq!(
            panic_message(stderr).as_deref(),
            Some("sandbox-probe was told to panic")
        );
        let long = format!(
            "thread 'x' panicked at a.rs:1:1:\n{}\u{1b}",
            "y".repeat(500)
        );
        let quoted = panic_message(&long).unwrap();
        assert_eq!(quoted.chars().count(), CLIENT_PANIC_CHARS + 1);
        assert!(panic_message("no panic here").is_none());
        assert_eq!(short("a\nb"), "a\\nb");
    }

    #[test]
    fn a_backtrace_starts_at_the_plugins_own_frames() {
        let trap = "error while executing at wasm backtrace:\n    0:  0x1 - p.wasm!abort\n    1:  0x2 - p.wasm!std[d1]::process::abort\n    2:  0x3 - p.wasm!__rustc[b7]::rust_panic\n    3:  0x4 - p.wasm!core[c2]::panicking::panic_fmt\n    4:  0x5 - p.wasm!probe[e3]::Probe::handle\n    5:  0x6 - p.wasm!std[d1]::rt::lang_start\n";
        let kept = without_panic_frames(trap);
        assert!(
            kept.contains("(4 frames of panic machinery left out)"),
            "{kept}"
        );
        assert!(
            kept.contains("0x5 - p.wasm!probe[e3]::Probe::handle"),
            "{kept}"
        );
        assert!(
            kept.contains("lang_start") && !kept.contains("rust_panic"),
            "{kept}"
        );
        assert_eq!(without_panic_frames("no backtrace"), "no backtrace");
    }

    #[test]
    fn a_failure_is_located_from_a_rust_panic_or_a_python_traceback() {
        let panic =
            "thread '<unnamed>' panicked at src/lib.rs:95:24:\nsandbox-probe was told to panic\n";
        assert_eq!(failure_location(panic).as_deref(), Some("src/lib.rs:95:24"));
        let traceback = "Traceback (most recent call last):\n  File \"/app/app.py\", line 58, in handle\n    return self.label(outputs)\n  File \"/app/app.py\", line 44, in label\n    if width != len(labels):\n               ^^^^^^^^^^^\nTypeError: object of type 'int' has no len()\nthread '<unnamed>' panicked at runtime/src/lib.rs:1293:29:\nPython function threw an unexpected exception\n";
        assert_eq!(
            failure_location(traceback).as_deref(),
            Some("/app/app.py:44: TypeError: object of type 'int' has no len()")
        );
        assert!(failure_location("some other output").is_none());
    }
}
