//! The files under `deploy/`, each checked by the tool that consumes it: promtool and a real
//! Prometheus scraping a real server for the Prometheus files, Kubernetes' API schemas for the
//! manifests, systemd-analyze for the unit, and the server's own `/metrics` and `--help` for the
//! metric and flag names the files use. Every check is shown to reject a broken copy, so a check
//! that silently stopped checking would fail.
//!
//! The external tools come from `scripts/test.sh`. Where one is missing the test says so loudly
//! and passes, except in CI (`CI` set), where a missing tool is a failure: a lost install step
//! must not turn these tests into no-ops there.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use oxcd_tests::{free_port, http_get, server_bin, server_is_etcd, Server, START_TIMEOUT};

/// Upper bound for one run of promtool, systemd-analyze or the schema validator.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);
/// Upper bound for Prometheus to scrape the server and answer with its value.
const PROMETHEUS_TIMEOUT: Duration = Duration::from_secs(60);

/// Metric names the deploy files use that oxcd does not serve yet: families being added to
/// the server now. Keep this list short and exact (no prefixes), so a misspelt name still
/// fails; drop a name as soon as `/metrics` serves it (the test prints which ones it does).
const NOT_YET_SERVED: &[&str] = &[];

/// Prefixes that mark a word in a deploy file as a metric name the server must serve. Other
/// words (`up`, label names such as `grpc_method`, PromQL functions) are Prometheus' own.
const METRIC_PREFIXES: &[&str] = &["etcd_", "grpc_server_", "process_", "oxcd_"];

// ---------------------------------------------------------------------------------------------
// Helpers

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn deploy(rel: &str) -> PathBuf {
    repo_root().join("deploy").join(rel)
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// `name` found on PATH.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// False (after a loud message) when a tool is missing outside CI; panics when it is missing
/// in CI.
fn tool_present(present: bool, what: &str, test: &str) -> bool {
    if present {
        return true;
    }
    let msg = format!("{what} is not installed (scripts/test.sh installs it)");
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!("{test}: {msg}");
    }
    eprintln!("\n\n!!! SKIPPED {test}: {msg} !!!\n\n");
    false
}

/// What one bounded tool run printed.
#[derive(Debug)]
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    fn text(&self) -> String {
        format!(
            "status: {}\nstdout:\n{}\nstderr:\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` to completion with both streams captured; kills it and panics after `limit`.
fn run(cmd: &mut Command, limit: Duration) -> Run {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    let mut out = child.stdout.take().expect("stdout pipe");
    let mut err = child.stderr.take().expect("stderr pipe");
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for tool") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{shown} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

/// A child process this test started, killed (by its own PID) and reaped on drop.
struct Guard {
    child: Child,
    what: &'static str,
    log: PathBuf,
}

impl Guard {
    fn spawn(mut cmd: Command, what: &'static str, log: PathBuf) -> Guard {
        let out = fs::File::create(&log).expect("create log");
        let err = out.try_clone().expect("clone log handle");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Guard { child, what, log }
    }

    /// Panics with the process's output if it has exited.
    fn assert_running(&mut self) {
        if let Some(st) = self.child.try_wait().expect("try_wait") {
            panic!(
                "{} exited ({st}); its output:\n{}",
                self.what,
                fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }

    fn output(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Percent-encodes a query string value.
fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Every word of `text` that looks like a metric name with one of [`METRIC_PREFIXES`].
fn metric_names_in(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| METRIC_PREFIXES.iter().any(|p| w.starts_with(p)))
        .map(str::to_string)
        .collect()
}

/// The sample names in a Prometheus text exposition (`/metrics`).
fn served_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// Starts the server under test with a metrics listener; returns it and the metrics port.
fn server_with_metrics() -> (Server, u16) {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let s = Server::start_with(&["--listen-metrics-urls", &url]);
    (s, port)
}

fn metrics_body(port: u16) -> String {
    let (code, body) = http_get(port, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200, "{body}");
    body
}

/// The long flags the server's `--help` lists.
fn server_flags() -> BTreeSet<String> {
    let r = run(Command::new(server_bin()).arg("--help"), TOOL_TIMEOUT);
    let text = format!("{}{}", r.stdout, r.stderr);
    let flags: BTreeSet<String> = text
        .split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '[' || c == '\'')
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_string()
        })
        .filter(|w| !w.is_empty())
        .collect();
    assert!(
        flags.contains("name") && flags.contains("listen-metrics-urls"),
        "cannot read the flags from `--help`:\n{}",
        r.text()
    );
    flags
}

/// The `ETCD_*=value` settings of an environment file: active lines, and (separately) the
/// example lines in comments (`#   ETCD_X=...`).
fn env_settings(text: &str) -> (Vec<(String, String)>, Vec<String>) {
    let mut active = Vec::new();
    let mut examples = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(comment) = line.strip_prefix('#') {
            if let Some((k, _)) = comment.trim().split_once('=') {
                if k.starts_with("ETCD_") && !k.contains(' ') {
                    examples.push(k.to_string());
                }
            }
        } else if let Some((k, v)) = line.split_once('=') {
            active.push((k.trim().to_string(), v.trim().to_string()));
        } else {
            assert!(line.is_empty(), "not a KEY=value line: {line:?}");
        }
    }
    (active, examples)
}

/// `ETCD_LISTEN_CLIENT_URLS` -> `listen-client-urls`.
fn env_to_flag(key: &str) -> String {
    key.strip_prefix("ETCD_")
        .unwrap_or_else(|| panic!("{key} is not an ETCD_ variable"))
        .to_lowercase()
        .replace('_', "-")
}

// ---------------------------------------------------------------------------------------------
// Prometheus

#[test]
fn prometheus_config_and_alert_rules_pass_promtool() {
    let test = "prometheus_config_and_alert_rules_pass_promtool";
    let Some(promtool) = on_path("promtool") else {
        tool_present(false, "promtool (Debian package prometheus)", test);
        return;
    };

    let r = run(
        Command::new(&promtool)
            .args(["check", "config"])
            .arg(deploy("prometheus/prometheus.yml")),
        TOOL_TIMEOUT,
    );
    assert!(r.status.success(), "promtool check config:\n{}", r.text());
    // The config loads the alert rules: a config whose rule_files matched nothing would pass.
    assert!(
        r.stdout.contains("SUCCESS: 1 rule files found"),
        "{}",
        r.text()
    );

    let r = run(
        Command::new(&promtool)
            .args(["check", "rules"])
            .arg(deploy("prometheus/oxcd-alerts.yml")),
        TOOL_TIMEOUT,
    );
    assert!(r.status.success(), "promtool check rules:\n{}", r.text());

    // The rules' unit tests: each alert fires on the series meant to raise it.
    let r = run(
        Command::new(&promtool)
            .args(["test", "rules"])
            .arg(deploy("prometheus/oxcd-alerts.test.yml")),
        TOOL_TIMEOUT,
    );
    assert!(r.status.success(), "promtool test rules:\n{}", r.text());

    // The same checks reject broken copies.
    let tmp = tempfile::tempdir().unwrap();
    let alerts = read(&deploy("prometheus/oxcd-alerts.yml"));
    let bad_syntax = tmp.path().join("bad-syntax.yml");
    fs::write(
        &bad_syntax,
        alerts.replacen(
            "etcd_server_has_leader == 0",
            "etcd_server_has_leader == == 0",
            1,
        ),
    )
    .unwrap();
    let r = run(
        Command::new(&promtool)
            .args(["check", "rules"])
            .arg(&bad_syntax),
        TOOL_TIMEOUT,
    );
    assert!(
        !r.status.success(),
        "a broken expression passed:\n{}",
        r.text()
    );

    // An alert that can no longer fire fails its unit test.
    fs::write(
        tmp.path().join("oxcd-alerts.yml"),
        alerts.replacen(
            "etcd_server_has_leader == 0",
            "etcd_server_has_leader == 2",
            1,
        ),
    )
    .unwrap();
    fs::copy(
        deploy("prometheus/oxcd-alerts.test.yml"),
        tmp.path().join("oxcd-alerts.test.yml"),
    )
    .unwrap();
    let r = run(
        Command::new(&promtool)
            .args(["test", "rules"])
            .arg(tmp.path().join("oxcd-alerts.test.yml")),
        TOOL_TIMEOUT,
    );
    assert!(
        !r.status.success() && r.text().contains("OxcdNoLeader"),
        "a no-leader alert that never fires passed its unit test:\n{}",
        r.text()
    );
}

/// A Prometheus server on loopback with its own config and storage in a temp dir.
struct Prometheus {
    proc: Guard,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(bin: &Path, config: &str) -> Prometheus {
        let dir = tempfile::Builder::new()
            .prefix("oxcd-test-prometheus")
            .tempdir()
            .unwrap();
        let config_path = dir.path().join("prometheus.yml");
        fs::write(&config_path, config).unwrap();
        let port = free_port();
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .current_dir(dir.path());
        let proc = Guard::spawn(cmd, "prometheus", dir.path().join("prometheus.log"));
        Prometheus {
            proc,
            port,
            _dir: dir,
        }
    }

    /// GET `path` from the HTTP API; `None` while it does not answer yet.
    fn api(&mut self, path: &str) -> Option<serde_json::Value> {
        self.proc.assert_running();
        let (code, body) = http_get(self.port, path).ok()?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        // 4xx/5xx API answers carry their error in the JSON body; callers look at "status".
        if code == 200 || v.get("status").is_some() {
            Some(v)
        } else {
            None
        }
    }

    /// An instant query; panics unless Prometheus accepts the expression.
    fn query(&mut self, expr: &str) -> Vec<serde_json::Value> {
        let path = format!("/api/v1/query?query={}", urlencode(expr));
        let deadline = Instant::now() + Duration::from_secs(10);
        let v = loop {
            if let Some(v) = self.api(&path) {
                break v;
            }
            assert!(Instant::now() < deadline, "no answer to {path}");
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(v["status"], "success", "query {expr:?} failed: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

/// `expr` from the dashboard, with Grafana's variables replaced so Prometheus can run it.
fn grafana_expr_to_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$job", ".+")
        .replace("$instance", ".+")
}

/// Every `expr` (panel query) in the dashboard, with the panel's title.
fn dashboard_exprs(v: &serde_json::Value, title: &str, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(map) => {
            let title = map.get("title").and_then(|t| t.as_str()).unwrap_or(title);
            if let Some(e) = map.get("expr").and_then(|e| e.as_str()) {
                out.push((title.to_string(), e.to_string()));
            }
            for child in map.values() {
                dashboard_exprs(child, title, out);
            }
        }
        serde_json::Value::Array(items) => {
            for child in items {
                dashboard_exprs(child, title, out);
            }
        }
        _ => {}
    }
}

fn load_dashboard() -> serde_json::Value {
    let path = deploy("grafana/oxcd-dashboard.json");
    serde_json::from_str(&read(&path))
        .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()))
}

#[test]
fn prometheus_scrapes_the_server_and_runs_the_alerts_and_dashboard_queries() {
    let test = "prometheus_scrapes_the_server_and_runs_the_alerts_and_dashboard_queries";
    let bin = Path::new("/usr/bin/prometheus");
    let bin = if bin.is_file() {
        bin.to_path_buf()
    } else if let Some(b) = on_path("prometheus") {
        b
    } else {
        tool_present(false, "prometheus (Debian package prometheus)", test);
        return;
    };

    let (server, metrics_port) = server_with_metrics();
    let served = served_names(&metrics_body(metrics_port));
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {alerts}\n\
         scrape_configs:\n  - job_name: oxcd\n    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n",
        alerts = deploy("prometheus/oxcd-alerts.yml").display(),
    );
    let mut prom = Prometheus::start(&bin, &config);

    // Scraped: the server's leader gauge reaches Prometheus with the value 1.
    let deadline = Instant::now() + PROMETHEUS_TIMEOUT;
    let mut last = String::from("no answer yet");
    loop {
        if let Some(v) = prom.api("/api/v1/query?query=etcd_server_has_leader") {
            let result = &v["data"]["result"];
            if result[0]["value"][1] == "1" {
                assert_eq!(result[0]["metric"]["job"], "oxcd", "{v}");
                break;
            }
            last = v.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not get etcd_server_has_leader 1 within {PROMETHEUS_TIMEOUT:?} \
             (last answer: {last}); its output:\n{}\nserver output:\n{}",
            prom.proc.output(),
            server.output()
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    // The alert rules loaded and evaluate without error on real data.
    let deadline = Instant::now() + PROMETHEUS_TIMEOUT;
    let rules = loop {
        let v = prom.api("/api/v1/rules").expect("GET /api/v1/rules");
        let rules: Vec<serde_json::Value> = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        for r in &rules {
            assert_ne!(r["health"], "err", "alert rule fails to evaluate: {r}");
        }
        if !rules.is_empty() && rules.iter().all(|r| r["health"] == "ok") {
            break rules;
        }
        assert!(
            Instant::now() < deadline,
            "alert rules not all evaluated within {PROMETHEUS_TIMEOUT:?}: {v}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let names: BTreeSet<&str> = rules.iter().filter_map(|r| r["name"].as_str()).collect();
    for expected in [
        "OxcdNoLeader",
        "OxcdFrequentLeaderChanges",
        "OxcdHighFsyncDurations",
        "OxcdDatabaseQuotaLowSpace",
        "OxcdHighNumberOfFailedProposals",
    ] {
        assert!(names.contains(expected), "no {expected} rule in {names:?}");
    }
    // A healthy single member raises none of them.
    let v = prom.api("/api/v1/alerts").expect("GET /api/v1/alerts");
    let alerts = v["data"]["alerts"].as_array().cloned().unwrap_or_default();
    assert!(alerts.is_empty(), "alerts on a healthy member: {v}");
    assert!(prom.query("etcd_server_has_leader == 0").is_empty());

    // Every dashboard query is valid PromQL, and those over metrics the server serves return
    // data (a misspelt label or selector would return nothing).
    let mut exprs = Vec::new();
    dashboard_exprs(&load_dashboard(), "", &mut exprs);
    assert!(exprs.len() >= 10, "too few dashboard queries: {exprs:?}");
    let deadline = Instant::now() + PROMETHEUS_TIMEOUT;
    for (title, expr) in &exprs {
        let promql = grafana_expr_to_promql(expr);
        let needs_data = metric_names_in(expr).iter().all(|n| served.contains(n));
        loop {
            let result = prom.query(&promql);
            if !needs_data || !result.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "dashboard panel {title:?}: {promql} returns no data, though the server serves \
                 its metrics"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // A dashboard query Prometheus cannot parse would be caught.
    let path = format!(
        "/api/v1/query?query={}",
        urlencode("sum by (instance (etcd_server_has_leader)")
    );
    let v = prom.api(&path).expect("answer to a bad query");
    assert_eq!(v["status"], "error", "{v}");
    drop(prom);
}

// ---------------------------------------------------------------------------------------------
// Metric names

#[test]
fn dashboard_and_alerts_use_only_metrics_the_server_serves() {
    let dashboard = load_dashboard();
    assert!(
        dashboard["title"].as_str().is_some_and(|t| !t.is_empty()),
        "dashboard has no title"
    );
    let panels = dashboard["panels"].as_array().expect("dashboard panels");
    assert!(panels.len() >= 10, "dashboard has {} panels", panels.len());
    let mut ids = BTreeSet::new();
    for p in panels {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} used twice");
        assert!(p["gridPos"].is_object(), "panel {id} has no gridPos");
        if p["type"] != "row" {
            let targets = p["targets"].as_array().expect("panel targets");
            assert!(!targets.is_empty(), "panel {id} has no query");
        }
    }

    let (_server, port) = server_with_metrics();
    let served = served_names(&metrics_body(port));

    let mut used: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    let files = [
        "grafana/oxcd-dashboard.json",
        "prometheus/oxcd-alerts.yml",
        "prometheus/oxcd-alerts.test.yml",
    ];
    for file in files {
        for name in metric_names_in(&read(&deploy(file))) {
            used.entry(name).or_default().insert(file);
        }
    }
    for must in [
        "etcd_server_has_leader",
        "etcd_server_leader_changes_seen_total",
        "etcd_disk_wal_fsync_duration_seconds_bucket",
        "etcd_mvcc_db_total_size_in_bytes",
        "etcd_server_proposals_committed_total",
        "grpc_server_handled_total",
    ] {
        assert!(used.contains_key(must), "no deploy file uses {must}");
    }

    let unknown: Vec<String> = used
        .iter()
        .filter(|(n, _)| !served.contains(*n) && !NOT_YET_SERVED.contains(&n.as_str()))
        .map(|(n, files)| format!("{n} (in {files:?})"))
        .collect();
    assert!(
        unknown.is_empty(),
        "metric names that /metrics does not serve and that are not in NOT_YET_SERVED:\n  {}\n\
         served:\n  {}",
        unknown.join("\n  "),
        served.iter().cloned().collect::<Vec<_>>().join("\n  ")
    );
    let now_served: Vec<&&str> = NOT_YET_SERVED
        .iter()
        .filter(|n| served.contains(**n))
        .collect();
    if server_is_etcd() {
        // etcd serves them all: the list holds only real etcd names.
        assert_eq!(now_served.len(), NOT_YET_SERVED.len(), "{now_served:?}");
    } else if !now_served.is_empty() {
        eprintln!("NOT_YET_SERVED can drop these, /metrics serves them now: {now_served:?}");
    }

    // The check itself: a misspelt name is caught.
    let bad = metric_names_in(r#"rate(etcd_server_proposal_committed_total[1m])"#);
    assert!(bad
        .iter()
        .any(|n| !served.contains(n) && !NOT_YET_SERVED.contains(&n.as_str())));
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

const MANIFESTS: &[&str] = &[
    "kubernetes/services.yaml",
    "kubernetes/statefulset.yaml",
    "kubernetes/pdb.yaml",
];

/// `python3 -m kubernetes_validate --strict [extra] files...`
fn kubernetes_validate(extra: &[&str], files: &[PathBuf]) -> Run {
    run(
        Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict"])
            .args(extra)
            .args(files),
        TOOL_TIMEOUT,
    )
}

#[test]
fn kubernetes_manifests_match_the_api_schemas() {
    let test = "kubernetes_manifests_match_the_api_schemas";
    let probe = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !tool_present(
        probe.is_ok_and(|s| s.success()),
        "kubernetes-validate (Python package, for python3)",
        test,
    ) {
        return;
    }

    let files: Vec<PathBuf> = MANIFESTS.iter().map(|m| deploy(m)).collect();
    // The oldest Kubernetes the validator knows that the manifests are meant for, and the newest.
    for version in [&["--kubernetes-version", "1.25.0"][..], &[]] {
        let r = kubernetes_validate(version, &files);
        assert!(
            r.status.success(),
            "manifests rejected ({version:?}):\n{}",
            r.text()
        );
        let out = format!("{}{}", r.stdout, r.stderr);
        for kind in [
            "statefulset/oxcd",
            "service/oxcd-peer",
            "service/oxcd",
            "poddisruptionbudget/oxcd",
        ] {
            assert!(
                out.contains(&format!("passed for resource {kind} ")),
                "{kind} not validated:\n{out}"
            );
        }
    }

    // The validator rejects broken copies: a wrong type, and a misspelt field (--strict).
    let tmp = tempfile::tempdir().unwrap();
    let sts = read(&deploy("kubernetes/statefulset.yaml"));
    for (name, from, to, complaint) in [
        (
            "wrong-type.yaml",
            "replicas: 3",
            "replicas: three",
            "is not of type",
        ),
        (
            "unknown-field.yaml",
            "podManagementPolicy:",
            "podManagmentPolicy:",
            "podManagmentPolicy",
        ),
    ] {
        assert!(sts.contains(from), "statefulset.yaml has no {from:?}");
        let bad = tmp.path().join(name);
        fs::write(&bad, sts.replacen(from, to, 1)).unwrap();
        let r = kubernetes_validate(&[], &[bad]);
        assert!(
            !r.status.success() && format!("{}{}", r.stdout, r.stderr).contains(complaint),
            "{name} was not rejected:\n{}",
            r.text()
        );
    }
}

/// The container args of the StatefulSet, `--flag=value` each.
fn statefulset_args(sts: &str) -> Vec<String> {
    let mut in_args = false;
    let mut args = Vec::new();
    for line in sts.lines() {
        let t = line.trim();
        if t == "args:" {
            in_args = true;
        } else if in_args {
            match t.strip_prefix("- ") {
                Some(a) if a.starts_with("--") => args.push(a.to_string()),
                _ => break,
            }
        }
    }
    args
}

#[test]
fn statefulset_configures_members_with_flags_the_server_knows() {
    let sts = read(&deploy("kubernetes/statefulset.yaml"));
    let args = statefulset_args(&sts);
    assert!(args.len() >= 8, "too few args found: {args:?}");
    let flags = server_flags();
    let arg = |name: &str| -> String {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")))
            .unwrap_or_else(|| panic!("no --{name} in {args:?}"))
            .to_string()
    };
    for a in &args {
        let name = a.trim_start_matches("--").split('=').next().unwrap();
        assert!(
            flags.contains(name),
            "the server has no flag --{name} ({a})"
        );
    }

    // The members are the StatefulSet's pods, named by the headless Service.
    let replicas: usize = sts
        .lines()
        .find_map(|l| l.trim().strip_prefix("replicas: "))
        .expect("replicas")
        .parse()
        .expect("replicas is a number");
    let service = sts
        .lines()
        .find_map(|l| l.trim().strip_prefix("serviceName: "))
        .expect("serviceName");
    let expected: Vec<String> = (0..replicas)
        .map(|i| format!("oxcd-{i}=http://oxcd-{i}.{service}.$(NAMESPACE).svc:2380"))
        .collect();
    assert_eq!(arg("initial-cluster"), expected.join(","));
    assert_eq!(arg("name"), "$(POD_NAME)");
    assert_eq!(
        arg("initial-advertise-peer-urls"),
        format!("http://$(POD_NAME).{service}.$(NAMESPACE).svc:2380")
    );
    assert!(arg("data-dir").starts_with("/var/lib/oxcd/"));
    assert!(sts.contains("mountPath: /var/lib/oxcd\n"));
    for (flag, port) in [
        ("listen-client-urls", 2379),
        ("listen-peer-urls", 2380),
        ("listen-metrics-urls", 2381),
    ] {
        assert_eq!(arg(flag), format!("http://0.0.0.0:{port}"));
    }
    let services = read(&deploy("kubernetes/services.yaml"));
    assert!(services.contains(&format!("name: {service}\n")));
    assert!(services.contains("clusterIP: None"));

    // The probes ask the metrics listener, which serves them.
    assert!(sts.contains("path: /livez") && sts.contains("path: /readyz"));
    assert!(sts.contains("port: metrics"));

    // The image the manifest runs is the one deploy/Dockerfile builds.
    let dockerfile = read(&deploy("Dockerfile"));
    assert!(sts.contains("image: oxcd:latest"));
    assert!(sts.contains("- /usr/local/bin/oxcd\n"));
    assert!(dockerfile.contains("cargo build --release --locked -p oxcd"));
    assert!(dockerfile.contains("COPY --from=build /out/oxcd /usr/local/bin/oxcd"));
    assert!(dockerfile.contains("ln -s oxcd /usr/local/bin/etcd"));
    assert!(dockerfile.contains("EXPOSE 2379 2380"));
    assert!(
        sts.contains("runAsUser: 10001") && dockerfile.contains("--uid 10001"),
        "the pod's user is not the image's"
    );
    let ignore = read(&repo_root().join(".dockerignore"));
    assert!(ignore.lines().any(|l| l.trim() == "target/"));
}

// ---------------------------------------------------------------------------------------------
// systemd

#[test]
fn systemd_unit_passes_systemd_analyze() {
    let Some(analyze) = on_path("systemd-analyze") else {
        eprintln!(
            "\n\n!!! SKIPPED systemd_unit_passes_systemd_analyze: systemd-analyze is not installed !!!\n\n"
        );
        return;
    };
    let unit = read(&deploy("systemd/oxcd.service"));
    assert!(unit.contains("\nExecStart=/usr/local/bin/oxcd\n"));
    assert!(unit.contains("\nType=simple\n"), "oxcd sends no sd_notify");
    assert!(unit.contains("\nEnvironmentFile=-/etc/default/oxcd\n"));

    // verify wants ExecStart to exist: point it at the binary under test.
    let tmp = tempfile::tempdir().unwrap();
    let write_unit = |text: &str| -> PathBuf {
        let p = tmp.path().join("oxcd.service");
        fs::write(&p, text).unwrap();
        p
    };
    let ours = unit.replace(
        "ExecStart=/usr/local/bin/oxcd",
        &format!("ExecStart={}", server_bin().display()),
    );
    let path = write_unit(&ours);
    // Complaints about the unit name its file; anything else is about the host's own units.
    let complaints = |r: &Run| -> Vec<String> {
        format!("{}{}", r.stdout, r.stderr)
            .lines()
            .filter(|l| l.contains("oxcd.service"))
            .map(str::to_string)
            .collect()
    };
    let r = run(
        Command::new(&analyze).arg("verify").arg(&path),
        TOOL_TIMEOUT,
    );
    assert!(r.status.success(), "systemd-analyze verify:\n{}", r.text());
    assert_eq!(complaints(&r), Vec::<String>::new(), "{}", r.text());

    // Hardened: systemd's own exposure score (0 best, 10 worst) stays in its "OK" band.
    let r = run(
        Command::new(&analyze)
            .args(["security", "--offline=yes", "--threshold=30"])
            .arg(&path),
        TOOL_TIMEOUT,
    );
    assert!(
        r.status.success(),
        "systemd-analyze security: exposure above 3.0:\n{}",
        r.text()
    );

    // Broken copies are caught: a misspelt setting, and a binary that is not there.
    let path = write_unit(&ours.replace("ProtectSystem=strict", "ProtectSystm=strict"));
    let r = run(
        Command::new(&analyze).arg("verify").arg(&path),
        TOOL_TIMEOUT,
    );
    assert!(
        complaints(&r).iter().any(|l| l.contains("ProtectSystm")),
        "a misspelt setting went unnoticed:\n{}",
        r.text()
    );
    let path = write_unit(&unit.replace(
        "ExecStart=/usr/local/bin/oxcd",
        "ExecStart=/nonexistent/oxcd",
    ));
    let r = run(
        Command::new(&analyze).arg("verify").arg(&path),
        TOOL_TIMEOUT,
    );
    assert!(
        !r.status.success(),
        "a missing binary went unnoticed:\n{}",
        r.text()
    );
}

#[test]
fn systemd_environment_example_starts_a_member() {
    let (active, examples) = env_settings(&read(&deploy("systemd/oxcd.env")));
    assert!(active.len() >= 8, "too few settings: {active:?}");
    let flags = server_flags();
    for key in active.iter().map(|(k, _)| k).chain(&examples) {
        let flag = env_to_flag(key);
        assert!(
            flags.contains(&flag),
            "{key}: the server has no flag --{flag}"
        );
    }

    // The file's settings as the unit passes them, with the addresses moved to free loopback
    // ports and the data dir to a temp dir.
    let tmp = tempfile::tempdir().unwrap();
    let (client, peer, metrics) = (free_port(), free_port(), free_port());
    let name = active
        .iter()
        .find(|(k, _)| k == "ETCD_NAME")
        .map(|(_, v)| v.clone())
        .expect("ETCD_NAME");
    let moved: BTreeMap<&str, String> = [
        (
            "ETCD_DATA_DIR",
            tmp.path().join("data").display().to_string(),
        ),
        (
            "ETCD_LISTEN_CLIENT_URLS",
            format!("http://127.0.0.1:{client}"),
        ),
        (
            "ETCD_ADVERTISE_CLIENT_URLS",
            format!("http://127.0.0.1:{client}"),
        ),
        ("ETCD_LISTEN_PEER_URLS", format!("http://127.0.0.1:{peer}")),
        (
            "ETCD_INITIAL_ADVERTISE_PEER_URLS",
            format!("http://127.0.0.1:{peer}"),
        ),
        (
            "ETCD_INITIAL_CLUSTER",
            format!("{name}=http://127.0.0.1:{peer}"),
        ),
        (
            "ETCD_LISTEN_METRICS_URLS",
            format!("http://127.0.0.1:{metrics}"),
        ),
    ]
    .into_iter()
    .collect();
    let mut cmd = Command::new(server_bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ETCD_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in &active {
        let v = moved.get(k.as_str()).unwrap_or(v);
        cmd.env(k, v);
    }
    cmd.current_dir(tmp.path());
    let mut member = Guard::spawn(cmd, "server with oxcd.env", tmp.path().join("server.log"));
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        member.assert_running();
        let healthy = |port| matches!(http_get(port, "/health"), Ok((200, body)) if body.contains(r#""health":"true""#));
        if healthy(client) && healthy(metrics) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not healthy on the client and metrics URLs within {START_TIMEOUT:?}; output:\n{}",
            member.output()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        tmp.path().join("data").is_dir(),
        "ETCD_DATA_DIR was not used"
    );

    // The flag check itself: a misspelt variable is caught.
    assert!(!flags.contains(&env_to_flag("ETCD_LISTEN_CLIENT_URL")));
}
