//! The storage engine under the revision model: an ordered byte-key map with atomic batches.
//! RocksDB in production, a BTreeMap in tests; the mvcc logic only sees this trait.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    /// For engines other than RocksDB (and test doubles).
    #[error("engine: {0}")]
    Other(String),
}

#[derive(Debug, Clone)]
pub enum BatchOp {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    /// Every key in `[start, end)`.
    DeleteRange(Vec<u8>, Vec<u8>),
}

/// Changes applied all-or-nothing by `KvEngine::write`.
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    pub ops: Vec<BatchOp>,
}

impl WriteBatch {
    pub fn put(&mut self, k: impl Into<Vec<u8>>, v: impl Into<Vec<u8>>) {
        self.ops.push(BatchOp::Put(k.into(), v.into()));
    }
    pub fn delete(&mut self, k: impl Into<Vec<u8>>) {
        self.ops.push(BatchOp::Delete(k.into()));
    }
    pub fn delete_range(&mut self, start: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) {
        self.ops
            .push(BatchOp::DeleteRange(start.into(), end.into()));
    }
    pub fn len(&self) -> usize {
        self.ops.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

pub trait KvEngine: Send + Sync + 'static {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError>;
    fn write(&self, batch: WriteBatch) -> Result<(), EngineError>;
    /// Visits `[start, end)` in key order until `f` returns false.
    fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), EngineError>;
    /// Bytes the engine occupies (on disk for RocksDB).
    /// Every key in order, from one point-in-time view (snapshots for other members).
    fn scan_all(&self, f: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), EngineError>;
    /// Replaces the whole content with `pairs` in one durable (fsynced) batch.
    fn replace_all(&self, pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Result<(), EngineError>;
    fn size_bytes(&self) -> u64;
    /// Bytes of live data.
    fn size_in_use(&self) -> u64;
    /// Reclaims space left by deletions (compaction of the engine itself).
    fn compact_all(&self) -> Result<(), EngineError>;
    /// Moves buffered writes to durable files (RocksDB memtables to SST), e.g. before shutdown.
    fn flush(&self) -> Result<(), EngineError>;
}

/// Told about every batch an [`ObservedEngine`] writes: tests count, fail or interleave writes
/// through it instead of re-implementing the engine.
pub trait WriteObserver: Send + Sync + 'static {
    /// Before `batch` is written; an error is returned instead of writing it.
    fn before_write(&self, _batch: &WriteBatch) -> Result<(), EngineError> {
        Ok(())
    }
    /// After a batch was written.
    fn after_write(&self) {}
}

/// An engine that passes everything to `inner` and shows its writes to an observer.
pub struct ObservedEngine<O> {
    inner: Arc<dyn KvEngine>,
    observer: O,
}

impl<O: WriteObserver> ObservedEngine<O> {
    pub fn new(inner: Arc<dyn KvEngine>, observer: O) -> Self {
        ObservedEngine { inner, observer }
    }

    pub fn observer(&self) -> &O {
        &self.observer
    }
}

impl<O: WriteObserver> KvEngine for ObservedEngine<O> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        self.inner.get(key)
    }
    fn write(&self, batch: WriteBatch) -> Result<(), EngineError> {
        self.observer.before_write(&batch)?;
        self.inner.write(batch)?;
        self.observer.after_write();
        Ok(())
    }
    fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), EngineError> {
        self.inner.scan(start, end, f)
    }
    fn scan_all(&self, f: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), EngineError> {
        self.inner.scan_all(f)
    }
    fn replace_all(&self, pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Result<(), EngineError> {
        self.inner.replace_all(pairs)
    }
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn size_in_use(&self) -> u64 {
        self.inner.size_in_use()
    }
    fn compact_all(&self) -> Result<(), EngineError> {
        self.inner.compact_all()
    }
    fn flush(&self) -> Result<(), EngineError> {
        self.inner.flush()
    }
}

/// In-memory engine for tests: same semantics, no disk.
#[derive(Default)]
pub struct MemEngine {
    map: RwLock<BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl KvEngine for MemEngine {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        Ok(self.map.read().get(key).cloned())
    }

    fn write(&self, batch: WriteBatch) -> Result<(), EngineError> {
        let mut m = self.map.write();
        for op in batch.ops {
            match op {
                BatchOp::Put(k, v) => {
                    m.insert(k, v);
                }
                BatchOp::Delete(k) => {
                    m.remove(&k);
                }
                BatchOp::DeleteRange(start, end) => {
                    if start < end {
                        let mut tail = m.split_off(&start);
                        let mut rest = tail.split_off(&end);
                        m.append(&mut rest);
                    }
                }
            }
        }
        Ok(())
    }

    fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), EngineError> {
        let m = self.map.read();
        for (k, v) in m.range::<[u8], _>((Bound::Included(start), Bound::Excluded(end))) {
            if !f(k, v) {
                break;
            }
        }
        Ok(())
    }

    fn scan_all(&self, f: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), EngineError> {
        for (k, v) in self.map.read().iter() {
            if !f(k, v) {
                break;
            }
        }
        Ok(())
    }

    fn replace_all(&self, pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Result<(), EngineError> {
        *self.map.write() = pairs.into_iter().collect();
        Ok(())
    }

    fn size_bytes(&self) -> u64 {
        self.size_in_use()
    }

    fn size_in_use(&self) -> u64 {
        self.map
            .read()
            .iter()
            .map(|(k, v)| (k.len() + v.len()) as u64)
            .sum()
    }

    fn compact_all(&self) -> Result<(), EngineError> {
        Ok(())
    }

    fn flush(&self) -> Result<(), EngineError> {
        Ok(())
    }
}

/// RocksDB without its own write-ahead log: the raft wal is the log. Every write lands in a
/// memtable; what reaches SST files (a flush: when a memtable fills, on `flush`, at close)
/// is always a prefix of the writes, since there is one column family. After a crash the
/// engine is at some earlier applied index and raft applies the entries after it again;
/// raft drops its log only below what `flush` made durable (`MvccStore::persist`). A
/// second log here would cost a write(2) per applied entry and buy nothing.
pub struct RocksEngine {
    db: rocksdb::DB,
    write_opts: rocksdb::WriteOptions,
    /// etcd's `etcd_disk_backend_commit_duration_seconds`: the time of each batch written.
    commit_seconds: metrics::Histogram,
    born: std::time::Instant,
    size: AtomicU64,
    /// When `size` was read, in nanoseconds since `born`; 0: never.
    size_read_at: AtomicU64,
}

/// How stale the engine size the quota check sees may be (etcd's backend size also moves
/// only when its batch commits, every 100 ms).
const SIZE_REFRESH: std::time::Duration = std::time::Duration::from_millis(20);

impl RocksEngine {
    pub fn open(path: &Path) -> Result<RocksEngine, EngineError> {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        opts.set_compression_type(rocksdb::DBCompressionType::None);
        opts.increase_parallelism(2);
        opts.set_max_background_jobs(2);
        opts.set_write_buffer_size(64 * 1024 * 1024);
        let mut block = rocksdb::BlockBasedOptions::default();
        block.set_bloom_filter(10.0, false);
        block.set_block_cache(&rocksdb::Cache::new_lru_cache(128 * 1024 * 1024));
        opts.set_block_based_table_factory(&block);
        let db = rocksdb::DB::open(&opts, path)?;
        metrics::describe_histogram!(
            "etcd_disk_backend_commit_duration_seconds",
            metrics::Unit::Seconds,
            "The latency distributions of commit called by backend."
        );
        let mut write_opts = rocksdb::WriteOptions::default();
        write_opts.disable_wal(true);
        Ok(RocksEngine {
            db,
            write_opts,
            commit_seconds: metrics::histogram!("etcd_disk_backend_commit_duration_seconds"),
            born: std::time::Instant::now(),
            size: AtomicU64::new(0),
            size_read_at: AtomicU64::new(0),
        })
    }

    fn property(&self, name: &str) -> u64 {
        self.db.property_int_value(name).ok().flatten().unwrap_or(0)
    }
}

impl KvEngine for RocksEngine {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        Ok(self.db.get_pinned(key)?.map(|v| v.to_vec()))
    }

    fn write(&self, batch: WriteBatch) -> Result<(), EngineError> {
        // etcd times its backend's commits; every batch oxcd writes (an applied entry, a
        // compaction step, lease and membership records) is one here.
        let started = std::time::Instant::now();
        let mut b = rocksdb::WriteBatch::default();
        for op in batch.ops {
            match op {
                BatchOp::Put(k, v) => b.put(k, v),
                BatchOp::Delete(k) => b.delete(k),
                BatchOp::DeleteRange(start, end) => b.delete_range(start, end),
            }
        }
        self.db.write_opt(b, &self.write_opts)?;
        self.commit_seconds.record(started.elapsed().as_secs_f64());
        Ok(())
    }

    fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), EngineError> {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(end.to_vec());
        let mut it = self.db.raw_iterator_opt(ro);
        it.seek(start);
        visit(it, f)
    }

    fn scan_all(&self, f: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), EngineError> {
        // An iterator reads from the implicit snapshot taken when it is created.
        let mut it = self.db.raw_iterator();
        it.seek_to_first();
        visit(it, f)
    }

    fn replace_all(&self, pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Result<(), EngineError> {
        let mut b = rocksdb::WriteBatch::default();
        let mut it = self.db.raw_iterator();
        it.seek_to_first();
        while it.valid() {
            if let Some(k) = it.key() {
                b.delete(k);
            }
            it.next();
        }
        it.status()?;
        for (k, v) in pairs {
            b.put(k, v);
        }
        self.db.write_opt(b, &self.write_opts)?;
        // Durable before the caller records the snapshot in its log.
        Ok(self.db.flush()?)
    }

    fn size_bytes(&self) -> u64 {
        // Asked for every write (the quota check); RocksDB's properties take its mutex and
        // format strings, so they are read at most once per SIZE_REFRESH.
        let now = self.born.elapsed().as_nanos() as u64;
        let read_at = self.size_read_at.load(Ordering::Relaxed);
        if read_at != 0 && now.saturating_sub(read_at) < SIZE_REFRESH.as_nanos() as u64 {
            return self.size.load(Ordering::Relaxed);
        }
        let size = self.property("rocksdb.total-sst-files-size")
            + self.property("rocksdb.cur-size-all-mem-tables");
        self.size.store(size, Ordering::Relaxed);
        self.size_read_at.store(now.max(1), Ordering::Relaxed);
        size
    }

    fn size_in_use(&self) -> u64 {
        self.property("rocksdb.estimate-live-data-size")
            + self.property("rocksdb.cur-size-all-mem-tables")
    }

    fn compact_all(&self) -> Result<(), EngineError> {
        self.db.compact_range::<&[u8], &[u8]>(None, None);
        Ok(())
    }

    fn flush(&self) -> Result<(), EngineError> {
        Ok(self.db.flush()?)
    }
}

/// Hands every record from the iterator's position on to `f` until it returns false.
fn visit(
    mut it: rocksdb::DBRawIterator<'_>,
    f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
) -> Result<(), EngineError> {
    while it.valid() {
        let (Some(k), Some(v)) = (it.key(), it.value()) else {
            break;
        };
        if !f(k, v) {
            return Ok(());
        }
        it.next();
    }
    it.status()?;
    Ok(())
}
