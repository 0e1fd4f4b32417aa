//! The wasmtime side of plugins: one engine per node (component model, pooling allocator,
//! epoch interruption, async so a busy plugin yields its thread), the linker with WASI and the
//! meshserve host imports, and compilation cached by content digest in memory and on disk.
//!
//! The shape follows Spin's: compile once per component version, keep an `InstancePre`, and
//! give every call a fresh `Store` from the pooling allocator.

use crate::metrics::Metrics;
use crate::plugin::bindings::{self, Plugin as PluginWorld};
use crate::plugin::features::FeatureTables;
use crate::plugin::instance::{CallState, LoadedPlugin, PluginSpec};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often the engine's epoch advances: the granularity of deadlines and of yielding.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Node-wide plugin settings (`[plugins]` in the node config).
#[derive(Debug, Clone, serde::Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PluginRuntimeConfig {
    /// Where compiled plugins are cached; `None` keeps them in memory only.
    pub cache_dir: Option<PathBuf>,
    /// Plugin instances that may run at once (pooling-allocator slots).
    pub max_instances: u32,
    /// Largest linear memory any plugin may be granted, in bytes (a pool slot's size).
    pub max_memory_bytes: usize,
    /// Meter fuel, so that plugins may set a `fuel` budget (costs some speed for every plugin).
    pub fuel: bool,
    /// Write `/tmp/perf-<pid>.map`, so that `perf` names the plugins' compiled functions.
    pub perf_map: bool,
}

impl Default for PluginRuntimeConfig {
    fn default() -> Self {
        PluginRuntimeConfig {
            cache_dir: None,
            max_instances: 256,
            max_memory_bytes: 256 << 20,
            fuel: false,
            perf_map: false,
        }
    }
}

/// Why a plugin could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PluginLoadError {
    /// The file could not be read.
    #[error("plugin {path}: cannot read: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not a valid component, or not one of the meshserve plugin world.
    #[error("plugin {path} is not a valid meshserve plugin component: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// wasmtime's explanation.
        message: String,
    },
    /// The spec asks for more than the node allows, or for something missing.
    #[error("plugin {path}: {message}")]
    Spec {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The wasmtime engine could not be created.
    #[error("cannot start the plugin runtime: {0}")]
    Engine(String),
}

struct Ticker {
    stop: Arc<AtomicBool>,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Everything plugins of one node share.
pub struct PluginRuntime {
    pub(crate) engine: Engine,
    pub(crate) linker: Linker<CallState>,
    pub(crate) features: Arc<FeatureTables>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) config: PluginRuntimeConfig,
    /// One permit per pooling-allocator slot: a call waits for a free slot instead of failing.
    pub(crate) slots: tokio::sync::Semaphore,
    compiled: Mutex<HashMap<String, Component>>,
    _ticker: Ticker,
}

impl PluginRuntime {
    /// Creates the engine, the linker and the epoch ticker.
    pub fn new(
        config: PluginRuntimeConfig,
        features: Arc<FeatureTables>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<PluginRuntime>, PluginLoadError> {
        let engine_error = |e: wasmtime::Error| PluginLoadError::Engine(format!("{e:#}"));
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(config.max_instances)
            .total_core_instances(config.max_instances.saturating_mul(8))
            .total_memories(config.max_instances.saturating_mul(2))
            .total_tables(config.max_instances.saturating_mul(8))
            .total_stacks(config.max_instances)
            .max_memories_per_component(8)
            .max_tables_per_component(32)
            .max_core_instances_per_component(64)
            .max_memory_size(config.max_memory_bytes)
            // Every call gets a fresh instance, so resetting a slot is on the hot path. Keeping
            // the first MiB of a memory resident (reset by pagemap scan where the kernel has
            // it, else memset) avoids the madvise, TLB shootdown and page faults that halved
            // per-call throughput in `meshserve bench plugins`.
            .linear_memory_keep_resident(1 << 20)
            .async_stack_keep_resident(256 << 10)
            .pagemap_scan(wasmtime::Enabled::Auto);
        let mut wasm = Config::new();
        wasm.wasm_component_model(true)
            .epoch_interruption(true)
            .consume_fuel(config.fuel)
            .profiler(if config.perf_map {
                wasmtime::ProfilingStrategy::PerfMap
            } else {
                wasmtime::ProfilingStrategy::None
            })
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&wasm).map_err(engine_error)?;
        let mut linker = Linker::<CallState>::new(&engine);
        // Guests built for wasm32-wasip2 import wasi:cli and wasi:io even when granted nothing;
        // the sandbox is the WASI context each call gets, not a missing import.
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(engine_error)?;
        PluginWorld::add_to_linker::<CallState, HasSelf<CallState>>(&mut linker, |state| state)
            .map_err(engine_error)?;

        let stop = Arc::new(AtomicBool::new(false));
        let ticking = engine.clone();
        let stop_flag = stop.clone();
        std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || {
                while !stop_flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticking.increment_epoch();
                }
            })
            .map_err(|e| PluginLoadError::Engine(e.to_string()))?;
        Ok(Arc::new(PluginRuntime {
            engine,
            linker,
            features,
            metrics,
            slots: tokio::sync::Semaphore::new(config.max_instances as usize),
            config,
            compiled: Mutex::new(HashMap::new()),
            _ticker: Ticker { stop },
        }))
    }

    /// Loads the plugin `spec` names: reads it, compiles it (or reuses the compiled form of
    /// the same bytes), and checks it against the plugin world.
    pub fn load(
        self: &Arc<Self>,
        name: &str,
        spec: &PluginSpec,
    ) -> Result<LoadedPlugin, PluginLoadError> {
        let shown = spec.path.display().to_string();
        if spec.memory_bytes > self.config.max_memory_bytes {
            return Err(PluginLoadError::Spec {
                path: shown,
                message: format!(
                    "memory_bytes {} exceeds the node's plugins.max_memory_bytes {}",
                    spec.memory_bytes, self.config.max_memory_bytes
                ),
            });
        }
        if spec.fuel.is_some() && !self.config.fuel {
            return Err(PluginLoadError::Spec {
                path: shown,
                message: "sets fuel, but fuel metering is off; set plugins.fuel = true in the node config".into(),
            });
        }
        let bytes = std::fs::read(&spec.path).map_err(|source| PluginLoadError::Read {
            path: shown.clone(),
            source,
        })?;
        let digest = hex(&Sha256::digest(&bytes));
        let (component, source) = self.component(&digest, &bytes, &shown)?;
        let invalid = |e: wasmtime::Error| PluginLoadError::Invalid {
            path: shown.clone(),
            message: format!("{e:#}"),
        };
        let instance_pre = self.linker.instantiate_pre(&component).map_err(invalid)?;
        let pre = bindings::PluginPre::new(instance_pre).map_err(invalid)?;
        tracing::info!(plugin = name, path = %shown, %digest, source, "plugin loaded");
        Ok(LoadedPlugin::new(
            name,
            digest,
            pre,
            spec.clone(),
            self.clone(),
        ))
    }

    /// The compiled component for `digest`, and where it came from: `memory` (compiled earlier
    /// in this process), `disk` (the cache directory) or `compiled` (just now).
    fn component(
        &self,
        digest: &str,
        bytes: &[u8],
        shown: &str,
    ) -> Result<(Component, &'static str), PluginLoadError> {
        let mut compiled = self.compiled.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(component) = compiled.get(digest) {
            return Ok((component.clone(), "memory"));
        }
        let cached = self.cache_path(digest);
        let (component, source) = match cached.as_deref().and_then(|path| self.read_cached(path)) {
            Some(component) => (component, "disk"),
            None => {
                let component =
                    Component::new(&self.engine, bytes).map_err(|e| PluginLoadError::Invalid {
                        path: shown.to_string(),
                        message: format!("{e:#}"),
                    })?;
                if let Some(path) = &cached {
                    self.write_cached(path, &component);
                }
                (component, "compiled")
            }
        };
        compiled.insert(digest.to_string(), component.clone());
        Ok((component, source))
    }

    /// The cache file for `digest`: the source digest plus the engine's compatibility hash,
    /// so an upgraded wasmtime or changed settings never read an old artifact.
    fn cache_path(&self, digest: &str) -> Option<PathBuf> {
        let dir = self.config.cache_dir.as_ref()?;
        let mut hasher = DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        Some(dir.join(format!("{digest}-{:016x}.cwasm", hasher.finish())))
    }

    #[allow(unsafe_code)]
    fn read_cached(&self, path: &Path) -> Option<Component> {
        if !path.is_file() {
            return None;
        }
        // SAFETY: deserializing runs no checks on the machine code, so the file must be one we
        // wrote. It lives in the node's own cache directory, is named by the SHA-256 of the
        // source it was compiled from and by this engine's compatibility hash, and is only ever
        // written by `write_cached` below (atomically, by rename).
        match unsafe { Component::deserialize_file(&self.engine, path) } {
            Ok(component) => Some(component),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable compiled plugin; recompiling");
                None
            }
        }
    }

    fn write_cached(&self, path: &Path, component: &Component) {
        let write = || -> std::io::Result<()> {
            let bytes = component
                .serialize()
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let partial = path.with_extension(format!("partial-{}", std::process::id()));
            std::fs::write(&partial, bytes)?;
            std::fs::rename(&partial, path)
        };
        if let Err(e) = write() {
            tracing::warn!(path = %path.display(), error = %e, "could not cache a compiled plugin");
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
