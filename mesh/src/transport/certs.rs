//! The mesh's certificate authority: `meshserve certs` creates it and issues node and client
//! certificates as PEM files. The operator's folder holds the CA key; each node gets a folder
//! of its own holding only what it needs, to ship to that node as it is (a Kubernetes Secret,
//! a config-management file set): no node ever holds `ca.key` or another node's key.
//!
//! ```text
//! DIR/ca.pem, DIR/ca.key              the mesh CA (stays with the operator)
//! DIR/node-NAME/                      what node NAME needs, and nothing else:
//!     ca.pem                            the CA certificate, to verify peers
//!     node-NAME.pem, node-NAME.key      server and client auth, SANs `node.meshserve` and
//!                                       `NAME.node.meshserve`
//! DIR/client-NAME.pem, client-NAME.key  a native client: client auth, SAN `client.meshserve`
//! DIR/server.pem, server.key          the HTTP/3 (and HTTPS) front door: server auth, SANs the
//!                                     DNS names and IPs clients use (`--server NAME`)
//! ```
//!
//! The front-door certificate is signed by the same CA for tests and demos, where clients
//! trust `ca.pem`; in production it usually comes from the organisation's public PKI.
//!
//! Nodes are reached by address, not by DNS name, so every node certificate carries the same
//! mesh-internal name [`NODE_SAN`], which callers verify: what proves a node is the signature of
//! the mesh CA, and what proves it is a *node* (allowed into membership) rather than a client is
//! that name. A node certificate also carries [`node_san`] of the node's own name: peers accept
//! membership packets and adverts about node `NAME` only from a certificate that names it, so
//! one node's certificate cannot speak for another node.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// The DNS name every node certificate carries and every caller verifies.
pub const NODE_SAN: &str = "node.meshserve";

/// Longest node name: with [`NODE_SAN`] appended it stays a valid DNS name.
pub const MAX_NODE_NAME: usize = 128;

/// Whether `name` can name a node: lower-case letters, digits, `-` and `_`, in dot-separated
/// labels of at most 63 characters, at most [`MAX_NODE_NAME`] in all. So [`node_san`] is a DNS
/// name, and no two node names match the same one (DNS names ignore case). What peers accept
/// in adverts and `meshserve certs` in node certificates.
pub fn valid_node_name(name: &str) -> bool {
    name.len() <= MAX_NODE_NAME
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_'))
        })
}

/// The DNS name that binds a node certificate to node `name`.
pub fn node_san(name: &str) -> String {
    format!("{name}.{NODE_SAN}")
}

/// The DNS name every native-client certificate carries.
pub const CLIENT_SAN: &str = "client.meshserve";

const CA_COMMON_NAME: &str = "meshserve mesh CA";

/// Days a node, client or server certificate is valid by default.
pub const DEFAULT_VALIDITY_DAYS: u32 = 365;

/// Days the CA certificate is valid: it outlives many rounds of the certificates it signs.
const CA_VALIDITY_DAYS: u32 = 3650;

/// Sets a validity window of `days` from now (starting an hour ago, for clock skew).
fn valid_for(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

/// Why certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Key or certificate generation failed, or a stored key is unusable.
    #[error("{context}: {source}")]
    Generate {
        /// What was being made.
        context: String,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// A folder others may write to: they could swap a key or certificate under us.
    #[error(
        "{0} is writable by its group or by everyone; keys are not written there (chmod go-w it, or choose another folder)"
    )]
    UnsafeFolder(String),
    /// A name that cannot be part of a file name.
    #[error("invalid name '{0}': use letters, digits, '-', '_' and '.'")]
    InvalidName(String),
    /// Half a CA in the folder: issuing would replace the CA every node trusts.
    #[error(
        "{present} exists but {missing} does not: certificates are issued where the CA key lives (a node's folder holds only ca.pem); refusing to create a new CA over it"
    )]
    PartialCa {
        /// The file that exists.
        present: String,
        /// The file that is missing.
        missing: String,
    },
}

/// The mesh CA, able to issue certificates.
pub struct MeshCa {
    key: KeyPair,
    cert_pem: String,
    validity_days: u32,
}

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A mesh node: may join membership, forward and serve.
    Node,
    /// A native client: may send requests and queries.
    Client,
}

impl Role {
    fn prefix(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Client => "client",
        }
    }
}

/// The folder `meshserve certs` makes for node `name` under the operator's folder `dir`.
pub fn node_dir(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("node-{name}"))
}

/// Where `name`'s files in `role` are, given `dir`: a node's own folder, or the operator's
/// folder whose `node-NAME/` is then used. Clients read `dir` itself.
pub fn identity_dir(dir: &Path, role: Role, name: &str) -> PathBuf {
    let own = node_dir(dir, name);
    if role == Role::Node && own.is_dir() {
        own
    } else {
        dir.to_path_buf()
    }
}

/// The certificate and key paths of `name` in `role` under `dir`.
pub fn paths(dir: &Path, role: Role, name: &str) -> (PathBuf, PathBuf) {
    let stem = format!("{}-{name}", role.prefix());
    (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    )
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn generate(context: &str) -> impl Fn(rcgen::Error) -> CertError + '_ {
    move |source| CertError::Generate {
        context: context.to_string(),
        source,
    }
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `text` to `path`. A private file (a key) is born `0600` under a temporary name,
/// created only if that name is free (`create_new`, so never through a planted file or link),
/// and renamed into place: no moment exists, whatever the umask, at which another user could
/// open it, and reissuing replaces a key in one step.
fn write(path: &Path, text: &str, private: bool) -> Result<(), CertError> {
    let io = io_error(path);
    if !private {
        return std::fs::write(path, text).map_err(io);
    }
    let mut staged = path.as_os_str().to_owned();
    staged.push(format!(".new-{}", std::process::id()));
    let staged = PathBuf::from(staged);
    // Left by a run that died between create and rename; the folder is ours alone (checked).
    let _ = std::fs::remove_file(&staged);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let written = options.open(&staged).and_then(|mut file| {
        use std::io::Write;
        file.write_all(text.as_bytes())?;
        file.sync_all()
    });
    if let Err(e) = written.and_then(|()| std::fs::rename(&staged, path)) {
        let _ = std::fs::remove_file(&staged);
        return Err(io(e));
    }
    Ok(())
}

/// Makes `dir` (and its parents) for keys: created `0700`; an existing folder that its group
/// or everyone may write to is refused.
fn private_dir(dir: &Path) -> Result<(), CertError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(io_error(dir))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir)
            .map_err(io_error(dir))?
            .permissions()
            .mode();
        if mode & 0o022 != 0 {
            return Err(CertError::UnsafeFolder(dir.display().to_string()));
        }
    }
    Ok(())
}

fn read(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Io {
        path: path.display().to_string(),
        source,
    })
}

impl MeshCa {
    /// A new CA with a fresh key.
    pub fn create() -> Result<MeshCa, CertError> {
        let key = KeyPair::generate().map_err(generate("CA key"))?;
        let mut params = ca_params();
        valid_for(&mut params, CA_VALIDITY_DAYS);
        let cert = params
            .self_signed(&key)
            .map_err(generate("CA certificate"))?;
        Ok(MeshCa {
            key,
            cert_pem: cert.pem(),
            validity_days: DEFAULT_VALIDITY_DAYS,
        })
    }

    /// Issues certificates valid for `days` from now instead of [`DEFAULT_VALIDITY_DAYS`].
    pub fn with_validity_days(mut self, days: u32) -> MeshCa {
        self.validity_days = days;
        self
    }

    /// The CA stored in `dir`, or a new one saved there when there is none. Never replaces a
    /// CA certificate: a folder with only one of `ca.pem` and `ca.key` is an error.
    pub fn open_or_create(dir: &Path) -> Result<(MeshCa, bool), CertError> {
        private_dir(dir)?;
        let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
        if cert.exists() != key.exists() {
            let (present, missing) = if cert.exists() {
                (&cert, &key)
            } else {
                (&key, &cert)
            };
            return Err(CertError::PartialCa {
                present: present.display().to_string(),
                missing: missing.display().to_string(),
            });
        }
        if cert.exists() && key.exists() {
            let key_pem = read(&key)?;
            let key = KeyPair::from_pem(&key_pem).map_err(generate("ca.key"))?;
            return Ok((
                MeshCa {
                    key,
                    cert_pem: read(&cert)?,
                    validity_days: DEFAULT_VALIDITY_DAYS,
                },
                false,
            ));
        }
        let ca = MeshCa::create()?;
        write(&cert, &ca.cert_pem, false)?;
        write(&key, &ca.key.serialize_pem(), true)?;
        Ok((ca, true))
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A certificate and key (PEM) for `name` in `role`, signed by this CA.
    pub fn issue(&self, role: Role, name: &str) -> Result<(String, String), CertError> {
        let valid = match role {
            Role::Node => valid_node_name(name),
            Role::Client => {
                !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            }
        };
        if !valid {
            return Err(CertError::InvalidName(name.to_string()));
        }
        let sans = match role {
            Role::Node => vec![NODE_SAN.to_string(), node_san(name)],
            Role::Client => vec![CLIENT_SAN.to_string()],
        };
        let mut params = CertificateParams::new(sans).map_err(generate("certificate"))?;
        params.distinguished_name.push(DnType::CommonName, name);
        valid_for(&mut params, self.validity_days);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match role {
            // A node accepts connections and opens them to peers.
            Role::Node => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Role::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        let key = KeyPair::generate().map_err(generate("key"))?;
        // Rebuilding the issuer from the CA's parameters yields the same subject and key
        // identifier as the stored CA certificate, so chains verify without parsing it.
        let issuer = Issuer::new(ca_params(), &self.key);
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(generate("certificate"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A server certificate and key (PEM) for a front door reached as `names` (DNS names or IP
    /// addresses), signed by this CA.
    pub fn issue_server(&self, names: &[String]) -> Result<(String, String), CertError> {
        if names.is_empty() {
            return Err(CertError::InvalidName(String::new()));
        }
        let mut params =
            CertificateParams::new(names.to_vec()).map_err(generate("server certificate"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, names[0].as_str());
        valid_for(&mut params, self.validity_days);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().map_err(generate("key"))?;
        let issuer = Issuer::new(ca_params(), &self.key);
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(generate("server certificate"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Issues the front-door certificate for `names` as `dir/server.pem` and `server.key`,
    /// returning the certificate's path.
    pub fn issue_server_to(&self, dir: &Path, names: &[String]) -> Result<PathBuf, CertError> {
        let (cert, key) = self.issue_server(names)?;
        private_dir(dir)?;
        let cert_path = dir.join("server.pem");
        write(&cert_path, &cert, false)?;
        write(&dir.join("server.key"), &key, true)?;
        Ok(cert_path)
    }

    /// Issues `name` in `role` and writes it under the operator's folder `dir` (a node's into
    /// its own folder, [`node_dir`], with the CA certificate), returning the certificate's path.
    /// Reissuing replaces the pair; a running node picks it up on SIGHUP.
    pub fn issue_to(&self, dir: &Path, role: Role, name: &str) -> Result<PathBuf, CertError> {
        let (cert, key) = self.issue(role, name)?;
        let dir = match role {
            Role::Node => node_dir(dir, name),
            Role::Client => dir.to_path_buf(),
        };
        private_dir(&dir)?;
        if role == Role::Node {
            write(&dir.join("ca.pem"), &self.cert_pem, false)?;
        }
        let (cert_path, key_path) = paths(&dir, role, name);
        write(&cert_path, &cert, false)?;
        write(&key_path, &key, true)?;
        Ok(cert_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{CertificateDer, UnixTime};
    use std::time::{Duration, SystemTime};

    fn der(pem: &str) -> CertificateDer<'static> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .unwrap()
            .unwrap()
    }

    /// Whether `cert` chains to `ca` as a server certificate at `at`.
    fn valid_at(ca: &str, cert: &str, at: SystemTime) -> bool {
        let ca = der(ca);
        let anchors = [webpki::anchor_from_trusted_cert(&ca).unwrap()];
        let cert = der(cert);
        let leaf = webpki::EndEntityCert::try_from(&cert).unwrap();
        let time = UnixTime::since_unix_epoch(at.duration_since(SystemTime::UNIX_EPOCH).unwrap());
        leaf.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &[],
            time,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .is_ok()
    }

    #[test]
    fn certificates_expire_after_their_validity() {
        let ca = MeshCa::create().unwrap();
        let (node, _) = ca.issue(Role::Node, "a").unwrap();
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        assert!(valid_at(ca.cert_pem(), &node, now));
        assert!(valid_at(ca.cert_pem(), &node, now + 364 * day));
        assert!(!valid_at(ca.cert_pem(), &node, now + 366 * day));
        let short = ca.with_validity_days(7);
        let (server, _) = short.issue_server(&["127.0.0.1".into()]).unwrap();
        assert!(valid_at(short.cert_pem(), &server, now + 6 * day));
        assert!(!valid_at(short.cert_pem(), &server, now + 8 * day));
    }

    #[test]
    fn a_node_folder_holds_only_that_nodes_key_and_the_ca_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = MeshCa::open_or_create(dir.path()).unwrap();
        for name in ["a", "b"] {
            ca.issue_to(dir.path(), Role::Node, name).unwrap();
        }
        ca.issue_to(dir.path(), Role::Client, "ops").unwrap();
        let mut files: Vec<String> = std::fs::read_dir(node_dir(dir.path(), "a"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(files, ["ca.pem", "node-a.key", "node-a.pem"]);
        assert_eq!(
            std::fs::read_to_string(node_dir(dir.path(), "a").join("ca.pem")).unwrap(),
            ca.cert_pem()
        );
        assert!(
            !dir.path().join("node-a.key").exists(),
            "no node key next to the CA key"
        );
        assert_eq!(
            identity_dir(dir.path(), Role::Node, "b"),
            node_dir(dir.path(), "b")
        );
        let own = node_dir(dir.path(), "a");
        assert_eq!(
            identity_dir(&own, Role::Node, "a"),
            own,
            "a node's own folder"
        );
        assert_eq!(identity_dir(dir.path(), Role::Client, "ops"), dir.path());
    }

    #[test]
    fn a_ca_certificate_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let (_, created) = MeshCa::open_or_create(dir.path()).unwrap();
        assert!(created);
        let original = std::fs::read(dir.path().join("ca.pem")).unwrap();
        let (_, created) = MeshCa::open_or_create(dir.path()).unwrap();
        assert!(!created, "reused");
        // A node's folder: the CA certificate without its key.
        std::fs::remove_file(dir.path().join("ca.key")).unwrap();
        let refused = MeshCa::open_or_create(dir.path()).err().unwrap();
        assert!(matches!(refused, CertError::PartialCa { .. }), "{refused}");
        assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), original);
        assert!(!dir.path().join("ca.key").exists());
    }
}
