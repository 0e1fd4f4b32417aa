//! One meshserve node: the engine behind the HTTP front door, started from a [`NodeConfig`].

use crate::config::NodeConfig;
use crate::http::routes::{AppState, router};
use crate::http::server::{self, TlsError};
use meshserve_host::Engine;
use meshserve_host::engine::EngineConfig;
use meshserve_host::metrics::Metrics;
use meshserve_host::runtime::RuntimeError;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// ONNX Runtime is missing or broken.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The HTTP port could not be bound.
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
}

/// A started node, not yet serving.
pub struct Node {
    engine: Arc<Engine>,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    config: NodeConfig,
    // Keeps the bundled models' temporary repository alive while the node runs.
    _bundled: Option<tempfile::TempDir>,
}

impl Node {
    /// Binds the port, starts ONNX Runtime and loads every model in the repository.
    pub async fn start(config: NodeConfig) -> Result<Node, NodeError> {
        let tls = match (&config.http.tls_cert, &config.http.tls_key) {
            (Some(cert), Some(key)) => Some(server::tls_config(cert, key)?),
            _ => None,
        };
        let listener = TcpListener::bind(config.http.listen)
            .await
            .map_err(|source| NodeError::Bind {
                addr: config.http.listen,
                source,
            })?;
        let (repository, bundled) = match &config.model_repository {
            Some(path) => (path.clone(), None),
            None => {
                let dir =
                    crate::bundled::materialize().map_err(|source| NodeError::Repository {
                        path: "(bundled models)".into(),
                        source,
                    })?;
                (dir.path().to_path_buf(), Some(dir))
            }
        };
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
        Ok(Node {
            engine,
            listener,
            tls,
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

    /// The node's engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Serves until `shutdown` resolves, then drains: the front door finishes in-flight
    /// requests, and the engine answers everything still queued.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let state = AppState {
            engine: self.engine.clone(),
            max_body_bytes: self.config.http.max_body_bytes,
        };
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let models: Vec<String> = self
            .engine
            .index()
            .into_iter()
            .filter(|e| e.ready)
            .map(|e| e.name)
            .collect();
        tracing::info!(
            address = %format!("{scheme}://{}", self.local_addr()),
            repository = %self.engine.repository().root().display(),
            onnxruntime = %self.engine.runtime_library().display(),
            models = %models.join(", "),
            "meshserve serving"
        );
        let engine = self.engine.clone();
        let shutdown = async move {
            shutdown.await;
            // Readiness drops first, so load balancers stop sending before connections close.
            engine.begin_shutdown();
        };
        server::serve(
            self.listener,
            router(state),
            self.tls,
            shutdown,
            Duration::from_millis(self.config.drain_timeout_ms),
        )
        .await;
        let engine = self.engine.clone();
        let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
        tracing::info!("meshserve stopped");
    }
}
