//! Endpoints: what a client calls, `[pre-plugin] → model → [post-plugin]`.
//!
//! Each plugin sits in a slot that can be swapped atomically: a changed plugin file (polled)
//! or an admin call loads the new version, and requests already running keep the `Arc` of the
//! old one until they finish. A plugin that fails to load leaves the previous version serving
//! (or the endpoint unavailable, with the reason, if there was none).

use crate::error::InferError;
use crate::plugin::bindings::{Context, Request};
use crate::plugin::instance::{LoadedPlugin, PluginFailure, PluginSpec, PostAnswer};
use crate::plugin::runtime::PluginRuntime;
use crate::tensor::Tensor;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

/// An endpoint as the node config declares it (`[endpoints.NAME]`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// The model it runs.
    pub model: String,
    /// The model version; newest when absent.
    #[serde(default)]
    pub version: Option<String>,
    /// Request pre-processing.
    #[serde(default)]
    pub pre: Option<PluginSpec>,
    /// Response post-processing.
    #[serde(default)]
    pub post: Option<PluginSpec>,
}

impl EndpointConfig {
    /// Resolves relative plugin and grant paths against `base` (the config file's folder).
    pub fn resolve_paths(&mut self, base: &Path) {
        for spec in [&mut self.pre, &mut self.post].into_iter().flatten() {
            if spec.path.is_relative() {
                spec.path = base.join(&spec.path);
            }
            for grant in &mut spec.dirs {
                if grant.host.is_relative() {
                    grant.host = base.join(&grant.host);
                }
            }
        }
    }
}

type FileStamp = (SystemTime, u64);

fn stamp(path: &Path) -> Option<FileStamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// One plugin position of an endpoint, swappable at run time.
pub struct PluginSlot {
    name: String,
    spec: PluginSpec,
    current: RwLock<Option<Arc<LoadedPlugin>>>,
    error: RwLock<Option<String>>,
    stamp: Mutex<Option<FileStamp>>,
}

impl PluginSlot {
    fn new(spec: PluginSpec) -> PluginSlot {
        let name = spec.path.file_stem().map_or_else(
            || spec.path.display().to_string(),
            |s| s.to_string_lossy().into_owned(),
        );
        PluginSlot {
            name,
            spec,
            current: RwLock::new(None),
            error: RwLock::new(None),
            stamp: Mutex::new(None),
        }
    }

    /// The plugin serving now, or why there is none.
    pub fn current(&self) -> Result<Arc<LoadedPlugin>, String> {
        if let Some(plugin) = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Ok(plugin);
        }
        Err(self
            .error
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| format!("plugin '{}' is not loaded", self.name)))
    }

    /// The last load error, if the last load failed.
    pub fn last_error(&self) -> Option<String> {
        self.error.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Loads the plugin file if it changed since the last load (or always, with `force`).
    /// Returns whether a new version now serves.
    fn refresh(&self, runtime: &Arc<PluginRuntime>, force: bool) -> Result<bool, String> {
        let now = stamp(&self.spec.path);
        let mut last = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
        if !force && now == *last {
            return Ok(false);
        }
        *last = now;
        match runtime.load(&self.name, &self.spec) {
            Ok(plugin) => {
                let previous = self
                    .current
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .replace(Arc::new(plugin));
                *self.error.write().unwrap_or_else(|p| p.into_inner()) = None;
                Ok(previous.is_some())
            }
            Err(e) => {
                let message = e.to_string();
                let keeps = self
                    .current
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_some();
                tracing::error!(plugin = %self.name, error = %message, keeps_previous_version = keeps, "plugin failed to load");
                *self.error.write().unwrap_or_else(|p| p.into_inner()) = Some(message.clone());
                Err(message)
            }
        }
    }
}

/// A configured endpoint.
pub struct Endpoint {
    /// Its name, as clients call it.
    pub name: String,
    /// The model it runs.
    pub model: String,
    /// The model version; newest when `None`.
    pub version: Option<String>,
    /// Pre-processing, if any.
    pub pre: Option<PluginSlot>,
    /// Post-processing, if any.
    pub post: Option<PluginSlot>,
}

impl Endpoint {
    fn slots(&self) -> impl Iterator<Item = &PluginSlot> {
        self.pre.iter().chain(self.post.iter())
    }

    /// `Ok` when every plugin of the endpoint is loaded, else the first reason it is not.
    pub fn readiness(&self) -> Result<(), String> {
        self.slots().try_for_each(|slot| slot.current().map(|_| ()))
    }

    fn unavailable(&self, reason: String) -> InferError {
        InferError::EndpointUnavailable {
            endpoint: self.name.clone(),
            reason,
        }
    }

    /// Runs the pre-plugin on a raw request, giving the model's input tensors.
    pub async fn preprocess(
        &self,
        slot: &PluginSlot,
        request: &Request,
    ) -> Result<Vec<Tensor>, InferError> {
        let plugin = slot.current().map_err(|reason| self.unavailable(reason))?;
        plugin.preprocess(request).await.map_err(plugin_error)
    }

    /// Runs the post-plugin on the model's outputs.
    pub async fn postprocess(
        &self,
        slot: &PluginSlot,
        context: &Context,
        outputs: &[Tensor],
    ) -> Result<PostAnswer, InferError> {
        let plugin = slot.current().map_err(|reason| self.unavailable(reason))?;
        plugin
            .postprocess(context, outputs)
            .await
            .map_err(plugin_error)
    }
}

fn plugin_error(failure: PluginFailure) -> InferError {
    match failure {
        PluginFailure::Rejected {
            plugin,
            status,
            message,
        } => InferError::PluginRejected {
            plugin,
            status,
            message,
        },
        PluginFailure::Failed { plugin, cause, .. } => InferError::PluginFailed { plugin, cause },
    }
}

/// Every endpoint of a node, with the watcher that hot-reloads changed plugin files.
pub struct Endpoints {
    runtime: Arc<PluginRuntime>,
    endpoints: BTreeMap<String, Arc<Endpoint>>,
    stop: Arc<AtomicBool>,
}

impl Endpoints {
    /// Loads every endpoint's plugins. A plugin that fails leaves its endpoint unavailable
    /// (reported with the reason); the node and the other endpoints still serve.
    pub fn load(
        configs: &BTreeMap<String, EndpointConfig>,
        runtime: Arc<PluginRuntime>,
    ) -> Endpoints {
        let endpoints = configs
            .iter()
            .map(|(name, config)| {
                let endpoint = Endpoint {
                    name: name.clone(),
                    model: config.model.clone(),
                    version: config.version.clone(),
                    pre: config.pre.clone().map(PluginSlot::new),
                    post: config.post.clone().map(PluginSlot::new),
                };
                for slot in endpoint.slots() {
                    let _ = slot.refresh(&runtime, true);
                }
                (name.clone(), Arc::new(endpoint))
            })
            .collect();
        Endpoints {
            runtime,
            endpoints,
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The endpoint called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Endpoint>> {
        self.endpoints.get(name)
    }

    /// Every endpoint, by name.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Endpoint>> {
        self.endpoints.values()
    }

    /// Reloads every plugin of `name` from disk now (the admin call). Blocking: compiles.
    pub fn reload(&self, name: &str) -> Result<(), InferError> {
        let endpoint = self
            .endpoints
            .get(name)
            .ok_or_else(|| InferError::ModelNotFound {
                model: name.to_string(),
            })?;
        for slot in endpoint.slots() {
            slot.refresh(&self.runtime, true)
                .map_err(|reason| endpoint.unavailable(reason))?;
        }
        Ok(())
    }

    /// Checks every plugin file for changes every `interval` and swaps in new versions, on a
    /// background thread that ends when `self` is dropped.
    pub fn watch(self: &Arc<Self>, interval: Duration) -> std::io::Result<()> {
        let weak = Arc::downgrade(self);
        let stop = self.stop.clone();
        std::thread::Builder::new().name("plugin-watch".into()).spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(interval);
                let Some(endpoints) = weak.upgrade() else { return };
                for endpoint in endpoints.endpoints.values() {
                    for slot in endpoint.slots() {
                        if let Ok(true) = slot.refresh(&endpoints.runtime, false) {
                            tracing::info!(endpoint = %endpoint.name, plugin = %slot.name, "plugin hot-swapped");
                        }
                    }
                }
            }
        })?;
        Ok(())
    }
}

impl Drop for Endpoints {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
