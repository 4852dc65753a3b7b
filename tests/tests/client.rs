//! The server under test through the `etcd-client` crate: response fields and gRPC error codes
//! and messages as etcd 3.4 returns them.

mod common;

use std::time::Duration;

use etcd_client::{
    Client, CompactionOptions, Compare, CompareOp, DeleteOptions, Error, GetOptions, PutOptions,
    SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
};
use oxcd_tests::Server;
use tonic::Code;

async fn connect(s: &Server) -> Client {
    common::connect_with(s, Duration::from_secs(10)).await
}

/// The gRPC code and message of a failed call.
#[track_caller]
fn grpc_error<T: std::fmt::Debug>(r: Result<T, Error>) -> (Code, String) {
    match r {
        Err(Error::GRpcStatus(st)) => (st.code(), st.message().to_string()),
        other => panic!("expected a gRPC error status, got {other:?}"),
    }
}

fn rev<H: HasHeader>(r: &H) -> i64 {
    r.rev()
}

trait HasHeader {
    fn rev(&self) -> i64;
}

macro_rules! has_header {
    ($($t:ty),*) => {$(
        impl HasHeader for $t {
            fn rev(&self) -> i64 {
                self.header().expect("response header").revision()
            }
        }
    )*};
}
has_header!(
    etcd_client::PutResponse,
    etcd_client::GetResponse,
    etcd_client::DeleteResponse,
    etcd_client::TxnResponse,
    etcd_client::CompactionResponse
);

fn keys(r: &etcd_client::GetResponse) -> Vec<String> {
    r.kvs()
        .iter()
        .map(|kv| kv.key_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_ranges_and_headers() {
    let s = Server::start();
    let mut c = connect(&s).await;

    let r = c.put("a", "1", None).await.unwrap();
    assert_eq!(rev(&r), 2);
    assert!(r.prev_key().is_none());
    let h = r.header().unwrap();
    assert!(
        h.cluster_id() != 0 && h.member_id() != 0 && h.raft_term() >= 1,
        "{h:?}"
    );

    let r = c
        .put("a", "2", Some(PutOptions::new().with_prev_key()))
        .await
        .unwrap();
    assert_eq!(rev(&r), 3);
    let prev = r.prev_key().expect("prev_kv requested");
    assert_eq!((prev.key(), prev.value()), (&b"a"[..], &b"1"[..]));
    assert_eq!(
        (prev.create_revision(), prev.mod_revision(), prev.version()),
        (2, 2, 1)
    );

    for k in ["p/1", "p/2", "p/3", "q"] {
        c.put(k, format!("val-{k}"), None).await.unwrap();
    }
    let cur = 7;

    let r = c.get("a", None).await.unwrap();
    assert_eq!(rev(&r), cur);
    assert_eq!(r.count(), 1);
    assert!(!r.more());
    let kv = &r.kvs()[0];
    assert_eq!(
        (
            kv.value(),
            kv.create_revision(),
            kv.mod_revision(),
            kv.version()
        ),
        (&b"2"[..], 2, 3, 2)
    );

    let r = c.get("nope", None).await.unwrap();
    assert_eq!((r.count(), r.kvs().len(), rev(&r)), (0, 0, cur));

    let r = c
        .get("p/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(keys(&r), ["p/1", "p/2", "p/3"]);
    assert_eq!(r.count(), 3);

    let r = c
        .get("p/", Some(GetOptions::new().with_prefix().with_limit(2)))
        .await
        .unwrap();
    assert_eq!(keys(&r), ["p/1", "p/2"]);
    assert!(r.more());
    assert_eq!(r.count(), 3);

    let r = c
        .get("p/2", Some(GetOptions::new().with_from_key()))
        .await
        .unwrap();
    assert_eq!(keys(&r), ["p/2", "p/3", "q"]);

    let r = c
        .get("a", Some(GetOptions::new().with_range("p/2")))
        .await
        .unwrap();
    assert_eq!(keys(&r), ["a", "p/1"]);

    let r = c
        .get(
            "",
            Some(
                GetOptions::new()
                    .with_all_keys()
                    .with_sort(SortTarget::Create, SortOrder::Descend),
            ),
        )
        .await
        .unwrap();
    assert_eq!(keys(&r), ["q", "p/3", "p/2", "p/1", "a"]);

    let r = c
        .get(
            "p/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap();
    assert_eq!((r.count(), r.kvs().len()), (3, 0));

    let r = c
        .get("p/", Some(GetOptions::new().with_prefix().with_keys_only()))
        .await
        .unwrap();
    assert_eq!(keys(&r), ["p/1", "p/2", "p/3"]);
    assert!(r.kvs().iter().all(|kv| kv.value().is_empty()));

    // Historic read; the header still reports the current revision.
    let r = c
        .get("a", Some(GetOptions::new().with_revision(2)))
        .await
        .unwrap();
    assert_eq!(r.kvs()[0].value(), b"1");
    assert_eq!(rev(&r), cur);

    let (code, msg) = grpc_error(
        c.get("a", Some(GetOptions::new().with_revision(cur + 1)))
            .await,
    );
    assert_eq!(
        (code, msg.as_str()),
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision"
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_with_prev_kvs() {
    let s = Server::start();
    let mut c = connect(&s).await;
    for k in ["d/1", "d/2", "d/3", "e"] {
        c.put(k, k, None).await.unwrap();
    }
    let r = c.delete("e", None).await.unwrap();
    assert_eq!((r.deleted(), rev(&r)), (1, 6));
    assert!(r.prev_kvs().is_empty(), "prev_kv not requested");

    let r = c.delete("e", None).await.unwrap();
    assert_eq!(
        (r.deleted(), rev(&r)),
        (0, 6),
        "deleting nothing keeps the revision"
    );

    let r = c
        .delete(
            "d/",
            Some(DeleteOptions::new().with_prefix().with_prev_key()),
        )
        .await
        .unwrap();
    assert_eq!((r.deleted(), rev(&r)), (3, 7));
    let prev: Vec<_> = r
        .prev_kvs()
        .iter()
        .map(|kv| kv.key_str().unwrap())
        .collect();
    assert_eq!(prev, ["d/1", "d/2", "d/3"]);
    assert!(r
        .prev_kvs()
        .iter()
        .all(|kv| kv.mod_revision() >= 2 && kv.version() == 1));

    let r = c
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    assert_eq!((r.count(), rev(&r)), (0, 7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_branches_and_responses() {
    let s = Server::start();
    let mut c = connect(&s).await;
    c.put("t1", "v1", None).await.unwrap(); // 2
    c.put("t2", "v2", None).await.unwrap(); // 3

    let txn = Txn::new()
        .when([
            Compare::value("t1", CompareOp::Equal, "v1"),
            Compare::mod_revision("t2", CompareOp::Greater, 2),
            Compare::version("absent", CompareOp::Equal, 0),
        ])
        .and_then([
            TxnOp::put("t3", "v3", Some(PutOptions::new().with_prev_key())),
            TxnOp::get("t1", None),
            TxnOp::delete("t2", Some(DeleteOptions::new().with_prev_key())),
        ])
        .or_else([TxnOp::put("never", "x", None)]);
    let r = c.txn(txn).await.unwrap();
    assert!(r.succeeded());
    assert_eq!(rev(&r), 4, "all writes of one txn share one revision");
    let ops = r.op_responses();
    assert_eq!(ops.len(), 3);
    match &ops[0] {
        TxnOpResponse::Put(p) => assert!(p.prev_key().is_none()),
        other => panic!("{other:?}"),
    }
    match &ops[1] {
        TxnOpResponse::Get(g) => {
            assert_eq!(keys(g), ["t1"]);
            assert_eq!(g.kvs()[0].value(), b"v1");
        }
        other => panic!("{other:?}"),
    }
    match &ops[2] {
        TxnOpResponse::Delete(d) => {
            assert_eq!(d.deleted(), 1);
            assert_eq!(d.prev_kvs()[0].value(), b"v2");
        }
        other => panic!("{other:?}"),
    }
    let r = c.get("t3", None).await.unwrap();
    assert_eq!(r.kvs()[0].mod_revision(), 4);

    // Failing compare: the failure branch runs; a read-only failure branch keeps the revision.
    let r = c
        .txn(
            Txn::new()
                .when([Compare::create_revision("t1", CompareOp::Less, 2)])
                .and_then([TxnOp::put("never", "x", None)])
                .or_else([TxnOp::get("t", Some(GetOptions::new().with_prefix()))]),
        )
        .await
        .unwrap();
    assert!(!r.succeeded());
    assert_eq!(rev(&r), 4);
    match &r.op_responses()[0] {
        TxnOpResponse::Get(g) => assert_eq!(keys(g), ["t1", "t3"]),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.get("never", None).await.unwrap().count(), 0);

    // Nested txn.
    let inner = Txn::new().and_then([TxnOp::put("nested", "n", None)]);
    let r = c
        .txn(Txn::new().and_then([TxnOp::txn(inner)]))
        .await
        .unwrap();
    assert!(r.succeeded());
    assert_eq!(rev(&r), 5);
    match &r.op_responses()[0] {
        TxnOpResponse::Txn(t) => assert!(t.succeeded()),
        other => panic!("{other:?}"),
    }

    let (code, msg) = grpc_error(
        c.txn(Txn::new().and_then([TxnOp::put("dup", "1", None), TxnOp::put("dup", "2", None)]))
            .await,
    );
    assert_eq!(
        (code, msg.as_str()),
        (
            Code::InvalidArgument,
            "etcdserver: duplicate key given in txn request"
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_errors_and_history() {
    let s = Server::start();
    let mut c = connect(&s).await;
    for v in ["a", "b", "c", "d"] {
        c.put("k", v, None).await.unwrap(); // revs 2..=5
    }
    let r = c.compact(3, None).await.unwrap();
    assert_eq!(rev(&r), 5);
    let (code, msg) = grpc_error(c.get("k", Some(GetOptions::new().with_revision(2))).await);
    assert_eq!(
        (code, msg.as_str()),
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted"
        )
    );
    let r = c
        .get("k", Some(GetOptions::new().with_revision(3)))
        .await
        .unwrap();
    assert_eq!(r.kvs()[0].value(), b"b");

    let (code, msg) = grpc_error(c.compact(2, None).await);
    assert_eq!(
        (code, msg.as_str()),
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted"
        )
    );
    let (code, msg) = grpc_error(c.compact(6, None).await);
    assert_eq!(
        (code, msg.as_str()),
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision"
        )
    );

    let r = c
        .compact(5, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();
    assert_eq!(rev(&r), 5);
    let r = c.get("k", None).await.unwrap();
    assert_eq!((r.kvs()[0].value(), r.kvs()[0].version()), (&b"d"[..], 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_give_etcd_codes_and_messages() {
    let s = Server::start_with(&["--max-request-bytes", "1024", "--max-txn-ops", "2"]);
    let mut c = connect(&s).await;
    let expect = |r: (Code, String), code: Code, msg: &str| {
        assert_eq!((r.0, r.1.as_str()), (code, msg));
    };
    expect(
        grpc_error(c.put("", "v", None).await),
        Code::InvalidArgument,
        "etcdserver: key is not provided",
    );
    expect(
        grpc_error(c.get("", None).await),
        Code::InvalidArgument,
        "etcdserver: key is not provided",
    );
    expect(
        grpc_error(c.delete("", None).await),
        Code::InvalidArgument,
        "etcdserver: key is not provided",
    );
    expect(
        grpc_error(c.put("big", vec![b'x'; 2000], None).await),
        Code::InvalidArgument,
        "etcdserver: request is too large",
    );
    let ops = |n: usize| {
        (0..n)
            .map(|i| TxnOp::put(format!("k{i}"), "v", None))
            .collect::<Vec<_>>()
    };
    expect(
        grpc_error(c.txn(Txn::new().and_then(ops(3))).await),
        Code::InvalidArgument,
        "etcdserver: too many operations in txn request",
    );
    expect(
        grpc_error(c.txn(Txn::new().or_else(ops(3))).await),
        Code::InvalidArgument,
        "etcdserver: too many operations in txn request",
    );
    expect(
        grpc_error(
            c.txn(Txn::new().and_then([
                TxnOp::put("x/1", "v", None),
                TxnOp::delete("x/", Some(DeleteOptions::new().with_prefix())),
            ]))
            .await,
        ),
        Code::InvalidArgument,
        "etcdserver: duplicate key given in txn request",
    );
    // Nothing above was applied.
    let r = c
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    assert_eq!((r.count(), rev(&r)), (0, 1));
    // Within the limits all is fine.
    let r = c.txn(Txn::new().and_then(ops(2))).await.unwrap();
    assert!(r.succeeded());
    assert_eq!(rev(&r), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_and_cluster_calls() {
    let s = Server::start();
    let mut c = connect(&s).await;
    c.put("x", "y", None).await.unwrap();
    let st = c.status().await.unwrap();
    let h = st.header().unwrap();
    assert_eq!(h.revision(), 2);
    assert_eq!(st.leader(), h.member_id());
    assert!(st.version().starts_with("3."), "{}", st.version());
    assert!(st.raft_index() >= st.raft_term());
    assert!(st.db_size() > 0);

    let ml = c.member_list().await.unwrap();
    assert_eq!(ml.members().len(), 1);
    let m = &ml.members()[0];
    assert_eq!(m.name(), "node1");
    assert_eq!(m.id(), ml.header().unwrap().member_id());
    assert_eq!(m.peer_urls(), [s.spec().peer_url()]);
    assert_eq!(m.client_urls(), [s.client_url()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_not_served_is_unimplemented_with_its_name() {
    if oxcd_tests::server_is_etcd() {
        eprintln!("skipped: etcd serves Auth");
        return;
    }
    let s = Server::start();
    let mut c = connect(&s).await;
    let (code, msg) = grpc_error(c.user_list().await);
    assert_eq!(code, Code::Unimplemented);
    assert_eq!(msg, "unknown service etcdserverpb.Auth");
    // The connection still serves everything else.
    c.put("after", "v", None).await.unwrap();
}
