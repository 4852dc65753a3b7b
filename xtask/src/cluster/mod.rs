//! `cargo xtask cluster up|down|status`: a local oxcd (or etcd) cluster on loopback that outlives
//! the command, for trying things by hand and for pointing benchmarks at.
//!
//! Layout: member i is named `m<i>` and listens on base+10*i (client, gRPC and HTTP), base+10*i+1
//! (peer) and base+10*i+2 (metrics: /health, /metrics); base is 2379 unless `--base-port` says
//! otherwise. Everything lives in one directory (default `target/cluster` in the workspace):
//! `m<i>.data`, `m<i>.log` and `cluster.json`, the state file naming each member's PID.
//! Members run in their own sessions (setsid), so they survive this process and its terminal;
//! `down` stops exactly the recorded PIDs, and only while they still run the recorded binary
//! as the recorded member.

mod probe;
mod state;

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use futures::future::join_all;

use crate::bench::{self, Profile};
use crate::error::{Error, Result};
use crate::launch::{self, log_tail, MemberSpec, ServerKind};
use probe::Health;
use state::{ClusterState, MemberState};

/// How long `up` waits for every member to report healthy.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `down` waits after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Per request of a /health or Maintenance.Status probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
const DEFAULT_ETCD_BIN: &str = "/usr/bin/etcd";

#[derive(Args, Debug)]
pub struct ClusterArgs {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Subcommand, Debug)]
pub enum Action {
    /// Start N members on loopback, detached from this command; wait until each reports
    /// healthy; print the endpoints.
    Up(UpArgs),
    /// Stop the recorded members (SIGTERM, SIGKILL after 10 s) and remove their data.
    Down(DownArgs),
    /// Process, /health and Maintenance.Status of each member; exits 1 unless every member
    /// runs and is healthy.
    Status(DirArg),
}

#[derive(Args, Debug)]
pub struct DirArg {
    /// Cluster directory: state file, data directories and logs [default: target/cluster in
    /// the workspace].
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Members to start.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Server to run.
    #[arg(long, value_enum, default_value_t = ServerKind::Oxcd)]
    pub server: ServerKind,
    /// Server binary [default: oxcd from `cargo build --release -p oxcd` (built now), or
    /// /usr/bin/etcd].
    #[arg(long)]
    pub bin: Option<PathBuf>,
    /// Client port of m0. Member i uses base+10*i (client), +1 (peer), +2 (metrics, /health).
    #[arg(long, default_value_t = 2379)]
    pub base_port: u16,
    #[command(flatten)]
    pub dir: DirArg,
}

#[derive(Args, Debug)]
pub struct DownArgs {
    /// Keep the members' data directories (a later `up` with the same options restarts them
    /// from it).
    #[arg(long)]
    pub keep_data: bool,
    #[command(flatten)]
    pub dir: DirArg,
}

/// Entry point of `cargo xtask cluster`. Returns the process exit code.
pub async fn run(args: ClusterArgs) -> Result<i32> {
    match args.action {
        Action::Up(a) => up(a).await,
        Action::Down(a) => down(a).await,
        Action::Status(a) => status(a).await,
    }
}

fn cluster_dir(arg: &DirArg) -> Result<PathBuf> {
    let dir = arg
        .dir
        .clone()
        .unwrap_or_else(|| bench::workspace_root().join("target").join("cluster"));
    std::path::absolute(&dir).map_err(|e| Error::io(format!("resolve {}", dir.display()), e))
}

/// The binary to run: given (must exist), etcd's Debian path, or oxcd built in release.
fn resolve_bin(server: ServerKind, given: Option<PathBuf>) -> Result<PathBuf> {
    let bin = match (given, server) {
        (Some(b), _) => b,
        (None, ServerKind::Etcd) => PathBuf::from(DEFAULT_ETCD_BIN),
        (None, ServerKind::Oxcd) => bench::cargo_build("cluster", &["oxcd"], Profile::Release)?
            .remove("oxcd")
            .ok_or_else(|| Error::Command {
                command: "cargo build --release -p oxcd".into(),
                reason: "no oxcd executable reported".into(),
            })?,
    };
    if !bin.is_file() {
        let hint = match server {
            ServerKind::Oxcd => "build it with `cargo build --release -p oxcd` or pass --bin",
            ServerKind::Etcd => "install etcd (Debian: apt-get install etcd-server) or pass --bin",
        };
        return Err(Error::Usage(format!(
            "{} binary {} not found; {hint}",
            server.name(),
            bin.display()
        )));
    }
    // Recorded and exec'd as the same absolute path, so `down` can recognise its processes.
    std::path::absolute(&bin).map_err(|e| Error::io(format!("resolve {}", bin.display()), e))
}

/// Refuses a layout whose ports are already taken on 127.0.0.1.
fn check_ports_free(specs: &[MemberSpec]) -> Result<()> {
    for s in specs {
        let urls = [
            Some(&s.client_url),
            Some(&s.peer_url),
            s.metrics_url.as_ref(),
        ];
        for url in urls.into_iter().flatten() {
            let port: u16 = url
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .expect("layout URLs end in a port");
            if let Err(e) = TcpListener::bind(("127.0.0.1", port)) {
                return Err(Error::Command {
                    command: "cluster up".into(),
                    reason: format!(
                        "port {port} ({} {url}) is not free: {e}; pick another --base-port",
                        s.name
                    ),
                });
            }
        }
    }
    Ok(())
}

/// A member started by this `up`.
struct Started {
    spec: MemberSpec,
    child: Child,
    /// The data directory did not exist before: remove it if the start fails.
    fresh_data: bool,
}

async fn up(args: UpArgs) -> Result<i32> {
    let dir = cluster_dir(&args.dir)?;
    if let Some(old) = ClusterState::load(&dir)? {
        let live: Vec<String> = old
            .members
            .iter()
            .filter(|m| probe::running(m, &old.bin))
            .map(|m| format!("{} (pid {})", m.name, m.pid))
            .collect();
        if !live.is_empty() {
            return Err(Error::Command {
                command: "cluster up".into(),
                reason: format!(
                    "an {} cluster is already running from {}: {}; stop it first with \
                     `cargo xtask cluster down{}`",
                    old.server.name(),
                    dir.display(),
                    live.join(", "),
                    dir_flag(&args.dir)
                ),
            });
        }
        eprintln!(
            "cluster: {} names no running member; replacing it",
            ClusterState::path(&dir).display()
        );
    }
    let specs = state::layout(args.nodes, args.base_port, &dir)?;
    check_ports_free(&specs)?;
    let bin = resolve_bin(args.server, args.bin)?;
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;

    eprintln!(
        "cluster: starting {} {} member(s) from {} ({})",
        specs.len(),
        args.server.name(),
        bin.display(),
        launch::version_of(&bin)
    );
    let started_at = Instant::now();
    let initial_cluster = launch::initial_cluster(&specs);
    let mut started: Vec<Started> = Vec::with_capacity(specs.len());
    for spec in specs {
        let fresh_data = !spec.data_dir.exists();
        if !fresh_data {
            eprintln!(
                "cluster: {}: restarting from the existing {}",
                spec.name,
                spec.data_dir.display()
            );
        }
        let spawned = launch::member_command(&bin, &spec, &initial_cluster, state::TOKEN, "info")
            .and_then(|mut cmd| {
                // SAFETY: setsid is async-signal-safe and changes only the child's own session.
                // A session of its own detaches the member from this process's terminal and
                // process group, so it keeps running after `up` returns or is interrupted.
                unsafe {
                    cmd.pre_exec(|| {
                        if libc::setsid() < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                cmd.spawn().map_err(|e| Error::ServerStart {
                    name: format!("{} {}", args.server.name(), spec.name),
                    reason: format!("cannot run {}: {e}", bin.display()),
                })
            });
        match spawned {
            Ok(child) => started.push(Started {
                spec,
                child,
                fresh_data,
            }),
            Err(e) => {
                abort(&mut started, &dir);
                return Err(e);
            }
        }
    }
    let record = ClusterState {
        server: args.server,
        bin: bin.clone(),
        token: state::TOKEN.into(),
        members: started
            .iter()
            .map(|s| MemberState::new(&s.spec, s.child.id()))
            .collect(),
    };
    if let Err(e) = record.save(&dir) {
        abort(&mut started, &dir);
        return Err(e);
    }
    if let Err(e) = wait_healthy(args.server, &mut started).await {
        abort(&mut started, &dir);
        return Err(e);
    }
    eprintln!(
        "cluster: {} member(s) healthy after {:.1} s",
        started.len(),
        started_at.elapsed().as_secs_f64()
    );

    println!("dir: {}", dir.display());
    let rows = record
        .members
        .iter()
        .map(|m| {
            vec![
                m.name.clone(),
                m.pid.to_string(),
                m.client_url.clone(),
                m.peer_url.clone(),
                m.metrics_url.clone(),
                file_name(&m.data_dir),
                file_name(&m.log),
            ]
        })
        .collect();
    print_table(
        &["NAME", "PID", "CLIENT", "PEER", "METRICS", "DATA", "LOG"],
        rows,
    );
    println!(
        "ETCDCTL_API=3 etcdctl --endpoints={} endpoint status -w table",
        record.endpoints()
    );
    // The children are deliberately not waited for: they run on in their own sessions.
    Ok(0)
}

/// ` --dir DIR` if the user gave one, for commands suggested in messages.
fn dir_flag(arg: &DirArg) -> String {
    match &arg.dir {
        Some(d) => format!(" --dir {}", d.display()),
        None => String::new(),
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// Waits until every started member answers /health with health true; fails as soon as one
/// exits, or when the time is up.
async fn wait_healthy(kind: ServerKind, started: &mut [Started]) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last: Vec<Option<Health>> = vec![None; started.len()];
    loop {
        for s in started.iter_mut() {
            if let Ok(Some(status)) = s.child.try_wait() {
                return Err(Error::ServerStart {
                    name: format!("{} {}", kind.name(), s.spec.name),
                    reason: format!("exited with {status}: {}", log_tail(&s.spec.log)),
                });
            }
        }
        let pending: Vec<usize> = (0..started.len())
            .filter(|i| last[*i] != Some(Health::Healthy))
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let reasons: Vec<String> = pending
                .iter()
                .map(|&i| {
                    let why = match &last[i] {
                        Some(Health::Unhealthy(r)) | Some(Health::Unreachable(r)) => r.clone(),
                        _ => "no answer yet".into(),
                    };
                    format!(
                        "{}: {why}; log: {}",
                        started[i].spec.name,
                        log_tail(&started[i].spec.log)
                    )
                })
                .collect();
            return Err(Error::ServerStart {
                name: kind.name().into(),
                reason: format!(
                    "not healthy within {READY_TIMEOUT:?}: {}",
                    reasons.join("; ")
                ),
            });
        }
        let probes = pending.iter().map(|&i| {
            let url = started[i].spec.metrics_url.clone().unwrap_or_default();
            async move { (i, probe::health(&url, PROBE_TIMEOUT.min(left)).await) }
        });
        for (i, h) in join_all(probes).await {
            last[i] = Some(h);
        }
        if last.iter().any(|h| *h != Some(Health::Healthy)) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// After a failed `up`: stops the members it started (they are its children, so their PIDs
/// cannot have been reused), removes data directories it created and the state file. Logs stay.
fn abort(started: &mut [Started], dir: &Path) {
    for s in started.iter_mut() {
        if matches!(s.child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on the PID of our own unreaped child.
            unsafe { libc::kill(s.child.id() as libc::pid_t, libc::SIGTERM) };
        }
    }
    let until = Instant::now() + STOP_GRACE;
    for s in started.iter_mut() {
        while matches!(s.child.try_wait(), Ok(None)) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(s.child.try_wait(), Ok(None)) {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
        if s.fresh_data {
            let _ = std::fs::remove_dir_all(&s.spec.data_dir);
        }
    }
    let _ = ClusterState::remove(dir);
    eprintln!(
        "cluster: start failed; members stopped, logs kept in {}",
        dir.display()
    );
}

/// Sends `signal` to a recorded member if it still runs the recorded binary as that member.
fn signal_member(m: &MemberState, bin: &Path, signal: libc::c_int) -> bool {
    if !probe::running(m, bin) {
        return false;
    }
    // SAFETY: kill(2) with a PID just checked to be our member; no memory is involved.
    unsafe { libc::kill(m.pid as libc::pid_t, signal) == 0 }
}

async fn down(args: DownArgs) -> Result<i32> {
    let dir = cluster_dir(&args.dir)?;
    let Some(st) = ClusterState::load(&dir)? else {
        eprintln!(
            "cluster: no cluster recorded in {} (no {}); nothing to stop",
            dir.display(),
            state::STATE_FILE
        );
        return Ok(0);
    };
    let start = Instant::now();
    // Per member: what happened, once known.
    let mut outcome: Vec<Option<String>> = st
        .members
        .iter()
        .map(|m| {
            if signal_member(m, &st.bin, libc::SIGTERM) {
                None
            } else {
                Some("was not running".to_string())
            }
        })
        .collect();
    let mut killed = false;
    loop {
        for (m, o) in st.members.iter().zip(outcome.iter_mut()) {
            if o.is_none() && !probe::running(m, &st.bin) {
                *o = Some(format!(
                    "stopped after {} in {:.1} s",
                    if killed { "SIGKILL" } else { "SIGTERM" },
                    start.elapsed().as_secs_f64()
                ));
            }
        }
        if outcome.iter().all(Option::is_some) {
            break;
        }
        if !killed && start.elapsed() >= STOP_GRACE {
            for (m, o) in st.members.iter().zip(&outcome) {
                if o.is_none() {
                    eprintln!(
                        "cluster: {} (pid {}) still running after {STOP_GRACE:?}; SIGKILL",
                        m.name, m.pid
                    );
                    signal_member(m, &st.bin, libc::SIGKILL);
                }
            }
            killed = true;
        }
        if killed && start.elapsed() >= STOP_GRACE + Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut stuck = Vec::new();
    for (m, o) in st.members.iter().zip(&outcome) {
        match o {
            Some(what) => println!("{}  pid {}  {what}", m.name, m.pid),
            None => {
                println!("{}  pid {}  STILL RUNNING", m.name, m.pid);
                stuck.push(m.name.clone());
            }
        }
    }
    if !stuck.is_empty() {
        return Err(Error::Command {
            command: "cluster down".into(),
            reason: format!(
                "{} did not stop; state file and data kept",
                stuck.join(", ")
            ),
        });
    }
    if args.keep_data {
        println!("data kept in {}", dir.display());
    } else {
        for m in &st.members {
            // Only directories inside the cluster directory, whatever the state file says.
            if m.data_dir.parent() == Some(dir.as_path()) && m.data_dir.exists() {
                std::fs::remove_dir_all(&m.data_dir)
                    .map_err(|e| Error::io(format!("remove {}", m.data_dir.display()), e))?;
            }
        }
        println!("data removed; logs kept in {}", dir.display());
    }
    ClusterState::remove(&dir)?;
    Ok(0)
}

/// One row of `status`.
struct MemberReport {
    running: bool,
    health: Health,
    status: std::result::Result<oxcd_proto::etcdserverpb::StatusResponse, String>,
}

async fn status(args: DirArg) -> Result<i32> {
    let dir = cluster_dir(&args)?;
    let Some(st) = ClusterState::load(&dir)? else {
        eprintln!(
            "cluster: no cluster recorded in {}; start one with `cargo xtask cluster up`",
            dir.display()
        );
        return Ok(1);
    };
    let reports = join_all(st.members.iter().map(|m| {
        let bin = st.bin.clone();
        async move {
            let running = probe::running(m, &bin);
            if !running {
                return MemberReport {
                    running,
                    health: Health::Unreachable("not running".into()),
                    status: Err("not running".into()),
                };
            }
            let (health, status) = tokio::join!(
                probe::health(&m.metrics_url, PROBE_TIMEOUT),
                probe::status(&m.client_url, PROBE_TIMEOUT)
            );
            MemberReport {
                running,
                health,
                status,
            }
        }
    }))
    .await;

    println!(
        "{} cluster in {} ({})",
        st.server.name(),
        dir.display(),
        st.bin.display()
    );
    let mut rows = Vec::new();
    let mut problems = Vec::new();
    for (m, r) in st.members.iter().zip(&reports) {
        let mut row = vec![
            m.name.clone(),
            m.pid.to_string(),
            if r.running { "yes" } else { "NO" }.to_string(),
            r.health.short().to_string(),
        ];
        match &r.status {
            Ok(s) => {
                let id = s.header.as_ref().map(|h| h.member_id).unwrap_or(0);
                row.extend([
                    format!("{id:x}"),
                    format!("{:x}", s.leader),
                    (id != 0 && id == s.leader).to_string(),
                    s.raft_term.to_string(),
                    s.raft_index.to_string(),
                    human_bytes(s.db_size),
                    s.is_learner.to_string(),
                    s.version.clone(),
                ]);
                for e in &s.errors {
                    problems.push(format!("{}: reports error: {e}", m.name));
                }
            }
            Err(e) => {
                row.extend(std::iter::repeat_n("-".to_string(), 8));
                if r.running {
                    problems.push(format!("{}: Maintenance.Status: {e}", m.name));
                }
            }
        }
        row.push(m.client_url.clone());
        if let Health::Unhealthy(why) | Health::Unreachable(why) = &r.health {
            if r.running {
                problems.push(format!("{}: /health: {why}", m.name));
            }
        }
        rows.push(row);
    }
    print_table(
        &[
            "NAME",
            "PID",
            "RUNNING",
            "HEALTH",
            "MEMBER ID",
            "LEADER",
            "IS LEADER",
            "RAFT TERM",
            "RAFT INDEX",
            "DB SIZE",
            "IS LEARNER",
            "VERSION",
            "ENDPOINT",
        ],
        rows,
    );
    for p in &problems {
        println!("{p}");
    }
    let all_up = reports
        .iter()
        .all(|r| r.running && r.health == Health::Healthy);
    Ok(if all_up { 0 } else { 1 })
}

/// Bytes as etcdctl shows them (SI units): 20 kB, 1.2 MB.
fn human_bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["kB", "MB", "GB", "TB", "PB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = "B";
    for u in UNITS {
        if v < 1000.0 {
            break;
        }
        v /= 1000.0;
        unit = u;
    }
    if v < 10.0 {
        format!("{v:.1} {unit}")
    } else {
        format!("{v:.0} {unit}")
    }
}

/// Left-aligned columns, two spaces apart.
fn print_table(header: &[&str], rows: Vec<Vec<String>>) {
    print!("{}", table(header, &rows));
}

fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, cell) in width.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&width).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_like_etcdctl() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(20_480), "20 kB");
        assert_eq!(human_bytes(1_234_567), "1.2 MB");
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["NAME", "PID"],
            &[
                vec!["m0".into(), "1".into()],
                vec!["m10".into(), "12345".into()],
            ],
        );
        assert_eq!(t, "NAME  PID\nm0    1\nm10   12345\n");
    }

    #[test]
    fn occupied_port_is_refused() {
        let held = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = held.local_addr().unwrap().port();
        let dir = Path::new("/tmp/c");
        let spec = |client: u16| MemberSpec {
            name: "m0".into(),
            client_url: format!("http://127.0.0.1:{client}"),
            peer_url: "http://127.0.0.1:0".into(),
            metrics_url: None,
            data_dir: dir.join("m0.data"),
            log: dir.join("m0.log"),
        };
        let err = check_ports_free(&[spec(port)]).unwrap_err().to_string();
        assert!(err.contains(&format!("port {port}")), "{err}");
        drop(held);
    }
}
