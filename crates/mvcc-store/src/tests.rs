//! One suite, run against both engines: the mvcc semantics must not depend on the engine.

use std::collections::BTreeMap;
use std::sync::Arc;

use oxcd_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use oxcd_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use oxcd_proto::etcdserverpb::request_op::Request;
use oxcd_proto::etcdserverpb::response_op::Response;
use oxcd_proto::etcdserverpb::*;
use proptest::prelude::*;

use super::*;

/// A store plus what it takes to reopen it on the same data.
trait Fixture {
    fn store(&self) -> MvccStore;
    fn reopen(&mut self) -> MvccStore;
}

struct Mem(Arc<MemEngine>, MvccStore);
impl Fixture for Mem {
    fn store(&self) -> MvccStore {
        self.1.clone()
    }
    fn reopen(&mut self) -> MvccStore {
        self.1 = MvccStore::open(self.0.clone()).unwrap();
        self.1.clone()
    }
}
fn mem() -> Mem {
    let e = Arc::new(MemEngine::default());
    let s = MvccStore::open(e.clone()).unwrap();
    Mem(e, s)
}

struct Rocks(tempfile::TempDir, Option<MvccStore>);
impl Fixture for Rocks {
    fn store(&self) -> MvccStore {
        self.1.clone().unwrap()
    }
    fn reopen(&mut self) -> MvccStore {
        self.1 = None; // RocksDB locks its dir: the old handles must be gone first.
        let s = MvccStore::open(Arc::new(open_rocks(self.0.path()))).unwrap();
        self.1 = Some(s.clone());
        s
    }
}
/// Opens RocksDB, waiting for a closing store's compactor thread to let go of it.
fn open_rocks(path: &std::path::Path) -> RocksEngine {
    for _ in 0..250 {
        match RocksEngine::open(path) {
            Ok(e) => return e,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
    RocksEngine::open(path).unwrap()
}

fn rocks() -> Rocks {
    let d = tempfile::tempdir().unwrap();
    let s = MvccStore::open(Arc::new(RocksEngine::open(d.path()).unwrap())).unwrap();
    Rocks(d, Some(s))
}

const NO_LEASES: &dyn Fn(i64) -> bool = &|_| false;

struct W {
    s: MvccStore,
    index: u64,
}

impl W {
    fn new(s: MvccStore) -> Self {
        let index = s.applied_index();
        W { s, index }
    }
    fn apply(&mut self, op: WriteOp<'_>) -> Result<Applied, MvccError> {
        self.index += 1;
        self.s.apply(self.index, op, NO_LEASES)
    }
    fn put(&mut self, k: &str, v: &str) -> PutResponse {
        let req = PutRequest {
            key: k.into(),
            value: v.into(),
            prev_kv: true,
            ..Default::default()
        };
        match self.apply(WriteOp::Put(&req)).unwrap().response {
            WriteResponse::Put(r) => r,
            other => panic!("{other:?}"),
        }
    }
    fn del(&mut self, k: &str, end: &str) -> DeleteRangeResponse {
        let req = DeleteRangeRequest {
            key: k.into(),
            range_end: end.into(),
            prev_kv: true,
        };
        match self.apply(WriteOp::DeleteRange(&req)).unwrap().response {
            WriteResponse::DeleteRange(r) => r,
            other => panic!("{other:?}"),
        }
    }
    fn txn(&mut self, t: &TxnRequest) -> TxnResponse {
        match self.apply(WriteOp::Txn(t)).unwrap().response {
            WriteResponse::Txn(r) => r,
            other => panic!("{other:?}"),
        }
    }
    fn compact(&mut self, rev: i64) -> Result<Applied, MvccError> {
        let req = CompactionRequest {
            revision: rev,
            physical: true,
        };
        self.apply(WriteOp::Compact(&req))
    }
}

fn get(s: &MvccStore, k: &str, rev: i64) -> Result<RangeResponse, MvccError> {
    s.range(&RangeRequest {
        key: k.into(),
        revision: rev,
        ..Default::default()
    })
}

fn keys(r: &RangeResponse) -> Vec<String> {
    r.kvs
        .iter()
        .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
        .collect()
}

fn rev_of(r: &RangeResponse) -> i64 {
    r.header.as_ref().unwrap().revision
}

fn versions_tombstones_and_history(f: &mut dyn Fixture) {
    let s = f.store();
    assert_eq!(s.current_revision(), 1, "an empty store is at revision 1");
    let mut w = W::new(s.clone());
    assert_eq!(w.put("a", "1").header.unwrap().revision, 2);
    let r = w.put("a", "2");
    assert_eq!(r.header.unwrap().revision, 3);
    assert_eq!(r.prev_kv.unwrap().value, b"1");
    let kv = &get(&s, "a", 0).unwrap().kvs[0];
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (2, 3, 2));

    let d = w.del("a", "");
    assert_eq!((d.deleted, d.header.unwrap().revision), (1, 4));
    assert_eq!(d.prev_kvs[0].value, b"2");
    assert!(get(&s, "a", 0).unwrap().kvs.is_empty());
    assert_eq!(
        w.del("a", "").header.unwrap().revision,
        4,
        "no-op delete keeps the revision"
    );
    assert_eq!(s.current_revision(), 4);

    w.put("a", "3");
    let kv = &get(&s, "a", 0).unwrap().kvs[0];
    assert_eq!((kv.create_revision, kv.version), (5, 1), "a new generation");
    // History.
    assert_eq!(get(&s, "a", 2).unwrap().kvs[0].value, b"1");
    assert_eq!(get(&s, "a", 3).unwrap().kvs[0].value, b"2");
    assert!(get(&s, "a", 4).unwrap().kvs.is_empty());
    assert_eq!(
        rev_of(&get(&s, "a", 2).unwrap()),
        5,
        "header carries the current revision"
    );
    assert!(matches!(get(&s, "a", 6), Err(MvccError::FutureRevision)));

    // Reopen keeps everything, including the applied index.
    let applied = s.applied_index();
    drop((w, s));
    let s = f.reopen();
    assert_eq!(s.current_revision(), 5);
    assert_eq!(s.applied_index(), applied);
    assert_eq!(get(&s, "a", 3).unwrap().kvs[0].value, b"2");
    assert_eq!(get(&s, "a", 0).unwrap().kvs[0].version, 1);
}

fn compaction(f: &mut dyn Fixture) {
    let s = f.store();
    let mut w = W::new(s.clone());
    w.put("a", "1"); // 2
    w.put("a", "2"); // 3
    w.put("b", "1"); // 4
    w.del("b", ""); // 5
    w.put("c", "1"); // 6
    assert!(matches!(w.compact(7), Err(MvccError::FutureRevision)));
    let done = w.compact(5).unwrap();
    assert_eq!(done.revision, 6);
    done.compaction.unwrap().wait_blocking();
    assert_eq!(s.compact_revision(), 5);
    assert!(matches!(get(&s, "a", 4), Err(MvccError::Compacted)));
    assert_eq!(
        get(&s, "a", 5).unwrap().kvs[0].value,
        b"2",
        "reading at the compact revision works"
    );
    assert!(get(&s, "b", 5).unwrap().kvs.is_empty());
    assert!(matches!(w.compact(5), Err(MvccError::Compacted)));
    assert!(matches!(s.events_since(4, 100), Err(MvccError::Compacted)));
    // As in etcd, history may start at the compaction point: what survived of it (the
    // tombstone at 5 did not), then everything after.
    let from_compacted = s.events_since(5, 100).unwrap();
    assert_eq!(from_compacted.len(), 1);
    assert_eq!(from_compacted[0].kv.as_ref().unwrap().key, b"c");
    assert_eq!(s.events_since(6, 100).unwrap().len(), 1);
    drop((w, s));
    let s = f.reopen();
    assert_eq!(s.compact_revision(), 5);
    assert_eq!(s.current_revision(), 6);
    assert!(matches!(get(&s, "a", 4), Err(MvccError::Compacted)));
    assert_eq!(get(&s, "a", 0).unwrap().kvs[0].version, 2);
    // Puts take create revision and version from the index, not from the old value: both
    // must carry on across compaction and reopening.
    let mut w = W::new(s.clone());
    w.put("a", "3"); // 7
    w.put("b", "2"); // 8
    w.put("c", "2"); // 9
    let gen = |k| {
        let kv = get(&s, k, 0).unwrap().kvs[0].clone();
        (kv.create_revision, kv.version)
    };
    assert_eq!(gen("a"), (2, 3));
    assert_eq!(gen("b"), (8, 1), "deleted before: a new generation");
    assert_eq!(gen("c"), (6, 2));
    let done = w.compact(8).unwrap();
    done.compaction.unwrap().wait_blocking();
    drop((w, s));
    let s = f.reopen();
    let mut w = W::new(s.clone());
    w.put("c", "3"); // 10
    let kv = get(&s, "c", 0).unwrap().kvs[0].clone();
    assert_eq!(
        (kv.create_revision, kv.version, kv.mod_revision),
        (6, 3, 10)
    );
}

fn compaction_of_everything_keeps_the_revision(f: &mut dyn Fixture) {
    let s = f.store();
    let mut w = W::new(s.clone());
    w.put("a", "1");
    w.del("a", "");
    w.compact(3).unwrap().compaction.unwrap().wait_blocking();
    drop((w, s));
    let s = f.reopen();
    assert_eq!(s.current_revision(), 3);
    let mut w = W::new(s.clone());
    assert_eq!(w.put("a", "2").header.unwrap().revision, 4);
}

fn range_options(f: &mut dyn Fixture) {
    let s = f.store();
    let mut w = W::new(s.clone());
    // key / value / create and mod revisions chosen so every sort target orders differently.
    w.put("k3", "a"); // 2
    w.put("k1", "c"); // 3
    w.put("k2", "b"); // 4
    w.put("k1", "d"); // 5 (k1 version 2)
    w.put("z", "x"); // 6
    let all = |req: RangeRequest| s.range(&req).unwrap();
    let base = RangeRequest {
        key: b"k".to_vec(),
        range_end: b"l".to_vec(),
        ..Default::default()
    };
    assert_eq!(keys(&all(base.clone())), ["k1", "k2", "k3"]);
    let from = all(RangeRequest {
        key: b"k2".to_vec(),
        range_end: vec![0],
        ..Default::default()
    });
    assert_eq!(keys(&from), ["k2", "k3", "z"]);
    let every = all(RangeRequest {
        key: vec![0],
        range_end: vec![0],
        ..Default::default()
    });
    assert_eq!(every.count, 4);

    let limited = all(RangeRequest {
        limit: 2,
        ..base.clone()
    });
    assert_eq!(
        (keys(&limited).len(), limited.more, limited.count),
        (2, true, 3)
    );
    let exact = all(RangeRequest {
        limit: 3,
        ..base.clone()
    });
    assert!(!exact.more);
    let counted = all(RangeRequest {
        count_only: true,
        ..base.clone()
    });
    assert!(counted.kvs.is_empty() && counted.count == 3 && !counted.more);
    let ko = all(RangeRequest {
        keys_only: true,
        ..base.clone()
    });
    assert!(ko.kvs.iter().all(|kv| kv.value.is_empty()) && ko.kvs[0].mod_revision == 5);

    let sorted = |target: SortTarget, order: SortOrder| {
        keys(&all(RangeRequest {
            sort_target: target as i32,
            sort_order: order as i32,
            ..base.clone()
        }))
    };
    assert_eq!(
        sorted(SortTarget::Key, SortOrder::Descend),
        ["k3", "k2", "k1"]
    );
    assert_eq!(
        sorted(SortTarget::Value, SortOrder::Ascend),
        ["k3", "k2", "k1"]
    );
    assert_eq!(
        sorted(SortTarget::Create, SortOrder::Descend),
        ["k2", "k1", "k3"]
    );
    assert_eq!(
        sorted(SortTarget::Mod, SortOrder::None),
        ["k3", "k2", "k1"],
        "NONE on a non-key target means ascending"
    );
    assert_eq!(sorted(SortTarget::Version, SortOrder::Descend)[0], "k1");

    let sorted_limited = all(RangeRequest {
        sort_target: SortTarget::Mod as i32,
        sort_order: SortOrder::Descend as i32,
        limit: 1,
        ..base.clone()
    });
    assert_eq!(
        (keys(&sorted_limited), sorted_limited.more),
        (vec!["k1".to_string()], true)
    );

    let filtered = all(RangeRequest {
        min_mod_revision: 3,
        max_mod_revision: 4,
        ..base.clone()
    });
    assert_eq!(keys(&filtered), ["k2"]);
    assert_eq!(
        filtered.count, 3,
        "count is taken before filters, as etcd does"
    );
    let created = all(RangeRequest {
        min_create_revision: 3,
        ..base.clone()
    });
    assert_eq!(keys(&created), ["k1", "k2"]);
    let historic = all(RangeRequest {
        revision: 3,
        ..base.clone()
    });
    assert_eq!(keys(&historic), ["k1", "k3"]);
    assert_eq!(historic.kvs[0].value, b"c");
    let empty = all(RangeRequest {
        key: b"m".to_vec(),
        range_end: b"a".to_vec(),
        ..Default::default()
    });
    assert_eq!(empty.count, 0);
}

fn cmp(key: &str, target: CompareTarget, result: CompareResult, u: TargetUnion) -> Compare {
    Compare {
        result: result as i32,
        target: target as i32,
        key: key.into(),
        range_end: vec![],
        target_union: Some(u),
    }
}

fn put_op(k: &str, v: &str) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(PutRequest {
            key: k.into(),
            value: v.into(),
            ..Default::default()
        })),
    }
}

fn get_op(k: &str) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestRange(RangeRequest {
            key: k.into(),
            ..Default::default()
        })),
    }
}

fn txn_compare_matrix(f: &mut dyn Fixture) {
    let s = f.store();
    let mut w = W::new(s.clone());
    w.put("k", "m"); // 2
    w.put("k", "m"); // 3: version 2, create 2, mod 3, lease 0
    use CompareResult::*;
    use CompareTarget as T;
    let cases: Vec<(Compare, bool)> = vec![
        (
            cmp("k", T::Value, Equal, TargetUnion::Value(b"m".to_vec())),
            true,
        ),
        (
            cmp("k", T::Value, Greater, TargetUnion::Value(b"a".to_vec())),
            true,
        ),
        (
            cmp("k", T::Value, Less, TargetUnion::Value(b"a".to_vec())),
            false,
        ),
        (
            cmp("k", T::Value, NotEqual, TargetUnion::Value(b"m".to_vec())),
            false,
        ),
        (cmp("k", T::Version, Equal, TargetUnion::Version(2)), true),
        (cmp("k", T::Version, Greater, TargetUnion::Version(1)), true),
        (cmp("k", T::Version, Less, TargetUnion::Version(2)), false),
        (
            cmp("k", T::Version, NotEqual, TargetUnion::Version(3)),
            true,
        ),
        (
            cmp("k", T::Create, Equal, TargetUnion::CreateRevision(2)),
            true,
        ),
        (
            cmp("k", T::Create, Less, TargetUnion::CreateRevision(3)),
            true,
        ),
        (
            cmp("k", T::Create, Greater, TargetUnion::CreateRevision(2)),
            false,
        ),
        (
            cmp("k", T::Create, NotEqual, TargetUnion::CreateRevision(2)),
            false,
        ),
        (cmp("k", T::Mod, Equal, TargetUnion::ModRevision(3)), true),
        (cmp("k", T::Mod, Greater, TargetUnion::ModRevision(2)), true),
        (cmp("k", T::Mod, Less, TargetUnion::ModRevision(3)), false),
        (
            cmp("k", T::Mod, NotEqual, TargetUnion::ModRevision(1)),
            true,
        ),
        (cmp("k", T::Lease, Equal, TargetUnion::Lease(0)), true),
        (cmp("k", T::Lease, Greater, TargetUnion::Lease(0)), false),
        (cmp("k", T::Lease, Less, TargetUnion::Lease(1)), true),
        (cmp("k", T::Lease, NotEqual, TargetUnion::Lease(0)), false),
        // A missing key: version/create/mod/lease compare as 0; a value compare fails.
        (
            cmp("nope", T::Version, Equal, TargetUnion::Version(0)),
            true,
        ),
        (
            cmp("nope", T::Create, Equal, TargetUnion::CreateRevision(0)),
            true,
        ),
        (cmp("nope", T::Mod, Less, TargetUnion::ModRevision(1)), true),
        (cmp("nope", T::Lease, Equal, TargetUnion::Lease(0)), true),
        (
            cmp(
                "nope",
                T::Value,
                NotEqual,
                TargetUnion::Value(b"x".to_vec()),
            ),
            false,
        ),
    ];
    for (i, (c, want)) in cases.into_iter().enumerate() {
        let r = w.txn(&TxnRequest {
            compare: vec![c.clone()],
            success: vec![get_op("k")],
            failure: vec![],
        });
        assert_eq!(r.succeeded, want, "case {i}: {c:?}");
        assert_eq!(
            r.header.unwrap().revision,
            3,
            "read-only txn keeps the revision"
        );
    }
    // range_end in a compare: every key in the range must satisfy it.
    w.put("k2", "m"); // version 1
    let mut c = cmp("k", T::Value, Equal, TargetUnion::Value(b"m".to_vec()));
    c.range_end = b"l".to_vec();
    assert!(
        w.txn(&TxnRequest {
            compare: vec![c.clone()],
            ..Default::default()
        })
        .succeeded
    );
    let mut c = cmp("k", T::Version, Equal, TargetUnion::Version(2));
    c.range_end = b"l".to_vec();
    assert!(
        !w.txn(&TxnRequest {
            compare: vec![c],
            ..Default::default()
        })
        .succeeded
    );
}

fn txn_writes_and_nesting(f: &mut dyn Fixture) {
    let s = f.store();
    let mut w = W::new(s.clone());
    w.put("a", "0"); // 2
    let t = TxnRequest {
        compare: vec![cmp(
            "a",
            CompareTarget::Value,
            CompareResult::Equal,
            TargetUnion::Value(b"0".to_vec()),
        )],
        success: vec![
            put_op("b", "1"),
            get_op("b"),
            RequestOp {
                request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                    key: b"a".to_vec(),
                    ..Default::default()
                })),
            },
            RequestOp {
                request: Some(Request::RequestTxn(TxnRequest {
                    // Decided on the state before the txn: "a" still exists here.
                    compare: vec![cmp(
                        "a",
                        CompareTarget::Version,
                        CompareResult::Equal,
                        TargetUnion::Version(1),
                    )],
                    success: vec![put_op("c", "1")],
                    failure: vec![put_op("c", "2")],
                })),
            },
        ],
        failure: vec![put_op("x", "x")],
    };
    let applied = w.apply(WriteOp::Txn(&t)).unwrap();
    let WriteResponse::Txn(r) = applied.response else {
        panic!()
    };
    assert!(r.succeeded);
    assert_eq!(
        r.header.unwrap().revision,
        3,
        "one revision for the whole txn"
    );
    let Some(Response::ResponseRange(seen)) = &r.responses[1].response else {
        panic!()
    };
    assert_eq!(seen.kvs[0].value, b"1", "later ops see earlier ones");
    assert_eq!(seen.header.as_ref().unwrap().revision, 3);
    let Some(Response::ResponseTxn(inner)) = &r.responses[3].response else {
        panic!()
    };
    assert!(inner.succeeded);
    assert_eq!(get(&s, "c", 0).unwrap().kvs[0].value, b"1");
    assert!(get(&s, "a", 0).unwrap().kvs.is_empty());
    // Events: one per change, same revision, increasing sub-revisions in engine order.
    assert_eq!(applied.events.len(), 3);
    assert!(applied
        .events
        .iter()
        .all(|e| e.kv.as_ref().unwrap().mod_revision == 3));
    assert_eq!(applied.events[1].r#type, EventType::Delete as i32);
    assert_eq!(applied.events[1].prev_kv.as_ref().unwrap().value, b"0");
    // History replays the same events.
    let hist = s.events_since(3, 100).unwrap();
    assert_eq!(hist, applied.events);

    // A failing put inside a txn fails the whole txn before anything is written.
    let t = TxnRequest {
        compare: vec![],
        success: vec![
            put_op("d", "1"),
            RequestOp {
                request: Some(Request::RequestPut(PutRequest {
                    key: b"e".to_vec(),
                    lease: 7,
                    ..Default::default()
                })),
            },
        ],
        failure: vec![],
    };
    assert!(matches!(
        w.apply(WriteOp::Txn(&t)),
        Err(MvccError::LeaseNotFound)
    ));
    assert!(get(&s, "d", 0).unwrap().kvs.is_empty());
    assert_eq!(s.current_revision(), 3);
}

fn put_flags_and_replay(f: &mut dyn Fixture) {
    let s = f.store();
    let mut w = W::new(s.clone());
    let iv = PutRequest {
        key: b"k".to_vec(),
        ignore_value: true,
        ..Default::default()
    };
    assert!(matches!(
        w.apply(WriteOp::Put(&iv)),
        Err(MvccError::KeyNotFound)
    ));
    w.put("k", "v");
    let with_lease = |l| PutRequest {
        key: b"k".to_vec(),
        lease: l,
        ignore_value: true,
        ..Default::default()
    };
    let leases = |id| id == 5;
    w.index += 1;
    s.apply(w.index, WriteOp::Put(&with_lease(5)), &leases)
        .unwrap();
    let kv = get(&s, "k", 0).unwrap().kvs[0].clone();
    assert_eq!((kv.value.as_slice(), kv.lease), (&b"v"[..], 5));
    let il = PutRequest {
        key: b"k".to_vec(),
        value: b"w".to_vec(),
        ignore_lease: true,
        ..Default::default()
    };
    w.apply(WriteOp::Put(&il)).unwrap();
    let kv = get(&s, "k", 0).unwrap().kvs[0].clone();
    assert_eq!((kv.value.as_slice(), kv.lease), (&b"w"[..], 5));

    // Replaying an applied index changes nothing.
    let rev = s.current_revision();
    let again = s.apply(w.index, WriteOp::Put(&il), NO_LEASES).unwrap();
    assert!(matches!(again.response, WriteResponse::None));
    assert_eq!(s.current_revision(), rev);
    // A failed request still moves the applied index.
    let before = s.applied_index();
    assert!(w
        .apply(WriteOp::Put(&PutRequest {
            key: b"q".to_vec(),
            lease: 9,
            ..Default::default()
        }))
        .is_err());
    assert_eq!(s.applied_index(), before + 1);
}

fn hash_is_stable(f: &mut dyn Fixture) {
    let s = f.store();
    let mut w = W::new(s.clone());
    w.put("a", "1");
    let (h1, _, r1) = s.hash_kv(0).unwrap();
    drop((w, s));
    let s = f.reopen();
    let (h2, _, r2) = s.hash_kv(0).unwrap();
    assert_eq!((h1, r1), (h2, r2));
    let mut w = W::new(s.clone());
    w.put("a", "2");
    assert_eq!(
        s.hash_kv(r1).unwrap().0,
        h1,
        "hash at an old revision is unchanged"
    );
    assert_ne!(s.hash_kv(0).unwrap().0, h1);
}

fn stored_mains(engine: &dyn KvEngine) -> Vec<i64> {
    let mut mains = Vec::new();
    engine
        .scan(&[REV_PREFIX], &[REV_PREFIX + 1], &mut |k, _| {
            mains.push(parse_rev_key(k).unwrap().main);
            true
        })
        .unwrap();
    mains
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn finished_compaction(engine: &dyn KvEngine) -> Option<i64> {
    meta_i64(engine, META_COMPACT_FINISHED).unwrap()
}

fn reopen_mid_compaction(f: &mut dyn Fixture) {
    let s = f.store();
    let mut w = W::new(s.clone());
    w.put("a", "1"); // 2
    w.put("a", "2"); // 3
    w.put("b", "1"); // 4
    w.del("b", ""); // 5
    w.put("c", "1"); // 6
                     // What a crash in the middle of compacting at 5 leaves on disk: the compaction recorded
                     // as scheduled, one doomed revision deleted, the others not yet.
    let engine = s.shared.engine.clone();
    let mut b = WriteBatch::default();
    b.put(META_COMPACT_SCHEDULED, 5i64.to_be_bytes().to_vec());
    b.delete(rev_key(Rev { main: 2, sub: 0 }).to_vec());
    engine.write(b).unwrap();
    drop((w, s, engine));

    let s = f.reopen();
    assert_eq!(s.compact_revision(), 5);
    assert_eq!(s.current_revision(), 6);
    assert!(matches!(get(&s, "a", 4), Err(MvccError::Compacted)));
    assert_eq!(get(&s, "a", 5).unwrap().kvs[0].value, b"2");
    assert!(get(&s, "b", 5).unwrap().kvs.is_empty());
    let engine = s.shared.engine.clone();
    wait_until("the resumed compaction", || {
        finished_compaction(&*engine) == Some(5)
    });
    assert_eq!(
        stored_mains(&*engine),
        vec![3, 6],
        "only what compaction keeps is left"
    );
    let mut w = W::new(s.clone());
    assert!(matches!(w.compact(5), Err(MvccError::Compacted)));
    assert_eq!(w.put("a", "3").header.unwrap().revision, 7);
}

fn compaction_bounds_like_etcd(f: &mut dyn Fixture) {
    let s = f.store();
    let mut w = W::new(s.clone());
    assert_eq!(s.compact_revision(), 0);
    assert_eq!(
        s.hash_kv(0).unwrap().1,
        -1,
        "etcd reports -1 before any compaction"
    );
    assert!(matches!(w.compact(-1), Err(MvccError::Compacted)));
    // etcd accepts a compaction at 0 once on a fresh store.
    w.compact(0).unwrap().compaction.unwrap().wait_blocking();
    assert_eq!(s.compact_revision(), 0);
    assert_eq!(s.hash_kv(0).unwrap().1, 0);
    assert!(matches!(w.compact(0), Err(MvccError::Compacted)));
    assert_eq!(s.events_since(0, 10).unwrap().len(), 0);
    w.put("a", "1"); // 2
    w.put("a", "2"); // 3
    drop((w, s));

    let s = f.reopen();
    let mut w = W::new(s.clone());
    assert!(
        matches!(w.compact(0), Err(MvccError::Compacted)),
        "kept across reopen"
    );
    w.compact(2).unwrap().compaction.unwrap().wait_blocking();
    // etcd refuses a hash at or below the compaction point, and above the newest revision.
    assert!(matches!(s.hash_kv(2), Err(MvccError::Compacted)));
    assert!(matches!(s.hash_kv(4), Err(MvccError::FutureRevision)));
    let (_, compacted, hashed) = s.hash_kv(0).unwrap();
    assert_eq!((compacted, hashed), (2, 3));
    assert_eq!(s.hash_kv(3).unwrap(), s.hash_kv(0).unwrap());
    // Reads at the compaction point work; below it they do not.
    assert_eq!(get(&s, "a", 2).unwrap().kvs[0].value, b"1");
    assert!(matches!(get(&s, "a", 1), Err(MvccError::Compacted)));
}

fn events_content(f: &mut dyn Fixture) {
    let s = f.store();
    let mut w = W::new(s.clone());
    let mut all = Vec::new();
    let put = |k: &str, v: &str, lease| PutRequest {
        key: k.into(),
        value: v.into(),
        lease,
        ..Default::default()
    };
    let first = w.apply(WriteOp::Put(&put("k", "v1", 0))).unwrap(); // 2
    assert_eq!(first.revision, 2);
    assert_eq!(first.events.len(), 1);
    let e = &first.events[0];
    assert_eq!(e.r#type, EventType::Put as i32);
    let kv = e.kv.as_ref().unwrap();
    assert_eq!(
        (
            &kv.key[..],
            &kv.value[..],
            kv.create_revision,
            kv.mod_revision,
            kv.version
        ),
        (&b"k"[..], &b"v1"[..], 2, 2, 1)
    );
    assert!(e.prev_kv.is_none(), "a new key has no previous value");
    all.extend(first.events);

    w.index += 1;
    let second = s
        .apply(w.index, WriteOp::Put(&put("k", "v2", 5)), &|id| id == 5)
        .unwrap(); // 3
    let e = &second.events[0];
    let kv = e.kv.as_ref().unwrap();
    assert_eq!((kv.version, kv.lease, kv.create_revision), (2, 5, 2));
    assert!(
        e.prev_kv.is_none(),
        "a put that needs no old value does not read it; watchers load it"
    );
    // History has it: the value at the revision before the event's.
    let mut second_events = s.events_since(3, 1).unwrap();
    let prev = second_events[0].prev_kv.as_ref().unwrap();
    assert_eq!((&prev.value[..], prev.mod_revision), (&b"v1"[..], 2));
    assert_eq!(second_events[0].kv, e.kv);
    all.append(&mut second_events);

    let req = DeleteRangeRequest {
        key: b"k".to_vec(),
        ..Default::default()
    };
    let del = w.apply(WriteOp::DeleteRange(&req)).unwrap(); // 4
    let e = &del.events[0];
    assert_eq!(e.r#type, EventType::Delete as i32);
    let kv = e.kv.as_ref().unwrap();
    assert_eq!(
        (
            &kv.key[..],
            kv.mod_revision,
            kv.create_revision,
            kv.version,
            kv.value.len()
        ),
        (&b"k"[..], 4, 0, 0, 0),
        "a delete event carries the key and the delete's revision only"
    );
    assert_eq!(e.prev_kv.as_ref().unwrap().value, b"v2");
    assert_eq!(e.prev_kv.as_ref().unwrap().lease, 5);
    all.extend(del.events);

    // Changes that change nothing produce no events.
    assert!(w
        .apply(WriteOp::DeleteRange(&req))
        .unwrap()
        .events
        .is_empty());
    let read_only = w
        .apply(WriteOp::Txn(&TxnRequest {
            success: vec![get_op("k")],
            ..Default::default()
        }))
        .unwrap();
    assert!(read_only.events.is_empty());
    assert_eq!(read_only.revision, 4);

    let t = TxnRequest {
        success: vec![put_op("x", "1"), put_op("y", "1"), put_op("z", "1")],
        ..Default::default()
    };
    let txn = w.apply(WriteOp::Txn(&t)).unwrap(); // 5
    assert_eq!(txn.revision, 5);
    let keys: Vec<&[u8]> = txn
        .events
        .iter()
        .map(|e| &e.kv.as_ref().unwrap().key[..])
        .collect();
    assert_eq!(
        keys,
        [&b"x"[..], b"y", b"z"],
        "sub-revisions follow op order"
    );
    all.extend(txn.events);

    // History replays what the writes returned, with every previous value.
    assert_eq!(s.events_since(2, 100).unwrap(), all);
    assert_eq!(s.events_since(0, 100).unwrap(), all);
    assert_eq!(s.events_since(4, 100).unwrap(), all[2..]);
    // The limit is in whole revisions: one cutting into revision 5 still returns all of it.
    assert_eq!(s.events_since(4, 2).unwrap().len(), 4);
    assert_eq!(s.events_since(2, 1).unwrap(), all[..1]);
    assert!(
        s.events_since(6, 100).unwrap().is_empty(),
        "nothing beyond the newest revision"
    );
}

fn txn_touching_a_key_twice(f: &mut dyn Fixture) {
    let s = f.store();
    let mut w = W::new(s.clone());
    w.put("k", "0"); // 2
    let mut second = put_op("k", "2");
    if let Some(Request::RequestPut(p)) = &mut second.request {
        p.prev_kv = true;
    }
    let t = TxnRequest {
        success: vec![put_op("k", "1"), second],
        ..Default::default()
    };
    let applied = w.apply(WriteOp::Txn(&t)).unwrap(); // 3
    let WriteResponse::Txn(r) = &applied.response else {
        panic!()
    };
    let Some(Response::ResponsePut(p)) = &r.responses[1].response else {
        panic!()
    };
    assert_eq!(
        p.prev_kv.as_ref().unwrap().value,
        b"1",
        "the response sees the txn's own write"
    );
    let versions: Vec<i64> = applied
        .events
        .iter()
        .map(|e| e.kv.as_ref().unwrap().version)
        .collect();
    assert_eq!(versions, [2, 3]);
    // A watcher's previous value is the one at the revision before the event's ("0"), not
    // the "1" the second put's response carries. Neither put read it for its event.
    assert!(applied.events.iter().all(|e| e.prev_kv.is_none()));
    let history = s.events_since(3, 10).unwrap();
    for (h, e) in history.iter().zip(&applied.events) {
        assert_eq!(h.kv, e.kv);
        assert_eq!(h.prev_kv.as_ref().unwrap().value, b"0");
    }
    let kv = &get(&s, "k", 0).unwrap().kvs[0];
    assert_eq!(
        (&kv.value[..], kv.version, kv.create_revision),
        (&b"2"[..], 3, 2)
    );
}

fn txn_checks_like_etcd(f: &mut dyn Fixture) {
    let s = f.store();
    let mut w = W::new(s.clone());
    let bad = PutRequest {
        key: b"missing".to_vec(),
        ignore_value: true,
        lease: 9,
        ..Default::default()
    };
    assert!(
        matches!(w.apply(WriteOp::Put(&bad)), Err(MvccError::LeaseNotFound)),
        "a plain put checks its lease first"
    );
    let txn_of = |ops: Vec<RequestOp>| TxnRequest {
        success: ops,
        ..Default::default()
    };
    let put_req = |p: PutRequest| RequestOp {
        request: Some(Request::RequestPut(p)),
    };
    let range_at = |k: &str, revision| RequestOp {
        request: Some(Request::RequestRange(RangeRequest {
            key: k.into(),
            revision,
            ..Default::default()
        })),
    };
    let t = txn_of(vec![put_req(bad.clone())]);
    assert!(
        matches!(w.apply(WriteOp::Txn(&t)), Err(MvccError::KeyNotFound)),
        "inside a txn the missing key is reported first"
    );
    w.put("a", "1"); // 2
    let leased = PutRequest {
        key: b"b".to_vec(),
        lease: 9,
        ..Default::default()
    };
    let t = txn_of(vec![range_at("a", 99), put_req(leased.clone())]);
    assert!(
        matches!(w.apply(WriteOp::Txn(&t)), Err(MvccError::LeaseNotFound)),
        "every put is checked before any range"
    );
    let t = txn_of(vec![range_at("a", 3)]);
    assert!(matches!(
        w.apply(WriteOp::Txn(&t)),
        Err(MvccError::FutureRevision)
    ));
    let nested = txn_of(vec![
        put_op("c", "1"),
        RequestOp {
            request: Some(Request::RequestTxn(txn_of(vec![put_req(leased)]))),
        },
    ]);
    assert!(matches!(
        w.apply(WriteOp::Txn(&nested)),
        Err(MvccError::LeaseNotFound)
    ));
    assert!(
        get(&s, "c", 0).unwrap().kvs.is_empty(),
        "a failed txn writes nothing"
    );
    assert_eq!(s.current_revision(), 2);

    w.put("a", "2"); // 3
    w.compact(3).unwrap().compaction.unwrap().wait_blocking();
    let t = txn_of(vec![range_at("a", 2)]);
    assert!(matches!(
        w.apply(WriteOp::Txn(&t)),
        Err(MvccError::Compacted)
    ));
    let r = w.txn(&txn_of(vec![range_at("a", 3)]));
    let Some(Response::ResponseRange(got)) = &r.responses[0].response else {
        panic!()
    };
    assert_eq!(got.kvs[0].value, b"2");
}

fn replay_and_failures_survive_reopen(f: &mut dyn Fixture) {
    let s = f.store();
    let mut w = W::new(s.clone());
    let a = PutRequest {
        key: b"a".to_vec(),
        value: b"1".to_vec(),
        ..Default::default()
    };
    s.apply(1, WriteOp::Put(&a), NO_LEASES).unwrap(); // rev 2
    let t = TxnRequest {
        success: vec![put_op("b", "1")],
        ..Default::default()
    };
    s.apply(2, WriteOp::Txn(&t), NO_LEASES).unwrap(); // rev 3
    let c = CompactionRequest {
        revision: 3,
        physical: true,
    };
    s.apply(3, WriteOp::Compact(&c), NO_LEASES)
        .unwrap()
        .compaction
        .unwrap()
        .wait_blocking();
    for (index, op) in [
        (1, WriteOp::Put(&a)),
        (2, WriteOp::Txn(&t)),
        (3, WriteOp::Compact(&c)),
    ] {
        let again = s.apply(index, op, NO_LEASES).unwrap();
        assert!(matches!(again.response, WriteResponse::None));
        assert!(again.events.is_empty() && again.compaction.is_none());
        assert_eq!(again.revision, 3);
    }
    let leased = PutRequest {
        key: b"q".to_vec(),
        lease: 9,
        ..Default::default()
    };
    assert!(s.apply(4, WriteOp::Put(&leased), NO_LEASES).is_err());
    assert_eq!(
        s.applied_index(),
        4,
        "a failed request still counts as applied"
    );
    drop((w, s));

    let s = f.reopen();
    assert_eq!(s.applied_index(), 4);
    assert_eq!(s.current_revision(), 3);
    let replay = s.apply(4, WriteOp::Put(&a), NO_LEASES).unwrap();
    assert!(matches!(replay.response, WriteResponse::None));
    w = W::new(s.clone());
    assert_eq!(w.put("a", "2").header.unwrap().revision, 4);
    assert_eq!(s.applied_index(), 5);
}

fn engine_delete_range_and_flush(f: &mut dyn Fixture) {
    let s = f.store();
    let e = s.shared.engine.clone();
    let mut b = WriteBatch::default();
    for i in 1..=5u8 {
        b.put(format!("z/{i}"), vec![i]);
    }
    e.write(b).unwrap();
    let mut b = WriteBatch::default();
    b.delete_range(b"z/2".to_vec(), b"z/4".to_vec());
    b.put(b"z/6".to_vec(), vec![6]);
    e.write(b).unwrap();
    e.flush().unwrap();
    let scan = |e: &dyn KvEngine| {
        let mut keys = Vec::new();
        e.scan(b"z/", b"z0", &mut |k, _| {
            keys.push(String::from_utf8(k.to_vec()).unwrap());
            true
        })
        .unwrap();
        keys
    };
    assert_eq!(scan(&*e), ["z/1", "z/4", "z/5", "z/6"]);
    drop((s, e));
    let s = f.reopen();
    assert_eq!(scan(&*s.shared.engine), ["z/1", "z/4", "z/5", "z/6"]);
    assert_eq!(
        s.current_revision(),
        1,
        "keys outside the revision space are not revisions"
    );
}

fn range_limits_and_filters(f: &mut dyn Fixture) {
    let s = f.store();
    let mut w = W::new(s.clone());
    for (k, v) in [("a", "3"), ("b", "2"), ("c", "1"), ("d", "0")] {
        w.put(k, v); // 2..=5
    }
    w.del("d", ""); // 6
    let req = RangeRequest {
        key: b"a".to_vec(),
        range_end: vec![0],
        ..Default::default()
    };
    let r = s
        .range(&RangeRequest {
            limit: i64::MAX,
            ..req.clone()
        })
        .unwrap();
    assert_eq!((r.kvs.len(), r.more, r.count), (3, false, 3));
    let r = s
        .range(&RangeRequest {
            limit: -1,
            ..req.clone()
        })
        .unwrap();
    assert_eq!(
        (r.kvs.len(), r.more),
        (3, false),
        "a negative limit means none"
    );
    // Filters apply before the limit; `more` says whether filtered results were cut.
    let r = s
        .range(&RangeRequest {
            min_mod_revision: 3,
            limit: 1,
            ..req.clone()
        })
        .unwrap();
    assert_eq!(
        (keys(&r), r.more, r.count),
        (vec!["b".to_string()], true, 3)
    );
    let r = s
        .range(&RangeRequest {
            max_create_revision: 2,
            limit: 1,
            ..req.clone()
        })
        .unwrap();
    assert_eq!((keys(&r), r.more), (vec!["a".to_string()], false));
    // Sorting happens before the limit.
    let r = s
        .range(&RangeRequest {
            sort_target: SortTarget::Value as i32,
            limit: 2,
            ..req.clone()
        })
        .unwrap();
    assert_eq!(
        (keys(&r), r.more),
        (vec!["c".to_string(), "b".to_string()], true)
    );
    // count_only ignores the limit and returns no kvs.
    let r = s
        .range(&RangeRequest {
            count_only: true,
            limit: 1,
            ..req.clone()
        })
        .unwrap();
    assert_eq!((r.kvs.len(), r.count, r.more), (0, 3, false));
    // A historic read with a limit: the deleted key is back, the header is current.
    let r = s
        .range(&RangeRequest {
            revision: 5,
            limit: 3,
            ..req.clone()
        })
        .unwrap();
    assert_eq!(
        (keys(&r), r.more, r.count),
        (vec!["a".into(), "b".into(), "c".into()], true, 4)
    );
    assert_eq!(rev_of(&r), 6);
    // keys_only with a value sort still sorts by the value.
    let r = s
        .range(&RangeRequest {
            keys_only: true,
            sort_target: SortTarget::Value as i32,
            sort_order: SortOrder::Descend as i32,
            ..req.clone()
        })
        .unwrap();
    assert_eq!(keys(&r), ["a", "b", "c"]);
    assert!(r.kvs.iter().all(|kv| kv.value.is_empty()));
}

/// Fails physical-compaction batches (the only writes made of deletes alone) on demand, and
/// runs a hook right after every write.
#[derive(Default)]
struct Gate {
    fail_deletes: std::sync::atomic::AtomicBool,
    hook: std::sync::Mutex<Option<Box<dyn FnMut() + Send>>>,
}

type Gated = engine::ObservedEngine<Gate>;

fn gated(inner: Arc<dyn KvEngine>) -> Arc<Gated> {
    Arc::new(engine::ObservedEngine::new(inner, Gate::default()))
}

impl Gate {
    fn fail_deletes(&self, on: bool) {
        self.fail_deletes.store(on, Ordering::SeqCst);
    }
}

impl engine::WriteObserver for Gate {
    fn before_write(&self, batch: &WriteBatch) -> Result<(), EngineError> {
        let deletes_only = !batch.is_empty()
            && batch
                .ops
                .iter()
                .all(|op| matches!(op, engine::BatchOp::Delete(_)));
        if deletes_only && self.fail_deletes.load(Ordering::SeqCst) {
            return Err(EngineError::Other("injected failure".into()));
        }
        Ok(())
    }
    fn after_write(&self) {
        if let Some(hook) = self.hook.lock().unwrap().as_mut() {
            hook();
        }
    }
}

fn failed_physical_compaction(inner: Arc<dyn KvEngine>) {
    let g = gated(inner);
    let s = MvccStore::open(g.clone()).unwrap();
    let mut w = W::new(s.clone());
    w.put("a", "1"); // 2
    w.put("a", "2"); // 3
    w.put("b", "1"); // 4
    w.del("b", ""); // 5
    w.put("c", "1"); // 6
    g.observer().fail_deletes(true);
    w.compact(5).unwrap().compaction.unwrap().wait_blocking();
    assert_eq!(stored_mains(&*g), [2, 3, 4, 5, 6], "nothing was deleted");
    assert_eq!(finished_compaction(&*g), None);
    // Reads and hashes do not depend on how far physical deletion got.
    assert!(matches!(get(&s, "a", 4), Err(MvccError::Compacted)));
    assert_eq!(get(&s, "a", 5).unwrap().kvs[0].value, b"2");
    assert_eq!(s.events_since(5, 10).unwrap().len(), 1);
    let pending_hash = s.hash_kv(0).unwrap();
    g.observer().fail_deletes(false);
    drop((w, s));

    let s = MvccStore::open(g.clone()).unwrap();
    wait_until("the redone compaction", || {
        finished_compaction(&*g) == Some(5)
    });
    assert_eq!(stored_mains(&*g), [3, 6]);
    assert_eq!(s.hash_kv(0).unwrap(), pending_hash);

    // After a failure no later compaction is recorded as finished, so the next open redoes
    // the latest one and with it what the failed one left behind.
    let mut w = W::new(s.clone());
    w.put("a", "3"); // 7
    g.observer().fail_deletes(true);
    w.compact(7).unwrap().compaction.unwrap().wait_blocking(); // would drop a@3
    g.observer().fail_deletes(false);
    w.put("a", "4"); // 8
    w.compact(8).unwrap().compaction.unwrap().wait_blocking(); // would drop a@7
    assert_eq!(finished_compaction(&*g), Some(5));
    drop((w, s));
    let s = MvccStore::open(g.clone()).unwrap();
    wait_until("the latest compaction", || {
        finished_compaction(&*g) == Some(8)
    });
    assert_eq!(stored_mains(&*g), [6, 8]);
    assert_eq!(get(&s, "a", 0).unwrap().kvs[0].value, b"4");
}

fn events_since_stays_within_the_visible_revision(inner: Arc<dyn KvEngine>) {
    let g = gated(inner);
    let s = MvccStore::open(g.clone()).unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let (s, seen) = (s.clone(), seen.clone());
        // Runs after a write reached the engine and before the index shows it.
        *g.observer().hook.lock().unwrap() = Some(Box::new(move || {
            let current = s.current_revision();
            let newest = s
                .events_since(1, 1000)
                .unwrap()
                .iter()
                .map(|e| e.kv.as_ref().unwrap().mod_revision)
                .max();
            seen.lock().unwrap().push((current, newest));
        }));
    }
    let mut w = W::new(s.clone());
    w.put("a", "1");
    w.put("b", "1");
    w.del("a", "");
    *g.observer().hook.lock().unwrap() = None; // the hook holds the store: let it go
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 3);
    for (current, newest) in seen.iter() {
        assert!(
            newest.is_none_or(|n| n <= *current),
            "history returned revision {newest:?} while the store is at {current}"
        );
    }
    assert_eq!(s.events_since(1, 1000).unwrap().len(), 3);
}

#[test]
fn failed_physical_compaction_mem() {
    failed_physical_compaction(Arc::new(MemEngine::default()));
}

#[test]
fn failed_physical_compaction_rocks() {
    let d = tempfile::tempdir().unwrap();
    failed_physical_compaction(Arc::new(RocksEngine::open(d.path()).unwrap()));
}

#[test]
fn events_since_stays_within_the_visible_revision_mem() {
    events_since_stays_within_the_visible_revision(Arc::new(MemEngine::default()));
}

#[test]
fn events_since_stays_within_the_visible_revision_rocks() {
    let d = tempfile::tempdir().unwrap();
    events_since_stays_within_the_visible_revision(Arc::new(RocksEngine::open(d.path()).unwrap()));
}

/// Readers racing the writer: a range's header revision is never older than the data it
/// returns, and a txn's changes are seen all together or not at all.
#[test]
fn readers_see_whole_revisions_under_concurrent_writes() {
    let s = MvccStore::open(Arc::new(MemEngine::default())).unwrap();
    let writer = {
        let s = s.clone();
        std::thread::spawn(move || {
            let mut w = W::new(s);
            for i in 0..10_000 {
                let v = i.to_string();
                w.txn(&TxnRequest {
                    success: vec![put_op("x", &v), put_op("y", &v)],
                    ..Default::default()
                });
            }
        })
    };
    let both = RangeRequest {
        key: b"x".to_vec(),
        range_end: b"z".to_vec(),
        ..Default::default()
    };
    let mut reads = 0;
    while !writer.is_finished() {
        let r = s.range(&both).unwrap();
        if let [x, y] = &r.kvs[..] {
            assert_eq!(x.value, y.value, "half a txn seen");
            assert!(x.mod_revision <= rev_of(&r), "data newer than the header");
        } else {
            assert!(r.kvs.is_empty(), "half a txn seen");
        }
        reads += 1;
    }
    writer.join().unwrap();
    assert!(reads > 0);
}

/// A member far behind receives another member's export and must then answer exactly as the
/// source does: same keys, history, revision, compaction point, applied index and hash.
fn export_then_install_elsewhere(f: &mut dyn Fixture) {
    let src = f.store();
    let mut w = W::new(src.clone());
    for i in 0..20 {
        w.put(&format!("k{}", i % 7), &format!("v{i}"));
    }
    w.del("k3", "");
    w.compact(10).unwrap().compaction.unwrap().wait_blocking();
    w.put("after", "compaction");
    let mut pairs = Vec::new();
    src.export(&mut |k, v| {
        pairs.push((k.to_vec(), v.to_vec()));
        true
    })
    .unwrap();

    // The receiver has stale data of its own, which must all go.
    let mut dst = rocks();
    let d = dst.store();
    let mut wd = W::new(d.clone());
    wd.put("stale", "x");
    d.install(&mut |sink| {
        for (k, v) in &pairs {
            sink(k, v).map_err(|e| e.to_string())?;
        }
        Ok(())
    })
    .unwrap();
    drop((wd, d));
    for reopen in [false, true] {
        let s = if reopen { dst.reopen() } else { dst.store() };
        assert_eq!(s.applied_index(), src.applied_index());
        assert_eq!(s.current_revision(), src.current_revision());
        assert_eq!(s.compact_revision(), src.compact_revision());
        assert_eq!(s.hash_kv(0).unwrap(), src.hash_kv(0).unwrap());
        assert!(get(&s, "stale", 0).unwrap().kvs.is_empty());
        assert_eq!(keys(&get(&s, "after", 0).unwrap()), ["after"]);
        assert!(matches!(get(&s, "k1", 9), Err(MvccError::Compacted)));
        assert_eq!(get(&s, "k1", 0).unwrap().kvs[0].value, b"v15");
    }
    // Writing goes on from the installed state.
    let s = dst.store();
    let mut wd = W::new(s.clone());
    let r = wd.put("next", "1");
    assert_eq!(rev_of_put(&r), src.current_revision() + 1);
}

/// A transfer that breaks off, or records the engine refuses, leave the store as it was,
/// readable and writable, and a later install still works.
fn failed_install_keeps_the_store(f: &mut dyn Fixture) {
    let source = mem();
    let mut w = W::new(source.store());
    for i in 0..50 {
        w.put(&format!("k{i:02}"), "new");
    }
    let mut pairs = Vec::new();
    source
        .store()
        .export(&mut |k, v| {
            pairs.push((k.to_vec(), v.to_vec()));
            true
        })
        .unwrap();
    let feed = |pairs: &mut dyn Iterator<Item = &(Vec<u8>, Vec<u8>)>,
                sink: &mut RecordSink<'_>|
     -> Result<(), String> {
        for (k, v) in pairs {
            sink(k, v).map_err(|e| e.to_string())?;
        }
        Ok(())
    };

    let d = f.store();
    W::new(d.clone()).put("old", "x");
    let before = (
        d.applied_index(),
        d.current_revision(),
        d.hash_kv(0).unwrap(),
    );
    let broken = d.install(&mut |sink| {
        feed(&mut pairs[..pairs.len() / 2].iter(), sink)?;
        Err("stream ended early".into())
    });
    assert!(
        matches!(broken, Err(MvccError::SnapshotSource(_))),
        "{broken:?}"
    );
    let unordered = d.install(&mut |sink| feed(&mut pairs.iter().rev(), sink));
    assert!(
        matches!(&unordered, Err(MvccError::SnapshotSource(e)) if e.contains("increase")),
        "{unordered:?}"
    );
    drop(d);
    for reopen in [false, true] {
        let s = if reopen { f.reopen() } else { f.store() };
        let now = (
            s.applied_index(),
            s.current_revision(),
            s.hash_kv(0).unwrap(),
        );
        assert_eq!(now, before);
        assert_eq!(get(&s, "old", 0).unwrap().kvs[0].value, b"x");
        assert!(get(&s, "k00", 0).unwrap().kvs.is_empty());
    }
    let d = f.store();
    d.install(&mut |sink| feed(&mut pairs.iter(), sink))
        .unwrap();
    assert_eq!(d.hash_kv(0).unwrap(), source.store().hash_kv(0).unwrap());
    assert!(get(&d, "old", 0).unwrap().kvs.is_empty());
}

/// A run of plain puts applied together answers, records and survives a reopen exactly as
/// the same puts applied one by one: a key written twice in the run, a key deleted before
/// it, one with a lease and one whose lease is missing (fails without a revision).
fn put_run_matches_puts_one_by_one(f: &mut dyn Fixture) {
    let plain = |k: &str, v: &str, lease: i64| PutRequest {
        key: k.into(),
        value: v.into(),
        lease,
        ..Default::default()
    };
    let leases: &dyn Fn(i64) -> bool = &|id| id == 7;
    let run = [
        plain("a", "1", 0),
        plain("b", "1", 7),
        plain("a", "2", 0),
        plain("c", "1", 9),
        plain("gone", "back", 0),
        plain("a", "3", 7),
    ];
    let prepare = |s: &MvccStore| {
        let mut w = W::new(s.clone());
        w.put("a", "0");
        w.put("gone", "x");
        w.del("gone", "");
        w.index
    };

    let one = mem();
    let base = prepare(&one.store());
    let mut singles = Vec::new();
    for (i, p) in run.iter().enumerate() {
        let r = one
            .store()
            .apply(base + 1 + i as u64, WriteOp::Put(p), leases);
        singles.push(r.map(|a| {
            let WriteResponse::Put(resp) = a.response else {
                panic!("{:?}", a.response)
            };
            (resp, a.events)
        }));
    }

    let s = f.store();
    assert_eq!(prepare(&s), base);
    let items: Vec<(u64, &PutRequest)> = run
        .iter()
        .enumerate()
        .map(|(i, p)| (base + 1 + i as u64, p))
        .collect();
    let together = s.apply_puts(&items, leases).unwrap();
    drop(s);
    assert_eq!(together.len(), singles.len());
    for (t, o) in together.iter().zip(&singles) {
        match (t, o) {
            (Ok((resp, event)), Ok((r, events))) => {
                assert_eq!(resp, r);
                assert_eq!(std::slice::from_ref(event), &events[..]);
            }
            (Err(MvccError::LeaseNotFound), Err(MvccError::LeaseNotFound)) => {}
            other => panic!("{other:?}"),
        }
    }
    let expected = one.store();
    for reopen in [false, true] {
        let s = if reopen { f.reopen() } else { f.store() };
        assert_eq!(s.applied_index(), base + run.len() as u64);
        assert_eq!(s.current_revision(), expected.current_revision());
        assert_eq!(s.hash_kv(0).unwrap(), expected.hash_kv(0).unwrap());
        let all = RangeRequest {
            key: vec![0],
            range_end: vec![0],
            ..Default::default()
        };
        assert_eq!(
            s.range(&all).unwrap().kvs,
            expected.range(&all).unwrap().kvs
        );
        assert_eq!(
            s.events_since(1, 1000).unwrap(),
            expected.events_since(1, 1000).unwrap()
        );
    }
}

fn rev_of_put(r: &PutResponse) -> i64 {
    r.header.as_ref().unwrap().revision
}

macro_rules! both_engines {
    ($($name:ident),* $(,)?) => {
        mod mem_engine {
            $( #[test] fn $name() { super::$name(&mut super::mem()); } )*
        }
        mod rocks_engine {
            $( #[test] fn $name() { super::$name(&mut super::rocks()); } )*
        }
    };
}

both_engines!(
    versions_tombstones_and_history,
    compaction,
    compaction_of_everything_keeps_the_revision,
    range_options,
    txn_compare_matrix,
    txn_writes_and_nesting,
    put_flags_and_replay,
    hash_is_stable,
    reopen_mid_compaction,
    compaction_bounds_like_etcd,
    events_content,
    txn_touching_a_key_twice,
    txn_checks_like_etcd,
    replay_and_failures_survive_reopen,
    engine_delete_range_and_flush,
    range_limits_and_filters,
    export_then_install_elsewhere,
    failed_install_keeps_the_store,
    put_run_matches_puts_one_by_one,
);

#[derive(Debug, Clone)]
enum Op {
    Put(u8, u8),
    Del(u8, u8),
    Compact,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..8, any::<u8>()).prop_map(|(k, v)| Op::Put(k, v)),
        2 => (0u8..8, 1u8..4).prop_map(|(k, n)| Op::Del(k, n)),
        1 => Just(Op::Compact),
    ]
}

#[derive(Clone, Debug, PartialEq)]
struct ModelKv {
    create: i64,
    modr: i64,
    version: i64,
    value: Vec<u8>,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn agrees_with_a_simple_model(ops in prop::collection::vec(op(), 1..60)) {
        let s = MvccStore::open(Arc::new(MemEngine::default())).unwrap();
        let mut w = W::new(s.clone());
        let mut model: BTreeMap<Vec<u8>, ModelKv> = BTreeMap::new();
        let mut snapshots: Vec<(i64, BTreeMap<Vec<u8>, ModelKv>)> = vec![(1, model.clone())];
        let mut rev = 1;
        for op in ops {
            match op {
                Op::Put(k, v) => {
                    let key = vec![b'a' + k];
                    rev += 1;
                    let next = match model.get(&key) {
                        Some(m) => ModelKv { create: m.create, modr: rev, version: m.version + 1, value: vec![v] },
                        None => ModelKv { create: rev, modr: rev, version: 1, value: vec![v] },
                    };
                    model.insert(key.clone(), next);
                    let req = PutRequest { key, value: vec![v], ..Default::default() };
                    w.apply(WriteOp::Put(&req)).unwrap();
                }
                Op::Del(k, n) => {
                    let start = vec![b'a' + k];
                    let end = vec![b'a' + k + n];
                    let doomed: Vec<_> = model.range(start.clone()..end.clone()).map(|(k, _)| k.clone()).collect();
                    if !doomed.is_empty() { rev += 1; }
                    for k in &doomed { model.remove(k); }
                    let req = DeleteRangeRequest { key: start, range_end: end, prev_kv: false };
                    w.apply(WriteOp::DeleteRange(&req)).unwrap();
                }
                Op::Compact => {
                    if rev > s.compact_revision() {
                        w.compact(rev).unwrap().compaction.unwrap().wait_blocking();
                        snapshots.retain(|(r, _)| *r >= rev);
                    }
                }
            }
            snapshots.push((rev, model.clone()));
            prop_assert_eq!(s.current_revision(), rev);
        }
        for (at, snap) in snapshots {
            let got = s.range(&RangeRequest { key: vec![0], range_end: vec![0], revision: at, ..Default::default() }).unwrap();
            let got: BTreeMap<Vec<u8>, ModelKv> = got.kvs.into_iter().map(|kv| (kv.key.clone(), ModelKv {
                create: kv.create_revision, modr: kv.mod_revision, version: kv.version, value: kv.value,
            })).collect();
            prop_assert_eq!(got, snap, "at revision {}", at);
        }
    }
}
