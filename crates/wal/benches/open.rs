//! wal open on a 64 MiB preallocated segment: nearly empty (a few records, then a torn record
//! in front of the zero tail, the case where probing every later offset would be slow) and
//! nearly full of records (recovery cost proper). Each iteration re-creates the torn bytes
//! first, since open repairs them.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use wal::{EntryType, Wal, WalEntry, WalOptions};

fn entry(index: u64, data_len: usize) -> WalEntry {
    WalEntry {
        term: 1,
        index,
        entry_type: EntryType::Normal,
        data: vec![0xab; data_len],
        context: index.to_le_bytes().to_vec(),
    }
}

fn tail_segment(dir: &Path) -> PathBuf {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    segs.sort();
    segs.pop().unwrap()
}

/// Builds a log with `batches` appends of `per_batch` entries of `data_len` bytes and returns
/// the tail segment and where its records end.
fn build(dir: &Path, batches: u64, per_batch: u64, data_len: usize) -> (PathBuf, u64) {
    let (mut wal, _) = Wal::open(dir, WalOptions::default()).unwrap();
    let mut next = 1;
    for _ in 0..batches {
        let es: Vec<WalEntry> = (next..next + per_batch)
            .map(|i| entry(i, data_len))
            .collect();
        next += per_batch;
        wal.append(&es, None).unwrap();
    }
    assert_eq!(wal.segment_count(), 1, "stays one segment");
    drop(wal);
    let path = tail_segment(dir);
    let data = std::fs::read(&path).unwrap();
    let end = data.iter().rposition(|&b| b != 0).unwrap() as u64 + 1;
    (path, end)
}

fn open(c: &mut Criterion) {
    let mut g = c.benchmark_group("wal_open_64mib_segment");
    g.sample_size(10);
    for (name, batches, per_batch, data_len) in [
        ("nearly_empty_torn", 1, 3, 256),
        ("nearly_full_torn", 32, 32, 63 * 1024),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (path, end) = build(dir.path(), batches, per_batch, data_len);
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let f = OpenOptions::new().write(true).open(&path).unwrap();
                    f.write_all_at(&[0x55; 100], end).unwrap();
                    drop(f);
                    let t = Instant::now();
                    let (wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
                    total += t.elapsed();
                    // Stopping the background zero-fill is not part of opening.
                    drop(wal);
                }
                total
            });
        });
    }
    g.finish();
}

criterion_group!(benches, open);
criterion_main!(benches);
