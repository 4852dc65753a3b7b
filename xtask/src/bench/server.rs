//! Starting and stopping the servers under test: oxcd and etcd get the same etcd flags, fresh
//! data directories and loopback ports. Each process is owned by a guard that stops it (by its
//! own PID) when dropped, so a failed run, a panic or Ctrl-C (which drops the running future)
//! never leaves a server behind. Children also get SIGKILL from the kernel if this process dies
//! without unwinding (PR_SET_PDEATHSIG); that signal follows the spawning thread, which is the
//! main thread here because the benchmark runs in the runtime's `block_on` future.

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use oxcd_proto::etcdserverpb::kv_client::KvClient;
use oxcd_proto::etcdserverpb::RangeRequest;

use crate::error::{Error, Result};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum, serde::Serialize,
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

/// Next port to try; starts at a point derived from our PID so parallel runs rarely collide.
static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

/// A free loopback port in 21000..39999.
fn pick_port() -> Result<u16> {
    const LO: u16 = 21000;
    const SPAN: u16 = 19000;
    let _ = NEXT_PORT.compare_exchange(
        0,
        LO + (std::process::id() % SPAN as u32) as u16,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..SPAN {
        let p = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
        let port = LO + (p.wrapping_sub(LO)) % SPAN;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(Error::Usage("no free loopback port in 21000..39999".into()))
}

/// One running server process.
pub struct Member {
    pub name: String,
    pub pid: u32,
    pub client_url: String,
    child: Child,
    log: PathBuf,
}

impl Member {
    fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// SIGTERM, then SIGKILL if it has not exited within the grace period; reaps the child.
    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: kill(2) on the PID of our own unreaped child: the PID cannot have been reused.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        let until = Instant::now() + STOP_GRACE;
        while Instant::now() < until {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.stop();
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
    let mut tail: String = tail.chars().take(400).collect();
    if tail.is_empty() {
        tail = "(no output)".into();
    }
    tail
}

/// A server under test: one member or a cluster on loopback.
pub struct Cluster {
    pub kind: ServerKind,
    pub members: Vec<Member>,
}

impl Cluster {
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// Describes the first member that is no longer running, if any.
    pub fn exited(&mut self) -> Option<String> {
        for m in &mut self.members {
            if let Ok(Some(status)) = m.child.try_wait() {
                return Some(format!(
                    "{} {} exited during the run ({status}): {}",
                    self.kind.name(),
                    m.name,
                    m.log_tail()
                ));
            }
        }
        None
    }

    pub fn pids(&self) -> Vec<u32> {
        self.members.iter().map(|m| m.pid).collect()
    }

    /// Starts `nodes` members of `kind` with data under `dir` and waits until each serves a
    /// linearizable read (so a leader exists and the member has caught up).
    pub async fn start(kind: ServerKind, bin: &Path, nodes: usize, dir: &Path) -> Result<Cluster> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let mut ports = Vec::with_capacity(nodes);
        for _ in 0..nodes {
            ports.push((pick_port()?, pick_port()?));
        }
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Cluster {
            kind,
            members: Vec::with_capacity(nodes),
        };
        for (i, (client, peer)) in ports.iter().enumerate() {
            let name = format!("m{i}");
            let data = dir.join(format!("{name}.data"));
            let log = dir.join(format!("{name}.log"));
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let out = File::create(&log)
                .map_err(|e| Error::io(format!("create {}", log.display()), e))?;
            let err = out.try_clone().map_err(|e| Error::io("dup log file", e))?;
            let mut cmd = Command::new(bin);
            cmd.arg("--name")
                .arg(&name)
                .arg("--data-dir")
                .arg(&data)
                .arg("--listen-client-urls")
                .arg(&client_url)
                .arg("--advertise-client-urls")
                .arg(&client_url)
                .arg("--listen-peer-urls")
                .arg(&peer_url)
                .arg("--initial-advertise-peer-urls")
                .arg(&peer_url)
                .arg("--initial-cluster")
                .arg(&initial_cluster)
                .arg("--initial-cluster-state")
                .arg("new")
                .arg("--initial-cluster-token")
                .arg(format!("bench-{}", std::process::id()))
                .arg("--logger")
                .arg("zap")
                .arg("--log-level")
                .arg("warn")
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                // Own process group: a terminal Ctrl-C reaches us, and we stop the server ourselves.
                .process_group(0);
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("ETCD_") {
                    cmd.env_remove(k);
                }
            }
            // SAFETY: prctl is async-signal-safe and touches only the child's own attributes.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(
                        libc::PR_SET_PDEATHSIG,
                        libc::SIGKILL as libc::c_ulong,
                        0,
                        0,
                        0,
                    ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let child = cmd.spawn().map_err(|e| Error::ServerStart {
                name: kind.name().into(),
                reason: format!("cannot run {}: {e}", bin.display()),
            })?;
            cluster.members.push(Member {
                name,
                pid: child.id(),
                client_url,
                child,
                log,
            });
        }
        for m in &mut cluster.members {
            wait_ready(kind, m).await?;
        }
        Ok(cluster)
    }
}

async fn wait_ready(kind: ServerKind, m: &mut Member) -> Result<()> {
    let fail = |reason: String| Error::ServerStart {
        name: format!("{} {}", kind.name(), m.name),
        reason,
    };
    let start = Instant::now();
    let mut last_err = String::from("no answer yet");
    while start.elapsed() < READY_TIMEOUT {
        if let Ok(Some(status)) = m.child.try_wait() {
            return Err(fail(format!("exited with {status}: {}", m.log_tail())));
        }
        let attempt = async {
            let mut kv = KvClient::connect(m.client_url.clone())
                .await
                .map_err(|e| e.to_string())?;
            kv.range(RangeRequest {
                key: b"bench/ready".to_vec(),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => last_err = e,
            Err(_) => last_err = "read timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(fail(format!(
        "no linearizable read within {READY_TIMEOUT:?} (last: {last_err}); log: {}",
        m.log_tail()
    )))
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
