//! Installing another member's state must not need memory for that state: records stream
//! from the transfer's chunks into RocksDB's staging file. A counting global allocator
//! records the peak of live heap while a 64 MiB snapshot is installed; then the same
//! snapshot is installed from a collected list, as transfers did before, to show the meter
//! sees buffering of the whole state.
//!
//! One test per binary: the allocator counts every thread of the process. RocksDB's own
//! (C++) allocations are not counted; what it buffers per staged file is an index entry per
//! 4 KiB block.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;

use mvcc_store::{MvccStore, RecordSink, RocksEngine};
use oxcd_proto::etcdserverpb::RangeRequest;
use oxcd_proto::mvccpb::KeyValue;
use prost::Message;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn grew(by: isize) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: forwards to the system allocator unchanged; only counts the bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size() as isize);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        grew(new_size as isize - layout.size() as isize);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Restarts peak tracking from the current live heap; returns it.
fn reset_peak() -> isize {
    let now = LIVE.load(Ordering::Relaxed);
    PEAK.store(now, Ordering::Relaxed);
    now
}

const MIB: isize = 1 << 20;
/// 64k revisions of 1 KiB values: 64 MiB of values.
const REVISIONS: u64 = 64 * 1024;
const VALUE: usize = 1024;
/// Few user keys, so the index the store rebuilds afterwards (legitimately in memory) stays
/// small next to the data.
const KEYS: u64 = 64;
const APPLIED: u64 = 100_000;
/// Bytes of records per transfer chunk, as the peer transport sends them.
const CHUNK: usize = 1 << 20;
/// Peak heap growth allowed while installing: a few chunks and the rebuilt index.
const MAX_GROWTH: isize = 16 * MIB;

/// The engine records of a store that saw `REVISIONS` puts round-robin over `KEYS` keys, in
/// key order, produced one at a time.
fn for_each_record(f: &mut dyn FnMut(&[u8], &[u8])) {
    let payload = vec![b'v'; VALUE];
    let mut key = Vec::with_capacity(17);
    let mut value = Vec::with_capacity(VALUE + 64);
    for main in 1..=REVISIONS {
        key.clear();
        key.push(b'k');
        key.extend_from_slice(&main.to_be_bytes());
        key.extend_from_slice(&0u64.to_be_bytes());
        let n = (main - 1) % KEYS;
        let kv = KeyValue {
            key: format!("key{n:02}").into_bytes(),
            create_revision: (n + 1) as i64,
            mod_revision: main as i64,
            version: ((main - 1) / KEYS + 1) as i64,
            value: payload.clone(),
            lease: 0,
        };
        value.clear();
        value.push(0); // not a tombstone
        kv.encode(&mut value).unwrap();
        f(&key, &value);
    }
    f(b"m/applied", &APPLIED.to_be_bytes());
}

/// The transfer: records packed into chunks of about `CHUNK` bytes, each handed on record by
/// record once it "arrived".
fn stream(sink: &mut RecordSink<'_>) -> Result<(), String> {
    fn drain(chunk: &mut Vec<u8>, sink: &mut RecordSink<'_>) -> Result<(), String> {
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            let mut field = || {
                let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
                let body = &rest[4..4 + len];
                rest = &rest[4 + len..];
                body
            };
            let (k, v) = (field(), field());
            sink(k, v).map_err(|e| e.to_string())?;
        }
        chunk.clear();
        Ok(())
    }
    let mut chunk = Vec::with_capacity(CHUNK + 4096);
    let mut failed = Ok(());
    for_each_record(&mut |k, v| {
        for field in [k, v] {
            chunk.extend_from_slice(&(field.len() as u32).to_be_bytes());
            chunk.extend_from_slice(field);
        }
        if chunk.len() >= CHUNK && failed.is_ok() {
            failed = drain(&mut chunk, sink);
        }
    });
    failed?;
    drain(&mut chunk, sink)
}

fn check(store: &MvccStore) {
    assert_eq!(store.applied_index(), APPLIED);
    assert_eq!(store.current_revision(), REVISIONS as i64);
    assert_eq!(store.keys_total(), KEYS as usize);
    let r = store
        .range(&RangeRequest {
            key: b"key07".to_vec(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(r.kvs[0].value.len(), VALUE);
    assert_eq!(r.kvs[0].version, (REVISIONS / KEYS) as i64);
}

#[test]
fn installing_a_large_snapshot_needs_memory_for_a_chunk_not_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let store = MvccStore::open(Arc::new(RocksEngine::open(dir.path()).unwrap())).unwrap();

    let base = reset_peak();
    store.install(&mut |sink| stream(sink)).unwrap();
    let streamed = PEAK.load(Ordering::Relaxed) - base;
    check(&store);

    // As before: every record collected first, then installed.
    let base = reset_peak();
    let mut all = Vec::new();
    for_each_record(&mut |k, v| all.push((k.to_vec(), v.to_vec())));
    store
        .install(&mut |sink| {
            for (k, v) in &all {
                sink(k, v).map_err(|e| e.to_string())?;
            }
            Ok(())
        })
        .unwrap();
    drop(all);
    let collected = PEAK.load(Ordering::Relaxed) - base;
    check(&store);

    eprintln!(
        "peak heap growth: streamed {:.1} MiB, collected {:.1} MiB",
        streamed as f64 / MIB as f64,
        collected as f64 / MIB as f64
    );
    assert!(
        streamed < MAX_GROWTH,
        "streaming install grew the heap by {streamed} bytes"
    );
    assert!(
        collected > 64 * MIB,
        "the meter missed a collected state: {collected} bytes"
    );
}
