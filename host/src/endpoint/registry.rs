//! Every endpoint of a node: those its config declares and those in its model repository,
//! with the watcher that swaps in new versions.
//!
//! A config endpoint is reloaded when one of its plugin files changes. A repository endpoint
//! is read again, as a whole, when anything in its folder changes (definition, components,
//! tables), and the new one replaces the old in one step, so a request runs entirely on one
//! or the other. A folder that fails to load leaves the previous version serving, with the
//! reason reported. A name declared in the node's config wins over a folder of that name.

use super::folder::{self, FolderStamp};
use super::{Endpoint, EndpointConfig, PluginVersion, Source};
use crate::error::InferError;
use crate::plugin::features::FeatureTables;
use crate::plugin::runtime::PluginRuntime;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// An endpoint as the repository API lists it.
#[derive(Debug, Clone)]
pub struct EndpointStatus {
    /// Its name.
    pub name: String,
    /// The model it runs (empty when its definition could not be read).
    pub model: String,
    /// Where it is defined.
    pub source: Source,
    /// Whether its plugins are loaded and serving.
    pub ready: bool,
    /// Why it does not serve, or why its last reload failed while an older version serves.
    pub reason: Option<String>,
    /// The plugin versions serving now.
    pub plugins: Vec<PluginVersion>,
}

/// Repository folders as last seen.
#[derive(Default)]
struct Folders {
    /// The stamp each folder was last read at: it is read again only once that changes.
    seen: BTreeMap<String, FolderStamp>,
    /// Unloaded by an admin: left alone until loaded again by name.
    held: BTreeSet<String>,
}

/// Every endpoint of a node.
pub struct Endpoints {
    runtime: Arc<PluginRuntime>,
    repository: Option<PathBuf>,
    endpoints: RwLock<BTreeMap<String, Arc<Endpoint>>>,
    folders: Mutex<Folders>,
    stop: Arc<AtomicBool>,
}

impl Endpoints {
    /// Loads the endpoints the node config declares and every endpoint folder of
    /// `repository`. A plugin or folder that fails leaves its endpoint unavailable (reported
    /// with the reason); the node and the other endpoints still serve. Blocking: compiles.
    pub fn load(
        declared: &BTreeMap<String, EndpointConfig>,
        repository: Option<PathBuf>,
        runtime: Arc<PluginRuntime>,
    ) -> Endpoints {
        let endpoints = declared
            .iter()
            .map(|(name, config)| {
                let endpoint = Endpoint::new(name, config, Source::NodeConfig, None);
                let _ = endpoint.refresh(&runtime, true);
                (name.clone(), Arc::new(endpoint))
            })
            .collect();
        let endpoints = Endpoints {
            runtime,
            repository,
            endpoints: RwLock::new(endpoints),
            folders: Mutex::default(),
            stop: Arc::new(AtomicBool::new(false)),
        };
        endpoints.sync_repository();
        endpoints.runtime.sweep_cache();
        endpoints
    }

    /// The endpoint called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Endpoint>> {
        self.read().get(name).cloned()
    }

    /// Every endpoint, by name.
    pub fn all(&self) -> Vec<Arc<Endpoint>> {
        self.read().values().cloned().collect()
    }

    /// Every endpoint as the repository API lists it.
    pub fn status(&self) -> Vec<EndpointStatus> {
        self.all()
            .iter()
            .map(|endpoint| EndpointStatus {
                name: endpoint.name.clone(),
                model: endpoint.model.clone(),
                source: endpoint.source,
                ready: endpoint.readiness().is_ok(),
                reason: endpoint.last_error(),
                plugins: endpoint.versions(),
            })
            .collect()
    }

    /// The plugin runtime the endpoints share.
    pub fn runtime(&self) -> &Arc<PluginRuntime> {
        &self.runtime
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Endpoint>>> {
        self.endpoints.read().unwrap_or_else(|p| p.into_inner())
    }

    fn folders(&self) -> std::sync::MutexGuard<'_, Folders> {
        self.folders.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads every plugin of `name` again now (the admin call): a config endpoint from its
    /// files, a repository endpoint from its folder (not one an admin unloaded: that takes a
    /// load). Blocking: compiles.
    pub fn reload(&self, name: &str) -> Result<(), InferError> {
        if self.folders().held.contains(name) {
            return Err(InferError::EndpointNotFound {
                endpoint: name.to_string(),
            });
        }
        self.load_or_reload(name)
    }

    fn load_or_reload(&self, name: &str) -> Result<(), InferError> {
        let endpoint = self.get(name);
        let loaded = match endpoint {
            Some(endpoint) if endpoint.source == Source::NodeConfig => endpoint
                .refresh(&self.runtime, true)
                .map(|_| ())
                .map_err(|reason| endpoint.not_reloaded(reason)),
            _ => self.load_folder(name),
        };
        self.runtime.sweep_cache();
        loaded
    }

    /// Loads the repository endpoint `name` (the admin call), also one an admin unloaded.
    /// Blocking: compiles.
    pub fn load_by_name(&self, name: &str) -> Result<(), InferError> {
        self.folders().held.remove(name);
        self.load_or_reload(name)
    }

    /// Unloads the repository endpoint `name` (the admin call); it stays unloaded, whatever
    /// its folder does, until loaded by name.
    pub fn unload(&self, name: &str) -> Result<(), InferError> {
        let Some(endpoint) = self.get(name) else {
            return Err(InferError::EndpointNotFound {
                endpoint: name.to_string(),
            });
        };
        if endpoint.source == Source::NodeConfig {
            return Err(InferError::InvalidInput(format!(
                "endpoint '{name}' is declared in the node's config; remove it there"
            )));
        }
        self.folders().held.insert(name.to_string());
        self.remove(name);
        self.runtime.sweep_cache();
        tracing::info!(endpoint = %name, "endpoint unloaded");
        Ok(())
    }

    fn remove(&self, name: &str) {
        let removed = self
            .endpoints
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        if let Some(endpoint) = removed {
            endpoint.retire(&self.runtime);
        }
        self.folders().seen.remove(name);
    }

    /// Reads the endpoint folder `name` and swaps the endpoint it defines in, if its plugins
    /// load; else the previous version keeps serving (or, with none, the endpoint answers
    /// 503 with the reason).
    fn load_folder(&self, name: &str) -> Result<(), InferError> {
        let not_found = || InferError::EndpointNotFound {
            endpoint: name.to_string(),
        };
        let root = self.repository.as_deref().ok_or_else(not_found)?;
        let dir = root.join(name);
        if crate::model::repository::Repository::check_name(name).is_err()
            || !folder::is_endpoint(&dir)
        {
            return Err(not_found());
        }
        if self
            .get(name)
            .is_some_and(|e| e.source == Source::NodeConfig)
        {
            return Err(InferError::InvalidInput(format!(
                "endpoint '{name}' is declared in the node's config, which wins over its repository folder"
            )));
        }
        self.folders()
            .seen
            .insert(name.to_string(), folder::stamp(&dir));
        let built = folder::read(root, name)
            .map_err(|e| e.to_string())
            .and_then(|read| {
                let tables = if read.tables.is_empty() {
                    None
                } else {
                    Some(Arc::new(
                        FeatureTables::load(&read.tables).map_err(|e| e.to_string())?,
                    ))
                };
                let endpoint = Endpoint::new(name, &read.config, Source::Repository, tables);
                endpoint.refresh(&self.runtime, true)?;
                Ok(endpoint)
            });
        let mut endpoints = self.endpoints.write().unwrap_or_else(|p| p.into_inner());
        match built {
            Ok(endpoint) => {
                let versions = endpoint.versions();
                let previous = endpoints.insert(name.to_string(), Arc::new(endpoint));
                drop(endpoints);
                let shown: Vec<String> = versions
                    .iter()
                    .map(|v| format!("{}={}@{}", v.stage, v.plugin, v.version))
                    .collect();
                if let Some(previous) = previous {
                    previous.retire(&self.runtime);
                    tracing::info!(endpoint = %name, plugins = %shown.join(" "), "endpoint replaced from its repository folder");
                } else {
                    tracing::info!(endpoint = %name, plugins = %shown.join(" "), "endpoint loaded from the repository");
                }
                Ok(())
            }
            Err(reason) => match endpoints.get(name) {
                Some(previous) if previous.plugins().is_ok() => {
                    tracing::error!(endpoint = %name, %reason, "endpoint folder not loaded; the previous version keeps serving");
                    previous.set_error(reason.clone());
                    Err(InferError::EndpointNotReplaced {
                        endpoint: name.to_string(),
                        reason,
                    })
                }
                _ => {
                    tracing::error!(endpoint = %name, %reason, "endpoint folder not loaded");
                    let broken = Endpoint::broken(name, Source::Repository, reason.clone());
                    endpoints.insert(name.to_string(), Arc::new(broken));
                    Err(InferError::EndpointUnavailable {
                        endpoint: name.to_string(),
                        reason,
                    })
                }
            },
        }
    }

    /// Brings the repository endpoints in line with the folders on disk: new and changed
    /// folders are (re)loaded, removed ones unloaded. Blocking: compiles.
    pub fn sync_repository(&self) {
        let Some(root) = &self.repository else {
            return;
        };
        let on_disk = folder::names(root);
        let gone: Vec<String> = self
            .all()
            .iter()
            .filter(|e| e.source == Source::Repository && !on_disk.contains(&e.name))
            .map(|e| e.name.clone())
            .collect();
        for name in gone {
            self.remove(&name);
            tracing::info!(endpoint = %name, "endpoint folder removed; endpoint unloaded");
        }
        for name in on_disk {
            let (held, seen) = {
                let folders = self.folders();
                (
                    folders.held.contains(&name),
                    folders.seen.get(&name).cloned(),
                )
            };
            let declared = self
                .get(&name)
                .is_some_and(|e| e.source == Source::NodeConfig);
            if held || declared || seen == Some(folder::stamp(&root.join(&name))) {
                continue;
            }
            let _ = self.load_folder(&name);
        }
    }

    /// Checks every endpoint's files for changes every `interval` and swaps in new versions,
    /// on a background thread that ends when `self` is dropped.
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
                    for endpoint in endpoints.all() {
                        if endpoint.source == Source::NodeConfig
                            && let Ok(true) = endpoint.refresh(&endpoints.runtime, false)
                        {
                            tracing::info!(endpoint = %endpoint.name, "plugins hot-swapped");
                        }
                    }
                    endpoints.sync_repository();
                    endpoints.runtime.sweep_cache();
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
