//! HTTPS on the TCP front door: rustls with ALPN choosing HTTP/2 or HTTP/1.1.

mod support;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::sync::Arc;
use support::{TestNode, copy_examples};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{self, pki_types::ServerName};

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
