//! The hub task: owns every watcher, fans published revisions out to synced watchers and
//! drives catch-up of unsynced ones from History.
//!
//! Invariants:
//! - A synced watcher has seen, or never wanted, every revision up to the hub's revision; it
//!   receives each later revision as one notice when it is published.
//! - An unsynced watcher has seen everything below its `min_rev`; catch-up reads History from
//!   there. A watcher whose sink is full when a revision is published becomes unsynced at that
//!   revision (a "victim") and holds nothing: it re-reads what it missed later.
//! - The hub only `try_send`s into sinks and is the only sender of each sink, so a free slot
//!   seen by `capacity()` is still free when the hub uses it. Control notices (created,
//!   canceled, rejected) that find the sink full wait in a per-stream backlog that is flushed
//!   before anything else; the client request that produced one is answered only when its
//!   notice is in the sink, which bounds the backlog by the requests in flight.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use oxcd_proto::mvccpb::Event;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::notice::{Notice, PendingEvents, WatchEvents};
use crate::range::{KeyRange, WatcherGroup, WatcherKey};
use crate::{
    event_key, event_revision, lacks_prev, metric_names, EventShape, Events, History, HistoryError,
    WatchError, WatchSpec,
};

/// Tuning of the hub; the defaults follow etcd where etcd has a number.
#[derive(Clone, Debug)]
pub struct WatchConfig {
    /// Progress notifications to idle synced watchers that asked for them (etcd: 10 minutes,
    /// `--experimental-watch-progress-notify-interval`).
    pub progress_notify_interval: Duration,
    /// Events asked of History per read.
    pub catchup_read_limit: usize,
    /// Events one catch-up job may read in total (several reads serve watchers far apart).
    pub catchup_job_budget: usize,
    /// Unsynced watchers served per catch-up job (etcd: 512).
    pub max_watchers_per_sync: usize,
    /// Pause before retrying after History failed.
    pub retry_backoff: Duration,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            progress_notify_interval: Duration::from_secs(600),
            catchup_read_limit: 1000,
            catchup_job_budget: 4000,
            max_watchers_per_sync: 512,
            retry_backoff: Duration::from_millis(100),
        }
    }
}

/// Counters for tests and diagnostics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HubStats {
    /// The last revision published to the hub.
    pub revision: i64,
    pub streams: usize,
    pub watchers: usize,
    /// Distinct ranges watched (watchers on the same range share it).
    pub ranges: usize,
    pub synced: usize,
    pub unsynced: usize,
    /// Streams whose sink was found full and not yet drained.
    pub blocked_streams: usize,
    /// Control notices waiting for sink space, over all streams.
    pub backlog: usize,
    /// Watchers in the catch-up job now running.
    pub catching_up: usize,
}

type StreamKey = u64;
type Reply = oneshot::Sender<Result<i64, WatchError>>;
/// A reply held back until its control notice is in the sink, with the answer it will carry.
type OwedReply = (Reply, Result<i64, WatchError>);

enum Command {
    Open {
        stream: StreamKey,
        sink: mpsc::Sender<Notice>,
    },
    Create {
        stream: StreamKey,
        spec: WatchSpec,
        reply: Reply,
    },
    Cancel {
        stream: StreamKey,
        watch_id: i64,
        reply: Reply,
    },
    Progress {
        stream: StreamKey,
        reply: Reply,
    },
    Close {
        stream: StreamKey,
    },
    Stats {
        reply: oneshot::Sender<HubStats>,
    },
}

struct Shared {
    revision: AtomicI64,
    next_stream: AtomicU64,
}

/// Handle to the hub task; cheap to clone. The task stops once every handle and every
/// [`WatchStream`] is gone.
#[derive(Clone)]
pub struct WatchHub {
    commands: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
}

impl WatchHub {
    /// Spawns the hub on the current tokio runtime. Events at or below History's current
    /// revision are taken as already known (they are in History) and skipped.
    pub fn start(
        history: Arc<dyn History>,
        events: mpsc::Receiver<Events>,
        cfg: WatchConfig,
    ) -> WatchHub {
        let revision = history.current_revision();
        let shared = Arc::new(Shared {
            revision: AtomicI64::new(revision),
            next_stream: AtomicU64::new(1),
        });
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (wake_tx, wake_rx) = mpsc::unbounded_channel();
        let (job_tx, job_rx) = mpsc::unbounded_channel();
        let hub = Hub {
            history,
            cfg,
            rev: revision,
            shared: shared.clone(),
            watchers: HashMap::new(),
            ranges: HashMap::new(),
            next_watcher: 1,
            synced: WatcherGroup::default(),
            unsynced_count: 0,
            ready: BTreeSet::new(),
            ready_cursor: 0,
            progress_watchers: HashSet::new(),
            streams: HashMap::new(),
            progress_waiting: HashSet::new(),
            job_members: Vec::new(),
            job_running: false,
            retry_at: None,
            wake_tx,
            job_tx,
            gauges: Gauges::new(),
            scratch: Vec::new(),
        };
        tokio::spawn(hub.run(command_rx, events, wake_rx, job_rx));
        WatchHub { commands, shared }
    }

    /// Opens a watch stream delivering into `sink`. The hub never waits on the sink; size it
    /// for bursts (etcd uses 128) and drain it promptly.
    pub fn open_stream(&self, sink: mpsc::Sender<Notice>) -> WatchStream {
        let stream = self.shared.next_stream.fetch_add(1, Ordering::Relaxed);
        let _ = self.commands.send(Command::Open { stream, sink });
        WatchStream {
            stream,
            commands: self.commands.clone(),
            shared: self.shared.clone(),
        }
    }

    /// The last revision published to the hub.
    pub fn revision(&self) -> i64 {
        self.shared.revision.load(Ordering::Acquire)
    }

    pub async fn stats(&self) -> Result<HubStats, WatchError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Stats { reply })
            .map_err(|_| WatchError::HubStopped)?;
        rx.await.map_err(|_| WatchError::HubStopped)
    }
}

/// One client stream's watchers (etcd's WatchStream): watch ids are scoped to it and all its
/// watchers deliver into its sink. Dropping it cancels them all.
pub struct WatchStream {
    stream: StreamKey,
    commands: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
}

impl WatchStream {
    /// Creates a watcher and returns its id once its `Created` notice (or, on error, its
    /// `Rejected` notice) is in the sink.
    pub async fn watch(&self, spec: WatchSpec) -> Result<i64, WatchError> {
        self.call(|reply| Command::Create {
            stream: self.stream,
            spec,
            reply,
        })
        .await
    }

    /// Cancels a watcher; returns once its `Canceled` notice is in the sink, after which the
    /// sink receives nothing more for it.
    pub async fn cancel(&self, watch_id: i64) -> Result<(), WatchError> {
        self.call(|reply| Command::Cancel {
            stream: self.stream,
            watch_id,
            reply,
        })
        .await
        .map(|_| ())
    }

    /// Asks for a `Progress` notice with watch id -1 at the hub's revision. As etcd 3.5 does,
    /// it is only sent once every watcher of the stream is synced, so it never claims a
    /// revision whose events are still to come; a stream without watchers is answered at once.
    pub async fn request_progress(&self) -> Result<(), WatchError> {
        self.call(|reply| Command::Progress {
            stream: self.stream,
            reply,
        })
        .await
        .map(|_| ())
    }

    /// The last revision published to the hub.
    pub fn revision(&self) -> i64 {
        self.shared.revision.load(Ordering::Acquire)
    }

    async fn call(&self, cmd: impl FnOnce(Reply) -> Command) -> Result<i64, WatchError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(cmd(reply))
            .map_err(|_| WatchError::HubStopped)?;
        rx.await.map_err(|_| WatchError::StreamClosed)?
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Close {
            stream: self.stream,
        });
    }
}

struct Gauges {
    watchers: metrics::Gauge,
    slow: metrics::Gauge,
    pending: metrics::Gauge,
}

impl Gauges {
    fn new() -> Self {
        Gauges {
            watchers: metrics::gauge!(metric_names::WATCHERS),
            slow: metrics::gauge!(metric_names::SLOW_WATCHERS),
            pending: metrics::gauge!(metric_names::PENDING_EVENTS),
        }
    }
}

struct Watcher {
    stream: StreamKey,
    id: i64,
    /// Shared with every other watcher on the same range (see `Hub::ranges`).
    range: Arc<KeyRange>,
    /// Lowest revision this watcher still wants.
    min_rev: i64,
    shape: EventShape,
    fragment: bool,
    progress_notify: bool,
    synced: bool,
    /// No events sent since the last progress tick (etcd elides the next notification
    /// after an event).
    idle: bool,
}

struct Stream {
    sink: mpsc::Sender<Notice>,
    ids: HashMap<i64, WatcherKey>,
    next_id: i64,
    /// Control notices that found the sink full, with the reply owed once each is sent.
    backlog: VecDeque<(Notice, Option<OwedReply>)>,
    /// Task waiting for sink space; set while the stream is blocked on a full sink.
    waker: Option<AbortHandle>,
    progress_wanted: bool,
    /// Watchers of this stream not in the synced group.
    unsynced: BTreeSet<WatcherKey>,
    /// Round-robin position over `unsynced` for catch-up jobs.
    cursor: WatcherKey,
}

impl Stream {
    fn blocked(&self) -> bool {
        self.waker.is_some() || !self.backlog.is_empty()
    }
}

enum Offer {
    Sent,
    /// The sink is full (or earlier notices wait); the notice comes back.
    Blocked(Notice),
    Closed,
}

struct JobWatcher {
    key: WatcherKey,
    min_rev: i64,
    range: Arc<KeyRange>,
    shape: EventShape,
}

enum JobOutcome {
    /// Everything the watcher wants in `[min_rev, covered]`.
    Caught {
        key: WatcherKey,
        events: WatchEvents,
        covered: i64,
    },
    Compacted {
        key: WatcherKey,
        compact_revision: i64,
    },
}

type JobResult = Result<Vec<JobOutcome>, String>;

struct Hub {
    history: Arc<dyn History>,
    cfg: WatchConfig,
    /// Last revision published to the hub.
    rev: i64,
    shared: Arc<Shared>,
    watchers: HashMap<WatcherKey, Watcher>,
    /// Each distinct range watched, with its number of watchers: clients tend to watch the
    /// same few prefixes, so watchers share one copy of the keys instead of holding their own.
    ranges: HashMap<Arc<KeyRange>, usize>,
    next_watcher: WatcherKey,
    synced: WatcherGroup,
    unsynced_count: usize,
    /// Streams that may have unsynced watchers able to make progress (sink not known full).
    /// Kept loosely: entries are checked and dropped when a job is planned.
    ready: BTreeSet<StreamKey>,
    /// Round-robin position over `ready`, so every slow stream gets its turn.
    ready_cursor: StreamKey,
    progress_watchers: HashSet<WatcherKey>,
    streams: HashMap<StreamKey, Stream>,
    /// Streams owed a progress answer once their watchers are synced and the sink has room.
    progress_waiting: HashSet<StreamKey>,
    job_members: Vec<WatcherKey>,
    job_running: bool,
    retry_at: Option<Instant>,
    wake_tx: mpsc::UnboundedSender<StreamKey>,
    job_tx: mpsc::UnboundedSender<JobResult>,
    gauges: Gauges,
    /// Reused per publish: (watcher, position of an event of the revision it matches).
    scratch: Vec<(WatcherKey, u32)>,
}

impl Hub {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut events: mpsc::Receiver<Events>,
        mut wakes: mpsc::UnboundedReceiver<StreamKey>,
        mut jobs: mpsc::UnboundedReceiver<JobResult>,
    ) {
        let mut events_open = true;
        let period = self
            .cfg
            .progress_notify_interval
            .max(Duration::from_millis(1));
        let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let retry_at = self.retry_at;
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
                ev = events.recv(), if events_open => match ev {
                    Some(ev) => self.publish(ev),
                    None => {
                        tracing::debug!("watch: event publisher gone");
                        events_open = false;
                    }
                },
                Some(stream) = wakes.recv() => self.stream_ready(stream),
                Some(result) = jobs.recv() => self.job_done(result),
                _ = ticker.tick() => self.progress_tick(),
                _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                    self.retry_at = None;
                }
            }
            self.maybe_start_job();
            self.gauges.watchers.set(self.watchers.len() as f64);
            self.gauges.slow.set(self.unsynced_count as f64);
        }
        for (_, stream) in self.streams.drain() {
            if let Some(waker) = stream.waker {
                waker.abort();
            }
        }
        self.gauges.watchers.set(0.0);
        self.gauges.slow.set(0.0);
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Open { stream, sink } => {
                self.streams.insert(
                    stream,
                    Stream {
                        sink,
                        ids: HashMap::new(),
                        next_id: 0,
                        backlog: VecDeque::new(),
                        waker: None,
                        progress_wanted: false,
                        unsynced: BTreeSet::new(),
                        cursor: 0,
                    },
                );
            }
            Command::Create {
                stream,
                spec,
                reply,
            } => self.create(stream, spec, reply),
            Command::Cancel {
                stream,
                watch_id,
                reply,
            } => self.cancel(stream, watch_id, reply),
            Command::Progress { stream, reply } => {
                let Some(st) = self.streams.get_mut(&stream) else {
                    let _ = reply.send(Err(WatchError::StreamClosed));
                    return;
                };
                st.progress_wanted = true;
                self.progress_waiting.insert(stream);
                self.try_progress(stream);
                let _ = reply.send(Ok(-1));
            }
            Command::Close { stream } => self.close_stream(stream),
            Command::Stats { reply } => {
                let _ = reply.send(HubStats {
                    revision: self.rev,
                    streams: self.streams.len(),
                    watchers: self.watchers.len(),
                    ranges: self.ranges.len(),
                    synced: self.synced.len(),
                    unsynced: self.unsynced_count,
                    blocked_streams: self.streams.values().filter(|s| s.blocked()).count(),
                    backlog: self.streams.values().map(|s| s.backlog.len()).sum(),
                    catching_up: self.job_members.len(),
                });
            }
        }
    }

    fn create(&mut self, sk: StreamKey, spec: WatchSpec, reply: Reply) {
        let Some(st) = self.streams.get_mut(&sk) else {
            let _ = reply.send(Err(WatchError::StreamClosed));
            return;
        };
        let checked = KeyRange::from_request(&spec.key, &spec.range_end).and_then(|range| {
            let id = if spec.watch_id == 0 {
                while st.ids.contains_key(&st.next_id) {
                    st.next_id += 1;
                }
                st.next_id += 1;
                st.next_id - 1
            } else if st.ids.contains_key(&spec.watch_id) {
                return Err(WatchError::DuplicateId);
            } else {
                spec.watch_id
            };
            Ok((range, id))
        });
        let (range, id) = match checked {
            Ok(v) => v,
            Err(e) => {
                let notice = Notice::Rejected {
                    revision: self.rev,
                    reason: e.to_string(),
                };
                self.offer_control(sk, notice, Some((reply, Err(e))));
                return;
            }
        };
        let key = self.next_watcher;
        self.next_watcher += 1;
        // As etcd: no start revision means "after now"; a future one is synced right away and
        // simply ignores revisions below it; a past one reads History first. "Now" is the
        // store's revision, not the hub's: a client that saw its put acknowledged and then
        // watches must not get that put, even if the hub has not been told of it yet.
        let now = self.history.current_revision().max(self.rev);
        let (min_rev, synced) = match spec.start_revision {
            0 => (now + 1, true),
            r if r > self.rev => (r, true),
            r => (r, false),
        };
        st.ids.insert(id, key);
        let watcher = Watcher {
            stream: sk,
            id,
            range: self.share_range(range),
            min_rev,
            shape: EventShape {
                prev_kv: spec.prev_kv,
                no_put: spec.no_put,
                no_delete: spec.no_delete,
            },
            fragment: spec.fragment,
            progress_notify: spec.progress_notify,
            synced,
            idle: true,
        };
        if synced {
            self.synced.add(key, &watcher.range);
        } else {
            self.note_unsynced(sk, key);
        }
        if watcher.progress_notify {
            self.progress_watchers.insert(key);
        }
        self.watchers.insert(key, watcher);
        let notice = Notice::Created {
            watch_id: id,
            revision: now,
        };
        self.offer_control(sk, notice, Some((reply, Ok(id))));
    }

    fn cancel(&mut self, sk: StreamKey, watch_id: i64, reply: Reply) {
        let Some(st) = self.streams.get(&sk) else {
            let _ = reply.send(Err(WatchError::StreamClosed));
            return;
        };
        let Some(&key) = st.ids.get(&watch_id) else {
            let _ = reply.send(Err(WatchError::NotExist));
            return;
        };
        self.remove_watcher(key);
        let notice = Notice::Canceled {
            watch_id,
            revision: self.rev,
            compact_revision: 0,
        };
        self.offer_control(sk, notice, Some((reply, Ok(watch_id))));
        self.try_progress(sk);
    }

    fn share_range(&mut self, range: KeyRange) -> Arc<KeyRange> {
        if let Some((shared, users)) = self.ranges.get_key_value(&range) {
            let shared = shared.clone();
            let users = users + 1;
            self.ranges.insert(shared.clone(), users);
            return shared;
        }
        let shared = Arc::new(range);
        self.ranges.insert(shared.clone(), 1);
        shared
    }

    /// Takes a watcher out of the groups and counts; the caller updates its stream.
    fn forget(&mut self, key: WatcherKey, w: &Watcher) {
        if w.synced {
            self.synced.remove(key, &w.range);
        } else {
            self.unsynced_count -= 1;
        }
        self.progress_watchers.remove(&key);
        if let Some(users) = self.ranges.get_mut(&*w.range) {
            *users -= 1;
            if *users == 0 {
                self.ranges.remove(&*w.range);
            }
        }
    }

    /// Forgets a watcher everywhere; its stream's id becomes free again.
    fn remove_watcher(&mut self, key: WatcherKey) {
        let Some(w) = self.watchers.remove(&key) else {
            return;
        };
        self.forget(key, &w);
        if let Some(st) = self.streams.get_mut(&w.stream) {
            if st.ids.get(&w.id) == Some(&key) {
                st.ids.remove(&w.id);
            }
            st.unsynced.remove(&key);
        }
    }

    fn close_stream(&mut self, sk: StreamKey) {
        let Some(st) = self.streams.remove(&sk) else {
            return;
        };
        if let Some(waker) = st.waker {
            waker.abort();
        }
        for key in st.ids.into_values() {
            if let Some(w) = self.watchers.remove(&key) {
                self.forget(key, &w);
            }
        }
        self.ready.remove(&sk);
        for (_, reply) in st.backlog {
            if let Some((reply, _)) = reply {
                let _ = reply.send(Err(WatchError::StreamClosed));
            }
        }
        self.progress_waiting.remove(&sk);
    }

    fn make_synced(&mut self, key: WatcherKey) {
        let Some(w) = self.watchers.get_mut(&key) else {
            return;
        };
        if w.synced {
            return;
        }
        w.synced = true;
        self.unsynced_count -= 1;
        self.synced.add(key, &w.range);
        if let Some(st) = self.streams.get_mut(&w.stream) {
            st.unsynced.remove(&key);
        }
    }

    /// Books a watcher that just left (or never joined) the synced group.
    fn note_unsynced(&mut self, sk: StreamKey, key: WatcherKey) {
        self.unsynced_count += 1;
        if let Some(st) = self.streams.get_mut(&sk) {
            st.unsynced.insert(key);
            if !st.blocked() {
                self.ready.insert(sk);
            }
        }
    }

    fn make_unsynced(&mut self, key: WatcherKey, min_rev: i64) {
        let Some(w) = self.watchers.get_mut(&key) else {
            return;
        };
        w.min_rev = min_rev;
        if !w.synced {
            return;
        }
        w.synced = false;
        let sk = w.stream;
        self.synced.remove(key, &w.range);
        self.note_unsynced(sk, key);
    }

    /// Hands a notice to a stream's sink without waiting.
    fn offer(&mut self, sk: StreamKey, notice: Notice) -> Offer {
        let Some(st) = self.streams.get_mut(&sk) else {
            return Offer::Closed;
        };
        if st.blocked() {
            return Offer::Blocked(notice);
        }
        match st.sink.try_send(notice) {
            Ok(()) => Offer::Sent,
            Err(mpsc::error::TrySendError::Full(notice)) => {
                st.waker = Some(spawn_waker(&st.sink, &self.wake_tx, sk));
                self.ready.remove(&sk);
                Offer::Blocked(notice)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Offer::Closed,
        }
    }

    /// Sends a control notice, queueing it behind earlier ones if the sink is full; the
    /// reply (if any) goes out once the notice is in the sink.
    fn offer_control(&mut self, sk: StreamKey, notice: Notice, reply: Option<OwedReply>) {
        match self.offer(sk, notice) {
            Offer::Sent => {
                if let Some((reply, result)) = reply {
                    let _ = reply.send(result);
                }
            }
            Offer::Blocked(notice) => {
                if let Some(st) = self.streams.get_mut(&sk) {
                    st.backlog.push_back((notice, reply));
                }
            }
            Offer::Closed => {
                self.close_stream(sk);
                if let Some((reply, _)) = reply {
                    let _ = reply.send(Err(WatchError::StreamClosed));
                }
            }
        }
    }

    /// The sink of a blocked stream has room again (or its reader is gone).
    fn stream_ready(&mut self, sk: StreamKey) {
        let Some(st) = self.streams.get_mut(&sk) else {
            return;
        };
        st.waker = None;
        while let Some((notice, reply)) = st.backlog.pop_front() {
            match st.sink.try_send(notice) {
                Ok(()) => {
                    if let Some((reply, result)) = reply {
                        let _ = reply.send(result);
                    }
                }
                Err(mpsc::error::TrySendError::Full(notice)) => {
                    st.backlog.push_front((notice, reply));
                    st.waker = Some(spawn_waker(&st.sink, &self.wake_tx, sk));
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    if let Some((reply, _)) = reply {
                        let _ = reply.send(Err(WatchError::StreamClosed));
                    }
                    self.close_stream(sk);
                    return;
                }
            }
        }
        if st.sink.is_closed() {
            self.close_stream(sk);
            return;
        }
        if !st.unsynced.is_empty() {
            self.ready.insert(sk);
        }
        self.try_progress(sk);
    }

    /// Answers a stream's pending progress request if all its watchers are synced.
    fn try_progress(&mut self, sk: StreamKey) {
        let Some(st) = self.streams.get(&sk) else {
            self.progress_waiting.remove(&sk);
            return;
        };
        if !st.progress_wanted || !st.unsynced.is_empty() {
            return;
        }
        let notice = Notice::Progress {
            watch_id: -1,
            revision: self.rev,
        };
        match self.offer(sk, notice) {
            Offer::Sent => {
                if let Some(st) = self.streams.get_mut(&sk) {
                    st.progress_wanted = false;
                }
                self.progress_waiting.remove(&sk);
            }
            Offer::Blocked(_) => {}
            Offer::Closed => self.close_stream(sk),
        }
    }

    fn try_progress_all(&mut self) {
        if self.progress_waiting.is_empty() {
            return;
        }
        let waiting: Vec<StreamKey> = self.progress_waiting.iter().copied().collect();
        for sk in waiting {
            self.try_progress(sk);
        }
    }

    /// Fills the `prev_kv` the applier left out of puts, for the events a matched watcher
    /// wants it with: the key's value at the revision before the event's.
    fn load_prev_values(&self, events: &mut [Event], matched: &[(WatcherKey, u32)]) {
        let mut wanted: Vec<usize> = matched
            .iter()
            .filter(|(w, i)| {
                lacks_prev(&events[*i as usize])
                    && self.watchers.get(w).is_some_and(|w| w.shape.prev_kv)
            })
            .map(|&(_, i)| i as usize)
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        for i in wanted {
            let Some(kv) = &events[i].kv else { continue };
            match self.history.value_at(&kv.key, kv.mod_revision - 1) {
                Ok(prev) => events[i].prev_kv = prev,
                Err(e) => tracing::debug!(error = %e, "watch: previous value not loaded"),
            }
        }
    }

    /// One applied revision: every synced watcher interested gets it now, or becomes a victim.
    fn publish(&mut self, ev: Events) {
        if ev.revision <= self.rev {
            // Already in History when the hub started; watchers read it from there.
            return;
        }
        if ev.events.is_empty() {
            // A jump (snapshot installed): everything up to it comes from History.
            self.publish_gap(ev.revision + 1);
            self.rev = ev.revision;
            self.shared.revision.store(ev.revision, Ordering::Release);
            return;
        }
        if ev.revision > self.rev + 1 {
            self.publish_gap(ev.revision);
        }
        let rev = ev.revision;
        let mut events = ev.events;
        // (watcher, position of a matching event); a watcher matches each event once.
        let mut matched = std::mem::take(&mut self.scratch);
        for (i, e) in events.iter().enumerate() {
            self.synced
                .for_each_matching(event_key(e), |w| matched.push((w, i as u32)));
        }
        if events.len() > 1 {
            // Groups each watcher's events, in the order applied.
            matched.sort_unstable();
        }
        self.load_prev_values(&mut events, &matched);
        let batch: Arc<[Event]> = events.into();
        let mut victims = Vec::new();
        let mut closed = Vec::new();
        let mut positions = Vec::new();
        for group in matched.chunk_by(|a, b| a.0 == b.0) {
            let key = group[0].0;
            let Some(w) = self.watchers.get(&key) else {
                continue;
            };
            if rev < w.min_rev {
                continue;
            }
            positions.clear();
            positions.extend(
                group
                    .iter()
                    .map(|&(_, i)| i)
                    .filter(|&i| w.shape.keeps(&batch[i as usize])),
            );
            if positions.is_empty() {
                continue;
            }
            let events = WatchEvents::pick(&batch, &positions, w.shape.prev_kv);
            let (sk, watch_id, fragment) = (w.stream, w.id, w.fragment);
            let notice = Notice::Events {
                watch_id,
                revision: rev,
                pending: PendingEvents::new(events.len(), &self.gauges.pending),
                events,
                fragment,
            };
            match self.offer(sk, notice) {
                Offer::Sent => {
                    if let Some(w) = self.watchers.get_mut(&key) {
                        w.idle = false;
                    }
                }
                Offer::Blocked(_) => victims.push(key),
                Offer::Closed => closed.push(sk),
            }
        }
        matched.clear();
        self.scratch = matched;
        for key in victims {
            self.make_unsynced(key, rev);
        }
        for sk in closed {
            self.close_stream(sk);
        }
        self.rev = rev;
        self.shared.revision.store(rev, Ordering::Release);
    }

    /// Revisions between the hub's and `next` were never published: synced watchers that
    /// wanted them catch up from History instead (after a snapshot install; otherwise the
    /// applier publishes every revision).
    fn publish_gap(&mut self, next: i64) {
        tracing::warn!(
            from = self.rev + 1,
            to = next - 1,
            "watch: revisions missing from the event feed; affected watchers re-read history"
        );
        let behind: Vec<(WatcherKey, i64)> = self
            .watchers
            .iter()
            .filter(|(_, w)| w.synced)
            .map(|(k, w)| (*k, w.min_rev.max(self.rev + 1)))
            .filter(|(_, min_rev)| *min_rev < next)
            .collect();
        for (key, min_rev) in behind {
            self.make_unsynced(key, min_rev);
        }
    }

    fn progress_tick(&mut self) {
        let mut due = Vec::new();
        for key in &self.progress_watchers {
            if let Some(w) = self.watchers.get_mut(key) {
                if w.synced && w.idle {
                    due.push((w.stream, w.id));
                }
                w.idle = true;
            }
        }
        let mut closed = Vec::new();
        for (sk, watch_id) in due {
            let notice = Notice::Progress {
                watch_id,
                revision: self.rev,
            };
            // A full sink means events are flowing: etcd skips the notification then too.
            if let Offer::Closed = self.offer(sk, notice) {
                closed.push(sk);
            }
        }
        for sk in closed {
            self.close_stream(sk);
        }
    }

    /// Starts a catch-up job for a round of unsynced watchers whose sinks have room.
    fn maybe_start_job(&mut self) {
        if self.job_running || self.ready.is_empty() || self.retry_at.is_some() {
            return;
        }
        let mut room = self.cfg.max_watchers_per_sync.max(1);
        let mut chosen = Vec::new();
        let candidates: Vec<StreamKey> = self
            .ready
            .range(self.ready_cursor + 1..)
            .chain(self.ready.range(..=self.ready_cursor))
            .copied()
            .collect();
        for sk in candidates {
            if room == 0 {
                break;
            }
            let Some(st) = self.streams.get_mut(&sk) else {
                self.ready.remove(&sk);
                continue;
            };
            if st.blocked() || st.unsynced.is_empty() {
                self.ready.remove(&sk);
                continue;
            }
            // Each watcher sends at most one notice per job: no point taking more watchers
            // than the sink has slots. A full sink waits for its reader instead.
            let slots = st.sink.capacity();
            if slots == 0 {
                st.waker = Some(spawn_waker(&st.sink, &self.wake_tx, sk));
                self.ready.remove(&sk);
                continue;
            }
            let take = slots.min(room);
            let keys: Vec<WatcherKey> = st
                .unsynced
                .range(st.cursor + 1..)
                .chain(st.unsynced.range(..=st.cursor))
                .take(take)
                .copied()
                .collect();
            if let Some(&last) = keys.last() {
                st.cursor = last;
            }
            room -= keys.len();
            self.ready_cursor = sk;
            for key in keys {
                if let Some(w) = self.watchers.get(&key) {
                    chosen.push(JobWatcher {
                        key,
                        min_rev: w.min_rev,
                        range: w.range.clone(),
                        shape: w.shape,
                    });
                }
            }
        }
        if chosen.is_empty() {
            return;
        }
        self.job_members = chosen.iter().map(|w| w.key).collect();
        self.job_running = true;
        let history = self.history.clone();
        let (limit, budget) = (
            self.cfg.catchup_read_limit.max(1),
            self.cfg.catchup_job_budget.max(1),
        );
        let job_tx = self.job_tx.clone();
        let task = tokio::task::spawn_blocking(move || run_job(&*history, chosen, limit, budget));
        tokio::spawn(async move {
            let result = match task.await {
                Ok(Ok(outcomes)) => Ok(outcomes),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(format!("catch-up task failed: {e}")),
            };
            let _ = job_tx.send(result);
        });
    }

    fn job_done(&mut self, result: JobResult) {
        self.job_running = false;
        self.job_members.clear();
        let outcomes = match result {
            Ok(outcomes) => outcomes,
            Err(e) => {
                tracing::warn!(error = %e, "watch: history read failed; retrying");
                self.retry_at = Some(Instant::now() + self.cfg.retry_backoff);
                return;
            }
        };
        let mut closed = Vec::new();
        for outcome in outcomes {
            match outcome {
                JobOutcome::Compacted {
                    key,
                    compact_revision,
                } => {
                    let Some(w) = self.watchers.get(&key) else {
                        continue;
                    };
                    if w.synced {
                        continue;
                    }
                    let (sk, watch_id) = (w.stream, w.id);
                    self.remove_watcher(key);
                    // etcd's compaction cancel carries no header revision of its own.
                    let notice = Notice::Canceled {
                        watch_id,
                        revision: 0,
                        compact_revision,
                    };
                    self.offer_control(sk, notice, None);
                }
                JobOutcome::Caught {
                    key,
                    mut events,
                    covered,
                } => {
                    let Some(w) = self.watchers.get(&key) else {
                        continue;
                    };
                    if w.synced {
                        continue;
                    }
                    // History may be ahead of the hub; what lies beyond the hub's revision
                    // arrives through publishing once the watcher is synced.
                    let upto = covered.min(self.rev);
                    events.keep_through(upto);
                    let (sk, watch_id, fragment) = (w.stream, w.id, w.fragment);
                    if !events.is_empty() {
                        let notice = Notice::Events {
                            watch_id,
                            revision: upto,
                            pending: PendingEvents::new(events.len(), &self.gauges.pending),
                            events,
                            fragment,
                        };
                        match self.offer(sk, notice) {
                            Offer::Sent => {}
                            Offer::Blocked(_) => continue,
                            Offer::Closed => {
                                closed.push(sk);
                                continue;
                            }
                        }
                    }
                    let Some(w) = self.watchers.get_mut(&key) else {
                        continue;
                    };
                    if upto >= w.min_rev {
                        w.min_rev = upto + 1;
                    }
                    if w.min_rev > self.rev {
                        self.make_synced(key);
                    }
                }
            }
        }
        for sk in closed {
            self.close_stream(sk);
        }
        self.try_progress_all();
    }
}

/// Waits for a free slot in a full sink, then tells the hub. The hub is the sink's only
/// sender, so the slot is still free when the hub comes back to use it. A gone reader wakes
/// the hub too, which then finds the sink closed.
fn spawn_waker(
    sink: &mpsc::Sender<Notice>,
    wake: &mpsc::UnboundedSender<StreamKey>,
    sk: StreamKey,
) -> AbortHandle {
    let sink = sink.clone();
    let wake = wake.clone();
    tokio::spawn(async move {
        let _ = sink.reserve().await;
        let _ = wake.send(sk);
    })
    .abort_handle()
}

fn run_job(
    history: &dyn History,
    mut watchers: Vec<JobWatcher>,
    limit: usize,
    budget: usize,
) -> Result<Vec<JobOutcome>, HistoryError> {
    let compact = history.compact_revision();
    let mut out = Vec::new();
    watchers.retain(|w| {
        if w.min_rev < compact {
            out.push(JobOutcome::Compacted {
                key: w.key,
                compact_revision: compact,
            });
            false
        } else {
            true
        }
    });
    // Lowest first, so one read serves every watcher it covers; watchers far ahead of the
    // slowest get their own read in the same job instead of waiting for it.
    watchers.sort_by_key(|w| w.min_rev);
    let mut i = 0;
    let mut read = 0;
    let mut positions = Vec::new();
    while i < watchers.len() && read < budget {
        let base = watchers[i].min_rev;
        // Read before the events: everything up to it is then certainly in the answer.
        let current = history.current_revision();
        let events = match history.events_since(base, limit) {
            Ok(events) => events,
            Err(HistoryError::Compacted { compact_revision }) => {
                while i < watchers.len()
                    && (watchers[i].min_rev < compact_revision || watchers[i].min_rev == base)
                {
                    out.push(JobOutcome::Compacted {
                        key: watchers[i].key,
                        compact_revision,
                    });
                    i += 1;
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        let covered = match events.last().map(event_revision) {
            // Possibly cut short by the limit: complete through its last (whole) revision.
            Some(last) if events.len() >= limit => last,
            Some(last) => last.max(current),
            None => current.max(base - 1),
        };
        read += events.len();
        // One copy of the read, shared by every watcher it serves.
        let events: Arc<[Event]> = events.into();
        let before = i;
        while i < watchers.len() && watchers[i].min_rev <= covered {
            let w = &watchers[i];
            let from = events.partition_point(|e| event_revision(e) < w.min_rev);
            positions.clear();
            positions.extend(
                (from..events.len())
                    .filter(|&p| {
                        let e = &events[p];
                        w.range.contains(event_key(e)) && w.shape.keeps(e)
                    })
                    .map(|p| p as u32),
            );
            out.push(JobOutcome::Caught {
                key: w.key,
                events: WatchEvents::pick(&events, &positions, w.shape.prev_kv),
                covered,
            });
            i += 1;
        }
        if i == before {
            break;
        }
    }
    Ok(out)
}
