//! The engine of one node: the loaded models, their loading and unloading at run time, and
//! the inference entry point that front doors call.
//!
//! A loaded model is immutable and shared (`Arc`); a reload builds a new one and swaps it in,
//! and the old one drains its queue before its workers exit, so no request is dropped.

use crate::batching::policy::{BatchLimits, Refused};
use crate::batching::scheduler::{
    Claim, InlineLimits, Job, JobError, JobResult, Scheduler, WaitBound,
};
use crate::error::InferError;
use crate::metrics::Metrics;
use crate::model::config::{DEFAULT_MAX_BATCH_SIZE, ModelConfig};
use crate::model::repository::Repository;
use crate::model::session::LoadError;
use crate::model::signature::Signature;
use crate::model::tuning;
use crate::request::{InferRequest, InferResponse};
use crate::runtime::{self, Runtime, RuntimeError};
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How the engine starts.
#[derive(Debug, Clone, Default)]
pub struct EngineConfig {
    /// The model repository directory.
    pub repository: PathBuf,
    /// The ONNX Runtime library; `None` means `ORT_DYLIB_PATH`, then discovery.
    pub onnxruntime_library: Option<PathBuf>,
}

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelLoadError {
    /// The name is not a valid folder name.
    #[error(transparent)]
    InvalidName(#[from] crate::model::repository::InvalidName),
    /// The repository has no such model folder.
    #[error(
        "model '{model}' not found in repository {root} (expected {root}/{model}/<version>/model.onnx)"
    )]
    NotInRepository {
        /// The model.
        model: String,
        /// The repository root.
        root: String,
    },
    /// The config matched no version folder.
    #[error(
        "model '{model}': the version policy selects none of the versions on disk {available:?}"
    )]
    NoVersionSelected {
        /// The model.
        model: String,
        /// Versions found.
        available: Vec<u64>,
    },
    /// The config file is invalid.
    #[error(transparent)]
    Config(#[from] crate::model::config::ConfigError),
    /// ONNX Runtime refused the model.
    #[error(transparent)]
    Session(#[from] LoadError),
    /// A worker thread could not be started.
    #[error("model '{model}': cannot start worker threads: {source}")]
    Threads {
        /// The model.
        model: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// One version of a model, with its queue and sessions.
pub struct ModelVersion {
    /// The model's name.
    pub name: String,
    /// The version number.
    pub version: u64,
    /// Inputs and outputs, read from the ONNX file.
    pub signature: Signature,
    /// Rows per batch; 0 when the model does not batch.
    pub max_batch_size: usize,
    /// The config it was loaded with, `instances` and `intra_op_threads` as chosen at load.
    pub config: ModelConfig,
    /// Why it has those sessions and threads ([`crate::model::tuning`]).
    pub tuning: String,
    scheduler: Scheduler,
}

/// A loaded model: every version the config selected.
pub struct LoadedModel {
    /// The model's name.
    pub name: String,
    /// Its versions, ascending.
    pub versions: BTreeMap<u64, Arc<ModelVersion>>,
}

impl LoadedModel {
    /// The version asked for, or the newest when `None`.
    pub fn version(&self, version: Option<&str>) -> Result<&Arc<ModelVersion>, InferError> {
        let found = match version {
            None | Some("") => self.versions.values().next_back(),
            Some(v) => v.parse::<u64>().ok().and_then(|v| self.versions.get(&v)),
        };
        found.ok_or_else(|| InferError::VersionNotFound {
            model: self.name.clone(),
            version: version.unwrap_or_default().to_string(),
        })
    }

    fn drain(&self) {
        for version in self.versions.values() {
            version.scheduler.drain();
        }
    }
}

/// The state of a model as the repository index reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// The model's name.
    pub name: String,
    /// Loaded versions (empty when not loaded).
    pub versions: Vec<u64>,
    /// `READY`, or `UNAVAILABLE` with a reason.
    pub ready: bool,
    /// Why it is not ready, if it is not.
    pub reason: String,
}

/// A request's answer: already computed (run inline), or queued for a worker.
enum Pending {
    Done(JobResult),
    Queued {
        receiver: oneshot::Receiver<JobResult>,
        claim: Arc<Claim>,
    },
}

/// The node's engine. See the module docs.
pub struct Engine {
    runtime: &'static Runtime,
    repository: Repository,
    models: RwLock<BTreeMap<String, Arc<LoadedModel>>>,
    failures: RwLock<BTreeMap<String, String>>,
    metrics: Arc<Metrics>,
    /// Loads and unloads are serialised so two reloads of a model cannot interleave.
    admin: Mutex<()>,
    ready: AtomicBool,
    /// Set once the engine drains for good: a model missing then is gone because the node is
    /// stopping, which is a 503 to retry elsewhere, not a 404.
    stopping: AtomicBool,
}

impl Engine {
    /// Starts ONNX Runtime and an empty engine over `config.repository`.
    pub fn new(config: &EngineConfig, metrics: Arc<Metrics>) -> Result<Engine, RuntimeError> {
        let runtime = runtime::init(config.onnxruntime_library.as_deref())?;
        Ok(Engine {
            runtime,
            repository: Repository::new(&config.repository),
            models: RwLock::new(BTreeMap::new()),
            failures: RwLock::new(BTreeMap::new()),
            metrics,
            admin: Mutex::new(()),
            ready: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
        })
    }

    /// The metrics this engine records into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The repository this engine loads from.
    pub fn repository(&self) -> &Repository {
        &self.repository
    }

    /// The ONNX Runtime library in use.
    pub fn runtime_library(&self) -> &std::path::Path {
        &self.runtime.library
    }

    /// Loads every model in the repository. A model that fails is logged and reported as
    /// unavailable; the others still serve. Marks the engine ready when done.
    pub fn load_all(&self) -> std::io::Result<()> {
        for name in self.repository.model_names()? {
            if let Err(e) = self.load(&name) {
                tracing::error!(model = %name, error = %e, "model failed to load");
            }
        }
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Whether the node has finished loading and is not shutting down.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Loads (or reloads) `name` from the repository. Blocking: sessions are built here.
    pub fn load(&self, name: &str) -> Result<(), ModelLoadError> {
        Repository::check_name(name)?;
        let _admin = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        let outcome = self.build(name);
        match outcome {
            Ok(model) => {
                let versions: Vec<u64> = model.versions.keys().copied().collect();
                let old = write(&self.models).insert(name.to_string(), Arc::new(model));
                write(&self.failures).remove(name);
                if let Some(old) = old {
                    drain_in_background(old);
                }
                tracing::info!(model = name, ?versions, "model loaded");
                Ok(())
            }
            Err(e) => {
                // A model that is not in the repository at all has no state to report.
                if !matches!(e, ModelLoadError::NotInRepository { .. }) {
                    write(&self.failures).insert(name.to_string(), e.to_string());
                }
                Err(e)
            }
        }
    }

    /// Unloads `name`: new requests get 404, queued ones still finish.
    pub fn unload(&self, name: &str) -> Result<(), InferError> {
        let _admin = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        write(&self.failures).remove(name);
        match write(&self.models).remove(name) {
            Some(old) => {
                drain_in_background(old);
                tracing::info!(model = name, "model unloaded");
                Ok(())
            }
            None => Err(InferError::ModelNotFound {
                model: name.to_string(),
            }),
        }
    }

    fn build(&self, name: &str) -> Result<LoadedModel, ModelLoadError> {
        let available = self.repository.versions(name);
        if available.is_empty() {
            return Err(ModelLoadError::NotInRepository {
                model: name.to_string(),
                root: self.repository.root().display().to_string(),
            });
        }
        let config = self.repository.config(name)?;
        let selected = config.versions.select(&available);
        if selected.is_empty() {
            return Err(ModelLoadError::NoVersionSelected {
                model: name.to_string(),
                available,
            });
        }
        let mut versions = BTreeMap::new();
        for version in selected {
            let path = self.repository.model_path(name, version);
            let (sessions, choice) =
                tuning::load_sessions(self.runtime, &path, &config, tuning::Machine::here())?;
            tracing::info!(
                model = name,
                version,
                instances = choice.instances,
                intra_op_threads = choice.intra_op_threads,
                why = %choice.reason,
                "sessions chosen"
            );
            let config = ModelConfig {
                instances: Some(choice.instances),
                intra_op_threads: Some(choice.intra_op_threads),
                ..config.clone()
            };
            let signature = sessions[0].signature().clone();
            let max_batch_size = match config.max_batch_size {
                Some(n) => n,
                None if signature.supports_batching() => DEFAULT_MAX_BATCH_SIZE,
                None => 0,
            };
            if max_batch_size > 0 && !signature.supports_batching() {
                tracing::warn!(
                    model = name,
                    version,
                    "max_batch_size set, but not every input and output has a dynamic first dimension; batching disabled"
                );
            }
            let max_batch_size = if signature.supports_batching() {
                max_batch_size
            } else {
                0
            };
            let limits = BatchLimits {
                max_batch_rows: max_batch_size,
                max_queue_delay: Duration::from_micros(config.max_queue_delay_us),
                queue_capacity: config.queue_capacity,
            };
            let scheduler = Scheduler::start(
                &format!("{name}-{version}"),
                sessions,
                limits,
                InlineLimits {
                    direct: Duration::from_micros(config.inline_max_us),
                    blocking: Duration::from_micros(config.inline_blocking_max_us),
                    min_gap: Duration::from_micros(config.inline_min_gap_us),
                },
                WaitBound::from_config(config.max_queue_wait_us),
                self.metrics.model(name),
            )
            .map_err(|source| ModelLoadError::Threads {
                model: name.to_string(),
                source,
            })?;
            versions.insert(
                version,
                Arc::new(ModelVersion {
                    name: name.to_string(),
                    version,
                    signature,
                    max_batch_size,
                    config,
                    tuning: choice.reason,
                    scheduler,
                }),
            );
        }
        Ok(LoadedModel {
            name: name.to_string(),
            versions,
        })
    }

    /// The loaded model `name`.
    pub fn model(&self, name: &str) -> Option<Arc<LoadedModel>> {
        read(&self.models).get(name).cloned()
    }

    /// The names of the loaded models, sorted.
    pub fn loaded_models(&self) -> Vec<String> {
        read(&self.models).keys().cloned().collect()
    }

    /// Requests waiting across every loaded model.
    pub fn queue_depth(&self) -> usize {
        read(&self.models)
            .values()
            .flat_map(|m| m.versions.values())
            .map(|v| v.scheduler.depth())
            .sum()
    }

    /// Every model in the repository or loaded, with its state.
    pub fn index(&self) -> Vec<IndexEntry> {
        // The directory is read before the map is locked: no disk I/O under the model lock.
        let mut names: Vec<String> = self.repository.model_names().unwrap_or_default();
        let models = read(&self.models);
        let failures = read(&self.failures);
        names.extend(models.keys().cloned());
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|name| {
                let loaded = models.get(&name);
                IndexEntry {
                    versions: loaded
                        .map(|m| m.versions.keys().copied().collect())
                        .unwrap_or_default(),
                    ready: loaded.is_some(),
                    reason: match (loaded, failures.get(&name)) {
                        (Some(_), _) => String::new(),
                        (None, Some(failure)) => failure.clone(),
                        (None, None) => "not loaded".to_string(),
                    },
                    name,
                }
            })
            .collect()
    }

    /// Refuses a request for `model` (at `version`) before its body is read when its queue
    /// would refuse any request for the wait alone ([`Scheduler::over_wait_bound`]), or, for
    /// a request whose deadline the door already knows (`timeout`, counted from `started`),
    /// when the queue ahead would make even a one-row request miss it
    /// ([`Scheduler::would_miss_deadline`]); counted as [`Engine::infer`] counts those
    /// refusals. A model not loaded here, or a version it does not have, passes:
    /// [`Engine::infer`] answers those.
    pub fn refuse_if_overloaded(
        &self,
        model: &str,
        version: Option<&str>,
        timeout: Option<Duration>,
        started: Instant,
    ) -> Result<(), InferError> {
        let Some(loaded) = self.model(model) else {
            return Ok(());
        };
        let Ok(chosen) = loaded.version(version) else {
            return Ok(());
        };
        if let Some((predicted, bound)) = chosen.scheduler.over_wait_bound() {
            self.metrics.record_refusal(model, "queue_wait");
            return Err(InferError::WouldWaitTooLong {
                model: model.to_string(),
                predicted_us: micros(predicted),
                bound_us: micros(bound),
            });
        }
        // 0 means "no deadline", as in [`Engine::infer`].
        if let Some(timeout) = timeout.filter(|t| !t.is_zero())
            && let Some(answer) = chosen
                .scheduler
                .would_miss_deadline(timeout.saturating_sub(started.elapsed()))
        {
            self.metrics.record_refusal(model, "deadline");
            return Err(InferError::WouldMissDeadline {
                model: model.to_string(),
                predicted_us: micros(answer),
                timeout_us: micros(timeout),
            });
        }
        Ok(())
    }

    /// Runs one request through its model's queue.
    pub async fn infer(&self, mut request: InferRequest) -> Result<InferResponse, InferError> {
        let enqueued_at = Instant::now();
        // Moved into the job, and back out of it when a reload closed its queue.
        let mut given = std::mem::take(&mut request.inputs);
        // In progress until answered: whether requests overlap decides inline runs.
        let mut _in_progress = None;
        // A reload swaps the model while a request may hold the old one: one retry picks up the new.
        let mut retried = false;
        let (version, selection, deadline, pending) = loop {
            let model = self.model(&request.model).ok_or_else(|| {
                let model = request.model.clone();
                if self.stopping.load(Ordering::Acquire) {
                    InferError::Closed { model }
                } else {
                    InferError::ModelNotFound { model }
                }
            })?;
            let version = model.version(request.version.as_deref())?.clone();
            _in_progress = Some(version.scheduler.enter());
            let (inputs, rows) = version.order_inputs(std::mem::take(&mut given))?;
            let selection = version.select_outputs(request.outputs.as_deref())?;
            // 0 means "no deadline" wherever a timeout is given: the request, the config.
            let timeout = request
                .timeout
                .or(Some(Duration::from_micros(
                    version.config.default_timeout_us,
                )))
                .filter(|t| !t.is_zero());
            let deadline = timeout.map(|t| enqueued_at + t);
            if let Some(done) = run_inline(&version.scheduler, &inputs, rows, enqueued_at, timeout)
            {
                break (
                    version,
                    selection,
                    deadline.zip(timeout),
                    Pending::Done(done),
                );
            }
            let (reply, receiver) = oneshot::channel();
            let claim = Arc::new(Claim::default());
            let job = Job {
                inputs,
                rows,
                enqueued_at,
                deadline,
                predicted_wait: None,
                reply,
                claim: claim.clone(),
            };
            match version.scheduler.submit(job) {
                Ok(()) => {
                    let pending = Pending::Queued { receiver, claim };
                    break (version, selection, deadline.zip(timeout), pending);
                }
                Err(Refused::Full(_)) => {
                    self.metrics.record_refusal(&request.model, "queue_full");
                    return Err(InferError::QueueFull {
                        model: request.model.clone(),
                        depth: version.scheduler.depth(),
                    });
                }
                Err(Refused::Closed(job)) if !retried => {
                    given = job.inputs;
                    retried = true;
                }
                Err(Refused::Closed(_)) => {
                    return Err(InferError::Closed {
                        model: request.model.clone(),
                    });
                }
                Err(Refused::WouldWaitTooLong {
                    predicted: answer,
                    bound,
                }) => {
                    self.metrics.record_refusal(&request.model, "queue_wait");
                    return Err(InferError::WouldWaitTooLong {
                        model: request.model.clone(),
                        predicted_us: micros(answer),
                        bound_us: micros(bound),
                    });
                }
                Err(Refused::WouldMissDeadline(_, answer)) => {
                    self.metrics.record_refusal(&request.model, "deadline");
                    return Err(InferError::WouldMissDeadline {
                        model: request.model.clone(),
                        predicted_us: micros(answer),
                        timeout_us: timeout.map_or(0, micros),
                    });
                }
            }
        };
        let expired =
            |waited: Duration, timeout: Duration, ran: bool| InferError::DeadlineExceeded {
                model: version.name.clone(),
                waited_us: waited.as_micros() as u64,
                timeout_us: timeout.as_micros() as u64,
                ran,
            };
        let answer = match (pending, deadline) {
            // An inline run starts at once and is shorter than the deadline as far as the
            // model's recent runs tell; one that still outlived it answers as a queued one does.
            (Pending::Done(_), Some((at, timeout))) if Instant::now() > at => {
                return Err(expired(enqueued_at.elapsed(), timeout, true));
            }
            (Pending::Done(done), _) => Ok(done),
            // Answer at the deadline even when every session is busy. A job still queued is
            // abandoned (its worker skips it); one a worker took ran, and its result is dropped.
            (Pending::Queued { receiver, claim }, Some((at, timeout))) => {
                match tokio::time::timeout_at(at.into(), receiver).await {
                    Ok(answer) => answer,
                    Err(_) => {
                        let ran = !claim.abandon();
                        return Err(expired(enqueued_at.elapsed(), timeout, ran));
                    }
                }
            }
            (Pending::Queued { receiver, .. }, None) => receiver.await,
        };
        let (outputs, timings) = match answer {
            Ok(Ok(done)) => done,
            Ok(Err(JobError::Expired { waited })) => {
                return Err(expired(
                    waited,
                    deadline.map(|d| d.1).unwrap_or_default(),
                    false,
                ));
            }
            Ok(Err(JobError::BadInput(message))) => return Err(InferError::InvalidInput(message)),
            Ok(Err(JobError::Run(message))) => {
                return Err(InferError::Runtime {
                    model: version.name.clone(),
                    message,
                });
            }
            Err(_) => {
                return Err(InferError::Runtime {
                    model: version.name.clone(),
                    message: "the inference worker stopped before answering".into(),
                });
            }
        };
        Ok(InferResponse {
            model_name: version.name.clone(),
            model_version: version.version.to_string(),
            id: request.id,
            outputs: pick(outputs, &selection),
            timings,
        })
    }

    /// Reports not-ready from now on, so health checks steer traffic away before the drain.
    pub fn begin_shutdown(&self) {
        self.ready.store(false, Ordering::Release);
    }

    /// Stops taking requests and waits until every queued request is answered.
    pub fn shutdown(&self) {
        self.ready.store(false, Ordering::Release);
        self.stopping.store(true, Ordering::Release);
        let models: Vec<Arc<LoadedModel>> = std::mem::take(&mut *write(&self.models))
            .into_values()
            .collect();
        for model in models {
            model.drain();
        }
    }
}

impl ModelVersion {
    /// How long a request joining this version's queue now would wait before it runs, as
    /// admission predicts it; `None` before it has run.
    pub fn predicted_wait(&self) -> Option<Duration> {
        self.scheduler.predicted_wait()
    }

    /// Checks `inputs` against the signature and orders them as the model declares them.
    /// Returns them with the request's row count along dimension 0.
    fn order_inputs(&self, inputs: Vec<Tensor>) -> Result<(Vec<Tensor>, usize), InferError> {
        let invalid = |message: String| InferError::InvalidInput(message);
        let mut ordered: Vec<Option<Tensor>> = vec![None; self.signature.inputs.len()];
        for tensor in inputs {
            let Some((position, spec)) = self.signature.input(&tensor.name) else {
                let expected: Vec<&str> = self
                    .signature
                    .inputs
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect();
                return Err(invalid(format!(
                    "model '{}' has no input '{}' (inputs: {})",
                    self.name,
                    tensor.name,
                    expected.join(", ")
                )));
            };
            if ordered[position].is_some() {
                return Err(invalid(format!(
                    "input '{}' given more than once",
                    tensor.name
                )));
            }
            if tensor.datatype != spec.datatype {
                return Err(invalid(format!(
                    "input '{}' has datatype {}, model '{}' expects {}",
                    tensor.name, tensor.datatype, self.name, spec.datatype
                )));
            }
            if !spec.accepts_shape(&tensor.shape) {
                return Err(invalid(format!(
                    "input '{}' has shape {:?}, model '{}' expects {:?} (-1 = any size)",
                    tensor.name, tensor.shape, self.name, spec.shape
                )));
            }
            tensor.validate().map_err(|e| invalid(e.to_string()))?;
            check_text(&tensor).map_err(invalid)?;
            ordered[position] = Some(tensor);
        }
        let mut complete = Vec::with_capacity(ordered.len());
        for (slot, spec) in ordered.into_iter().zip(&self.signature.inputs) {
            complete.push(slot.ok_or_else(|| {
                invalid(format!(
                    "missing input '{}' for model '{}'",
                    spec.name, self.name
                ))
            })?);
        }
        if self.max_batch_size == 0 {
            return Ok((complete, 1));
        }
        let rows = complete[0].shape[0];
        if let Some(other) = complete.iter().find(|t| t.shape[0] != rows) {
            return Err(invalid(format!(
                "inputs disagree on the batch dimension: '{}' has {} rows, '{}' has {}",
                complete[0].name, rows, other.name, other.shape[0]
            )));
        }
        // max_batch_size bounds what the batcher merges: a larger request runs on its own.
        let rows = rows as usize;
        let most = self.config.max_request_rows.unwrap_or(usize::MAX);
        if rows == 0 || rows > most {
            return Err(invalid(format!(
                "a request must have between 1 and {most} rows (max_request_rows of '{}'), got {rows}",
                self.name
            )));
        }
        Ok((complete, rows))
    }

    /// Positions of the requested outputs in the signature, in the order asked for.
    fn select_outputs(&self, wanted: Option<&[String]>) -> Result<Vec<usize>, InferError> {
        let Some(wanted) = wanted else {
            return Ok((0..self.signature.outputs.len()).collect());
        };
        wanted
            .iter()
            .map(|name| {
                self.signature.output(name).map(|(i, _)| i).ok_or_else(|| {
                    let available: Vec<&str> = self
                        .signature
                        .outputs
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect();
                    InferError::InvalidInput(format!(
                        "model '{}' has no output '{name}' (outputs: {})",
                        self.name,
                        available.join(", ")
                    ))
                })
            })
            .collect()
    }
}

fn pick(outputs: Vec<Tensor>, selection: &[usize]) -> Vec<Tensor> {
    if selection.len() == outputs.len() && selection.iter().enumerate().all(|(i, &s)| i == s) {
        return outputs;
    }
    selection
        .iter()
        .filter_map(|&i| outputs.get(i).cloned())
        .collect()
}

/// BYTES inputs become ONNX string tensors, which hold text: each element must be UTF-8
/// without NUL, checked here so one such request fails alone, before it is batched.
fn check_text(tensor: &Tensor) -> Result<(), String> {
    for (i, element) in tensor.bytes_elements().enumerate() {
        match std::str::from_utf8(element) {
            Err(_) => {
                return Err(format!(
                    "input '{}': BYTES element {i} is not valid UTF-8 (the model takes text)",
                    tensor.name
                ));
            }
            Ok(text) if text.contains('\0') => {
                return Err(format!(
                    "input '{}': BYTES element {i} holds a NUL byte (the model takes text)",
                    tensor.name
                ));
            }
            Ok(_) => {}
        }
    }
    Ok(())
}

fn drain_in_background(model: Arc<LoadedModel>) {
    let spawned = std::thread::Builder::new()
        .name(format!("drain-{}", model.name))
        .spawn(move || model.drain());
    if let Err(e) = spawned {
        // Without a thread the workers still exit on their own once the queue is empty.
        tracing::warn!(error = %e, "could not start a drain thread");
    }
}

/// A duration in whole µs, saturating (for error figures).
fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

/// Runs a request inline when its model's scheduler allows it: at once when the run is short,
/// and inside tokio's `block_in_place` when it is longer, so the thread's other tasks move to
/// another thread meanwhile (only a multi-threaded runtime can do that; elsewhere longer runs
/// queue for a worker).
fn run_inline(
    scheduler: &Scheduler,
    inputs: &[Tensor],
    rows: usize,
    arrived: Instant,
    timeout: Option<Duration>,
) -> Option<JobResult> {
    let may_block = tokio::runtime::Handle::try_current().is_ok_and(|runtime| {
        runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
    });
    let run = scheduler.claim_inline(rows, arrived, may_block, timeout)?;
    Some(if run.blocks() {
        tokio::task::block_in_place(move || run.run(inputs))
    } else {
        run.run(inputs)
    })
}
