//! Backup and restore as etcd 3.4 does it: `etcdctl snapshot save FILE` against a running member,
//! then a restore of FILE into a new data dir (`oxcd snapshot restore`, or `etcdctl snapshot
//! restore` when the server under test is etcd itself), and a member started on that dir serves
//! the same keys at the same revision, with the same compaction point and leases.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oxcd_tests::{
    etcdctl, free_port, server_bin, server_is_etcd, ClusterFlags, ConfigVia, CtlOutput, Server,
    ServerSpec, ETCDCTL_BIN, START_TIMEOUT,
};
use serde_json::Value;

fn ctl(s: &Server, args: &[&str]) -> CtlOutput {
    etcdctl(&s.endpoint(), args, None)
}

fn json(s: &Server, args: &[&str]) -> Value {
    let mut full = args.to_vec();
    full.extend(["-w", "json"]);
    ctl(s, &full).json()
}

/// `etcdctl snapshot save` into `path`; checks it prints what it prints against etcd.
fn save(s: &Server, path: &Path) {
    let path = path.to_str().unwrap();
    let out = ctl(s, &["snapshot", "save", path]);
    assert_eq!(out.ok(), format!("Snapshot saved at {path}\n"), "{out:#?}");
    let len = std::fs::metadata(path).unwrap().len();
    // etcdctl keeps only a stream that ends in a sha256 trailer behind 512-byte blocks.
    assert_eq!(len % 512, 32, "snapshot of {len} bytes");
}

/// Where a restored member will live: its name, peer port and flags.
struct Restored {
    name: String,
    peer_port: u16,
    token: String,
    /// `--initial-cluster`; just this member unless set for a larger cluster.
    cluster: Option<String>,
    data_dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Restored {
    fn new(name: &str) -> Restored {
        let tmp = tempfile::Builder::new()
            .prefix("oxcd-test-restore")
            .tempdir()
            .unwrap();
        Restored {
            name: name.into(),
            peer_port: free_port(),
            token: "snapshot-restore".into(),
            cluster: None,
            data_dir: tmp.path().join("data"),
            _tmp: tmp,
        }
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    fn initial_cluster(&self) -> String {
        self.cluster
            .clone()
            .unwrap_or_else(|| format!("{}={}", self.name, self.peer_url()))
    }

    /// Runs the restore tool of the server under test; (success, stdout, stderr).
    fn restore(&self, file: &Path) -> (bool, String, String) {
        let mut cmd = if server_is_etcd() {
            let mut c = Command::new(ETCDCTL_BIN);
            c.env("ETCDCTL_API", "3");
            c
        } else {
            Command::new(server_bin())
        };
        cmd.args(["snapshot", "restore"])
            .arg(file)
            .arg(format!("--data-dir={}", self.data_dir.display()))
            .arg(format!("--name={}", self.name))
            .arg(format!("--initial-cluster={}", self.initial_cluster()))
            .arg(format!("--initial-cluster-token={}", self.token))
            .arg(format!("--initial-advertise-peer-urls={}", self.peer_url()))
            .stdin(Stdio::null());
        let out = cmd.output().expect("run snapshot restore");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Starts a member on the restored data dir with the flags it was restored with.
    fn start(self) -> Server {
        let mut s = self.spawn();
        s.wait_healthy(START_TIMEOUT);
        s
    }

    /// Starts it without waiting (a member of a larger cluster needs the others for a leader).
    fn spawn(self) -> Server {
        let spec = ServerSpec {
            bin: server_bin(),
            name: self.name.clone(),
            data_dir: self.data_dir.clone(),
            client_port: free_port(),
            peer_port: self.peer_port,
            extra_args: Vec::new(),
            via: ConfigVia::Flags,
            cluster: Some(ClusterFlags {
                initial_cluster: self.initial_cluster(),
                token: self.token.clone(),
                existing: false,
            }),
            peer_listen_port: None,
        };
        Server::spawn(spec, Some(self._tmp))
    }
}

fn revision(v: &Value) -> i64 {
    v["header"]["revision"]
        .as_i64()
        .unwrap_or_else(|| panic!("no header.revision in {v}"))
}

#[test]
fn restored_member_serves_the_same_data_at_the_same_revision() {
    let src = Server::start();
    ctl(&src, &["put", "k/a", "1"]).ok();
    let grant = ctl(&src, &["lease", "grant", "600"]);
    let lease = grant
        .ok()
        .split_whitespace()
        .nth(1)
        .expect("lease id in `lease grant` output")
        .to_string();
    ctl(&src, &["put", "k/b", "2", &format!("--lease={lease}")]).ok();
    ctl(&src, &["put", "k/a", "3"]).ok();
    ctl(&src, &["del", "k/b"]).ok();
    ctl(&src, &["put", "k/c", "4", &format!("--lease={lease}")]).ok();
    let compact_at = revision(&json(&src, &["get", "k/a"]));
    ctl(&src, &["compact", &compact_at.to_string()]).ok();
    ctl(&src, &["put", "k/d", "5"]).ok();
    let before = json(&src, &["get", "--prefix", "k/"]);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backup.db");
    save(&src, &file);

    let target = Restored::new("restored");
    let (ok, stdout, stderr) = target.restore(&file);
    assert!(ok, "restore failed:\n{stderr}");
    assert_eq!(stdout, "", "restore prints nothing on stdout");
    let dst = target.start();

    let after = json(&dst, &["get", "--prefix", "k/"]);
    assert_eq!(revision(&after), revision(&before));
    assert_eq!(after["kvs"], before["kvs"]);
    assert_eq!(after["count"], before["count"]);
    // The compaction point came along: below it is gone, at it is there.
    let below = ctl(&dst, &["get", "k/a", &format!("--rev={}", compact_at - 1)]);
    assert_eq!(
        below.error(),
        "etcdserver: mvcc: required revision has been compacted"
    );
    assert_eq!(
        ctl(&dst, &["get", "k/a", &format!("--rev={compact_at}")]).ok(),
        "k/a\n3\n"
    );
    // The lease, with the key still attached.
    let leases = ctl(&dst, &["lease", "list"]);
    assert!(leases.ok().contains(&lease), "{leases:#?}");
    let ttl = ctl(&dst, &["lease", "timetolive", &lease, "--keys"]);
    assert!(
        ttl.ok().contains("granted with TTL(600s)") && ttl.ok().contains("attached keys([k/c])"),
        "{ttl:#?}"
    );
    // A new cluster of the restored member only, writing on from the snapshot's revision.
    let members = ctl(&dst, &["member", "list"]);
    assert_eq!(members.ok().lines().count(), 1, "{members:#?}");
    assert!(members.ok().contains(", restored, "), "{members:#?}");
    let put = json(&dst, &["put", "k/e", "6"]);
    assert_eq!(revision(&put), revision(&before) + 1);
}

#[test]
fn corrupted_snapshot_and_busy_data_dir_are_refused() {
    let src = Server::start();
    for i in 0..20 {
        ctl(&src, &["put", &format!("key{i}"), &"v".repeat(100)]).ok();
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backup.db");
    save(&src, &file);

    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    let bad = dir.path().join("bad.db");
    std::fs::write(&bad, &bytes).unwrap();
    let target = Restored::new("m1");
    let (ok, _, stderr) = target.restore(&bad);
    assert!(!ok, "a corrupted snapshot was restored");
    let error = stderr
        .lines()
        .find_map(|l| l.strip_prefix("Error: "))
        .unwrap_or_else(|| panic!("no `Error:` line:\n{stderr}"));
    assert!(
        error.starts_with("expected sha256 [") && error.contains("], got ["),
        "{error}"
    );
    if !server_is_etcd() {
        // (etcd 3.4 has already created part of the dir when it finds out.)
        assert!(!target.data_dir.exists(), "refused restore left a data dir");
    }

    let busy = Restored::new("m1");
    std::fs::create_dir_all(&busy.data_dir).unwrap();
    std::fs::write(busy.data_dir.join("keep"), "mine").unwrap();
    let (ok, _, stderr) = busy.restore(&file);
    assert!(!ok, "restored into a non-empty dir");
    assert!(
        stderr.contains(&format!(
            "Error: data-dir \"{}\" exists",
            busy.data_dir.display()
        )),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_dir(&busy.data_dir).unwrap().count(),
        1,
        "the existing dir was changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_snapshot_streams_in_chunks_and_restores_whole() {
    const KEYS: usize = 4000;
    const VALUE: usize = 1024;
    let src = Server::start();
    let client = common::connect_with(&src, Duration::from_secs(10)).await;
    let mut tasks = Vec::new();
    for w in 0..8 {
        let mut kv = client.kv_client();
        tasks.push(tokio::spawn(async move {
            for i in (w..KEYS).step_by(8) {
                kv.put(format!("bulk/{i:06}"), vec![b'x'; VALUE], None)
                    .await
                    .expect("put");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let before = json(&src, &["get", "--prefix", "bulk/", "--keys-only"]);
    assert_eq!(before["count"], KEYS as i64);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big.db");
    let started = Instant::now();
    save(&src, &file);
    let took = started.elapsed();
    let size = std::fs::metadata(&file).unwrap().len();
    assert!(size > (KEYS * VALUE) as u64, "{size} bytes for {KEYS} keys");
    eprintln!("snapshot of {KEYS} keys: {size} bytes in {took:?}");

    let target = Restored::new("big");
    let started = Instant::now();
    let (ok, _, stderr) = target.restore(&file);
    assert!(ok, "restore failed:\n{stderr}");
    eprintln!("restore: {:?}", started.elapsed());
    let dst = target.start();
    let after = json(&dst, &["get", "--prefix", "bulk/", "--keys-only"]);
    assert_eq!(revision(&after), revision(&before));
    assert_eq!(after["kvs"], before["kvs"]);
}

/// (hash, compact revision) of member `s` at `rev`, through `etcdctl endpoint hashkv`.
fn hash_kv(s: &Server, rev: i64) -> (u64, i64) {
    let v = json(s, &["endpoint", "hashkv", &format!("--rev={rev}")]);
    let h = &v[0]["HashKV"];
    (
        h["hash"]
            .as_u64()
            .unwrap_or_else(|| panic!("no hash in {v}")),
        h["compact_revision"].as_i64().unwrap_or(0),
    )
}

#[test]
fn one_snapshot_restores_a_new_three_member_cluster() {
    let src = Server::start();
    for i in 0..50 {
        ctl(&src, &["put", &format!("k/{}", i % 20), &format!("v{i}")]).ok();
    }
    ctl(&src, &["del", "k/7"]).ok();
    let compact_at = revision(&json(&src, &["get", "k/1"])) - 5;
    ctl(&src, &["compact", &compact_at.to_string()]).ok();
    let at = revision(&json(&src, &["get", "k/1"]));
    let expected = hash_kv(&src, at);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backup.db");
    save(&src, &file);

    let mut targets: Vec<Restored> = ["r0", "r1", "r2"].into_iter().map(Restored::new).collect();
    let cluster = targets
        .iter()
        .map(|t| format!("{}={}", t.name, t.peer_url()))
        .collect::<Vec<_>>()
        .join(",");
    for t in &mut targets {
        t.cluster = Some(cluster.clone());
        let (ok, _, stderr) = t.restore(&file);
        assert!(ok, "restore of {} failed:\n{stderr}", t.name);
    }
    let mut members: Vec<Server> = targets.into_iter().map(Restored::spawn).collect();
    for m in &mut members {
        m.wait_healthy(START_TIMEOUT);
    }
    for m in &members {
        assert_eq!(
            hash_kv(m, at),
            expected,
            "member {} at revision {at}",
            m.endpoint()
        );
        let list = ctl(m, &["member", "list"]);
        assert_eq!(list.ok().lines().count(), 3, "{list:#?}");
    }
    // The new cluster writes on from the snapshot's revision, on every member.
    let put = json(&members[1], &["put", "k/new", "1"]);
    assert_eq!(revision(&put), at + 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    for m in &members {
        loop {
            let got = ctl(
                m,
                &["get", "k/new", "--consistency=s", "--print-value-only"],
            );
            if got.ok() == "1\n" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} never got k/new",
                m.endpoint()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
