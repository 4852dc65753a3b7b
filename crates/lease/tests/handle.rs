//! The shared lessor behind `LeaseHandle`: parked keep-alives and the ticker.

use std::sync::Arc;
use std::time::Duration;

use lease::{
    FakeClock, InMemoryLeaseStore, LeaseError, LeaseHandle, LeaseTick, Lessor, LessorConfig,
    TickerConfig,
};
use tokio::sync::mpsc;
use tokio::time::timeout;

fn handle(clock: &FakeClock, cfg: LessorConfig) -> LeaseHandle {
    let lessor = Lessor::new(
        cfg,
        Arc::new(clock.clone()),
        Box::new(InMemoryLeaseStore::new()),
    )
    .unwrap();
    LeaseHandle::new(lessor)
}

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn every_operation_reaches_the_lessor() {
    let clock = FakeClock::new();
    let h = handle(&clock, LessorConfig::new(2));
    assert!(!h.is_primary());
    assert_eq!(h.grant(1, 1).unwrap().ttl, 2);
    assert_eq!(h.grant(1, 1), Err(LeaseError::Exists));
    h.attach(1, b"b").unwrap();
    h.attach(1, b"a").unwrap();
    h.attach(1, b"c").unwrap();
    h.detach(1, b"c").unwrap();
    assert_eq!(h.lease_of(b"a"), Some(1));
    assert!(h.contains(1));
    assert_eq!(h.lookup(1).unwrap().key_count, 2);
    assert_eq!(h.keys(1).unwrap(), vec![b"a".to_vec(), b"b".to_vec()]);
    assert_eq!(h.leases().len(), 1);
    assert_eq!(h.renew(1).await, Err(LeaseError::NotPrimary));
    h.checkpoint(1, 1).unwrap();
    assert_eq!(h.time_to_live(1).unwrap().ttl, 1);

    h.promote(Duration::ZERO);
    assert!(h.is_primary());
    assert_eq!(h.renew(1).await, Ok(2));
    assert_eq!(h.checkpoints_due(10), vec![(1, 0)]);
    clock.advance(Duration::from_secs(2));
    assert_eq!(h.expired(10), vec![1]);
    // A clone reaches the same lessor.
    let h2 = h.clone();
    assert_eq!(h2.revoke(1).unwrap(), vec![b"a".to_vec(), b"b".to_vec()]);
    assert_eq!(h.time_to_live(1), Err(LeaseError::NotFound));
    assert!(!h.contains(1));
    assert_eq!(h.revoke(1), Err(LeaseError::NotFound));
    h.reload().unwrap();
    h.demote();
    assert!(!h.is_primary());
}

#[tokio::test]
async fn renew_of_an_expired_lease_waits_for_its_revoke() {
    let clock = FakeClock::new();
    let h = handle(&clock, LessorConfig::new(1));
    h.promote(Duration::ZERO);
    h.grant(1, 5).unwrap();
    clock.advance(Duration::from_secs(5));

    let h2 = h.clone();
    let mut parked = tokio::spawn(async move { h2.renew(1).await });
    assert_eq!(h.expired(10), vec![1]);
    // Still waiting, while the lessor serves everyone else.
    assert!(timeout(Duration::from_millis(50), &mut parked)
        .await
        .is_err());
    h.grant(2, 5).unwrap();
    assert_eq!(h.renew(2).await, Ok(5));
    assert!(timeout(Duration::from_millis(50), &mut parked)
        .await
        .is_err());
    h.revoke(1).unwrap();
    assert_eq!(
        timeout(WAIT, parked).await.unwrap().unwrap(),
        Err(LeaseError::NotFound)
    );
}

#[tokio::test]
async fn parked_renewals_end_on_demotion_or_promotion() {
    let clock = FakeClock::new();
    let h = handle(&clock, LessorConfig::new(1));
    h.promote(Duration::ZERO);
    h.grant(1, 5).unwrap();
    clock.advance(Duration::from_secs(6));
    let h2 = h.clone();
    let mut parked = tokio::spawn(async move { h2.renew(1).await });
    assert!(timeout(Duration::from_millis(50), &mut parked)
        .await
        .is_err());
    h.demote();
    assert_eq!(
        timeout(WAIT, parked).await.unwrap().unwrap(),
        Err(LeaseError::NotPrimary)
    );

    // A new term refreshes deadlines, so a keep-alive parked then is served.
    h.promote(Duration::ZERO);
    clock.advance(Duration::from_secs(6));
    let h2 = h.clone();
    let mut parked = tokio::spawn(async move { h2.renew(1).await });
    assert!(timeout(Duration::from_millis(50), &mut parked)
        .await
        .is_err());
    h.promote(Duration::ZERO);
    assert_eq!(timeout(WAIT, parked).await.unwrap().unwrap(), Ok(5));
}

#[tokio::test(start_paused = true)]
async fn ticker_reports_expired_leases_and_due_checkpoints() {
    let clock = FakeClock::new();
    let mut cfg = LessorConfig::new(1);
    cfg.checkpoint_interval = Duration::from_secs(60);
    let h = handle(&clock, cfg);
    h.promote(Duration::ZERO);
    for id in 1..=5 {
        h.grant(id, 5).unwrap();
    }
    h.grant(100, 600).unwrap();

    let (tx, mut rx) = mpsc::channel(16);
    let tick = TickerConfig {
        period: Duration::from_millis(500),
        revokes_per_tick: 2,
        checkpoint_batch: 1000,
        checkpoint_batches_per_tick: 1,
    };
    let ticker = h.spawn_ticker(tick, tx);

    clock.advance(Duration::from_secs(5));
    let mut revoked = Vec::new();
    while revoked.len() < 5 {
        match timeout(WAIT, rx.recv()).await.unwrap().unwrap() {
            LeaseTick::Revoke(ids) => {
                assert!(ids.len() <= 2, "rate limit per tick exceeded: {ids:?}");
                for id in &ids {
                    h.revoke(*id).unwrap();
                }
                revoked.extend(ids);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    revoked.sort_unstable();
    assert_eq!(revoked, vec![1, 2, 3, 4, 5]);

    clock.advance(Duration::from_secs(55));
    assert_eq!(
        timeout(WAIT, rx.recv()).await.unwrap().unwrap(),
        LeaseTick::Checkpoint(vec![(100, 540)])
    );

    // The ticker holds no strong handle: dropping ours ends it.
    drop(h);
    timeout(WAIT, ticker).await.unwrap().unwrap();
    assert!(rx.recv().await.is_none());
}
