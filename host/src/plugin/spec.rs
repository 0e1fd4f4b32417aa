//! A plugin entry of an endpoint's config: which file, which stage's sandbox, and its bounds.

use crate::plugin::limits::PluginLimits;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

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

/// Whether calls share warm instances.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Isolation {
    /// Calls reuse warm instances of the same endpoint stage (a call costs about what the
    /// guest's work costs). State a guest keeps may be seen by later calls of that stage, up to
    /// `max_calls_per_instance`; an instance is discarded after any trap.
    #[default]
    Reuse,
    /// Every call gets a fresh instance: nothing a guest keeps survives the call.
    PerCall,
}

/// A plugin as an endpoint's config names it, with its sandbox.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginSpec {
    /// The component file (`.wasm`, built for wasm32-wasip2).
    pub path: PathBuf,
    /// The string the plugin's `init` receives.
    #[serde(default)]
    pub config: String,
    /// Running-time limit per call, in ms: time the plugin spends executing, not time it waits
    /// for a thread while the node is busy.
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
    /// Running-time limit, in ms, for starting an instance: instantiation (the component's
    /// start functions) and `init`. Starting costs more than a call (an interpreter's start-up,
    /// tables built from the config) and happens at load or off the request path, except with
    /// `isolation = "per-call"`.
    #[serde(default = "default_start_deadline_ms")]
    pub start_deadline_ms: u64,
    /// Wall-clock limit per call, in ms, waiting included: a plugin blocked or sleeping in a
    /// WASI call is stopped here. Default: four times `deadline_ms` plus one second (a long
    /// call rests between its slices, so its running time takes longer on the wall clock).
    #[serde(default)]
    pub wall_timeout_ms: Option<u64>,
    /// Linear-memory cap per instance, in bytes (all of a component's memories together).
    #[serde(default = "default_memory_bytes")]
    pub memory_bytes: usize,
    /// Fuel budget per call (needs `plugins.fuel = true`); `None` means unmetered.
    #[serde(default)]
    pub fuel: Option<u64>,
    /// A development switch: a failed call's 500 also says where in the plugin's source it
    /// failed (a Rust panic's `FILE:LINE:COL`, the innermost frame and exception of a Python
    /// traceback). Off by default: that is the author's business, not a client's.
    #[serde(default)]
    pub debug: bool,
    /// Whether calls reuse warm instances.
    #[serde(default)]
    pub isolation: Isolation,
    /// With `reuse`, an instance is discarded after this many calls.
    #[serde(default = "default_max_calls_per_instance")]
    pub max_calls_per_instance: u64,
    /// With `reuse`, an instance whose memory has grown past this many bytes is discarded after
    /// its call; default: three quarters of `memory_bytes`.
    #[serde(default)]
    pub recycle_memory_bytes: Option<usize>,
    /// Calls of this plugin (at this endpoint stage) that may run at once; more wait.
    #[serde(default = "default_max_instances")]
    pub max_instances: u32,
    /// How long, in ms, a call waits for an instance before it is answered 503.
    #[serde(default = "default_queue_timeout_ms")]
    pub queue_timeout_ms: u64,
    /// Running time, in ms per second, that failed calls and starts of this plugin (at this
    /// endpoint stage) may take before its calls pause (503 with `Retry-After`) until the
    /// budget refills; default: an eighth of the node's cores ([`crate::plugin::failures`]).
    #[serde(default)]
    pub failure_budget_ms: Option<u64>,
    /// Request headers the plugin may see (case-insensitive); none by default.
    #[serde(default)]
    pub headers: Vec<String>,
    /// Bounds on what a call may spend and return.
    #[serde(default)]
    pub limits: PluginLimits,
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

fn default_start_deadline_ms() -> u64 {
    500
}

fn default_memory_bytes() -> usize {
    64 << 20
}

fn default_max_calls_per_instance() -> u64 {
    10_000
}

fn default_max_instances() -> u32 {
    16
}

fn default_queue_timeout_ms() -> u64 {
    250
}

impl PluginSpec {
    /// A spec for `path` with every other setting at its default.
    pub fn new(path: impl Into<PathBuf>) -> PluginSpec {
        PluginSpec {
            path: path.into(),
            config: String::new(),
            deadline_ms: default_deadline_ms(),
            start_deadline_ms: default_start_deadline_ms(),
            wall_timeout_ms: None,
            memory_bytes: default_memory_bytes(),
            fuel: None,
            debug: false,
            isolation: Isolation::default(),
            max_calls_per_instance: default_max_calls_per_instance(),
            recycle_memory_bytes: None,
            max_instances: default_max_instances(),
            queue_timeout_ms: default_queue_timeout_ms(),
            failure_budget_ms: None,
            headers: Vec::new(),
            limits: PluginLimits::default(),
            dirs: Vec::new(),
            env: BTreeMap::new(),
        }
    }

    /// The wall-clock limit of one call.
    pub fn wall_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.wall_timeout_ms
                .unwrap_or(self.deadline_ms.saturating_mul(4).saturating_add(1000)),
        )
    }

    /// The wall-clock limit of starting an instance: like a call's default, four times its
    /// running-time limit plus one second.
    pub fn start_wall_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.start_deadline_ms
                .saturating_mul(4)
                .saturating_add(1000),
        )
    }

    /// Running time per second that failed calls may take before calls pause.
    pub fn failure_budget(&self) -> std::time::Duration {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        std::time::Duration::from_millis(self.failure_budget_ms.unwrap_or(125 * cores))
    }

    /// The memory past which a reused instance is discarded.
    pub fn recycle_memory(&self) -> usize {
        self.recycle_memory_bytes
            .unwrap_or(self.memory_bytes / 4 * 3)
    }

    /// The request headers this plugin may see, names in lower case: only those its config
    /// lists (so `authorization` and `cookie` only when listed by name).
    pub fn visible_headers<'a>(
        &self,
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Vec<(String, String)> {
        if self.headers.is_empty() {
            return Vec::new();
        }
        headers
            .into_iter()
            .filter(|(name, _)| self.headers.iter().any(|h| h.eq_ignore_ascii_case(name)))
            .map(|(name, value)| (name.to_ascii_lowercase(), value.to_string()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugins_see_only_the_headers_their_config_lists() {
        let sent = [
            ("authorization", "Bearer secret"),
            ("cookie", "session=1"),
            ("x-user", "u1"),
            ("X-Region", "eu"),
        ];
        let mut spec = PluginSpec::new("p.wasm");
        assert!(spec.visible_headers(sent).is_empty());
        spec.headers = vec!["x-user".into(), "x-region".into()];
        assert_eq!(
            spec.visible_headers(sent),
            vec![
                ("x-user".to_string(), "u1".to_string()),
                ("x-region".to_string(), "eu".to_string())
            ]
        );
        spec.headers.push("Authorization".into());
        assert_eq!(spec.visible_headers(sent).len(), 3);
    }

    #[test]
    fn a_plugin_entry_parses_with_defaults_and_refuses_unknown_keys() {
        let spec: PluginSpec = toml::from_str(
            "path = \"p.wasm\"\nisolation = \"per-call\"\nlimits = { output_tensors = 4 }",
        )
        .unwrap();
        assert_eq!(spec.isolation, Isolation::PerCall);
        assert_eq!(spec.limits.output_tensors, 4);
        assert_eq!(spec.limits.lookup_key_bytes, 1024);
        assert_eq!(spec.recycle_memory(), 48 << 20);
        assert_eq!(spec.deadline_ms, 50);
        assert_eq!(spec.start_deadline_ms, 500);
        assert_eq!(spec.start_wall_timeout().as_millis(), 3000);
        assert!(toml::from_str::<PluginSpec>("path = \"p.wasm\"\nisolate = true").is_err());
    }
}
