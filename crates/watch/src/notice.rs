//! What the hub writes into a stream's sink.

use std::fmt;

use oxcd_proto::mvccpb::Event;

/// One item for a watch stream; the gRPC layer turns each into one `WatchResponse` (or several
/// fragments). `revision` is the header revision etcd would report with it.
#[derive(Debug)]
pub enum Notice {
    /// The watcher exists; sent before any of its events.
    Created { watch_id: i64, revision: i64 },
    /// The create request was refused (etcd answers created + canceled with watch id -1).
    Rejected { revision: i64, reason: String },
    /// Changes for one watcher: one whole revision when synced, or several whole revisions
    /// read from history while catching up. `revision` is the last revision the watcher has
    /// now seen in full.
    Events {
        watch_id: i64,
        revision: i64,
        events: Vec<Event>,
        /// The watcher asked for large batches to be split.
        fragment: bool,
        /// Accounts the events as pending until the notice is dropped.
        pending: PendingEvents,
    },
    /// Nothing happened up to `revision` for this watcher (`watch_id` -1: for every watcher
    /// of the stream, the answer to a progress request).
    Progress { watch_id: i64, revision: i64 },
    /// The watcher is gone: canceled by the client, or (`compact_revision` != 0) because the
    /// revisions it still needed were compacted away.
    Canceled {
        watch_id: i64,
        revision: i64,
        compact_revision: i64,
    },
}

impl Notice {
    pub fn watch_id(&self) -> i64 {
        match self {
            Notice::Created { watch_id, .. }
            | Notice::Events { watch_id, .. }
            | Notice::Progress { watch_id, .. }
            | Notice::Canceled { watch_id, .. } => *watch_id,
            Notice::Rejected { .. } => -1,
        }
    }

    pub fn revision(&self) -> i64 {
        match self {
            Notice::Created { revision, .. }
            | Notice::Rejected { revision, .. }
            | Notice::Events { revision, .. }
            | Notice::Progress { revision, .. }
            | Notice::Canceled { revision, .. } => *revision,
        }
    }
}

/// Keeps `etcd_debugging_mvcc_pending_events_total` honest: counted up when events enter a
/// sink, down when the notice carrying them is dropped (sent, or discarded with the stream).
pub struct PendingEvents {
    count: u64,
    gauge: metrics::Gauge,
}

impl PendingEvents {
    pub(crate) fn new(count: usize, gauge: &metrics::Gauge) -> Self {
        gauge.increment(count as f64);
        PendingEvents {
            count: count as u64,
            gauge: gauge.clone(),
        }
    }
}

impl Drop for PendingEvents {
    fn drop(&mut self) {
        self.gauge.decrement(self.count as f64);
    }
}

impl fmt::Debug for PendingEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PendingEvents({})", self.count)
    }
}
