//! What the server answers on its client and metrics URLs beside the KV API: etcdctl given
//! `http://` endpoints (which grpc-go sends on as the HTTP/2 `:authority` for commands that dial
//! one endpoint directly), and the `/livez` and `/readyz` probes of etcd 3.5.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use oxcd_tests::cluster::TestCluster;
use oxcd_tests::{
    etcdctl, free_port, http_get, server_bin, server_is_etcd, ClusterFlags, ConfigVia, CtlOutput,
    Server, ServerSpec,
};

fn ctl(endpoint: &str, args: &[&str]) -> CtlOutput {
    etcdctl(endpoint, args, None)
}

#[test]
fn etcdctl_accepts_http_url_endpoints() {
    let s = Server::start();
    let url = s.client_url();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    // Each of these dials the one endpoint directly, with the URL as `:authority`.
    let status = ctl(&url, &["endpoint", "status"]);
    assert!(status.ok().starts_with(&format!("{url}, ")), "{status:#?}");
    let status = ctl(&url, &["endpoint", "status", "-w", "json"]).json();
    assert_eq!(status[0]["Endpoint"], url.as_str(), "{status}");
    assert!(
        status[0]["Status"]["header"]["member_id"].is_u64(),
        "{status}"
    );
    let hash = ctl(&url, &["endpoint", "hashkv", "-w", "json"]).json();
    assert_eq!(hash[0]["Endpoint"], url.as_str(), "{hash}");

    // These go through the client's own balancer; they must keep working too.
    assert_eq!(ctl(&url, &["put", "k", "v"]).ok(), "OK\n");
    assert_eq!(ctl(&url, &["get", "k"]).ok(), "k\nv\n");
    let members = ctl(&url, &["member", "list"]);
    assert!(members.ok().contains(&url), "{members:#?}");
    let health = ctl(&url, &["endpoint", "health"]);
    assert!(health.success, "{health:#?}");
    assert!(
        format!("{}{}", health.stdout, health.stderr).contains(&format!("{url} is healthy")),
        "{health:#?}"
    );

    // The bare host:port form is unchanged.
    let status = ctl(&s.endpoint(), &["endpoint", "status"]);
    assert!(status.ok().starts_with(&s.endpoint()), "{status:#?}");

    // The server keeps serving after repeated direct dials.
    for _ in 0..3 {
        ctl(&url, &["endpoint", "status"]).ok();
    }
    assert_eq!(
        ctl(&s.endpoint(), &["get", "k", "--print-value-only"]).ok(),
        "v\n"
    );
}

/// `(code, body)` of a GET.
fn get(port: u16, path: &str) -> (u16, String) {
    http_get(port, path).unwrap_or_else(|e| panic!("GET {path} on {port}: {e}"))
}

fn lines(text: &str) -> BTreeSet<String> {
    text.lines().map(str::to_string).collect()
}

/// etcd 3.4, the reference binary, predates `/livez` and `/readyz` (added in 3.5).
fn probes_served() -> bool {
    if server_is_etcd() {
        eprintln!("skipped: the reference etcd 3.4 has no /livez or /readyz");
        return false;
    }
    true
}

#[test]
fn livez_and_readyz_on_client_and_metrics_urls() {
    if !probes_served() {
        return;
    }
    let metrics_port = free_port();
    let metrics_url = format!("http://127.0.0.1:{metrics_port}");
    let s = Server::start_with(&["--listen-metrics-urls", &metrics_url]);
    let client_port = s.spec().client_port;

    for port in [client_port, metrics_port] {
        assert_eq!(get(port, "/livez"), (200, "ok\n".into()), "port {port}");
        assert_eq!(get(port, "/readyz"), (200, "ok\n".into()), "port {port}");

        // ?verbose lists every check before "ok" (in any order, as etcd's map gives them).
        let (code, body) = get(port, "/readyz?verbose");
        assert_eq!(code, 200, "{body}");
        assert!(body.ends_with("ok\n"), "{body:?}");
        assert_eq!(
            lines(&body),
            lines("[+]data_corruption ok\n[+]serializable_read ok\n[+]linearizable_read ok\nok\n"),
            "{body:?}"
        );
        assert_eq!(
            get(port, "/livez?verbose"),
            (200, "[+]serializable_read ok\nok\n".into())
        );

        // Each check has its own path; the root path can leave checks out.
        assert_eq!(get(port, "/readyz/linearizable_read"), (200, "ok\n".into()));
        assert_eq!(
            get(port, "/livez/serializable_read?verbose"),
            (200, "[+]serializable_read ok\nok\n".into())
        );
        let (code, body) = get(
            port,
            "/readyz?verbose&exclude=linearizable_read&exclude=nope",
        );
        assert_eq!(code, 200, "{body}");
        assert_eq!(
            lines(&body),
            lines("[+]data_corruption ok\n[+]serializable_read ok\nok\n"),
            "{body:?}"
        );
        assert_eq!(get(port, "/readyz/nope").0, 404);
        assert_eq!(get(port, "/livez/linearizable_read").0, 404);
    }

    // The per-check results are exported as etcd exports them.
    let (_, metrics) = get(metrics_port, "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("etcd_server_healthcheck{")
                && l.contains("type=\"readyz\"")
                && l.contains("name=\"linearizable_read\"")
                && l.ends_with(" 1")),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("etcd_server_healthchecks_total{")
                && l.contains("type=\"livez\"")
                && l.contains("status=\"success\"")),
        "{metrics}"
    );
}

#[test]
fn probes_answer_get_only() {
    if !probes_served() {
        return;
    }
    use std::io::{Read, Write};
    let s = Server::start();
    let port = s.spec().client_port;
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok();
    write!(
        conn,
        "POST /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    conn.read_to_string(&mut raw).expect("read");
    assert!(raw.starts_with("HTTP/1.1 405"), "{raw}");
    assert!(
        raw.to_ascii_lowercase().contains("\r\nallow: get\r\n"),
        "{raw}"
    );
    assert!(raw.ends_with("Method Not Allowed\n"), "{raw}");
}

/// A member that cannot reach the rest of its cluster is live but not ready, and says why.
#[test]
fn readyz_fails_without_a_leader_while_livez_passes() {
    if !probes_served() {
        return;
    }
    // One member of a two-member cluster whose other member never starts: no leader, ever.
    let data = tempfile::Builder::new()
        .prefix("oxcd-test-noleader")
        .tempdir()
        .expect("temp dir");
    let (client, peer, other_peer) = (free_port(), free_port(), free_port());
    let flags = ClusterFlags {
        initial_cluster: format!("m0=http://127.0.0.1:{peer},m1=http://127.0.0.1:{other_peer}"),
        token: format!("oxcd-test-noleader-{peer}"),
        existing: false,
    };
    let spec = ServerSpec {
        bin: server_bin(),
        name: "m0".into(),
        data_dir: data.path().join("m0"),
        client_port: client,
        peer_port: peer,
        extra_args: Vec::new(),
        via: ConfigVia::Flags,
        cluster: Some(flags),
        peer_listen_port: None,
    };
    let mut s = Server::spawn(spec, Some(data));

    // Wait until the HTTP endpoints answer at all.
    let deadline = Instant::now() + Duration::from_secs(30);
    let livez = loop {
        if let Some(status) = s.try_wait() {
            panic!("server exited ({status}):\n{}", s.output());
        }
        if let Ok(r) = http_get(client, "/livez") {
            break r;
        }
        assert!(Instant::now() < deadline, "no answer:\n{}", s.output());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(livez, (200, "ok\n".into()));

    let (code, body) = get(client, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert_eq!(
        lines(body.trim_end()),
        lines(
            "[+]data_corruption ok\n[+]serializable_read ok\n\
             [-]linearizable_read failed: etcdserver: no leader\n"
        ),
        "{body:?}"
    );
    // Go's http.Error ends the report with one more newline.
    assert!(body.ends_with("\n\n"), "{body:?}");
    assert_eq!(
        get(client, "/readyz/linearizable_read"),
        (
            503,
            "[-]linearizable_read failed: etcdserver: no leader\n\n".into()
        )
    );
    assert_eq!(
        get(client, "/readyz?exclude=linearizable_read"),
        (200, "ok\n".into())
    );
    assert_eq!(get(client, "/livez"), (200, "ok\n".into()));
}

/// A healthy cluster member answers its probes the same way as a single member.
#[test]
fn probes_on_a_cluster_member() {
    if !probes_served() {
        return;
    }
    let c = TestCluster::start(3, &[]);
    for m in &c.members {
        let port = m.spec().client_port;
        assert_eq!(get(port, "/readyz"), (200, "ok\n".into()));
        assert_eq!(get(port, "/livez"), (200, "ok\n".into()));
        // And etcdctl with the member's URL reaches it directly.
        let status = ctl(&m.client_url(), &["endpoint", "status"]);
        assert!(status.ok().starts_with(&m.client_url()), "{status:#?}");
    }
}
