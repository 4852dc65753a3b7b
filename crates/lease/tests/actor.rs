//! The lease task behind `LeaseHandle`.

use std::sync::Arc;
use std::time::Duration;

use lease::{
    FakeClock, InMemoryLeaseStore, LeaseCommand, LeaseError, LeaseHandle, LeaseTick, Lessor,
    LessorConfig, TickerConfig,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;

fn spawn(clock: &FakeClock, cfg: LessorConfig) -> (LeaseHandle, tokio::task::JoinHandle<()>) {
    let lessor = Lessor::new(
        cfg,
        Arc::new(clock.clone()),
        Box::new(InMemoryLeaseStore::new()),
    )
    .unwrap();
    LeaseHandle::spawn(lessor, 64)
}

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn every_operation_round_trips() {
    let clock = FakeClock::new();
    let (h, _task) = spawn(&clock, LessorConfig::new(2));
    assert!(!h.is_primary().await.unwrap());
    assert_eq!(h.grant(1, 1).await.unwrap().ttl, 2);
    assert_eq!(h.grant(1, 1).await, Err(LeaseError::Exists));
    h.attach(1, b"b".to_vec()).await.unwrap();
    h.attach(1, b"a".to_vec()).await.unwrap();
    h.attach(1, b"c".to_vec()).await.unwrap();
    h.detach(1, b"c".to_vec()).await.unwrap();
    assert_eq!(h.lease_of(b"a".to_vec()).await.unwrap(), Some(1));
    assert_eq!(h.lookup(1).await.unwrap().unwrap().key_count, 2);
    assert_eq!(h.leases().await.unwrap().len(), 1);
    assert_eq!(h.renew(1).await, Err(LeaseError::NotPrimary));
    h.checkpoint(1, 1).await.unwrap();
    assert_eq!(h.time_to_live(1).await.unwrap().ttl, 1);

    h.promote(Duration::ZERO).await.unwrap();
    assert!(h.is_primary().await.unwrap());
    assert_eq!(h.renew(1).await, Ok(2));
    assert_eq!(h.checkpoints_due(10).await.unwrap(), vec![(1, 0)]);
    clock.advance(Duration::from_secs(2));
    assert_eq!(h.expired(10).await.unwrap(), vec![1]);
    assert_eq!(
        h.revoke(1).await.unwrap(),
        vec![b"a".to_vec(), b"b".to_vec()]
    );
    assert_eq!(h.time_to_live(1).await, Err(LeaseError::NotFound));
    h.reload().await.unwrap();
    h.demote().await.unwrap();
    assert!(!h.is_primary().await.unwrap());

    // Raw commands work too.
    let (reply, rx) = oneshot::channel();
    h.send(LeaseCommand::Grant {
        id: 5,
        ttl: 10,
        reply,
    })
    .await
    .unwrap();
    assert_eq!(rx.await.unwrap().unwrap().id, 5);
}

#[tokio::test]
async fn renew_of_an_expired_lease_waits_for_its_revoke() {
    let clock = FakeClock::new();
    let (h, _task) = spawn(&clock, LessorConfig::new(1));
    h.promote(Duration::ZERO).await.unwrap();
    h.grant(1, 5).await.unwrap();
    clock.advance(Duration::from_secs(5));

    let h2 = h.clone();
    let mut parked = tokio::spawn(async move { h2.renew(1).await });
    // Still waiting after other commands went through.
    assert_eq!(h.expired(10).await.unwrap(), vec![1]);
    assert!(timeout(Duration::from_millis(50), &mut parked)
        .await
        .is_err());
    h.revoke(1).await.unwrap();
    assert_eq!(
        timeout(WAIT, parked).await.unwrap().unwrap(),
        Err(LeaseError::NotFound)
    );
}

#[tokio::test]
async fn parked_renewals_end_on_demotion_or_promotion() {
    let clock = FakeClock::new();
    let (h, _task) = spawn(&clock, LessorConfig::new(1));
    h.promote(Duration::ZERO).await.unwrap();
    h.grant(1, 5).await.unwrap();
    clock.advance(Duration::from_secs(6));
    let h2 = h.clone();
    let parked = tokio::spawn(async move { h2.renew(1).await });
    h.is_primary().await.unwrap();
    h.demote().await.unwrap();
    assert_eq!(
        timeout(WAIT, parked).await.unwrap().unwrap(),
        Err(LeaseError::NotPrimary)
    );

    // A new term refreshes deadlines, so a keep-alive parked then is served.
    h.promote(Duration::ZERO).await.unwrap();
    clock.advance(Duration::from_secs(6));
    let h2 = h.clone();
    let parked = tokio::spawn(async move { h2.renew(1).await });
    h.is_primary().await.unwrap();
    h.promote(Duration::ZERO).await.unwrap();
    assert_eq!(timeout(WAIT, parked).await.unwrap().unwrap(), Ok(5));
}

#[tokio::test]
async fn the_task_stops_when_every_handle_is_dropped() {
    let clock = FakeClock::new();
    let (h, task) = spawn(&clock, LessorConfig::new(1));
    let h2 = h.clone();
    drop(h);
    h2.grant(1, 5).await.unwrap();
    drop(h2);
    timeout(WAIT, task).await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn ticker_reports_expired_leases_and_due_checkpoints() {
    let clock = FakeClock::new();
    let mut cfg = LessorConfig::new(1);
    cfg.checkpoint_interval = Duration::from_secs(60);
    let (h, task) = spawn(&clock, cfg);
    h.promote(Duration::ZERO).await.unwrap();
    for id in 1..=5 {
        h.grant(id, 5).await.unwrap();
    }
    h.grant(100, 600).await.unwrap();

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
                    h.revoke(*id).await.unwrap();
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

    // The ticker holds no strong handle: dropping ours ends both tasks.
    drop(h);
    timeout(WAIT, task).await.unwrap().unwrap();
    timeout(WAIT, ticker).await.unwrap().unwrap();
    assert!(rx.recv().await.is_none());
}
