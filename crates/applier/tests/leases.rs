//! Lease entries through the applier: what the engine holds after each, how many engine
//! writes each costs, and what a restart finds.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use applier::{encode_request, Applier, ApplyError, ApplyResponse, EngineLeaseStore, Responder};
use lease::{LeaseError, LeaseHandle, LeaseStore, Lessor, LessorConfig, SystemClock};
use mvcc_store::{
    EngineError, KvEngine, MemEngine, MvccStore, ObservedEngine, WriteBatch, WriteObserver,
};
use oxcd_proto::etcdserverpb::{
    InternalRaftRequest, LeaseCheckpoint, LeaseCheckpointRequest, LeaseGrantRequest,
    LeaseRevokeRequest, PutRequest, RangeRequest,
};
use oxcd_proto::mvccpb::event::EventType;
use raft_node::{Committed, CommittedEntry, EntryKind};
use tokio::sync::{mpsc, oneshot};

/// Counts the batches written to an engine.
#[derive(Default)]
struct Counter(AtomicUsize);

impl WriteObserver for Counter {
    fn before_write(&self, _: &WriteBatch) -> Result<(), EngineError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A MemEngine that counts the batches written to it.
type CountingEngine = ObservedEngine<Counter>;

fn counting_engine() -> Arc<CountingEngine> {
    Arc::new(ObservedEngine::new(
        Arc::new(MemEngine::default()),
        Counter::default(),
    ))
}

/// A member's applier with its lessor, as the server wires them, over `engine`.
struct Member {
    engine: Arc<CountingEngine>,
    store: MvccStore,
    leases: LeaseHandle,
    committed: mpsc::Sender<Committed<Responder>>,
    events: mpsc::Receiver<applier::Events>,
    thread: std::thread::JoinHandle<()>,
    next: u64,
}

impl Member {
    fn start(engine: Arc<CountingEngine>) -> Member {
        let dyn_engine: Arc<dyn KvEngine> = engine.clone();
        let store = MvccStore::open(dyn_engine.clone()).unwrap();
        let mut lessor = Lessor::new(
            LessorConfig::new(1),
            Arc::new(SystemClock),
            Box::new(EngineLeaseStore::applied_with(dyn_engine, store.clone())),
        )
        .unwrap();
        for (lease, key) in store.leased_keys().unwrap() {
            lessor.attach(lease, &key).unwrap();
        }
        let leases = LeaseHandle::new(lessor);
        let (committed, committed_rx) = mpsc::channel(16);
        let (events_tx, events) = mpsc::channel(16);
        let (applied_tx, _) = tokio::sync::watch::channel(0);
        let applier =
            Applier::new(store.clone(), Some(events_tx), applied_tx).with_leases(leases.clone());
        let thread = std::thread::spawn(move || applier.run(committed_rx));
        let next = store.applied_index() + 1;
        Member {
            engine,
            store,
            leases,
            committed,
            events,
            thread,
            next,
        }
    }

    /// Applies `req` as the next entry; returns its outcome and the engine batches it took.
    async fn apply(
        &mut self,
        req: InternalRaftRequest,
    ) -> (Result<ApplyResponse, ApplyError>, usize) {
        let before = self.engine.observer().0.load(Ordering::SeqCst);
        let (tx, rx) = oneshot::channel();
        let index = self.next;
        self.next += 1;
        self.committed
            .send(Committed::entries(vec![CommittedEntry {
                index,
                term: 2,
                kind: EntryKind::Normal,
                data: encode_request(&req),
                reply: Some(tx),
            }]))
            .await
            .unwrap();
        let outcome = rx.await.unwrap();
        (
            outcome,
            self.engine.observer().0.load(Ordering::SeqCst) - before,
        )
    }

    /// Applies `reqs` as one committed batch; returns their outcomes and the engine batches
    /// they took together.
    async fn apply_batch(
        &mut self,
        reqs: Vec<InternalRaftRequest>,
    ) -> (Vec<Result<ApplyResponse, ApplyError>>, usize) {
        let before = self.engine.observer().0.load(Ordering::SeqCst);
        let mut entries = Vec::new();
        let mut answers = Vec::new();
        for req in reqs {
            let (tx, rx) = oneshot::channel();
            entries.push(CommittedEntry {
                index: self.next,
                term: 2,
                kind: EntryKind::Normal,
                data: encode_request(&req),
                reply: Some(tx),
            });
            answers.push(rx);
            self.next += 1;
        }
        self.committed
            .send(Committed::entries(entries))
            .await
            .unwrap();
        let mut outcomes = Vec::new();
        for rx in answers {
            outcomes.push(rx.await.unwrap());
        }
        (
            outcomes,
            self.engine.observer().0.load(Ordering::SeqCst) - before,
        )
    }

    fn records(&self) -> Vec<lease::LeaseRecord> {
        let engine: Arc<dyn KvEngine> = self.engine.clone();
        EngineLeaseStore::new(engine).load().unwrap()
    }

    fn stop(self) -> Arc<CountingEngine> {
        drop(self.committed);
        self.thread.join().unwrap();
        self.engine
    }
}

fn grant(id: i64, ttl: i64) -> InternalRaftRequest {
    InternalRaftRequest {
        lease_grant: Some(LeaseGrantRequest { ttl, id }),
        ..Default::default()
    }
}

fn revoke(id: i64) -> InternalRaftRequest {
    InternalRaftRequest {
        lease_revoke: Some(LeaseRevokeRequest { id }),
        ..Default::default()
    }
}

fn put(key: &str, lease: i64) -> InternalRaftRequest {
    InternalRaftRequest {
        put: Some(PutRequest {
            key: key.into(),
            value: b"v".to_vec(),
            lease,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn live_keys(store: &MvccStore) -> Vec<Vec<u8>> {
    store
        .range(&RangeRequest {
            key: vec![0],
            range_end: vec![0],
            ..Default::default()
        })
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect()
}

#[tokio::test]
async fn grant_and_revoke_each_write_one_batch_with_their_index() {
    let mut m = Member::start(counting_engine());

    let (out, writes) = m.apply(grant(7, 60)).await;
    match out.unwrap() {
        ApplyResponse::LeaseGrant(r) => assert_eq!((r.id, r.ttl), (7, 60)),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(writes, 1, "the lease record rides in the entry's batch");
    assert_eq!(m.records().len(), 1);
    assert_eq!(m.store.applied_index(), 1);

    m.apply(put("a", 7)).await.0.unwrap();
    m.apply(put("b", 7)).await.0.unwrap();
    m.apply(put("c", 0)).await.0.unwrap();
    for _ in 0..3 {
        m.events.recv().await.unwrap();
    }
    assert_eq!(
        m.leases.keys(7).unwrap(),
        vec![b"a".to_vec(), b"b".to_vec()]
    );

    let rev = m.store.current_revision();
    let (out, writes) = m.apply(revoke(7)).await;
    match out.unwrap() {
        ApplyResponse::LeaseRevoke(r) => assert_eq!(r.header.unwrap().revision, rev + 1),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(writes, 1, "keys, lease record and index leave in one batch");
    // Both keys went in one revision.
    let ev = m.events.recv().await.unwrap();
    assert_eq!(ev.revision, rev + 1);
    let deleted: Vec<&[u8]> = ev
        .events
        .iter()
        .map(|e| {
            assert_eq!(e.r#type, EventType::Delete as i32);
            e.kv.as_ref().unwrap().key.as_slice()
        })
        .collect();
    assert_eq!(deleted, vec![b"a".as_slice(), b"b".as_slice()]);
    assert!(!m.leases.contains(7));
    assert!(m.records().is_empty());
    assert_eq!(live_keys(&m.store), vec![b"c".to_vec()]);

    // Revoking it again is an error for the proposer, and the entry still counts as applied.
    let (out, _) = m.apply(revoke(7)).await;
    assert!(matches!(out, Err(ApplyError::Lease(LeaseError::NotFound))));
    assert_eq!(m.store.applied_index(), 6);
    m.stop();
}

#[tokio::test]
async fn leases_their_keys_and_checkpoints_survive_a_restart() {
    let mut m = Member::start(counting_engine());
    m.apply(grant(1, 30)).await.0.unwrap();
    m.apply(grant(2, 600)).await.0.unwrap();
    m.apply(put("k", 2)).await.0.unwrap();
    let (out, writes) = m
        .apply(InternalRaftRequest {
            lease_checkpoint: Some(LeaseCheckpointRequest {
                checkpoints: vec![LeaseCheckpoint {
                    id: 2,
                    remaining_ttl: 400,
                }],
            }),
            ..Default::default()
        })
        .await;
    out.unwrap();
    assert_eq!(writes, 1);
    m.apply(revoke(1)).await.0.unwrap();
    let applied = m.store.applied_index();

    let m = Member::start(m.stop());
    assert_eq!(m.store.applied_index(), applied);
    assert!(!m.leases.contains(1));
    let info = m.leases.lookup(2).unwrap();
    assert_eq!(
        (info.ttl, info.remaining_ttl, info.key_count),
        (600, 400, 1)
    );
    assert_eq!(m.leases.lease_of(b"k"), Some(2));
    // A restarted member's lessor is not primary until raft says so: it reports what was
    // checkpointed.
    assert_eq!(m.leases.time_to_live(2).unwrap().ttl, 400);
    m.leases.promote(Duration::ZERO);
    assert!(m.leases.time_to_live(2).unwrap().ttl > 390);
    m.stop();
}

#[tokio::test]
async fn runs_of_plain_puts_in_a_batch_share_one_engine_write() {
    let mut m = Member::start(counting_engine());
    m.apply(grant(7, 60)).await.0.unwrap();
    let rev = m.store.current_revision();
    let mut with_prev = put("x", 0);
    with_prev.put.as_mut().unwrap().prev_kv = true;
    let (outcomes, writes) = m
        .apply_batch(vec![
            put("a", 7),
            put("b", 0),
            put("a", 0), // moves "a" off lease 7
            with_prev,   // needs the old value: applied on its own
            put("c", 9), // no such lease
            put("d", 0),
        ])
        .await;
    assert_eq!(writes, 3, "two runs of plain puts and the put between them");
    let revisions: Vec<Option<i64>> = outcomes
        .iter()
        .map(|o| match o {
            Ok(ApplyResponse::Put(r)) => Some(r.header.as_ref().unwrap().revision),
            Err(ApplyError::Mvcc(mvcc_store::MvccError::LeaseNotFound)) => None,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        revisions,
        vec![
            Some(rev + 1),
            Some(rev + 2),
            Some(rev + 3),
            Some(rev + 4),
            None,
            Some(rev + 5)
        ]
    );
    let mut published = Vec::new();
    for _ in 0..5 {
        let ev = m.events.recv().await.unwrap();
        let kv = ev.events[0].kv.clone().unwrap();
        published.push((ev.revision, kv.key, kv.version));
    }
    assert_eq!(
        published,
        vec![
            (rev + 1, b"a".to_vec(), 1),
            (rev + 2, b"b".to_vec(), 1),
            (rev + 3, b"a".to_vec(), 2),
            (rev + 4, b"x".to_vec(), 1),
            (rev + 5, b"d".to_vec(), 1),
        ]
    );
    assert!(m.leases.keys(7).unwrap().is_empty());
    assert_eq!(m.leases.lease_of(b"a"), None);
    assert_eq!(m.store.applied_index(), 7);
    let engine = m.stop();
    let m = Member::start(engine);
    assert_eq!(m.store.applied_index(), 7);
    assert_eq!(m.store.current_revision(), rev + 5);
    m.stop();
}
