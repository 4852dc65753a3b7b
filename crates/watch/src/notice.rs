//! What the hub writes into a stream's sink.

use std::fmt;
use std::sync::Arc;

use oxcd_proto::mvccpb::Event;

use crate::event_revision;

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
        events: WatchEvents,
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

/// The events of one notice. They are not copied per watcher: every watcher given the same
/// published revision (or the same history read) refers to one shared batch and keeps only
/// which of its events it wants, so a queued notice costs a few words however many watchers
/// receive it. The gRPC layer copies the events out as it sends them.
#[derive(Clone)]
pub struct WatchEvents {
    batch: Arc<[Event]>,
    picks: Picks,
    /// Whether the watcher wants `prev_kv`; the batch always carries it.
    prev_kv: bool,
}

#[derive(Clone)]
enum Picks {
    /// `batch[from..to]`, the common case: every event of a revision, or a run of history.
    Span(u32, u32),
    /// Ascending positions in the batch.
    List(Box<[u32]>),
}

impl WatchEvents {
    /// The events of `batch` at `positions` (ascending).
    pub(crate) fn pick(batch: &Arc<[Event]>, positions: &[u32], prev_kv: bool) -> WatchEvents {
        let contiguous = positions.windows(2).all(|w| w[1] == w[0] + 1);
        let picks = match (positions.first(), positions.last()) {
            (Some(&from), Some(&last)) if contiguous => Picks::Span(from, last + 1),
            (None, _) | (_, None) => Picks::Span(0, 0),
            _ => Picks::List(positions.into()),
        };
        WatchEvents {
            batch: batch.clone(),
            picks,
            prev_kv,
        }
    }

    pub fn len(&self) -> usize {
        match &self.picks {
            Picks::Span(from, to) => (to - from) as usize,
            Picks::List(list) => list.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The events as stored in the batch: `prev_kv` is set whether or not the watcher asked
    /// for it (see [`WatchEvents::prev_kv`]).
    pub fn iter(&self) -> impl Iterator<Item = &Event> + '_ {
        let (span, list) = match &self.picks {
            Picks::Span(from, to) => (&self.batch[*from as usize..*to as usize], &[][..]),
            Picks::List(list) => (&[][..], &list[..]),
        };
        span.iter()
            .chain(list.iter().map(|&i| &self.batch[i as usize]))
    }

    /// Whether the watcher receives `prev_kv`.
    pub fn prev_kv(&self) -> bool {
        self.prev_kv
    }

    /// The event as the watcher receives it.
    pub fn shaped(&self, ev: &Event) -> Event {
        Event {
            r#type: ev.r#type,
            kv: ev.kv.clone(),
            prev_kv: if self.prev_kv {
                ev.prev_kv.clone()
            } else {
                None
            },
        }
    }

    /// Copies of the events as the watcher receives them.
    pub fn to_vec(&self) -> Vec<Event> {
        self.iter().map(|e| self.shaped(e)).collect()
    }

    /// Keeps only the events of revisions up to `rev`.
    pub(crate) fn keep_through(&mut self, rev: i64) {
        match &mut self.picks {
            Picks::Span(from, to) => {
                let span = &self.batch[*from as usize..*to as usize];
                *to = *from + span.partition_point(|e| event_revision(e) <= rev) as u32;
            }
            Picks::List(list) => {
                let keep =
                    list.partition_point(|&i| event_revision(&self.batch[i as usize]) <= rev);
                if keep < list.len() {
                    *list = list[..keep].into();
                }
            }
        }
    }
}

impl fmt::Debug for WatchEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.iter().map(|e| self.shaped(e)))
            .finish()
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
