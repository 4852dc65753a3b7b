//! Watch through the `etcd-client` crate: every watcher's event sequence must be exactly the
//! store's history from its start revision on — ordered, no duplicates, no gaps — for live,
//! historic, resumed and slow watchers; plus etcd's answers for compacted and future starts.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{
    Client, CompactionOptions, EventType, PutOptions, Txn, TxnOp, WatchFilterType, WatchOptions,
    WatchStream,
};
use oxcd_tests::{http_get, Server};

async fn connect(s: &Server) -> Client {
    common::connect_with(s, Duration::from_secs(20)).await
}

/// One change as a watcher sees it: (revision, PUT/DELETE, key, value).
type Change = (i64, &'static str, String, String);

fn changes(resp: &etcd_client::WatchResponse) -> Vec<Change> {
    resp.events()
        .iter()
        .map(|ev| {
            let kv = ev.kv().expect("event has a kv");
            (
                kv.mod_revision(),
                match ev.event_type() {
                    EventType::Put => "PUT",
                    EventType::Delete => "DELETE",
                },
                kv.key_str().unwrap().to_string(),
                kv.value_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Opens a watch and returns the stream once its `created` response arrived.
async fn open(c: &mut Client, key: &str, opts: WatchOptions) -> WatchStream {
    let mut stream = c.watch(key, Some(opts)).await.expect("watch");
    let first = next(&mut stream).await;
    assert!(first.created(), "first response is `created`: {first:?}");
    stream
}

async fn next(stream: &mut WatchStream) -> etcd_client::WatchResponse {
    tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("watch response within 20 s")
        .expect("watch stream error")
        .expect("watch stream ended")
}

/// Reads until the watcher has seen `last_rev`; checks that revisions only grow.
async fn collect_until(stream: &mut WatchStream, last_rev: i64, out: &mut Vec<Change>) {
    while out.last().map_or(0, |c| c.0) < last_rev {
        let resp = next(stream).await;
        assert!(!resp.canceled(), "watcher canceled: {resp:?}");
        let got = changes(&resp);
        if let (Some(prev), Some(first)) = (out.last(), got.first()) {
            assert!(
                first.0 > prev.0,
                "revision {} delivered after {}",
                first.0,
                prev.0
            );
        }
        out.extend(got);
    }
}

/// Writers record what each acknowledged request changed, keyed by its revision.
type History = BTreeMap<i64, Vec<(&'static str, String, String)>>;

async fn write_load(mut c: Client, writer: usize, ops: usize) -> History {
    let mut history = History::new();
    for i in 0..ops {
        let key = format!("w/{}", (writer * 7 + i) % 10);
        let value = format!("{writer}-{i}");
        match i % 5 {
            // A txn: two changes at one revision, in request order.
            3 => {
                let other = format!("w/t{writer}");
                let r = c
                    .txn(Txn::new().and_then(vec![
                        TxnOp::put(key.clone(), value.clone(), None),
                        TxnOp::put(other.clone(), value.clone(), None),
                    ]))
                    .await
                    .expect("txn");
                let rev = r.header().unwrap().revision();
                history.insert(
                    rev,
                    vec![("PUT", key, value.clone()), ("PUT", other, value)],
                );
            }
            4 => {
                let r = c.delete(key.clone(), None).await.expect("delete");
                if r.deleted() > 0 {
                    let rev = r.header().unwrap().revision();
                    history.insert(rev, vec![("DELETE", key, String::new())]);
                }
            }
            _ => {
                let r = c.put(key.clone(), value.clone(), None).await.expect("put");
                history.insert(r.header().unwrap().revision(), vec![("PUT", key, value)]);
            }
        }
    }
    history
}

fn flatten(history: &History, from_rev: i64) -> Vec<Change> {
    history
        .range(from_rev..)
        .flat_map(|(rev, evs)| {
            evs.iter()
                .map(move |(t, k, v)| (*rev, *t, k.clone(), v.clone()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_see_exactly_the_history_live_historic_and_resumed() {
    let server = Server::start();
    let mut c = connect(&server).await;
    let start_rev = c
        .put("w/seed", "0", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();

    // A live watcher (from now), one replaying from the first revision, one that will drop
    // its stream halfway and resume from the last revision it saw + 1.
    let mut live = open(&mut c, "w/", WatchOptions::new().with_prefix()).await;
    let mut historic = open(
        &mut c,
        "w/",
        WatchOptions::new().with_prefix().with_start_revision(1),
    )
    .await;
    let mut resumed = open(&mut c, "w/", WatchOptions::new().with_prefix()).await;

    const WRITERS: usize = 4;
    const OPS: usize = 150;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        writers.push(tokio::spawn(write_load(connect(&server).await, w, OPS)));
    }

    // The resumed watcher reads a while, then drops its stream mid-load.
    let mut resumed_seen = Vec::new();
    collect_until(&mut resumed, start_rev + 40, &mut resumed_seen).await;
    drop(resumed);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let resume_from = resumed_seen.last().unwrap().0 + 1;
    let mut resumed = open(
        &mut c,
        "w/",
        WatchOptions::new()
            .with_prefix()
            .with_start_revision(resume_from),
    )
    .await;

    let mut history = History::new();
    history.insert(
        start_rev,
        vec![("PUT", "w/seed".to_string(), "0".to_string())],
    );
    for w in writers {
        history.extend(w.await.unwrap());
    }
    let last = *history.keys().last().unwrap();
    let writes = history.len();
    assert!(writes > WRITERS * OPS / 2, "{writes} revisions written");

    let mut live_seen = Vec::new();
    collect_until(&mut live, last, &mut live_seen).await;
    assert_eq!(live_seen, flatten(&history, start_rev + 1), "live watcher");

    let mut historic_seen = Vec::new();
    collect_until(&mut historic, last, &mut historic_seen).await;
    assert_eq!(historic_seen, flatten(&history, 1), "historic watcher");

    collect_until(&mut resumed, last, &mut resumed_seen).await;
    assert_eq!(
        resumed_seen,
        flatten(&history, start_rev + 1),
        "watcher resumed from revision {resume_from}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_and_future_start_revisions() {
    let server = Server::start();
    let mut c = connect(&server).await;
    for i in 0..10 {
        c.put("k", format!("v{i}"), None).await.unwrap();
    }
    c.compact(6, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();

    // Below the compaction point: created, then canceled with the compact revision.
    let mut s = open(&mut c, "k", WatchOptions::new().with_start_revision(3)).await;
    let resp = next(&mut s).await;
    assert!(resp.canceled(), "{resp:?}");
    assert_eq!(resp.compact_revision(), 6);
    assert!(resp.events().is_empty());

    // At the compaction point: still served, from what it kept.
    let mut s = open(&mut c, "k", WatchOptions::new().with_start_revision(6)).await;
    let mut seen = Vec::new();
    collect_until(&mut s, 11, &mut seen).await;
    assert_eq!(
        seen.iter().map(|c| c.0).collect::<Vec<_>>(),
        vec![6, 7, 8, 9, 10, 11]
    );

    // In the future: nothing until the store gets there, then from exactly that revision.
    let mut s = open(&mut c, "k", WatchOptions::new().with_start_revision(14)).await;
    for i in 0..2 {
        c.put("k", format!("f{i}"), None).await.unwrap();
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), s.message())
            .await
            .is_err(),
        "no event before revision 14"
    );
    c.put("k", "f2", None).await.unwrap();
    c.put("k", "f3", None).await.unwrap();
    let mut seen = Vec::new();
    collect_until(&mut s, 15, &mut seen).await;
    assert_eq!(
        seen,
        vec![
            (14, "PUT", "k".into(), "f2".into()),
            (15, "PUT", "k".into(), "f3".into())
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_prev_kv_cancel_and_progress() {
    let server = Server::start();
    let mut c = connect(&server).await;
    c.put("a", "1", None).await.unwrap(); // rev 2

    let mut deletes = open(
        &mut c,
        "a",
        WatchOptions::new()
            .with_prev_key()
            .with_filters([WatchFilterType::NoPut]),
    )
    .await;
    let mut puts = open(
        &mut c,
        "a",
        WatchOptions::new().with_filters([WatchFilterType::NoDelete]),
    )
    .await;
    let mut puts_with_prev = open(
        &mut c,
        "a",
        WatchOptions::new()
            .with_prev_key()
            .with_filters([WatchFilterType::NoDelete]),
    )
    .await;
    c.put("a", "2", Some(PutOptions::new())).await.unwrap(); // rev 3
    c.delete("a", None).await.unwrap(); // rev 4

    // The put did not ask for its old value; the watcher that wants it still gets it.
    let resp = next(&mut puts_with_prev).await;
    assert_eq!(changes(&resp), vec![(3, "PUT", "a".into(), "2".into())]);
    let prev = resp.events()[0].prev_kv().expect("prev_kv asked for");
    assert_eq!(
        (
            prev.value_str().unwrap(),
            prev.mod_revision(),
            prev.version()
        ),
        ("1", 2, 1)
    );

    let resp = next(&mut deletes).await;
    assert_eq!(
        changes(&resp),
        vec![(4, "DELETE", "a".into(), String::new())]
    );
    let prev = resp.events()[0].prev_kv().expect("prev_kv asked for");
    assert_eq!((prev.value_str().unwrap(), prev.mod_revision()), ("2", 3));

    let resp = next(&mut puts).await;
    assert_eq!(changes(&resp), vec![(3, "PUT", "a".into(), "2".into())]);
    assert!(
        resp.events()[0].prev_kv().is_none(),
        "prev_kv not asked for"
    );

    // Cancel: answered with canceled for that id; then nothing more arrives for it.
    let id = resp.watch_id();
    puts.cancel(id).await.unwrap();
    let resp = next(&mut puts).await;
    assert!(resp.canceled() && resp.watch_id() == id, "{resp:?}");
    c.put("a", "3", None).await.unwrap(); // rev 5
    assert!(
        tokio::time::timeout(Duration::from_millis(300), puts.message())
            .await
            .is_err(),
        "canceled watcher is silent"
    );

    // Progress: a response without events at the current revision.
    deletes.request_progress().await.unwrap();
    let resp = next(&mut deletes).await;
    assert!(resp.events().is_empty() && !resp.canceled(), "{resp:?}");
    assert_eq!(resp.header().unwrap().revision(), 5);
}

fn metric(port: u16, name: &str) -> f64 {
    let (code, body) = http_get(port, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200);
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_loses_nothing_and_memory_stays_bounded() {
    let server = Server::start();
    let port: u16 = server
        .client_url()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let mut c = connect(&server).await;
    // This watcher does not read while 100k events are written (1000 txns of 100 puts).
    let mut slow = open(&mut c, "s/", WatchOptions::new().with_prefix()).await;
    let value = "v".repeat(100);
    const TXNS: usize = 1000;
    const PER_TXN: usize = 100;
    let mut max_pending = 0.0f64;
    let mut last = 0;
    for t in 0..TXNS {
        let ops = (0..PER_TXN)
            .map(|i| TxnOp::put(format!("s/{i:03}"), format!("{value}{t}"), None))
            .collect::<Vec<_>>();
        let r = c.txn(Txn::new().and_then(ops)).await.expect("txn");
        last = r.header().unwrap().revision();
        if t % 100 == 99 {
            max_pending = max_pending.max(metric(port, "etcd_debugging_mvcc_pending_events_total"));
        }
    }
    // Without the slow watcher being set aside, all 100k events would be queued for it.
    assert!(
        max_pending < 30_000.0,
        "pending events reached {max_pending} while the consumer did not read"
    );

    let mut seen = 0usize;
    let mut expect_rev = 2;
    while expect_rev <= last {
        let resp = next(&mut slow).await;
        assert!(!resp.canceled(), "{resp:?}");
        for (i, ev) in resp.events().iter().enumerate() {
            let kv = ev.kv().unwrap();
            assert_eq!(kv.mod_revision(), expect_rev, "event {seen}");
            assert_eq!(kv.key_str().unwrap(), format!("s/{:03}", i % PER_TXN));
            if i % PER_TXN == PER_TXN - 1 {
                expect_rev += 1;
            }
            seen += 1;
        }
    }
    assert_eq!(seen, TXNS * PER_TXN);
}
