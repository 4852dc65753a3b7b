//! [`LeaseHandle`]: the [`Lessor`] shared by the applier, which applies the raft-ordered
//! operations, and the gRPC layer, which serves keep-alives and queries.
//!
//! Every operation is a direct call under one short lock, as etcd guards its lessor with a
//! mutex. The applier is the single thread every write goes through, so a grant or revoke
//! applied there must not wait for another task to be scheduled: with the lessor behind a
//! task and a channel, each of those round trips (three per grant+revoke) parked the
//! applier until a busy runtime got to the lease task. The lock is never held across an
//! await; a keep-alive that has to wait for a revoke parks a `oneshot` and waits outside it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::lessor::{LeaseInfo, LeaseTimeToLive, Lessor};
use crate::LeaseError;

type Parked = oneshot::Sender<Result<i64, LeaseError>>;

/// What a keep-alive gets under the lock: its answer, or a place in the queue of a lease
/// that awaits its revoke.
enum Renewal {
    Now(Result<i64, LeaseError>),
    Parked(oneshot::Receiver<Result<i64, LeaseError>>),
}

/// The lessor plus the keep-alives parked on leases that are past their deadline.
struct State {
    lessor: Lessor,
    parked: HashMap<i64, Vec<Parked>>,
}

impl State {
    /// The primary let the lease pass its deadline, so its revoke is on its way: answering
    /// a keep-alive now could tell a client its lease lives on just before its keys vanish.
    fn awaits_revoke(&self, id: i64) -> bool {
        self.lessor.is_primary() && self.lessor.is_expired(id)
    }

    /// Answers a renewal now, or parks it while the lease awaits its revoke.
    fn renew(&mut self, id: i64) -> Renewal {
        if self.awaits_revoke(id) {
            let (tx, rx) = oneshot::channel();
            self.parked.entry(id).or_default().push(tx);
            Renewal::Parked(rx)
        } else {
            Renewal::Now(self.lessor.renew(id))
        }
    }

    fn answer_parked(&mut self, id: i64, result: Result<i64, LeaseError>) {
        for reply in self.parked.remove(&id).unwrap_or_default() {
            let _ = reply.send(result.clone());
        }
    }

    /// After a promotion or reload deadlines moved, so parked keep-alives are looked at
    /// again: served, refused, or left parked.
    fn retry_parked(&mut self) {
        let mut ids: Vec<i64> = self.parked.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let Some(replies) = self.parked.remove(&id) else {
                continue;
            };
            for reply in replies {
                if reply.is_closed() {
                    continue;
                }
                if self.awaits_revoke(id) {
                    self.parked.entry(id).or_default().push(reply);
                } else {
                    let _ = reply.send(self.lessor.renew(id));
                }
            }
        }
    }
}

/// Cheap, cloneable access to the shared lessor.
#[derive(Clone)]
pub struct LeaseHandle {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for LeaseHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseHandle").finish_non_exhaustive()
    }
}

impl LeaseHandle {
    pub fn new(lessor: Lessor) -> LeaseHandle {
        LeaseHandle {
            state: Arc::new(Mutex::new(State {
                lessor,
                parked: HashMap::new(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub fn grant(&self, id: i64, ttl: i64) -> Result<LeaseInfo, LeaseError> {
        self.lock().lessor.grant(id, ttl)
    }

    /// Deletes the lease and returns its keys, sorted; keep-alives waiting on it learn
    /// that it is gone.
    pub fn revoke(&self, id: i64) -> Result<Vec<Vec<u8>>, LeaseError> {
        let mut st = self.lock();
        let keys = st.lessor.revoke(id)?;
        st.answer_parked(id, Err(LeaseError::NotFound));
        Ok(keys)
    }

    pub fn attach(&self, id: i64, key: &[u8]) -> Result<(), LeaseError> {
        self.lock().lessor.attach(id, key)
    }

    pub fn detach(&self, id: i64, key: &[u8]) -> Result<(), LeaseError> {
        self.lock().lessor.detach(id, key)
    }

    pub fn lease_of(&self, key: &[u8]) -> Option<i64> {
        self.lock().lessor.lease_of(key)
    }

    pub fn contains(&self, id: i64) -> bool {
        self.lock().lessor.contains(id)
    }

    pub fn lookup(&self, id: i64) -> Option<LeaseInfo> {
        self.lock().lessor.lookup(id)
    }

    /// Keys attached to lease `id`, sorted.
    pub fn keys(&self, id: i64) -> Option<Vec<Vec<u8>>> {
        self.lock().lessor.keys(id)
    }

    pub fn leases(&self) -> Vec<LeaseInfo> {
        self.lock().lessor.leases()
    }

    pub fn time_to_live(&self, id: i64) -> Result<LeaseTimeToLive, LeaseError> {
        self.lock().lessor.time_to_live(id)
    }

    pub fn checkpoint(&self, id: i64, remaining_ttl: i64) -> Result<(), LeaseError> {
        self.lock().lessor.checkpoint(id, remaining_ttl)
    }

    pub fn promote(&self, extend: Duration) {
        let mut st = self.lock();
        st.lessor.promote(extend);
        st.retry_parked();
    }

    pub fn demote(&self) {
        let mut st = self.lock();
        st.lessor.demote();
        for (_, replies) in st.parked.drain() {
            for reply in replies {
                let _ = reply.send(Err(LeaseError::NotPrimary));
            }
        }
    }

    /// Keep-alive. Answered when the lease is renewed; for a lease past its deadline, only
    /// once it is revoked (`NotFound`) or this member is demoted (`NotPrimary`).
    pub async fn renew(&self, id: i64) -> Result<i64, LeaseError> {
        let renewal = self.lock().renew(id);
        match renewal {
            Renewal::Now(answer) => answer,
            Renewal::Parked(rx) => rx.await.map_err(|_| LeaseError::Stopped)?,
        }
    }

    pub fn expired(&self, max: usize) -> Vec<i64> {
        self.lock().lessor.expired(max)
    }

    pub fn checkpoints_due(&self, max: usize) -> Vec<(i64, i64)> {
        self.lock().lessor.checkpoints_due(max)
    }

    pub fn is_primary(&self) -> bool {
        self.lock().lessor.is_primary()
    }

    /// Reads every lease back from the store (after a snapshot install); keys must be
    /// attached again by the caller.
    pub fn reload(&self) -> Result<(), LeaseError> {
        let mut st = self.lock();
        let result = st.lessor.reload();
        // Reloaded leases got fresh deadlines or are gone; renew decides which.
        st.retry_parked();
        result
    }

    /// Starts a task that every `cfg.period` collects expired leases and due
    /// checkpoints and sends them on `out`, to be proposed through raft. It holds no
    /// strong handle, so it ends once every handle is dropped, or when `out` is closed.
    pub fn spawn_ticker(&self, cfg: TickerConfig, out: mpsc::Sender<LeaseTick>) -> JoinHandle<()> {
        let weak: Weak<Mutex<State>> = Arc::downgrade(&self.state);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(cfg.period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let Some(state) = weak.upgrade() else { return };
                let expired = lock(&state).lessor.expired(cfg.revokes_per_tick);
                // Not kept across the sends: holding it would keep the lessor alive.
                drop(state);
                if !expired.is_empty() && out.send(LeaseTick::Revoke(expired)).await.is_err() {
                    return;
                }
                for _ in 0..cfg.checkpoint_batches_per_tick {
                    let Some(state) = weak.upgrade() else { return };
                    let due = lock(&state).lessor.checkpoints_due(cfg.checkpoint_batch);
                    drop(state);
                    let full = due.len() >= cfg.checkpoint_batch;
                    if !due.is_empty() && out.send(LeaseTick::Checkpoint(due)).await.is_err() {
                        return;
                    }
                    if !full {
                        break;
                    }
                }
            }
        })
    }
}

/// A panic under the lock is a bug elsewhere (the applier thread stops with it); keep-alives
/// and queries are still served from the lessor as it was left.
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Work the ticker found for raft.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseTick {
    /// Propose a LeaseRevoke for each id.
    Revoke(Vec<i64>),
    /// Propose one LeaseCheckpoint request carrying these `(id, remaining_ttl)`.
    Checkpoint(Vec<(i64, i64)>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TickerConfig {
    pub period: Duration,
    /// Half the revoke rate per half-second tick keeps revocations at the rate.
    pub revokes_per_tick: usize,
    pub checkpoint_batch: usize,
    pub checkpoint_batches_per_tick: usize,
}

impl Default for TickerConfig {
    fn default() -> Self {
        Self {
            period: Duration::from_millis(500),
            revokes_per_tick: crate::lessor::DEFAULT_REVOKE_RATE / 2,
            checkpoint_batch: 1000,
            checkpoint_batches_per_tick: 500,
        }
    }
}
