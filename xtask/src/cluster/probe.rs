//! Looking at a member from outside: is its recorded process still the one we started, what does
//! its `/health` say, and what does Maintenance.Status report.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use oxcd_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use oxcd_proto::etcdserverpb::{StatusRequest, StatusResponse};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::state::MemberState;

/// Whether a process command line (NUL-separated, as in /proc/PID/cmdline) is `bin` started as
/// member `name`: argv[0] is the binary and `--name NAME` is among the arguments.
pub fn cmdline_matches(cmdline: &[u8], bin: &Path, name: &str) -> bool {
    let args: Vec<&[u8]> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .collect();
    let Some(argv0) = args.first() else {
        return false;
    };
    *argv0 == bin.as_os_str().as_bytes()
        && args
            .windows(2)
            .any(|w| w[0] == b"--name" && w[1] == name.as_bytes())
}

/// Whether the recorded process of `m` is alive and still runs `bin` as that member. A zombie
/// has an empty command line and so counts as gone.
pub fn running(m: &MemberState, bin: &Path) -> bool {
    match std::fs::read(format!("/proc/{}/cmdline", m.pid)) {
        Ok(cmdline) => cmdline_matches(&cmdline, bin, &m.name),
        Err(_) => false,
    }
}

/// What `/health` answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// Answered, but not healthy: the status code and body.
    Unhealthy(String),
    /// No answer: the reason.
    Unreachable(String),
}

impl Health {
    pub fn short(&self) -> &'static str {
        match self {
            Health::Healthy => "true",
            Health::Unhealthy(_) => "false",
            Health::Unreachable(_) => "no answer",
        }
    }
}

/// `host:port` of an `http://host:port[/...]` URL.
fn authority(url: &str) -> &str {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    rest.split('/').next().unwrap_or(rest)
}

/// Reads an HTTP/1.1 response to `GET /health` and decides whether it says healthy: status
/// 200 and a JSON body whose "health" is true (etcd sends the string "true").
pub fn parse_health(response: &[u8]) -> Health {
    let text = String::from_utf8_lossy(response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status_line = head.lines().next().unwrap_or("");
    let code = status_line.split_whitespace().nth(1).unwrap_or("");
    // The JSON object, whatever the framing (a chunked body has size lines around it).
    let json = match (body.find('{'), body.rfind('}')) {
        (Some(a), Some(b)) if a < b => &body[a..=b],
        _ => "",
    };
    let healthy = serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .map(|v| v["health"] == "true" || v["health"] == true)
        .unwrap_or(false);
    if code == "200" && healthy {
        Health::Healthy
    } else if code.is_empty() {
        Health::Unreachable(format!("not an HTTP response: {:?}", status_line))
    } else {
        Health::Unhealthy(format!("HTTP {code} {}", json.trim()))
    }
}

/// `GET /health` on a plain-HTTP URL (the member's metrics URL).
pub async fn health(url: &str, timeout: Duration) -> Health {
    let host = authority(url);
    let attempt = async {
        let mut stream = TcpStream::connect(host).await?;
        let request = format!("GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(response)) => parse_health(&response),
        Ok(Err(e)) => Health::Unreachable(e.to_string()),
        Err(_) => Health::Unreachable(format!("no answer within {timeout:?}")),
    }
}

/// Maintenance.Status of the member at `client_url`.
pub async fn status(client_url: &str, timeout: Duration) -> Result<StatusResponse, String> {
    let attempt = async {
        let endpoint = tonic::transport::Endpoint::from_shared(client_url.to_string())
            .map_err(|e| e.to_string())?
            .connect_timeout(timeout);
        let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
        MaintenanceClient::new(channel)
            .status(StatusRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_must_name_the_binary_and_the_member() {
        let bin = Path::new("/usr/bin/etcd");
        let line = b"/usr/bin/etcd\0--name\0m1\0--data-dir\0/x/m1.data\0";
        assert!(cmdline_matches(line, bin, "m1"));
        assert!(!cmdline_matches(line, bin, "m0"));
        assert!(!cmdline_matches(line, Path::new("/usr/bin/oxcd"), "m1"));
        assert!(!cmdline_matches(b"", bin, "m1"));
        assert!(!cmdline_matches(b"/usr/bin/etcd\0--name=m1\0", bin, "m1"));
        assert!(!cmdline_matches(b"sleep\0--name\0m1\0", bin, "m1"));
    }

    #[test]
    fn health_responses() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n{\"health\":\"true\"}";
        assert_eq!(parse_health(ok), Health::Healthy);
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1d\r\n{\"health\":\"true\",\"reason\":\"\"}\r\n0\r\n\r\n";
        assert_eq!(parse_health(chunked), Health::Healthy);
        let bad = b"HTTP/1.1 503 Service Unavailable\r\n\r\n{\"health\":\"false\",\"reason\":\"RAFT NO LEADER\"}";
        assert_eq!(
            parse_health(bad),
            Health::Unhealthy(
                "HTTP 503 {\"health\":\"false\",\"reason\":\"RAFT NO LEADER\"}".into()
            )
        );
        assert!(matches!(parse_health(b""), Health::Unreachable(_)));
        assert_eq!(authority("http://127.0.0.1:2381"), "127.0.0.1:2381");
        assert_eq!(authority("http://127.0.0.1:2381/x"), "127.0.0.1:2381");
    }
}
