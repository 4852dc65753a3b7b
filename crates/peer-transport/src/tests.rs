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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = RaftPeerServer::new(RaftPeerService::new(me, cluster_id, tx, Arc::new(Vec::new)));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (format!("http://{addr}"), rx)
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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let svc = RaftPeerService::new(2, 7, tx, Arc::new(Vec::new)).with_hashes(Arc::new(FakeHashes));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RaftPeerServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
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
