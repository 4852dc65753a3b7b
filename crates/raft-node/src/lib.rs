//! raft-node: a raft-rs `RawNode` driven by the Ready loop, with its log kept in the wal crate.
//!
//! Reads: `RaftCommand`s (proposals, read-index requests, status queries, peer messages) from
//! a tokio mpsc channel. Writes: entries and hard state to the wal (one fsync per Ready: group
//! commit), messages to peers through a `Transport`, and `Committed` batches, in log order, to
//! the applier's channel. A proposal's responder travels with its entry so that only the
//! member that proposed it answers the client.

mod storage;

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The raft types in this crate's API: `Message` for transports, `ConfChange` for membership.
pub use raft::prelude::{ConfChange, ConfChangeType, Message};
use raft::prelude::{ConfChangeV2, Entry, EntryType, Snapshot};
use raft::{RawNode, StateRole};
use tokio::sync::{mpsc, oneshot, Notify};

use storage::WalStorage;

#[derive(Debug, Clone)]
pub struct RaftConfig {
    pub id: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub election_tick: usize,
    pub heartbeat_tick: usize,
    pub tick_interval: Duration,
    pub max_inflight_msgs: usize,
    pub max_size_per_msg: u64,
    pub pre_vote: bool,
    pub check_quorum: bool,
    /// Applied entries after which the log is compacted (etcd's --snapshot-count).
    pub snapshot_count: u64,
    /// Entries kept below the compaction point, so a slightly slow follower still catches up
    /// from the log rather than through a snapshot.
    pub snapshot_catchup_entries: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            id: 1,
            voters: vec![1],
            learners: vec![],
            election_tick: 10,
            heartbeat_tick: 1,
            tick_interval: Duration::from_millis(100),
            max_inflight_msgs: 256,
            max_size_per_msg: 1024 * 1024,
            pre_vote: true,
            check_quorum: true,
            snapshot_count: 100_000,
            snapshot_catchup_entries: 5_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Normal,
    /// A membership change raft has applied to its configuration.
    ConfChange,
    /// A membership change raft refused (e.g. it would leave no voter); nothing changed.
    RejectedConfChange,
}

/// Decodes the payload of a `ConfChange` entry.
pub fn decode_conf_change(data: &[u8]) -> Result<ConfChange, RaftError> {
    use protobuf::Message as _;
    let mut cc = ConfChange::default();
    cc.merge_from_bytes(data)
        .map_err(|e| RaftError::BadState(format!("conf change: {e}")))?;
    Ok(cc)
}

/// A request to the raft layer. `R` is the caller's responder (e.g. a oneshot sender); raft-node
/// never looks inside it.
pub enum RaftCommand<R> {
    /// Answered by the applier via `CommittedEntry::reply` once the entry is applied.
    Propose {
        data: Vec<u8>,
        reply: R,
    },
    /// Answered with a commit index that is safe to read at (linearizable reads).
    ReadIndex {
        reply: oneshot::Sender<Result<u64, RaftError>>,
    },
    /// A membership change. Its entry reaches the applier as `EntryKind::ConfChange` (data =
    /// the encoded `ConfChange`) carrying `reply`; raft-node applies it to raft itself.
    ProposeConfChange {
        change: ConfChange,
        reply: R,
    },
    Status {
        reply: oneshot::Sender<RaftStatus>,
    },
    /// A message from a peer.
    Step(Box<Message>),
    /// Asks the leader to hand leadership to `to` (MoveLeader); the caller watches the status.
    TransferLeader {
        to: u64,
    },
}

pub struct CommittedEntry<R> {
    pub index: u64,
    pub term: u64,
    pub kind: EntryKind,
    pub data: Vec<u8>,
    pub reply: Option<R>,
}

/// Committed entries in log order, sent on the applier channel.
pub struct Committed<R> {
    /// Before the entries: the leader's state replaces this member's (its log was too far
    /// behind the leader's compacted log).
    pub snapshot: Option<InstallSnapshot>,
    pub entries: Vec<CommittedEntry<R>>,
}

impl<R> Committed<R> {
    pub fn entries(entries: Vec<CommittedEntry<R>>) -> Self {
        Committed {
            snapshot: None,
            entries,
        }
    }
}

/// Raft restored a snapshot at `index`: the applier must fetch member `from`'s state (at
/// least that new) and install it before applying anything else, then answer `done` with
/// the applied index it now has. Raft-node waits for the answer before it records the
/// snapshot in its log, so a crash in between leaves the old log intact.
pub struct InstallSnapshot {
    pub index: u64,
    pub term: u64,
    pub from: u64,
    pub done: std::sync::mpsc::Sender<Result<u64, String>>,
}

/// What raft-node asks of the state machine directly (everything else goes through the
/// committed channel).
pub trait StateMachine: Send + Sync + 'static {
    /// The last applied index (what a snapshot served now reflects at least).
    fn applied(&self) -> u64;
    /// Makes everything applied durable; returns the applied index the log may now be
    /// compacted up to.
    fn persist(&self) -> Result<u64, String>;
}

/// A state machine that never lets the log be compacted (tests of the log itself).
pub struct KeepWholeLog;

impl StateMachine for KeepWholeLog {
    fn applied(&self) -> u64 {
        0
    }
    fn persist(&self) -> Result<u64, String> {
        Err("the whole log is kept".into())
    }
}

#[derive(Clone, Debug, Default)]
pub struct RaftStatus {
    pub id: u64,
    pub leader_id: u64,
    pub term: u64,
    pub commit_index: u64,
    pub last_index: u64,
    pub is_leader: bool,
    pub applied_index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// On the leader: how far each member's log is known to match, by member id.
    pub matched: Vec<(u64, u64)>,
}

#[derive(thiserror::Error, Debug)]
pub enum RaftError {
    #[error("etcdserver: no leader")]
    NoLeader,
    #[error("etcdserver: server stopped")]
    Stopped,
    #[error(transparent)]
    Wal(#[from] wal::WalError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("raft: invalid persisted state: {0}")]
    BadState(String),
    #[error("raft: snapshot not installed: {0}")]
    Snapshot(String),
}

/// Delivers raft messages to peers. Single-member clusters send nothing; replication plugs
/// a network transport in here.
pub trait Transport: Send + 'static {
    fn send(&mut self, msgs: Vec<Message>);
}

/// For a cluster of one: there is nobody to send to.
pub struct NoPeers;

impl Transport for NoPeers {
    fn send(&mut self, msgs: Vec<Message>) {
        if !msgs.is_empty() {
            tracing::debug!(count = msgs.len(), "raft: dropping messages, no peers");
        }
    }
}

/// Counters tests and benches read to observe batching.
#[derive(Debug, Default)]
pub struct RaftStats {
    pub wal_appends: AtomicU64,
    pub proposals: AtomicU64,
}

pub struct RaftHandle {
    thread: Option<JoinHandle<()>>,
    stop: Arc<Notify>,
    /// Also set on shutdown, for waits outside the loop's select (a snapshot install retry).
    stopping: Arc<AtomicBool>,
    pub stats: Arc<RaftStats>,
}

impl RaftHandle {
    /// Waits for the loop to end (it ends when every command sender is dropped).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Stops the loop even while command senders are still alive, then waits for it. Queued
    /// commands are dropped; waiting reads are answered `Stopped`.
    pub fn shutdown(self) {
        // A stored permit: the loop sees it even if it is busy with a Ready right now.
        self.stopping.store(true, Ordering::Release);
        self.stop.notify_one();
        self.join();
    }
}

/// Backoff between attempts to install a snapshot the applier could not fetch.
const SNAPSHOT_RETRY_MIN: Duration = Duration::from_millis(200);
const SNAPSHOT_RETRY_MAX: Duration = Duration::from_secs(5);

struct Pending<R> {
    reply: R,
    term: u64,
    at_tick: u64,
}

type ReadWaiter = oneshot::Sender<Result<u64, RaftError>>;

/// One read-index round handed to raft, with the leadership it was asked under.
struct ReadRound {
    waiters: Vec<ReadWaiter>,
    term: u64,
    leader: u64,
    issued_at_tick: u64,
}

pub struct RaftNode<R> {
    raw: RawNode<WalStorage>,
    transport: Box<dyn Transport>,
    committed_tx: mpsc::Sender<Committed<R>>,
    /// Responders of proposals made here, by the id their entry carries in its context. A
    /// follower forwards its proposals to the leader, so the log index is unknown until the
    /// entry commits; the context travels with the entry and finds the responder again.
    pending: HashMap<u64, Pending<R>>,
    /// Proposals taken from the command channel since the last Ready, stepped into raft
    /// together as one MsgPropose (a follower forwards them to the leader in one message).
    batch: Vec<Entry>,
    batch_replies: Vec<(u64, R)>,
    batch_bytes: usize,
    /// Proposal bytes taken per pass before the Ready is handled: bounds the size of one
    /// append message and how long a pass keeps the loop from persisting.
    intake_budget: usize,
    /// Ticks a proposal may wait for its entry before its responder is dropped (the entry was
    /// lost with a leader; the caller has long timed out).
    proposal_patience: u64,
    next_proposal: u64,
    /// Read-index requests that arrived since the last round went to raft.
    queued_reads: Vec<ReadWaiter>,
    /// Rounds raft is working on, by request context.
    reads_in_flight: HashMap<u64, ReadRound>,
    next_read: u64,
    ticks: u64,
    /// Ticks a read round may stay unanswered before it is asked again (its message to the
    /// leader, or the answer, may have been lost).
    read_patience: u64,
    leader_seen: u64,
    stats: Arc<RaftStats>,
    state_machine: Arc<dyn StateMachine>,
    snapshot_count: u64,
    catchup_entries: u64,
    /// Applied index of the last compaction attempt that could not compact.
    compact_checked: u64,
    stopping: Arc<AtomicBool>,
}

fn slog_logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

impl<R: Send + 'static> RaftNode<R> {
    /// Opens the wal in `wal_dir` (bootstrapping a fresh log with cfg.voters as the initial
    /// ConfState), loads it into raft's storage, and starts the Ready loop on its own OS thread.
    /// `applied` is the state machine's applied index: entries after it, up to the persisted
    /// commit, are delivered again on `committed_tx`.
    pub fn start(
        cfg: RaftConfig,
        wal_dir: &Path,
        applied: u64,
        commands: mpsc::Receiver<RaftCommand<R>>,
        committed_tx: mpsc::Sender<Committed<R>>,
    ) -> Result<RaftHandle, RaftError> {
        Self::start_with_transport(
            cfg,
            wal_dir,
            applied,
            commands,
            committed_tx,
            Box::new(NoPeers),
        )
    }

    pub fn start_with_transport(
        cfg: RaftConfig,
        wal_dir: &Path,
        applied: u64,
        commands: mpsc::Receiver<RaftCommand<R>>,
        committed_tx: mpsc::Sender<Committed<R>>,
        transport: Box<dyn Transport>,
    ) -> Result<RaftHandle, RaftError> {
        Self::start_full(
            cfg,
            wal_dir,
            applied,
            commands,
            committed_tx,
            transport,
            Arc::new(KeepWholeLog),
        )
    }

    /// As `start_with_transport`, with log compaction and snapshots through `state_machine`.
    pub fn start_full(
        cfg: RaftConfig,
        wal_dir: &Path,
        applied: u64,
        commands: mpsc::Receiver<RaftCommand<R>>,
        committed_tx: mpsc::Sender<Committed<R>>,
        transport: Box<dyn Transport>,
        state_machine: Arc<dyn StateMachine>,
    ) -> Result<RaftHandle, RaftError> {
        let storage = WalStorage::open(wal_dir, &cfg.voters, &cfg.learners, state_machine.clone())?;
        let applied = storage.clamp_applied(applied)?;
        let raft_cfg = raft::Config {
            id: cfg.id,
            election_tick: cfg.election_tick,
            heartbeat_tick: cfg.heartbeat_tick,
            applied,
            max_inflight_msgs: cfg.max_inflight_msgs,
            max_size_per_msg: cfg.max_size_per_msg,
            pre_vote: cfg.pre_vote,
            check_quorum: cfg.check_quorum,
            // Entries proposed while one Ready is being prepared go to each follower in one
            // append (and come back as one acknowledgement) instead of one message per entry.
            batch_append: true,
            ..Default::default()
        };
        raft_cfg.validate()?;
        let mut raw = RawNode::new(&raft_cfg, storage, &slog_logger())?;
        let single = raw.store().conf_state().voters == [cfg.id];
        if single {
            // The only voter (learners do not vote) has nobody to wait for: lead at once
            // instead of after an election timeout.
            raw.campaign()?;
        }
        let stats = Arc::new(RaftStats::default());
        let node = RaftNode {
            raw,
            transport,
            committed_tx,
            pending: HashMap::new(),
            batch: Vec::new(),
            batch_replies: Vec::new(),
            batch_bytes: 0,
            intake_budget: cfg.max_size_per_msg.clamp(64 * 1024, 64 * 1024 * 1024) as usize,
            proposal_patience: 10 * cfg.election_tick as u64,
            // A random start keeps ids of this run apart from those already in the log.
            next_proposal: RandomState::new().hash_one(cfg.id),
            queued_reads: Vec::new(),
            reads_in_flight: HashMap::new(),
            next_read: 1,
            ticks: 0,
            read_patience: cfg.election_tick as u64,
            leader_seen: 0,
            stats: stats.clone(),
            state_machine,
            snapshot_count: cfg.snapshot_count.max(1),
            catchup_entries: cfg.snapshot_catchup_entries,
            compact_checked: 0,
            stopping: Arc::new(AtomicBool::new(false)),
        };
        let tick = cfg.tick_interval;
        let stop = Arc::new(Notify::new());
        let stop_rx = stop.clone();
        let stopping = node.stopping.clone();
        let thread = std::thread::Builder::new()
            .name("raft-node".into())
            .spawn(move || node.run(commands, tick, stop_rx))
            .map_err(|e| RaftError::BadState(format!("spawn raft thread: {e}")))?;
        Ok(RaftHandle {
            thread: Some(thread),
            stop,
            stopping,
            stats,
        })
    }

    /// The loop: wait for a command or a tick, take every queued command (so one Ready, and
    /// one fsync, covers them all), then handle the Ready.
    fn run(
        mut self,
        mut commands: mpsc::Receiver<RaftCommand<R>>,
        tick: Duration,
        stop: Arc<Notify>,
    ) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "raft: cannot build loop runtime");
                return;
            }
        };
        let mut next_tick = Instant::now() + tick;
        loop {
            let woke = rt.block_on(async {
                tokio::select! {
                    biased;
                    _ = stop.notified() => None,
                    r = tokio::time::timeout_at(next_tick.into(), commands.recv()) => Some(r),
                }
            });
            match woke {
                Some(Ok(Some(cmd))) => {
                    self.handle(cmd);
                    while self.batch_bytes < self.intake_budget {
                        match commands.try_recv() {
                            Ok(cmd) => self.handle(cmd),
                            Err(_) => break,
                        }
                    }
                    self.propose_batch();
                }
                Some(Err(_elapsed)) => {}
                Some(Ok(None)) => {
                    tracing::info!("raft: command channel closed, loop stopped");
                    break;
                }
                None => {
                    tracing::info!("raft: shutdown requested, loop stopped");
                    break;
                }
            }
            if Instant::now() >= next_tick {
                self.raw.tick();
                self.ticks += 1;
                self.expire_proposals();
                next_tick = Instant::now() + tick;
            }
            let stopping = self.stopping.clone();
            let stopped = || commands.is_closed() || stopping.load(Ordering::Acquire);
            if let Err(e) = self.process(&stopped) {
                // The wal could not be written: acknowledging anything further would be a lie.
                tracing::error!(error = %e, "raft: cannot persist, stopping");
                break;
            }
        }
        for w in self
            .queued_reads
            .drain(..)
            .chain(self.reads_in_flight.drain().flat_map(|(_, r)| r.waiters))
        {
            let _ = w.send(Err(RaftError::Stopped));
        }
    }

    /// One pass after the commands: read rounds, then the Ready. A read held back until the
    /// leader commits in its term can go once that Ready committed it, so look again.
    fn process(&mut self, stopped: &dyn Fn() -> bool) -> Result<(), RaftError> {
        self.step_reads();
        self.on_ready(stopped)?;
        if self.step_reads() {
            self.on_ready(stopped)?;
        }
        Ok(())
    }

    fn handle(&mut self, cmd: RaftCommand<R>) {
        match cmd {
            RaftCommand::Propose { data, reply } => {
                self.stats.proposals.fetch_add(1, Ordering::Relaxed);
                let id = self.proposal_id();
                self.batch_bytes += data.len();
                self.batch.push(Entry {
                    data: data.into(),
                    context: id.to_le_bytes().to_vec().into(),
                    ..Default::default()
                });
                self.batch_replies.push((id, reply));
            }
            RaftCommand::ProposeConfChange { change, reply } => {
                // After the entries proposed before it, as they arrived.
                self.propose_batch();
                self.stats.proposals.fetch_add(1, Ordering::Relaxed);
                if self.raw.raft.leader_id == raft::INVALID_ID {
                    tracing::debug!("raft: no leader, membership change dropped");
                    return;
                }
                let id = self.proposal_id();
                match self
                    .raw
                    .propose_conf_change(id.to_le_bytes().to_vec(), change)
                {
                    Ok(()) => self.keep_pending(id, reply),
                    Err(e) => tracing::debug!(error = %e, "raft: membership change dropped"),
                }
            }
            // Every read arriving before the next Ready shares one read-index round.
            RaftCommand::ReadIndex { reply } => self.queued_reads.push(reply),
            RaftCommand::Status { reply } => {
                let _ = reply.send(self.status());
            }
            RaftCommand::TransferLeader { to } => {
                if self.raw.raft.state == StateRole::Leader {
                    self.raw.transfer_leader(to);
                }
            }
            RaftCommand::Step(msg) => {
                if msg.get_msg_type() == raft::prelude::MessageType::MsgPropose {
                    // A follower's forwarded proposals count against this pass's intake too.
                    self.batch_bytes += msg.entries.iter().map(|e| e.data.len()).sum::<usize>();
                }
                if let Err(e) = self.raw.step(*msg) {
                    tracing::debug!(error = %e, "raft: step failed");
                }
            }
        }
    }

    fn proposal_id(&mut self) -> u64 {
        let id = self.next_proposal;
        self.next_proposal = self.next_proposal.wrapping_add(1);
        id
    }

    fn keep_pending(&mut self, id: u64, reply: R) {
        let (term, at_tick) = (self.raw.raft.term, self.ticks);
        self.pending.insert(
            id,
            Pending {
                reply,
                term,
                at_tick,
            },
        );
    }

    /// Steps the queued proposals into raft as one MsgPropose and keeps their responders for
    /// when their entries commit. Dropping a responder tells the caller the proposal was not
    /// taken; the caller counts it as failed (it also sees timeouts, which never reach here).
    fn propose_batch(&mut self) {
        self.batch_bytes = 0;
        if self.batch.is_empty() {
            return;
        }
        let entries = std::mem::take(&mut self.batch);
        let replies = std::mem::take(&mut self.batch_replies);
        if self.raw.raft.leader_id == raft::INVALID_ID {
            tracing::debug!(count = entries.len(), "raft: no leader, proposals dropped");
            return;
        }
        // What RawNode::propose does for one entry. On a follower raft forwards the message
        // to the leader; each entry commits with its context, wherever it was appended.
        let mut m = Message::default();
        m.set_msg_type(raft::prelude::MessageType::MsgPropose);
        m.from = self.raw.raft.id;
        m.set_entries(entries.into());
        match self.raw.raft.step(m) {
            Ok(()) => {
                for (id, reply) in replies {
                    self.keep_pending(id, reply);
                }
            }
            Err(e) => tracing::debug!(error = %e, "raft: proposals dropped"),
        }
    }

    fn expire_proposals(&mut self) {
        let (now, patience) = (self.ticks, self.proposal_patience);
        if now % 8 == 0 && !self.pending.is_empty() {
            self.pending.retain(|_, p| now - p.at_tick <= patience);
        }
    }

    fn status(&self) -> RaftStatus {
        let r = &self.raw.raft;
        RaftStatus {
            id: r.id,
            leader_id: r.leader_id,
            term: r.term,
            commit_index: r.raft_log.committed,
            last_index: r.raft_log.last_index(),
            is_leader: r.state == StateRole::Leader,
            applied_index: r.raft_log.applied,
            voters: r.prs().conf().voters().ids().iter().collect(),
            learners: r.prs().conf().learners().iter().copied().collect(),
            matched: if r.state == StateRole::Leader {
                r.prs().iter().map(|(id, p)| (*id, p.matched)).collect()
            } else {
                Vec::new()
            },
        }
    }

    /// Sends queued reads back to the queue when their round can no longer be answered (the
    /// leadership it was asked under is gone, or it waited too long), then issues one round
    /// for everything queued. Returns whether a round went to raft.
    fn step_reads(&mut self) -> bool {
        let (term, leader, now) = (self.raw.raft.term, self.raw.raft.leader_id, self.ticks);
        let patience = self.read_patience;
        let stale: Vec<u64> = self
            .reads_in_flight
            .iter()
            .filter(|(_, r)| {
                r.term != term || r.leader != leader || now - r.issued_at_tick > patience
            })
            .map(|(ctx, _)| *ctx)
            .collect();
        for ctx in stale {
            if let Some(round) = self.reads_in_flight.remove(&ctx) {
                self.queued_reads.extend(round.waiters);
            }
        }
        self.queued_reads.retain(|w| !w.is_closed());
        if self.queued_reads.is_empty() {
            return false;
        }
        if leader == raft::INVALID_ID {
            for w in self.queued_reads.drain(..) {
                let _ = w.send(Err(RaftError::NoLeader));
            }
            return false;
        }
        if self.raw.raft.state == StateRole::Leader && !self.raw.raft.commit_to_current_term() {
            // raft ignores a read until the leader has committed an entry of its own term
            // (its commit index could be stale); hold the reads until then.
            return false;
        }
        let ctx = self.next_read;
        self.next_read += 1;
        self.raw.read_index(ctx.to_le_bytes().to_vec());
        self.reads_in_flight.insert(
            ctx,
            ReadRound {
                waiters: std::mem::take(&mut self.queued_reads),
                term,
                leader,
                issued_at_tick: now,
            },
        );
        true
    }

    /// persist → send → apply → advance, as raft-rs requires.
    fn on_ready(&mut self, stopped: &dyn Fn() -> bool) -> Result<(), RaftError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();

        // Messages that need no local persistence first (a leader's appends go out while it
        // writes its own copy).
        if !ready.messages().is_empty() {
            self.transport.send(ready.take_messages());
        }
        if !ready.snapshot().is_empty() {
            self.install_snapshot(ready.snapshot().clone(), stopped)?;
        }
        self.answer_reads(ready.take_read_states());
        // raft-rs hands out only entries whose persistence finished, so applying first is safe.
        self.deliver(ready.take_committed_entries());

        // Persist: every new entry and the hard state in one fsync.
        let entries = ready.take_entries();
        let hs = ready.hs().cloned();
        if !entries.is_empty() || hs.is_some() {
            let started = Instant::now();
            self.raw.mut_store().append(&entries, hs.as_ref())?;
            metrics::histogram!("etcd_disk_wal_fsync_duration_seconds")
                .record(started.elapsed().as_secs_f64());
            self.stats.wal_appends.fetch_add(1, Ordering::Relaxed);
        }
        if !ready.persisted_messages().is_empty() {
            self.transport.send(ready.take_persisted_messages());
        }

        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit);
        }
        if !light.messages().is_empty() {
            self.transport.send(light.take_messages());
        }
        self.deliver(light.take_committed_entries());
        self.raw.advance_apply();
        self.observe_leadership();
        self.maybe_compact()?;
        Ok(())
    }

    /// The state machine takes the leader's state first (through the applier, after every
    /// entry delivered before), then the log records the snapshot. A failed install (the
    /// leader died or stepped down mid-transfer, every other member was busy) is asked for
    /// again with backoff until it works or the loop is stopped: this member can do nothing
    /// useful before it has the state, and stopping would take it out of the cluster for good.
    fn install_snapshot(
        &mut self,
        snap: Snapshot,
        stopped: &dyn Fn() -> bool,
    ) -> Result<(), RaftError> {
        let mut backoff = SNAPSHOT_RETRY_MIN;
        loop {
            match self.request_install(&snap) {
                Ok(()) => break,
                Err(RaftError::Snapshot(why)) => {
                    tracing::warn!(
                        error = %why,
                        retry_in_ms = backoff.as_millis() as u64,
                        "raft: snapshot not installed; asking again"
                    );
                    metrics::counter!("oxcd_snapshot_install_failures_total").increment(1);
                    let until = Instant::now() + backoff;
                    while Instant::now() < until {
                        if stopped() {
                            return Err(RaftError::Stopped);
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    backoff = (backoff * 2).min(SNAPSHOT_RETRY_MAX);
                }
                Err(e) => return Err(e),
            }
        }
        self.raw.mut_store().apply_snapshot(snap)?;
        Ok(())
    }

    /// One install request to the applier; `RaftError::Snapshot` when it could not be done.
    fn request_install(&mut self, snap: &Snapshot) -> Result<(), RaftError> {
        let md = snap.get_metadata();
        let (done, answer) = std::sync::mpsc::channel();
        let request = InstallSnapshot {
            index: md.index,
            term: md.term,
            from: self.raw.raft.leader_id,
            done,
        };
        tracing::info!(
            index = md.index,
            term = md.term,
            from = %format!("{:x}", request.from),
            "raft: installing a snapshot from the leader"
        );
        self.committed_tx
            .blocking_send(Committed {
                snapshot: Some(request),
                entries: Vec::new(),
            })
            .map_err(|_| RaftError::Stopped)?;
        // An applier that drops the request without answering is going away.
        let applied = answer
            .recv()
            .map_err(|_| RaftError::Stopped)?
            .map_err(RaftError::Snapshot)?;
        if applied < md.index {
            return Err(RaftError::Snapshot(format!(
                "installed state reflects index {applied}, the snapshot is at {}",
                md.index
            )));
        }
        Ok(())
    }

    /// Every `snapshot_count` applied entries: make the state machine durable and drop the
    /// log below it, keeping `catchup_entries` for followers slightly behind.
    fn maybe_compact(&mut self) -> Result<(), RaftError> {
        let applied = self.raw.raft.raft_log.applied;
        let compacted = self.raw.store().compacted_index();
        if applied.saturating_sub(compacted.max(self.compact_checked)) <= self.snapshot_count {
            return Ok(());
        }
        let durable = match self.state_machine.persist() {
            Ok(d) => d.min(applied),
            Err(e) => {
                tracing::debug!(error = %e, "raft: log not compacted");
                // Try again after another snapshot_count entries, not on every Ready.
                self.compact_checked = applied;
                return Ok(());
            }
        };
        self.compact_checked = applied;
        let to = durable.saturating_sub(self.catchup_entries);
        if to > compacted {
            let started = Instant::now();
            self.raw.mut_store().compact_to(to)?;
            metrics::counter!("etcd_debugging_snap_save_total_num").increment(1);
            tracing::info!(
                compacted_to = to,
                applied,
                took_ms = started.elapsed().as_millis() as u64,
                "raft: log compacted"
            );
        }
        Ok(())
    }

    fn answer_reads(&mut self, states: Vec<raft::ReadState>) {
        for rs in states {
            let Ok(ctx) = <[u8; 8]>::try_from(rs.request_ctx.as_slice()) else {
                continue;
            };
            if let Some(round) = self.reads_in_flight.remove(&u64::from_le_bytes(ctx)) {
                for w in round.waiters {
                    let _ = w.send(Ok(rs.index));
                }
            }
        }
    }

    fn deliver(&mut self, entries: Vec<Entry>) {
        if entries.is_empty() {
            return;
        }
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let kind = match e.get_entry_type() {
                EntryType::EntryNormal => EntryKind::Normal,
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    if self.apply_conf_change(&e) {
                        EntryKind::ConfChange
                    } else {
                        EntryKind::RejectedConfChange
                    }
                }
            };
            let reply = self.take_responder(&e);
            out.push(CommittedEntry {
                index: e.index,
                term: e.term,
                kind,
                data: e.data.to_vec(),
                reply,
            });
        }
        metrics::gauge!("etcd_server_proposals_committed_total")
            .set(self.raw.raft.raft_log.committed as f64);
        if self
            .committed_tx
            .blocking_send(Committed::entries(out))
            .is_err()
        {
            tracing::warn!("raft: applier is gone; committed entries not delivered");
        }
    }

    /// The responder of a proposal made here that committed as `e`.
    fn take_responder(&mut self, e: &Entry) -> Option<R> {
        if self.pending.is_empty() {
            return None;
        }
        let ctx = <[u8; 8]>::try_from(e.get_context()).ok()?;
        self.pending
            .remove(&u64::from_le_bytes(ctx))
            .map(|p| p.reply)
    }

    fn apply_conf_change(&mut self, e: &Entry) -> bool {
        use protobuf::Message as _;
        let result = if e.get_entry_type() == EntryType::EntryConfChange {
            let mut cc = ConfChange::default();
            cc.merge_from_bytes(e.get_data())
                .map_err(raft::Error::CodecError)
                .and_then(|_| self.raw.apply_conf_change(&cc))
        } else {
            let mut cc = ConfChangeV2::default();
            cc.merge_from_bytes(e.get_data())
                .map_err(raft::Error::CodecError)
                .and_then(|_| self.raw.apply_conf_change(&cc))
        };
        match result {
            Ok(cs) => {
                if let Err(err) = self.raw.mut_store().set_conf_state(cs) {
                    tracing::error!(error = %err, "raft: cannot persist conf state");
                }
                true
            }
            Err(err) => {
                tracing::warn!(index = e.index, error = %err, "raft: bad conf change");
                false
            }
        }
    }

    fn observe_leadership(&mut self) {
        let leader = self.raw.raft.leader_id;
        if leader != self.leader_seen {
            if leader != raft::INVALID_ID {
                metrics::counter!("etcd_server_leader_changes_seen_total").increment(1);
            }
            self.leader_seen = leader;
        }
        let has_leader = leader != raft::INVALID_ID;
        metrics::gauge!("etcd_server_has_leader").set(if has_leader { 1.0 } else { 0.0 });
        let is_leader = self.raw.raft.state == StateRole::Leader;
        metrics::gauge!("etcd_server_is_leader").set(if is_leader { 1.0 } else { 0.0 });
        let term = self.raw.raft.term;
        if self.pending.values().any(|p| p.term != term) {
            // A proposal from an earlier term may have been lost with its leader; its client
            // learns "leader changed" (the outcome is unknown) rather than waiting for the
            // request timeout.
            self.pending.retain(|_, p| p.term == term);
        }
    }
}

/// Builds a raft snapshot value from the wal's marker (for loading at start-up).
fn snapshot_from_marker(m: &wal::SnapshotMarker) -> Result<Snapshot, RaftError> {
    let mut s = Snapshot::default();
    let md = s.mut_metadata();
    md.index = m.index;
    md.term = m.term;
    md.set_conf_state(storage::decode_conf_state(&m.conf_state)?);
    Ok(s)
}

#[cfg(test)]
mod tests;
