//! Which listeners serve TLS and which credentials a member dials with, from etcd's flags and
//! etcd's rules:
//! - an `https://` listen URL needs a certificate and key (`--cert-file`/`--key-file` for client
//!   and metrics URLs, `--peer-cert-file`/`--peer-key-file` for peer URLs), or `--auto-tls` /
//!   `--peer-auto-tls`, which make a self-signed one under `<data-dir>/fixtures/{client,peer}`;
//! - a trusted CA file (or `--client-cert-auth`) makes the listener require client certificates
//!   signed by it;
//! - members dial each other's `https://` peer URLs (raft traffic, and lease requests forwarded
//!   to the leader) presenting the peer certificate and trusting the peer CA.

use std::path::Path;
use std::sync::Arc;

use oxcd_tls::{Connector, ServerConfig, TlsError, TlsInfo};

use crate::config::{is_https, split_urls, Config};

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("TLS key/cert ({flags}) must be provided for {kind} url {url} with HTTPS scheme")]
    MissingCert {
        flags: &'static str,
        kind: &'static str,
        url: String,
    },
    #[error("{kind} TLS: {source}")]
    Tls {
        kind: &'static str,
        source: TlsError,
    },
}

/// The resolved TLS of one member.
pub struct Tls {
    /// For `https://` client and metrics listen URLs.
    pub client_listener: Option<Arc<ServerConfig>>,
    /// For `https://` peer listen URLs.
    pub peer_listener: Option<Arc<ServerConfig>>,
    /// Dials other members' peer URLs.
    pub peer_dialer: Connector,
}

pub fn setup(cfg: &Config, data_dir: &Path) -> Result<Tls, TlsSetupError> {
    let client_urls: Vec<String> = split_urls(&cfg.listen_client_urls)
        .into_iter()
        .chain(split_urls(&cfg.listen_metrics_urls))
        .collect();
    let client = Side {
        kind: "client",
        flags: "--cert-file, --key-file",
        info: cfg.client_tls(),
        auto: cfg.auto_tls,
        fixtures: data_dir.join("fixtures").join("client"),
        urls: client_urls,
    };
    let peer = Side {
        kind: "peer",
        flags: "--peer-cert-file, --peer-key-file",
        info: cfg.peer_tls(),
        auto: cfg.peer_auto_tls,
        fixtures: data_dir.join("fixtures").join("peer"),
        urls: split_urls(&cfg.listen_peer_urls),
    };
    let (client_listener, _) = client.resolve()?;
    let (peer_listener, peer) = peer.resolve()?;
    let peer_dialer = if peer.is_empty() {
        Connector::new(None)
    } else {
        let tls_err = |source| TlsSetupError::Tls {
            kind: "peer",
            source,
        };
        Connector::new(Some(peer.client_config().map_err(tls_err)?))
    };
    Ok(Tls {
        client_listener,
        peer_listener,
        peer_dialer,
    })
}

struct Side {
    kind: &'static str,
    flags: &'static str,
    info: TlsInfo,
    auto: bool,
    fixtures: std::path::PathBuf,
    urls: Vec<String>,
}

impl Side {
    /// The listener config for this side's `https://` URLs, and its settings (auto TLS
    /// resolved).
    fn resolve(self) -> Result<(Option<Arc<ServerConfig>>, TlsInfo), TlsSetupError> {
        let kind = self.kind;
        let tls_err = |source| TlsSetupError::Tls { kind, source };
        let has_cert = self.info.cert_file.is_some() && self.info.key_file.is_some();
        let info = if self.auto && !has_cert {
            let hosts: Vec<String> = self.urls.iter().filter_map(|u| host_of(u)).collect();
            let made = oxcd_tls::self_cert(&self.fixtures, &hosts).map_err(tls_err)?;
            tracing::info!(kind, dir = %self.fixtures.display(), "using a self-signed certificate (auto TLS)");
            TlsInfo {
                trusted_ca_file: self.info.trusted_ca_file.clone(),
                client_cert_auth: self.info.client_cert_auth,
                ..made
            }
        } else {
            if self.auto {
                tracing::warn!(
                    kind,
                    "ignoring auto TLS since a certificate and key are given"
                );
            }
            self.info
        };
        let serves_https = self.urls.iter().any(|u| is_https(u));
        let listener = if serves_https {
            if info.cert_file.is_none() || info.key_file.is_none() {
                let url = self
                    .urls
                    .iter()
                    .find(|u| is_https(u))
                    .cloned()
                    .unwrap_or_default();
                return Err(TlsSetupError::MissingCert {
                    flags: self.flags,
                    kind,
                    url,
                });
            }
            Some(info.server_config().map_err(tls_err)?)
        } else {
            if !info.is_empty() && !self.urls.is_empty() {
                tracing::warn!(
                    kind,
                    "scheme is HTTP while key and cert files are present; ignoring key and cert files"
                );
            }
            None
        };
        Ok((listener, info))
    }
}

/// The host of `scheme://host:port`, without IPv6 brackets.
fn host_of(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let hostport = rest.split('/').next()?;
    let host = match hostport.rsplit_once(':') {
        Some((h, _)) => h,
        None => hostport,
    };
    Some(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use oxcd_tls::testing::TestPki;

    fn config(args: &[&str]) -> Config {
        use clap::Parser;
        Config::try_parse_from(std::iter::once("oxcd").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn https_urls_need_a_certificate_with_etcds_error() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(&["--listen-client-urls=https://127.0.0.1:2379"]);
        let err = setup(&cfg, dir.path()).err().expect("no certificate");
        assert_eq!(
            err.to_string(),
            "TLS key/cert (--cert-file, --key-file) must be provided for client url \
             https://127.0.0.1:2379 with HTTPS scheme"
        );
        let cfg = config(&["--listen-peer-urls=https://127.0.0.1:2380"]);
        let err = setup(&cfg, dir.path()).err().expect("no peer certificate");
        assert!(err.to_string().contains("--peer-cert-file"), "{err}");
    }

    #[test]
    fn plain_urls_serve_plain_even_with_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let pki = TestPki::new(&dir.path().join("pki"), "ca");
        let server = pki.issue("server", &["127.0.0.1"]);
        let cert = format!("--cert-file={}", server.cert_file.unwrap().display());
        let key = format!("--key-file={}", server.key_file.unwrap().display());
        let tls = setup(&config(&[&cert, &key]), dir.path()).unwrap();
        assert!(tls.client_listener.is_none());
        assert!(tls.peer_listener.is_none());
    }

    #[test]
    fn auto_tls_makes_certificates_under_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(&[
            "--auto-tls",
            "--peer-auto-tls",
            "--listen-client-urls=https://127.0.0.1:2379",
            "--listen-peer-urls=https://localhost:2380",
        ]);
        let tls = setup(&cfg, dir.path()).unwrap();
        assert!(tls.client_listener.is_some());
        assert!(tls.peer_listener.is_some());
        for side in ["client", "peer"] {
            let fixtures = dir.path().join("fixtures").join(side);
            assert!(fixtures.join("cert.pem").exists(), "{side}");
            assert!(fixtures.join("key.pem").exists(), "{side}");
        }
    }

    #[test]
    fn hosts_come_from_urls() {
        assert_eq!(
            host_of("https://127.0.0.1:2379").as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(host_of("https://[::1]:2379/").as_deref(), Some("::1"));
        assert_eq!(
            host_of("https://node-0.etcd:2380").as_deref(),
            Some("node-0.etcd")
        );
    }
}
