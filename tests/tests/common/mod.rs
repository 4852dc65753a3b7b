//! Shared by the test files that talk to the server through the `etcd-client` crate.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use oxcd_tests::Server;

/// A client for `s`; every request must finish within `request_timeout`.
pub async fn connect_with(s: &Server, request_timeout: Duration) -> Client {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(request_timeout);
    tokio::time::timeout(
        Duration::from_secs(15),
        Client::connect([s.endpoint()], Some(opts)),
    )
    .await
    .expect("connect timed out")
    .expect("connect")
}
