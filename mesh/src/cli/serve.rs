//! `meshserve serve`: the node config with the command line's flags laid over it, the
//! node started and served until a stop signal, certificates reloaded on SIGHUP.

use crate::cli::multi_thread_runtime;
use anyhow::{Context, Result};
use clap::Args;
use meshserve::config::NodeConfig;
use meshserve::node::Node;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Args, Default)]
pub(crate) struct ServeArgs {
    /// Node config file (TOML); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Model repository directory (`<model>/<version>/model.onnx`); default: the bundled models.
    #[arg(long)]
    model_repository: Option<PathBuf>,
    /// Address for HTTP/1.1 and HTTP/2.
    #[arg(long, value_name = "ADDR:PORT")]
    http: Option<SocketAddr>,
    /// Async runtime threads (HTTP, HTTP/3, mesh, inline model runs); default: one per core.
    #[arg(long, value_name = "N")]
    io_threads: Option<usize>,
    /// UDP address for HTTP/3 (needs a certificate: --http3-cert and --http3-key).
    #[arg(long, value_name = "ADDR:PORT")]
    http3: Option<SocketAddr>,
    /// PEM certificate chain of the HTTP/3 front door (`meshserve certs --server NAME`).
    #[arg(long, value_name = "PEM")]
    http3_cert: Option<PathBuf>,
    /// PEM private key of the HTTP/3 front door.
    #[arg(long, value_name = "PEM")]
    http3_key: Option<PathBuf>,
    /// ONNX Runtime shared library (else ORT_DYLIB_PATH, else the onnxruntime Python wheel).
    #[arg(long)]
    onnxruntime_library: Option<PathBuf>,
    /// UDP address of the mesh endpoint (`meshserve/1` over QUIC); joins or starts a mesh.
    #[arg(long, value_name = "ADDR:PORT")]
    quic: Option<SocketAddr>,
    /// A node to join the mesh through (repeatable); a DNS name stands for every address it
    /// holds, resolved again every `mesh.seed_refresh_ms` (a Kubernetes headless Service).
    #[arg(long = "seed", value_name = "HOST:PORT")]
    seeds: Vec<String>,
    /// A node whose model repository is authoritative for the mesh (repeatable; every node
    /// of a mesh lists the same): only publishers' models are placed and fetched.
    #[arg(long = "publisher", value_name = "NODE")]
    publishers: Vec<String>,
    /// Memory the models the mesh places here may take, in bytes (`mesh.max_model_memory_bytes`):
    /// a model past it is declined and placed on the next node.
    #[arg(long, value_name = "BYTES")]
    max_model_memory_bytes: Option<u64>,
    /// The address peers dial and clients are told, when `--quic` is not reachable as is (a
    /// pod IP, or a name resolved at start).
    #[arg(long, value_name = "HOST:PORT")]
    advertise: Option<String>,
    /// Folder made by `meshserve certs` holding the mesh CA and this node's certificate.
    #[arg(long)]
    certs: Option<PathBuf>,
    /// This node's name in the mesh (default `node-<quic port>`).
    #[arg(long)]
    name: Option<String>,
    /// Check the config file and flags, and load every endpoint's plugins as a start would
    /// (compile, check the exported stage, run `init` with its config), then exit without
    /// serving: 0 when all of it would start, else each problem on stderr.
    #[arg(long)]
    check: bool,
}

impl ServeArgs {
    /// The node config file (or the defaults) with every flag given laid over it.
    fn into_config(self) -> Result<NodeConfig> {
        let mut config = match &self.config {
            Some(path) => NodeConfig::load(path)?,
            None => NodeConfig::default(),
        };
        if let Some(repository) = self.model_repository {
            config.model_repository = Some(repository);
        }
        if let Some(http) = self.http {
            config.http.listen = http;
        }
        if let Some(threads) = self.io_threads {
            config.io_threads = Some(threads);
        }
        if let Some(http3) = self.http3 {
            config.http3.listen = Some(http3);
        }
        if let Some(cert) = self.http3_cert {
            config.http3.tls_cert = Some(cert);
        }
        if let Some(key) = self.http3_key {
            config.http3.tls_key = Some(key);
        }
        if let Some(library) = self.onnxruntime_library {
            config.onnxruntime_library = Some(library);
        }
        if let Some(quic) = self.quic {
            config.mesh.listen = Some(quic);
        }
        if !self.seeds.is_empty() {
            config.mesh.seeds = self.seeds;
        }
        if !self.publishers.is_empty() {
            config.mesh.publishers = Some(self.publishers);
        }
        if let Some(bytes) = self.max_model_memory_bytes {
            config.mesh.max_model_memory_bytes = Some(bytes);
        }
        if let Some(certs) = self.certs {
            config.mesh.certs = Some(certs);
        }
        if let Some(advertise) = self.advertise {
            config.mesh.advertise = Some(advertise);
        }
        if let Some(name) = self.name {
            config.mesh.name = Some(name);
        }
        Ok(config)
    }
}

pub(crate) fn serve(args: ServeArgs) -> Result<()> {
    let check = args.check;
    let config = args.into_config()?;
    config.check()?;
    let runtime = multi_thread_runtime(config.io_threads, "meshserve-io")?;
    if check {
        return check_endpoints(&runtime, &config);
    }
    runtime.block_on(async {
        // Listening starts before the node announces it serves: a SIGTERM sent the moment it
        // is up must drain it, not kill it.
        let mut signals = StopSignals::install()?;
        let hangups = ReloadSignal::install()?;
        let node = Node::start(config).await?;
        hangups.reload_on_signal(node.cert_reloader());
        node.serve(async move {
            signals.next().await;
            // A second signal means "now": no grace period, no drain.
            tokio::spawn(async move {
                signals.next().await;
                tracing::warn!("second signal; exiting without draining");
                std::process::exit(1);
            });
        })
        .await;
        Ok(())
    })
}

/// The operator's stop signals (SIGTERM, SIGINT), caught from the moment this exists.
struct StopSignals {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> Result<StopSignals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(StopSignals {
                terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
                interrupt: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
            })
        }
        #[cfg(not(unix))]
        Ok(StopSignals {})
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => tracing::info!("interrupted; shutting down"),
            _ = self.terminate.recv() => tracing::info!("SIGTERM; shutting down"),
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("interrupted; shutting down");
        }
    }
}

/// SIGHUP: reload certificates. Caught from the moment this exists, so a SIGHUP while the node
/// starts does not end it (the default action).
struct ReloadSignal {
    #[cfg(unix)]
    hangup: tokio::signal::unix::Signal,
}

impl ReloadSignal {
    fn install() -> Result<ReloadSignal> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(ReloadSignal {
                hangup: signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?,
            })
        }
        #[cfg(not(unix))]
        Ok(ReloadSignal {})
    }

    fn reload_on_signal(self, reloader: meshserve::node::CertReloader) {
        #[cfg(unix)]
        {
            let mut hangup = self.hangup;
            tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    let reloader = reloader.clone();
                    match tokio::task::spawn_blocking(move || reloader.reload()).await {
                        Ok(Ok(reloaded)) => {
                            tracing::info!(%reloaded, "SIGHUP: certificates reloaded");
                        }
                        Ok(Err(e)) => tracing::error!(
                            error = %e,
                            "SIGHUP: certificate reload failed; the certificates in use stay"
                        ),
                        Err(e) => tracing::error!(error = %e, "SIGHUP: certificate reload failed"),
                    }
                }
            });
        }
        #[cfg(not(unix))]
        let _ = reloader;
    }
}

/// Loads every endpoint's plugins and says which would fail at start, and why.
fn check_endpoints(runtime: &tokio::runtime::Runtime, config: &NodeConfig) -> Result<()> {
    let endpoints = runtime.block_on(meshserve::node::check_endpoints(config))?;
    let broken: Vec<_> = endpoints.iter().filter(|e| !e.ready).collect();
    for endpoint in &broken {
        let reason = endpoint.reason.as_deref().unwrap_or("not loaded");
        eprintln!("endpoint '{}': {reason}", endpoint.name);
    }
    if !broken.is_empty() {
        anyhow::bail!(
            "{} of {} endpoints would not start",
            broken.len(),
            endpoints.len()
        );
    }
    println!(
        "config ok; {} endpoints load, their plugins export their stage and accept their config",
        endpoints.len()
    );
    Ok(())
}
