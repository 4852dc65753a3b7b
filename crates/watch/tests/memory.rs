//! What the hub keeps in memory per watcher and per queued notice, counted by a global
//! allocator. With 100k watchers on one prefix every revision becomes 100k notices, and a
//! slow client leaves up to a sink's worth of them queued per stream: both costs must stay a
//! few hundred bytes, independent of the events' size and of how many watchers share them.
//!
//! One test per binary: the allocator counts every thread of the process.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use oxcd_proto::mvccpb::{Event, KeyValue};
use support::*;
use tokio::sync::mpsc;
use watch::{History, HistoryError, Notice, WatchConfig, WatchHub, WatchSpec, WatchStream};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts the bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

const STREAMS: usize = 100;
const PER_STREAM: usize = 100;
const WATCHERS: usize = STREAMS * PER_STREAM;
/// Revisions left queued in every sink.
const QUEUED: usize = 20;
/// Revisions written before any watcher exists; late watchers read them and the `QUEUED`
/// ones back from history.
const HISTORY: usize = 50;
/// Value size of the puts: large enough that a copy per watcher would show.
const VALUE: usize = 200;

/// Per watcher (hub state, range index, ids, its share of its stream), the channel slot
/// excluded; a copy of the range per watcher would exceed it.
const MAX_BYTES_PER_WATCHER: f64 = 280.0;
/// Per queued notice of one event (channel slot included).
const MAX_BYTES_PER_LIVE_NOTICE: f64 = 128.0;
/// Per queued catch-up notice of `HISTORY + QUEUED` events (channel slot, positions and the
/// shared history reads included).
const MAX_BYTES_PER_CATCHUP_NOTICE: f64 = 256.0;

/// History whose reads wait while the gate is shut, so that watchers created meanwhile are
/// caught up together, as the victims of a full sink are.
struct Gated {
    inner: FakeHistory,
    open: AtomicBool,
}

impl History for Gated {
    fn current_revision(&self) -> i64 {
        self.inner.current_revision()
    }

    fn compact_revision(&self) -> i64 {
        self.inner.compact_revision()
    }

    fn events_since(&self, start_rev: i64, limit: usize) -> Result<Vec<Event>, HistoryError> {
        while !self.open.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.inner.events_since(start_rev, limit)
    }

    fn value_at(&self, key: &[u8], rev: i64) -> Result<Option<KeyValue>, HistoryError> {
        self.inner.value_at(key, rev)
    }
}

async fn open(
    rig: &Rig,
    streams: usize,
    per_stream: usize,
    start_revision: i64,
) -> Vec<(WatchStream, mpsc::Receiver<Notice>)> {
    let mut out = Vec::new();
    for _ in 0..streams {
        // Room for every notice the test leaves queued: no watcher becomes a victim.
        let (ws, rx) = rig.stream(per_stream * QUEUED);
        for _ in 0..per_stream {
            ws.watch(WatchSpec {
                start_revision,
                ..spec(b"fanout/", b"fanout0")
            })
            .await
            .unwrap();
        }
        out.push((ws, rx));
    }
    out
}

#[tokio::test(flavor = "current_thread")]
async fn watchers_and_queued_notices_stay_small() {
    let history = FakeHistory::default();
    let gated = Arc::new(Gated {
        inner: history.clone(),
        open: AtomicBool::new(true),
    });
    let (publish, events) = mpsc::channel(64);
    let hub = WatchHub::start(gated.clone(), events, WatchConfig::default());
    let rig = Rig {
        history,
        hub,
        publish,
    };
    let value = vec![b'v'; VALUE];
    for i in 0..HISTORY {
        rig.put(format!("fanout/{i}").as_bytes(), &value).await;
    }
    rig.settle().await;
    // Warm up: the hub's lazily made parts exist before counting starts.
    let warm = open(&rig, 1, 1, 0).await;
    drop(warm);
    rig.hub.stats().await.unwrap();

    let before = live();
    let mut streams = open(&rig, STREAMS, PER_STREAM, 0).await;
    for (_, rx) in streams.iter_mut() {
        for _ in 0..PER_STREAM {
            assert!(matches!(next(rx).await, Notice::Created { .. }));
        }
    }
    let stats = rig.hub.stats().await.unwrap();
    assert_eq!(stats.synced, WATCHERS);
    let per_watcher = (live() - before) as f64 / WATCHERS as f64;

    let before = live();
    for i in 0..QUEUED {
        rig.put(format!("fanout/live{i}").as_bytes(), &value).await;
    }
    rig.settle().await;
    let stats = rig.hub.stats().await.unwrap();
    assert_eq!((stats.synced, stats.unsynced), (WATCHERS, 0));
    // The revisions' events sit in the fake history too, counted once for all watchers.
    let per_live_notice = (live() - before) as f64 / (WATCHERS * QUEUED) as f64;
    for (_, rx) in streams.iter_mut() {
        for _ in 0..PER_STREAM * QUEUED {
            match rx.try_recv().unwrap() {
                Notice::Events { events, .. } => assert_eq!(events.len(), 1),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    drop(streams);
    rig.hub.stats().await.unwrap();

    // Watchers starting in the past each get one notice with everything read from history;
    // what those notices hold is what draining them frees.
    gated.open.store(false, Ordering::Release);
    let mut late = open(&rig, STREAMS, PER_STREAM, 1).await;
    gated.open.store(true, Ordering::Release);
    let mut synced = 0;
    for _ in 0..500 {
        synced = rig.hub.stats().await.unwrap().synced;
        if synced == WATCHERS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(synced, WATCHERS, "late watchers did not catch up");
    let before = live();
    for (_, rx) in late.iter_mut() {
        let mut caught = 0;
        while let Ok(notice) = rx.try_recv() {
            match notice {
                Notice::Created { .. } => {}
                Notice::Events { events, .. } => {
                    assert_eq!(events.len(), HISTORY + QUEUED);
                    caught += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(caught, PER_STREAM);
    }
    let per_catchup_notice = (before - live()) as f64 / WATCHERS as f64;

    eprintln!(
        "bytes per watcher {per_watcher:.0}, per queued live notice {per_live_notice:.0}, \
         per queued catch-up notice of {} events {per_catchup_notice:.0}",
        HISTORY + QUEUED
    );
    assert!(
        per_watcher <= MAX_BYTES_PER_WATCHER,
        "{per_watcher:.0} bytes per watcher"
    );
    assert!(
        per_live_notice <= MAX_BYTES_PER_LIVE_NOTICE,
        "{per_live_notice:.0} bytes per queued notice"
    );
    assert!(
        per_catchup_notice <= MAX_BYTES_PER_CATCHUP_NOTICE,
        "{per_catchup_notice:.0} bytes per queued catch-up notice"
    );
}
