//! The lessor: every lease, its TTL, deadline and attached keys.
//!
//! State changes that arrive through raft (grant, revoke, attach, detach, checkpoint)
//! are applied identically on every member. Deadlines only exist on the primary (the
//! raft leader): followers hold every lease forever and wait for the leader's revoke.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock::Clock;
use crate::metrics;
use crate::store::{LeaseRecord, LeaseStore};
use crate::LeaseError;

/// The id meaning "no lease".
pub const NO_LEASE: i64 = 0;
/// Largest TTL (seconds) a lease may be granted with.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;
/// How often a long lease's remaining TTL is recorded through raft.
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// How long an expired lease is held back before it is offered for revocation again.
pub const DEFAULT_EXPIRED_RETRY_INTERVAL: Duration = Duration::from_secs(3);
/// Leases revoked per second at most; also sizes the expiry spreading done on promotion.
pub const DEFAULT_REVOKE_RATE: usize = 1000;

/// The minimum lease TTL in seconds for a member's raft timing: one and a half election
/// timeouts (counted in whole heartbeat ticks), rounded up. A shorter lease could expire
/// during a normal leader election.
pub fn min_lease_ttl(heartbeat: Duration, election_timeout: Duration) -> i64 {
    let tick_ms = heartbeat.as_millis().max(1);
    let election_ticks = election_timeout.as_millis() / tick_ms;
    let min_ms = (3 * election_ticks / 2) * tick_ms;
    min_ms.div_ceil(1000) as i64
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LessorConfig {
    /// Requested TTLs below this (seconds) are raised to it.
    pub min_ttl: i64,
    pub checkpoint_interval: Duration,
    pub expired_retry_interval: Duration,
    pub revoke_rate: usize,
    /// Whether remaining TTLs are checkpointed through raft (`--experimental-enable-lease-checkpoint`).
    pub checkpointing: bool,
}

impl LessorConfig {
    pub fn new(min_ttl: i64) -> Self {
        Self {
            min_ttl,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            expired_retry_interval: DEFAULT_EXPIRED_RETRY_INTERVAL,
            revoke_rate: DEFAULT_REVOKE_RATE,
            checkpointing: true,
        }
    }

    /// Settings derived from the member's raft timing the way the server does it: the
    /// minimum TTL from [`min_lease_ttl`], and the revoke retry interval equal to the
    /// request timeout (5 s plus two election timeouts), by which time a revoke
    /// proposal has either been applied or been lost.
    pub fn for_timing(heartbeat: Duration, election_timeout: Duration) -> Self {
        let tick_ms = heartbeat.as_millis().max(1);
        let election_ticks = election_timeout.as_millis() / tick_ms;
        let election_ms = (election_ticks * tick_ms) as u64;
        Self {
            expired_retry_interval: Duration::from_secs(5) + Duration::from_millis(2 * election_ms),
            ..Self::new(min_lease_ttl(heartbeat, election_timeout))
        }
    }
}

/// A snapshot of one lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    pub id: i64,
    /// Granted TTL in seconds.
    pub ttl: i64,
    /// Last checkpointed remaining TTL in seconds (0: none).
    pub remaining_ttl: i64,
    /// Deadline; `None` while this member is not primary.
    pub expiry: Option<Instant>,
    pub key_count: usize,
}

/// Answer to a time-to-live query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseTimeToLive {
    pub id: i64,
    pub granted_ttl: i64,
    /// Seconds left, truncated. On a non-primary member (no deadline known) this is the
    /// checkpointed remaining TTL, or the granted TTL when none was checkpointed.
    pub ttl: i64,
    /// Attached keys, sorted.
    pub keys: Vec<Vec<u8>>,
}

struct Lease {
    ttl: i64,
    remaining_ttl: i64,
    expiry: Option<Instant>,
    /// This lease's entry in the expiry queue: its deadline, or a later re-offer time
    /// once it was handed out as expired.
    queued: Option<Instant>,
    /// This lease's entry in the checkpoint queue.
    checkpoint_at: Option<Instant>,
    keys: BTreeSet<Vec<u8>>,
}

impl Lease {
    /// TTL a refresh counts from: the checkpointed remainder when there is one.
    fn effective_ttl(&self) -> i64 {
        if self.remaining_ttl > 0 {
            self.remaining_ttl
        } else {
            self.ttl
        }
    }

    fn info(&self, id: i64) -> LeaseInfo {
        LeaseInfo {
            id,
            ttl: self.ttl,
            remaining_ttl: self.remaining_ttl,
            expiry: self.expiry,
            key_count: self.keys.len(),
        }
    }

    fn record(&self, id: i64) -> LeaseRecord {
        LeaseRecord {
            id,
            ttl: self.ttl,
            remaining_ttl: self.remaining_ttl,
        }
    }
}

/// `now + extend + secs`, or `None` (never) if that is beyond what `Instant` can hold.
fn deadline(now: Instant, extend: Duration, secs: i64) -> Option<Instant> {
    let secs = Duration::from_secs(secs.max(0) as u64);
    now.checked_add(extend)?.checked_add(secs)
}

/// Moves a lease's entry in a (time, id) queue. Both queues hold at most one entry per
/// lease, so nothing stale ever has to be skipped.
fn requeue(
    queue: &mut BTreeSet<(Instant, i64)>,
    slot: &mut Option<Instant>,
    id: i64,
    at: Option<Instant>,
) {
    if let Some(old) = slot.take() {
        queue.remove(&(old, id));
    }
    if let Some(at) = at {
        queue.insert((at, id));
        *slot = Some(at);
    }
}

/// Owner of all leases. Synchronous and free of I/O apart from its [`LeaseStore`];
/// time comes from a [`Clock`].
pub struct Lessor {
    cfg: LessorConfig,
    clock: Arc<dyn Clock>,
    store: Box<dyn LeaseStore>,
    leases: HashMap<i64, Lease>,
    /// Which lease each attached key belongs to.
    items: HashMap<Vec<u8>, i64>,
    primary: bool,
    expiry_queue: BTreeSet<(Instant, i64)>,
    checkpoint_queue: BTreeSet<(Instant, i64)>,
    /// Renewed leases whose checkpointed remainder must be cleared through raft, so a
    /// later leader does not fall back to the stale, shorter remainder.
    pending_clears: BTreeSet<i64>,
}

impl Lessor {
    /// Builds a lessor holding every lease found in `store`, as a non-primary.
    pub fn new(
        cfg: LessorConfig,
        clock: Arc<dyn Clock>,
        store: Box<dyn LeaseStore>,
    ) -> Result<Self, LeaseError> {
        let mut lessor = Self {
            cfg,
            clock,
            store,
            leases: HashMap::new(),
            items: HashMap::new(),
            primary: false,
            expiry_queue: BTreeSet::new(),
            checkpoint_queue: BTreeSet::new(),
            pending_clears: BTreeSet::new(),
        };
        lessor.reload()?;
        Ok(lessor)
    }

    pub fn config(&self) -> &LessorConfig {
        &self.cfg
    }

    /// Drops all in-memory state and reads the leases back from the store (after a
    /// snapshot was installed, for instance). Keys must be re-attached by the caller.
    pub fn reload(&mut self) -> Result<(), LeaseError> {
        let records = self.store.load()?;
        self.leases.clear();
        self.items.clear();
        self.expiry_queue.clear();
        self.checkpoint_queue.clear();
        self.pending_clears.clear();
        for r in records {
            self.leases.insert(
                r.id,
                Lease {
                    // The minimum may have grown since the lease was granted.
                    ttl: r.ttl.max(self.cfg.min_ttl),
                    remaining_ttl: r.remaining_ttl,
                    expiry: None,
                    queued: None,
                    checkpoint_at: None,
                    keys: BTreeSet::new(),
                },
            );
        }
        if self.primary {
            let now = self.clock.now();
            let mut ids: Vec<i64> = self.leases.keys().copied().collect();
            ids.sort_unstable();
            for id in ids {
                self.refresh(id, now, Duration::ZERO);
                self.schedule_checkpoint(id, now);
            }
        }
        Ok(())
    }

    pub fn is_primary(&self) -> bool {
        self.primary
    }

    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    pub fn contains(&self, id: i64) -> bool {
        self.leases.contains_key(&id)
    }

    /// Creates a lease. TTLs under the minimum are raised to it.
    pub fn grant(&mut self, id: i64, ttl: i64) -> Result<LeaseInfo, LeaseError> {
        if id == NO_LEASE {
            return Err(LeaseError::NotFound);
        }
        if ttl > MAX_LEASE_TTL {
            return Err(LeaseError::TtlTooLarge);
        }
        if self.leases.contains_key(&id) {
            return Err(LeaseError::Exists);
        }
        let lease = Lease {
            ttl: ttl.max(self.cfg.min_ttl),
            remaining_ttl: 0,
            expiry: None,
            queued: None,
            checkpoint_at: None,
            keys: BTreeSet::new(),
        };
        // Persist first so a store failure leaves memory untouched.
        self.store.save(&lease.record(id))?;
        let granted = lease.ttl;
        self.leases.insert(id, lease);
        if self.primary {
            let now = self.clock.now();
            self.refresh(id, now, Duration::ZERO);
            self.schedule_checkpoint(id, now);
        }
        metrics::granted(granted);
        Ok(self.leases[&id].info(id))
    }

    /// Deletes a lease and returns its keys, sorted so every member deletes them in the
    /// same order.
    pub fn revoke(&mut self, id: i64) -> Result<Vec<Vec<u8>>, LeaseError> {
        if !self.leases.contains_key(&id) {
            return Err(LeaseError::NotFound);
        }
        self.store.delete(id)?;
        let Some(mut lease) = self.leases.remove(&id) else {
            return Err(LeaseError::NotFound);
        };
        requeue(&mut self.expiry_queue, &mut lease.queued, id, None);
        requeue(
            &mut self.checkpoint_queue,
            &mut lease.checkpoint_at,
            id,
            None,
        );
        self.pending_clears.remove(&id);
        for key in &lease.keys {
            if self.items.get(key) == Some(&id) {
                self.items.remove(key);
            }
        }
        metrics::revoked();
        Ok(lease.keys.into_iter().collect())
    }

    /// Attaches `key` to lease `id`, moving it off any lease it was attached to before.
    pub fn attach(&mut self, id: i64, key: &[u8]) -> Result<(), LeaseError> {
        if !self.leases.contains_key(&id) {
            return Err(LeaseError::NotFound);
        }
        if let Some(&old) = self.items.get(key) {
            if old == id {
                return Ok(());
            }
            if let Some(l) = self.leases.get_mut(&old) {
                l.keys.remove(key);
            }
        }
        self.items.insert(key.to_vec(), id);
        if let Some(l) = self.leases.get_mut(&id) {
            l.keys.insert(key.to_vec());
        }
        Ok(())
    }

    /// Detaches `key` from lease `id`; detaching a key the lease does not hold is a no-op.
    pub fn detach(&mut self, id: i64, key: &[u8]) -> Result<(), LeaseError> {
        let lease = self.leases.get_mut(&id).ok_or(LeaseError::NotFound)?;
        lease.keys.remove(key);
        if self.items.get(key) == Some(&id) {
            self.items.remove(key);
        }
        Ok(())
    }

    /// The lease `key` is attached to.
    pub fn lease_of(&self, key: &[u8]) -> Option<i64> {
        self.items.get(key).copied()
    }

    pub fn lookup(&self, id: i64) -> Option<LeaseInfo> {
        self.leases.get(&id).map(|l| l.info(id))
    }

    /// Keys attached to lease `id`, sorted.
    pub fn keys(&self, id: i64) -> Option<Vec<Vec<u8>>> {
        self.leases
            .get(&id)
            .map(|l| l.keys.iter().cloned().collect())
    }

    /// All leases, soonest deadline first (leases without one last), ties by id.
    pub fn leases(&self) -> Vec<LeaseInfo> {
        let mut all: Vec<LeaseInfo> = self.leases.iter().map(|(&id, l)| l.info(id)).collect();
        all.sort_unstable_by_key(|l| (l.expiry.is_none(), l.expiry, l.id));
        all
    }

    pub fn time_to_live(&self, id: i64) -> Result<LeaseTimeToLive, LeaseError> {
        let lease = self.leases.get(&id).ok_or(LeaseError::NotFound)?;
        let ttl = match lease.expiry {
            Some(exp) => {
                let now = self.clock.now();
                // Truncate toward zero, so a lease expired less than a second ago reads 0.
                if exp >= now {
                    (exp - now).as_secs() as i64
                } else {
                    -((now - exp).as_secs() as i64)
                }
            }
            None => lease.effective_ttl(),
        };
        Ok(LeaseTimeToLive {
            id,
            granted_ttl: lease.ttl,
            ttl,
            keys: lease.keys.iter().cloned().collect(),
        })
    }

    /// Records a lease's remaining TTL (applied from raft). It only takes effect on the
    /// next promotion. Unknown ids are ignored: the lease may have been revoked since.
    pub fn checkpoint(&mut self, id: i64, remaining_ttl: i64) -> Result<(), LeaseError> {
        let Some(lease) = self.leases.get(&id) else {
            return Ok(());
        };
        let record = LeaseRecord {
            remaining_ttl,
            ..lease.record(id)
        };
        self.store.save(&record)?;
        if let Some(l) = self.leases.get_mut(&id) {
            l.remaining_ttl = remaining_ttl;
        }
        if self.primary {
            let now = self.clock.now();
            self.schedule_checkpoint(id, now);
        }
        Ok(())
    }

    /// Becomes primary: every deadline is set to now + `extend` + remaining TTL, where
    /// `extend` covers the time the election took. Large numbers of leases that would
    /// now expire in the same second are spread out so that no more than three quarters
    /// of the revoke rate falls due per second.
    pub fn promote(&mut self, extend: Duration) {
        self.primary = true;
        let now = self.clock.now();
        let mut ids: Vec<i64> = self.leases.keys().copied().collect();
        ids.sort_unstable();
        for &id in &ids {
            self.refresh(id, now, extend);
            self.schedule_checkpoint(id, now);
        }
        if self.leases.len() < self.cfg.revoke_rate {
            return;
        }

        let mut order: Vec<(Instant, i64)> = ids
            .iter()
            .filter_map(|id| self.leases[id].expiry.map(|e| (e, *id)))
            .collect();
        order.sort_unstable();
        let Some(&(first, _)) = order.first() else {
            return;
        };
        let target = (3 * self.cfg.revoke_rate / 4).max(1);
        let second = Duration::from_secs(1);
        let mut base = first.saturating_duration_since(now);
        let mut window_end = base + second;
        let mut in_window = 0usize;
        for (exp, id) in order {
            let remaining = exp.saturating_duration_since(now);
            if remaining > window_end {
                base = remaining;
                window_end = base + second;
                in_window = 1;
                continue;
            }
            in_window += 1;
            if in_window <= target {
                continue;
            }
            // Push this lease back by its share of the overflow, minus how far it
            // already sits past the start of the window.
            let delay = second
                .mul_f64(in_window as f64 / target as f64)
                .saturating_sub(remaining - base);
            window_end = base + delay;
            self.refresh(id, now, extend + delay);
        }
    }

    /// Stops being primary: deadlines are dropped (followers never expire leases).
    pub fn demote(&mut self) {
        self.primary = false;
        for lease in self.leases.values_mut() {
            lease.expiry = None;
            lease.queued = None;
            lease.checkpoint_at = None;
        }
        self.expiry_queue.clear();
        self.checkpoint_queue.clear();
        self.pending_clears.clear();
    }

    /// Keep-alive: the lease's deadline becomes now + its granted TTL, which is returned.
    /// Only the primary renews. A lease already past its deadline reports `NotFound`: it
    /// is awaiting revocation and cannot be saved any more.
    pub fn renew(&mut self, id: i64) -> Result<i64, LeaseError> {
        if !self.primary {
            return Err(LeaseError::NotPrimary);
        }
        let now = self.clock.now();
        let lease = self.leases.get(&id).ok_or(LeaseError::NotFound)?;
        if lease.expiry.is_some_and(|e| e <= now) {
            return Err(LeaseError::NotFound);
        }
        let ttl = lease.ttl;
        if self.cfg.checkpointing && lease.remaining_ttl > 0 {
            self.pending_clears.insert(id);
        }
        let at = deadline(now, Duration::ZERO, ttl);
        if let Some(l) = self.leases.get_mut(&id) {
            l.expiry = at;
            requeue(&mut self.expiry_queue, &mut l.queued, id, at);
        }
        metrics::renewed();
        Ok(ttl)
    }

    /// Whether lease `id` exists and its deadline has passed.
    pub fn is_expired(&self, id: i64) -> bool {
        let now = self.clock.now();
        self.leases
            .get(&id)
            .and_then(|l| l.expiry)
            .is_some_and(|e| e <= now)
    }

    /// Up to `max` leases whose deadline has passed, soonest first. Only the primary
    /// expires leases. A lease handed out here is not handed out again for the retry
    /// interval, unless it is renewed meanwhile; if it still exists by then, the
    /// revoke was lost and it is offered again.
    pub fn expired(&mut self, max: usize) -> Vec<i64> {
        if !self.primary || max == 0 {
            return Vec::new();
        }
        let now = self.clock.now();
        let due: Vec<(Instant, i64)> = self
            .expiry_queue
            .iter()
            .take_while(|(at, _)| *at <= now)
            .take(max)
            .copied()
            .collect();
        let retry_at = now.checked_add(self.cfg.expired_retry_interval);
        let mut out = Vec::with_capacity(due.len());
        for (_, id) in due {
            if let Some(l) = self.leases.get_mut(&id) {
                requeue(&mut self.expiry_queue, &mut l.queued, id, retry_at);
                out.push(id);
            }
        }
        out
    }

    /// Up to `max` `(id, remaining_ttl)` checkpoints to propose through raft: first the
    /// clears owed by renewals (remaining 0), then long leases whose checkpoint time
    /// came. A checkpoint handed out is scheduled again one interval later, in case
    /// the proposal is lost; applying it reschedules it anyway.
    pub fn checkpoints_due(&mut self, max: usize) -> Vec<(i64, i64)> {
        if !self.primary || !self.cfg.checkpointing || max == 0 {
            return Vec::new();
        }
        let mut out = Vec::new();
        while out.len() < max {
            let Some(id) = self.pending_clears.pop_first() else {
                break;
            };
            if self.leases.contains_key(&id) {
                out.push((id, 0));
            }
        }
        let now = self.clock.now();
        while out.len() < max {
            let Some(&(at, id)) = self.checkpoint_queue.first() else {
                break;
            };
            if at > now {
                break;
            }
            self.checkpoint_queue.remove(&(at, id));
            let Some(lease) = self.leases.get_mut(&id) else {
                continue;
            };
            lease.checkpoint_at = None;
            let Some(exp) = lease.expiry.filter(|e| *e > now) else {
                continue;
            };
            let left = exp - now;
            let remaining = left.as_secs() as i64 + i64::from(left.subsec_nanos() > 0);
            if remaining < lease.ttl {
                out.push((id, remaining));
            }
            self.schedule_checkpoint(id, now);
        }
        out
    }

    /// Sets a lease's deadline to now + `extend` + its effective TTL.
    fn refresh(&mut self, id: i64, now: Instant, extend: Duration) {
        if let Some(l) = self.leases.get_mut(&id) {
            let at = deadline(now, extend, l.effective_ttl());
            l.expiry = at;
            requeue(&mut self.expiry_queue, &mut l.queued, id, at);
        }
    }

    /// Only leases outliving a checkpoint interval are worth checkpointing.
    fn schedule_checkpoint(&mut self, id: i64, now: Instant) {
        if !self.cfg.checkpointing {
            return;
        }
        let interval = self.cfg.checkpoint_interval;
        if let Some(l) = self.leases.get_mut(&id) {
            if l.effective_ttl() > interval.as_secs() as i64 {
                let at = now.checked_add(interval);
                requeue(&mut self.checkpoint_queue, &mut l.checkpoint_at, id, at);
            }
        }
    }
}
