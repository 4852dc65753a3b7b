//! Plain HTTP endpoints served beside gRPC on the client URLs (and alone on
//! `--listen-metrics-urls`): `/health`, `/metrics`, `/version`, as etcd serves them.

use std::time::Duration;

use api_gateway::{Gateway, ETCD_CLUSTER_VERSION, ETCD_VERSION};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

#[derive(Clone)]
pub struct HttpState {
    pub gw: Gateway,
    pub metrics: PrometheusHandle,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/version", get(version))
        .with_state(state)
}

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
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
async fn health(State(s): State<HttpState>) -> impl IntoResponse {
    let reason = check(&s.gw).await.err();
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

async fn check(gw: &Gateway) -> Result<(), String> {
    let status = gw
        .raft_status()
        .await
        .map_err(|e| format!("RAFT STATUS: {}", e.0.message()))?;
    if status.leader_id == 0 {
        return Err("RAFT NO LEADER".to_string());
    }
    match tokio::time::timeout(Duration::from_secs(1), gw.read_barrier()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("QGET ERROR:{}", e.0.message())),
        Err(_) => Err("QGET ERROR:timed out".to_string()),
    }
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
