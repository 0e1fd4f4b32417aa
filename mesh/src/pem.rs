//! PEM files into rustls types, shared by the HTTPS front door and the mesh transport.

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io;
use std::path::Path;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error (not a `source`: the message already says it).
        error: io::Error,
    },
    /// The files hold no usable certificate or key.
    #[error("{0}")]
    Invalid(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        path: path.display().to_string(),
        error,
    })
}

/// Every certificate in a PEM file; at least one.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let chain = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid(format!("{}: {e}", path.display())))?;
    if chain.is_empty() {
        return Err(TlsError::Invalid(format!(
            "{}: no certificate found",
            path.display()
        )));
    }
    Ok(chain)
}

/// The private key in a PEM file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| TlsError::Invalid(format!("{}: {e}", path.display())))?
        .ok_or_else(|| TlsError::Invalid(format!("{}: no private key found", path.display())))
}

/// The process-wide crypto provider: ring, as everywhere in meshserve.
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
