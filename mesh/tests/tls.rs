//! TLS on every surface: HTTPS on the TCP front door (rustls with ALPN choosing HTTP/2 or
//! HTTP/1.1), and certificates reloaded on SIGHUP for the mesh, HTTP/3 and HTTPS alike.

mod support;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshserve::client::{ClientConfig, MeshClient};
use meshserve::transport::certs::{Role, node_dir, paths};
use meshserve::transport::{MeshEndpoint, MeshIdentity};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{TestNode, copy_examples, make_certs};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{
    self,
    pki_types::{CertificateDer, ServerName},
};

fn client_config(
    cert_der: rustls::pki_types::CertificateDer<'static>,
    alpn: &[u8],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_der).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

#[tokio::test]
async fn https_serves_http2_and_http1_by_alpn() {
    let repo = copy_examples();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_path = repo.path().join("cert.pem");
    let key_path = repo.path().join("key.pem");
    std::fs::write(&cert_path, certified.cert.pem()).unwrap();
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).unwrap();
    let config = repo.path().join("node.toml");
    std::fs::write(
        &config,
        "[http]\ntls_cert = \"cert.pem\"\ntls_key = \"key.pem\"\n",
    )
    .unwrap();
    let node = TestNode::start(repo.path(), &["--config", config.to_str().unwrap()]);
    assert!(
        node.log_text().contains("address=https://"),
        "{}",
        node.log_text()
    );

    // A plaintext client on the TLS port gets no answer; the TLS clients below still do.
    let plain = reqwest::Client::new()
        .get(node.url("/v2/health/live"))
        .send()
        .await;
    assert!(plain.is_err());

    for alpn in [&b"h2"[..], b"http/1.1"] {
        let connector = TlsConnector::from(client_config(certified.cert.der().clone(), alpn));
        let tcp = tokio::net::TcpStream::connect(node.addr).await.unwrap();
        let tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
        let request = hyper::Request::get("/v2/health/ready")
            .header(hyper::header::HOST, "localhost")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let status = if alpn == b"h2" {
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .unwrap();
            tokio::spawn(connection);
            let response = sender.send_request(request).await.unwrap();
            assert_eq!(response.version(), hyper::Version::HTTP_2);
            response.status()
        } else {
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(connection);
            let response = sender.send_request(request).await.unwrap();
            let status = response.status();
            response.into_body().collect().await.unwrap();
            status
        };
        assert_eq!(status, 200);
    }
}

/// The trust anchors of a `meshserve certs` folder.
fn mesh_roots(certs: &Path) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for cert in meshserve::pem::read_certs(&certs.join("ca.pem")).unwrap() {
        roots.add(cert).unwrap();
    }
    roots
}

fn first_cert(path: &Path) -> CertificateDer<'static> {
    meshserve::pem::read_certs(path).unwrap().remove(0)
}

fn leaf_of(connection: &quinn::Connection) -> CertificateDer<'static> {
    connection
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|chain| chain[0].clone())
        .expect("a peer certificate")
}

/// The certificate a new mesh connection to `addr` is shown.
async fn mesh_leaf(certs: &Path, addr: SocketAddr) -> CertificateDer<'static> {
    let identity = MeshIdentity::from_dir(certs, Role::Client, "app").unwrap();
    let endpoint = MeshEndpoint::client(&identity, 1 << 20).unwrap();
    leaf_of(&endpoint.connection(addr).await.unwrap())
}

/// The certificate a new HTTP/3 connection to `addr` is shown.
async fn http3_leaf(certs: &Path, addr: SocketAddr) -> CertificateDer<'static> {
    let mut tls = rustls::ClientConfig::builder_with_provider(meshserve::pem::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(mesh_roots(certs))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let connection = endpoint.connect(addr, "127.0.0.1").unwrap().await.unwrap();
    leaf_of(&connection)
}

/// The certificate a new HTTPS connection to `addr` is shown.
async fn https_leaf(certs: &Path, addr: SocketAddr) -> CertificateDer<'static> {
    let mut config = rustls::ClientConfig::builder_with_provider(meshserve::pem::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(mesh_roots(certs))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// What each surface shows a new connection: mesh, HTTP/3, HTTPS.
async fn shown(certs: &Path, node: &TestNode, quic: SocketAddr) -> [CertificateDer<'static>; 3] {
    [
        mesh_leaf(certs, quic).await,
        http3_leaf(certs, node.http3.unwrap()).await,
        https_leaf(certs, node.addr).await,
    ]
}

/// What the files hold: node a's certificate, the front-door certificate (twice).
fn on_disk(certs: &Path) -> [CertificateDer<'static>; 3] {
    let node = paths(&node_dir(certs, "a"), Role::Node, "a").0;
    let server = first_cert(&certs.join("server.pem"));
    [first_cert(&node), server.clone(), server]
}

fn hang_up(node: &TestNode) {
    let status = Command::new("kill")
        .args(["-HUP", &node.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits until the node has logged `needle` `count` times.
async fn logged(node: &TestNode, needle: &str, count: usize) {
    let end = Instant::now() + Duration::from_secs(10);
    while node.log_text().matches(needle).count() < count {
        assert!(
            Instant::now() < end,
            "no '{needle}' in the log:\n{}",
            node.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_every_certificate_for_new_connections_and_a_broken_file_changes_nothing() {
    let repo = copy_examples();
    let certs = repo.path().join("certs");
    make_certs(&certs, &["a"], &["app"], &["127.0.0.1"]);
    let config = repo.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "[http]\ntls_cert = \"{0}/server.pem\"\ntls_key = \"{0}/server.key\"\n",
            certs.display()
        ),
    )
    .unwrap();
    let (cert, key) = (certs.join("server.pem"), certs.join("server.key"));
    let mut args = vec!["--config", config.to_str().unwrap()];
    args.extend(["--quic", "127.0.0.1:0", "--name", "a"]);
    args.extend(["--certs", certs.to_str().unwrap()]);
    args.extend(["--http3", "127.0.0.1:0"]);
    args.extend(["--http3-cert", cert.to_str().unwrap()]);
    args.extend(["--http3-key", key.to_str().unwrap()]);
    let node = TestNode::start(repo.path(), &args);
    let quic = node.mesh_addr().expect("a mesh address");
    let first = on_disk(&certs);
    assert_eq!(shown(&certs, &node, quic).await, first);
    // A client connected before the reload.
    let identity = MeshIdentity::from_dir(&certs, Role::Client, "app").unwrap();
    let client = MeshClient::new(ClientConfig::new(vec![quic], identity)).unwrap();
    client.status(quic).await.unwrap();

    // Reissued on disk: nothing changes until the signal.
    make_certs(&certs, &["a"], &[], &["127.0.0.1"]);
    let second = on_disk(&certs);
    for (old, new) in first.iter().zip(&second) {
        assert_ne!(old, new, "make_certs issued new certificates");
    }
    assert_eq!(shown(&certs, &node, quic).await, first);
    hang_up(&node);
    logged(&node, "certificates reloaded", 1).await;
    assert_eq!(
        shown(&certs, &node, quic).await,
        second,
        "new connections see the reissued certificates"
    );
    assert!(
        client.status(quic).await.is_ok(),
        "a connection made before the reload still works"
    );

    // A reissued node certificate next to a broken front-door file: all or nothing.
    make_certs(&certs, &["a"], &[], &[]);
    std::fs::write(&cert, "not a certificate").unwrap();
    hang_up(&node);
    logged(&node, "certificate reload failed", 1).await;
    assert_eq!(
        shown(&certs, &node, quic).await,
        second,
        "a failed reload keeps every certificate in use"
    );
    assert!(
        node.log_text().contains(&cert.display().to_string()),
        "the log names the broken file:\n{}",
        node.log_text()
    );
    assert!(
        client.status(quic).await.is_ok(),
        "the node serves on after a failed reload"
    );
}

/// Every mode a `.key` file under `dir` has while `meshserve certs` runs under `umask 000`
/// (so nothing but the code's own choice makes a file private), polled as fast as the folder
/// can be read; and the run's exit status.
fn key_modes_while_issuing(dir: &Path) -> (Vec<(String, u32)>, std::process::ExitStatus) {
    use std::os::unix::fs::PermissionsExt;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 000 && exec '{}' certs --dir '{}' --node a --node b --node c --client ops --client app --server 127.0.0.1",
            env!("CARGO_BIN_EXE_meshserve"),
            dir.display()
        ))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    let look = |seen: &mut Vec<(String, u32)>| {
        for folder in std::iter::once(dir.to_path_buf()).chain(
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir()),
        ) {
            for entry in std::fs::read_dir(&folder).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.contains(".key")
                    && let Ok(meta) = entry.metadata()
                {
                    seen.push((name, meta.permissions().mode() & 0o777));
                }
            }
        }
    };
    let status = loop {
        look(&mut seen);
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
    };
    look(&mut seen);
    (seen, status)
}

#[test]
fn keys_are_born_private_and_a_writable_folder_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    for run in 0..5 {
        let dir = root.path().join(format!("run-{run}"));
        let (seen, status) = key_modes_while_issuing(&dir);
        assert!(status.success(), "meshserve certs failed: {status}");
        assert!(
            seen.iter().any(|(name, _)| name == "ca.key"),
            "the watcher saw the keys"
        );
        let open: Vec<_> = seen.iter().filter(|(_, mode)| *mode != 0o600).collect();
        assert!(open.is_empty(), "key files seen with other modes: {open:?}");
        for folder in [dir.clone(), node_dir(&dir, "a")] {
            let mode = std::fs::metadata(&folder).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", folder.display());
        }
    }

    let shared = root.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_meshserve"))
        .args(["certs", "--dir"])
        .arg(&shared)
        .args(["--node", "a"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("writable by its group or by everyone"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_dir(&shared).unwrap().count(),
        0,
        "nothing was written into the shared folder"
    );
}
