//! The storage engine under the revision model: an ordered byte-key map with atomic batches.
//! RocksDB in production, a BTreeMap in tests; the mvcc logic only sees this trait.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
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
    #[error("replacement keys must strictly increase, {key:?} came after {after:?}")]
    OutOfOrder { key: Vec<u8>, after: Vec<u8> },
    #[error("key {0:?} is beyond the engine's key space")]
    BeyondKeySpace(Vec<u8>),
    #[error("staging file {path}: {source}")]
    Staging {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Every key a layer above writes is below this: their first bytes are ASCII letters ('k'
/// revisions and 'm/' meta in the mvcc store; 'l' leases, 'c' members, 'a' alarms in the
/// applier). A replacement deletes `["", KEY_SPACE_END)` with one range tombstone; older keys
/// at or beyond it (none are written) are deleted one by one, so nothing old survives.
pub const KEY_SPACE_END: &[u8] = &[0xff];

/// A whole new content for an engine, written beside the live one, which stays readable and
/// unchanged until `commit`. Dropping it uncommitted discards what was written.
pub trait Replacement {
    /// Adds a record. Keys must strictly increase and lie below [`KEY_SPACE_END`].
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), EngineError>;
    /// Swaps the content for what was put, atomically and durably: after a crash the engine
    /// holds either the old content or the new one, whole.
    fn commit(self: Box<Self>) -> Result<(), EngineError>;
}

/// The ordering and key-space checks every [`Replacement`] makes, given the previous key.
fn check_next(last: Option<&[u8]>, key: &[u8]) -> Result<(), EngineError> {
    if let Some(after) = last.filter(|last| key <= *last) {
        return Err(EngineError::OutOfOrder {
            key: key.to_vec(),
            after: after.to_vec(),
        });
    }
    if key >= KEY_SPACE_END {
        return Err(EngineError::BeyondKeySpace(key.to_vec()));
    }
    Ok(())
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
    /// Starts replacing the whole content: records stream into the result one by one, so the
    /// new content never has to fit in memory. Writes made before the commit belong to the
    /// old content and go with it.
    fn replace(&self) -> Result<Box<dyn Replacement + '_>, EngineError>;
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
    fn replace(&self) -> Result<Box<dyn Replacement + '_>, EngineError> {
        self.inner.replace()
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

    fn replace(&self) -> Result<Box<dyn Replacement + '_>, EngineError> {
        Ok(Box::new(MemReplacement {
            engine: self,
            map: BTreeMap::new(),
        }))
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

/// The new content of a [`MemEngine`], swapped in whole.
struct MemReplacement<'a> {
    engine: &'a MemEngine,
    map: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Replacement for MemReplacement<'_> {
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), EngineError> {
        check_next(self.map.last_key_value().map(|(k, _)| &k[..]), key)?;
        self.map.insert(key.to_vec(), value.to_vec());
        Ok(())
    }

    fn commit(self: Box<Self>) -> Result<(), EngineError> {
        *self.engine.map.write() = self.map;
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
    /// For the files replacements are staged in.
    staging_opts: rocksdb::Options,
    /// Numbers the staging files of this process.
    staged: AtomicU64,
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

/// Staging files of replacements live in the DB directory (ingestion then links instead of
/// copying); RocksDB ignores names that are not its own.
const STAGING_PREFIX: &str = "oxcd-install-";

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
        // No bloom filter in staged files: its builder keeps a hash per key until the file is
        // finished, memory growing with the snapshot. Reads of the ingested file only lose
        // the shortcut for absent keys, until compaction rewrites it with one.
        let mut staging_opts = rocksdb::Options::default();
        staging_opts.set_compression_type(rocksdb::DBCompressionType::None);
        remove_staging_leftovers(path);
        Ok(RocksEngine {
            db,
            write_opts,
            staging_opts,
            staged: AtomicU64::new(0),
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

    fn replace(&self) -> Result<Box<dyn Replacement + '_>, EngineError> {
        let n = self.staged.fetch_add(1, Ordering::Relaxed);
        let path = self.db.path().join(format!("{STAGING_PREFIX}{n}.sst"));
        // A name left by a crash after ingestion may be a second link to a live table file:
        // opening it for writing would truncate that table, so it is unlinked first.
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(EngineError::Staging { path, source: e })
            }
            _ => {}
        }
        let r = RocksReplacement {
            engine: self,
            writer: Some(rocksdb::SstFileWriter::create(&self.staging_opts)),
            path,
            last: None,
            records: 0,
            started: std::time::Instant::now(),
        };
        r.writer.as_ref().expect("just set").open(&r.path)?;
        Ok(Box::new(r))
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

/// Unlinks staging files a crash left behind (after or before their ingestion).
fn remove_staging_leftovers(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(STAGING_PREFIX) {
            if let Err(err) = std::fs::remove_file(e.path()) {
                tracing::warn!(path = %e.path().display(), error = %err, "cannot remove staging file");
            }
        }
    }
}

/// A new content for a [`RocksEngine`], written to an SST file that one ingestion swaps in.
struct RocksReplacement<'a> {
    engine: &'a RocksEngine,
    /// None once finished.
    writer: Option<rocksdb::SstFileWriter<'a>>,
    path: PathBuf,
    /// The previous key, for the order check.
    last: Option<Vec<u8>>,
    records: u64,
    started: std::time::Instant,
}

impl Replacement for RocksReplacement<'_> {
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), EngineError> {
        check_next(self.last.as_deref(), key)?;
        let writer = self.writer.as_mut().expect("present until commit");
        writer.put(key, value)?;
        match &mut self.last {
            Some(last) => {
                last.clear();
                last.extend_from_slice(key);
            }
            None => self.last = Some(key.to_vec()),
        }
        self.records += 1;
        Ok(())
    }

    fn commit(mut self: Box<Self>) -> Result<(), EngineError> {
        let mut writer = self.writer.take().expect("present until commit");
        let db = &self.engine.db;
        // Keys beyond the range tombstone: none are written, but if one were it must not
        // outlive the replacement. All of them sort after every put, as the file requires.
        let mut it = db.raw_iterator();
        it.seek(KEY_SPACE_END);
        while it.valid() {
            if let Some(k) = it.key() {
                writer.delete(k)?;
            }
            it.next();
        }
        it.status()?;
        drop(it);
        // In RocksDB a file's range tombstone deletes only keys older than the file, never the
        // file's own point keys: the whole old content goes, the puts become the new one.
        writer.delete_range(b"".as_slice(), KEY_SPACE_END)?;
        writer.finish()?;
        drop(writer);
        let mut ingest = rocksdb::IngestExternalFileOptions::default();
        ingest.set_move_files(true);
        // One ingestion is one edit of RocksDB's manifest, synced together with the linked
        // file: a crash leaves the old content or the new one. RocksDB first flushes the
        // memtable, which the file overlaps.
        db.ingest_external_file_opts(&ingest, vec![&self.path])?;
        // Nothing should be left in memtables (the log is off); make sure before the caller
        // records the snapshot as applied.
        db.flush()?;
        tracing::info!(
            records = self.records,
            took_ms = self.started.elapsed().as_millis() as u64,
            "engine: content replaced"
        );
        Ok(())
    }
}

impl Drop for RocksReplacement<'_> {
    fn drop(&mut self) {
        // Closes the file before unlinking it. After a commit RocksDB moved it already.
        drop(self.writer.take());
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove staging file");
            }
            _ => {}
        }
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
