//! Command line, environment and the plain HTTP endpoints, as etcd 3.4 has them.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oxcd_tests::{etcdctl, http_get, server_bin, server_is_etcd, ConfigVia, Server};

#[test]
fn unknown_flag_is_an_error() {
    let log = tempfile::NamedTempFile::new().unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(server_bin())
        .arg("--no-such-flag-here=1")
        .arg(format!("--data-dir={}", data.path().join("d").display()))
        .arg(format!(
            "--listen-client-urls=http://127.0.0.1:{}",
            oxcd_tests::free_port()
        ))
        .arg(format!(
            "--advertise-client-urls=http://127.0.0.1:{}",
            oxcd_tests::free_port()
        ))
        .arg(format!(
            "--listen-peer-urls=http://127.0.0.1:{}",
            oxcd_tests::free_port()
        ))
        .stdin(Stdio::null())
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .spawn()
        .expect("start server");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("server still running 10s after an unknown flag");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = std::fs::read_to_string(log.path()).unwrap();
    assert!(
        !status.success(),
        "unknown flag accepted ({status}); output:\n{output}"
    );
    assert!(
        output.contains("no-such-flag-here"),
        "the error does not name the unknown flag; output:\n{output}"
    );
    assert!(
        !data.path().join("d").exists(),
        "a data dir was created although start-up was refused"
    );
}

#[test]
fn settings_from_etcd_environment_variables() {
    let mut s = Server::spawn_new(&server_bin(), &[], ConfigVia::Env);
    s.wait_healthy(oxcd_tests::START_TIMEOUT);
    let out = etcdctl(&s.endpoint(), &["member", "list"], None);
    let line = out.ok().trim().to_string();
    assert!(
        line.ends_with(&format!(
            ", started, node1, {}, {}, false",
            s.spec().peer_url(),
            s.client_url()
        )),
        "{line}"
    );
    etcdctl(&s.endpoint(), &["put", "k", "v"], None).ok();
    // The data went where ETCD_DATA_DIR said.
    assert!(
        s.data_dir().is_dir(),
        "no data dir at {}",
        s.data_dir().display()
    );
    assert!(
        std::fs::read_dir(s.data_dir()).unwrap().next().is_some(),
        "data dir {} is empty",
        s.data_dir().display()
    );
}

#[test]
fn health_metrics_and_version_over_http() {
    let s = Server::start();
    let port = s.spec().client_port;

    let (code, body) = http_get(port, "/health").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with(r#"{"health":"true""#), "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).expect("/health is JSON");
    assert_eq!(health["health"], "true");

    let (code, body) = http_get(port, "/metrics").unwrap();
    assert_eq!(code, 200);
    let has_leader = body
        .lines()
        .find(|l| l.starts_with("etcd_server_has_leader"))
        .unwrap_or_else(|| panic!("no etcd_server_has_leader in /metrics:\n{body}"));
    assert_eq!(
        has_leader.split_whitespace().nth(1),
        Some("1"),
        "{has_leader}"
    );
    assert!(
        body.contains("# TYPE etcd_server_has_leader gauge"),
        "{body}"
    );

    let (code, body) = http_get(port, "/version").unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("/version is JSON");
    assert!(
        v["etcdserver"]
            .as_str()
            .is_some_and(|s| s.starts_with("3.")),
        "{body}"
    );
    assert!(
        v["etcdcluster"]
            .as_str()
            .is_some_and(|s| s.starts_with("3.")),
        "{body}"
    );
    if !server_is_etcd() {
        assert!(
            v["oxcd"].as_str().is_some_and(|s| !s.is_empty()),
            "no oxcd version: {body}"
        );
    }

    let (code, _) = http_get(port, "/no-such-path").unwrap();
    assert_eq!(code, 404);
}

#[test]
fn listen_metrics_urls_serves_health_and_metrics() {
    let port = oxcd_tests::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let s = Server::start_with(&["--listen-metrics-urls", &url]);
    let (code, body) = http_get(port, "/health").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with(r#"{"health":"true""#), "{body}");
    let (code, body) = http_get(port, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("etcd_server_has_leader 1"), "{body}");
    drop(s);
}

/// Scheduling policy of every thread of `pid`, from field 41 of /proc/PID/task/TID/stat.
fn thread_policies(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let stat = std::fs::read_to_string(t.unwrap().path().join("stat")).unwrap_or_default();
        // The command name (field 2) may hold spaces; fields after it are plain.
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        if let Some(p) = rest.split(' ').nth(41 - 3) {
            out.push(p.parse().unwrap());
        }
    }
    out
}

#[test]
fn cpu_scheduling_is_batch_unless_told_otherwise() {
    if server_is_etcd() {
        eprintln!("skipped: --cpu-scheduling is oxcd's own flag");
        return;
    }
    const SCHED_OTHER: u32 = 0;
    const SCHED_BATCH: u32 = 3;
    let s = Server::start();
    etcdctl(&s.endpoint(), &["put", "k", "v"], None).ok();
    let policies = thread_policies(s.pid().unwrap());
    assert!(policies.len() > 3, "{policies:?}");
    assert!(policies.iter().all(|&p| p == SCHED_BATCH), "{policies:?}");

    let s = Server::start_with(&["--cpu-scheduling=inherit"]);
    etcdctl(&s.endpoint(), &["put", "k", "v"], None).ok();
    let policies = thread_policies(s.pid().unwrap());
    assert!(policies.iter().all(|&p| p == SCHED_OTHER), "{policies:?}");
}
