//! The apply path: decode a committed entry, apply it to the store (RocksDB), publish events,
//! answer the proposer. Batches of 64 entries, as a busy Ready loop delivers them.

use std::sync::Arc;

use applier::{encode_request, Applier, Responder};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mvcc_store::{MvccStore, RocksEngine};
use oxcd_proto::etcdserverpb::{InternalRaftRequest, PutRequest};
use raft_node::{Committed, CommittedEntry, EntryKind};
use tokio::sync::{mpsc, oneshot};

fn apply(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = MvccStore::open(Arc::new(RocksEngine::open(dir.path()).unwrap())).unwrap();
    let (tx, rx) = mpsc::channel::<Committed<Responder>>(16);
    let (events_tx, mut events_rx) = mpsc::channel(1024);
    let (applied_tx, _applied_rx) = tokio::sync::watch::channel(0);
    let applier = Applier::new(store, Some(events_tx), applied_tx);
    let thread = std::thread::spawn(move || applier.run(rx));
    let drain = std::thread::spawn(move || while events_rx.blocking_recv().is_some() {});

    let mut index = 0u64;
    let mut g = c.benchmark_group("applier");
    g.throughput(Throughput::Elements(64));
    g.bench_function("put_batch_64", |b| {
        b.iter(|| {
            let mut waits = Vec::with_capacity(64);
            let entries = (0..64)
                .map(|i| {
                    index += 1;
                    let (reply, wait) = oneshot::channel();
                    waits.push(wait);
                    let data = encode_request(&InternalRaftRequest {
                        put: Some(PutRequest {
                            key: format!("key/{:04}", (index + i) % 1000).into_bytes(),
                            value: vec![1; 256],
                            ..Default::default()
                        }),
                        ..Default::default()
                    });
                    CommittedEntry {
                        index,
                        term: 2,
                        kind: EntryKind::Normal,
                        data,
                        reply: Some(reply),
                    }
                })
                .collect();
            tx.blocking_send(Committed::entries(entries)).unwrap();
            for w in waits {
                w.blocking_recv().unwrap().unwrap();
            }
        })
    });
    g.finish();
    drop(tx);
    thread.join().unwrap();
    drain.join().unwrap();
}

criterion_group!(benches, apply);
criterion_main!(benches);
