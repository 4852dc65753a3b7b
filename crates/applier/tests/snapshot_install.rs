//! Snapshot installs through the applier: records stream from the fetcher into the store,
//! every member asked starts a fresh install, and one that fails partway leaves nothing
//! behind.

use std::sync::{Arc, Mutex};

use applier::{Applier, Responder, SnapshotFetcher, SnapshotSink};
use mvcc_store::{KvEngine, MemEngine, MvccStore, RocksEngine, WriteOp};
use oxcd_proto::etcdserverpb::{PutRequest, RangeRequest};
use raft_node::{Committed, InstallSnapshot};
use tokio::sync::mpsc;

type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Member `from` breaks off halfway, member 5 sends its records out of order, member 6
/// sends them whole.
struct Fake {
    records: Pairs,
    asked: Arc<Mutex<Vec<u64>>>,
    /// Whether member 6 answers well.
    six_works: bool,
}

impl SnapshotFetcher for Fake {
    fn candidates(&mut self, from: u64) -> Vec<u64> {
        vec![from, 5, 6]
    }

    fn fetch(
        &mut self,
        _index: u64,
        member: u64,
        sink: &mut SnapshotSink<'_>,
    ) -> Result<u64, String> {
        self.asked.lock().unwrap().push(member);
        match member {
            5 => {
                for (k, v) in self.records.iter().rev() {
                    sink(k, v)?;
                }
            }
            6 if self.six_works => {
                for (k, v) in &self.records {
                    sink(k, v)?;
                }
            }
            _ => {
                for (k, v) in &self.records[..self.records.len() / 2] {
                    sink(k, v)?;
                }
                return Err("connection reset".into());
            }
        }
        Ok(self.records.len() as u64)
    }
}

fn put(store: &MvccStore, index: u64, key: &str, value: &str) {
    let req = PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    };
    store.apply(index, WriteOp::Put(&req), &|_| false).unwrap();
}

fn value(store: &MvccStore, key: &str) -> Option<Vec<u8>> {
    let r = store
        .range(&RangeRequest {
            key: key.into(),
            ..Default::default()
        })
        .unwrap();
    r.kvs.first().map(|kv| kv.value.clone())
}

fn install(fetcher: Fake, store: &MvccStore) -> Result<u64, String> {
    let (committed, committed_rx) = mpsc::channel::<Committed<Responder>>(4);
    let (applied_tx, applied) = tokio::sync::watch::channel(0);
    let applier = Applier::new(store.clone(), None, applied_tx).with_snapshots(Box::new(fetcher));
    let thread = std::thread::spawn(move || applier.run(committed_rx));
    let (done, outcome) = std::sync::mpsc::channel();
    committed
        .blocking_send(Committed {
            snapshot: Some(InstallSnapshot {
                index: 100,
                term: 2,
                from: 3,
                done,
            }),
            entries: Vec::new(),
        })
        .unwrap();
    let outcome = outcome.recv().unwrap();
    drop(committed);
    thread.join().unwrap();
    if let Ok(index) = &outcome {
        assert_eq!(*applied.borrow(), *index);
    }
    outcome
}

#[test]
fn the_first_member_that_sends_everything_is_installed() {
    let source = MvccStore::open(Arc::new(MemEngine::default())).unwrap();
    for i in 1..=100 {
        put(&source, i, &format!("k{}", i % 10), &format!("v{i}"));
    }
    let mut records = Vec::new();
    source
        .export(&mut |k, v| {
            records.push((k.to_vec(), v.to_vec()));
            true
        })
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let engine: Arc<dyn KvEngine> = Arc::new(RocksEngine::open(dir.path()).unwrap());
    let store = MvccStore::open(engine).unwrap();
    put(&store, 1, "stale", "x");

    // Nobody sends everything: the store stays as it was.
    let asked = Arc::new(Mutex::new(Vec::new()));
    let outcome = install(
        Fake {
            records: records.clone(),
            asked: asked.clone(),
            six_works: false,
        },
        &store,
    );
    assert!(outcome.unwrap_err().contains("connection reset"));
    assert_eq!(store.applied_index(), 1);
    assert_eq!(value(&store, "stale").as_deref(), Some(&b"x"[..]));
    assert_eq!(value(&store, "k0"), None);

    let asked = Arc::new(Mutex::new(Vec::new()));
    let outcome = install(
        Fake {
            records,
            asked: asked.clone(),
            six_works: true,
        },
        &store,
    );
    assert_eq!(outcome, Ok(100));
    assert_eq!(*asked.lock().unwrap(), [3, 5, 6]);
    assert_eq!(store.hash_kv(0).unwrap(), source.hash_kv(0).unwrap());
    assert_eq!(value(&store, "stale"), None);
    assert_eq!(value(&store, "k0").as_deref(), Some(&b"v100"[..]));
}
