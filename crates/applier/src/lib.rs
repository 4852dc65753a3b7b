//! applier: turns committed raft entries into state, in log order, on every member.
//!
//! Reads: `Committed` batches from raft-node's committed channel.
//! Writes: each entry into mvcc-store (one engine batch per entry, or per run of consecutive
//! plain puts, always carrying the raft index, so a restart replays exactly what was not applied
//! yet); the resulting `Events` to the watch hub;
//! the applied index on a `tokio::sync::watch` channel (linearizable reads wait on it); and the
//! outcome to the proposer's oneshot, which only the member that proposed the entry holds.
//! Lease grants, revokes and checkpoints go to the lessor (`lease::LeaseHandle`), and
//! keys written with a lease are attached to it there; a revoke deletes the lease's keys in
//! one revision, as etcd does. Membership entries (raft configuration changes and member
//! attributes) update the `Membership` records. Alarm entries update the `Alarms`; while one is
//! set, writes it forbids are refused on every member (etcd's capped and corrupt appliers).

mod alarms;
mod lease_store;
mod membership;

pub use alarms::{
    alarm_text, request_cost, AlarmError, Alarms, Quota, DEFAULT_QUOTA_BYTES, MAX_QUOTA_BYTES,
};
pub use lease_store::EngineLeaseStore;
pub use membership::{Membership, MembershipError};

use std::time::Instant;

use lease::{LeaseError, LeaseHandle};
use oxcd_proto::etcdserverpb::{
    alarm_request::AlarmAction, request_op, AlarmRequest, AlarmResponse, AlarmType,
    CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, InternalRaftRequest,
    LeaseGrantResponse, LeaseRevokeResponse, PutResponse, RequestOp, TxnRequest, TxnResponse,
};
use oxcd_proto::mvccpb::{event::EventType, Event};
use prost::Message;
use raft_node::{Committed, CommittedEntry, EntryKind, InstallSnapshot};
use tokio::sync::{mpsc, oneshot};

pub use mvcc_store::{CompactionWait, MvccError, MvccStore};

/// The reply channel a proposer hands to raft-node with its proposal.
pub type Responder = oneshot::Sender<Result<ApplyResponse, ApplyError>>;

/// What applying one request produced, for the client that proposed it.
#[derive(Debug)]
pub enum ApplyResponse {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    Compact {
        response: CompactionResponse,
        /// Resolves once the compacted revisions are physically gone.
        physical: Option<CompactionWait>,
    },
    LeaseGrant(LeaseGrantResponse),
    LeaseRevoke(LeaseRevokeResponse),
    /// The alarms raised or cleared (GET: every matching alarm).
    Alarm(AlarmResponse),
    /// Entries with no client-visible result (raft's empty entries, membership changes).
    Empty {
        revision: i64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Mvcc(#[from] MvccError),
    #[error("applier: undecodable entry at index {index}: {reason}")]
    Decode { index: u64, reason: String },
    #[error("applier: entry at index {index} carries no request")]
    EmptyRequest { index: u64 },
    #[error("etcdserver: raft refused the membership change")]
    ConfChangeRejected,
    #[error(transparent)]
    Membership(#[from] MembershipError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error(transparent)]
    Alarm(#[from] AlarmError),
    /// The backend is over its quota, or a NOSPACE alarm is set.
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    /// A CORRUPT alarm is set.
    #[error("etcdserver: corrupt cluster")]
    Corrupt,
}

/// What the alarms and the quota say of a request before it is applied.
enum Admission {
    Apply,
    /// Applied all the same, but its proposer is told NOSPACE and the alarm is raised.
    ApplyOverQuota,
    /// Consumed without a change (etcd's corrupt and capped appliers).
    Refuse(ApplyError),
}

/// Hands an applied entry's outcome to its proposer, if this member holds it.
fn answer(index: u64, reply: Option<Responder>, outcome: Result<ApplyResponse, ApplyError>) {
    match reply {
        // The client may have gone away; its result is applied all the same.
        Some(reply) => {
            let _ = reply.send(outcome);
        }
        None => {
            if let Err(e) = outcome {
                tracing::debug!(index, error = %e, "applied entry failed (no waiting client)");
            }
        }
    }
}

/// Requests that go through raft, as the api-gateway builds them.
pub fn encode_request(req: &InternalRaftRequest) -> Vec<u8> {
    req.encode_to_vec()
}

/// Decodes an entry payload; also used by `oxcd dump-logs`.
pub fn decode_request(data: &[u8]) -> Result<InternalRaftRequest, prost::DecodeError> {
    InternalRaftRequest::decode(data)
}

/// Everything one applied request changed, at one revision, for the watch layer.
pub use watch::Events;

/// The store as raft-node sees it: how far it applied, and making that durable before raft
/// drops its log below it.
pub struct StoreStateMachine(pub MvccStore);

impl raft_node::StateMachine for StoreStateMachine {
    fn applied(&self) -> u64 {
        self.0.applied_index()
    }

    fn persist(&self) -> Result<u64, String> {
        self.0.persist().map_err(|e| e.to_string())
    }
}

/// Takes one record of a fetched snapshot.
pub type SnapshotSink<'a> = dyn FnMut(&[u8], &[u8]) -> Result<(), String> + 'a;

/// Where a member far behind gets another member's whole state for a snapshot install.
pub trait SnapshotFetcher: Send {
    /// Members to ask, best first, when member `from` sent raft's snapshot message.
    fn candidates(&mut self, from: u64) -> Vec<u64>;
    /// Streams the records of an `MvccStore::export` by `member`, reflecting at least
    /// `index`, in order into `sink`; returns how many there were. After an error the
    /// records handed on are discarded.
    fn fetch(
        &mut self,
        index: u64,
        member: u64,
        sink: &mut SnapshotSink<'_>,
    ) -> Result<u64, String>;
}

/// What `Applier::with_snapshots` installs snapshots with.
pub type SnapshotFetch = Box<dyn SnapshotFetcher>;

pub struct Applier {
    store: MvccStore,
    events_tx: Option<mpsc::Sender<Events>>,
    applied_tx: tokio::sync::watch::Sender<u64>,
    /// None: this applier serves no leases (tests of the key-value path); a put naming a
    /// lease then fails as for an unknown lease.
    leases: Option<LeaseHandle>,
    /// None: membership is not tracked (tests of the key-value path).
    membership: Option<Membership>,
    /// None: snapshots cannot be installed (a single member never needs one).
    fetch_snapshot: Option<SnapshotFetch>,
    /// None: alarm entries change nothing and no write is ever refused for space.
    alarms: Option<(Alarms, Quota)>,
    /// Events of the batch being applied, not yet handed to the watch hub.
    unsent: Vec<Events>,
}

impl Applier {
    pub fn new(
        store: MvccStore,
        events_tx: Option<mpsc::Sender<Events>>,
        applied_tx: tokio::sync::watch::Sender<u64>,
    ) -> Self {
        Applier {
            store,
            events_tx,
            applied_tx,
            leases: None,
            membership: None,
            fetch_snapshot: None,
            alarms: None,
            unsent: Vec::new(),
        }
    }

    /// Applies lease requests through `leases` and keeps key attachments there.
    pub fn with_leases(mut self, leases: LeaseHandle) -> Self {
        self.leases = Some(leases);
        self
    }

    /// Applies membership entries to `membership`.
    pub fn with_membership(mut self, membership: Membership) -> Self {
        self.membership = Some(membership);
        self
    }

    /// Applies alarm entries to `alarms`, refuses writes while an alarm forbids them, and
    /// reports writes that found the backend over `quota` (etcd's quota applier).
    pub fn with_alarms(mut self, alarms: Alarms, quota: Quota) -> Self {
        self.alarms = Some((alarms, quota));
        self
    }

    /// Installs snapshots with state fetched through `fetch`.
    pub fn with_snapshots(mut self, fetch: SnapshotFetch) -> Self {
        self.fetch_snapshot = Some(fetch);
        self
    }

    /// Runs until raft-node closes the committed channel. Blocking: give it its own thread,
    /// so engine writes never stall the async runtime.
    pub fn run(mut self, mut committed: mpsc::Receiver<Committed<Responder>>) {
        while let Some(batch) = committed.blocking_recv() {
            if let Some(snap) = batch.snapshot {
                self.install_snapshot(snap);
            }
            let mut last = None;
            let mut run = Vec::new();
            for entry in batch.entries {
                last = Some(entry.index);
                match self.decode_entry(&entry) {
                    Some(Ok(req)) if self.joins_put_run(entry.index, &req) => {
                        run.push((entry, req))
                    }
                    decoded => {
                        self.apply_put_run(std::mem::take(&mut run));
                        self.apply_entry(entry, decoded);
                    }
                }
            }
            self.apply_put_run(run);
            self.send_events();
            if let Some(index) = last {
                // A gauge holding the applied index, as etcd exports it despite the name.
                metrics::gauge!("etcd_server_proposals_applied_total").set(index as f64);
                metrics::gauge!("oxcd_applier_applied_index").set(index as f64);
                self.applied_tx.send_replace(index);
            }
        }
        tracing::info!("applier: committed channel closed, stopping");
    }

    /// Replaces this member's state with the leader's (every entry delivered before is
    /// applied by now), then rebuilds what other layers keep in memory from it: lease
    /// records with their keys, and the member list. Retried a few times, since the leader
    /// may be busy or changing; raft-node asks again, with backoff, if it cannot be done now.
    fn install_snapshot(&mut self, snap: InstallSnapshot) {
        let mut outcome = Err("no snapshot source".to_string());
        for attempt in 0..5 {
            if attempt > 0 {
                std::thread::sleep(std::time::Duration::from_millis(500 * attempt));
            }
            outcome = self.try_install(snap.index, snap.from);
            match &outcome {
                Ok(_) => break,
                Err(e) => tracing::warn!(attempt, error = %e, "applier: snapshot install failed"),
            }
        }
        if let Ok(applied) = outcome {
            self.applied_tx.send_replace(applied);
            if let Some(tx) = &self.events_tx {
                let _ = tx.blocking_send(Events::jumped_to(self.store.current_revision()));
            }
        }
        let _ = snap.done.send(outcome);
    }

    fn try_install(&mut self, index: u64, from: u64) -> Result<u64, String> {
        let fetcher = self.fetch_snapshot.as_mut().ok_or("no snapshot source")?;
        let started = Instant::now();
        let mut last = String::from("no member to fetch a snapshot from");
        let mut installed = None;
        for member in fetcher.candidates(from) {
            // Records stream from the transfer into the engine. Every attempt starts over, so
            // a transfer that breaks off leaves the store as it was.
            let mut records = 0;
            let outcome = self.store.install(&mut |sink| {
                records = fetcher.fetch(index, member, &mut |k, v| {
                    sink(k, v).map_err(|e| e.to_string())
                })?;
                Ok(())
            });
            match outcome {
                Ok(()) => {
                    installed = Some((member, records));
                    break;
                }
                Err(e) => last = format!("from {member:x}: {e}"),
            }
        }
        let (member, records) = installed.ok_or(last)?;
        if let Some(leases) = &self.leases {
            leases.reload().map_err(|e| e.to_string())?;
            for (lease, key) in self.store.leased_keys().map_err(|e| e.to_string())? {
                let _ = leases.attach(lease, &key);
            }
        }
        if let Some(m) = &self.membership {
            m.reload().map_err(|e| e.to_string())?;
        }
        if let Some((a, _)) = &self.alarms {
            a.reload().map_err(|e| e.to_string())?;
        }
        let applied = self.store.applied_index();
        tracing::info!(
            index,
            applied,
            from = %format!("{member:x}"),
            records,
            revision = self.store.current_revision(),
            took_ms = started.elapsed().as_millis() as u64,
            "applier: snapshot installed"
        );
        Ok(applied)
    }

    /// The request a normal entry carries; None when there is nothing to decode (another kind
    /// of entry, an empty one, or one already applied).
    fn decode_entry(
        &self,
        entry: &CommittedEntry<Responder>,
    ) -> Option<Result<InternalRaftRequest, ApplyError>> {
        if entry.kind != EntryKind::Normal
            || entry.data.is_empty()
            || (entry.index != 0 && entry.index <= self.store.applied_index())
        {
            return None;
        }
        Some(decode_request(&entry.data).map_err(|e| ApplyError::Decode {
            index: entry.index,
            reason: e.to_string(),
        }))
    }

    /// Whether the entry is a plain put (no prev_kv, ignore_value or ignore_lease) that
    /// `apply_payload` would apply as such: `apply_request` takes its put branch (none of the
    /// fields it checks before is set) and the alarms and quota let it through unremarked.
    /// Such puts are applied together (`apply_put_run`).
    fn joins_put_run(&self, index: u64, req: &InternalRaftRequest) -> bool {
        let Some(p) = &req.put else { return false };
        let other = req.lease_grant.is_some()
            || req.lease_revoke.is_some()
            || req.alarm.is_some()
            || req.lease_checkpoint.is_some()
            || req.member_attr_set.is_some()
            || req.member_update.is_some();
        index != 0
            && !other
            && !(p.prev_kv || p.ignore_value || p.ignore_lease)
            && matches!(self.admission(req), Admission::Apply)
    }

    /// Applies consecutive plain puts with one store write, then answers their proposers in
    /// log order.
    fn apply_put_run(&mut self, run: Vec<(CommittedEntry<Responder>, InternalRaftRequest)>) {
        if run.is_empty() {
            return;
        }
        let leases = self.leases.clone();
        let lease_exists = |id: i64| leases.as_ref().is_some_and(|l| l.contains(id));
        let puts: Vec<(u64, &oxcd_proto::etcdserverpb::PutRequest)> = run
            .iter()
            .filter_map(|(e, req)| req.put.as_ref().map(|p| (e.index, p)))
            .collect();
        let outcomes = match self.store.apply_puts(&puts, &lease_exists) {
            Ok(o) => o,
            Err(e) => {
                // The engine failed: no put of the run is in; each proposer learns why.
                let text = e.to_string();
                tracing::error!(error = %text, "applier: batch of puts not applied");
                for (entry, _) in run {
                    let e = MvccError::Engine(mvcc_store::EngineError::Other(text.clone()));
                    answer(entry.index, entry.reply, Err(e.into()));
                }
                return;
            }
        };
        for ((entry, _), outcome) in run.into_iter().zip(outcomes) {
            let outcome = outcome.map_err(ApplyError::from).map(|(response, event)| {
                let revision = response.header.as_ref().map_or(0, |h| h.revision);
                let events = vec![event];
                self.track_attachments(&events);
                self.publish(revision, events);
                ApplyResponse::Put(response)
            });
            answer(entry.index, entry.reply, outcome);
        }
    }

    fn apply_entry(
        &mut self,
        entry: CommittedEntry<Responder>,
        decoded: Option<Result<InternalRaftRequest, ApplyError>>,
    ) {
        let started = Instant::now();
        let index = entry.index;
        let outcome = self.apply_payload(index, entry.kind, &entry.data, decoded);
        let took = started.elapsed();
        if took.as_millis() >= 100 {
            tracing::warn!(
                index,
                took_ms = took.as_millis() as u64,
                "apply request took too long"
            );
        }
        answer(index, entry.reply, outcome);
    }

    /// `decoded`: the entry's request if the caller has decoded it already.
    fn apply_payload(
        &mut self,
        index: u64,
        kind: EntryKind,
        data: &[u8],
        decoded: Option<Result<InternalRaftRequest, ApplyError>>,
    ) -> Result<ApplyResponse, ApplyError> {
        use mvcc_store::WriteOp;
        if index != 0 && index <= self.store.applied_index() {
            // Already in the state: a replay after a restart, or covered by an installed
            // snapshot. Applying it again could resurrect what later entries removed.
            return Ok(ApplyResponse::Empty {
                revision: self.store.current_revision(),
            });
        }
        match kind {
            EntryKind::ConfChange => return self.apply_conf_change(index, data),
            EntryKind::RejectedConfChange => {
                self.store.apply(index, WriteOp::Noop, &|_| false)?;
                return Err(ApplyError::ConfChangeRejected);
            }
            EntryKind::Normal => {}
        }
        if data.is_empty() {
            let applied = self.store.apply(index, WriteOp::Noop, &|_| false)?;
            return Ok(ApplyResponse::Empty {
                revision: applied.revision,
            });
        }
        let req = match decoded {
            Some(d) => d?,
            None => decode_request(data).map_err(|e| ApplyError::Decode {
                index,
                reason: e.to_string(),
            })?,
        };
        match self.admission(&req) {
            Admission::Apply => self.apply_request(index, &req),
            Admission::Refuse(e) => {
                self.store.apply(index, WriteOp::Noop, &|_| false)?;
                Err(e)
            }
            Admission::ApplyOverQuota => {
                // The proposer hears of a failed request, not of the quota.
                self.apply_request(index, &req)?;
                if let Some((alarms, quota)) = &self.alarms {
                    tracing::warn!(
                        quota_size_bytes = quota.gauge(),
                        "message exceeded backend quota; raising alarm"
                    );
                    alarms.report_exceeded();
                }
                Err(ApplyError::NoSpace)
            }
        }
    }

    /// What the alarms and the quota say of `req` before it is applied.
    fn admission(&self, req: &InternalRaftRequest) -> Admission {
        let Some((alarms, quota)) = &self.alarms else {
            return Admission::Apply;
        };
        let cost = request_cost(req);
        // etcd's corrupt and capped appliers: the entry is consumed, nothing changes.
        if alarms.active(AlarmType::Corrupt) && writes(req) {
            return Admission::Refuse(ApplyError::Corrupt);
        }
        if alarms.active(AlarmType::Nospace) && cost > 0 {
            return Admission::Refuse(ApplyError::NoSpace);
        }
        // etcd's quota applier: a write that finds the backend over the quota is applied all
        // the same (every member must apply the same log), but its proposer is told NOSPACE
        // and this member raises its alarm.
        if cost > 0 && quota.limit().is_some() && !quota.available(self.store.db_size(), cost) {
            return Admission::ApplyOverQuota;
        }
        Admission::Apply
    }

    fn apply_request(
        &mut self,
        index: u64,
        req: &InternalRaftRequest,
    ) -> Result<ApplyResponse, ApplyError> {
        use mvcc_store::WriteOp;
        let leases = self.leases.clone();
        let lease_exists = |id: i64| match &leases {
            Some(l) => l.contains(id),
            None => false,
        };
        if let Some(grant) = req.lease_grant.as_ref() {
            return self.apply_grant(index, grant.id, grant.ttl);
        }
        if let Some(revoke) = req.lease_revoke.as_ref() {
            return self.apply_revoke(index, revoke.id);
        }
        if let Some(alarm) = req.alarm.as_ref() {
            return self.apply_alarm(index, alarm);
        }
        if let Some(cp) = req.lease_checkpoint.as_ref() {
            if let Some(l) = &self.leases {
                for c in &cp.checkpoints {
                    // A lease revoked meanwhile has nothing left to checkpoint.
                    let _ = l.checkpoint(c.id, c.remaining_ttl);
                }
            }
            let applied = self.store.apply(index, WriteOp::Noop, &lease_exists)?;
            return Ok(ApplyResponse::Empty {
                revision: applied.revision,
            });
        }
        if req.member_attr_set.is_some() || req.member_update.is_some() {
            if let Some(m) = &self.membership {
                if let Some(a) = &req.member_attr_set {
                    m.update(a.member_id, |x| {
                        x.name = a.name.clone();
                        x.client_ur_ls = a.client_urls.clone();
                    })?;
                }
                if let Some(u) = &req.member_update {
                    m.update(u.id, |x| x.peer_ur_ls = u.peer_ur_ls.clone())?;
                }
            }
            let applied = self.store.apply(index, WriteOp::Noop, &lease_exists)?;
            return Ok(ApplyResponse::Empty {
                revision: applied.revision,
            });
        }
        let op = if let Some(put) = req.put.as_ref() {
            WriteOp::Put(put)
        } else if let Some(del) = req.delete_range.as_ref() {
            WriteOp::DeleteRange(del)
        } else if let Some(txn) = req.txn.as_ref() {
            WriteOp::Txn(txn)
        } else if let Some(c) = req.compaction.as_ref() {
            WriteOp::Compact(c)
        } else {
            // Record the index even for requests this member does not know, so replay stays exact.
            self.store.apply(index, WriteOp::Noop, &lease_exists)?;
            return Err(ApplyError::EmptyRequest { index });
        };
        let mut applied = self.store.apply(index, op, &lease_exists)?;
        self.track_attachments(&applied.events);
        self.publish(applied.revision, std::mem::take(&mut applied.events));
        use mvcc_store::WriteResponse as W;
        Ok(match applied.response {
            W::Put(r) => ApplyResponse::Put(r),
            W::DeleteRange(r) => ApplyResponse::DeleteRange(r),
            W::Txn(r) => ApplyResponse::Txn(r),
            W::Compact(r) => ApplyResponse::Compact {
                response: r,
                physical: applied.compaction,
            },
            W::None => ApplyResponse::Empty {
                revision: applied.revision,
            },
        })
    }
}

impl Applier {
    /// raft has already changed its configuration; record who the member is. The entry's
    /// context carries the member record the Cluster service proposed.
    fn apply_conf_change(&mut self, index: u64, data: &[u8]) -> Result<ApplyResponse, ApplyError> {
        use mvcc_store::WriteOp;
        use raft_node::ConfChangeType as T;
        let cc = raft_node::decode_conf_change(data).map_err(|e| ApplyError::Decode {
            index,
            reason: e.to_string(),
        })?;
        if let Some(m) = &self.membership {
            match cc.get_change_type() {
                T::AddNode | T::AddLearnerNode => {
                    let learner = cc.get_change_type() == T::AddLearnerNode;
                    match m.get(cc.node_id) {
                        // Promotion: the same member, now a voter.
                        Some(_) => m.update(cc.node_id, |x| x.is_learner = learner)?,
                        None => {
                            let mut member =
                                oxcd_proto::etcdserverpb::Member::decode(cc.get_context())
                                    .unwrap_or_default();
                            member.id = cc.node_id;
                            member.is_learner = learner;
                            m.save(member)?;
                        }
                    }
                }
                T::RemoveNode => m.remove(cc.node_id)?,
            }
        }
        let applied = self.store.apply(index, WriteOp::Noop, &|_| false)?;
        Ok(ApplyResponse::Empty {
            revision: applied.revision,
        })
    }

    /// etcd's alarm apply: GET lists, ACTIVATE and DEACTIVATE answer with the alarm they
    /// changed (nothing when there was nothing to change). The records are written before the
    /// entry's index, so a replay finds them already there.
    fn apply_alarm(&mut self, index: u64, req: &AlarmRequest) -> Result<ApplyResponse, ApplyError> {
        let mut resp = AlarmResponse::default();
        if let Some((alarms, _)) = &self.alarms {
            let name = AlarmType::try_from(req.alarm)
                .map(|t| t.as_str_name().to_string())
                .unwrap_or_else(|_| req.alarm.to_string());
            let from = format!("{:x}", req.member_id);
            match AlarmAction::try_from(req.action) {
                Ok(AlarmAction::Get) => resp.alarms = alarms.get(req.alarm),
                Ok(AlarmAction::Activate) => {
                    let before = alarms.get(req.alarm).len();
                    resp.alarms.push(alarms.activate(req.member_id, req.alarm)?);
                    if before == 0 {
                        tracing::warn!(alarm = %name, %from, "alarm raised");
                    }
                }
                Ok(AlarmAction::Deactivate) => {
                    if let Some(m) = alarms.deactivate(req.member_id, req.alarm)? {
                        resp.alarms.push(m);
                        if alarms.get(req.alarm).is_empty() {
                            tracing::warn!(alarm = %name, %from, "alarm disarmed");
                        }
                    }
                }
                Err(_) => {}
            }
        }
        self.store
            .apply(index, mvcc_store::WriteOp::Noop, &|_| false)?;
        Ok(ApplyResponse::Alarm(resp))
    }

    /// Queues a revision's events for the watch hub; `send_events` hands them over once the
    /// whole committed batch is applied.
    fn publish(&mut self, revision: i64, events: Vec<Event>) {
        if self.events_tx.is_some() && !events.is_empty() {
            self.unsent.push(Events { revision, events });
        }
    }

    /// One hand-over per committed batch rather than per entry: each send to a parked hub
    /// wakes a runtime thread, which under load cost more than the events themselves.
    fn send_events(&mut self) {
        let Some(tx) = &self.events_tx else { return };
        for ev in self.unsent.drain(..) {
            // Blocking send: the watch hub drains quickly and must see every revision.
            if tx.blocking_send(ev).is_err() {
                tracing::debug!("watch hub gone; events dropped");
            }
        }
    }

    /// Moves keys between leases as writes change them: a key leaves its old lease when it
    /// is deleted or rewritten under another, and joins the lease it is written with.
    fn track_attachments(&self, events: &[Event]) {
        let Some(leases) = &self.leases else { return };
        for ev in events {
            let Some(kv) = &ev.kv else { continue };
            // A put of an existing key may come without the value it replaced (mvcc-store
            // reads it only when needed); the lessor knows which lease holds the key. A new
            // key (version 1) held none.
            let old = match &ev.prev_kv {
                Some(p) => p.lease,
                None if kv.version > 1 => leases.lease_of(&kv.key).unwrap_or(0),
                None => 0,
            };
            let new = if ev.r#type == EventType::Delete as i32 {
                0
            } else {
                kv.lease
            };
            if old == new {
                continue;
            }
            if old != 0 {
                let _ = leases.detach(old, &kv.key);
            }
            if new != 0 {
                if let Err(e) = leases.attach(new, &kv.key) {
                    tracing::warn!(lease = new, error = %e, "key written with a lease the lessor lacks");
                }
            }
        }
    }

    fn apply_grant(&mut self, index: u64, id: i64, ttl: i64) -> Result<ApplyResponse, ApplyError> {
        let leases = self
            .leases
            .clone()
            .ok_or(ApplyError::Lease(LeaseError::NotFound))?;
        let granted = match leases.grant(id, ttl) {
            Ok(info) => Ok(info.ttl),
            // Replaying a grant whose record outlived the applied index: the gateway refuses
            // duplicate ids before proposing, so an existing id here is this very grant.
            Err(LeaseError::Exists) => match leases.lookup(id) {
                Some(info) => Ok(info.ttl),
                None => Err(LeaseError::Exists),
            },
            Err(e) => Err(e),
        };
        let applied = self
            .store
            .apply(index, mvcc_store::WriteOp::Noop, &|_| false)?;
        let ttl = granted.map_err(ApplyError::Lease)?;
        Ok(ApplyResponse::LeaseGrant(LeaseGrantResponse {
            header: Some(oxcd_proto::etcdserverpb::ResponseHeader {
                revision: applied.revision,
                ..Default::default()
            }),
            id,
            ttl,
            error: String::new(),
        }))
    }

    /// Forgets the lease and deletes its keys in one revision. The lessor stages the removal
    /// of the lease record, so the record, the keys and the entry's index leave the engine in
    /// one batch (as etcd drops the lease from its map before the key deletion commits).
    fn apply_revoke(&mut self, index: u64, id: i64) -> Result<ApplyResponse, ApplyError> {
        let leases = self
            .leases
            .clone()
            .ok_or(ApplyError::Lease(LeaseError::NotFound))?;
        let keys = match leases.revoke(id) {
            Ok(keys) => keys,
            Err(e) => {
                self.store
                    .apply(index, mvcc_store::WriteOp::Noop, &|_| false)?;
                return Err(ApplyError::Lease(e));
            }
        };
        let txn = TxnRequest {
            success: keys
                .into_iter()
                .map(|key| RequestOp {
                    request: Some(request_op::Request::RequestDeleteRange(
                        DeleteRangeRequest {
                            key,
                            prev_kv: true,
                            ..Default::default()
                        },
                    )),
                })
                .collect(),
            ..Default::default()
        };
        let op = if txn.success.is_empty() {
            mvcc_store::WriteOp::Noop
        } else {
            mvcc_store::WriteOp::Txn(&txn)
        };
        let mut applied = self.store.apply(index, op, &|_| false)?;
        self.publish(applied.revision, std::mem::take(&mut applied.events));
        Ok(ApplyResponse::LeaseRevoke(LeaseRevokeResponse {
            header: Some(oxcd_proto::etcdserverpb::ResponseHeader {
                revision: applied.revision,
                ..Default::default()
            }),
        }))
    }
}

/// What a CORRUPT alarm refuses: every request that would change the store or the leases.
/// (etcd 3.4 serves read-only txns outside its applier, so they are not refused.)
fn writes(req: &InternalRaftRequest) -> bool {
    req.put.is_some()
        || req.delete_range.is_some()
        || req.txn.as_ref().is_some_and(|t| !txn_read_only(t))
        || req.compaction.is_some()
        || req.lease_grant.is_some()
        || req.lease_revoke.is_some()
}

fn txn_read_only(t: &TxnRequest) -> bool {
    t.success
        .iter()
        .chain(&t.failure)
        .all(|op| match &op.request {
            Some(request_op::Request::RequestRange(_)) | None => true,
            Some(request_op::Request::RequestTxn(inner)) => txn_read_only(inner),
            Some(_) => false,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvcc_store::MemEngine;
    use oxcd_proto::etcdserverpb::{CompactionRequest, PutRequest, RangeRequest};
    use std::sync::Arc;

    struct Rig {
        committed: mpsc::Sender<Committed<Responder>>,
        events: mpsc::Receiver<Events>,
        applied: tokio::sync::watch::Receiver<u64>,
        store: MvccStore,
        thread: std::thread::JoinHandle<()>,
    }

    fn rig() -> Rig {
        let store = MvccStore::open(Arc::new(MemEngine::default())).unwrap();
        let (committed, committed_rx) = mpsc::channel(16);
        let (events_tx, events) = mpsc::channel(16);
        let (applied_tx, applied) = tokio::sync::watch::channel(0);
        let applier = Applier::new(store.clone(), Some(events_tx), applied_tx);
        let thread = std::thread::spawn(move || applier.run(committed_rx));
        Rig {
            committed,
            events,
            applied,
            store,
            thread,
        }
    }

    fn put(key: &str, value: &str) -> Vec<u8> {
        encode_request(&InternalRaftRequest {
            put: Some(PutRequest {
                key: key.into(),
                value: value.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn entry(index: u64, data: Vec<u8>, reply: Option<Responder>) -> CommittedEntry<Responder> {
        CommittedEntry {
            index,
            term: 2,
            kind: EntryKind::Normal,
            data,
            reply,
        }
    }

    #[tokio::test]
    async fn applies_in_order_answers_the_proposer_and_publishes_events() {
        let mut r = rig();
        let (tx, rx) = oneshot::channel();
        r.committed
            .send(Committed {
                snapshot: None,
                entries: vec![
                    entry(1, vec![], None),
                    entry(2, put("a", "1"), None),
                    entry(3, put("a", "2"), Some(tx)),
                ],
            })
            .await
            .unwrap();
        match rx.await.unwrap().unwrap() {
            ApplyResponse::Put(resp) => assert_eq!(resp.header.unwrap().revision, 3),
            other => panic!("unexpected {other:?}"),
        }
        r.applied.wait_for(|a| *a == 3).await.unwrap();
        assert_eq!(r.store.applied_index(), 3);
        let first = r.events.recv().await.unwrap();
        let second = r.events.recv().await.unwrap();
        assert_eq!((first.revision, second.revision), (2, 3));
        assert_eq!(second.events[0].kv.as_ref().unwrap().version, 2);

        let got = r
            .store
            .range(&RangeRequest {
                key: b"a".to_vec(),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(got.kvs[0].value, b"2");
        drop(r.committed);
        r.thread.join().unwrap();
    }

    #[tokio::test]
    async fn failures_reach_the_proposer_and_garbage_never_panics() {
        let r = rig();
        let (tx1, rx1) = oneshot::channel();
        let (tx2, rx2) = oneshot::channel();
        let compact_future = encode_request(&InternalRaftRequest {
            compaction: Some(CompactionRequest {
                revision: 100,
                physical: false,
            }),
            ..Default::default()
        });
        r.committed
            .send(Committed {
                snapshot: None,
                entries: vec![
                    entry(1, compact_future, Some(tx1)),
                    entry(2, vec![0xff, 0xff, 0xff], Some(tx2)),
                ],
            })
            .await
            .unwrap();
        assert!(matches!(
            rx1.await.unwrap(),
            Err(ApplyError::Mvcc(MvccError::FutureRevision))
        ));
        assert!(matches!(
            rx2.await.unwrap(),
            Err(ApplyError::Decode { index: 2, .. })
        ));
        drop(r.committed);
        r.thread.join().unwrap();
    }

    /// An applier with alarms over a shared in-memory engine, driven entry by entry.
    struct AlarmRig {
        engine: Arc<dyn mvcc_store::KvEngine>,
        store: MvccStore,
        alarms: Alarms,
        committed: mpsc::Sender<Committed<Responder>>,
        thread: std::thread::JoinHandle<()>,
        next: u64,
    }

    impl AlarmRig {
        fn start(engine: Arc<dyn mvcc_store::KvEngine>, quota: Quota) -> AlarmRig {
            let store = MvccStore::open(engine.clone()).unwrap();
            let alarms = Alarms::open(engine.clone()).unwrap();
            let (committed, committed_rx) = mpsc::channel(16);
            let (applied_tx, _) = tokio::sync::watch::channel(0);
            let applier =
                Applier::new(store.clone(), None, applied_tx).with_alarms(alarms.clone(), quota);
            let thread = std::thread::spawn(move || applier.run(committed_rx));
            let next = store.applied_index() + 1;
            AlarmRig {
                engine,
                store,
                alarms,
                committed,
                thread,
                next,
            }
        }

        async fn apply(&mut self, req: InternalRaftRequest) -> Result<ApplyResponse, ApplyError> {
            let (tx, rx) = oneshot::channel();
            let index = self.next;
            self.next += 1;
            self.committed
                .send(Committed {
                    snapshot: None,
                    entries: vec![entry(index, encode_request(&req), Some(tx))],
                })
                .await
                .unwrap();
            rx.await.unwrap()
        }

        fn stop(self) -> Arc<dyn mvcc_store::KvEngine> {
            drop(self.committed);
            self.thread.join().unwrap();
            self.engine
        }
    }

    fn alarm(action: AlarmAction, member_id: u64, alarm: AlarmType) -> InternalRaftRequest {
        InternalRaftRequest {
            alarm: Some(AlarmRequest {
                action: action as i32,
                member_id,
                alarm: alarm as i32,
            }),
            ..Default::default()
        }
    }

    fn put_req(key: &str, value: &str) -> InternalRaftRequest {
        decode_request(&put(key, value)).unwrap()
    }

    fn txn(success: Vec<RequestOp>) -> InternalRaftRequest {
        InternalRaftRequest {
            txn: Some(TxnRequest {
                success,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn range_op(key: &str) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key: key.into(),
                ..Default::default()
            })),
        }
    }

    fn put_op(key: &str) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: key.into(),
                value: b"v".to_vec(),
                ..Default::default()
            })),
        }
    }

    #[tokio::test]
    async fn nospace_alarm_caps_writes_and_survives_a_restart() {
        let engine: Arc<dyn mvcc_store::KvEngine> = Arc::new(MemEngine::default());
        let mut r = AlarmRig::start(engine, Quota::from_flag(-1));
        assert!(matches!(
            r.apply(put_req("a", "1")).await,
            Ok(ApplyResponse::Put(_))
        ));
        match r
            .apply(alarm(AlarmAction::Activate, 9, AlarmType::Nospace))
            .await
        {
            Ok(ApplyResponse::Alarm(resp)) => assert_eq!(
                resp.alarms,
                vec![oxcd_proto::etcdserverpb::AlarmMember {
                    member_id: 9,
                    alarm: AlarmType::Nospace as i32
                }]
            ),
            other => panic!("unexpected {other:?}"),
        }
        assert!(r.alarms.active(AlarmType::Nospace));
        let rev = r.store.current_revision();
        // What would grow the store is refused and changes nothing...
        assert!(matches!(
            r.apply(put_req("b", "2")).await,
            Err(ApplyError::NoSpace)
        ));
        assert!(matches!(
            r.apply(txn(vec![put_op("c")])).await,
            Err(ApplyError::NoSpace)
        ));
        let grant = InternalRaftRequest {
            lease_grant: Some(oxcd_proto::etcdserverpb::LeaseGrantRequest { ttl: 10, id: 5 }),
            ..Default::default()
        };
        assert!(matches!(r.apply(grant).await, Err(ApplyError::NoSpace)));
        assert_eq!(r.store.current_revision(), rev);
        // ...while reads, deletes and compaction still work.
        assert!(matches!(
            r.apply(txn(vec![range_op("a")])).await,
            Ok(ApplyResponse::Txn(_))
        ));
        let del = InternalRaftRequest {
            delete_range: Some(DeleteRangeRequest {
                key: b"a".to_vec(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(matches!(
            r.apply(del).await,
            Ok(ApplyResponse::DeleteRange(_))
        ));
        let compact = InternalRaftRequest {
            compaction: Some(CompactionRequest {
                revision: r.store.current_revision(),
                physical: false,
            }),
            ..Default::default()
        };
        assert!(matches!(
            r.apply(compact).await,
            Ok(ApplyResponse::Compact { .. })
        ));

        // A restart on the same engine keeps the alarm, and the cap with it.
        let applied = r.store.applied_index();
        let engine = r.stop();
        let mut r = AlarmRig::start(engine, Quota::from_flag(-1));
        assert_eq!(r.store.applied_index(), applied);
        assert!(r.alarms.has(9, AlarmType::Nospace));
        assert!(matches!(
            r.apply(put_req("b", "2")).await,
            Err(ApplyError::NoSpace)
        ));
        let listed = r
            .apply(alarm(AlarmAction::Get, 0, AlarmType::None))
            .await
            .unwrap();
        assert!(matches!(listed, ApplyResponse::Alarm(ref a) if a.alarms.len() == 1));

        // Disarming another member's alarm changes nothing; disarming this one lifts the cap.
        match r
            .apply(alarm(AlarmAction::Deactivate, 8, AlarmType::Nospace))
            .await
        {
            Ok(ApplyResponse::Alarm(resp)) => assert!(resp.alarms.is_empty()),
            other => panic!("unexpected {other:?}"),
        }
        assert!(r.alarms.active(AlarmType::Nospace));
        r.apply(alarm(AlarmAction::Deactivate, 9, AlarmType::Nospace))
            .await
            .unwrap();
        assert!(matches!(
            r.apply(put_req("b", "2")).await,
            Ok(ApplyResponse::Put(_))
        ));
        let engine = r.stop();
        assert!(Alarms::open(engine).unwrap().get(0).is_empty());
    }

    #[tokio::test]
    async fn a_write_over_the_quota_is_applied_but_reported() {
        let engine: Arc<dyn mvcc_store::KvEngine> = Arc::new(MemEngine::default());
        // The in-memory engine's size is its keys and values.
        let mut r = AlarmRig::start(engine, Quota::from_flag(2000));
        assert!(matches!(
            r.apply(put_req("a", "1")).await,
            Ok(ApplyResponse::Put(_))
        ));
        let big = "x".repeat(1800);
        assert!(matches!(
            r.apply(put_req("big", &big)).await,
            Err(ApplyError::NoSpace)
        ));
        // Every member applies the same log: the write is there all the same.
        let got = r
            .store
            .range(&RangeRequest {
                key: b"big".to_vec(),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(got.kvs.len(), 1);
        // The server is told to raise this member's alarm; the applier does not raise it.
        tokio::time::timeout(std::time::Duration::from_secs(5), r.alarms.exceeded())
            .await
            .expect("over-quota write reported");
        assert!(!r.alarms.active(AlarmType::Nospace));
        // Costless requests are never over the quota.
        assert!(matches!(
            r.apply(txn(vec![range_op("a")])).await,
            Ok(ApplyResponse::Txn(_))
        ));
        r.stop();
    }

    #[tokio::test]
    async fn corrupt_alarm_refuses_every_write_but_read_only_txns() {
        let engine: Arc<dyn mvcc_store::KvEngine> = Arc::new(MemEngine::default());
        let mut r = AlarmRig::start(engine, Quota::from_flag(-1));
        r.apply(alarm(AlarmAction::Activate, 3, AlarmType::Corrupt))
            .await
            .unwrap();
        assert!(matches!(
            r.apply(put_req("a", "1")).await,
            Err(ApplyError::Corrupt)
        ));
        let del = InternalRaftRequest {
            delete_range: Some(DeleteRangeRequest {
                key: b"a".to_vec(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(matches!(r.apply(del).await, Err(ApplyError::Corrupt)));
        assert!(matches!(
            r.apply(txn(vec![range_op("a")])).await,
            Ok(ApplyResponse::Txn(_))
        ));
        r.stop();
    }
}
