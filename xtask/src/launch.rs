//! Launching one etcd-compatible member: the flag set oxcd and etcd share, a log file for its
//! output and an environment free of ETCD_* variables (so only the flags given here apply).
//! `bench` and `cluster` both start their servers through [`member_command`] and add how the
//! process is tied to (bench) or detached from (cluster) the task runner.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{Error, Result};

/// Which server a member runs; both take the same etcd flags.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ServerKind {
    Oxcd,
    Etcd,
}

impl ServerKind {
    pub fn name(self) -> &'static str {
        match self {
            ServerKind::Oxcd => "oxcd",
            ServerKind::Etcd => "etcd",
        }
    }
}

/// Where one member listens and keeps its files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberSpec {
    pub name: String,
    pub client_url: String,
    pub peer_url: String,
    /// `--listen-metrics-urls` (plain HTTP: /health, /metrics), if the member gets one.
    pub metrics_url: Option<String>,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

/// `--initial-cluster` for these members: `name=peer-url,...`.
pub fn initial_cluster(members: &[MemberSpec]) -> String {
    members
        .iter()
        .map(|m| format!("{}={}", m.name, m.peer_url))
        .collect::<Vec<_>>()
        .join(",")
}

/// The etcd flags that start `spec` as a founding member of a new cluster.
pub fn member_args(
    spec: &MemberSpec,
    initial_cluster: &str,
    token: &str,
    log_level: &str,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::with_capacity(24);
    let mut flag = |name: &str, value: OsString| {
        args.push(name.into());
        args.push(value);
    };
    flag("--name", spec.name.clone().into());
    flag("--data-dir", spec.data_dir.clone().into());
    flag("--listen-client-urls", spec.client_url.clone().into());
    flag("--advertise-client-urls", spec.client_url.clone().into());
    flag("--listen-peer-urls", spec.peer_url.clone().into());
    flag(
        "--initial-advertise-peer-urls",
        spec.peer_url.clone().into(),
    );
    flag("--initial-cluster", initial_cluster.into());
    flag("--initial-cluster-state", "new".into());
    flag("--initial-cluster-token", token.into());
    if let Some(metrics) = &spec.metrics_url {
        flag("--listen-metrics-urls", metrics.clone().into());
    }
    flag("--logger", "zap".into());
    flag("--log-level", log_level.into());
    args
}

/// A command that runs `bin` as `spec` with stdout and stderr appended to a fresh `spec.log`,
/// stdin closed and no ETCD_* variables inherited. The caller decides the process group.
pub fn member_command(
    bin: &Path,
    spec: &MemberSpec,
    initial_cluster: &str,
    token: &str,
    log_level: &str,
) -> Result<Command> {
    let out = File::create(&spec.log)
        .map_err(|e| Error::io(format!("create {}", spec.log.display()), e))?;
    let err = out.try_clone().map_err(|e| Error::io("dup log file", e))?;
    let mut cmd = Command::new(bin);
    cmd.args(member_args(spec, initial_cluster, token, log_level))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ETCD_") {
            cmd.env_remove(k);
        }
    }
    Ok(cmd)
}

/// The last few non-empty lines of a log, on one line, for error messages.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
    let mut tail: String = tail.chars().take(400).collect();
    if tail.is_empty() {
        tail = "(no output)".into();
    }
    tail
}

/// `BIN --version`, first line (and etcd's Go version line).
pub fn version_of(bin: &Path) -> String {
    match Command::new(bin).arg("--version").output() {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("Version") && !l.starts_with("etcd API"))
                .map(str::trim)
                .collect();
            if lines.is_empty() {
                "unknown version".into()
            } else {
                lines.join(", ")
            }
        }
        Err(e) => format!("unknown version ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, client: u16, peer: u16, metrics: Option<u16>) -> MemberSpec {
        MemberSpec {
            name: name.into(),
            client_url: format!("http://127.0.0.1:{client}"),
            peer_url: format!("http://127.0.0.1:{peer}"),
            metrics_url: metrics.map(|p| format!("http://127.0.0.1:{p}")),
            data_dir: PathBuf::from(format!("/d/{name}.data")),
            log: PathBuf::from(format!("/d/{name}.log")),
        }
    }

    fn strings(args: Vec<OsString>) -> Vec<String> {
        args.into_iter()
            .map(|a| a.into_string().expect("utf-8"))
            .collect()
    }

    #[test]
    fn initial_cluster_lists_every_peer_url() {
        let members = [spec("m0", 1, 2, None), spec("m1", 11, 12, None)];
        assert_eq!(
            initial_cluster(&members),
            "m0=http://127.0.0.1:2,m1=http://127.0.0.1:12"
        );
    }

    #[test]
    fn member_args_without_metrics_are_the_bench_flag_set() {
        let m = spec("m0", 1, 2, None);
        let args = strings(member_args(&m, "m0=http://127.0.0.1:2", "tok", "warn"));
        assert_eq!(
            args,
            [
                "--name",
                "m0",
                "--data-dir",
                "/d/m0.data",
                "--listen-client-urls",
                "http://127.0.0.1:1",
                "--advertise-client-urls",
                "http://127.0.0.1:1",
                "--listen-peer-urls",
                "http://127.0.0.1:2",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2",
                "--initial-cluster",
                "m0=http://127.0.0.1:2",
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "tok",
                "--logger",
                "zap",
                "--log-level",
                "warn",
            ]
        );
    }

    #[test]
    fn member_args_with_metrics_add_listen_metrics_urls() {
        let m = spec("m1", 11, 12, Some(13));
        let args = strings(member_args(&m, "x", "tok", "info"));
        let i = args
            .iter()
            .position(|a| a == "--listen-metrics-urls")
            .expect("metrics flag");
        assert_eq!(args[i + 1], "http://127.0.0.1:13");
        assert_eq!(args.len(), 24);
    }
}
