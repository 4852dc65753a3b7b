//! `--auto-compaction-mode` / `--auto-compaction-retention` as etcd 3.4 has them: the leader
//! compacts history older than the retention on its own, through the same path as a client's
//! Compact; a retention etcd cannot parse stops start-up with etcd's error.
//!
//! Revision mode looks only every 5 minutes, too slow for an end-to-end test; its schedule is
//! covered by the unit tests in `crates/oxcd/src/auto_compaction.rs`.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, Error, GetOptions};
use oxcd_tests::{server_bin, ConfigVia, Server};

const COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";

async fn connect(s: &Server) -> Client {
    common::connect_with(s, Duration::from_secs(10)).await
}

/// `Ok(value)` of `key` at `rev`, or the gRPC error message.
async fn get_at(c: &mut Client, key: &str, rev: i64) -> Result<Vec<u8>, String> {
    match c.get(key, Some(GetOptions::new().with_revision(rev))).await {
        Ok(r) => Ok(r
            .kvs()
            .first()
            .map(|kv| kv.value().to_vec())
            .unwrap_or_default()),
        Err(Error::GRpcStatus(st)) => Err(st.message().to_string()),
        Err(e) => panic!("get {key} at {rev}: {e}"),
    }
}

/// Polls until a read at `rev` fails as compacted; returns when that was first seen.
async fn wait_compacted(c: &mut Client, key: &str, rev: i64, within: Duration) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        match get_at(c, key, rev).await {
            Err(msg) if msg == COMPACTED => return Instant::now(),
            Err(msg) => panic!("get {key} at {rev}: unexpected error {msg:?}"),
            Ok(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "revision {rev} still readable {within:?} later: no auto-compaction"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_retention_compacts_old_history_and_keeps_recent_history() {
    let s = Server::start_with(&[
        "--auto-compaction-mode=periodic",
        "--auto-compaction-retention=2s",
    ]);
    let mut c = connect(&s).await;
    let old = c.put("old", "v1", None).await.unwrap();
    let old_rev = old.header().unwrap().revision();
    c.put("old", "v2", None).await.unwrap();
    assert_eq!(get_at(&mut c, "old", old_rev).await.unwrap(), b"v1");

    // A steady writer: every revision with the time its put was acknowledged.
    let written: Arc<Mutex<Vec<(Instant, i64)>>> = Arc::default();
    let writer = {
        let mut kv = c.kv_client();
        let written = written.clone();
        tokio::spawn(async move {
            for i in 0u64.. {
                let r = kv.put("tick", i.to_string(), None).await.expect("put tick");
                let rev = r.header().unwrap().revision();
                written.lock().unwrap().push((Instant::now(), rev));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // Compacted within one retention (2s) and one sample interval (0.2s), with slack for a
    // loaded machine.
    wait_compacted(&mut c, "old", old_rev, Duration::from_secs(20)).await;

    // Compaction goes to the revision of one retention ago: what was written in the last
    // second is still there.
    let recent = {
        let w = written.lock().unwrap();
        let cutoff = Instant::now() - Duration::from_secs(1);
        *w.iter()
            .find(|(at, _)| *at >= cutoff)
            .expect("the writer wrote nothing in the last second")
    };
    get_at(&mut c, "tick", recent.1).await.unwrap_or_else(|e| {
        panic!(
            "revision {} written {:?} ago is gone ({e}); the retention is 2s",
            recent.1,
            recent.0.elapsed()
        )
    });

    // It keeps compacting, and never sooner than a retention after the write: take the next
    // acknowledged revision and watch it go.
    let (written_at, rev) = loop {
        let next = written
            .lock()
            .unwrap()
            .iter()
            .copied()
            .find(|(_, r)| *r > recent.1);
        if let Some(n) = next {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let gone = wait_compacted(&mut c, "tick", rev, Duration::from_secs(20)).await;
    let lived = gone.duration_since(written_at);
    assert!(
        lived >= Duration::from_millis(1500),
        "revision {rev} compacted {lived:?} after it was written; the retention is 2s"
    );

    writer.abort();
    // The latest revision is always readable.
    let r = c.get("tick", None).await.unwrap();
    assert_eq!(r.kvs().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revision_mode_does_not_compact_before_its_first_check() {
    // Revision mode looks every 5 minutes: right after start-up everything is still there.
    let s = Server::start_with(&[
        "--auto-compaction-mode=revision",
        "--auto-compaction-retention=10",
    ]);
    let mut c = connect(&s).await;
    let first = c
        .put("k", "0", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    for i in 1..30 {
        c.put("k", i.to_string(), None).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(get_at(&mut c, "k", first).await.unwrap(), b"0");
}

#[test]
fn an_unparsable_retention_stops_start_up_with_etcds_error() {
    for (args, expected) in [
        (
            vec!["--auto-compaction-retention=abc"],
            r#"error parsing CompactionRetention: time: invalid duration "abc""#,
        ),
        (
            vec!["--auto-compaction-retention=5x"],
            r#"error parsing CompactionRetention: time: unknown unit "x" in duration "5x""#,
        ),
        (
            vec![
                "--auto-compaction-mode=revision",
                "--auto-compaction-retention=1.5",
            ],
            r#"error parsing CompactionRetention: time: missing unit in duration "1.5""#,
        ),
    ] {
        let mut s = Server::spawn_new(&server_bin(), &args, ConfigVia::Flags);
        let output = s.expect_refused(Duration::from_secs(15), &format!("{args:?}"));
        assert!(
            output.contains(expected),
            "{args:?}: the output does not say {expected:?}:\n{output}"
        );
        assert!(
            !s.data_dir().exists(),
            "{args:?}: a data dir was created although start-up was refused"
        );
    }
}
