//! watch: delivers every change of the key space to the watchers interested in it, in revision
//! order, without losing or repeating an event, however slow a watcher's reader is.
//!
//! Reads: `Events` (one per applied revision) from the applier's bounded channel, and
//! [`History`] (the mvcc store) to catch watchers up on revisions they have not seen yet.
//! Writes: [`Notice`]s to the bounded sink each watch stream hands in (one sink per gRPC stream,
//! shared by the stream's watchers), never waiting on it: a full sink turns its watchers into
//! "victims" that later re-read what they missed from History. Notices do not copy events:
//! all watchers given one revision (or one history read) share it ([`WatchEvents`]), so
//! memory grows with watchers and queued notices by a few words each, not by event sizes.
//!
//! One task (the hub) owns all watcher state: a synced group that receives events as they are
//! published and an unsynced group that catches up from History in bounded batches on a
//! blocking thread, so a slow read never delays publishing.

mod hub;
mod notice;
mod range;

use oxcd_proto::etcdserverpb::{watch_create_request::FilterType, WatchCreateRequest};
use oxcd_proto::mvccpb::{event::EventType, Event, KeyValue};

pub use hub::{HubStats, WatchConfig, WatchHub, WatchStream};
pub use notice::{Notice, PendingEvents, WatchEvents};
pub use range::KeyRange;

/// Metric names, as etcd exports them.
pub mod metric_names {
    /// Watchers currently registered (gauge).
    pub const WATCHERS: &str = "etcd_debugging_mvcc_watcher_total";
    /// Watchers not caught up: unsynced or victims of a full sink (gauge).
    pub const SLOW_WATCHERS: &str = "etcd_debugging_mvcc_slow_watcher_total";
    /// Events handed to sinks and not yet taken by the stream's sender (gauge).
    pub const PENDING_EVENTS: &str = "etcd_debugging_mvcc_pending_events_total";
}

/// History the watch layer catches up from (implemented over mvcc-store by the server).
///
/// `events_since` blocks and runs on tokio's blocking pool, never on the hub's task.
pub trait History: Send + Sync + 'static {
    /// Latest revision written to the store. Must be cheap: the hub asks it on its own task
    /// when a watcher starts "from now".
    fn current_revision(&self) -> i64;
    /// Revision of the last compaction, 0 when the store was never compacted.
    fn compact_revision(&self) -> i64;
    /// Events with revision >= `start_rev` in revision order, `prev_kv` filled, whole revisions
    /// only, roughly at most `limit` events (a revision is never split, so the answer may
    /// exceed `limit` to finish the last one). An event's revision is its `kv.mod_revision`
    /// (for a delete, the revision of the delete, as etcd reports it).
    ///
    /// `Err(HistoryError::Compacted)` if `start_rev < compact_revision`: etcd still serves a
    /// watch that starts exactly at the compacted revision, from whatever that revision kept.
    /// (An implementation that also refuses `start_rev == compact_revision` is tolerated: the
    /// hub then cancels those watchers as compacted instead of retrying forever.)
    fn events_since(&self, start_rev: i64, limit: usize) -> Result<Vec<Event>, HistoryError>;
    /// The key's value at revision `rev`, None if it had none. A point read the hub makes on
    /// its own task, only for a watcher that wants `prev_kv` of a published put that left it
    /// out (see [`Events`]). `Err(HistoryError::Compacted)` below the compact revision; the
    /// event then goes out without `prev_kv`, as etcd sends it.
    fn value_at(&self, key: &[u8], rev: i64) -> Result<Option<KeyValue>, HistoryError>;
}

/// What the applier publishes after each applied revision (on a bounded tokio mpsc channel).
#[derive(Clone, Debug, PartialEq)]
pub struct Events {
    pub revision: i64,
    /// Every change of the revision, in the order applied. `prev_kv` is filled, except that
    /// a put of an existing key (version above 1) may leave it out: the applier does not read
    /// the value a put replaces unless something needs it, and the hub loads it from History
    /// for the watchers that want it. Empty: see [`Events::jumped_to`].
    pub events: Vec<Event>,
}

impl Events {
    /// The store jumped to `revision` without its changes being published one by one (it
    /// installed another member's snapshot): watchers re-read what they miss from History.
    pub fn jumped_to(revision: i64) -> Events {
        Events {
            revision,
            events: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("mvcc: required revision has been compacted")]
    Compacted { compact_revision: i64 },
    #[error("watch history unavailable: {0}")]
    Unavailable(String),
}

/// Why a watch operation failed; the texts are etcd's, as clients see them in `cancel_reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    #[error("mvcc: duplicate watch ID provided on the WatchStream")]
    DuplicateId,
    #[error("mvcc: watcher range is empty")]
    EmptyRange,
    #[error("mvcc: watcher does not exist")]
    NotExist,
    #[error("watch: stream is closed")]
    StreamClosed,
    #[error("watch: hub has stopped")]
    HubStopped,
}

/// A watcher as a client asks for it (etcd's `WatchCreateRequest`, wire semantics kept).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchSpec {
    /// 0 lets the stream pick the next free id (0, 1, 2, ...); any other value is taken as is.
    pub watch_id: i64,
    pub key: Vec<u8>,
    /// Empty: `key` only. `"\0"`: every key from `key` on. Otherwise `[key, range_end)`.
    pub range_end: Vec<u8>,
    /// 0: changes after the current revision. A past revision replays history first (or
    /// cancels with the compacted revision); a future one waits for the store to reach it.
    pub start_revision: i64,
    pub prev_kv: bool,
    pub progress_notify: bool,
    pub no_put: bool,
    pub no_delete: bool,
    /// Split large event batches across responses (applied by the gRPC layer).
    pub fragment: bool,
}

impl From<&WatchCreateRequest> for WatchSpec {
    fn from(req: &WatchCreateRequest) -> Self {
        let has = |f: FilterType| req.filters.contains(&(f as i32));
        WatchSpec {
            watch_id: req.watch_id,
            key: req.key.clone(),
            range_end: req.range_end.clone(),
            start_revision: req.start_revision,
            prev_kv: req.prev_kv,
            progress_notify: req.progress_notify,
            no_put: has(FilterType::Noput),
            no_delete: has(FilterType::Nodelete),
            fragment: req.fragment,
        }
    }
}

/// How one watcher wants its events: filters and whether `prev_kv` stays.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct EventShape {
    pub prev_kv: bool,
    pub no_put: bool,
    pub no_delete: bool,
}

impl EventShape {
    pub(crate) fn keeps(&self, ev: &Event) -> bool {
        if ev.r#type == EventType::Delete as i32 {
            !self.no_delete
        } else {
            !self.no_put
        }
    }
}

/// The revision an event belongs to (etcd stamps deletes with the delete's revision).
pub(crate) fn event_revision(ev: &Event) -> i64 {
    ev.kv.as_ref().map_or(0, |kv| kv.mod_revision)
}

pub(crate) fn event_key(ev: &Event) -> &[u8] {
    ev.kv.as_ref().map_or(&[][..], |kv| kv.key.as_slice())
}

/// A put of an existing key published without the value it replaced (see [`Events`]).
pub(crate) fn lacks_prev(ev: &Event) -> bool {
    ev.r#type == EventType::Put as i32
        && ev.prev_kv.is_none()
        && ev.kv.as_ref().is_some_and(|kv| kv.version > 1)
}
