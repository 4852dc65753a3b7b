use std::sync::Arc;
use std::time::Duration;

use oxcd_proto::oxcdpeerpb::raft_peer_server::RaftPeerServer;
use raft::prelude::MessageType;
use raft_node::{RaftCommand, Transport};
use tokio::sync::mpsc;

use super::*;

type Cmd = RaftCommand<()>;

/// Serves `RaftPeerService` for member `me` on a loopback port; returns its URL and the raft
/// command channel it feeds.
async fn serve(me: u64, cluster_id: u64) -> (String, mpsc::Receiver<Cmd>) {
    let (tx, rx) = mpsc::channel(1024);
    let url = serve_service(RaftPeerService::new(me, cluster_id, tx, Arc::new(Vec::new))).await;
    (url, rx)
}

/// Serves `svc` on a loopback port; returns its URL.
async fn serve_service(svc: RaftPeerService<()>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RaftPeerServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

fn msg(from: u64, to: u64, index: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgHeartbeat);
    m.from = from;
    m.to = to;
    m.index = index;
    m
}

async fn next_step(rx: &mut mpsc::Receiver<Cmd>) -> Option<Message> {
    match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
        Ok(Some(RaftCommand::Step(m))) => Some(*m),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_arrive_in_order_on_one_stream() {
    let (url, mut rx) = serve(2, 7).await;
    let book = AddressBook::new();
    book.set(2, vec![url]);
    let mut t = PeerTransport::new(1, 7, book, tokio::runtime::Handle::current());
    t.send((1..=500).map(|i| msg(1, 2, i)).collect());
    for i in 1..=500 {
        let m = next_step(&mut rx).await.expect("message not delivered");
        assert_eq!((m.from, m.to, m.index), (1, 2, i));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_cluster_is_refused() {
    let (url, mut rx) = serve(2, 7).await;
    let book = AddressBook::new();
    book.set(2, vec![url]);
    let mut t = PeerTransport::new(1, 8, book, tokio::runtime::Handle::current());
    t.send(vec![msg(1, 2, 1)]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    t.send(vec![msg(1, 2, 2)]);
    assert!(
        tokio::time::timeout(Duration::from_millis(700), rx.recv())
            .await
            .is_err(),
        "a message from another cluster reached raft"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_comes_back_is_reached_again() {
    // Reserve a port, leave it closed: the first sends find nobody.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let book = AddressBook::new();
    book.set(2, vec![format!("http://127.0.0.1:{port}")]);
    let mut t = PeerTransport::new(1, 7, book, tokio::runtime::Handle::current());
    t.send(vec![msg(1, 2, 1)]);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (tx, mut rx) = mpsc::channel(16);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RaftPeerServer::new(RaftPeerService::<()>::new(
                2,
                7,
                tx,
                Arc::new(Vec::new),
            )))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    // raft resends; so does this test, until one gets through after the backoff.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut i = 2;
    loop {
        t.send(vec![msg(1, 2, i)]);
        if let Ok(Some(RaftCommand::Step(m))) =
            tokio::time::timeout(Duration::from_millis(100), rx.recv()).await
        {
            assert_eq!(m.from, 1);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "peer never reached");
        i += 1;
    }
}

#[test]
fn message_encoding_round_trips() {
    let mut m = msg(3, 4, 99);
    m.term = 5;
    m.commit = 42;
    let back = decode_message(&encode_message(&m)).unwrap();
    assert_eq!(back, m);
    assert!(decode_message(&[0xff, 0xff, 0xff]).is_err());
}

/// Hashes as a store at revision 10, compacted at 4, would give them.
struct FakeHashes;

impl HashSource for FakeHashes {
    fn hash_kv(&self, revision: i64) -> Result<(u32, i64, i64), HashKvError> {
        match revision {
            0 => Ok((1000, 4, 10)),
            r if r <= 4 => Err(HashKvError::Compacted),
            r if r > 10 => Err(HashKvError::FutureRevision),
            r => Ok((1000 + r as u32, 4, r)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_kv_answers_members_of_the_cluster_only() {
    let (tx, _rx) = mpsc::channel::<Cmd>(16);
    let url = serve_service(
        RaftPeerService::new(2, 7, tx, Arc::new(Vec::new)).with_hashes(Arc::new(FakeHashes)),
    )
    .await;
    let book = AddressBook::new();
    book.set(2, vec![url]);
    let header = |cluster_id, to| PeerHeader {
        cluster_id,
        from: 1,
        to,
    };
    let t = Duration::from_secs(5);

    let r = fetch_hash_kv(&book, header(7, 2), 7, t).await.unwrap();
    assert_eq!((r.hash, r.compact_revision, r.hash_revision), (1007, 4, 7));
    let h = r.header.unwrap();
    assert_eq!((h.member_id, h.cluster_id, h.revision), (2, 7, 7));
    let newest = fetch_hash_kv(&book, header(7, 2), 0, t).await.unwrap();
    assert_eq!(newest.header.unwrap().revision, 10);

    assert_eq!(
        fetch_hash_kv(&book, header(7, 2), 3, t).await,
        Err(HashKvError::Compacted)
    );
    assert_eq!(
        fetch_hash_kv(&book, header(7, 2), 11, t).await,
        Err(HashKvError::FutureRevision)
    );
    // Another cluster, or a request meant for another member, is refused.
    for refused in [header(8, 2), header(7, 3)] {
        book.set(refused.to, book.get(2).unwrap());
        match fetch_hash_kv(&book, refused, 7, t).await {
            Err(HashKvError::Failed(m)) => {
                assert!(m.contains("mismatch") || m.contains("reached"), "{m}")
            }
            other => panic!("{refused:?} answered: {other:?}"),
        }
    }
    // A member nobody listens for fails within the timeout.
    assert!(matches!(
        fetch_hash_kv(&book, header(7, 9), 7, t).await,
        Err(HashKvError::Failed(_))
    ));
}

/// Exports `records` records of 1 KiB; after `gate_after` of them it waits (up to 5 s) until
/// the receiver stored one, and fails after `fail_after`.
struct FakeSnapshots {
    records: u64,
    gate_after: u64,
    fail_after: Option<u64>,
    received: Arc<std::sync::atomic::AtomicU64>,
}

impl SnapshotSource for FakeSnapshots {
    fn applied(&self) -> u64 {
        10
    }

    fn export(&self, f: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), String> {
        let value = vec![7u8; 1024];
        for i in 0..self.records {
            if Some(i) == self.fail_after {
                return Err("disk on fire".into());
            }
            if i == self.gate_after {
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while self.received.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                    if std::time::Instant::now() > deadline {
                        return Err("receiver stored nothing before the end".into());
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            if !f(&i.to_be_bytes(), &value) {
                return Ok(());
            }
        }
        Ok(())
    }
}

async fn serve_snapshots(source: FakeSnapshots) -> AddressBook {
    let (tx, _rx) = mpsc::channel::<Cmd>(16);
    let url = serve_service(
        RaftPeerService::new(2, 7, tx, Arc::new(Vec::new)).with_snapshots(Arc::new(source)),
    )
    .await;
    let book = AddressBook::new();
    book.set(2, vec![url]);
    book
}

const SNAPSHOT_HEADER: PeerHeader = PeerHeader {
    cluster_id: 7,
    from: 1,
    to: 2,
};

/// Records reach the sink in order while the sender is still exporting: the sender waits
/// for the first one to be stored after more chunks than the transfer buffers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_records_are_handed_on_as_chunks_arrive() {
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let book = serve_snapshots(FakeSnapshots {
        records: 20_000,
        gate_after: 12_000,
        fail_after: None,
        received: received.clone(),
    })
    .await;
    let mut next = 0u64;
    let n = fetch_snapshot(&book, SNAPSHOT_HEADER, 10, &mut |k, v| {
        assert_eq!(k, next.to_be_bytes());
        assert_eq!(v.len(), 1024);
        next += 1;
        received.store(next, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!((n, next), (20_000, 20_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_sink_or_sender_fails_the_fetch() {
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let book = serve_snapshots(FakeSnapshots {
        records: 5_000,
        gate_after: u64::MAX,
        fail_after: None,
        received: received.clone(),
    })
    .await;
    let mut stored = 0;
    let err = fetch_snapshot(&book, SNAPSHOT_HEADER, 10, &mut |_, _| {
        stored += 1;
        if stored == 1500 {
            return Err("no space".into());
        }
        Ok(())
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("no space"), "{err}");
    assert_eq!(stored, 1500, "records went on after the sink failed");

    let book = serve_snapshots(FakeSnapshots {
        records: 5_000,
        gate_after: u64::MAX,
        fail_after: Some(3_000),
        received,
    })
    .await;
    let mut stored = 0;
    let err = fetch_snapshot(&book, SNAPSHOT_HEADER, 10, &mut |_, _| {
        stored += 1;
        Ok(())
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("disk on fire"), "{err}");
    assert!(stored < 3_000);
}

#[test]
fn records_parse_back_and_truncation_is_refused() {
    let mut buf = Vec::new();
    put_record(&mut buf, b"k1", b"v1");
    put_record(&mut buf, b"", b"");
    put_record(&mut buf, b"k3", &[9; 300]);
    let mut got = Vec::new();
    let n = parse_records(&buf, &mut |k, v| {
        got.push((k.to_vec(), v.to_vec()));
        Ok(())
    })
    .unwrap();
    assert_eq!(n, 3);
    assert_eq!(
        got,
        [
            (b"k1".to_vec(), b"v1".to_vec()),
            (vec![], vec![]),
            (b"k3".to_vec(), vec![9; 300])
        ]
    );
    for cut in [1, 5, buf.len() - 1] {
        assert!(parse_records(&buf[..cut], &mut |_, _| Ok(())).is_err());
    }
}
