//! The hot path of a TLS connection: the handshake a member or client pays once per
//! connection, and the per-byte cost of a 64 KiB echo once connected.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use oxcd_tls::testing::TestPki;
use oxcd_tls::{Connector, TlsListener};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower_service::Service;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path(), "ca");
    let server = pki.issue("server", &["127.0.0.1"]);
    let client = pki.issue("client", &[]);
    let uri: http::Uri = rt.block_on(async {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut l = TlsListener::new(tcp, server.server_config().unwrap()).unwrap();
        let addr = axum::serve::Listener::local_addr(&l).unwrap();
        tokio::spawn(async move {
            loop {
                let (mut io, _) = axum::serve::Listener::accept(&mut l).await;
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        format!("https://{addr}").parse().unwrap()
    });
    let mut connector = Connector::new(Some(client.client_config().unwrap()));

    c.bench_function("tls/handshake_with_client_cert", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut io = connector.call(uri.clone()).await.unwrap().into_inner();
                io.write_all(b"x").await.unwrap();
                let mut one = [0u8; 1];
                io.read_exact(&mut one).await.unwrap();
            })
        })
    });

    let mut io = rt
        .block_on(connector.call(uri.clone()))
        .unwrap()
        .into_inner();
    let payload = vec![7u8; 64 * 1024];
    let mut back = vec![0u8; payload.len()];
    let mut group = c.benchmark_group("tls");
    group.throughput(Throughput::Bytes(payload.len() as u64));
    group.bench_function("echo_64k", |b| {
        b.iter(|| {
            rt.block_on(async {
                io.write_all(&payload).await.unwrap();
                io.read_exact(&mut back).await.unwrap();
            })
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
