//! The store's hot paths: a put (RocksDB, one engine batch), a run of puts applied together,
//! a single-key range and a 100-key range; plus the start-up cost of rebuilding the key index
//! over 100k keys.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mvcc_store::{KvEngine, MvccStore, RocksEngine, WriteOp};
use oxcd_proto::etcdserverpb::{PutRequest, RangeRequest};

fn mvcc(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = MvccStore::open(Arc::new(RocksEngine::open(dir.path()).unwrap())).unwrap();
    let no_leases = |_| false;
    let mut index = 0u64;
    for i in 0..1000u32 {
        index += 1;
        let req = PutRequest {
            key: format!("key/{i:06}").into_bytes(),
            value: vec![7; 256],
            ..Default::default()
        };
        store.apply(index, WriteOp::Put(&req), &no_leases).unwrap();
    }

    let mut g = c.benchmark_group("mvcc");
    g.throughput(Throughput::Elements(1));
    g.bench_function("put_256b", |b| {
        let mut i = 0u32;
        b.iter(|| {
            i += 1;
            index += 1;
            let req = PutRequest {
                key: format!("key/{:06}", i % 1000).into_bytes(),
                value: vec![7; 256],
                ..Default::default()
            };
            store.apply(index, WriteOp::Put(&req), &no_leases).unwrap();
        })
    });
    // A committed batch of 16 plain puts applied as one run (one engine write): the applier's
    // path under a put load. Throughput counts puts.
    g.throughput(Throughput::Elements(16));
    g.bench_function("put_run_16x256b", |b| {
        let mut i = 0u32;
        b.iter(|| {
            let reqs: Vec<PutRequest> = (0..16)
                .map(|_| {
                    i += 1;
                    PutRequest {
                        key: format!("key/{:06}", i % 1000).into_bytes(),
                        value: vec![7; 256],
                        ..Default::default()
                    }
                })
                .collect();
            let run: Vec<(u64, &PutRequest)> = reqs
                .iter()
                .map(|r| {
                    index += 1;
                    (index, r)
                })
                .collect();
            store.apply_puts(&run, &no_leases).unwrap();
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("range_single_key", |b| {
        let req = RangeRequest {
            key: b"key/000500".to_vec(),
            ..Default::default()
        };
        b.iter(|| store.range(&req).unwrap())
    });
    g.throughput(Throughput::Elements(100));
    g.bench_function("range_100_keys", |b| {
        let req = RangeRequest {
            key: b"key/000100".to_vec(),
            range_end: b"key/000200".to_vec(),
            ..Default::default()
        };
        b.iter(|| store.range(&req).unwrap())
    });
    g.finish();
}

/// `MvccStore::open` over 100k keys (one revision each, 256-byte values) in RocksDB: the scan
/// that rebuilds the in-memory key index. Measured on the 2-core development machine:
/// OPEN_100K_MS (release build).
fn open_100k(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(RocksEngine::open(dir.path()).unwrap());
    {
        let store = MvccStore::open(engine.clone()).unwrap();
        let no_leases = |_| false;
        for i in 0..100_000u64 {
            let req = PutRequest {
                key: format!("key/{i:08}").into_bytes(),
                value: vec![7; 256],
                ..Default::default()
            };
            store.apply(i + 1, WriteOp::Put(&req), &no_leases).unwrap();
        }
        engine.flush().unwrap();
    }
    let mut g = c.benchmark_group("mvcc_open");
    g.sample_size(10);
    g.bench_function("open_100k_keys", |b| {
        b.iter(|| {
            let store = MvccStore::open(engine.clone()).unwrap();
            assert_eq!(store.keys_total(), 100_000);
            store
        })
    });
    g.finish();
}

criterion_group!(benches, mvcc, open_100k);
criterion_main!(benches);
