use axum::serve::Listener;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tower_service::Service;

use crate::testing::TestPki;
use crate::{self_cert, Connector, TlsInfo, TlsListener};

/// A listener serving `info`, echoing every connection; returns its https URI.
async fn echo_server(info: &TlsInfo) -> (http::Uri, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut listener = TlsListener::new(tcp, info.server_config().unwrap()).unwrap();
    let uri = format!("https://{}", listener.local_addr().unwrap())
        .parse()
        .unwrap();
    let (accepted_tx, accepted) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut io, _) = listener.accept().await;
            let _ = accepted_tx.send(());
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (uri, accepted)
}

/// Dials `uri` with `client` and echoes one message; Err if TLS refused at any point.
async fn round_trip(client: &TlsInfo, uri: http::Uri) -> std::io::Result<Vec<u8>> {
    let mut connector = Connector::new(Some(client.client_config().unwrap()));
    let io = connector.call(uri).await?;
    let mut io = io.into_inner();
    io.write_all(b"ping").await?;
    let mut got = vec![0u8; 4];
    io.read_exact(&mut got).await?;
    Ok(got)
}

#[tokio::test]
async fn a_trusted_ca_requires_a_client_certificate_it_signed() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path(), "ca");
    let server = pki.issue("server", &["127.0.0.1"]);
    let client = pki.issue("client", &[]);
    let (uri, mut accepted) = echo_server(&server).await;

    assert_eq!(round_trip(&client, uri.clone()).await.unwrap(), b"ping");
    accepted.recv().await.unwrap();

    // Trusting the CA but presenting no certificate: refused, and never handed to the server.
    let anonymous = TlsInfo {
        cert_file: None,
        key_file: None,
        ..client.clone()
    };
    assert!(round_trip(&anonymous, uri.clone()).await.is_err());

    // A certificate from another CA: refused too.
    let other = TestPki::new(&dir.path().join("other"), "other-ca");
    let stranger = TlsInfo {
        trusted_ca_file: Some(pki.ca_file.clone()),
        ..other.issue("stranger", &[])
    };
    assert!(round_trip(&stranger, uri).await.is_err());
    assert!(
        accepted.try_recv().is_err(),
        "a refused client reached the server"
    );
}

#[tokio::test]
async fn the_client_checks_the_server_against_its_ca_and_name() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path(), "ca");
    let client = pki.issue("client", &[]);

    let other = TestPki::new(&dir.path().join("other"), "other-ca");
    let (uri, _) = echo_server(&other.issue("server", &["127.0.0.1"])).await;
    assert!(
        round_trip(&client, uri).await.is_err(),
        "server of another CA"
    );

    let (uri, _) = echo_server(&pki.issue("misnamed", &["10.9.9.9"])).await;
    assert!(
        round_trip(&client, uri).await.is_err(),
        "certificate for another host"
    );
}

#[tokio::test]
async fn without_a_ca_no_client_certificate_is_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path(), "ca");
    let server = TlsInfo {
        trusted_ca_file: None,
        ..pki.issue("server", &["127.0.0.1"])
    };
    let (uri, _) = echo_server(&server).await;
    let client = TlsInfo {
        trusted_ca_file: Some(pki.ca_file.clone()),
        ..TlsInfo::default()
    };
    assert_eq!(round_trip(&client, uri).await.unwrap(), b"ping");
}

#[tokio::test]
async fn auto_tls_certificates_are_made_once_and_trusted_by_auto_tls_peers() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = dir.path().join("fixtures/peer");
    let a = self_cert(&fixtures, &["127.0.0.1".into(), "localhost".into()]).unwrap();
    let first = std::fs::read(a.cert_file.as_ref().unwrap()).unwrap();
    let again = self_cert(&fixtures, &["127.0.0.1".into()]).unwrap();
    assert_eq!(a, again);
    assert_eq!(
        std::fs::read(again.cert_file.as_ref().unwrap()).unwrap(),
        first
    );

    let (uri, _) = echo_server(&a).await;
    let b = self_cert(&dir.path().join("b"), &["127.0.0.1".into()]).unwrap();
    assert_eq!(round_trip(&b, uri.clone()).await.unwrap(), b"ping");
    // A verifying client has nothing to trust a self-signed certificate with.
    let pki = TestPki::new(&dir.path().join("pki"), "ca");
    assert!(round_trip(&pki.issue("c", &[]), uri).await.is_err());
}

#[tokio::test]
async fn http_uris_are_dialed_in_the_clear_and_https_needs_settings() {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = tcp.accept().await.unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.unwrap();
        s.write_all(&b).await.unwrap();
    });
    let mut plain = Connector::new(None);
    let mut io = plain
        .call(format!("http://{addr}").parse().unwrap())
        .await
        .unwrap()
        .into_inner();
    io.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    io.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ping");

    let err = plain
        .call(format!("https://{addr}").parse().unwrap())
        .await
        .err()
        .expect("https without settings");
    assert!(
        err.to_string().contains("https without TLS settings"),
        "{err}"
    );
}
