//! Endpoints: what a client calls, `[pre-plugin] → model → [post-plugin]`.
//!
//! An endpoint's plugins are one unit: a request takes the pre and post versions together at
//! its start ([`Endpoint::plugins`]), and a reload swaps both or neither. A changed plugin file
//! is noticed by its content digest (file metadata only says when to hash it again), or an
//! admin call reloads now; requests already running keep the versions they took. A reload
//! that fails leaves the previous versions serving (or the endpoint unavailable, with the
//! reason, if there were none), and a replaced version's compiled code is evicted.

use crate::error::InferError;
use crate::plugin::instance::{LoadedPlugin, PluginFailure, PostAnswer, PreAnswer, Stage};
use crate::plugin::runtime::PluginRuntime;
use crate::plugin::sandbox::{ContextView, RequestView};
use crate::plugin::sha256_hex;
use crate::plugin::spec::PluginSpec;
use crate::tensor::Tensor;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

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

/// What says a file may have changed: cheap to read, and it moves on every write or replace
/// (ctime cannot be set back by a user), so the digest is recomputed only then.
type FileStamp = (u64, u64, i64, i64, i64, i64);

fn stamp(path: &Path) -> Option<FileStamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some((
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec(),
    ))
}

fn file_digest(path: &Path) -> Option<String> {
    std::fs::read(path).ok().map(|bytes| sha256_hex(&bytes))
}

/// The plugins one request runs with, taken together at its start.
#[derive(Default)]
pub struct EndpointPlugins {
    /// The pre stage, if the endpoint has one.
    pub pre: Option<Arc<LoadedPlugin>>,
    /// The post stage, if the endpoint has one.
    pub post: Option<Arc<LoadedPlugin>>,
}

impl EndpointPlugins {
    fn loaded(&self) -> impl Iterator<Item = &Arc<LoadedPlugin>> {
        self.pre.iter().chain(self.post.iter())
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
    /// Pre-processing as configured, if any.
    pub pre: Option<PluginSpec>,
    /// Post-processing as configured, if any.
    pub post: Option<PluginSpec>,
    label: Arc<str>,
    current: RwLock<Option<Arc<EndpointPlugins>>>,
    error: RwLock<Option<String>>,
    stamps: Mutex<Vec<Option<FileStamp>>>,
}

fn plugin_name(spec: &PluginSpec) -> String {
    spec.path.file_stem().map_or_else(
        || spec.path.display().to_string(),
        |s| s.to_string_lossy().into_owned(),
    )
}

impl Endpoint {
    fn new(name: &str, config: &EndpointConfig) -> Endpoint {
        Endpoint {
            name: name.to_string(),
            model: config.model.clone(),
            version: config.version.clone(),
            pre: config.pre.clone(),
            post: config.post.clone(),
            label: name.into(),
            current: RwLock::new(None),
            error: RwLock::new(None),
            stamps: Mutex::new(Vec::new()),
        }
    }

    fn specs(&self) -> impl Iterator<Item = (Stage, &PluginSpec)> {
        let pre = self.pre.iter().map(|s| (Stage::Pre, s));
        pre.chain(self.post.iter().map(|s| (Stage::Post, s)))
    }

    /// The plugins serving now, taken together, or why there are none.
    pub fn plugins(&self) -> Result<Arc<EndpointPlugins>, InferError> {
        if let Some(plugins) = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Ok(plugins);
        }
        let reason = self
            .last_error()
            .unwrap_or_else(|| "its plugins are not loaded".into());
        Err(self.unavailable(reason))
    }

    /// `Ok` when every plugin of the endpoint is loaded, else the reason it is not.
    pub fn readiness(&self) -> Result<(), String> {
        self.plugins().map(|_| ()).map_err(|e| match e {
            InferError::EndpointUnavailable { reason, .. } => reason,
            other => other.to_string(),
        })
    }

    /// The last load error, if the last load failed.
    pub fn last_error(&self) -> Option<String> {
        self.error.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn unavailable(&self, reason: String) -> InferError {
        InferError::EndpointUnavailable {
            endpoint: self.name.clone(),
            reason,
        }
    }

    /// Whether a plugin file changed since the last load: by metadata first, then by digest.
    fn changed(&self) -> bool {
        let now: Vec<_> = self.specs().map(|(_, spec)| stamp(&spec.path)).collect();
        let mut seen = self.stamps.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == now {
            return false;
        }
        *seen = now;
        let Ok(current) = self.plugins() else {
            return true;
        };
        let digests = current.loaded().map(|p| Some(p.digest().to_string()));
        let on_disk = self.specs().map(|(_, spec)| file_digest(&spec.path));
        !digests.eq(on_disk)
    }

    /// Loads every plugin of the endpoint and swaps them in together, if a file changed (or
    /// always, with `force`). Returns whether new versions now serve. Blocking: call it off
    /// the async worker threads.
    fn refresh(&self, runtime: &Arc<PluginRuntime>, force: bool) -> Result<bool, String> {
        if !force && !self.changed() {
            return Ok(false);
        }
        if force {
            let now = self.specs().map(|(_, spec)| stamp(&spec.path)).collect();
            *self.stamps.lock().unwrap_or_else(|p| p.into_inner()) = now;
        }
        let mut fresh = EndpointPlugins::default();
        let mut failure = None;
        // Off the async workers (this compiles): the runtime's handle runs each new version's
        // first `init`, so a config it refuses fails the load, not the first request.
        let runtime_handle = tokio::runtime::Handle::try_current().ok();
        for (stage, spec) in self.specs() {
            let plugin = match runtime.load(&plugin_name(spec), stage, spec) {
                Ok(plugin) => Arc::new(plugin),
                Err(e) => {
                    failure = Some(e.to_string());
                    break;
                }
            };
            let slot = match stage {
                Stage::Pre => &mut fresh.pre,
                Stage::Post => &mut fresh.post,
            };
            *slot = Some(plugin.clone());
            if let Some(handle) = &runtime_handle
                && let Err(e) = handle.block_on(plugin.warm_up())
            {
                failure = Some(e.to_string());
                break;
            }
        }
        if let Some(message) = failure {
            for plugin in fresh.loaded() {
                runtime.retire(plugin.digest());
            }
            let keeps = self.plugins().is_ok();
            tracing::error!(endpoint = %self.name, error = %message, keeps_previous_version = keeps, "plugin failed to load");
            *self.error.write().unwrap_or_else(|p| p.into_inner()) = Some(message.clone());
            return Err(message);
        }
        let previous = self
            .current
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .replace(Arc::new(fresh));
        *self.error.write().unwrap_or_else(|p| p.into_inner()) = None;
        if let Some(previous) = &previous {
            for plugin in previous.loaded() {
                runtime.retire(plugin.digest());
            }
        }
        Ok(previous.is_some())
    }

    /// The request as `plugin` may see it.
    pub fn request_view<'a>(
        &self,
        plugin: &LoadedPlugin,
        content_type: &str,
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
        body: bytes::Bytes,
    ) -> RequestView {
        RequestView {
            endpoint: self.label.clone(),
            content_type: content_type.to_string(),
            headers: plugin.spec().visible_headers(headers),
            body,
        }
    }

    /// What `plugin` may know of the request it post-processes.
    pub fn context_view<'a>(
        &self,
        plugin: &LoadedPlugin,
        content_type: &str,
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> ContextView {
        ContextView {
            endpoint: self.label.clone(),
            model: self.model.clone(),
            content_type: content_type.to_string(),
            headers: plugin.spec().visible_headers(headers),
        }
    }
}

/// Runs a pre stage, as an engine error on failure.
pub async fn preprocess(
    plugin: &LoadedPlugin,
    request: RequestView,
) -> Result<PreAnswer, InferError> {
    plugin.preprocess(request).await.map_err(plugin_error)
}

/// Runs a post stage, as an engine error on failure.
pub async fn postprocess(
    plugin: &LoadedPlugin,
    context: ContextView,
    outputs: &[Tensor],
) -> Result<PostAnswer, InferError> {
    plugin
        .postprocess(context, outputs)
        .await
        .map_err(plugin_error)
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
        PluginFailure::Busy { plugin, cause } => InferError::PluginBusy { plugin, cause },
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
                let endpoint = Endpoint::new(name, config);
                let _ = endpoint.refresh(&runtime, true);
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

    /// The plugin runtime the endpoints share.
    pub fn runtime(&self) -> &Arc<PluginRuntime> {
        &self.runtime
    }

    /// Reloads every plugin of `name` from disk now (the admin call). Blocking: compiles.
    pub fn reload(&self, name: &str) -> Result<(), InferError> {
        let endpoint = self
            .endpoints
            .get(name)
            .ok_or_else(|| InferError::ModelNotFound {
                model: name.to_string(),
            })?;
        endpoint
            .refresh(&self.runtime, true)
            .map(|_| ())
            .map_err(|reason| endpoint.unavailable(reason))
    }

    /// Checks every plugin file for changes every `interval` and swaps in new versions, on a
    /// background thread that ends when `self` is dropped.
    pub fn watch(self: &Arc<Self>, interval: Duration) -> std::io::Result<()> {
        let weak = Arc::downgrade(self);
        let stop = self.stop.clone();
        let runtime = tokio::runtime::Handle::try_current().ok();
        std::thread::Builder::new()
            .name("plugin-watch".into())
            .spawn(move || {
                // Inside the runtime's context, so a new version's pool can warm up in the background.
                let _context = runtime.as_ref().map(|r| r.enter());
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(interval);
                    let Some(endpoints) = weak.upgrade() else {
                        return;
                    };
                    for endpoint in endpoints.endpoints.values() {
                        if let Ok(true) = endpoint.refresh(&endpoints.runtime, false) {
                            tracing::info!(endpoint = %endpoint.name, "plugins hot-swapped");
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
