//! A model's `config.toml`: everything an operator may set, each knob with a default that
//! works on a laptop. Shapes and datatypes are not here: they are read from the ONNX file.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// Rows per batch when the config sets none and the model can batch.
pub const DEFAULT_MAX_BATCH_SIZE: usize = 64;

/// Where a model's sessions run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProvider {
    /// ONNX Runtime's CPU provider, always present.
    Cpu,
    /// NVIDIA CUDA (needs the `onnxruntime-gpu` wheel and a GPU).
    Cuda,
    /// NVIDIA TensorRT (needs the `onnxruntime-gpu` wheel, TensorRT and a GPU).
    Tensorrt,
}

impl ExecutionProvider {
    /// The name operators write in config.
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionProvider::Cpu => "cpu",
            ExecutionProvider::Cuda => "cuda",
            ExecutionProvider::Tensorrt => "tensorrt",
        }
    }
}

/// Which versions of a model to serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum VersionPolicy {
    /// `"latest"` (the default) or `"all"`.
    Named(NamedPolicy),
    /// An explicit list of version numbers.
    Specific(Vec<u64>),
}

impl Default for VersionPolicy {
    fn default() -> Self {
        VersionPolicy::Named(NamedPolicy::Latest)
    }
}

/// The named version policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NamedPolicy {
    /// Only the highest version number.
    Latest,
    /// Every version folder.
    All,
}

impl VersionPolicy {
    /// Picks the versions to serve from those on disk (sorted ascending).
    pub fn select(&self, available: &[u64]) -> Vec<u64> {
        match self {
            VersionPolicy::Named(NamedPolicy::All) => available.to_vec(),
            VersionPolicy::Specific(wanted) => available
                .iter()
                .copied()
                .filter(|v| wanted.contains(v))
                .collect(),
            VersionPolicy::Named(NamedPolicy::Latest) => {
                available.last().copied().into_iter().collect()
            }
        }
    }
}

/// A model's configuration; every field is optional in the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Largest batch (rows along dimension 0) the batcher merges requests into; 0 disables
    /// batching. `None` means: 64 if every input's first dimension is dynamic, else 0. A
    /// request with more rows than this runs on its own, as one batch.
    pub max_batch_size: Option<usize>,
    /// Most rows one request may carry; `None` leaves it to the front door's `max_body_bytes`.
    pub max_request_rows: Option<usize>,
    /// Longest a partial batch may wait to fill while another session is busy, in µs.
    pub max_queue_delay_us: u64,
    /// ONNX Runtime sessions (each on its own worker thread); unset, chosen at load from how
    /// the model runs here ([`crate::model::tuning`]).
    pub instances: Option<usize>,
    /// Threads per session for one operator; 0 = the machine's cores divided among instances;
    /// unset, chosen at load with `instances`.
    pub intra_op_threads: Option<usize>,
    /// Requests that may wait in the queue before new ones are shed with 503.
    pub queue_capacity: usize,
    /// The longest a request without a deadline may expect to wait in the queue (µs), as
    /// predicted from the queue ahead and recent run times; one that would wait longer is
    /// refused at once with 503 and Retry-After. Unset: 50 recent runs, at least 20 ms, once
    /// more than two full batches are queued per session; 0: no bound but `queue_capacity`.
    pub max_queue_wait_us: Option<u64>,
    /// Deadline for a request that sets none, in µs; 0 = no deadline (as a request's own 0).
    pub default_timeout_us: u64,
    /// Execution providers in order of preference; CPU is always the last resort.
    pub execution_providers: Vec<ExecutionProvider>,
    /// Load on CPU when a listed GPU provider is unavailable, instead of failing the load.
    pub fallback_to_cpu: bool,
    /// Which version folders to serve.
    pub versions: VersionPolicy,
    /// In a mesh, how many nodes serve this model; 0 means every node that holds it. Not
    /// together with `min_replicas`/`max_replicas`.
    pub replicas: u16,
    /// In a mesh, the fewest nodes that serve this model when its replica count follows load;
    /// set with `max_replicas`.
    pub min_replicas: Option<u16>,
    /// In a mesh, the most nodes that serve this model when its replica count follows load.
    pub max_replicas: Option<u16>,
    /// With `min_replicas`/`max_replicas`: the requests in flight (queued or running) one
    /// replica is meant to carry, on average. The mesh adds replicas when the model's requests
    /// in flight across its replicas exceed this many per replica for a couple of seconds,
    /// and removes them when they stay well below it for `scale_down_window_s`.
    pub target_in_flight: f64,
    /// Seconds the load must stay low before a replica is removed.
    pub scale_down_window_s: u32,
    /// A model whose recent runs take less than this (µs) runs a request inline on the front
    /// door's thread when a session is idle and nothing is queued, skipping the hand-off to
    /// its worker thread; 0 never does (every request goes through the queue).
    pub inline_max_us: u64,
    /// Runs up to this long (µs) may also be inline on an idle session, after the front
    /// door's thread hands its other work to another thread first (tokio's `block_in_place`;
    /// multi-threaded runtimes only), so a slower model at low load skips the two thread
    /// hand-offs too; 0 never does.
    pub inline_blocking_max_us: u64,
    /// Requests for the model arriving closer together than this (µs, a recent average) while
    /// others are often in progress queue and batch on its workers instead of running inline:
    /// under that load the front door's threads are the bottleneck, and taking the model's
    /// work off them (in batches) serves more. The default (1 ms) leaves the decision to
    /// overlap alone at any rate a front door is busy with; 0 lets any rate run inline.
    pub inline_min_gap_us: u64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            max_batch_size: None,
            max_request_rows: None,
            max_queue_delay_us: 100,
            instances: None,
            intra_op_threads: None,
            queue_capacity: 1024,
            max_queue_wait_us: None,
            default_timeout_us: 0,
            execution_providers: vec![ExecutionProvider::Cpu],
            fallback_to_cpu: false,
            versions: VersionPolicy::default(),
            replicas: 0,
            min_replicas: None,
            max_replicas: None,
            target_in_flight: 8.0,
            scale_down_window_s: 30,
            inline_max_us: 50,
            inline_blocking_max_us: 2_000,
            inline_min_gap_us: 1_000,
        }
    }
}

/// A config file that could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is invalid or has unknown keys.
    #[error("invalid {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong, with line and column.
        message: String,
    },
    /// A value is out of its range.
    #[error("invalid {path}: {message}")]
    Value {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

impl ModelConfig {
    /// Reads `path`, or returns the defaults if it does not exist.
    pub fn load_or_default(path: &Path) -> Result<ModelConfig, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ModelConfig::default()),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                });
            }
        };
        let config: ModelConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        config.check().map_err(|message| ConfigError::Value {
            path: path.display().to_string(),
            message,
        })?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        if self.instances == Some(0) {
            return Err("instances must be at least 1".into());
        }
        if self.queue_capacity == 0 {
            return Err("queue_capacity must be at least 1".into());
        }
        if self.execution_providers.is_empty() {
            return Err("execution_providers must name at least one provider".into());
        }
        match (self.min_replicas, self.max_replicas) {
            (None, None) => {}
            (Some(min), Some(max)) => {
                if min == 0 || max < min {
                    return Err(format!(
                        "min_replicas ({min}) must be at least 1 and at most max_replicas ({max})"
                    ));
                }
                if self.replicas != 0 {
                    return Err("set either replicas or min_replicas/max_replicas, not both".into());
                }
            }
            _ => return Err("min_replicas and max_replicas go together".into()),
        }
        if !(self.target_in_flight.is_finite() && self.target_in_flight > 0.0) {
            return Err("target_in_flight must be a positive number".into());
        }
        if self.scale_down_window_s == 0 {
            return Err("scale_down_window_s must be at least 1".into());
        }
        Ok(())
    }

    /// The replica bounds when the count follows load (`min_replicas` and `max_replicas`).
    pub fn replica_range(&self) -> Option<(u16, u16)> {
        self.min_replicas.zip(self.max_replicas)
    }

    /// The settings that spend this machine's resources, brought within what it has: for a
    /// config this node did not get from its operator (one that came over the mesh), whose
    /// author may not know, or may abuse, the machine. Sessions and threads per session at
    /// most the cores; the queue at most its default.
    pub fn clamped_to(mut self, cores: usize) -> ModelConfig {
        let cores = cores.max(1);
        self.instances = self.instances.map(|n| n.min(cores));
        self.intra_op_threads = self.intra_op_threads.map(|n| n.min(cores));
        self.queue_capacity = self
            .queue_capacity
            .min(ModelConfig::default().queue_capacity);
        self
    }

    /// Threads per session, resolving unset or 0 to a share of the machine.
    pub fn resolved_intra_op_threads(&self) -> usize {
        match self.intra_op_threads {
            Some(threads) if threads > 0 => threads,
            _ => {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                (cores / self.instances.unwrap_or(1).max(1)).max(1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_knob_and_rejects_typos() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "max_batch_size = 32\nmax_queue_delay_us = 250\ninstances = 2\nintra_op_threads = 1\n\
             queue_capacity = 10\ndefault_timeout_us = 5000\nexecution_providers = [\"cuda\", \"cpu\"]\n\
             fallback_to_cpu = true\nversions = [1, 3]\ninline_max_us = 0\n\
             inline_blocking_max_us = 0\ninline_min_gap_us = 0\n",
        )
        .unwrap();
        let config = ModelConfig::load_or_default(&path).unwrap();
        assert_eq!(config.max_batch_size, Some(32));
        assert_eq!(config.inline_max_us, 0);
        assert_eq!(config.inline_blocking_max_us, 0);
        assert_eq!(config.inline_min_gap_us, 0);
        assert_eq!(config.instances, Some(2));
        assert_eq!(config.intra_op_threads, Some(1));
        assert_eq!(
            config.execution_providers,
            vec![ExecutionProvider::Cuda, ExecutionProvider::Cpu]
        );
        assert_eq!(config.versions.select(&[1, 2, 3]), vec![1, 3]);

        std::fs::write(&path, "max_batch_sise = 32\n").unwrap();
        let err = ModelConfig::load_or_default(&path).unwrap_err().to_string();
        assert!(err.contains("max_batch_sise"), "{err}");

        std::fs::write(&path, "instances = 0\n").unwrap();
        assert!(ModelConfig::load_or_default(&path).is_err());
    }

    #[test]
    fn replicas_that_follow_load_need_both_bounds_in_order_and_no_fixed_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let parse = |text: &str| {
            std::fs::write(&path, text).unwrap();
            ModelConfig::load_or_default(&path)
        };
        let config = parse(
            "min_replicas = 1\nmax_replicas = 3\ntarget_in_flight = 4.5\nscale_down_window_s = 10\n",
        )
        .unwrap();
        assert_eq!(config.replica_range(), Some((1, 3)));
        assert_eq!(config.target_in_flight, 4.5);
        assert_eq!(config.scale_down_window_s, 10);
        assert_eq!(ModelConfig::default().replica_range(), None);
        for (text, complaint) in [
            ("min_replicas = 1\n", "go together"),
            (
                "min_replicas = 3\nmax_replicas = 2\n",
                "at most max_replicas",
            ),
            ("min_replicas = 0\nmax_replicas = 2\n", "at least 1"),
            (
                "replicas = 2\nmin_replicas = 1\nmax_replicas = 2\n",
                "not both",
            ),
            ("target_in_flight = 0.0\n", "positive"),
            ("target_in_flight = nan\n", "positive"),
            ("scale_down_window_s = 0\n", "at least 1"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(complaint), "{text:?}: {err}");
        }
    }

    #[test]
    fn missing_file_means_defaults() {
        let config = ModelConfig::load_or_default(Path::new("/nonexistent/config.toml")).unwrap();
        assert_eq!(config, ModelConfig::default());
        assert_eq!(config.versions.select(&[1, 2, 5]), vec![5]);
    }

    #[test]
    fn named_version_policies() {
        let all: ModelConfig = toml::from_str("versions = \"all\"").unwrap();
        assert_eq!(all.versions.select(&[1, 2]), vec![1, 2]);
        let latest: ModelConfig = toml::from_str("versions = \"latest\"").unwrap();
        assert_eq!(latest.versions.select(&[1, 2]), vec![2]);
    }
}
