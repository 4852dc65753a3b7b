//! Plain HTTP endpoints served beside gRPC on the client URLs (and alone on
//! `--listen-metrics-urls`): `/health`, `/livez`, `/readyz`, `/metrics`, `/version`, as etcd
//! serves them.

use std::fmt::Write as _;
use std::time::Duration;

use api_gateway::{Gateway, ETCD_CLUSTER_VERSION, ETCD_VERSION};
use axum::extract::{Path, RawQuery, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use oxcd_proto::etcdserverpb::{AlarmType, RangeRequest};

/// How long a health check waits for the raft loop or a quorum read.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct HttpState {
    pub gw: Gateway,
    pub metrics: PrometheusHandle,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/livez", any(livez))
        .route("/livez/{check}", any(livez_check))
        .route("/readyz", any(readyz))
        .route("/readyz/{check}", any(readyz_check))
        .route("/metrics", get(metrics))
        .route("/version", get(version))
        .with_state(state)
}

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    let mut body = s.metrics.render();
    crate::process_metrics::render(&mut body);
    ([("content-type", "text/plain; version=0.0.4")], body)
}

async fn version() -> impl IntoResponse {
    let body = serde_json::json!({
        "etcdserver": ETCD_VERSION,
        "etcdcluster": ETCD_CLUSTER_VERSION,
        "oxcd": env!("CARGO_PKG_VERSION"),
    });
    ([("content-type", "application/json")], body.to_string())
}

/// Healthy = a leader is known and a linearizable read completes in time (etcd's check).
async fn health(State(s): State<HttpState>, RawQuery(q): RawQuery) -> impl IntoResponse {
    let excluded: Vec<String> = query_pairs(q.as_deref().unwrap_or_default())
        .into_iter()
        .filter(|(k, _)| k == "exclude")
        .map(|(_, v)| v)
        .collect();
    let reason = match alarm_check(&s.gw, &excluded) {
        Err(reason) => Some(reason),
        Ok(()) => check(&s.gw).await.err(),
    };
    let ok = reason.is_none();
    metrics::counter!("etcd_server_health_success").increment(ok as u64);
    metrics::counter!("etcd_server_health_failures").increment(!ok as u64);
    let body = serde_json::json!({
        "health": if ok { "true" } else { "false" },
        "reason": reason.unwrap_or_default(),
    });
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [("content-type", "application/json")],
        body.to_string(),
    )
}

/// etcd's first health check: an alarm (other than those named by `?exclude=`) makes the member
/// unhealthy.
fn alarm_check(gw: &Gateway, excluded: &[String]) -> Result<(), String> {
    for a in gw.alarms().get(AlarmType::None as i32) {
        let name = AlarmType::try_from(a.alarm).map_or("UNKNOWN", |t| t.as_str_name());
        if excluded.iter().any(|e| e == name) {
            continue;
        }
        tracing::warn!(alarm = %applier::alarm_text(&a), "serving /health false due to an alarm");
        return Err(match AlarmType::try_from(a.alarm) {
            Ok(AlarmType::Nospace) | Ok(AlarmType::Corrupt) => format!("ALARM {name}"),
            _ => "ALARM UNKNOWN".to_string(),
        });
    }
    Ok(())
}

async fn check(gw: &Gateway) -> Result<(), String> {
    published(gw)?;
    quorum_read(gw).await.map_err(|e| match e {
        ReadFailure::Raft(m) => format!("RAFT STATUS: {m}"),
        ReadFailure::NoLeader => "RAFT NO LEADER".to_string(),
        ReadFailure::Read(m) => format!("QGET ERROR:{m}"),
        ReadFailure::TimedOut => "QGET ERROR:timed out".to_string(),
    })
}

/// etcd serves no client request before this member's name and client URLs are in the
/// replicated member list; oxcd serves earlier but is not healthy until then, because
/// followers forward lease requests to the leader's published client URL.
fn published(gw: &Gateway) -> Result<(), String> {
    let me = gw.headers().member_id;
    match gw.membership().get(me) {
        Some(m) if !m.client_ur_ls.is_empty() => Ok(()),
        _ => Err("NOT READY: member attributes not published yet".to_string()),
    }
}

enum ReadFailure {
    /// The raft loop did not answer (in time).
    Raft(String),
    NoLeader,
    Read(String),
    TimedOut,
}

/// A leader is known and a linearizable read barrier completes in time.
async fn quorum_read(gw: &Gateway) -> Result<(), ReadFailure> {
    let status = raft_status(gw).await.map_err(ReadFailure::Raft)?;
    if status.leader_id == 0 {
        return Err(ReadFailure::NoLeader);
    }
    match tokio::time::timeout(CHECK_TIMEOUT, gw.read_barrier()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ReadFailure::Read(e.0.message().to_string())),
        Err(_) => Err(ReadFailure::TimedOut),
    }
}

async fn raft_status(gw: &Gateway) -> Result<raft_node::RaftStatus, String> {
    match tokio::time::timeout(CHECK_TIMEOUT, gw.raft_status()).await {
        Ok(Ok(status)) => Ok(status),
        Ok(Err(e)) => Err(e.0.message().to_string()),
        Err(_) => Err("raft loop did not answer within 1s".to_string()),
    }
}

/// The checks behind `/livez` and `/readyz`, named as etcd names them.
#[derive(Clone, Copy, PartialEq)]
enum Check {
    /// No CORRUPT alarm is active.
    DataCorruption,
    /// The raft loop answers and the local store serves a read.
    SerializableRead,
    /// A leader is known and a quorum read completes.
    LinearizableRead,
}

impl Check {
    fn name(self) -> &'static str {
        match self {
            Check::DataCorruption => "data_corruption",
            Check::SerializableRead => "serializable_read",
            Check::LinearizableRead => "linearizable_read",
        }
    }

    async fn run(self, gw: &Gateway) -> Result<(), String> {
        match self {
            Check::DataCorruption if gw.alarms().active(AlarmType::Corrupt) => {
                Err("alarm activated: CORRUPT".to_string())
            }
            Check::DataCorruption => Ok(()),
            Check::SerializableRead => {
                raft_status(gw).await?;
                let req = RangeRequest {
                    keys_only: true,
                    limit: 1,
                    serializable: true,
                    ..Default::default()
                };
                gw.range(&req)
                    .await
                    .map(drop)
                    .map_err(|e| e.0.message().to_string())
            }
            Check::LinearizableRead => quorum_read(gw).await.map_err(|e| match e {
                ReadFailure::Raft(m) | ReadFailure::Read(m) => m,
                ReadFailure::NoLeader => "etcdserver: no leader".to_string(),
                ReadFailure::TimedOut => "etcdserver: request timed out".to_string(),
            }),
        }
    }
}

/// `/livez`: the process serves (it is worth keeping). `/readyz`: the member can serve
/// requests (it is worth sending traffic to).
const LIVEZ: &[Check] = &[Check::SerializableRead];
const READYZ: &[Check] = &[
    Check::DataCorruption,
    Check::SerializableRead,
    Check::LinearizableRead,
];

async fn livez(State(s): State<HttpState>, method: Method, RawQuery(q): RawQuery) -> Response {
    probe(&s.gw, "livez", LIVEZ, &method, q.as_deref(), true).await
}

async fn readyz(State(s): State<HttpState>, method: Method, RawQuery(q): RawQuery) -> Response {
    probe(&s.gw, "readyz", READYZ, &method, q.as_deref(), true).await
}

async fn livez_check(
    State(s): State<HttpState>,
    Path(name): Path<String>,
    method: Method,
    RawQuery(q): RawQuery,
) -> Response {
    match LIVEZ.iter().find(|c| c.name() == name) {
        Some(c) => probe(&s.gw, "livez", &[*c], &method, q.as_deref(), false).await,
        None => not_found(),
    }
}

async fn readyz_check(
    State(s): State<HttpState>,
    Path(name): Path<String>,
    method: Method,
    RawQuery(q): RawQuery,
) -> Response {
    match READYZ.iter().find(|c| c.name() == name) {
        Some(c) => probe(&s.gw, "readyz", &[*c], &method, q.as_deref(), false).await,
        None => not_found(),
    }
}

/// Runs `checks` (less those named by `?exclude=` on the root path) as etcd does: 200 "ok" when
/// all pass, with one `[+]name ok` line per check first if `?verbose` is given; else 503 with
/// one `[+]name ok` / `[-]name failed: reason` line per check.
async fn probe(
    gw: &Gateway,
    kind: &'static str,
    checks: &[Check],
    method: &Method,
    query: Option<&str>,
    root: bool,
) -> Response {
    const PLAIN: [(&str, &str); 2] = [
        ("content-type", "text/plain; charset=utf-8"),
        ("x-content-type-options", "nosniff"),
    ];
    if method != Method::GET {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [("allow", "GET")],
            PLAIN,
            "Method Not Allowed\n",
        )
            .into_response();
    }
    let params = query_pairs(query.unwrap_or_default());
    let mut excluded: Vec<&str> = Vec::new();
    if root {
        excluded = params
            .iter()
            .filter(|(k, v)| k == "exclude" && !v.is_empty())
            .map(|(_, v)| v.as_str())
            .collect();
        let unknown: Vec<&&str> = excluded
            .iter()
            .filter(|e| !checks.iter().any(|c| c.name() == **e))
            .collect();
        if !unknown.is_empty() {
            tracing::warn!(path = kind, missing = ?unknown, "some health checks cannot be excluded");
        }
    }
    let mut report = String::new();
    let mut failed = false;
    for check in checks.iter().filter(|c| !excluded.contains(&c.name())) {
        let result = check.run(gw).await;
        let status = if result.is_ok() { "success" } else { "error" };
        metrics::gauge!("etcd_server_healthcheck", "type" => kind, "name" => check.name())
            .set(if result.is_ok() { 1.0 } else { 0.0 });
        metrics::counter!(
            "etcd_server_healthchecks_total",
            "type" => kind, "name" => check.name(), "status" => status
        )
        .increment(1);
        match result {
            Ok(()) => {
                let _ = writeln!(report, "[+]{} ok", check.name());
            }
            Err(reason) => {
                let _ = writeln!(report, "[-]{} failed: {reason}", check.name());
                failed = true;
            }
        }
    }
    if failed {
        tracing::warn!(path = kind, reason = %report, "health check failed");
        // etcd answers with http.Error, which adds a newline to the report.
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            PLAIN,
            format!("{report}\n"),
        )
            .into_response();
    }
    let mut body = if params.iter().any(|(k, _)| k == "verbose") {
        report
    } else {
        String::new()
    };
    body.push_str("ok\n");
    (StatusCode::OK, PLAIN, body).into_response()
}

/// `a=1&b&c=x%20y` as decoded (key, value) pairs.
fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (unescape(k), unescape(v))
        })
        .collect()
}

fn unescape(s: &str) -> String {
    let hex = |c: Option<&u8>| c.and_then(|c| (*c as char).to_digit(16));
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (b[i], hex(b.get(i + 1)), hex(b.get(i + 2))) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "404 page not found\n").into_response()
}

/// Unknown paths: a gRPC call to a service oxcd does not serve (Auth, for now) gets
/// `Unimplemented` naming the service, as gRPC servers answer; anyone else gets the plain 404
/// etcd's HTTP mux sends.
pub async fn fallback(req: axum::extract::Request) -> axum::response::Response {
    let is_grpc = req
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if is_grpc {
        // gRPC paths are /<package.Service>/<Method>.
        let service = req.uri().path().trim_start_matches('/');
        let service = service.split('/').next().unwrap_or_default();
        tonic::Status::unimplemented(format!("unknown service {service}")).into_http()
    } else {
        (StatusCode::NOT_FOUND, "404 page not found\n").into_response()
    }
}
