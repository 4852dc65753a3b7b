//! mvcc-store: etcd's multi-version key-value model over a pluggable storage engine.
//!
//! Every change gets a revision (main, sub); values are stored under their revision, and an
//! in-memory index maps each user key to its changes, so reads at any uncompacted revision are
//! cheap. Reads (`range`, `events_since`, `hash_kv`) run concurrently from any thread; writes
//! (`apply`) come from one caller, the applier, each as one atomic engine batch that also
//! records the raft index it came from. Compaction drops history in bounded batches on a
//! background thread. Channels: none in; `CompactionWait` (oneshot) out.

pub mod engine;
mod index;
mod range;
pub mod snapshot_file;
mod write;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use oxcd_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, ResponseHeader, TxnRequest, TxnResponse,
};
use oxcd_proto::mvccpb::{event::EventType, Event, KeyValue};
use parking_lot::RwLock;
use prost::Message;

pub use engine::{
    EngineError, KvEngine, MemEngine, ObservedEngine, Replacement, RocksEngine, WriteBatch,
    WriteObserver, KEY_SPACE_END,
};
use index::{Change, Generation, Index};
pub use index::{KeyRange, Rev};

#[derive(Debug, thiserror::Error)]
pub enum MvccError {
    #[error("mvcc: required revision has been compacted")]
    Compacted,
    #[error("mvcc: required revision is a future revision")]
    FutureRevision,
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("mvcc: storage: {0}")]
    Engine(#[from] EngineError),
    #[error("mvcc: corrupt store: {0}")]
    Corrupt(String),
    /// What feeds `install` failed; the store kept its content.
    #[error("mvcc: snapshot source: {0}")]
    SnapshotSource(String),
}

/// Takes one record of a snapshot being installed (see `MvccStore::install`).
pub type RecordSink<'a> = dyn FnMut(&[u8], &[u8]) -> Result<(), MvccError> + 'a;

pub enum WriteOp<'a> {
    Put(&'a PutRequest),
    DeleteRange(&'a DeleteRangeRequest),
    Txn(&'a TxnRequest),
    Compact(&'a CompactionRequest),
    /// Records the raft index only (empty entries, membership changes).
    Noop,
}

#[derive(Debug)]
pub enum WriteResponse {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    Compact(CompactionResponse),
    None,
}

/// One put of `MvccStore::apply_puts`: its response and its event, or why it failed.
pub type PutOutcome = Result<(PutResponse, Event), MvccError>;

/// Resolves when a compaction's old revisions are physically gone.
#[derive(Debug)]
pub struct CompactionWait(tokio::sync::oneshot::Receiver<()>);

impl CompactionWait {
    pub async fn wait(self) {
        let _ = self.0.await;
    }

    /// For non-async callers (tests, tools).
    pub fn wait_blocking(self) {
        let _ = self.0.blocking_recv();
    }
}

#[derive(Debug)]
pub struct Applied {
    pub response: WriteResponse,
    /// Store revision after the op.
    pub revision: i64,
    /// Changes made, all at `revision`, with `prev_kv` filled, except that a put of an
    /// existing key leaves it out unless the request itself needed the old value.
    pub events: Vec<Event>,
    pub compaction: Option<CompactionWait>,
}

// Engine key layout: revision keys 'k' + main + sub (big endian, so engine order is revision
// order); values are a tombstone flag byte followed by the encoded KeyValue. Meta keys 'm/...'.
const REV_PREFIX: u8 = b'k';
const META_APPLIED: &[u8] = b"m/applied";
/// The engine record holding the raft index the store's content reflects (`export` includes
/// it). A snapshot restored onto a new raft log leaves it out: that store starts at index 0.
pub const APPLIED_INDEX_KEY: &[u8] = META_APPLIED;
const META_COMPACT_SCHEDULED: &[u8] = b"m/compact_scheduled";
const META_COMPACT_FINISHED: &[u8] = b"m/compact_finished";
const FLAG_PUT: u8 = 0;
const FLAG_TOMBSTONE: u8 = 1;
/// Revisions deleted per engine batch during physical compaction.
const COMPACTION_BATCH: usize = 1000;
/// Compaction point of a store never compacted. Below 0 so that, as in etcd, compacting at
/// revision 0 is accepted once.
const NEVER_COMPACTED: i64 = -1;

pub(crate) fn rev_key(rev: Rev) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = REV_PREFIX;
    k[1..9].copy_from_slice(&(rev.main as u64).to_be_bytes());
    k[9..17].copy_from_slice(&(rev.sub as u64).to_be_bytes());
    k
}

fn parse_rev_key(k: &[u8]) -> Result<Rev, MvccError> {
    if k.len() != 17 || k[0] != REV_PREFIX {
        return Err(MvccError::Corrupt(format!("bad revision key {k:?}")));
    }
    Ok(Rev {
        main: u64::from_be_bytes(k[1..9].try_into().expect("8 bytes")) as i64,
        sub: u64::from_be_bytes(k[9..17].try_into().expect("8 bytes")) as i64,
    })
}

pub(crate) fn encode_value(kv: &KeyValue, tombstone: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + kv.encoded_len());
    v.push(if tombstone { FLAG_TOMBSTONE } else { FLAG_PUT });
    kv.encode(&mut v).expect("Vec has room");
    v
}

fn decode_value(v: &[u8]) -> Result<(KeyValue, bool), MvccError> {
    let (&flag, body) = v
        .split_first()
        .ok_or_else(|| MvccError::Corrupt("empty value".into()))?;
    let kv = KeyValue::decode(body).map_err(|e| MvccError::Corrupt(e.to_string()))?;
    Ok((kv, flag == FLAG_TOMBSTONE))
}

fn meta_i64(engine: &dyn KvEngine, key: &[u8]) -> Result<Option<i64>, MvccError> {
    match engine.get(key)? {
        None => Ok(None),
        Some(v) if v.len() == 8 => Ok(Some(i64::from_be_bytes(v[..].try_into().expect("8 bytes")))),
        Some(v) => Err(MvccError::Corrupt(format!(
            "meta {} has {} bytes",
            String::from_utf8_lossy(key),
            v.len()
        ))),
    }
}

pub(crate) fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

struct State {
    index: Index,
    current: i64,
    /// `NEVER_COMPACTED` until the first compaction.
    compacted: i64,
}

/// What the engine holds, read into memory (at open, and after a snapshot was installed).
struct Loaded {
    state: State,
    applied: u64,
    finished: i64,
    /// Revisions an unfinished compaction still has to delete.
    dropped: Vec<Rev>,
}

impl Loaded {
    fn read(engine: &dyn KvEngine) -> Result<Loaded, MvccError> {
        let started = std::time::Instant::now();
        let applied = meta_i64(engine, META_APPLIED)?.unwrap_or(0) as u64;
        let scheduled = meta_i64(engine, META_COMPACT_SCHEDULED)?.unwrap_or(NEVER_COMPACTED);
        let finished = meta_i64(engine, META_COMPACT_FINISHED)?.unwrap_or(NEVER_COMPACTED);
        let mut index = Index::default();
        let mut last = Rev::default();
        let mut failure = None;
        engine.scan(&[REV_PREFIX], &[REV_PREFIX + 1], &mut |k, v| {
            let parsed = parse_rev_key(k).and_then(|rev| decode_value(v).map(|d| (rev, d)));
            match parsed {
                Ok((rev, (kv, tombstone))) => {
                    let generation = (!tombstone).then(|| Generation::of(&kv));
                    index.insert_loaded(&kv.key, Change { rev, tombstone }, generation);
                    last = rev;
                    true
                }
                Err(e) => {
                    failure = Some(e);
                    false
                }
            }
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        let dropped = if scheduled != NEVER_COMPACTED {
            index.compact(scheduled)
        } else {
            Vec::new()
        };
        let current = last.main.max(scheduled).max(1);
        tracing::info!(
            keys = index.live_keys(),
            current,
            compacted = scheduled,
            applied,
            took_ms = started.elapsed().as_millis() as u64,
            "mvcc: store loaded"
        );
        Ok(Loaded {
            state: State {
                index,
                current,
                compacted: scheduled,
            },
            applied,
            finished,
            dropped,
        })
    }
}

struct Shared {
    engine: Arc<dyn KvEngine>,
    state: RwLock<State>,
    applied: AtomicU64,
    /// Highest compaction whose old revisions are physically gone from the engine.
    finished: Arc<AtomicI64>,
    /// Readers hold it shared while turning index revisions into values; physical compaction
    /// takes it exclusively per batch, so a reader never loses a value mid-read.
    compaction_guard: Arc<RwLock<()>>,
    compactor: std::sync::Mutex<std::sync::mpsc::Sender<CompactJob>>,
    /// Records other layers keep beside the key-value data, waiting for the next applied
    /// entry's batch (see `stage`).
    staged: parking_lot::Mutex<WriteBatch>,
}

struct CompactJob {
    rev: i64,
    dropped: Vec<Rev>,
    done: tokio::sync::oneshot::Sender<()>,
}

#[derive(Clone)]
pub struct MvccStore {
    shared: Arc<Shared>,
}

impl MvccStore {
    /// Opens the store: rebuilds the key index from the engine, reads the applied index and
    /// compaction state, and resumes an interrupted compaction.
    pub fn open(engine: Arc<dyn KvEngine>) -> Result<MvccStore, MvccError> {
        let loaded = Loaded::read(&*engine)?;
        let guard = Arc::new(RwLock::new(()));
        let finished = Arc::new(AtomicI64::new(loaded.finished));
        let (tx, rx) = std::sync::mpsc::channel();
        spawn_compactor(&engine, guard.clone(), finished.clone(), rx)?;
        let applied = loaded.applied;
        let store = MvccStore {
            shared: Arc::new(Shared {
                engine,
                state: RwLock::new(loaded.state),
                applied: AtomicU64::new(applied),
                finished,
                compaction_guard: guard,
                compactor: std::sync::Mutex::new(tx),
                staged: parking_lot::Mutex::new(WriteBatch::default()),
            }),
        };
        store.resume_compaction(loaded.dropped);
        Ok(store)
    }

    fn resume_compaction(&self, dropped: Vec<Rev>) {
        let scheduled = self.shared.state.read().compacted;
        if scheduled > self.shared.finished.load(Ordering::Acquire) {
            tracing::info!(
                revision = scheduled,
                "mvcc: resuming interrupted compaction"
            );
            self.schedule_physical(scheduled, dropped);
        }
    }

    /// Every engine record (key-value history, meta, and what other layers keep beside it),
    /// from one point in time: the applied index inside is the one the data reflects. This is
    /// what a member far behind receives instead of the log it missed.
    pub fn export(&self, f: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), MvccError> {
        self.shared.engine.scan_all(f)?;
        Ok(())
    }

    /// Replaces the whole store with an `export` of another member, durably, and reloads the
    /// in-memory index from it. `fill` hands the records, in order, to the sink it is given;
    /// they stream into the engine beside the current content, which readers keep seeing
    /// until `fill` returns. If it fails, nothing changes. Readers wait while the content is
    /// swapped and the index reloaded; the caller must not apply concurrently.
    pub fn install(
        &self,
        fill: &mut dyn FnMut(&mut RecordSink<'_>) -> Result<(), String>,
    ) -> Result<(), MvccError> {
        let mut replacement = self.shared.engine.replace()?;
        fill(&mut |k, v| Ok(replacement.put(k, v)?)).map_err(MvccError::SnapshotSource)?;
        let dropped = {
            let _exclusive = self.shared.compaction_guard.write();
            let mut state = self.shared.state.write();
            replacement.commit()?;
            let loaded = Loaded::read(&*self.shared.engine)?;
            *state = loaded.state;
            self.shared.applied.store(loaded.applied, Ordering::Release);
            self.shared
                .finished
                .store(loaded.finished, Ordering::Release);
            loaded.dropped
        };
        self.resume_compaction(dropped);
        Ok(())
    }

    /// Makes everything applied so far durable in the engine (its own write-ahead log is not
    /// synced per write: the raft log is). Returns the applied index now safe to drop the raft
    /// log up to.
    pub fn persist(&self) -> Result<u64, MvccError> {
        let applied = self.applied_index();
        self.shared.engine.flush()?;
        Ok(applied)
    }

    pub fn current_revision(&self) -> i64 {
        self.shared.state.read().current
    }

    /// The revision of the last compaction, 0 if there was none.
    pub fn compact_revision(&self) -> i64 {
        self.shared.state.read().compacted.max(0)
    }

    pub fn applied_index(&self) -> u64 {
        self.shared.applied.load(Ordering::Acquire)
    }

    /// (lease, key) of every live key written with a lease: what the lessor must re-attach
    /// after a restart or a snapshot install.
    pub fn leased_keys(&self) -> Result<Vec<(i64, Vec<u8>)>, MvccError> {
        let all = self.range(&RangeRequest {
            key: vec![0],
            range_end: vec![0],
            ..Default::default()
        })?;
        Ok(all
            .kvs
            .into_iter()
            .filter(|kv| kv.lease != 0)
            .map(|kv| (kv.lease, kv.key))
            .collect())
    }

    pub fn keys_total(&self) -> usize {
        self.shared.state.read().index.live_keys()
    }

    pub fn db_size(&self) -> i64 {
        self.shared.engine.size_bytes() as i64
    }

    pub fn db_size_in_use(&self) -> i64 {
        self.shared.engine.size_in_use() as i64
    }

    /// Reclaims engine space (etcd's defragment).
    pub fn defragment(&self) -> Result<(), MvccError> {
        Ok(self.shared.engine.compact_all()?)
    }

    /// Pushes buffered engine writes to its files; for an orderly shutdown.
    pub fn flush(&self) -> Result<(), MvccError> {
        Ok(self.shared.engine.flush()?)
    }

    /// A Range at the request's revision (or the newest); the header carries the current revision.
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse, MvccError> {
        let _reading = self.shared.compaction_guard.read();
        // One revision for header and data: a write landing mid-call must not show up in the
        // values while the header still names the revision before it.
        let (current, at) = {
            let st = self.shared.state.read();
            (
                st.current,
                check_rev(req.revision, st.current, st.compacted)?,
            )
        };
        range::respond(req, current, |kr, limit, count_only| {
            self.collect(kr, at, limit, count_only)
        })
    }

    /// Values visible at `at` (<= 0: newest) in `kr`, at most `limit` (0: all), and how many
    /// matched in total. Callers hold the compaction guard.
    fn collect(
        &self,
        kr: KeyRange<'_>,
        at: i64,
        limit: usize,
        count_only: bool,
    ) -> Result<(Vec<KeyValue>, usize), MvccError> {
        let revs = {
            let st = self.shared.state.read();
            let rev = check_rev(at, st.current, st.compacted)?;
            let mut revs = Vec::new();
            st.index.range(kr, rev, |_, r| {
                revs.push(r);
                true
            });
            revs
        };
        let count = revs.len();
        if count_only {
            return Ok((Vec::new(), count));
        }
        let take = if limit == 0 { count } else { limit.min(count) };
        let mut kvs = Vec::with_capacity(take);
        for rev in &revs[..take] {
            kvs.push(self.value_at(*rev)?.0);
        }
        Ok((kvs, count))
    }

    fn value_at(&self, rev: Rev) -> Result<(KeyValue, bool), MvccError> {
        let v = self.shared.engine.get(&rev_key(rev))?.ok_or_else(|| {
            MvccError::Corrupt(format!("revision {}.{} missing", rev.main, rev.sub))
        })?;
        decode_value(&v)
    }

    /// The key's live value at `at`, if any.
    pub(crate) fn get_at(&self, key: &[u8], at: i64) -> Result<Option<KeyValue>, MvccError> {
        let rev = self.shared.state.read().index.get(key, at);
        match rev {
            Some(rev) => Ok(Some(self.value_at(rev)?.0)),
            None => Ok(None),
        }
    }

    /// Queues records another layer keeps beside the key-value data (lease records) for the
    /// batch of the entry being applied: the next `apply` writes them together with that
    /// entry's changes and index, so a restart finds both or neither, and an entry costs one
    /// engine write instead of two.
    pub fn stage(&self, batch: WriteBatch) {
        self.shared.staged.lock().ops.extend(batch.ops);
    }

    fn take_staged(&self) -> WriteBatch {
        std::mem::take(&mut *self.shared.staged.lock())
    }

    /// Applies one replicated write: one engine batch holding its changes and `index`.
    /// An index at or below the applied one is a replay and changes nothing.
    pub fn apply(
        &self,
        index: u64,
        op: WriteOp<'_>,
        lease_exists: &dyn Fn(i64) -> bool,
    ) -> Result<Applied, MvccError> {
        if index != 0 && index <= self.applied_index() {
            return Ok(Applied {
                response: WriteResponse::None,
                revision: self.current_revision(),
                events: Vec::new(),
                compaction: None,
            });
        }
        if let WriteOp::Compact(c) = op {
            return self.compact(index, c);
        }
        // No compaction guard: a write reads only revisions no running compaction can drop,
        // since compactions are themselves applied by this single writer.
        let mut w = write::WriteTxn::begin(self);
        let result = match op {
            WriteOp::Put(p) => w.put_request(p, lease_exists).map(WriteResponse::Put),
            WriteOp::DeleteRange(d) => w.delete_request(d).map(WriteResponse::DeleteRange),
            WriteOp::Txn(t) => w.txn_request(t, lease_exists).map(WriteResponse::Txn),
            WriteOp::Compact(_) | WriteOp::Noop => Ok(WriteResponse::None),
        };
        match result {
            Ok(response) => {
                let (revision, events) = w.commit(index)?;
                Ok(Applied {
                    response,
                    revision,
                    events,
                    compaction: None,
                })
            }
            Err(e) => {
                // The request failed as a whole; only the index moves on.
                write::WriteTxn::begin(self).commit(index)?;
                Err(e)
            }
        }
    }

    /// Applies consecutive plain puts, one raft entry each (`(index, request)`, indexes
    /// increasing), as `apply` would one by one, but with one engine write and one index
    /// update for all of them: under load most committed batches are runs of such puts, and
    /// a write per entry (each also rewriting the applied index) was most of the applier's
    /// cost. Nothing is visible to readers before the whole run is. Each put gets its own
    /// revision; one whose lease is missing fails (`LeaseNotFound`) without one, as alone.
    /// A plain put has none of `prev_kv`, `ignore_value`, `ignore_lease`: it reads only the
    /// index, never a stored value.
    pub fn apply_puts(
        &self,
        puts: &[(u64, &PutRequest)],
        lease_exists: &dyn Fn(i64) -> bool,
    ) -> Result<Vec<PutOutcome>, MvccError> {
        debug_assert!(puts
            .iter()
            .all(|(_, p)| !(p.prev_kv || p.ignore_value || p.ignore_lease)));
        let Some(last_index) = puts.last().map(|(i, _)| *i) else {
            return Ok(Vec::new());
        };
        let mut rev = self.current_revision();
        let mut batch = self.take_staged();
        // Generations of keys written earlier in this run (the index does not have them yet).
        let mut written: std::collections::HashMap<&[u8], Generation> =
            std::collections::HashMap::new();
        let mut changes = Vec::with_capacity(puts.len());
        let mut out = Vec::with_capacity(puts.len());
        for (_, p) in puts {
            if p.lease != 0 && !lease_exists(p.lease) {
                out.push(Err(MvccError::LeaseNotFound));
                continue;
            }
            rev += 1;
            let generation = match written.get(p.key.as_slice()) {
                Some(g) => Some(*g),
                None => self.shared.state.read().index.latest(&p.key),
            };
            let kv = write::put_value(&p.key, p.value.clone(), p.lease, generation, rev);
            let at = Rev { main: rev, sub: 0 };
            batch.put(rev_key(at).to_vec(), encode_value(&kv, false));
            written.insert(&p.key, Generation::of(&kv));
            changes.push((
                &p.key,
                Change {
                    rev: at,
                    tombstone: false,
                },
            ));
            out.push(Ok((
                PutResponse {
                    header: header(rev),
                    prev_kv: None,
                },
                Event {
                    r#type: EventType::Put as i32,
                    kv: Some(kv),
                    prev_kv: None,
                },
            )));
        }
        batch.put(META_APPLIED, (last_index as i64).to_be_bytes().to_vec());
        self.shared.engine.write(batch)?;
        self.set_applied(last_index);
        if !changes.is_empty() {
            let mut st = self.shared.state.write();
            for (key, change) in changes {
                st.index.insert(key, change);
            }
            st.current = rev;
        }
        Ok(out)
    }

    fn compact(&self, index: u64, req: &CompactionRequest) -> Result<Applied, MvccError> {
        let rev = req.revision;
        let mut batch = self.take_staged();
        if index != 0 {
            batch.put(META_APPLIED, (index as i64).to_be_bytes().to_vec());
        }
        let check = {
            let st = self.shared.state.read();
            if rev <= st.compacted {
                Err(MvccError::Compacted)
            } else if rev > st.current {
                Err(MvccError::FutureRevision)
            } else {
                Ok(st.current)
            }
        };
        let current = match check {
            Ok(c) => c,
            Err(e) => {
                self.shared.engine.write(batch)?;
                self.set_applied(index);
                return Err(e);
            }
        };
        batch.put(META_COMPACT_SCHEDULED, rev.to_be_bytes().to_vec());
        self.shared.engine.write(batch)?;
        self.set_applied(index);
        let dropped = {
            let mut st = self.shared.state.write();
            st.compacted = rev;
            st.index.compact(rev)
        };
        let wait = self.schedule_physical(rev, dropped);
        Ok(Applied {
            response: WriteResponse::Compact(CompactionResponse {
                header: header(current),
            }),
            revision: current,
            events: Vec::new(),
            compaction: Some(wait),
        })
    }

    fn schedule_physical(&self, rev: i64, dropped: Vec<Rev>) -> CompactionWait {
        let (done, wait) = tokio::sync::oneshot::channel();
        let job = CompactJob { rev, dropped, done };
        if let Err(e) = self.shared.compactor.lock().expect("compactor").send(job) {
            // The compactor only stops with the process; the history stays until next start.
            tracing::error!("mvcc: compactor gone: {e}");
        }
        CompactionWait(wait)
    }

    fn set_applied(&self, index: u64) {
        if index != 0 {
            self.shared.applied.store(index, Ordering::Release);
        }
    }

    /// History for watchers: the events of revisions `start_rev..=current` in revision order,
    /// whole revisions only, stopping once about `limit` events are gathered. As in etcd, a
    /// start at the compaction point itself is allowed (its surviving changes are returned);
    /// a start below it is `Compacted`.
    pub fn events_since(&self, start_rev: i64, limit: usize) -> Result<Vec<Event>, MvccError> {
        let _reading = self.shared.compaction_guard.read();
        let (current, compacted) = {
            let st = self.shared.state.read();
            (st.current, st.compacted)
        };
        if start_rev < compacted {
            return Err(MvccError::Compacted);
        }
        let first = start_rev.max(1);
        if first > current {
            return Ok(Vec::new());
        }
        let mut raw = Vec::new();
        let mut failure = None;
        let start = rev_key(Rev {
            main: first,
            sub: 0,
        });
        // Not past `current`: the engine may already hold the next write, whose events the
        // applier has not handed out yet; returning them here would deliver them twice.
        let end = rev_key(Rev {
            main: current + 1,
            sub: 0,
        });
        self.shared
            .engine
            .scan(&start, &end, &mut |k, v| match parse_rev_key(k)
                .and_then(|r| decode_value(v).map(|d| (r, d)))
            {
                Ok((rev, decoded)) => {
                    if raw.len() >= limit.max(1)
                        && raw
                            .last()
                            .is_some_and(|(r, _): &(Rev, _)| r.main != rev.main)
                    {
                        return false;
                    }
                    raw.push((rev, decoded));
                    true
                }
                Err(e) => {
                    failure = Some(e);
                    false
                }
            })?;
        if let Some(e) = failure {
            return Err(e);
        }
        // All index look-ups under one lock: previous values, and at the compaction point
        // whether a change survived (its physical deletion may still be pending).
        let prevs: Vec<Option<Rev>> = {
            let st = self.shared.state.read();
            if start_rev < st.compacted {
                return Err(MvccError::Compacted);
            }
            raw.retain(|(rev, (kv, _))| rev.main > st.compacted || st.index.holds(&kv.key, *rev));
            raw.iter()
                .map(|(rev, (kv, _))| st.index.get(&kv.key, rev.main - 1))
                .collect()
        };
        let mut events = Vec::with_capacity(raw.len());
        for ((rev, (mut kv, tombstone)), prev) in raw.into_iter().zip(prevs) {
            let prev_kv = match prev {
                Some(r) => Some(self.value_at(r)?.0),
                None => None,
            };
            let kind = if tombstone {
                kv.mod_revision = rev.main;
                EventType::Delete
            } else {
                EventType::Put
            };
            events.push(Event {
                r#type: kind as i32,
                kv: Some(kv),
                prev_kv,
            });
        }
        Ok(events)
    }

    /// A checksum of the revisions up to `rev` (0: newest) that compaction keeps, equal on
    /// members that applied the same log whatever their physical compaction progress.
    /// Returns (hash, compact revision (-1 if never compacted, as etcd reports), revision
    /// hashed). Like etcd, `rev` at or below the compaction point is `Compacted`.
    pub fn hash_kv(&self, rev: i64) -> Result<(u32, i64, i64), MvccError> {
        let _reading = self.shared.compaction_guard.read();
        let (current, compacted, held) = {
            let st = self.shared.state.read();
            if rev > 0 && rev <= st.compacted {
                return Err(MvccError::Compacted);
            }
            if rev > st.current {
                return Err(MvccError::FutureRevision);
            }
            let pending = self.shared.finished.load(Ordering::Acquire) < st.compacted;
            let held = pending.then(|| st.index.held_up_to(st.compacted));
            (st.current, st.compacted, held)
        };
        let rev = if rev == 0 { current } else { rev };
        let mut h = crc32fast::Hasher::new();
        if rev < 0 {
            // etcd hashes nothing for a negative revision.
            return Ok((h.finalize(), compacted, rev));
        }
        let end = rev_key(Rev {
            main: rev + 1,
            sub: 0,
        });
        let mut failure = None;
        self.shared.engine.scan(&[REV_PREFIX], &end, &mut |k, v| {
            if let Some(held) = &held {
                match parse_rev_key(k) {
                    Ok(r) if r.main <= compacted && !held.contains(&r) => return true,
                    Ok(_) => {}
                    Err(e) => {
                        failure = Some(e);
                        return false;
                    }
                }
            }
            h.update(k);
            h.update(v);
            true
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        Ok((h.finalize(), compacted, rev))
    }
}

/// etcd's revision rules for reads: <= 0 means newest; beyond newest is an error; below the
/// compaction point is gone.
fn check_rev(at: i64, current: i64, compacted: i64) -> Result<i64, MvccError> {
    if at > current {
        return Err(MvccError::FutureRevision);
    }
    let rev = if at <= 0 { current } else { at };
    if rev < compacted {
        return Err(MvccError::Compacted);
    }
    Ok(rev)
}

/// The compactor holds the engine weakly: dropping the last store handle closes the engine at
/// once (RocksDB must be closed before the process exits, or its teardown aborts).
fn spawn_compactor(
    engine: &Arc<dyn KvEngine>,
    guard: Arc<RwLock<()>>,
    finished: Arc<AtomicI64>,
    jobs: std::sync::mpsc::Receiver<CompactJob>,
) -> Result<(), MvccError> {
    let engine = Arc::downgrade(engine);
    std::thread::Builder::new()
        .name("mvcc-compactor".into())
        .spawn(move || {
            // After a failed batch nothing more is recorded as finished, so the next open
            // redoes the latest compaction, which also covers the revisions left behind.
            let mut broken = false;
            for job in jobs {
                if broken {
                    continue;
                }
                let Some(engine) = engine.upgrade() else {
                    break;
                };
                let started = std::time::Instant::now();
                let mut failed = None;
                for chunk in job.dropped.chunks(COMPACTION_BATCH) {
                    let mut batch = WriteBatch::default();
                    for rev in chunk {
                        batch.delete(rev_key(*rev).to_vec());
                    }
                    let _exclusive = guard.write();
                    if let Err(e) = engine.write(batch) {
                        failed = Some(e);
                        break;
                    }
                }
                if let Some(e) = failed {
                    // Not recorded as finished: the next open schedules it again.
                    tracing::error!(revision = job.rev, error = %e, "mvcc: compaction failed");
                    broken = true;
                    continue;
                }
                let mut batch = WriteBatch::default();
                batch.put(META_COMPACT_FINISHED, job.rev.to_be_bytes().to_vec());
                if let Err(e) = engine.write(batch) {
                    tracing::error!(error = %e, "mvcc: recording compaction failed");
                }
                finished.fetch_max(job.rev, Ordering::AcqRel);
                tracing::info!(
                    revision = job.rev,
                    removed = job.dropped.len(),
                    took_ms = started.elapsed().as_millis() as u64,
                    "mvcc: compaction finished"
                );
                let _ = job.done.send(());
            }
        })
        .map_err(|e| MvccError::Corrupt(format!("cannot start compactor: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests;
