//! The hub driven by a fake history and publisher: ordering, catch-up, compaction, filters,
//! ranges, ids, progress and slow consumers.

mod support;

use std::sync::Arc;
use std::time::Duration;

use oxcd_proto::mvccpb::event::EventType;
use support::*;
use watch::{Notice, WatchConfig, WatchError, WatchSpec};

const PUT: i32 = EventType::Put as i32;
const DEL: i32 = EventType::Delete as i32;

async fn created(rx: &mut tokio::sync::mpsc::Receiver<Notice>) -> (i64, i64) {
    match next(rx).await {
        Notice::Created { watch_id, revision } => (watch_id, revision),
        other => panic!("expected created, got {other:?}"),
    }
}

fn wanting_prev(s: WatchSpec) -> WatchSpec {
    WatchSpec { prev_kv: true, ..s }
}

/// The events of every notice queued so far, per watch id.
fn drain_events(
    rx: &mut tokio::sync::mpsc::Receiver<Notice>,
) -> std::collections::HashMap<i64, Vec<oxcd_proto::mvccpb::Event>> {
    let mut by_id: std::collections::HashMap<i64, Vec<_>> = Default::default();
    while let Ok(n) = rx.try_recv() {
        if let Notice::Events {
            watch_id, events, ..
        } = n
        {
            by_id.entry(watch_id).or_default().extend(events.to_vec());
        }
    }
    by_id
}

#[tokio::test]
async fn synced_watcher_gets_each_revision_as_published() {
    let rig = Rig::new(WatchConfig::default());
    let (ws, mut rx) = rig.stream(16);
    let id = ws.watch(spec(b"a", b"b")).await.unwrap();
    assert_eq!(created(&mut rx).await, (0, 0));
    for i in 0..50 {
        let rev = rig.put(format!("a{i}").as_bytes(), b"v").await;
        match next(&mut rx).await {
            Notice::Events {
                watch_id,
                revision,
                events,
                ..
            } => {
                assert_eq!((watch_id, revision), (id, rev));
                assert_eq!(summary(&events.to_vec()), vec![(rev, format!("a{i}"), PUT)]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // Outside the range: nothing.
    rig.put(b"b", b"v").await;
    quiet(&mut rx).await;
}

#[tokio::test]
async fn one_revision_is_one_notice() {
    let rig = Rig::new(WatchConfig::default());
    let (ws, mut rx) = rig.stream(16);
    ws.watch(spec(b"k", b"\0")).await.unwrap();
    created(&mut rx).await;
    let rev = rig
        .apply(&[
            (b"k1", Some(b"1")),
            (b"a-outside", Some(b"1")),
            (b"k2", Some(b"2")),
            (b"k1", None),
        ])
        .await;
    match next(&mut rx).await {
        Notice::Events { events, .. } => assert_eq!(
            summary(&events.to_vec()),
            vec![
                (rev, "k1".into(), PUT),
                (rev, "k2".into(), PUT),
                (rev, "k1".into(), DEL)
            ]
        ),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn single_key_prefix_and_from_key_ranges() {
    let rig = Rig::new(WatchConfig::default());
    let (ws, mut rx) = rig.stream(64);
    let single = ws.watch(spec(b"foo", b"")).await.unwrap();
    let prefix = ws.watch(spec(b"foo/", b"foo0")).await.unwrap();
    let from = ws.watch(spec(b"m", b"\0")).await.unwrap();
    let all = ws.watch(spec(b"", b"\0")).await.unwrap();
    for _ in 0..4 {
        created(&mut rx).await;
    }
    for key in ["foo", "foo/bar", "fo", "foo0", "m", "zz", "foobar"] {
        rig.put(key.as_bytes(), b"v").await;
    }
    rig.settle().await;
    let mut got: Vec<(i64, String)> = Vec::new();
    while let Ok(n) = rx.try_recv() {
        if let Notice::Events {
            watch_id, events, ..
        } = n
        {
            for e in events.to_vec() {
                got.push((watch_id, String::from_utf8(e.kv.unwrap().key).unwrap()));
            }
        }
    }
    got.sort();
    let mut want = vec![
        (single, "foo"),
        (prefix, "foo/bar"),
        (from, "m"),
        (from, "zz"),
    ];
    for key in ["foo", "foo/bar", "fo", "foo0", "m", "zz", "foobar"] {
        want.push((all, key));
    }
    let mut want: Vec<(i64, String)> = want.into_iter().map(|(w, k)| (w, k.into())).collect();
    want.sort();
    assert_eq!(got, want);
}

#[tokio::test]
async fn filters_and_prev_kv() {
    let rig = Rig::new(WatchConfig::default());
    let (ws, mut rx) = rig.stream(64);
    let no_put = ws
        .watch(WatchSpec {
            no_put: true,
            ..spec(b"k", b"")
        })
        .await
        .unwrap();
    let no_del = ws
        .watch(WatchSpec {
            no_delete: true,
            ..spec(b"k", b"")
        })
        .await
        .unwrap();
    let plain = ws.watch(spec(b"k", b"")).await.unwrap();
    let with_prev = ws.watch(wanting_prev(spec(b"k", b""))).await.unwrap();
    for _ in 0..4 {
        created(&mut rx).await;
    }
    rig.put(b"k", b"1").await;
    rig.put(b"k", b"2").await;
    rig.apply(&[(b"k", None)]).await;
    rig.settle().await;
    let by_id = drain_events(&mut rx);
    let types = |id| by_id[&id].iter().map(|e| e.r#type).collect::<Vec<_>>();
    assert_eq!(types(no_put), vec![DEL]);
    assert_eq!(types(no_del), vec![PUT, PUT]);
    assert_eq!(types(plain), vec![PUT, PUT, DEL]);
    assert!(by_id[&plain].iter().all(|e| e.prev_kv.is_none()));
    assert!(by_id[&no_put].iter().all(|e| e.prev_kv.is_none()));
    let prevs: Vec<Option<Vec<u8>>> = by_id[&with_prev]
        .iter()
        .map(|e| e.prev_kv.as_ref().map(|kv| kv.value.clone()))
        .collect();
    assert_eq!(prevs, vec![None, Some(b"1".to_vec()), Some(b"2".to_vec())]);
}

/// The applier publishes a put of an existing key without the value it replaced; the hub
/// reads it, once, only when a watcher of the event wants it.
#[tokio::test]
async fn left_out_prev_values_are_loaded_for_watchers_that_want_them() {
    let rig = Rig::new(WatchConfig::default());
    let (ws, mut rx) = rig.stream(64);
    let plain = ws.watch(spec(b"k", b"")).await.unwrap();
    created(&mut rx).await;
    let publish_without_prev = |value: &'static [u8]| {
        let mut ev = rig.history.put(b"k", value);
        ev.events[0].prev_kv = None;
        rig.publish.send(ev)
    };
    rig.put(b"k", b"1").await;
    publish_without_prev(b"2").await.unwrap();
    rig.settle().await;
    assert_eq!(rig.history.reads(), 0, "nobody wants the old value");

    let with_prev = ws.watch(wanting_prev(spec(b"k", b""))).await.unwrap();
    let also_prev = ws.watch(wanting_prev(spec(b"k", b"\0"))).await.unwrap();
    publish_without_prev(b"3").await.unwrap();
    rig.settle().await;
    assert_eq!(rig.history.reads(), 1, "one read for both watchers");
    let by_id = drain_events(&mut rx);
    assert_eq!(by_id[&plain].len(), 3);
    assert!(by_id[&plain].iter().all(|e| e.prev_kv.is_none()));
    for id in [with_prev, also_prev] {
        let evs = &by_id[&id];
        assert_eq!(evs.len(), 1);
        let prev = evs[0].prev_kv.as_ref().expect("loaded from history");
        assert_eq!(
            (&prev.value[..], prev.version, prev.mod_revision),
            (&b"2"[..], 2, 2)
        );
    }
}

#[tokio::test]
async fn past_start_replays_history_then_follows_live() {
    let history = FakeHistory::default();
    for i in 0..30 {
        history.put(format!("k{i}").as_bytes(), b"old");
    }
    let rig = Rig::with_history(
        history,
        WatchConfig {
            catchup_read_limit: 4,
            ..Default::default()
        },
    );
    let (ws, mut rx) = rig.stream(8);
    let id = ws
        .watch(WatchSpec {
            start_revision: 5,
            prev_kv: true,
            ..spec(b"k", b"l")
        })
        .await
        .unwrap();
    assert_eq!(created(&mut rx).await, (id, 30));
    for i in 30..40 {
        rig.put(format!("k{i}").as_bytes(), b"new").await;
    }
    let evs = collect_events(&mut rx, id, 36).await;
    let revs: Vec<i64> = evs
        .iter()
        .map(|e| e.kv.as_ref().unwrap().mod_revision)
        .collect();
    assert_eq!(revs, (5..=40).collect::<Vec<_>>());
    quiet(&mut rx).await;
    assert_eq!(rig.hub.stats().await.unwrap().synced, 1);
}

#[tokio::test]
async fn compacted_start_is_canceled_with_the_compact_revision() {
    let history = FakeHistory::default();
    for i in 0..20 {
        history.put(format!("k{i}").as_bytes(), b"v");
    }
    history.compact(10);
    let rig = Rig::with_history(history, WatchConfig::default());
    let (ws, mut rx) = rig.stream(8);
    let id = ws
        .watch(WatchSpec {
            start_revision: 9,
            ..spec(b"k", b"\0")
        })
        .await
        .unwrap();
    created(&mut rx).await;
    match next(&mut rx).await {
        Notice::Canceled {
            watch_id,
            compact_revision,
            ..
        } => assert_eq!((watch_id, compact_revision), (id, 10)),
        other => panic!("unexpected {other:?}"),
    }
    // Exactly at the compacted revision is still served, as etcd does.
    let at = ws
        .watch(WatchSpec {
            start_revision: 10,
            ..spec(b"k", b"\0")
        })
        .await
        .unwrap();
    created(&mut rx).await;
    let evs = collect_events(&mut rx, at, 11).await;
    assert_eq!(evs[0].kv.as_ref().unwrap().mod_revision, 10);
    let stats = rig.hub.stats().await.unwrap();
    assert_eq!((stats.watchers, stats.synced), (1, 1));
}

#[tokio::test]
async fn compaction_while_behind_cancels_the_victim() {
    let rig = Rig::new(WatchConfig::default());
    let (ws, mut rx) = rig.stream(2);
    let id = ws.watch(spec(b"k", b"")).await.unwrap();
    for _ in 0..10 {
        rig.put(b"k", b"v").await;
    }
    rig.settle().await;
    // The sink holds `created` and revision 1; revision 2 made the watcher a victim.
    rig.history.compact(5);
    created(&mut rx).await;
    let first = collect_events(&mut rx, id, 1).await;
    assert_eq!(first[0].kv.as_ref().unwrap().mod_revision, 1);
    match next(&mut rx).await {
        Notice::Canceled {
            watch_id,
            compact_revision,
            revision,
        } => assert_eq!((watch_id, compact_revision, revision), (id, 5, 0)),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(rig.hub.stats().await.unwrap().watchers, 0);
}

#[tokio::test]
async fn future_start_waits_for_the_store() {
    let rig = Rig::new(WatchConfig::default());
    rig.put(b"k", b"1").await;
    rig.settle().await;
    let (ws, mut rx) = rig.stream(8);
    let id = ws
        .watch(WatchSpec {
            start_revision: 4,
            ..spec(b"k", b"")
        })
        .await
        .unwrap();
    created(&mut rx).await;
    rig.put(b"k", b"2").await;
    rig.put(b"k", b"3").await;
    quiet(&mut rx).await;
    rig.put(b"k", b"4").await;
    rig.put(b"k", b"5").await;
    let evs = collect_events(&mut rx, id, 2).await;
    assert_eq!(
        summary(&evs),
        vec![(4, "k".into(), PUT), (5, "k".into(), PUT)]
    );
}

/// Watchers on the same range share one copy of it, kept while any of them (synced or not)
/// is left, on any stream.
#[tokio::test]
async fn watchers_on_one_range_share_it_until_the_last_goes() {
    let rig = Rig::new(WatchConfig::default());
    rig.put(b"p/1", b"v").await;
    let (ws, mut rx) = rig.stream(16);
    let (other, mut orx) = rig.stream(16);
    let a = ws.watch(spec(b"p/", b"p0")).await.unwrap();
    let b = ws
        .watch(WatchSpec {
            start_revision: 1,
            ..spec(b"p/", b"p0")
        })
        .await
        .unwrap();
    other.watch(spec(b"p/", b"p0")).await.unwrap();
    let single = ws.watch(spec(b"p/1", b"")).await.unwrap();
    created(&mut orx).await;
    let ranges = |s: watch::HubStats| (s.watchers, s.ranges);
    assert_eq!(ranges(rig.hub.stats().await.unwrap()), (4, 2));
    ws.cancel(single).await.unwrap();
    assert_eq!(ranges(rig.hub.stats().await.unwrap()), (3, 1));
    ws.cancel(a).await.unwrap();
    ws.cancel(b).await.unwrap();
    assert_eq!(ranges(rig.hub.stats().await.unwrap()), (1, 1));
    drop(other);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(ranges(rig.hub.stats().await.unwrap()), (0, 0));
    // The range is made anew for the next watcher on it.
    ws.watch(spec(b"p/", b"p0")).await.unwrap();
    assert_eq!(ranges(rig.hub.stats().await.unwrap()), (1, 1));
    while rx.try_recv().is_ok() {}
}

#[tokio::test]
async fn watch_ids_duplicates_and_cancel() {
    let rig = Rig::new(WatchConfig::default());
    let (ws, mut rx) = rig.stream(16);
    let chosen = ws
        .watch(WatchSpec {
            watch_id: 1,
            ..spec(b"a", b"")
        })
        .await
        .unwrap();
    assert_eq!(chosen, 1);
    created(&mut rx).await;
    // Auto ids count up from 0 and skip ids already taken.
    assert_eq!(ws.watch(spec(b"a", b"")).await.unwrap(), 0);
    assert_eq!(ws.watch(spec(b"a", b"")).await.unwrap(), 2);
    created(&mut rx).await;
    created(&mut rx).await;
    let dup = ws
        .watch(WatchSpec {
            watch_id: 2,
            ..spec(b"a", b"")
        })
        .await;
    assert_eq!(dup, Err(WatchError::DuplicateId));
    match next(&mut rx).await {
        Notice::Rejected { reason, .. } => {
            assert_eq!(
                reason,
                "mvcc: duplicate watch ID provided on the WatchStream"
            )
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        ws.watch(spec(b"b", b"a")).await,
        Err(WatchError::EmptyRange)
    );
    match next(&mut rx).await {
        Notice::Rejected { reason, .. } => assert_eq!(reason, "mvcc: watcher range is empty"),
        other => panic!("unexpected {other:?}"),
    }
    ws.cancel(0).await.unwrap();
    match next(&mut rx).await {
        Notice::Canceled {
            watch_id,
            compact_revision,
            ..
        } => assert_eq!((watch_id, compact_revision), (0, 0)),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(ws.cancel(0).await, Err(WatchError::NotExist));
    rig.put(b"a", b"v").await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        ids.push(next(&mut rx).await.watch_id());
    }
    ids.sort();
    assert_eq!(ids, vec![1, 2]);
    quiet(&mut rx).await;
    // Another stream has its own id space.
    let (other, mut orx) = rig.stream(4);
    assert_eq!(
        other
            .watch(WatchSpec {
                watch_id: 1,
                ..spec(b"a", b"")
            })
            .await,
        Ok(1)
    );
    created(&mut orx).await;
    drop(ws);
    drop(other);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stats = rig.hub.stats().await.unwrap();
    assert_eq!((stats.streams, stats.watchers), (0, 0));
}

#[tokio::test]
async fn progress_request_answers_at_hub_revision_once_synced() {
    let history = FakeHistory::default();
    for i in 0..200 {
        history.put(format!("k{i}").as_bytes(), b"v");
    }
    let rig = Rig::with_history(
        history,
        WatchConfig {
            catchup_read_limit: 10,
            catchup_job_budget: 10,
            ..Default::default()
        },
    );
    // No watchers: answered at once.
    let (ws, mut rx) = rig.stream(4);
    ws.request_progress().await.unwrap();
    match next(&mut rx).await {
        Notice::Progress { watch_id, revision } => assert_eq!((watch_id, revision), (-1, 200)),
        other => panic!("unexpected {other:?}"),
    }
    // An unsynced watcher: the answer waits until every event below it was delivered.
    let id = ws
        .watch(WatchSpec {
            start_revision: 1,
            ..spec(b"k", b"\0")
        })
        .await
        .unwrap();
    ws.request_progress().await.unwrap();
    let mut last_event = 0;
    loop {
        match next(&mut rx).await {
            Notice::Created { .. } => {}
            Notice::Events {
                watch_id, events, ..
            } => {
                assert_eq!(watch_id, id);
                last_event = events
                    .iter()
                    .last()
                    .unwrap()
                    .kv
                    .as_ref()
                    .unwrap()
                    .mod_revision;
            }
            Notice::Progress { watch_id, revision } => {
                assert_eq!(watch_id, -1);
                assert_eq!(last_event, 200, "progress before the events it covers");
                assert_eq!(revision, 200);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn periodic_progress_only_for_idle_watchers_that_asked() {
    let rig = Rig::new(WatchConfig {
        progress_notify_interval: Duration::from_millis(100),
        ..Default::default()
    });
    rig.put(b"x", b"1").await;
    let (ws, mut rx) = rig.stream(16);
    let asked = ws
        .watch(WatchSpec {
            progress_notify: true,
            ..spec(b"k", b"")
        })
        .await
        .unwrap();
    let _silent = ws.watch(spec(b"k", b"")).await.unwrap();
    created(&mut rx).await;
    created(&mut rx).await;
    for _ in 0..3 {
        match next(&mut rx).await {
            Notice::Progress { watch_id, revision } => assert_eq!((watch_id, revision), (asked, 1)),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn missing_revisions_in_the_feed_are_read_from_history() {
    let rig = Rig::new(WatchConfig::default());
    let (ws, mut rx) = rig.stream(16);
    let id = ws.watch(spec(b"k", b"")).await.unwrap();
    created(&mut rx).await;
    rig.put(b"k", b"1").await;
    // Revision 2 reaches the history but is never published.
    rig.history.put(b"k", b"2");
    rig.put(b"k", b"3").await;
    assert_eq!(
        revisions(&collect_events(&mut rx, id, 3).await),
        vec![1, 2, 3]
    );
}

/// Many watchers with random start revisions, small sinks and slow, irregular readers, while
/// the publisher keeps writing: each watcher sees exactly its events, in order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishing_and_catch_up_lose_and_repeat_nothing() {
    const REVS: i64 = 3000;
    let rig = Arc::new(Rig::new(WatchConfig {
        catchup_read_limit: 50,
        catchup_job_budget: 120,
        max_watchers_per_sync: 3,
        ..Default::default()
    }));
    for i in 0..300 {
        rig.put(format!("k{}", i % 17).as_bytes(), b"v").await;
    }
    let publisher = {
        let rig = rig.clone();
        tokio::spawn(async move {
            for i in 300..REVS {
                let key = format!("k{}", i % 17);
                if i % 7 == 0 {
                    rig.apply(&[(key.as_bytes(), None), (b"k-extra", Some(b"x"))])
                        .await;
                } else {
                    rig.put(key.as_bytes(), b"v").await;
                }
                if i % 100 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let mut readers = Vec::new();
    for w in 0..12u64 {
        let (ws, mut rx) = rig.stream(1 + (w as usize % 4));
        let start = match w % 3 {
            0 => 1 + (w as i64 * 37) % 300,
            1 => 0,
            _ => 250 + w as i64,
        };
        let (key, end): (Vec<u8>, Vec<u8>) = match w % 4 {
            0 => (b"k1".to_vec(), b"".to_vec()),
            1 => (b"k1".to_vec(), b"k2".to_vec()),
            2 => (b"k".to_vec(), b"\0".to_vec()),
            _ => (b"k-".to_vec(), b"k-\xff".to_vec()),
        };
        let range = watch::KeyRange::from_request(&key, &end).unwrap();
        ws.watch(WatchSpec {
            start_revision: start,
            ..spec(&key, &end)
        })
        .await
        .unwrap();
        let (_, created_rev) = created(&mut rx).await;
        let first = if start == 0 { created_rev + 1 } else { start };
        let (expect_tx, mut expect_rx) = tokio::sync::oneshot::channel::<usize>();
        let reader = tokio::spawn(async move {
            let mut got: Vec<(i64, Vec<u8>, i32)> = Vec::new();
            let mut expected = None;
            let mut n = 0u64;
            while expected.is_none_or(|e| got.len() < e) {
                n += 1;
                if (n + w).is_multiple_of(5) {
                    tokio::time::sleep(Duration::from_micros(300)).await;
                }
                tokio::select! {
                    e = &mut expect_rx, if expected.is_none() => expected = Some(e.unwrap()),
                    notice = next(&mut rx) => match notice {
                        Notice::Events { events, .. } => {
                            for e in events.to_vec() {
                                let kv = e.kv.unwrap();
                                got.push((kv.mod_revision, kv.key, e.r#type));
                            }
                        }
                        Notice::Progress { .. } => {}
                        other => panic!("unexpected {other:?}"),
                    },
                }
            }
            quiet(&mut rx).await;
            drop(ws);
            got
        });
        readers.push((first, range, expect_tx, reader));
    }
    publisher.await.unwrap();
    for (first, range, expect_tx, reader) in readers {
        let want: Vec<_> = rig
            .history
            .all_events()
            .into_iter()
            .filter(|(rev, k, _)| *rev >= first && range.contains(k))
            .collect();
        expect_tx.send(want.len()).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(30), reader)
            .await
            .expect("reader stuck")
            .unwrap();
        assert_eq!(got.len(), want.len(), "watcher from {first} on {range:?}");
        assert!(got == want, "watcher from {first} on {range:?} differs");
    }
}

/// A reader that stops reading while 100k revisions go by holds no more than its sink and
/// blocks nobody; once it reads again it gets every event, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_stays_bounded_then_catches_up() {
    const N: i64 = 100_000;
    const SINK: usize = 16;
    let rig = Rig::new(WatchConfig::default());
    let (slow, mut slow_rx) = rig.stream(SINK);
    let slow_id = slow.watch(spec(b"k", b"\0")).await.unwrap();
    let (fast, mut fast_rx) = rig.stream(SINK);
    let fast_id = fast.watch(spec(b"k", b"\0")).await.unwrap();
    created(&mut fast_rx).await;
    let fast_reader =
        tokio::spawn(async move { collect_events(&mut fast_rx, fast_id, N as usize).await });
    for i in 0..N {
        rig.put(format!("k{}", i % 1000).as_bytes(), b"value").await;
    }
    rig.settle().await;
    // The fast reader was never held up by the slow one.
    let fast_events = tokio::time::timeout(Duration::from_secs(60), fast_reader)
        .await
        .expect("fast reader stuck")
        .unwrap();
    assert_eq!(fast_events.len(), N as usize);
    let stats = rig.hub.stats().await.unwrap();
    assert!(slow_rx.len() <= SINK);
    assert_eq!(slow_rx.len(), SINK, "the slow sink filled up");
    assert_eq!(
        stats.unsynced, 1,
        "the slow watcher became a victim: {stats:?}"
    );
    assert_eq!(stats.blocked_streams, 1);
    assert_eq!(stats.backlog, 0);
    assert_eq!(rig.publish.capacity(), rig.publish.max_capacity());

    created(&mut slow_rx).await;
    let slow_events = collect_events(&mut slow_rx, slow_id, N as usize).await;
    let revs: Vec<i64> = slow_events
        .iter()
        .map(|e| e.kv.as_ref().unwrap().mod_revision)
        .collect();
    assert_eq!(revs, (1..=N).collect::<Vec<_>>());
    quiet(&mut slow_rx).await;
    let stats = rig.hub.stats().await.unwrap();
    assert_eq!((stats.synced, stats.unsynced), (2, 0));
}

#[tokio::test]
async fn watch_from_now_starts_after_the_store_not_after_the_hub() {
    let rig = Rig::new(WatchConfig::default());
    rig.put(b"a", b"seen-by-hub").await;
    rig.settle().await;
    // Written and acknowledged, but not yet published to the hub (as when the applier's
    // channel lags the client's response).
    let late = rig.history.put(b"a", b"acknowledged");
    let (ws, mut rx) = rig.stream(16);
    let id = ws.watch(spec(b"a", b"")).await.unwrap();
    assert_eq!(created(&mut rx).await, (id, late.revision));
    rig.publish.send(late).await.unwrap();
    quiet(&mut rx).await;
    let rev = rig.put(b"a", b"after").await;
    match next(&mut rx).await {
        Notice::Events { events, .. } => {
            assert_eq!(summary(&events.to_vec()), vec![(rev, "a".to_string(), PUT)])
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn a_jump_announced_without_events_is_read_from_history() {
    let rig = Rig::new(WatchConfig::default());
    let (ws, mut rx) = rig.stream(16);
    let id = ws.watch(spec(b"k", b"")).await.unwrap();
    created(&mut rx).await;
    rig.put(b"k", b"1").await;
    // A snapshot install: revisions 2 and 3 land in the history at once, and nothing is
    // written after them, so only the announcement tells the hub.
    rig.history.put(b"k", b"2");
    rig.history.put(b"k", b"3");
    rig.publish.send(watch::Events::jumped_to(3)).await.unwrap();
    assert_eq!(
        revisions(&collect_events(&mut rx, id, 3).await),
        vec![1, 2, 3]
    );
    rig.settle().await;
    assert_eq!(rig.hub.revision(), 3);
}

fn revisions(events: &[oxcd_proto::mvccpb::Event]) -> Vec<i64> {
    events
        .iter()
        .map(|e| e.kv.as_ref().unwrap().mod_revision)
        .collect()
}
