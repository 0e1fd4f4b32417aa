//! Mutual TLS for `meshserve/1`: both ends present a certificate of the mesh CA, TLS 1.3 only
//! (QUIC requires it), ALPN `meshserve/1`. The ALPN list leaves room for `h3` on the same
//! endpoint later: a connection's protocol says which service it reaches.

use crate::pem::{self, TlsError};
use crate::transport::certs::{self, NODE_SAN, Role};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// ALPN of node-to-node and native-client traffic.
pub const ALPN: &[u8] = b"meshserve/1";

/// A member of the mesh's PKI: the CA to trust and our own certificate.
pub struct MeshIdentity {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for MeshIdentity {
    fn clone(&self) -> Self {
        MeshIdentity {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl MeshIdentity {
    /// Loads the CA certificate, our certificate chain and key from PEM files.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<MeshIdentity, TlsError> {
        Ok(MeshIdentity {
            ca: pem::read_certs(ca)?,
            chain: pem::read_certs(cert)?,
            key: pem::read_key(key)?,
        })
    }

    /// Whether our own certificate is node `name`'s (see [`is_node_certificate`]).
    pub fn is_node(&self, name: &str) -> bool {
        self.chain
            .first()
            .is_some_and(|leaf| is_node_certificate(leaf, name))
    }

    /// Loads `name`'s files from a folder made by `meshserve certs`: the operator's folder,
    /// or a node's own ([`certs::identity_dir`]).
    pub fn from_dir(dir: &Path, role: Role, name: &str) -> Result<MeshIdentity, TlsError> {
        let dir = certs::identity_dir(dir, role, name);
        let (cert, key) = certs::paths(&dir, role, name);
        MeshIdentity::load(&dir.join("ca.pem"), &cert, &key)
    }

    fn roots(&self) -> Result<rustls::RootCertStore, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in &self.ca {
            roots
                .add(cert.clone())
                .map_err(|e| TlsError::Invalid(format!("mesh CA certificate: {e}")))?;
        }
        Ok(roots)
    }

    /// The server side: only peers with a certificate of the mesh CA get in.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, TlsError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()?), pem::provider())
                .build()
                .map_err(|e| TlsError::Invalid(format!("mesh CA: {e}")))?;
        let mut tls = rustls::ServerConfig::builder_with_provider(pem::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Invalid(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Invalid(format!("certificate and key do not match: {e}")))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = QuicServerConfig::try_from(tls)
            .map_err(|e| TlsError::Invalid(format!("QUIC TLS: {e}")))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(transport(CLIENT_GRANT));
        // The accept loop answers each attempt as it comes (a Retry, a refusal or a handshake
        // with its place), so only a burst waits here: bound its count and what it buffers
        // (quinn's defaults are 65,536 attempts and 100 MiB).
        config
            .max_incoming(4096)
            .incoming_buffer_size(64 << 10)
            .incoming_buffer_size_total(4 << 20);
        Ok(config)
    }

    /// The client side: trusts only the mesh CA and presents our certificate.
    pub fn client_config(&self) -> Result<quinn::ClientConfig, TlsError> {
        let mut tls = rustls::ClientConfig::builder_with_provider(pem::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Invalid(e.to_string()))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Invalid(format!("certificate and key do not match: {e}")))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = QuicClientConfig::try_from(tls)
            .map_err(|e| TlsError::Invalid(format!("QUIC TLS: {e}")))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(transport(OUTBOUND_GRANT));
        Ok(config)
    }
}

/// Transport settings of both sides. Keep-alives hold pooled connections open through idle
/// periods; the idle timeout bounds how long a vanished peer's connection lingers (the
/// membership layer, not QUIC, decides that a node is dead). Every resource a peer can make
/// us hold is finite: no unidirectional streams (`meshserve/1` uses none), and `grant`'s cap
/// on concurrent request streams and flow-control windows (quinn's default connection
/// window is unbounded).
fn transport(grant: Grant) -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(Duration::from_millis(500)))
        .max_idle_timeout(Duration::from_secs(2).try_into().ok())
        .max_concurrent_bidi_streams(grant.streams.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(STREAM_WINDOW.into())
        .receive_window(grant.window.into())
        .datagram_receive_buffer_size(Some(1 << 20));
    Arc::new(transport)
}

/// What a peer may make us hold on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Concurrent request streams the peer may open.
    pub streams: u32,
    /// Bytes the peer may send on all streams ahead of our reading them.
    pub window: u32,
}

/// A node's grant: forwarding between nodes needs many streams in flight at once.
pub const NODE_GRANT: Grant = Grant {
    streams: 1024,
    window: 32 << 20,
};

/// A native client's grant, narrower than a node's, so that clients cannot take what
/// forwarding needs. A server hands every peer this one in its handshake and widens it to
/// [`NODE_GRANT`] once the peer's certificate shows a node ([`Grant::widen`]): QUIC cannot
/// take back credit once given (quinn only stops renewing it), so a grant narrowed after the
/// handshake would still let a client open a node's streams and fill a node's window once.
pub const CLIENT_GRANT: Grant = Grant {
    streams: 128,
    window: 8 << 20,
};

/// What a connection we open grants the peer we dial. `meshserve/1` has the dialling side ask
/// and the peer answer on the same stream, so the peer may open no streams of its own (they
/// would never be read, their bytes held until the connection closes), while its answers may
/// be as large as a node's.
pub const OUTBOUND_GRANT: Grant = Grant {
    streams: 0,
    window: NODE_GRANT.window,
};

impl Grant {
    /// Raises `connection`'s grant to this one; the peer learns it in its next packet.
    pub fn widen(self, connection: &quinn::Connection) {
        connection.set_max_concurrent_bi_streams(self.streams.into());
        connection.set_receive_window(self.window.into());
    }
}

/// Bytes a peer may send on one stream ahead of our reading them.
const STREAM_WINDOW: u32 = 2 << 20;

/// What the peer of an established connection is, from its certificate: a node carries
/// [`NODE_SAN`]. Anything else signed by the mesh CA is a client.
pub fn peer_role(connection: &quinn::Connection) -> Role {
    if peer_leaf(connection).is_some_and(|leaf| valid_for(&leaf, NODE_SAN)) {
        Role::Node
    } else {
        Role::Client
    }
}

/// Whether the peer of an established connection holds the certificate of node `name`
/// ([`certs::node_san`]): the only peer whose word about node `name` counts.
pub fn peer_is_node(connection: &quinn::Connection, name: &str) -> bool {
    peer_leaf(connection).is_some_and(|leaf| is_node_certificate(&leaf, name))
}

/// Whether `leaf` is the certificate of node `name`: a node certificate that names it.
pub fn is_node_certificate(leaf: &CertificateDer<'_>, name: &str) -> bool {
    certs::valid_node_name(name)
        && valid_for(leaf, NODE_SAN)
        && valid_for(leaf, &certs::node_san(name))
}

/// A digest (SHA-256) of the peer's certificate: who holds a connection, for counting.
pub fn peer_certificate_digest(connection: &quinn::Connection) -> Option<[u8; 32]> {
    use sha2::Digest;
    peer_leaf(connection).map(|leaf| sha2::Sha256::digest(leaf.as_ref()).into())
}

fn peer_leaf(connection: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let identity = connection.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.first().cloned()
}

fn valid_for(leaf: &CertificateDer<'_>, dns_name: &str) -> bool {
    let Ok(name) = ServerName::try_from(dns_name) else {
        return false;
    };
    webpki::EndEntityCert::try_from(leaf)
        .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_resource_a_peer_can_make_us_hold_is_finite() {
        for (grant, streams, window) in [
            (super::NODE_GRANT, 1024, 33554432),
            (super::CLIENT_GRANT, 128, 8388608),
            (super::OUTBOUND_GRANT, 0, 33554432),
        ] {
            let described = format!("{:?}", super::transport(grant));
            for expected in [
                "max_concurrent_uni_streams: 0".to_string(),
                format!("max_concurrent_bidi_streams: {streams}"),
                "stream_receive_window: 2097152".to_string(),
                format!("receive_window: {window}"),
            ] {
                assert!(described.contains(&expected), "{expected} in {described}");
            }
        }
    }

    #[test]
    fn connection_attempts_waiting_to_be_answered_are_finite() {
        let dir = tempfile::tempdir().unwrap();
        let ca = super::certs::MeshCa::create().unwrap();
        let (cert, key) = ca.issue(super::Role::Node, "a").unwrap();
        let path = |name: &str, pem: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).unwrap();
            path
        };
        let identity = super::MeshIdentity::load(
            &path("ca.pem", ca.cert_pem()),
            &path("a.pem", &cert),
            &path("a.key", &key),
        )
        .unwrap();
        let described = format!("{:?}", identity.server_config().unwrap());
        for expected in [
            "max_incoming: 4096",
            "incoming_buffer_size: 65536",
            "incoming_buffer_size_total: 4194304",
        ] {
            assert!(described.contains(expected), "{expected} in {described}");
        }
    }
}
