//! End-to-end test harness: starts an etcd-compatible server binary as a child process on a
//! fresh data dir and free loopback ports, waits for it to be healthy, and kills it on drop.
//! It also runs `etcdctl` against it and normalizes outputs so two servers can be compared.
//!
//! The server under test is `OXCD_TEST_SERVER` if set (e.g. `/usr/bin/etcd` to check the tests
//! against the reference), else `OXCD_BIN`, else the `oxcd` binary of this workspace's target dir
//! (built with `cargo build -p oxcd` when missing). It is only ever given etcd's own flags.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub mod cluster;
pub mod linearizability;

/// The reference implementation, used by the differential and data-dir tests.
pub const ETCD_BIN: &str = "/usr/bin/etcd";
pub const ETCDCTL_BIN: &str = "/usr/bin/etcdctl";

/// How long a server may take from spawn to healthy. Generous: the machine is shared.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Path of the server binary under test (see the crate docs for how it is chosen).
pub fn server_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        for var in ["OXCD_TEST_SERVER", "OXCD_BIN"] {
            if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
                let p = PathBuf::from(p);
                assert!(p.exists(), "{var}={} does not exist", p.display());
                return p;
            }
        }
        let bin = default_oxcd_bin();
        if !bin.exists() {
            build_oxcd(&bin);
        }
        bin
    })
    .clone()
}

/// `<target>/debug/oxcd`, found from this test executable's own location
/// (`<target>/debug/deps/<test>-<hash>`).
fn default_oxcd_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe
        .parent()
        .expect("test exe has a parent dir")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join("oxcd")
}

fn build_oxcd(bin: &Path) {
    // The binary must land where we look for it: the target dir two levels above it.
    let target_dir = bin
        .parent()
        .and_then(Path::parent)
        .expect("oxcd path has a target dir");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut child = Command::new(cargo)
        .args(["build", "-p", "oxcd"])
        .env("CARGO_TARGET_DIR", target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .spawn()
        .expect("run cargo build -p oxcd");
    // Bounded: a build that cannot get the target dir lock must not hang the suite.
    let deadline = Instant::now() + Duration::from_secs(15 * 60);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for cargo") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`cargo build -p oxcd` did not finish in 15 minutes; build it first or set OXCD_BIN");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        status.success() && bin.exists(),
        "`cargo build -p oxcd` failed ({status}); set OXCD_BIN or OXCD_TEST_SERVER to a server binary"
    );
}

/// True when the server under test is etcd itself (judged by the binary's file name).
pub fn server_is_etcd() -> bool {
    is_etcd(&server_bin())
}

pub fn is_etcd(bin: &Path) -> bool {
    bin.file_name().is_some_and(|n| n == "etcd")
}

/// True when the reference etcd is installed; tests that need it say loudly when it is not.
pub fn etcd_available() -> bool {
    Path::new(ETCD_BIN).exists()
}

/// A loopback port nobody listens on right now. Ports handed out by this process are never
/// handed out twice, so concurrently starting servers in one test binary cannot collide.
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(Default::default);
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local_addr").port();
        if given.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// How the server is told its settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigVia {
    /// `--name`, `--data-dir`, ... on the command line.
    Flags,
    /// `ETCD_NAME`, `ETCD_DATA_DIR`, `ETCD_LISTEN_CLIENT_URLS`, ... in the environment.
    Env,
}

/// Everything needed to (re)start one single-member server.
#[derive(Clone, Debug)]
pub struct ServerSpec {
    pub bin: PathBuf,
    pub name: String,
    pub data_dir: PathBuf,
    pub client_port: u16,
    pub peer_port: u16,
    /// Extra etcd flags, e.g. `["--max-txn-ops", "2"]`.
    pub extra_args: Vec<String>,
    pub via: ConfigVia,
    /// Membership flags for a member of a multi-member cluster; `None`: a cluster of one.
    pub cluster: Option<ClusterFlags>,
    /// Where the member listens for peers when that differs from the advertised peer port (a
    /// fault-injecting proxy sits on the advertised one).
    pub peer_listen_port: Option<u16>,
}

#[derive(Clone, Debug)]
pub struct ClusterFlags {
    /// `--initial-cluster`, e.g. `m0=http://127.0.0.1:P0,m1=...`.
    pub initial_cluster: String,
    pub token: String,
    /// `--initial-cluster-state existing`: the member joins a running cluster.
    pub existing: bool,
}

impl ServerSpec {
    pub fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    /// The etcd settings as (flag name, value) pairs.
    fn settings(&self) -> Vec<(&'static str, String)> {
        vec![
            ("name", self.name.clone()),
            ("data-dir", self.data_dir.display().to_string()),
            ("listen-client-urls", self.client_url()),
            ("advertise-client-urls", self.client_url()),
            (
                "listen-peer-urls",
                format!(
                    "http://127.0.0.1:{}",
                    self.peer_listen_port.unwrap_or(self.peer_port)
                ),
            ),
            ("initial-advertise-peer-urls", self.peer_url()),
            (
                "initial-cluster",
                match &self.cluster {
                    Some(c) => c.initial_cluster.clone(),
                    None => format!("{}={}", self.name, self.peer_url()),
                },
            ),
            (
                "initial-cluster-state",
                match &self.cluster {
                    Some(c) if c.existing => "existing".into(),
                    _ => "new".into(),
                },
            ),
            (
                "initial-cluster-token",
                match &self.cluster {
                    Some(c) => c.token.clone(),
                    None => format!("oxcd-test-{}", self.peer_port),
                },
            ),
            ("log-level", "warn".into()),
        ]
    }

    /// The command that runs this server; stdout and stderr go to `log`.
    pub fn command(&self, log: &Path) -> Command {
        let mut cmd = Command::new(&self.bin);
        // A setting inherited from the test runner's environment must not leak in.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(k);
            }
        }
        for (flag, value) in self.settings() {
            match self.via {
                ConfigVia::Flags => {
                    cmd.arg(format!("--{flag}={value}"));
                }
                ConfigVia::Env => {
                    cmd.env(
                        format!("ETCD_{}", flag.to_uppercase().replace('-', "_")),
                        value,
                    );
                }
            }
        }
        cmd.args(&self.extra_args);
        let out = fs::File::create(log).expect("create server log");
        let err = out.try_clone().expect("clone log handle");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        cmd
    }
}

/// A running server process. Dropping it kills the process (SIGKILL, by its own PID) and
/// removes its temp dirs.
pub struct Server {
    spec: ServerSpec,
    child: Option<Child>,
    log: PathBuf,
    run: usize,
    // Data and logs live in separate temp dirs so the data dir holds only the server's files.
    _data_tmp: Option<TempDir>,
    log_tmp: TempDir,
}

impl Server {
    /// A server with default settings on a fresh data dir, healthy on return.
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// Like [`Server::start`], with extra etcd flags.
    pub fn start_with(extra_args: &[&str]) -> Server {
        let mut s = Server::spawn_new(&server_bin(), extra_args, ConfigVia::Flags);
        s.wait_healthy(START_TIMEOUT);
        s
    }

    /// Spawns `bin` on a fresh data dir and free ports without waiting for it.
    pub fn spawn_new(bin: &Path, extra_args: &[&str], via: ConfigVia) -> Server {
        let data_tmp = tempfile::Builder::new()
            .prefix("oxcd-test-data")
            .tempdir()
            .expect("temp data dir");
        let spec = ServerSpec {
            bin: bin.to_path_buf(),
            name: "node1".into(),
            data_dir: data_tmp.path().join("data"),
            client_port: free_port(),
            peer_port: free_port(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            via,
            cluster: None,
            peer_listen_port: None,
        };
        Server::spawn(spec, Some(data_tmp))
    }

    /// Spawns the server described by `spec`, without waiting for it. `data_tmp` (if any) is
    /// kept alive as long as the server handle.
    pub fn spawn(spec: ServerSpec, data_tmp: Option<TempDir>) -> Server {
        let log_tmp = tempfile::Builder::new()
            .prefix("oxcd-test-log")
            .tempdir()
            .expect("temp log dir");
        let log = log_tmp.path().join("server.0.log");
        let child = spec
            .command(&log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", spec.bin.display()));
        Server {
            spec,
            child: Some(child),
            log,
            run: 0,
            _data_tmp: data_tmp,
            log_tmp,
        }
    }

    pub fn spec(&self) -> &ServerSpec {
        &self.spec
    }

    /// `127.0.0.1:<client port>`, as etcdctl and etcd-client take it.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.spec.client_port)
    }

    pub fn client_url(&self) -> String {
        self.spec.client_url()
    }

    pub fn data_dir(&self) -> &Path {
        &self.spec.data_dir
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the server wrote to stdout and stderr so far (all of its current run).
    pub fn output(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Polls the process: `Some(status)` once it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("try_wait on server"))
    }

    /// Blocks until `GET /health` says healthy; panics with the server's output if it exits or
    /// `timeout` passes first.
    pub fn wait_healthy(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                panic!(
                    "server {} exited ({status}) before becoming healthy; its output:\n{}",
                    self.spec.bin.display(),
                    self.output()
                );
            }
            let last = match http_get(self.spec.client_port, "/health") {
                Ok((200, body)) if body.contains(r#""health":"true""#) => return,
                Ok((code, body)) => format!("HTTP {code}: {body}"),
                Err(e) => e,
            };
            if Instant::now() > deadline {
                panic!(
                    "server {} not healthy after {timeout:?} (last /health: {last}); its output:\n{}",
                    self.spec.bin.display(),
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// For a server that must refuse to start: waits up to `timeout` for it to exit, checks
    /// that it failed, and returns its output for the caller to check the reason. `what`
    /// names the case in panic messages.
    pub fn expect_refused(&mut self, timeout: Duration, what: &str) -> String {
        let status = self
            .wait_exit(timeout)
            .unwrap_or_else(|| panic!("{what}: still running; output:\n{}", self.output()));
        let output = self.output();
        assert!(!status.success(), "{what}: exited {status}:\n{output}");
        output
    }

    /// SIGKILL, as a crash would: no chance to flush anything.
    pub fn kill9(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        self.wait_exit(Duration::from_secs(10))
            .expect("server survived SIGKILL for 10s")
    }

    /// SIGTERM, then waits up to `timeout`. `None` if it is still running (it is then killed).
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.signal(libc::SIGTERM);
        let status = self.wait_exit(timeout);
        if status.is_none() {
            self.kill9();
        }
        status
    }

    /// Sends `sig` to the server's own PID (only if it has not been reaped yet).
    pub fn signal(&mut self, sig: i32) {
        if self.try_wait().is_some() {
            return;
        }
        if let Some(pid) = self.pid() {
            // SAFETY: plain syscall on the PID of our own, not yet reaped, child.
            unsafe {
                libc::kill(pid as libc::pid_t, sig);
            }
        }
    }

    /// Starts the same server again (same data dir, ports and flags) once the previous
    /// process has exited, and waits until it is healthy.
    pub fn restart(&mut self) {
        self.respawn();
        self.wait_healthy(START_TIMEOUT);
    }

    /// Starts the server again from its (possibly changed, see [`Server::spec_mut`]) spec once
    /// the previous process has exited, without waiting for it.
    pub fn respawn(&mut self) {
        if self.try_wait().is_none() {
            panic!("respawn() called while the server is still running");
        }
        // One log file per run, so output() shows the current run only.
        self.run += 1;
        self.log = self.log_tmp.path().join(format!("server.{}.log", self.run));
        self.child = Some(
            self.spec
                .command(&self.log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot restart {}: {e}", self.spec.bin.display())),
        );
    }

    /// The spec the next [`Server::respawn`] starts from.
    pub fn spec_mut(&mut self) -> &mut ServerSpec {
        &mut self.spec
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// One HTTP/1.1 GET on loopback; returns (status code, body). Bounded by short timeouts.
pub fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.set_write_timeout(Some(Duration::from_secs(5))).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("malformed response: {raw:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status code in {head:?}"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((code, body))
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// What one etcdctl run printed.
#[derive(Debug, Clone)]
pub struct CtlOutput {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CtlOutput {
    /// The stdout, or a panic that shows both streams.
    #[track_caller]
    pub fn ok(&self) -> &str {
        assert!(self.success, "etcdctl failed: {self:#?}");
        &self.stdout
    }

    /// stdout parsed as JSON.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.ok())
            .unwrap_or_else(|e| panic!("etcdctl output is not JSON ({e}): {self:#?}"))
    }

    /// Every `Error: ...` line of stderr (which also carries client log lines with
    /// timestamps), joined; empty when there is none. For transcripts that compare outputs.
    pub fn error_lines(&self) -> String {
        self.stderr
            .lines()
            .filter(|l| l.starts_with("Error:"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The `Error: ...` line etcdctl prints on failure; panics if the command succeeded.
    #[track_caller]
    pub fn error(&self) -> String {
        assert!(!self.success, "etcdctl should have failed: {self:#?}");
        self.stderr
            .lines()
            .find_map(|l| l.strip_prefix("Error: "))
            .unwrap_or_else(|| panic!("no `Error:` line from etcdctl: {self:#?}"))
            .trim()
            .to_string()
    }
}

/// Runs `etcdctl --endpoints=<endpoint> <args>` (API v3) with `stdin` fed in, bounded in time.
pub fn etcdctl(endpoint: &str, args: &[&str], stdin: Option<&str>) -> CtlOutput {
    let mut cmd = Command::new(ETCDCTL_BIN);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ETCDCTL_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .arg("--dial-timeout=5s")
        .arg("--command-timeout=10s")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run etcdctl");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("etcdctl stdin");
        pipe.write_all(input.as_bytes())
            .expect("write etcdctl stdin");
    }
    // Read both pipes on threads so a chatty etcdctl cannot block on a full pipe.
    let mut out_pipe = child.stdout.take().expect("stdout pipe");
    let mut err_pipe = child.stderr.take().expect("stderr pipe");
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out_pipe.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait etcdctl") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("etcdctl {args:?} did not finish within 30s");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    CtlOutput {
        success: status.success(),
        code: status.code(),
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

/// Replaces the value of every `"cluster_id"`, `"member_id"` and `"raft_term"` field in
/// etcdctl JSON output with `0`: those legitimately differ between two clusters, nothing else
/// may (revisions included).
pub fn normalize_ids(text: &str) -> String {
    let mut out = text.to_string();
    for field in ["\"cluster_id\":", "\"member_id\":", "\"raft_term\":"] {
        let mut result = String::with_capacity(out.len());
        let mut rest = out.as_str();
        while let Some(pos) = rest.find(field) {
            let after = pos + field.len();
            result.push_str(&rest[..after]);
            let tail = &rest[after..];
            let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
            result.push('0');
            rest = &tail[digits..];
        }
        result.push_str(rest);
        out = result;
    }
    out
}

/// A stable fingerprint of a directory tree: relative path → (size, content hash) for files,
/// and a marker for directories. Used to prove a refused data dir was left untouched.
pub fn dir_fingerprint(root: &Path) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    fingerprint_into(root, root, &mut map);
    map
}

fn fingerprint_into(root: &Path, dir: &Path, map: &mut BTreeMap<String, String>) {
    let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()));
    for entry in entries {
        let entry = entry.expect("dir entry");
        let path = entry.path();
        let rel = path
            .strip_prefix(root)
            .expect("under root")
            .display()
            .to_string();
        let meta = fs::symlink_metadata(&path).expect("metadata");
        if meta.is_dir() {
            map.insert(rel, "dir".into());
            fingerprint_into(root, &path, map);
        } else {
            let bytes = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            map.insert(
                rel,
                format!("{} bytes, fnv1a {:016x}", bytes.len(), fnv1a(&bytes)),
            );
        }
    }
}

/// FNV-1a 64: enough to detect any change in a file between two listings.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_ids_rewrites_only_the_three_fields() {
        let s = r#"{"header":{"cluster_id":1511,"member_id":1366,"revision":3,"raft_term":2},"count":1}"#;
        assert_eq!(
            normalize_ids(s),
            r#"{"header":{"cluster_id":0,"member_id":0,"revision":3,"raft_term":0},"count":1}"#
        );
    }

    #[test]
    fn dechunk_joins_chunks() {
        assert_eq!(dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
    }

    #[test]
    fn free_ports_are_distinct() {
        let a = free_port();
        let b = free_port();
        assert_ne!(a, b);
    }
}
