//! The node's config file. Every field has a default that serves the bundled models on a
//! laptop; relative paths are taken relative to the config file.

use meshserve_host::endpoint::EndpointConfig;
use meshserve_host::plugin::features::{self, FeatureTableConfig};
use meshserve_host::plugin::runtime::PluginRuntimeConfig;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A node's configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// The model repository; `None` serves the models bundled in the binary.
    pub model_repository: Option<PathBuf>,
    /// The ONNX Runtime shared library; `None` means `ORT_DYLIB_PATH`, then discovery.
    pub onnxruntime_library: Option<PathBuf>,
    /// After SIGTERM, how long the node keeps serving while reporting not-ready, so load
    /// balancers stop sending before it stops accepting, in ms.
    pub shutdown_grace_ms: u64,
    /// After the grace period, how long in-flight requests may take before connections are
    /// closed, in ms.
    pub drain_timeout_ms: u64,
    /// Threads of the node's async runtime, which serves HTTP, HTTP/3 and the mesh and runs
    /// fast models inline; unset: one per core. Model workers have threads of their own. On a
    /// machine shared with other busy processes, fewer threads cost less CPU per request (each
    /// idle thread is woken to look for work; see docs/benchmarks.md).
    pub io_threads: Option<usize>,
    /// The HTTP/1.1 + HTTP/2 front door.
    pub http: HttpConfig,
    /// The HTTP/3 front door; off unless `http3.listen` is set.
    pub http3: Http3Config,
    /// The WebAssembly plugin runtime.
    pub plugins: PluginRuntimeConfig,
    /// Feature tables plugins may query, by name.
    pub features: HashMap<String, FeatureTableConfig>,
    /// Endpoints: `[pre-plugin] → model → [post-plugin]`, by name.
    pub endpoints: BTreeMap<String, EndpointConfig>,
    /// The QUIC mesh; off unless `mesh.listen` is set.
    pub mesh: MeshConfig,
}

/// More async threads than this is a typo, not a machine.
const MAX_IO_THREADS: usize = 1024;

/// The node's place in a mesh.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MeshConfig {
    /// UDP address of the `meshserve/1` endpoint; `None` runs a standalone node.
    pub listen: Option<SocketAddr>,
    /// Address peers and clients use to reach us, when `listen` is not reachable as is:
    /// `host:port`, an IP (a pod's) or a name resolved at start.
    pub advertise: Option<String>,
    /// This node's name, unique in the mesh; default `node-<quic port>`.
    pub name: Option<String>,
    /// Nodes to join through, as `host:port`; a name stands for every address it resolves to
    /// (a Kubernetes headless Service) and is resolved again every `seed_refresh_ms`.
    pub seeds: Vec<String>,
    /// How often seed names are resolved again, in ms.
    pub seed_refresh_ms: u64,
    /// A file in the `/etc/hosts` format consulted before the system resolver for seed and
    /// advertised names.
    pub hosts_file: Option<PathBuf>,
    /// Folder made by `meshserve certs`: `ca.pem` and `node-<name>.pem`/`.key`.
    pub certs: Option<PathBuf>,
    /// How often a member probes another, in ms.
    pub probe_period_ms: u64,
    /// How long a suspected member has to answer before it is declared down, in ms.
    pub suspect_timeout_ms: u64,
    /// Largest `meshserve/1` frame accepted, in bytes.
    pub max_frame_bytes: usize,
    /// Deadline of a forwarded request that sets none itself, in ms.
    pub forward_timeout_ms: u64,
    /// Time a peer has to send a whole `meshserve/1` frame on a stream, in ms.
    pub frame_read_timeout_ms: u64,
    /// Bytes of `meshserve/1` frames buffered at once over every peer and stream; a frame
    /// that would go past it is refused (503-equivalent, retry later).
    pub max_frame_bytes_in_flight: usize,
    /// Connections native clients (client certificates) may hold open at once; past it a new
    /// one is closed as it arrives. Node connections do not count, so clients cannot take
    /// what the mesh itself needs.
    pub max_client_connections: usize,
    /// Handshakes in progress at once on the mesh port, from every address together (one
    /// address holds at most 16, and only once it has answered a Retry); a live member's
    /// address is held to its own 16 only. Past it a new attempt is refused until one ends;
    /// a handshake has 2 s to finish.
    pub max_handshakes: usize,
    /// Nodes whose model repositories are authoritative for the mesh: only their catalogs
    /// say which models exist, with how many replicas, and which files a node fetches. Every
    /// node of a mesh must list the same names. Unset: every member publishes (logged as a
    /// warning: any node certificate can then change what the others run).
    pub publishers: Option<Vec<String>>,
    /// Memory this node may spend on the models the mesh places here, in bytes: a model
    /// that would go past it is declined (its advert says so, and placement takes the next
    /// node). A model counts as what loading it added to the process (measured), or its files'
    /// size before it has loaded here. Unset: no budget.
    pub max_model_memory_bytes: Option<u64>,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            listen: None,
            advertise: None,
            name: None,
            seeds: Vec::new(),
            seed_refresh_ms: 5000,
            hosts_file: None,
            certs: None,
            probe_period_ms: 500,
            suspect_timeout_ms: 1500,
            max_frame_bytes: crate::wire::frame::DEFAULT_MAX_FRAME_BYTES,
            forward_timeout_ms: 30_000,
            frame_read_timeout_ms: 10_000,
            max_frame_bytes_in_flight: 256 << 20,
            max_client_connections: 1024,
            max_handshakes: 256,
            publishers: None,
            max_model_memory_bytes: None,
        }
    }
}

/// The HTTP front door's settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address and port to listen on.
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes; larger gets 413.
    pub max_body_bytes: usize,
    /// PEM certificate chain; with `tls_key`, serves HTTPS (HTTP/2 by ALPN).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Time a client has to send a request's headers, in ms; on HTTP/1.1 the clock also runs
    /// while a kept-alive connection waits for its next request.
    pub header_read_timeout_ms: u64,
    /// Time a client has to send a request's body once its headers arrived, in ms; slower is 408.
    pub body_read_timeout_ms: u64,
    /// A connection with no request in flight for this long is closed, in ms (HTTP/1.1 and
    /// HTTP/2; a request still arriving does not count as in flight).
    pub idle_timeout_ms: u64,
    /// Connections open at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Request body bytes buffered at once over all requests; past it, 503 with `Retry-After`.
    pub max_body_bytes_in_flight: usize,
    /// Streams one HTTP/2 connection may have open at once.
    pub max_concurrent_streams: u32,
    /// File holding the bearer token for admin operations (load, unload, plugin reload) from
    /// anywhere; without it they are allowed from loopback clients only.
    pub admin_token_file: Option<PathBuf>,
}

impl HttpConfig {
    /// How the front door reads request bodies: size, time and the node-wide byte budget.
    pub fn body_limits(&self) -> crate::http::body::BodyLimits {
        crate::http::body::BodyLimits::new(
            self.max_body_bytes,
            Duration::from_millis(self.body_read_timeout_ms),
            self.max_body_bytes_in_flight,
        )
    }

    /// The connection limits the server enforces.
    pub fn limits(&self) -> crate::http::server::ConnectionLimits {
        crate::http::server::ConnectionLimits {
            header_read_timeout: Duration::from_millis(self.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            max_connections: self.max_connections,
            max_concurrent_streams: self.max_concurrent_streams,
        }
    }
}

/// The HTTP/3 front door's settings: its own UDP port and QUIC endpoint, so public clients
/// never share the mesh port's mutual TLS. Request bodies follow `[http]`'s body limits.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Http3Config {
    /// UDP address and port to listen on; `None` serves no HTTP/3.
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain presented to clients (HTTP/3 is always TLS).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates whose client certificates are accepted; clients without one are
    /// still served unless `require_client_cert`.
    pub client_ca: Option<PathBuf>,
    /// Refuse clients without a certificate of `client_ca`.
    pub require_client_cert: bool,
    /// Time a stream has to send its request headers (and a connection its handshake), in ms.
    pub header_read_timeout_ms: u64,
    /// A connection with no request in flight for this long is closed, in ms.
    pub idle_timeout_ms: u64,
    /// Connections open at once; more are refused.
    pub max_connections: usize,
    /// Request streams one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Bytes a client may send on one stream ahead of the server reading them.
    pub stream_receive_window_bytes: u32,
    /// Bytes a client may send on all streams of a connection ahead of the server reading them.
    pub receive_window_bytes: u32,
    /// Largest request header section accepted, in bytes (larger gets 431).
    pub max_header_bytes: u64,
    /// Once this many connections are open, a new client must first prove its address with a
    /// retry token (one extra round trip), so spoofed sources cannot make the node do
    /// handshakes; 0 validates every client.
    pub validate_addresses_above: usize,
}

impl Default for Http3Config {
    fn default() -> Self {
        Http3Config {
            listen: None,
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            require_client_cert: false,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            max_connections: 4096,
            max_concurrent_streams: 256,
            stream_receive_window_bytes: 1024 * 1024,
            receive_window_bytes: 8 * 1024 * 1024,
            max_header_bytes: 64 * 1024,
            validate_addresses_above: 256,
        }
    }
}

impl Http3Config {
    /// The limits the HTTP/3 server enforces.
    pub fn limits(&self) -> crate::http::http3::Http3Limits {
        crate::http::http3::Http3Limits {
            header_read_timeout: Duration::from_millis(self.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            max_connections: self.max_connections,
            max_concurrent_streams: self.max_concurrent_streams,
            stream_receive_window: self.stream_receive_window_bytes,
            receive_window: self.receive_window_bytes,
            max_header_bytes: self.max_header_bytes,
            validate_addresses_above: self.validate_addresses_above,
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            model_repository: None,
            onnxruntime_library: None,
            shutdown_grace_ms: 2_000,
            drain_timeout_ms: 30_000,
            io_threads: None,
            http: HttpConfig::default(),
            http3: Http3Config::default(),
            plugins: PluginRuntimeConfig::default(),
            features: HashMap::new(),
            endpoints: BTreeMap::new(),
            mesh: MeshConfig::default(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            max_body_bytes: 32 * 1024 * 1024,
            tls_cert: None,
            tls_key: None,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 30_000,
            idle_timeout_ms: 60_000,
            max_connections: 4096,
            max_body_bytes_in_flight: 512 * 1024 * 1024,
            max_concurrent_streams: 256,
            admin_token_file: None,
        }
    }
}

/// A config file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum NodeConfigError {
    /// Unreadable file.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Invalid TOML or unknown keys.
    #[error("invalid config {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong, with its position.
        message: String,
    },
    /// Settings that contradict each other.
    #[error("invalid config: {0}")]
    Inconsistent(String),
}

impl NodeConfig {
    /// Reads `path` and resolves its relative paths against the file's folder.
    pub fn load(path: &Path) -> Result<NodeConfig, NodeConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| NodeConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        NodeConfig::load_from_str(&text, path)
    }

    /// Parses `text` as the config file at `path` (for its relative paths and errors).
    pub fn load_from_str(text: &str, path: &Path) -> Result<NodeConfig, NodeConfigError> {
        let mut config: NodeConfig = toml::from_str(text).map_err(|e| NodeConfigError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for slot in [
            &mut config.model_repository,
            &mut config.onnxruntime_library,
            &mut config.http.tls_cert,
            &mut config.http.tls_key,
            &mut config.http.admin_token_file,
            &mut config.http3.tls_cert,
            &mut config.http3.tls_key,
            &mut config.http3.client_ca,
            &mut config.plugins.cache_dir,
            &mut config.mesh.certs,
            &mut config.mesh.hosts_file,
        ] {
            if let Some(p) = slot.as_mut()
                && p.is_relative()
            {
                *p = base.join(&*p);
            }
        }
        for table in config.features.values_mut() {
            features::resolve_path(table, base);
        }
        for endpoint in config.endpoints.values_mut() {
            endpoint.resolve_paths(base);
        }
        config.check()?;
        Ok(config)
    }

    /// Checks settings that only make sense together.
    pub fn check(&self) -> Result<(), NodeConfigError> {
        if let Some(threads) = self.io_threads
            && !(1..=MAX_IO_THREADS).contains(&threads)
        {
            return Err(NodeConfigError::Inconsistent(format!(
                "io_threads must be between 1 and {MAX_IO_THREADS} (unset: one per core), not {threads}"
            )));
        }
        if self.http.tls_cert.is_some() != self.http.tls_key.is_some() {
            return Err(NodeConfigError::Inconsistent(
                "http.tls_cert and http.tls_key must be set together".into(),
            ));
        }
        if self.http3.listen.is_some()
            && (self.http3.tls_cert.is_none() || self.http3.tls_key.is_none())
        {
            return Err(NodeConfigError::Inconsistent(
                "http3.listen needs http3.tls_cert and http3.tls_key (HTTP/3 is always TLS; \
                 issue a server certificate with `meshserve certs --server <dns name or ip>`)"
                    .into(),
            ));
        }
        let h3 = &self.http3;
        for (key, value, least) in [
            ("header_read_timeout_ms", h3.header_read_timeout_ms, 1),
            ("idle_timeout_ms", h3.idle_timeout_ms, 1),
            ("max_connections", h3.max_connections as u64, 1),
            (
                "max_concurrent_streams",
                u64::from(h3.max_concurrent_streams),
                1,
            ),
            // Smaller windows or header sections than these stall ordinary requests.
            (
                "stream_receive_window_bytes",
                u64::from(h3.stream_receive_window_bytes),
                16 * 1024,
            ),
            (
                "receive_window_bytes",
                u64::from(h3.receive_window_bytes),
                16 * 1024,
            ),
            ("max_header_bytes", h3.max_header_bytes, 1024),
        ] {
            if value < least {
                return Err(NodeConfigError::Inconsistent(format!(
                    "http3.{key} must be at least {least}"
                )));
            }
        }
        if self.http3.require_client_cert && self.http3.client_ca.is_none() {
            return Err(NodeConfigError::Inconsistent(
                "http3.require_client_cert needs http3.client_ca".into(),
            ));
        }
        if self.mesh.listen.is_some() && self.mesh.certs.is_none() {
            return Err(NodeConfigError::Inconsistent(
                "mesh.listen needs mesh.certs (create them with `meshserve certs`)".into(),
            ));
        }
        if self.mesh.max_handshakes == 0 {
            return Err(NodeConfigError::Inconsistent(
                "mesh.max_handshakes must be positive: no peer could connect".into(),
            ));
        }
        if self.http.max_body_bytes == 0 {
            return Err(NodeConfigError::Inconsistent(
                "http.max_body_bytes must be positive".into(),
            ));
        }
        if let Some(name) = &self.mesh.name
            && !crate::transport::certs::valid_node_name(name)
        {
            return Err(NodeConfigError::Inconsistent(format!(
                "mesh.name '{name}' is not a node name: lower-case letters, digits, '-', '_' and '.', at most 128"
            )));
        }
        for (key, value) in self
            .mesh
            .seeds
            .iter()
            .map(|s| ("mesh.seeds", s))
            .chain(self.mesh.advertise.iter().map(|a| ("mesh.advertise", a)))
        {
            crate::cluster::seeds::split_host_port(value)
                .map_err(|e| NodeConfigError::Inconsistent(format!("{key}: {e}")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_follow_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            "model_repository = \"models\"\n[http]\nlisten = \"0.0.0.0:9000\"\nmax_body_bytes = 1024\n",
        )
        .unwrap();
        let config = NodeConfig::load(&path).unwrap();
        assert_eq!(config.model_repository, Some(dir.path().join("models")));
        assert_eq!(config.http.listen.port(), 9000);
        assert_eq!(config.http.max_body_bytes, 1024);
        assert_eq!(config.drain_timeout_ms, 30_000);
    }

    #[test]
    fn typos_and_half_tls_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "[http]\nlisten_addr = \"0.0.0.0:9000\"\n").unwrap();
        assert!(
            NodeConfig::load(&path)
                .unwrap_err()
                .to_string()
                .contains("listen_addr")
        );
        std::fs::write(&path, "[http]\ntls_cert = \"c.pem\"\n").unwrap();
        assert!(NodeConfig::load(&path).is_err());
    }

    #[test]
    fn http3_needs_a_certificate_and_sane_limits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        let refused = |text: &str| {
            NodeConfig::load_from_str(text, &path)
                .unwrap_err()
                .to_string()
        };
        assert!(
            refused("[http3]\nlisten = \"127.0.0.1:8443\"\n").contains("meshserve certs --server")
        );
        let base =
            "[http3]\nlisten = \"127.0.0.1:8443\"\ntls_cert = \"s.pem\"\ntls_key = \"s.key\"\n";
        assert!(refused(&format!("{base}idle_timeout_ms = 0\n")).contains("http3.idle_timeout_ms"));
        assert!(refused(&format!("{base}receive_window_bytes = 10\n")).contains("at least 16384"));
        assert!(refused(&format!("{base}require_client_cert = true\n")).contains("client_ca"));
        let config = NodeConfig::load_from_str(base, &path).unwrap();
        assert_eq!(config.http3.tls_cert, Some(dir.path().join("s.pem")));
    }

    #[test]
    fn io_threads_is_unset_or_a_sane_count() {
        let path = std::path::Path::new("node.toml");
        assert_eq!(
            NodeConfig::load_from_str("", path).unwrap().io_threads,
            None
        );
        assert_eq!(
            NodeConfig::load_from_str("io_threads = 3\n", path)
                .unwrap()
                .io_threads,
            Some(3)
        );
        for bad in ["io_threads = 0\n", "io_threads = 100000\n"] {
            let err = NodeConfig::load_from_str(bad, path)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("io_threads must be between 1 and 1024"),
                "{err}"
            );
        }
    }

    #[test]
    fn mesh_handshakes_are_bounded_and_some_are_allowed() {
        let path = std::path::Path::new("node.toml");
        let config = NodeConfig::load_from_str("[mesh]\nmax_handshakes = 7\n", path).unwrap();
        assert_eq!(config.mesh.max_handshakes, 7);
        assert_eq!(
            NodeConfig::load_from_str("", path)
                .unwrap()
                .mesh
                .max_handshakes,
            256
        );
        let err = NodeConfig::load_from_str("[mesh]\nmax_handshakes = 0\n", path)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mesh.max_handshakes must be positive"),
            "{err}"
        );
    }
}
