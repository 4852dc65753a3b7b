//! peer-transport: raft messages between oxcd members over gRPC.
//!
//! Writes: every raft `Message` that raft-node hands to [`PeerTransport::send`] goes into the
//! addressee's bounded queue; one task per peer drains it onto a long-lived client stream
//! (`oxcdpeerpb.RaftPeer/Stream`), batching what is queued, and reconnects with backoff when
//! the stream breaks. Reads: [`RaftPeerService`] accepts those streams from other members and
//! hands each message to raft-node's command channel as `RaftCommand::Step`. Beside the
//! stream, members ask each other for their member list, whole-state snapshots and hashes of
//! their key-value history (for the corruption checks).
//!
//! Raft tolerates lost messages (it retries), so a full queue or a dead peer drops messages
//! instead of blocking the Ready loop. Every stream opens with a header naming the cluster; a
//! member of another cluster is refused before any message reaches raft.

mod address;
mod hash;
mod service;
mod snapshot;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use oxcd_proto::oxcdpeerpb::raft_peer_client::RaftPeerClient;
use oxcd_proto::oxcdpeerpb::{MembersRequest, PeerHeader, RaftBatch};
use protobuf::Message as _;
use raft_node::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

pub use address::AddressBook;
pub use hash::{fetch_hash_kv, HashKvError, HashSource};
pub use service::{MemberSource, RaftPeerService};
pub use snapshot::{fetch_snapshot, parse_records, put_record, SnapshotSource};

#[derive(thiserror::Error, Debug)]
pub enum TransportError {
    #[error("peer {0:x} has no known address")]
    NoAddress(u64),
    #[error("connect to {url}: {source}")]
    Connect {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("bad peer url {0}")]
    BadUrl(String),
    #[error("snapshot transfer: {0}")]
    Snapshot(String),
}

/// Messages waiting for one peer. Beyond this, raft's own retries are cheaper than memory.
const PEER_QUEUE: usize = 4096;
/// Messages per gRPC frame at most: keeps one frame well under the decoder's size limit.
const MAX_BATCH: usize = 256;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Encodes a raft message as raft-rs's protobuf.
pub fn encode_message(m: &Message) -> Vec<u8> {
    m.write_to_bytes()
        .expect("encoding a raft message cannot fail")
}

pub fn decode_message(bytes: &[u8]) -> Result<Message, protobuf::ProtobufError> {
    let mut m = Message::default();
    m.merge_from_bytes(bytes)?;
    Ok(m)
}

/// raft-node's `Transport` over gRPC: owns one sender task per peer.
pub struct PeerTransport {
    me: u64,
    cluster_id: u64,
    book: AddressBook,
    rt: tokio::runtime::Handle,
    peers: HashMap<u64, mpsc::Sender<Message>>,
}

impl PeerTransport {
    /// `rt` runs the per-peer tasks; the Ready loop that calls `send` is not async.
    pub fn new(me: u64, cluster_id: u64, book: AddressBook, rt: tokio::runtime::Handle) -> Self {
        PeerTransport {
            me,
            cluster_id,
            book,
            rt,
            peers: HashMap::new(),
        }
    }

    fn queue(&mut self, to: u64) -> &mpsc::Sender<Message> {
        let (me, cluster_id, book, rt) = (self.me, self.cluster_id, &self.book, &self.rt);
        let tx = self.peers.entry(to).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(PEER_QUEUE);
            rt.spawn(run_peer(
                PeerHeader {
                    cluster_id,
                    from: me,
                    to,
                },
                book.clone(),
                rx,
            ));
            tx
        });
        if tx.is_closed() {
            // The task ended (the peer was removed); a later message starts a new one.
            self.peers.remove(&to);
            return self.queue(to);
        }
        &self.peers[&to]
    }
}

impl raft_node::Transport for PeerTransport {
    fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            if m.to == self.me {
                continue;
            }
            let to = m.to;
            if self.queue(to).try_send(m).is_err() {
                metrics::counter!("etcd_network_peer_sent_failures_total", "To" => format!("{to:x}"))
                    .increment(1);
            }
        }
    }
}

/// One peer's sender: connect, stream batches until the stream breaks, back off, repeat. Ends
/// when the transport drops its queue.
async fn run_peer(header: PeerHeader, book: AddressBook, mut rx: mpsc::Receiver<Message>) {
    let to = header.to;
    let mut backoff = BACKOFF_MIN;
    loop {
        let client = match connect(&book, to).await {
            Ok(c) => {
                backoff = BACKOFF_MIN;
                c
            }
            Err(e) => {
                tracing::debug!(peer = %format!("{to:x}"), error = %e, "peer unreachable");
                // Whatever is queued is stale by the time the peer is back; raft resends.
                if drain_for(&mut rx, backoff).await.is_none() {
                    return;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let prober = tokio::spawn(probe(client.clone(), to));
        let end = stream_to(client, header, &mut rx).await;
        prober.abort();
        match end {
            StreamEnd::QueueClosed => return,
            StreamEnd::Broken(why) => {
                tracing::debug!(peer = %format!("{to:x}"), why, "peer stream ended; reconnecting");
                if drain_for(&mut rx, backoff).await.is_none() {
                    return;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// How often a connected peer's round trip is measured (etcd's prober: every few seconds).
const PROBE_INTERVAL: Duration = Duration::from_secs(3);

/// Measures the round trip of a small request on the peer connection, as etcd's prober does,
/// for etcd_network_peer_round_trip_time_seconds{To}. Runs while the peer's stream is up.
async fn probe(mut client: RaftPeerClient<tonic::transport::Channel>, to: u64) {
    let rtt = metrics::histogram!(
        "etcd_network_peer_round_trip_time_seconds",
        "To" => format!("{to:x}")
    );
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    loop {
        tick.tick().await;
        let started = Instant::now();
        if client.members(MembersRequest {}).await.is_ok() {
            rtt.record(started.elapsed().as_secs_f64());
        }
    }
}

enum StreamEnd {
    QueueClosed,
    Broken(String),
}

async fn stream_to(
    mut client: RaftPeerClient<tonic::transport::Channel>,
    header: PeerHeader,
    rx: &mut mpsc::Receiver<Message>,
) -> StreamEnd {
    let (btx, brx) = mpsc::channel::<RaftBatch>(64);
    // The first frame carries the header alone, so the peer can refuse before anything else.
    if btx
        .send(RaftBatch {
            header: Some(header),
            messages: Vec::new(),
        })
        .await
        .is_err()
    {
        return StreamEnd::Broken("stream closed".into());
    }
    let mut call = tokio::spawn(async move { client.stream(ReceiverStream::new(brx)).await });
    let to_label = format!("{:x}", header.to);
    loop {
        tokio::select! {
            ended = &mut call => {
                let why = match ended {
                    Ok(Ok(_)) => "peer closed the stream".to_string(),
                    Ok(Err(status)) => {
                        if status.code() == tonic::Code::PermissionDenied {
                            tracing::warn!(peer = %to_label, error = %status.message(), "peer refused this member");
                        }
                        status.to_string()
                    }
                    Err(e) => e.to_string(),
                };
                return StreamEnd::Broken(why);
            }
            first = rx.recv() => {
                let Some(first) = first else {
                    call.abort();
                    return StreamEnd::QueueClosed;
                };
                let mut messages = vec![encode_message(&first)];
                while messages.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(m) => messages.push(encode_message(&m)),
                        Err(_) => break,
                    }
                }
                let bytes: usize = messages.iter().map(Vec::len).sum();
                if btx.send(RaftBatch { header: None, messages }).await.is_err() {
                    return StreamEnd::Broken("stream closed".into());
                }
                metrics::counter!("etcd_network_peer_sent_bytes_total", "To" => to_label.clone())
                    .increment(bytes as u64);
            }
        }
    }
}

/// Waits `d` while dropping queued messages; `None` once the queue is closed.
async fn drain_for(rx: &mut mpsc::Receiver<Message>, d: Duration) -> Option<()> {
    let deadline = tokio::time::Instant::now() + d;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(_dropped)) => {}
            Ok(None) => return None,
            Err(_) => return Some(()),
        }
    }
}

async fn connect(
    book: &AddressBook,
    to: u64,
) -> Result<RaftPeerClient<tonic::transport::Channel>, TransportError> {
    let urls = book.get(to).ok_or(TransportError::NoAddress(to))?;
    let mut last = TransportError::NoAddress(to);
    for url in urls {
        let endpoint = match tonic::transport::Endpoint::from_shared(url.clone()) {
            Ok(e) => e,
            Err(_) => {
                last = TransportError::BadUrl(url);
                continue;
            }
        };
        let endpoint = endpoint
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        match endpoint.connect_with_connector(book.connector()).await {
            Ok(ch) => {
                return Ok(RaftPeerClient::new(ch)
                    .max_decoding_message_size(usize::MAX)
                    .max_encoding_message_size(usize::MAX))
            }
            Err(source) => last = TransportError::Connect { url, source },
        }
    }
    Err(last)
}

/// Asks the members at `peer_urls` for the cluster this member is joining: (cluster id,
/// members). The first that answers wins.
pub async fn fetch_members(
    peer_urls: &[String],
    connector: oxcd_tls::Connector,
) -> Result<(u64, Vec<oxcd_proto::etcdserverpb::Member>), TransportError> {
    let mut last = TransportError::NoAddress(0);
    for url in peer_urls {
        let Ok(ep) = tonic::transport::Endpoint::from_shared(url.clone()) else {
            last = TransportError::BadUrl(url.clone());
            continue;
        };
        let ep = ep.connect_timeout(Duration::from_secs(2));
        let ch = match ep.connect_with_connector(connector.clone()).await {
            Ok(ch) => ch,
            Err(source) => {
                last = TransportError::Connect {
                    url: url.clone(),
                    source,
                };
                continue;
            }
        };
        if let Ok(r) = RaftPeerClient::new(ch)
            .members(oxcd_proto::oxcdpeerpb::MembersRequest {})
            .await
        {
            let r = r.into_inner();
            return Ok((r.cluster_id, r.members));
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests;
