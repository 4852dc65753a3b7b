//! wal append with fsync: one entry per call (every proposal pays an fsync) versus 64 entries
//! per call (group commit, as the Ready loop does under load).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use wal::{EntryType, HardState, Wal, WalEntry, WalOptions};

fn batch(start: u64, n: u64) -> Vec<WalEntry> {
    (start..start + n)
        .map(|index| WalEntry {
            term: 1,
            index,
            entry_type: EntryType::Normal,
            data: vec![0xab; 256],
            context: index.to_le_bytes().to_vec(),
        })
        .collect()
}

fn append(c: &mut Criterion) {
    let mut g = c.benchmark_group("wal_append_fsync");
    g.sample_size(20);
    for per_call in [1u64, 64] {
        g.throughput(Throughput::Elements(per_call));
        g.bench_function(format!("{per_call}_entries_per_fsync"), |b| {
            let dir = tempfile::tempdir().unwrap();
            let (mut wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
            let mut next = 1;
            b.iter_batched(
                || {
                    let e = batch(next, per_call);
                    next += per_call;
                    e
                },
                |entries| {
                    let hs = HardState {
                        term: 1,
                        vote: 1,
                        commit: entries.last().unwrap().index,
                    };
                    wal.append(&entries, Some(&hs)).unwrap();
                },
                BatchSize::SmallInput,
            );
        });
    }
    g.finish();
}

criterion_group!(benches, append);
criterion_main!(benches);
