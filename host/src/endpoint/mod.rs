//! Endpoints: what a client calls, `[pre-plugin] → model → [post-plugin]`.
//!
//! An endpoint's plugins are one unit: a request takes the pre and post versions together at
//! its start ([`Endpoint::plugins`]), and a reload swaps both or neither. A changed plugin file
//! is noticed by its content digest (file metadata only says when to hash it again), or an
//! admin call reloads now; requests already running keep the versions they took. A reload
//! that fails leaves the previous versions serving (or the endpoint unavailable, with the
//! reason, if there were none), and a replaced version's compiled code is evicted.
//!
//! Endpoints come from two places ([`Source`]): the node's own config, and folders of the
//! model repository ([`folder`]), which travel through the mesh like models. A repository
//! endpoint is replaced as a whole when anything in its folder changes.

pub mod folder;
mod registry;

pub use registry::{EndpointStatus, Endpoints};

use crate::error::InferError;
use crate::plugin::features::FeatureTables;
use crate::plugin::instance::{LoadedPlugin, PluginFailure, PostAnswer, PreAnswer, Stage};
use crate::plugin::runtime::PluginRuntime;
use crate::plugin::sha256_hex;
use crate::plugin::spec::PluginSpec;
use crate::plugin::views::{ContextView, RequestView};
use crate::tensor::Tensor;
use serde::Deserialize;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

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
    /// Which versions these are, as answers name them: `pre=NAME@SHA12 post=NAME@SHA12`.
    pub tag: String,
}

impl EndpointPlugins {
    fn loaded(&self) -> impl Iterator<Item = &Arc<LoadedPlugin>> {
        self.pre.iter().chain(self.post.iter())
    }
}

/// One plugin version serving an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginVersion {
    /// `pre` or `post`.
    pub stage: &'static str,
    /// The plugin's name (its file stem).
    pub plugin: String,
    /// The SHA-256 of its component, hex.
    pub sha256: String,
    /// Component and config, as the `meshserve-plugins` header names them.
    pub version: String,
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
    /// Where it is defined.
    pub source: Source,
    /// Its own feature tables (a repository endpoint's), read before the node's.
    tables: Option<Arc<FeatureTables>>,
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

/// Where an endpoint is defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `[endpoints.NAME]` in this node's config: node-local, its files anywhere on the node.
    NodeConfig,
    /// A folder of the model repository (`REPO/NAME/endpoint.toml`): mesh-wide, everything
    /// inside the folder.
    Repository,
}

impl Source {
    /// How operators read it.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::NodeConfig => "node-config",
            Source::Repository => "repository",
        }
    }
}

impl Endpoint {
    fn new(
        name: &str,
        config: &EndpointConfig,
        source: Source,
        tables: Option<Arc<FeatureTables>>,
    ) -> Endpoint {
        Endpoint {
            name: name.to_string(),
            model: config.model.clone(),
            version: config.version.clone(),
            pre: config.pre.clone(),
            post: config.post.clone(),
            source,
            tables,
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

    /// An endpoint whose definition could not be read: it answers 503 with `reason` until
    /// its folder is fixed.
    fn broken(name: &str, source: Source, reason: String) -> Endpoint {
        let config = EndpointConfig {
            model: String::new(),
            version: None,
            pre: None,
            post: None,
        };
        let endpoint = Endpoint::new(name, &config, source, None);
        endpoint.set_error(reason);
        endpoint
    }

    /// Gives up this endpoint's plugin versions, once it is replaced or removed: requests
    /// that already took them finish on them.
    fn retire(&self, runtime: &PluginRuntime) {
        if let Ok(plugins) = self.plugins() {
            for plugin in plugins.loaded() {
                runtime.retire(plugin.digest());
            }
        }
    }

    /// `Ok` when every plugin of the endpoint is loaded, else the reason it is not.
    pub fn readiness(&self) -> Result<(), String> {
        self.plugins().map(|_| ()).map_err(|e| match e {
            InferError::EndpointUnavailable { reason, .. } => reason,
            other => other.to_string(),
        })
    }

    /// The plugin versions serving now (none when none are loaded), pre first.
    pub fn versions(&self) -> Vec<PluginVersion> {
        let Ok(plugins) = self.plugins() else {
            return Vec::new();
        };
        plugins
            .loaded()
            .map(|plugin| PluginVersion {
                stage: plugin.stage().as_str(),
                plugin: plugin.name().to_string(),
                sha256: plugin.digest().to_string(),
                version: version_of(plugin),
            })
            .collect()
    }

    fn set_error(&self, reason: String) {
        *self.error.write().unwrap_or_else(|p| p.into_inner()) = Some(reason);
    }

    /// The last load error, if the last load failed.
    pub fn last_error(&self) -> Option<String> {
        self.error.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The error of a reload that failed: the previous version keeps serving, if there is one.
    pub(crate) fn not_reloaded(&self, reason: String) -> InferError {
        if self.plugins().is_ok() {
            InferError::EndpointNotReplaced {
                endpoint: self.name.clone(),
                reason,
            }
        } else {
            self.unavailable(reason)
        }
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
            let plugin = match runtime.load(&plugin_name(spec), stage, spec, self.tables.clone()) {
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
        fresh.tag = fresh
            .loaded()
            .map(|p| format!("{}={}@{}", p.stage().as_str(), p.name(), version_of(p)))
            .collect::<Vec<_>>()
            .join(" ");
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

/// A plugin version as answers and logs name it: its component's digest (12 hex digits),
/// then, when it has a config, `+` and the config's (8), since either changes what it does.
fn version_of(plugin: &LoadedPlugin) -> String {
    let component = short(plugin.digest());
    let config = &plugin.spec().config;
    if config.is_empty() {
        component.to_string()
    } else {
        let config = sha256_hex(config.as_bytes());
        format!("{component}+{}", config.get(..8).unwrap_or(&config))
    }
}

/// The first 12 hex digits of a digest: enough to tell versions apart in a header or a log.
fn short(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
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
        PluginFailure::Busy {
            plugin,
            cause,
            retry_after,
        } => InferError::PluginBusy {
            plugin,
            cause,
            retry_after,
        },
    }
}
