//! TLS as etcd serves it, with etcd's flags: `https://` client URLs with `--cert-file`,
//! `--key-file`, `--trusted-ca-file` and `--client-cert-auth` (etcdctl with `--cacert`,
//! `--cert`, `--key`), members talking to each other over `https://` peer URLs with the
//! `--peer-` twins, `--auto-tls`, and etcd's startup error for an `https://` URL without a
//! certificate. Every test here also passes against etcd 3.4 (`OXCD_TEST_SERVER`).

use std::path::Path;
use std::time::{Duration, Instant};

use oxcd_tests::cluster::TestCluster;
use oxcd_tests::{
    etcdctl, free_port, http_get, server_bin, ClusterFlags, ConfigVia, CtlOutput, Server,
    ServerSpec, START_TIMEOUT,
};
use oxcd_tls::testing::TestPki;
use oxcd_tls::TlsInfo;

fn path(p: &Option<std::path::PathBuf>) -> String {
    p.as_ref().expect("path").display().to_string()
}

/// A single member whose client URL is `https://` (extra flags given), health-checked over a
/// plain metrics URL so the harness needs no TLS.
fn https_member(data: &Path, tls_flags: Vec<String>) -> (Server, String) {
    let client_port = free_port();
    let metrics_port = free_port();
    let url = format!("https://127.0.0.1:{client_port}");
    let mut extra = vec![
        format!("--listen-client-urls={url}"),
        format!("--advertise-client-urls={url}"),
        format!("--listen-metrics-urls=http://127.0.0.1:{metrics_port}"),
    ];
    extra.extend(tls_flags);
    let spec = ServerSpec {
        bin: server_bin(),
        name: "tls0".into(),
        data_dir: data.join("data"),
        client_port,
        peer_port: free_port(),
        extra_args: extra,
        via: ConfigVia::Flags,
        cluster: None,
        peer_listen_port: None,
    };
    let mut s = Server::spawn(spec, None);
    wait_healthy_on(&mut s, metrics_port);
    (s, url)
}

fn wait_healthy_on(s: &mut Server, port: u16) {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = s.try_wait() {
            panic!("server exited ({status}); its output:\n{}", s.output());
        }
        if let Ok((200, body)) = http_get(port, "/health") {
            if body.contains(r#""health":"true""#) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "not healthy; output:\n{}",
            s.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// etcdctl against `url` with the client credentials of `who` (none if `None`).
fn ctl(url: &str, ca: &Path, who: Option<&TlsInfo>, args: &[&str]) -> CtlOutput {
    let mut all = vec![
        format!("--cacert={}", ca.display()),
        "--dial-timeout=2s".to_string(),
        "--command-timeout=3s".to_string(),
    ];
    if let Some(who) = who {
        all.push(format!("--cert={}", path(&who.cert_file)));
        all.push(format!("--key={}", path(&who.key_file)));
    }
    all.extend(args.iter().map(|a| a.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    etcdctl(url, &all, None)
}

#[test]
fn https_clients_need_a_certificate_the_trusted_ca_signed() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&dir.path().join("pki"), "ca");
    let server = pki.issue("server", &["127.0.0.1", "localhost"]);
    let client = pki.issue("client", &[]);
    let (_s, url) = https_member(
        dir.path(),
        vec![
            format!("--cert-file={}", path(&server.cert_file)),
            format!("--key-file={}", path(&server.key_file)),
            format!("--trusted-ca-file={}", pki.ca_file.display()),
            "--client-cert-auth".into(),
        ],
    );
    let ca = pki.ca_file.as_path();

    ctl(&url, ca, Some(&client), &["put", "k", "v"]).ok();
    let got = ctl(&url, ca, Some(&client), &["get", "k", "--print-value-only"]);
    assert_eq!(got.ok().trim(), "v");
    let health = ctl(&url, ca, Some(&client), &["endpoint", "health"]);
    assert!(
        health.success && health.stderr.contains("is healthy"),
        "{health:#?}"
    );

    // No client certificate: refused.
    assert!(!ctl(&url, ca, None, &["get", "k"]).success);
    // A client certificate of another CA: refused.
    let other = TestPki::new(&dir.path().join("other"), "other-ca");
    let stranger = other.issue("stranger", &[]);
    assert!(!ctl(&url, ca, Some(&stranger), &["get", "k"]).success);
    // A client that does not trust the server's CA refuses the server.
    assert!(!ctl(&url, &other.ca_file, Some(&client), &["get", "k"]).success);
    // Plain HTTP/2 to the TLS port gets nowhere.
    let plain = url.replace("https://", "http://");
    assert!(!etcdctl(&plain, &["--dial-timeout=2s", "get", "k"], None).success);
}

#[test]
fn auto_tls_serves_a_self_signed_certificate_kept_in_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, url) = https_member(dir.path(), vec!["--auto-tls".into()]);
    // etcdctl 3.4 applies --insecure-skip-tls-verify only with --insecure-transport=false.
    let skip = [
        "--insecure-transport=false",
        "--insecure-skip-tls-verify",
        "--dial-timeout=2s",
    ];
    let put = etcdctl(&url, &[&skip[..], &["put", "k", "v"]].concat(), None);
    put.ok();
    let cert = dir.path().join("data/fixtures/client/cert.pem");
    let first = std::fs::read(&cert).expect("auto-TLS certificate under fixtures/client");

    // A verifying client has no CA to trust it with.
    let ca = dir.path().join("data/fixtures/client/cert.pem");
    let got = ctl(&url, &ca, None, &["get", "k", "--print-value-only"]);
    // etcdctl trusts exactly the certificate given as CA, which is the self-signed one.
    assert_eq!(got.ok().trim(), "v");

    // The certificate is kept across a restart, as etcd keeps its fixtures.
    s.kill9();
    let metrics_port = s
        .spec()
        .extra_args
        .iter()
        .find_map(|a| a.strip_prefix("--listen-metrics-urls=http://127.0.0.1:"))
        .and_then(|p| p.parse().ok())
        .expect("metrics port");
    s.respawn();
    wait_healthy_on(&mut s, metrics_port);
    assert_eq!(std::fs::read(&cert).unwrap(), first);
    let got = etcdctl(
        &url,
        &[&skip[..], &["get", "k", "--print-value-only"]].concat(),
        None,
    );
    assert_eq!(got.ok().trim(), "v");
}

#[test]
fn an_https_url_without_a_certificate_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let client_port = free_port();
    let url = format!("https://127.0.0.1:{client_port}");
    let spec = ServerSpec {
        bin: server_bin(),
        name: "tls0".into(),
        data_dir: dir.path().join("data"),
        client_port,
        peer_port: free_port(),
        extra_args: vec![
            format!("--listen-client-urls={url}"),
            format!("--advertise-client-urls={url}"),
        ],
        via: ConfigVia::Flags,
        cluster: None,
        peer_listen_port: None,
    };
    let mut s = Server::spawn(spec, None);
    s.expect_refused(START_TIMEOUT, "https client url without a certificate");
    let expected = format!(
        "TLS key/cert (--cert-file, --key-file) must be provided for client url {url} with \
         HTTPS scheme"
    );
    assert!(s.output().contains(&expected), "{}", s.output());
}

/// One member of a cluster where clients and peers both speak TLS with verified certificates,
/// as a kubeadm-made etcd does.
struct TlsMember {
    server: Server,
    url: String,
    metrics_port: u16,
    cert: TlsInfo,
}

fn tls_cluster(dir: &Path, pki: &TestPki) -> Vec<TlsMember> {
    let ports: Vec<(u16, u16, u16)> = (0..3)
        .map(|_| (free_port(), free_port(), free_port()))
        .collect();
    let initial_cluster = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer, _))| format!("m{i}=https://127.0.0.1:{peer}"))
        .collect::<Vec<_>>()
        .join(",");
    let flags = ClusterFlags {
        initial_cluster,
        token: format!("oxcd-tls-{}", ports[0].1),
        existing: false,
    };
    let mut members: Vec<TlsMember> = ports
        .iter()
        .enumerate()
        .map(|(i, &(client, peer, metrics_port))| {
            // One certificate per member for both sides, usable as server and as client.
            let cert = pki.issue(&format!("m{i}"), &["127.0.0.1"]);
            let peer_url = format!("https://127.0.0.1:{peer}");
            let url = format!("https://127.0.0.1:{client}");
            let (c, k) = (path(&cert.cert_file), path(&cert.key_file));
            let ca = pki.ca_file.display();
            let spec = ServerSpec {
                bin: server_bin(),
                name: format!("m{i}"),
                data_dir: dir.join(format!("m{i}")),
                client_port: client,
                peer_port: peer,
                extra_args: vec![
                    format!("--listen-client-urls={url}"),
                    format!("--advertise-client-urls={url}"),
                    format!("--listen-metrics-urls=http://127.0.0.1:{metrics_port}"),
                    format!("--cert-file={c}"),
                    format!("--key-file={k}"),
                    format!("--trusted-ca-file={ca}"),
                    "--client-cert-auth".into(),
                    format!("--listen-peer-urls={peer_url}"),
                    format!("--initial-advertise-peer-urls={peer_url}"),
                    format!("--peer-cert-file={c}"),
                    format!("--peer-key-file={k}"),
                    format!("--peer-trusted-ca-file={ca}"),
                    "--peer-client-cert-auth".into(),
                ],
                via: ConfigVia::Flags,
                cluster: Some(flags.clone()),
                peer_listen_port: None,
            };
            TlsMember {
                server: Server::spawn(spec, None),
                url,
                metrics_port,
                cert,
            }
        })
        .collect();
    for m in &mut members {
        wait_healthy_on(&mut m.server, m.metrics_port);
    }
    members
}

#[test]
fn a_cluster_serves_and_replicates_over_tls_with_verified_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&dir.path().join("pki"), "ca");
    let mut members = tls_cluster(dir.path(), &pki);
    let ca = pki.ca_file.clone();
    let run = |m: &TlsMember, args: &[&str]| ctl(&m.url, &ca, Some(&m.cert), args);

    run(&members[0], &["put", "k", "over-tls"]).ok();
    for m in &members {
        let got = run(m, &["get", "k", "--print-value-only"]);
        assert_eq!(got.ok().trim(), "over-tls", "member {}", m.url);
    }
    // Peer URLs from the start; client URLs once each member has published them.
    TestCluster::wait_for("members' https URLs", Duration::from_secs(20), || {
        let list = run(&members[2], &["member", "list"]);
        list.ok().matches("https://127.0.0.1:").count() == 6
    });

    // Lease keep-alives and TTL queries are answered by the leader whichever member a client
    // asks, so followers reach the leader over TLS too.
    let grant = run(&members[0], &["lease", "grant", "60"]);
    let id = grant
        .ok()
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_string();
    for m in &members {
        let kept = run(m, &["lease", "keep-alive", "--once", &id]);
        assert!(
            kept.ok().contains("keepalived with TTL"),
            "{} {kept:#?}",
            m.url
        );
        let ttl = run(m, &["lease", "timetolive", &id]);
        assert!(
            ttl.ok().contains("granted with TTL(60s)"),
            "{} {ttl:#?}",
            m.url
        );
    }

    // A member whose certificate another CA signed cannot take part: stop m1 and m2, bring m1
    // back with an impostor's certificate (still trusting the real CA), and m0 and m1 together
    // make no quorum, because each refuses the other's certificate.
    members[1].server.kill9();
    members[2].server.kill9();
    let impostor_ca = TestPki::new(&dir.path().join("impostor"), "impostor-ca");
    let impostor = impostor_ca.issue("m1", &["127.0.0.1"]);
    for arg in members[1].server.spec_mut().extra_args.iter_mut() {
        if arg.starts_with("--peer-cert-file=") {
            *arg = format!("--peer-cert-file={}", path(&impostor.cert_file));
        } else if arg.starts_with("--peer-key-file=") {
            *arg = format!("--peer-key-file={}", path(&impostor.key_file));
        }
    }
    members[1].server.respawn();
    // Long enough for several election timeouts (1 s each by default).
    std::thread::sleep(Duration::from_secs(3));
    let put = run(&members[0], &["put", "k", "impostor"]);
    assert!(!put.success, "a write succeeded without a quorum: {put:#?}");

    // m2, with its own certificate, restores the quorum.
    members[2].server.respawn();
    let port = members[2].metrics_port;
    wait_healthy_on(&mut members[2].server, port);
    TestCluster::wait_for("a write after m2 is back", Duration::from_secs(20), || {
        run(&members[0], &["put", "k", "back"]).success
    });
    let got = run(&members[2], &["get", "k", "--print-value-only"]);
    assert_eq!(got.ok().trim(), "back");
}
