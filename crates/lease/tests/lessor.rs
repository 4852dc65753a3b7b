//! The lessor driven by a fake clock.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use lease::{
    min_lease_ttl, Clock, FakeClock, InMemoryLeaseStore, LeaseError, LeaseRecord, LeaseStore,
    Lessor, LessorConfig, MAX_LEASE_TTL,
};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn lessor_with(cfg: LessorConfig, clock: &FakeClock, store: &InMemoryLeaseStore) -> Lessor {
    Lessor::new(cfg, Arc::new(clock.clone()), Box::new(store.clone())).expect("store loads")
}

/// A primary lessor with min TTL 1 and an empty store.
fn primary(clock: &FakeClock) -> Lessor {
    let mut l = lessor_with(LessorConfig::new(1), clock, &InMemoryLeaseStore::new());
    l.promote(Duration::ZERO);
    l
}

#[test]
fn leases_expire_in_deadline_order_at_their_ttl() {
    let clock = FakeClock::new();
    let mut l = primary(&clock);
    l.grant(1, 5).unwrap();
    l.grant(2, 3).unwrap();
    l.grant(3, 10).unwrap();

    clock.advance(Duration::from_millis(2999));
    assert!(l.expired(100).is_empty());
    assert!(!l.is_expired(2));
    clock.advance(Duration::from_millis(1));
    assert!(l.is_expired(2));
    assert_eq!(l.expired(100), vec![2]);
    l.revoke(2).unwrap();
    clock.advance(secs(2));
    assert_eq!(l.expired(100), vec![1]);
    l.revoke(1).unwrap();
    clock.advance(secs(4));
    assert!(l.expired(100).is_empty());
    clock.advance(secs(1));
    assert_eq!(l.expired(100), vec![3]);
}

#[test]
fn several_due_leases_come_out_soonest_first() {
    let clock = FakeClock::new();
    let mut l = primary(&clock);
    for (id, ttl) in [(10, 7), (11, 2), (12, 5), (13, 2), (14, 9)] {
        l.grant(id, ttl).unwrap();
    }
    clock.advance(secs(60));
    // Equal deadlines fall back to id order.
    assert_eq!(l.expired(100), vec![11, 13, 12, 10, 14]);
}

#[test]
fn short_ttls_are_raised_to_the_minimum() {
    let clock = FakeClock::new();
    let mut l = lessor_with(LessorConfig::new(5), &clock, &InMemoryLeaseStore::new());
    l.promote(Duration::ZERO);
    assert_eq!(l.grant(1, 1).unwrap().ttl, 5);
    assert_eq!(l.grant(2, -3).unwrap().ttl, 5);
    assert_eq!(l.grant(3, 6).unwrap().ttl, 6);
    clock.advance(secs(4));
    assert!(l.expired(10).is_empty());
    clock.advance(secs(1));
    assert_eq!(l.expired(10), vec![1, 2]);
}

#[test]
fn minimum_ttl_follows_raft_timing() {
    // Defaults (100 ms heartbeat, 1 s election): 15 ticks of 100 ms = 1.5 s, rounded up.
    assert_eq!(min_lease_ttl(Duration::from_millis(100), secs(1)), 2);
    // The election timeout counts in whole ticks.
    assert_eq!(
        min_lease_ttl(Duration::from_millis(100), Duration::from_millis(1050)),
        2
    );
    assert_eq!(
        min_lease_ttl(Duration::from_millis(50), Duration::from_millis(500)),
        1
    );
    assert_eq!(min_lease_ttl(Duration::from_millis(500), secs(5)), 8);
    // 3 ticks * 3 / 2 = 4 ticks (integer), not 4.5.
    assert_eq!(
        min_lease_ttl(Duration::from_millis(1000), Duration::from_millis(3000)),
        4
    );

    let cfg = LessorConfig::for_timing(Duration::from_millis(100), secs(1));
    assert_eq!(cfg.min_ttl, 2);
    assert_eq!(cfg.expired_retry_interval, secs(7));
}

#[test]
fn grant_rejects_bad_requests_with_etcd_errors() {
    let clock = FakeClock::new();
    let mut l = primary(&clock);
    assert_eq!(l.grant(0, 10), Err(LeaseError::NotFound));
    assert_eq!(l.grant(1, MAX_LEASE_TTL + 1), Err(LeaseError::TtlTooLarge));
    assert_eq!(l.grant(1, MAX_LEASE_TTL).unwrap().ttl, MAX_LEASE_TTL);
    assert_eq!(l.grant(1, 10), Err(LeaseError::Exists));
    assert_eq!(
        LeaseError::NotFound.to_string(),
        "etcdserver: requested lease not found"
    );
    assert_eq!(
        LeaseError::Exists.to_string(),
        "etcdserver: lease already exists"
    );
    assert_eq!(
        LeaseError::TtlTooLarge.to_string(),
        "etcdserver: too large lease TTL"
    );
    // The huge lease does not expire in any reasonable time.
    clock.advance(secs(10 * 365 * 24 * 3600));
    assert!(l.expired(10).is_empty());
}

#[test]
fn renew_pushes_the_deadline_a_full_ttl_out() {
    let clock = FakeClock::new();
    let mut l = primary(&clock);
    l.grant(1, 10).unwrap();
    clock.advance(secs(8));
    assert_eq!(l.renew(1), Ok(10));
    clock.advance(secs(8));
    assert!(l.expired(10).is_empty());
    assert_eq!(l.time_to_live(1).unwrap().ttl, 2);
    clock.advance(secs(2));
    assert_eq!(l.expired(10), vec![1]);

    assert_eq!(l.renew(99), Err(LeaseError::NotFound));
    // Past its deadline the lease is waiting for its revoke; it cannot be saved.
    assert_eq!(l.renew(1), Err(LeaseError::NotFound));
}

#[test]
fn renew_only_on_the_primary() {
    let clock = FakeClock::new();
    let mut l = lessor_with(LessorConfig::new(1), &clock, &InMemoryLeaseStore::new());
    l.grant(1, 10).unwrap();
    assert_eq!(l.renew(1), Err(LeaseError::NotPrimary));
    assert_eq!(l.renew(2), Err(LeaseError::NotPrimary));
    l.promote(Duration::ZERO);
    assert_eq!(l.renew(1), Ok(10));
    l.demote();
    assert_eq!(l.renew(1), Err(LeaseError::NotPrimary));
}

#[test]
fn revoke_returns_the_attached_keys_sorted() {
    let clock = FakeClock::new();
    let mut l = primary(&clock);
    l.grant(7, 30).unwrap();
    l.grant(8, 30).unwrap();
    for k in ["zeta", "alpha", "mid", "beta"] {
        l.attach(7, k.as_bytes()).unwrap();
    }
    l.attach(8, b"other").unwrap();
    assert_eq!(l.lease_of(b"mid"), Some(7));

    let keys = l.revoke(7).unwrap();
    assert_eq!(
        keys,
        vec![
            b"alpha".to_vec(),
            b"beta".to_vec(),
            b"mid".to_vec(),
            b"zeta".to_vec()
        ]
    );
    assert_eq!(l.lease_of(b"mid"), None);
    assert_eq!(l.lease_of(b"other"), Some(8));
    assert!(l.lookup(7).is_none());
    assert_eq!(l.revoke(7), Err(LeaseError::NotFound));
    assert_eq!(l.revoke(8).unwrap(), vec![b"other".to_vec()]);
    assert!(l.is_empty());
}

#[test]
fn revoked_lease_is_not_reported_expired() {
    let clock = FakeClock::new();
    let mut l = primary(&clock);
    l.grant(1, 3).unwrap();
    l.grant(2, 3).unwrap();
    l.revoke(1).unwrap();
    clock.advance(secs(3));
    assert_eq!(l.expired(10), vec![2]);
    l.revoke(2).unwrap();
    clock.advance(secs(60));
    assert!(l.expired(10).is_empty());
}

#[test]
fn a_key_moves_between_leases_and_detach_is_per_lease() {
    let clock = FakeClock::new();
    let mut l = primary(&clock);
    l.grant(1, 30).unwrap();
    l.grant(2, 30).unwrap();
    assert_eq!(l.attach(3, b"k"), Err(LeaseError::NotFound));
    assert_eq!(l.detach(3, b"k"), Err(LeaseError::NotFound));

    l.attach(1, b"k").unwrap();
    l.attach(1, b"k").unwrap();
    assert_eq!(l.keys(1).unwrap(), vec![b"k".to_vec()]);
    l.attach(2, b"k").unwrap();
    assert_eq!(l.lease_of(b"k"), Some(2));
    assert!(l.keys(1).unwrap().is_empty());
    assert_eq!(l.lookup(2).unwrap().key_count, 1);

    // Detaching from the old lease must not touch the key's new owner.
    l.detach(1, b"k").unwrap();
    assert_eq!(l.lease_of(b"k"), Some(2));
    l.detach(2, b"k").unwrap();
    assert_eq!(l.lease_of(b"k"), None);
    assert!(l.revoke(1).unwrap().is_empty());
    assert!(l.revoke(2).unwrap().is_empty());
}

#[test]
fn followers_never_expire_and_promotion_sets_deadlines() {
    let clock = FakeClock::new();
    let mut l = lessor_with(LessorConfig::new(1), &clock, &InMemoryLeaseStore::new());
    assert!(!l.is_primary());
    l.grant(1, 5).unwrap();
    l.grant(2, 20).unwrap();
    assert_eq!(l.lookup(1).unwrap().expiry, None);
    clock.advance(secs(1000));
    assert!(l.expired(10).is_empty());
    assert!(!l.is_expired(1));
    // Without a deadline time-to-live reports the full TTL.
    assert_eq!(l.time_to_live(1).unwrap().ttl, 5);

    let start = clock.now();
    l.promote(secs(2));
    assert!(l.is_primary());
    assert_eq!(l.lookup(1).unwrap().expiry, Some(start + secs(7)));
    clock.advance(secs(6));
    assert!(l.expired(10).is_empty());
    clock.advance(secs(1));
    assert_eq!(l.expired(10), vec![1]);

    l.demote();
    assert!(!l.is_primary());
    assert_eq!(l.lookup(2).unwrap().expiry, None);
    clock.advance(secs(1000));
    assert!(l.expired(10).is_empty());
    // Leases granted while following have no deadline either.
    l.grant(3, 1).unwrap();
    assert_eq!(l.lookup(3).unwrap().expiry, None);
}

#[test]
fn promotion_honours_a_checkpointed_remaining_ttl() {
    let clock = FakeClock::new();
    let mut l = lessor_with(LessorConfig::new(1), &clock, &InMemoryLeaseStore::new());
    l.grant(1, 600).unwrap();
    l.grant(2, 600).unwrap();
    l.checkpoint(1, 40).unwrap();
    // Checkpoints for unknown leases are ignored (revoked meanwhile).
    l.checkpoint(99, 40).unwrap();
    assert_eq!(l.lookup(1).unwrap().remaining_ttl, 40);
    l.promote(secs(1));
    clock.advance(secs(41));
    assert_eq!(l.expired(10), vec![1]);
    // The granted TTL is still reported; a renew restores the full TTL.
    assert_eq!(l.time_to_live(2).unwrap().granted_ttl, 600);
    assert_eq!(l.renew(2), Ok(600));
}

#[test]
fn expired_is_rate_limited_and_hands_each_lease_out_once() {
    let clock = FakeClock::new();
    let mut cfg = LessorConfig::new(1);
    cfg.expired_retry_interval = secs(3);
    let mut l = lessor_with(cfg, &clock, &InMemoryLeaseStore::new());
    l.promote(Duration::ZERO);
    for id in 1..=10 {
        l.grant(id, 5).unwrap();
    }
    clock.advance(secs(5));
    let mut seen = Vec::new();
    for _ in 0..3 {
        let batch = l.expired(3);
        assert_eq!(batch.len(), 3);
        seen.extend(batch);
    }
    seen.extend(l.expired(3));
    assert_eq!(seen, (1..=10).collect::<Vec<_>>());
    assert!(l.expired(3).is_empty());
    assert!(l.expired(0).is_empty());

    // Revokes for 1..=4 are applied; the rest got lost and are offered again after the
    // retry interval, once.
    for id in 1..=4 {
        l.revoke(id).unwrap();
    }
    clock.advance(Duration::from_millis(2999));
    assert!(l.expired(100).is_empty());
    clock.advance(Duration::from_millis(1));
    assert_eq!(l.expired(100), (5..=10).collect::<Vec<_>>());
    assert!(l.expired(100).is_empty());
}

#[test]
fn ten_thousand_simultaneous_expiries_drain_in_batches() {
    let clock = FakeClock::new();
    let mut l = primary(&clock);
    for id in 1..=10_000 {
        l.grant(id, 30).unwrap();
    }
    clock.advance(secs(30));
    let mut seen = HashSet::new();
    let mut batches = 0;
    loop {
        let batch = l.expired(500);
        if batch.is_empty() {
            break;
        }
        assert!(batch.len() <= 500);
        batches += 1;
        for id in batch {
            assert!(seen.insert(id), "lease {id} handed out twice");
        }
    }
    assert_eq!(batches, 20);
    assert_eq!(seen.len(), 10_000);
}

#[test]
fn promotion_spreads_a_pile_of_simultaneous_expiries() {
    let clock = FakeClock::new();
    let mut l = lessor_with(LessorConfig::new(1), &clock, &InMemoryLeaseStore::new());
    for id in 1..=2_000 {
        l.grant(id, 10).unwrap();
    }
    let start = clock.now();
    l.promote(Duration::ZERO);
    let mut per_second: BTreeMap<u64, usize> = BTreeMap::new();
    for info in l.leases() {
        let exp = info.expiry.expect("primary has deadlines");
        let offset = exp - start;
        assert!(offset >= secs(10));
        *per_second.entry(offset.as_secs()).or_default() += 1;
    }
    // Three quarters of the 1000/s revoke rate per second at most.
    assert_eq!(per_second.values().sum::<usize>(), 2_000);
    assert!(per_second.values().all(|&n| n <= 750), "{per_second:?}");
    assert_eq!(per_second.len(), 3);

    // Below the revoke rate nothing is moved.
    let mut small = lessor_with(LessorConfig::new(1), &clock, &InMemoryLeaseStore::new());
    for id in 1..=999 {
        small.grant(id, 10).unwrap();
    }
    let start = clock.now();
    small.promote(Duration::ZERO);
    assert!(small
        .leases()
        .iter()
        .all(|i| i.expiry == Some(start + secs(10))));
}

#[test]
fn leases_are_listed_soonest_deadline_first() {
    let clock = FakeClock::new();
    let mut l = primary(&clock);
    l.grant(5, 30).unwrap();
    l.grant(6, 10).unwrap();
    l.grant(4, 20).unwrap();
    let ids: Vec<i64> = l.leases().iter().map(|i| i.id).collect();
    assert_eq!(ids, vec![6, 4, 5]);
    l.demote();
    let ids: Vec<i64> = l.leases().iter().map(|i| i.id).collect();
    assert_eq!(ids, vec![4, 5, 6]);
}

#[test]
fn time_to_live_truncates_and_lists_keys() {
    let clock = FakeClock::new();
    let mut l = primary(&clock);
    l.grant(1, 10).unwrap();
    l.attach(1, b"b").unwrap();
    l.attach(1, b"a").unwrap();
    clock.advance(Duration::from_millis(2500));
    let t = l.time_to_live(1).unwrap();
    assert_eq!((t.id, t.granted_ttl, t.ttl), (1, 10, 7));
    assert_eq!(t.keys, vec![b"a".to_vec(), b"b".to_vec()]);
    clock.advance(Duration::from_millis(8000));
    assert_eq!(l.time_to_live(1).unwrap().ttl, 0);
    clock.advance(Duration::from_millis(1000));
    assert_eq!(l.time_to_live(1).unwrap().ttl, -1);
    assert_eq!(l.time_to_live(2), Err(LeaseError::NotFound));
}

#[test]
fn long_leases_are_checkpointed_every_interval() {
    let clock = FakeClock::new();
    let mut cfg = LessorConfig::new(1);
    cfg.checkpoint_interval = secs(300);
    let mut l = lessor_with(cfg, &clock, &InMemoryLeaseStore::new());
    l.promote(Duration::ZERO);
    l.grant(1, 1000).unwrap();
    l.grant(2, 300).unwrap(); // not longer than the interval: never checkpointed
    clock.advance(secs(299));
    assert!(l.checkpoints_due(10).is_empty());
    clock.advance(secs(1));
    assert_eq!(l.checkpoints_due(10), vec![(1, 700)]);
    assert!(l.checkpoints_due(10).is_empty());

    // The proposal is applied: recorded and rescheduled one interval later.
    l.checkpoint(1, 700).unwrap();
    clock.advance(Duration::from_millis(299_500));
    assert!(l.checkpoints_due(10).is_empty());
    clock.advance(Duration::from_millis(500));
    // Remaining time rounds up.
    assert_eq!(l.checkpoints_due(10), vec![(1, 400)]);

    // A lost proposal is retried one interval later.
    clock.advance(secs(300));
    assert_eq!(l.checkpoints_due(10), vec![(1, 100)]);

    // Renewing a checkpointed lease owes a clear, reported before anything else.
    assert_eq!(l.renew(1), Ok(1000));
    assert_eq!(l.checkpoints_due(10), vec![(1, 0)]);
    assert!(l.checkpoints_due(10).is_empty());
    l.checkpoint(1, 0).unwrap();
    assert_eq!(l.lookup(1).unwrap().remaining_ttl, 0);

    // Followers never checkpoint.
    l.demote();
    clock.advance(secs(3000));
    assert!(l.checkpoints_due(10).is_empty());
}

#[test]
fn checkpoints_respect_max_and_can_be_disabled() {
    let clock = FakeClock::new();
    let mut cfg = LessorConfig::new(1);
    cfg.checkpoint_interval = secs(60);
    let mut l = lessor_with(cfg.clone(), &clock, &InMemoryLeaseStore::new());
    l.promote(Duration::ZERO);
    for id in 1..=5 {
        l.grant(id, 600).unwrap();
    }
    clock.advance(secs(60));
    assert_eq!(l.checkpoints_due(2), vec![(1, 540), (2, 540)]);
    assert_eq!(l.checkpoints_due(10), vec![(3, 540), (4, 540), (5, 540)]);

    cfg.checkpointing = false;
    let mut off = lessor_with(cfg, &clock, &InMemoryLeaseStore::new());
    off.promote(Duration::ZERO);
    off.grant(1, 600).unwrap();
    off.checkpoint(1, 100).unwrap();
    assert_eq!(off.renew(1), Ok(600));
    clock.advance(secs(120));
    assert!(off.checkpoints_due(10).is_empty());
}

#[test]
fn leases_survive_a_restart_through_the_store() {
    let clock = FakeClock::new();
    let store = InMemoryLeaseStore::new();
    let mut l = lessor_with(LessorConfig::new(1), &clock, &store);
    l.promote(Duration::ZERO);
    l.grant(1, 100).unwrap();
    l.grant(2, 200).unwrap();
    l.grant(3, 300).unwrap();
    l.attach(2, b"k").unwrap();
    l.checkpoint(3, 50).unwrap();
    l.revoke(1).unwrap();
    assert_eq!(
        store.records(),
        vec![
            LeaseRecord {
                id: 2,
                ttl: 200,
                remaining_ttl: 0
            },
            LeaseRecord {
                id: 3,
                ttl: 300,
                remaining_ttl: 50
            },
        ]
    );
    drop(l);

    // Restart with a larger minimum TTL.
    let mut again = lessor_with(LessorConfig::new(250), &clock, &store);
    assert!(!again.is_primary());
    assert_eq!(again.len(), 2);
    assert!(again.lookup(1).is_none());
    assert_eq!(again.lookup(2).unwrap().ttl, 250);
    assert_eq!(again.lookup(3).unwrap().remaining_ttl, 50);
    // Keys come back from the key-value layer, not the store.
    assert_eq!(again.lease_of(b"k"), None);
    again.attach(2, b"k").unwrap();
    assert_eq!(again.grant(2, 10), Err(LeaseError::Exists));

    again.promote(Duration::ZERO);
    clock.advance(secs(50));
    assert_eq!(again.expired(10), vec![3]);
    again.revoke(3).unwrap();
    clock.advance(secs(200));
    assert_eq!(again.expired(10), vec![2]);
}

#[test]
fn reload_replaces_state_and_keeps_a_primary_expiring() {
    let clock = FakeClock::new();
    let store = InMemoryLeaseStore::new();
    let mut l = lessor_with(LessorConfig::new(1), &clock, &store);
    l.promote(Duration::ZERO);
    l.grant(1, 10).unwrap();
    l.attach(1, b"k").unwrap();
    // Another writer (a snapshot install) changes the store underneath.
    let mut other = store.clone();
    other.delete(1).unwrap();
    other
        .save(&LeaseRecord {
            id: 9,
            ttl: 5,
            remaining_ttl: 0,
        })
        .unwrap();
    l.reload().unwrap();
    assert!(l.lookup(1).is_none());
    assert_eq!(l.lease_of(b"k"), None);
    clock.advance(secs(5));
    assert_eq!(l.expired(10), vec![9]);
}

/// A store whose writes fail on demand.
struct FlakyStore {
    inner: InMemoryLeaseStore,
    fail: Arc<std::sync::atomic::AtomicBool>,
}

impl LeaseStore for FlakyStore {
    fn load(&self) -> Result<Vec<LeaseRecord>, LeaseError> {
        self.inner.load()
    }
    fn save(&mut self, r: &LeaseRecord) -> Result<(), LeaseError> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(LeaseError::Store("disk full".into()));
        }
        self.inner.save(r)
    }
    fn delete(&mut self, id: i64) -> Result<(), LeaseError> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(LeaseError::Store("disk full".into()));
        }
        self.inner.delete(id)
    }
}

#[test]
fn a_failed_store_write_changes_nothing() {
    let clock = FakeClock::new();
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let inner = InMemoryLeaseStore::new();
    let store = FlakyStore {
        inner: inner.clone(),
        fail: fail.clone(),
    };
    let mut l = Lessor::new(
        LessorConfig::new(1),
        Arc::new(clock.clone()),
        Box::new(store),
    )
    .unwrap();
    l.grant(1, 10).unwrap();
    l.attach(1, b"k").unwrap();
    fail.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(l.grant(2, 10), Err(LeaseError::Store(_))));
    assert!(l.lookup(2).is_none());
    assert!(matches!(l.revoke(1), Err(LeaseError::Store(_))));
    assert_eq!(l.lease_of(b"k"), Some(1));
    assert!(matches!(l.checkpoint(1, 3), Err(LeaseError::Store(_))));
    assert_eq!(l.lookup(1).unwrap().remaining_ttl, 0);
    assert_eq!(inner.records().len(), 1);
}
