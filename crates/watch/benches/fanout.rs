//! The watch hub's hot path: one published revision fanned out to many synced watchers, and
//! the time until every stream's sink holds it.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use oxcd_proto::mvccpb::{Event, KeyValue};
use tokio::sync::mpsc;
use watch::{Events, History, HistoryError, Notice, WatchConfig, WatchHub, WatchSpec};

/// History that is always caught up: the bench only publishes revisions watchers are synced on.
struct LiveOnly(Arc<AtomicI64>);

impl History for LiveOnly {
    fn current_revision(&self) -> i64 {
        self.0.load(Ordering::Acquire)
    }
    fn compact_revision(&self) -> i64 {
        0
    }
    fn events_since(&self, _start: i64, _limit: usize) -> Result<Vec<Event>, HistoryError> {
        Ok(Vec::new())
    }
    fn value_at(&self, _key: &[u8], _rev: i64) -> Result<Option<KeyValue>, HistoryError> {
        Ok(None)
    }
}

fn put(rev: i64, key: &[u8]) -> Events {
    Events {
        revision: rev,
        events: vec![Event {
            r#type: 0,
            kv: Some(KeyValue {
                key: key.to_vec(),
                value: vec![b'v'; 64],
                create_revision: 2,
                mod_revision: rev,
                version: rev - 1,
                lease: 0,
            }),
            prev_kv: None,
        }],
    }
}

fn fanout(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("watch_fanout");
    for (streams, per_stream) in [(1usize, 1usize), (10, 100), (100, 10)] {
        let watchers = streams * per_stream;
        group.throughput(Throughput::Elements(watchers as u64));
        let id = BenchmarkId::new("one_put", format!("{watchers}_watchers_{streams}_streams"));
        let rev = Arc::new(AtomicI64::new(1));
        let (events_tx, events_rx) = mpsc::channel(64);
        let (hub, mut sinks) = rt.block_on(async {
            let hub = WatchHub::start(
                Arc::new(LiveOnly(rev.clone())),
                events_rx,
                WatchConfig::default(),
            );
            let mut sinks = Vec::new();
            for _ in 0..streams {
                let (tx, mut rx) = mpsc::channel(1024);
                let stream = hub.open_stream(tx);
                for _ in 0..per_stream {
                    stream
                        .watch(WatchSpec {
                            key: b"hot".to_vec(),
                            ..Default::default()
                        })
                        .await
                        .unwrap();
                    assert!(matches!(rx.recv().await, Some(Notice::Created { .. })));
                }
                sinks.push((stream, rx));
            }
            (hub, sinks)
        });
        group.bench_function(id, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let r = rev.fetch_add(1, Ordering::AcqRel) + 1;
                    events_tx.send(put(r, b"hot")).await.unwrap();
                    for (_, rx) in sinks.iter_mut() {
                        for _ in 0..per_stream {
                            match rx.recv().await {
                                Some(Notice::Events { revision, .. }) => assert_eq!(revision, r),
                                other => panic!("unexpected notice {other:?}"),
                            }
                        }
                    }
                })
            })
        });
        drop(sinks);
        drop(hub);
    }
    group.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
