//! One meshserve node: the engine behind the HTTP front door, started from a [`NodeConfig`].

mod reload;

pub use reload::{CertReloader, Reloaded};

use crate::cluster::seeds::{self, SeedError};
use crate::cluster::{Cluster, ClusterConfig, ClusterError};
use crate::config::{MeshConfig, NodeConfig};
use crate::dispatch::Dispatch;
use crate::http::admin::{AdminAccess, AdminTokenError};
use crate::http::app::App;
use crate::http::http3::{self, ClientAuth};
use crate::http::server::{self, TlsError};
use crate::http::state::AppState;
use crate::membership::DetectorConfig;
use crate::mesh1;
use crate::placement::Publishers;
use crate::transport::MeshIdentity;
use crate::transport::certs::Role;
use meshserve_host::Engine;
use meshserve_host::endpoint::{self, EndpointStatus, Endpoints};
use meshserve_host::engine::EngineConfig;
use meshserve_host::metrics::Metrics;
use meshserve_host::plugin::features::{FeatureError, FeatureTables};
use meshserve_host::plugin::runtime::{PluginLoadError, PluginRuntime};
use meshserve_host::runtime::RuntimeError;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// ONNX Runtime is missing or broken.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The HTTP or HTTP/3 port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The model repository could not be read or created.
    #[error("model repository {path}: {source}")]
    Repository {
        /// The directory.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TLS files are unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The admin token file is unusable.
    #[error(transparent)]
    AdminToken(#[from] AdminTokenError),
    /// A feature table could not be loaded.
    #[error(transparent)]
    Features(#[from] FeatureError),
    /// The plugin runtime could not start.
    #[error(transparent)]
    Plugins(#[from] PluginLoadError),
    /// The mesh endpoint could not start.
    #[error(transparent)]
    Mesh(#[from] ClusterError),
    /// The node's mesh name is one peers would refuse.
    #[error("'{0}' is not a valid node name: use up to 128 letters, digits, '-', '_' and '.'")]
    NodeName(String),
    /// A seed is not `host:port`.
    #[error("mesh seed: {0}")]
    Seed(SeedError),
    /// The advertised address does not resolve.
    #[error("mesh.advertise: {0}")]
    Advertise(SeedError),
    /// The node's mesh certificate is missing or unusable.
    #[error(
        "mesh certificate of node '{name}' in {dir}: {source} (create it with `meshserve certs --dir {dir} --node {name}`)"
    )]
    MeshCertificate {
        /// The node name.
        name: String,
        /// The certificate folder.
        dir: String,
        /// What is wrong.
        source: TlsError,
    },
}

/// A started node, not yet serving.
pub struct Node {
    engine: Arc<Engine>,
    /// Where every door's calls go: the engine, the node's endpoints, the mesh.
    dispatch: Dispatch,
    listener: TcpListener,
    /// The HTTPS config, replaced on a certificate reload.
    tls: Option<Arc<watch::Sender<Arc<rustls::ServerConfig>>>>,
    http3: Option<quinn::Endpoint>,
    admin: AdminAccess,
    cluster: Option<Arc<Cluster>>,
    config: NodeConfig,
    // Keeps the bundled models' temporary repository alive while the node runs.
    _bundled: Option<tempfile::TempDir>,
}

impl Node {
    /// Binds the port, starts ONNX Runtime and loads every model in the repository.
    pub async fn start(config: NodeConfig) -> Result<Node, NodeError> {
        let tls = match (&config.http.tls_cert, &config.http.tls_key) {
            (Some(cert), Some(key)) => {
                let config = server::tls_config(cert, key)?;
                Some(Arc::new(watch::channel(config).0))
            }
            _ => None,
        };
        let listener = bind_tcp(config.http.listen).map_err(|source| NodeError::Bind {
            addr: config.http.listen,
            source,
        })?;
        let admin = match &config.http.admin_token_file {
            Some(path) => AdminAccess::from_token_file(path)?,
            None => AdminAccess::LoopbackOnly,
        };
        let http3 = match config.http3.listen {
            Some(listen) => Some(bind_http3(&config.http3, listen)?),
            None => None,
        };
        let (repository, bundled) = repository_of(&config)?;
        let engine_config = EngineConfig {
            repository: repository.clone(),
            onnxruntime_library: config.onnxruntime_library.clone(),
        };
        let engine = Arc::new(Engine::new(&engine_config, Arc::new(Metrics::new()))?);
        let loader = engine.clone();
        tokio::task::spawn_blocking(move || loader.load_all())
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r)
            .map_err(|source| NodeError::Repository {
                path: repository.display().to_string(),
                source,
            })?;
        // Plugins run where endpoints can exist: declared here, in the repository, or (in a
        // mesh) arriving from other nodes' repositories.
        let has_endpoints = !config.endpoints.is_empty()
            || !endpoint::folder::names(&repository).is_empty()
            || config.mesh.listen.is_some();
        let endpoints = if has_endpoints {
            Some(start_endpoints(&config, repository.clone(), &engine).await?)
        } else {
            None
        };
        let cluster = match config.mesh.listen {
            Some(listen) => {
                let http = listener.local_addr().unwrap_or(config.http.listen);
                let http3 = http3.as_ref().and_then(|e| e.local_addr().ok());
                Some(join_mesh(&config.mesh, listen, http, http3, &engine).await?)
            }
            None => None,
        };
        let dispatch = Dispatch::new(engine.clone(), cluster.clone(), endpoints);
        if let Some(cluster) = &cluster {
            // From here, models and endpoints are served to the mesh as well.
            cluster.serve_calls(Arc::new(mesh1::Door::new(dispatch.clone())));
        }
        Ok(Node {
            engine,
            dispatch,
            listener,
            tls,
            http3,
            admin,
            cluster,
            config,
            _bundled: bundled,
        })
    }

    /// The address the HTTP front door listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.config.http.listen)
    }

    /// The UDP address the HTTP/3 front door listens on, when it is on.
    pub fn http3_addr(&self) -> Option<SocketAddr> {
        self.http3.as_ref().and_then(|e| e.local_addr().ok())
    }

    /// A handle that reloads the node's certificates from their files (what SIGHUP does).
    pub fn cert_reloader(&self) -> CertReloader {
        CertReloader {
            config: Arc::new(self.config.clone()),
            https: self.tls.clone(),
            http3: self.http3.clone(),
            cluster: self.cluster.clone(),
        }
    }

    /// The node's engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The node's place in the mesh, when it has one.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// Serves until `shutdown` resolves, then drains: the front door finishes in-flight
    /// requests, and the engine answers everything still queued.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let state = AppState {
            dispatch: self.dispatch.clone(),
            bodies: self.config.http.body_limits(),
            admin: self.admin.clone(),
        };
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let models: Vec<String> = self
            .engine
            .index()
            .into_iter()
            .filter(|e| e.ready)
            .map(|e| e.name)
            .collect();
        let http3 = self
            .http3_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "off".into());
        tracing::info!(
            address = %format!("{scheme}://{}", self.local_addr()),
            %http3,
            repository = %self.engine.repository().root().display(),
            onnxruntime = %self.engine.runtime_library().display(),
            models = %models.join(", "),
            endpoints = %self.dispatch.endpoints().iter().flat_map(|e| e.all()).map(|e| e.name.clone()).collect::<Vec<_>>().join(", "),
            "meshserve serving"
        );
        let engine = self.engine.clone();
        let cluster = self.cluster.clone();
        let grace = Duration::from_millis(self.config.shutdown_grace_ms);
        // One shutdown, seen by both front doors.
        let (stop, stopped_rx) = tokio::sync::watch::channel(false);
        let stopped_h3 = stopped_rx.clone();
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let drain = Duration::from_millis(self.config.drain_timeout_ms);
        let leaving = cluster.clone();
        let shutdown = async move {
            shutdown.await;
            // Readiness drops first, and the node keeps serving for the grace period, so load
            // balancers stop sending before it stops accepting.
            engine.begin_shutdown();
            tracing::info!(
                ?grace,
                "reporting not-ready; serving until the grace period ends"
            );
            // Peers stop placing models here and load ours elsewhere; meanwhile this node
            // stays in the mesh, forwarding and answering what it still serves.
            if let Some(cluster) = &leaving {
                cluster.begin_leaving().await;
            }
            tokio::time::sleep(grace).await;
            if let Some(cluster) = &leaving {
                cluster.handed_over(drain).await;
            }
            let _ = stop.send(true);
        };
        let app = App::new(state);
        // Clients of the TCP door learn that HTTP/3 is on, and where.
        let http3_endpoint = self.http3.clone();
        let h3_app = Arc::new(app.clone());
        let tcp_app = Arc::new(match self.http3_addr() {
            Some(addr) => app.with_alt_svc(http3::alt_svc(addr.port())),
            None => app,
        });
        let http3_limits = self.config.http3.limits();
        let metrics = self.engine.metrics().clone();
        let http3 = async move {
            if let Some(endpoint) = http3_endpoint {
                http3::serve(
                    endpoint,
                    h3_app,
                    http3_limits,
                    metrics,
                    stopped(stopped_h3),
                    drain,
                )
                .await;
            }
        };
        let tcp = server::serve(
            self.listener,
            tcp_app,
            self.tls.as_ref().map(|config| config.subscribe()),
            self.config.http.limits(),
            stopped(stopped_rx),
            drain,
        );
        tokio::join!(shutdown, tcp, http3);
        // Only now, with both doors drained, does the node leave the mesh (peers learn at
        // once) and close its mesh endpoint.
        if let Some(cluster) = &cluster {
            cluster.leave().await;
        }
        let engine = self.engine.clone();
        let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
        tracing::info!("meshserve stopped");
    }
}

/// Binds the HTTP/3 front door's own QUIC endpoint.
fn bind_http3(
    config: &crate::config::Http3Config,
    listen: SocketAddr,
) -> Result<quinn::Endpoint, NodeError> {
    quinn::Endpoint::server(http3_server_config(config)?, listen).map_err(|source| {
        NodeError::Bind {
            addr: listen,
            source,
        }
    })
}

/// The HTTP/3 front door's TLS and transport settings, read from its files.
fn http3_server_config(
    config: &crate::config::Http3Config,
) -> Result<quinn::ServerConfig, NodeError> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Err(NodeError::Tls(TlsError::Invalid(
            "http3 needs tls_cert and tls_key".into(),
        )));
    };
    let clients = match (&config.client_ca, config.require_client_cert) {
        (None, _) => ClientAuth::Anyone,
        (Some(ca), false) => ClientAuth::Optional(ca.clone()),
        (Some(ca), true) => ClientAuth::Required(ca.clone()),
    };
    Ok(http3::server_config(cert, key, &clients, &config.limits())?)
}

/// Node `name`'s mesh identity from its certificate folder.
fn mesh_identity(mesh: &MeshConfig, name: &str) -> Result<MeshIdentity, NodeError> {
    let dir = mesh.certs.clone().unwrap_or_default();
    let identity = MeshIdentity::from_dir(&dir, Role::Node, name).map_err(|source| {
        NodeError::MeshCertificate {
            name: name.to_string(),
            dir: dir.display().to_string(),
            source,
        }
    })?;
    let used = crate::transport::certs::identity_dir(&dir, Role::Node, name);
    if used.join("ca.key").exists() {
        tracing::warn!(
            folder = %used.display(),
            "the node's certificate folder holds the mesh CA key; a node needs only {}",
            crate::transport::certs::node_dir(&dir, name).display()
        );
    }
    Ok(identity)
}

/// Starts the node's QUIC endpoint and joins the mesh through the seeds.
async fn join_mesh(
    mesh: &MeshConfig,
    listen: SocketAddr,
    http: SocketAddr,
    http3: Option<SocketAddr>,
    engine: &Arc<Engine>,
) -> Result<Arc<Cluster>, NodeError> {
    let resolver = seeds::Resolver::new(mesh.hosts_file.clone());
    let advertise = match &mesh.advertise {
        Some(advertise) => {
            let found = resolver
                .resolve(advertise)
                .await
                .map_err(NodeError::Advertise)?;
            // A name with several addresses: the first, IPv4 before IPv6, as peers most
            // often reach.
            let mut found = found;
            found.sort_by_key(|a| (a.is_ipv6(), *a));
            found.first().copied()
        }
        None => None,
    };
    let advertised = advertise.unwrap_or(listen);
    let name = mesh
        .name
        .clone()
        .unwrap_or_else(|| format!("node-{}", advertised.port()));
    if !crate::transport::certs::valid_node_name(&name) {
        return Err(NodeError::NodeName(name));
    }
    let identity = mesh_identity(mesh, &name)?;
    let seeds = seeds::watch(
        mesh.seeds.clone(),
        resolver,
        Duration::from_millis(mesh.seed_refresh_ms.max(100)),
    )
    .await
    .map_err(NodeError::Seed)?;
    // Clients learn the HTTP addresses from adverts: an unspecified bind address is replaced
    // by the mesh address's IP, which peers can reach.
    let reachable = |addr: SocketAddr| {
        if addr.ip().is_unspecified() {
            SocketAddr::new(advertised.ip(), addr.port())
        } else {
            addr
        }
    };
    let (http, http3) = (reachable(http), http3.map(reachable));
    let config = ClusterConfig {
        name,
        listen,
        advertise,
        http,
        http3,
        seeds,
        identity,
        detector: DetectorConfig {
            probe_period: Duration::from_millis(mesh.probe_period_ms),
            probe_rtt: Duration::from_millis(mesh.probe_period_ms * 2 / 5),
            suspect_timeout: Duration::from_millis(mesh.suspect_timeout_ms),
        },
        max_frame_bytes: mesh.max_frame_bytes,
        max_frame_bytes_in_flight: mesh.max_frame_bytes_in_flight,
        max_client_connections: mesh.max_client_connections,
        max_handshakes: mesh.max_handshakes,
        publishers: match &mesh.publishers {
            Some(names) => Publishers::Only(names.iter().cloned().collect()),
            None => {
                tracing::warn!(
                    "mesh.publishers is not set: any node of the mesh CA can publish models that others fetch and run; name the nodes whose repositories are authoritative"
                );
                Publishers::Anyone
            }
        },
        forward_timeout: Duration::from_millis(mesh.forward_timeout_ms),
        frame_read_timeout: Duration::from_millis(mesh.frame_read_timeout_ms.max(1)),
        model_memory_budget: mesh.max_model_memory_bytes,
    };
    Ok(Cluster::start(config, engine.clone()).await?)
}

/// The model repository the config names, or the bundled models written to a temporary
/// folder, which must be kept while the repository is used.
fn repository_of(config: &NodeConfig) -> Result<(PathBuf, Option<tempfile::TempDir>), NodeError> {
    match &config.model_repository {
        Some(path) => Ok((path.clone(), None)),
        None => {
            let dir = crate::bundled::materialize().map_err(|source| NodeError::Repository {
                path: "(bundled models)".into(),
                source,
            })?;
            Ok((dir.path().to_path_buf(), Some(dir)))
        }
    }
}

/// Loads feature tables, starts the plugin runtime and loads every endpoint's plugins (each
/// compiled, its stage checked and its `init` run with its config), off the async workers.
async fn load_endpoints(
    config: &NodeConfig,
    repository: PathBuf,
    metrics: Arc<Metrics>,
) -> Result<(Endpoints, Arc<FeatureTables>), NodeError> {
    let tables = config.features.clone();
    let plugins = config.plugins.clone();
    let declared = config.endpoints.clone();
    tokio::task::spawn_blocking(
        move || -> Result<(Endpoints, Arc<FeatureTables>), NodeError> {
            let features = Arc::new(FeatureTables::load(&tables)?);
            let runtime = PluginRuntime::new(plugins, features.clone(), metrics)?;
            Ok((
                Endpoints::load(&declared, Some(repository), runtime),
                features,
            ))
        },
    )
    .await
    .map_err(|e| NodeError::Repository {
        path: "(endpoints)".into(),
        source: std::io::Error::other(e.to_string()),
    })?
}

/// Loads every endpoint the config declares or its model repository holds, as a start would,
/// and returns each one's state (`ready`, or the `reason` it would be unavailable); nothing is
/// served. What `meshserve serve --check` reports.
pub async fn check_endpoints(config: &NodeConfig) -> Result<Vec<EndpointStatus>, NodeError> {
    let (repository, _bundled) = repository_of(config)?;
    if config.endpoints.is_empty() && endpoint::folder::names(&repository).is_empty() {
        return Ok(Vec::new());
    }
    let (endpoints, _) = load_endpoints(config, repository, Arc::new(Metrics::new())).await?;
    Ok(endpoints.status())
}

/// Loads every endpoint's plugins, then watches the plugin files for changes.
async fn start_endpoints(
    config: &NodeConfig,
    repository: PathBuf,
    engine: &Arc<Engine>,
) -> Result<Arc<Endpoints>, NodeError> {
    let (endpoints, features) =
        load_endpoints(config, repository, engine.metrics().clone()).await?;
    for endpoint in endpoints.all() {
        if let Err(reason) = endpoint.readiness() {
            tracing::error!(endpoint = %endpoint.name, %reason, "endpoint unavailable");
            continue;
        }
        if engine.model(&endpoint.name).is_some() {
            tracing::warn!(endpoint = %endpoint.name, "an endpoint shadows the model of the same name on /v2/models/{{name}}");
        }
        if engine.model(&endpoint.model).is_none() {
            tracing::warn!(endpoint = %endpoint.name, model = %endpoint.model, "the endpoint's model is not loaded here");
        }
    }
    let endpoints = Arc::new(endpoints);
    // A look is a stat of each plugin file (its digest only when the stat changed), so a
    // quarter second costs nothing and a rebuilt plugin serves soon after its build ends.
    endpoints
        .watch(Duration::from_millis(250))
        .map_err(|source| NodeError::Repository {
            path: "(plugin watcher)".into(),
            source,
        })?;
    // A changed table file is read again once it has settled (two polls), without a restart.
    features
        .watch(Duration::from_millis(500))
        .map_err(|source| NodeError::Repository {
            path: "(feature table watcher)".into(),
            source,
        })?;
    Ok(endpoints)
}

/// Connections the kernel may hold for the HTTP door before it accepts them. tokio's default
/// (1,024) drops the SYNs of a larger burst, which their clients retry only a second later;
/// the kernel caps this at its own limit (`net.core.somaxconn`, 4,096 on current kernels).
const HTTP_BACKLOG: u32 = 4096;

/// Binds the HTTP door's TCP listener (with `SO_REUSEADDR`, as tokio's own bind does).
fn bind_tcp(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(HTTP_BACKLOG)
}
