//! Starting and stopping the servers under test: oxcd and etcd get the same etcd flags, fresh
//! data directories and loopback ports. Each process is owned by a guard that stops it (by its
//! own PID) when dropped, so a failed run, a panic or Ctrl-C (which drops the running future)
//! never leaves a server behind. Children also get SIGKILL from the kernel if this process dies
//! without unwinding (PR_SET_PDEATHSIG); that signal follows the spawning thread, which is the
//! main thread here because the benchmark runs in the runtime's `block_on` future.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use oxcd_proto::etcdserverpb::kv_client::KvClient;
use oxcd_proto::etcdserverpb::RangeRequest;

use crate::error::{Error, Result};
use crate::launch::{self, log_tail, MemberSpec};
pub use crate::launch::{version_of, ServerKind};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(5);

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
        let specs: Vec<MemberSpec> = ports
            .iter()
            .enumerate()
            .map(|(i, (client, peer))| {
                let name = format!("m{i}");
                MemberSpec {
                    client_url: format!("http://127.0.0.1:{client}"),
                    peer_url: format!("http://127.0.0.1:{peer}"),
                    metrics_url: None,
                    data_dir: dir.join(format!("{name}.data")),
                    log: dir.join(format!("{name}.log")),
                    name,
                }
            })
            .collect();
        let initial_cluster = launch::initial_cluster(&specs);
        let token = format!("bench-{}", std::process::id());
        let mut cluster = Cluster {
            kind,
            members: Vec::with_capacity(nodes),
        };
        for spec in specs {
            let mut cmd = launch::member_command(bin, &spec, &initial_cluster, &token, "warn")?;
            // Own process group: a terminal Ctrl-C reaches us, and we stop the server ourselves.
            cmd.process_group(0);
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
                name: spec.name,
                pid: child.id(),
                client_url: spec.client_url,
                child,
                log: spec.log,
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
