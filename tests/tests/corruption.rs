//! The corruption checks (`--experimental-corrupt-check-time`,
//! `--experimental-initial-corrupt-check`): a member whose stored data changed behind raft's back
//! is found by the leader's periodic check, which raises the CORRUPT alarm on every member
//! (writes then fail with etcd's corrupt error), and is refused start-up by the initial check.
//! A healthy cluster under writes and compactions raises nothing.
//!
//! The store is corrupted by opening the stopped member's RocksDB with oxcd's own engine, so
//! that test runs against oxcd only; the healthy-cluster test runs against etcd as well.

use std::path::Path;
use std::time::{Duration, Instant};

use etcd_client::{Client, CompactionOptions, ConnectOptions};
use mvcc_store::{KvEngine, RocksEngine, WriteBatch};
use oxcd_tests::cluster::TestCluster;
use oxcd_tests::{etcdctl, server_is_etcd, Server, START_TIMEOUT};

const CHECK_EVERY: &str = "--experimental-corrupt-check-time=1s";
const CORRUPT: &str = "etcdserver: corrupt cluster";

/// (member id, leader id, revision) as the member at `endpoint` reports them.
fn status(endpoint: &str) -> (u64, u64, i64) {
    let v = etcdctl(endpoint, &["endpoint", "status", "-w", "json"], None).json();
    let s = &v[0]["Status"];
    (
        s["header"]["member_id"].as_u64().expect("member_id"),
        s["leader"].as_u64().expect("leader"),
        s["header"]["revision"].as_i64().expect("revision"),
    )
}

/// `etcdctl alarm list` on `endpoint`, one alarm a line.
fn alarms(endpoint: &str) -> Vec<String> {
    etcdctl(endpoint, &["alarm", "list"], None)
        .ok()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Replaces `from` by `to` (same length) inside the one engine record that holds it, directly in
/// the member's RocksDB: what a flipped bit on disk would do, unseen by raft.
fn corrupt_value(data_dir: &Path, from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let engine = RocksEngine::open(&data_dir.join("oxcd").join("kv")).expect("open the kv store");
    let mut hits = Vec::new();
    engine
        .scan_all(&mut |k, v| {
            if let Some(at) = v.windows(from.len()).position(|w| w == from) {
                let mut changed = v.to_vec();
                changed[at..at + to.len()].copy_from_slice(to);
                hits.push((k.to_vec(), changed));
            }
            true
        })
        .expect("scan the kv store");
    assert_eq!(hits.len(), 1, "{from:?} should be stored once");
    let mut batch = WriteBatch::default();
    for (k, v) in hits {
        batch.put(k, v);
    }
    engine.write(batch).expect("write the corrupted record");
    engine.flush().expect("flush");
}

#[test]
fn a_corrupted_follower_gets_the_corrupt_alarm_and_is_refused_start_up() {
    if server_is_etcd() {
        eprintln!("skipped: the store is corrupted through oxcd's storage engine");
        return;
    }
    let mut c = TestCluster::start(3, &[CHECK_EVERY]);
    let eps = c.endpoints();
    for i in 0..10 {
        etcdctl(
            &eps[0],
            &[
                "put",
                &format!("k{i:02}"),
                &format!("original-value-{i:02}"),
            ],
            None,
        )
        .ok();
    }
    let (_, leader, rev) = status(&eps[0]);
    let ids: Vec<u64> = eps.iter().map(|e| status(e).0).collect();
    let f = ids.iter().position(|id| *id != leader).expect("a follower");
    let l = ids.iter().position(|id| *id == leader).expect("the leader");
    let victim = ids[f];
    TestCluster::wait_for("the follower to apply every put", START_TIMEOUT, || {
        status(&eps[f]).2 == rev
    });
    // Healthy so far: a few check periods pass without an alarm.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(alarms(&eps[l]), Vec::<String>::new());

    assert!(
        c.members[f].terminate(Duration::from_secs(10)).is_some(),
        "the follower did not stop on SIGTERM"
    );
    corrupt_value(
        c.members[f].data_dir(),
        b"original-value-05",
        b"CORRUPTED-value05",
    );
    // Not `restart()`: that waits for /health, which the alarm may turn false first.
    let spec = c.members[f].spec().clone();
    c.members[f] = Server::spawn(spec.clone(), None);
    let restarted = Instant::now();

    // As etcd 3.4.23: the alarm names member 0 (etcdctl omits the zero id); the log names
    // the member blamed.
    let expected = "alarm:CORRUPT".to_string();
    TestCluster::wait_for("the CORRUPT alarm on the leader", START_TIMEOUT, || {
        alarms(&eps[l]) == [expected.clone()]
    });
    eprintln!(
        "CORRUPT alarm for {victim:x} listed {:?} after the restart",
        restarted.elapsed()
    );
    // Raised through raft: every member lists exactly that alarm.
    for e in &eps {
        TestCluster::wait_for("the CORRUPT alarm on every member", START_TIMEOUT, || {
            alarms(e) == [expected.clone()]
        });
    }
    let leader_log = c.members[l].output();
    assert!(
        leader_log.contains("same compact revision then hashes must match")
            && leader_log.contains(&format!("{victim:x}")),
        "the leader did not log why it blamed {victim:x}:\n{leader_log}"
    );
    for e in &eps {
        let put = etcdctl(e, &["put", "after", "x"], None);
        assert_eq!(put.error(), CORRUPT, "a write on {e} under CORRUPT");
    }
    // Reads still work (the healthy members' data).
    let got = etcdctl(&eps[l], &["get", "k05", "--print-value-only"], None);
    assert_eq!(got.ok().trim(), "original-value-05");

    // The initial check refuses to start the corrupted member.
    assert!(c.members[f].terminate(Duration::from_secs(10)).is_some());
    let mut checked = spec;
    checked
        .extra_args
        .push("--experimental-initial-corrupt-check=true".into());
    let mut s = Server::spawn(checked, None);
    let out = s.expect_refused(START_TIMEOUT, "started despite corrupt data");
    assert!(
        out.contains(&format!("{victim:x} found data inconsistency with peers")),
        "no inconsistency error in the output:\n{out}"
    );
}

async fn connect(endpoint: &str) -> Client {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(10));
    tokio::time::timeout(
        Duration::from_secs(15),
        Client::connect([endpoint.to_string()], Some(opts)),
    )
    .await
    .expect("connect timed out")
    .expect("connect")
}

/// Passes of the periodic check a member logged (at info level), and how many of them compared
/// hashes with both peers. etcd and oxcd log the same message; field names differ in style.
fn passes(log: &str) -> (usize, usize) {
    let lines = log
        .lines()
        .filter(|l| l.contains("finished peer corruption check"));
    let (mut all, mut both) = (0, 0);
    for l in lines {
        all += 1;
        if l.contains("number_of_peers_checked\":2") || l.contains("number-of-peers-checked\":2") {
            both += 1;
        }
    }
    (all, both)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_cluster_under_writes_and_compactions_raises_no_alarm() {
    let mut c = TestCluster::start(3, &[CHECK_EVERY, "--logger=zap", "--log-level=info"]);
    let eps = c.endpoints();
    let mut clients = Vec::new();
    for e in &eps {
        clients.push(connect(e).await);
    }
    // Writes on every member, and a compaction now and then, for several check periods.
    let started = Instant::now();
    let mut n = 0u64;
    let mut last_rev = 0;
    while started.elapsed() < Duration::from_secs(6) {
        let i = (n % 3) as usize;
        let r = clients[i]
            .put(format!("key-{}", n % 50), format!("value-{n}"), None)
            .await
            .unwrap_or_else(|e| panic!("put {n} on member {i}: {e}"));
        last_rev = r.header().expect("header").revision();
        if n % 100 == 99 {
            clients[i]
                .compact(last_rev - 20, Some(CompactionOptions::new()))
                .await
                .expect("compact");
        }
        n += 1;
    }
    // And a few quiet periods, in which every member has the same revision to compare.
    tokio::time::sleep(Duration::from_secs(3)).await;
    eprintln!("{n} puts up to revision {last_rev}");

    let listed: Vec<Vec<String>> = eps.iter().map(|e| alarms(e)).collect();
    assert!(
        listed.iter().all(Vec::is_empty),
        "alarms on a healthy cluster: {listed:?}"
    );
    let leader = status(&eps[0]).1;
    let (mut total, mut leader_log) = ((0, 0), String::new());
    for (i, e) in eps.iter().enumerate() {
        let log = c.members[i].output();
        assert!(
            !log.contains("hashes must match") && !log.contains("found hash mismatch"),
            "member {i} found a mismatch:\n{log}"
        );
        if status(e).0 == leader {
            total = passes(&log);
            leader_log = log;
        }
    }
    // The leader did check: at least a pass per couple of seconds, some with both peers.
    eprintln!("leader's passes: {} ({} with both peers)", total.0, total.1);
    let hash_lines: Vec<&str> = leader_log
        .lines()
        .filter(|l| l.contains("hash") || l.contains("corruption"))
        .collect();
    assert!(
        total.0 >= 4 && total.1 >= 1,
        "too few corruption check passes: {total:?}; the leader logged:\n{}",
        hash_lines.join("\n")
    );
    // A member restarted with the initial check finds its peers in agreement.
    let f = (0..3).find(|&i| status(&eps[i]).0 != leader).unwrap();
    assert!(c.members[f].terminate(Duration::from_secs(10)).is_some());
    let mut spec = c.members[f].spec().clone();
    spec.extra_args
        .push("--experimental-initial-corrupt-check=true".into());
    c.members[f] = Server::spawn(spec, None);
    c.members[f].wait_healthy(START_TIMEOUT);
    let out = c.members[f].output();
    assert!(
        out.contains("initial corruption checking passed; no corruption"),
        "{out}"
    );
}
