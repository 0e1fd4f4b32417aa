//! Certificates reloaded without a restart: on SIGHUP the node reads every certificate it
//! serves with (the mesh identity, the HTTP/3 and the HTTPS front doors) from the same files
//! again and swaps them in for new connections. All or nothing: when any file is missing or
//! broken, the node keeps every identity it had and says which file is wrong. Connections
//! already open finish with the identity they were made with.

use super::{NodeError, http3_server_config, mesh_identity};
use crate::cluster::Cluster;
use crate::config::NodeConfig;
use crate::http::server;
use std::sync::Arc;
use tokio::sync::watch;

/// A handle that reloads a node's certificates; cheap to clone, usable while the node serves.
#[derive(Clone)]
pub struct CertReloader {
    pub(super) config: Arc<NodeConfig>,
    pub(super) https: Option<Arc<watch::Sender<Arc<rustls::ServerConfig>>>>,
    pub(super) http3: Option<quinn::Endpoint>,
    pub(super) cluster: Option<Arc<Cluster>>,
}

/// What a reload replaced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// The mesh identity (node certificate, key and CA).
    pub mesh: bool,
    /// The HTTP/3 front door's certificate.
    pub http3: bool,
    /// The HTTPS (HTTP/1.1 and HTTP/2) front door's certificate.
    pub https: bool,
}

impl std::fmt::Display for Reloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<&str> = [
            (self.mesh, "mesh"),
            (self.http3, "http3"),
            (self.https, "https"),
        ]
        .into_iter()
        .filter_map(|(done, name)| done.then_some(name))
        .collect();
        match parts.is_empty() {
            true => f.write_str("nothing (no TLS configured)"),
            false => f.write_str(&parts.join(", ")),
        }
    }
}

impl CertReloader {
    /// Reads every configured certificate again and swaps them all in, or none.
    pub fn reload(&self) -> Result<Reloaded, NodeError> {
        let https = match (
            &self.https,
            &self.config.http.tls_cert,
            &self.config.http.tls_key,
        ) {
            (Some(_), Some(cert), Some(key)) => Some(server::tls_config(cert, key)?),
            _ => None,
        };
        let http3 = match &self.http3 {
            Some(_) => Some(http3_server_config(&self.config.http3)?),
            None => None,
        };
        let mesh = match &self.cluster {
            Some(cluster) => Some((cluster, mesh_identity(&self.config.mesh, cluster.name())?)),
            None => None,
        };
        let mut reloaded = Reloaded::default();
        // The mesh first: its swap is the only one that can still refuse (a certificate that
        // does not name this node), and then nothing has changed.
        if let Some((cluster, identity)) = mesh {
            cluster.set_identity(&identity)?;
            reloaded.mesh = true;
        }
        if let (Some(endpoint), Some(config)) = (&self.http3, http3) {
            endpoint.set_server_config(Some(config));
            reloaded.http3 = true;
        }
        if let (Some(sender), Some(config)) = (&self.https, https) {
            sender.send_replace(config);
            reloaded.https = true;
        }
        Ok(reloaded)
    }
}
