//! The wasmtime side of plugins: one engine per node (component model, pooling allocator,
//! epoch interruption, async so a busy plugin yields its thread), the linker with WASI and the
//! meshserve host imports, and compilation cached by content digest in memory and on disk.
//!
//! The shape follows Spin's: compile once per component version, keep an `InstancePre`, and
//! give every call a fresh `Store` from the pooling allocator.

use crate::metrics::Metrics;
use crate::plugin::bindings::{self, PACKAGE};
use crate::plugin::cache::DiskCache;
use crate::plugin::epoch::EpochTicker;
use crate::plugin::features::{FeatureTables, TableScope};
use crate::plugin::instance::{LoadedPlugin, Stage, stage_indices};
use crate::plugin::memory::NodeMemory;
use crate::plugin::node::PluginNode;
use crate::plugin::random::RandomBudget;
use crate::plugin::sandbox::CallState;
use crate::plugin::sha256_hex;
use crate::plugin::spec::PluginSpec;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

pub use crate::plugin::epoch::EPOCH_TICK;

/// Node-wide plugin settings (`[plugins]` in the node config).
#[derive(Debug, Clone, serde::Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PluginRuntimeConfig {
    /// Where compiled plugins are cached; `None` keeps them in memory only.
    pub cache_dir: Option<PathBuf>,
    /// Plugin instances that may exist at once, warm or running, over all plugins
    /// (pooling-allocator slots).
    pub max_instances: u32,
    /// Largest linear memory any plugin may be granted, in bytes (a pool slot's size).
    pub max_memory_bytes: usize,
    /// Linear memory all plugin instances together may hold, in bytes.
    pub memory_budget_bytes: usize,
    /// Bytes of each instance's memory kept resident when its slot is reused, so a fresh
    /// instance does not page-fault its image back in.
    pub keep_resident_bytes: usize,
    /// Running time, in ms, after which a call rests between its slices (runs about a quarter
    /// of the time), so long or runaway calls cannot starve short requests. Running time, and
    /// so the deadline, does not count the rests; the wall-clock limit does.
    pub long_call_after_ms: u64,
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
            memory_budget_bytes: 4 << 30,
            keep_resident_bytes: 2 << 20,
            long_call_after_ms: 10,
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

/// Everything plugins of one node share.
pub struct PluginRuntime {
    node: Arc<PluginNode>,
    linker: Linker<CallState>,
    features: Arc<FeatureTables>,
    config: PluginRuntimeConfig,
    compiled: Mutex<Versions>,
    disk: Option<DiskCache>,
}

/// The compiled versions this runtime holds, and those no longer used.
#[derive(Default)]
struct Versions {
    /// Each compiled version in use, by digest, with how many loaded plugins use it.
    used: HashMap<String, (Component, usize)>,
    /// Versions that lost their last user since the last [`PluginRuntime::sweep_cache`]. Their
    /// artifacts stay on disk until then: a failed load gives its version up, and another
    /// endpoint loaded next may use the very same file.
    unused: HashSet<String>,
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
            // Keep every slot warm for reuse, and the first pages of each memory resident
            // (reset by pagemap scan where the kernel has it, else memset): a fresh instance
            // then costs no madvise, TLB shootdown or page faults.
            .max_unused_warm_slots(config.max_instances)
            .linear_memory_keep_resident(config.keep_resident_bytes)
            .table_keep_resident(64 << 10)
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
        let linker = Self::linker(&engine).map_err(engine_error)?;
        let disk =
            config
                .cache_dir
                .as_deref()
                .and_then(|dir| match DiskCache::open(dir, &engine) {
                    Ok(cache) => Some(cache),
                    Err(e) => {
                        tracing::warn!(error = %e, "plugin cache not used");
                        None
                    }
                });

        let ticker = EpochTicker::start(engine.clone())
            .map_err(|e| PluginLoadError::Engine(e.to_string()))?;
        let node = PluginNode::new(
            engine,
            ticker,
            metrics,
            NodeMemory::new(config.memory_budget_bytes),
            config.max_instances as usize,
            Duration::from_millis(config.long_call_after_ms),
            config.fuel,
        );
        Ok(Arc::new(PluginRuntime {
            node: Arc::new(node),
            linker,
            features,
            config,
            compiled: Mutex::new(Versions::default()),
            disk,
        }))
    }

    /// The linker every plugin is instantiated with: WASI, with randomness replaced by a
    /// per-call budget, and the meshserve host interfaces.
    fn linker(engine: &Engine) -> wasmtime::Result<Linker<CallState>> {
        use wasmtime_wasi::p2::bindings::random;
        let mut linker = Linker::<CallState>::new(engine);
        // Guests built for wasm32-wasip2 import wasi:cli and wasi:io even when granted nothing;
        // the sandbox is the WASI context each instance gets, not a missing import.
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        linker.allow_shadowing(true);
        random::random::add_to_linker::<CallState, HasSelf<RandomBudget>>(&mut linker, |s| {
            &mut s.random
        })?;
        random::insecure::add_to_linker::<CallState, HasSelf<RandomBudget>>(&mut linker, |s| {
            &mut s.random
        })?;
        linker.allow_shadowing(false);
        bindings::wit::PrePost::add_to_linker::<CallState, HasSelf<CallState>>(
            &mut linker,
            |state| state,
        )?;
        Ok(linker)
    }

    /// Loads the plugin `spec` names for `stage`: reads it, compiles it (or reuses the
    /// compiled form of the same bytes), and checks that it exports that stage. Its lookups
    /// read `own_tables` (its endpoint's), then the node's.
    pub fn load(
        self: &Arc<Self>,
        name: &str,
        stage: Stage,
        spec: &PluginSpec,
        own_tables: Option<Arc<FeatureTables>>,
    ) -> Result<LoadedPlugin, PluginLoadError> {
        let shown = spec.path.display().to_string();
        let refuse = |message: String| PluginLoadError::Spec {
            path: shown.clone(),
            message,
        };
        if spec.memory_bytes > self.config.max_memory_bytes {
            return Err(refuse(format!(
                "memory_bytes {} exceeds the node's plugins.max_memory_bytes {}",
                spec.memory_bytes, self.config.max_memory_bytes
            )));
        }
        if spec.fuel.is_some() && !self.config.fuel {
            return Err(refuse(
                "sets fuel, but fuel metering is off; set plugins.fuel = true in the node config"
                    .into(),
            ));
        }
        let bytes = std::fs::read(&spec.path).map_err(|source| PluginLoadError::Read {
            path: shown.clone(),
            source,
        })?;
        let digest = sha256_hex(&bytes);
        let (component, source) = self.component(&digest, &bytes, &shown)?;
        let invalid = |message: String| PluginLoadError::Invalid {
            path: shown.clone(),
            message,
        };
        self.check_version(&component).map_err(invalid)?;
        let loaded = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| invalid(format!("{e:#}")))
            .and_then(|pre| {
                let indices = stage_indices(&pre, stage).map_err(invalid)?;
                Ok((pre, indices))
            });
        let linked = match loaded {
            Ok(linked) => linked,
            Err(e) => {
                self.retire(&digest);
                return Err(e);
            }
        };
        tracing::info!(plugin = name, stage = stage.as_str(), path = %shown, %digest, source, "plugin loaded");
        Ok(LoadedPlugin::new(
            name,
            stage,
            digest,
            linked,
            spec.clone(),
            TableScope::new(own_tables, self.features.clone()),
            self.node.clone(),
        ))
    }

    /// Refuses components built against another major version of the plugin interface, with
    /// what to do about it.
    fn check_version(&self, component: &Component) -> Result<(), String> {
        let ty = component.component_type();
        let names: Vec<String> = ty
            .imports(&self.node.engine)
            .chain(ty.exports(&self.node.engine))
            .map(|(name, _)| name.to_string())
            .collect();
        let old = names
            .iter()
            .any(|n| n == "preprocess" || n == "postprocess")
            || names
                .iter()
                .any(|n| n.starts_with("meshserve:plugin/") && n.ends_with("@0.1.0"));
        if old {
            return Err(format!(
                "it was built against meshserve:plugin@0.1.0, and this node serves {PACKAGE}: \
                 rebuild it with meshserve-guest 0.2 (export_plugin!(T: pre) or (T: post); see \
                 docs/plugins.md, 'Moving from 0.1')"
            ));
        }
        Ok(())
    }

    /// The compiled component for `digest`, and where it came from: `memory` (compiled earlier
    /// in this process), `disk` (the cache directory) or `compiled` (just now). Each call
    /// counts one more user of the digest, until [`PluginRuntime::retire`].
    fn component(
        &self,
        digest: &str,
        bytes: &[u8],
        shown: &str,
    ) -> Result<(Component, &'static str), PluginLoadError> {
        let mut versions = self.versions();
        versions.unused.remove(digest);
        if let Some((component, users)) = versions.used.get_mut(digest) {
            *users += 1;
            return Ok((component.clone(), "memory"));
        }
        let cached = self
            .disk
            .as_ref()
            .and_then(|disk| disk.read(digest, &self.node.engine));
        let (component, source) = match cached {
            Some(component) => (component, "disk"),
            None => {
                let invalid = |message: String| PluginLoadError::Invalid {
                    path: shown.to_string(),
                    message,
                };
                if let Some(problem) = not_a_component(bytes) {
                    return Err(invalid(problem.into()));
                }
                let component = Component::new(&self.node.engine, bytes)
                    .map_err(|e| invalid(format!("{e:#}")))?;
                if let Some(disk) = &self.disk {
                    disk.write(digest, &component);
                }
                (component, "compiled")
            }
        };
        versions
            .used
            .insert(digest.to_string(), (component.clone(), 1));
        Ok((component, source))
    }

    fn versions(&self) -> std::sync::MutexGuard<'_, Versions> {
        self.compiled.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Says that one user of `digest` is gone (a version replaced by a hot swap, or a load that
    /// failed); the last one takes its compiled form out of memory, and the next
    /// [`PluginRuntime::sweep_cache`] off the disk. Calls still running on it keep what they
    /// hold until they finish.
    pub fn retire(&self, digest: &str) {
        let mut versions = self.versions();
        let Some((_, users)) = versions.used.get_mut(digest) else {
            return;
        };
        *users -= 1;
        if *users == 0 {
            versions.used.remove(digest);
            versions.unused.insert(digest.to_string());
        }
    }

    /// Removes from the disk cache the versions given up since the last sweep that no plugin
    /// has taken up again. Called once a round of loads is over (at start, after each check for
    /// changed files), so that a version a failed load gave up is not deleted and recompiled
    /// when the next endpoint uses the same file.
    pub fn sweep_cache(&self) {
        let unused = std::mem::take(&mut self.versions().unused);
        for digest in unused {
            if let Some(disk) = &self.disk {
                disk.evict(&digest);
            }
            tracing::info!(%digest, "compiled plugin version evicted");
        }
    }

    /// Compiled versions held now.
    #[cfg(test)]
    pub(crate) fn compiled_versions(&self) -> usize {
        self.versions().used.len()
    }
}

/// The stages a component file serves, read from its type: it is compiled (which validates
/// it) but never run. What `meshserve plugin build` reports.
pub fn exported_stages(bytes: &[u8]) -> Result<Vec<Stage>, String> {
    if let Some(problem) = not_a_component(bytes) {
        return Err(problem.into());
    }
    let engine = Engine::default();
    let component = Component::new(&engine, bytes).map_err(|e| format!("{e:#}"))?;
    let exports: Vec<String> = component
        .component_type()
        .exports(&engine)
        .map(|(name, _)| name.to_string())
        .collect();
    Ok([Stage::Pre, Stage::Post]
        .into_iter()
        .filter(|stage| exports.iter().any(|name| name == stage.interface()))
        .collect())
}

/// Why `bytes` cannot be a component, when that shows before parsing: wasmtime would
/// otherwise read anything that is not binary WebAssembly as the text format and answer with
/// a parser's complaint ("expected `(`") about a file that was never meant as text.
fn not_a_component(bytes: &[u8]) -> Option<&'static str> {
    const CORE_MODULE_VERSION: [u8; 4] = [1, 0, 0, 0];
    if let Some(after_magic) = bytes.strip_prefix(b"\0asm") {
        return after_magic.starts_with(&CORE_MODULE_VERSION).then_some(
            "it is a core WebAssembly module, not a component: build it for wasm32-wasip2 \
             (cargo build --target wasm32-wasip2), or wrap it with `wasm-tools component new`",
        );
    }
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(256)]);
    let text = text.trim_start();
    if text.starts_with('(') || text.starts_with(";;") {
        return None;
    }
    Some(
        "it is not a WebAssembly component (a component starts with the bytes \\0asm, or is \
         WebAssembly text starting with '(')",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime(cache: Option<PathBuf>) -> Arc<PluginRuntime> {
        let config = PluginRuntimeConfig {
            cache_dir: cache,
            max_instances: 4,
            ..PluginRuntimeConfig::default()
        };
        PluginRuntime::new(config, Arc::default(), Arc::new(Metrics::new())).unwrap()
    }

    /// A component in text form, written to `dir`.
    fn component(dir: &std::path::Path, name: &str, text: &str) -> PluginSpec {
        let path = dir.join(format!("{name}.wat"));
        std::fs::write(&path, text).unwrap();
        PluginSpec::new(path)
    }

    #[test]
    fn a_plugin_built_against_the_0_1_interface_is_refused_with_how_to_rebuild_it() {
        let dir = tempfile::tempdir().unwrap();
        let old = component(
            dir.path(),
            "old",
            r#"(component
                (core module $m (func (export "f") (result i32) i32.const 0))
                (core instance $i (instantiate $m))
                (func (export "preprocess") (result u32) (canon lift (core func $i "f"))))"#,
        );
        let err = runtime(None)
            .load("old", Stage::Pre, &old, None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("meshserve:plugin@0.1.0")
                && err.contains("rebuild it with meshserve-guest 0.2"),
            "{err}"
        );
    }

    fn artifacts(cache: &std::path::Path) -> usize {
        std::fs::read_dir(cache)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".cwasm"))
            .count()
    }

    #[test]
    fn a_component_without_the_stage_is_refused_and_its_compiled_code_evicted_by_the_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let empty = component(dir.path(), "empty", "(component)");
        let runtime = runtime(Some(cache.clone()));
        let err = runtime
            .load("empty", Stage::Post, &empty, None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("configured as a post stage")
                && err.contains("meshserve:plugin/postprocess@0.2.0"),
            "{err}"
        );
        // Nothing serves that version: it leaves memory at once, and the disk at the sweep
        // that ends the round of loads.
        assert_eq!(runtime.compiled_versions(), 0);
        assert_eq!(artifacts(&cache), 1);
        runtime.sweep_cache();
        assert_eq!(artifacts(&cache), 0);
    }

    #[test]
    fn a_version_taken_up_again_before_the_sweep_keeps_its_artifact() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let runtime = runtime(Some(cache.clone()));
        let bytes = b"(component)";
        let digest = sha256_hex(bytes);
        // A failed load gives the version up; the next endpoint's load of the same file reads
        // it back from the disk instead of compiling it again.
        let (_, source) = runtime.component(&digest, bytes, "a.wasm").unwrap();
        assert_eq!(source, "compiled");
        runtime.retire(&digest);
        let (_, source) = runtime.component(&digest, bytes, "a.wasm").unwrap();
        assert_eq!(source, "disk");
        runtime.sweep_cache();
        assert_eq!(artifacts(&cache), 1);
        // Given up for good, it goes at the next sweep.
        runtime.retire(&digest);
        runtime.sweep_cache();
        assert_eq!(artifacts(&cache), 0);
    }

    #[test]
    fn a_file_that_is_not_a_component_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = runtime(None);
        let load = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            runtime
                .load(name, Stage::Pre, &PluginSpec::new(path), None)
                .err()
                .unwrap()
                .to_string()
        };
        let garbage = load("garbage.wasm", b"\x7fELF\x02\x01\x01 not wasm at all");
        assert!(
            garbage.contains("is not a WebAssembly component") && !garbage.contains("expected"),
            "{garbage}"
        );
        let core = load("core.wasm", b"\0asm\x01\x00\x00\x00");
        assert!(
            core.contains("a core WebAssembly module, not a component")
                && core.contains("wasm32-wasip2"),
            "{core}"
        );
        // A truncated component is left to wasmtime, which names what is wrong with it.
        let truncated = load("truncated.wasm", b"\0asm\x0d\x00\x01\x00\x01");
        assert!(
            truncated.contains("not a valid meshserve plugin component"),
            "{truncated}"
        );
    }

    #[test]
    fn a_compiled_version_stays_while_any_user_has_it() {
        let runtime = runtime(None);
        let component = Component::new(&runtime.node.engine, "(component)").unwrap();
        let digest = "d".repeat(64);
        runtime
            .versions()
            .used
            .insert(digest.clone(), (component, 2));
        runtime.retire(&digest);
        assert_eq!(runtime.compiled_versions(), 1);
        runtime.retire(&digest);
        assert_eq!(runtime.compiled_versions(), 0);
    }
}
