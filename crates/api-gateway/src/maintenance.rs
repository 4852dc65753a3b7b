//! The Maintenance service: status, hashes, defragmentation and alarms of this member, leader
//! transfer, and Snapshot: this member's whole store from one point in time, streamed in oxcd's
//! snapshot file format (`mvcc_store::snapshot_file`: a magic header, the engine records, padding
//! to 512 bytes and a sha256 trailer), which `etcdctl snapshot save` stores as it receives it and
//! `oxcd snapshot restore` turns into a new data dir. Downgrade is not served and says so with
//! gRPC's Unimplemented code.

use std::io::{self, Write};
use std::pin::Pin;

use mvcc_store::snapshot_file::{self, HASH_LEN};
use mvcc_store::MvccStore;
use oxcd_proto::etcdserverpb::ResponseHeader;
use oxcd_proto::etcdserverpb::{
    alarm_request::AlarmAction, maintenance_server::Maintenance, AlarmRequest, AlarmResponse,
    DefragmentRequest, DefragmentResponse, DowngradeRequest, DowngradeResponse, HashKvRequest,
    HashKvResponse, HashRequest, HashResponse, MoveLeaderRequest, MoveLeaderResponse,
    SnapshotRequest, SnapshotResponse, StatusRequest, StatusResponse,
};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};

use crate::errors::{GatewayError, StatusError};
use crate::gateway::{Gateway, ETCD_VERSION};

pub struct MaintenanceService {
    gw: Gateway,
}

impl MaintenanceService {
    pub fn new(gw: Gateway) -> Self {
        MaintenanceService { gw }
    }

    fn header(&self) -> Option<oxcd_proto::etcdserverpb::ResponseHeader> {
        Some(self.gw.headers().header(self.gw.store().current_revision()))
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send>>;

/// Bytes per SnapshotResponse blob.
const SNAPSHOT_CHUNK: usize = 256 * 1024;
/// Blobs queued ahead of the network per snapshot stream.
const SNAPSHOT_QUEUE: usize = 4;

/// Streams `store` as a snapshot file into `tx`: blobs of `SNAPSHOT_CHUNK` bytes, then one last
/// message holding the 32-byte sha256 of all of them, as etcd sends it. `remaining_bytes` is
/// what etcd reports (size − sent, 0 from the last data blob on), except that oxcd learns the
/// exact size only at the end: until then it counts down from the engine's estimate of its live
/// data, and stays at least 1 while more is coming. Returns when the stream is complete, failed
/// (sent as an error status) or the receiver went away.
fn send_snapshot(
    store: &MvccStore,
    header: Option<ResponseHeader>,
    tx: mpsc::Sender<Result<SnapshotResponse, Status>>,
) {
    let started = std::time::Instant::now();
    let estimate = store.db_size_in_use().max(0) as u64;
    tracing::info!(estimated_bytes = estimate, "sending snapshot to client");
    let sink = ChunkSink {
        tx: tx.clone(),
        header,
        estimate,
        sent: 0,
        filling: Vec::with_capacity(SNAPSHOT_CHUNK),
        held: None,
    };
    let result = (|| -> Result<u64, Status> {
        let mut w = snapshot_file::Writer::new(sink).map_err(io_status)?;
        let mut failed = None;
        store
            .export(&mut |k, v| match w.record(k, v) {
                Ok(()) => true,
                Err(e) => {
                    failed = Some(e);
                    false
                }
            })
            .map_err(|e| Status::from(StatusError::from(e)))?;
        if let Some(e) = failed {
            return Err(io_status(e));
        }
        let (sink, body_len, hash) = w.finish().map_err(io_status)?;
        sink.finish(hash).map_err(io_status)?;
        Ok(body_len + HASH_LEN as u64)
    })();
    match result {
        Ok(bytes) => tracing::info!(
            bytes,
            took_ms = started.elapsed().as_millis() as u64,
            "sent snapshot to client"
        ),
        Err(status) if tx.is_closed() => {
            tracing::info!(reason = %status.message(), "snapshot stream closed by the client")
        }
        Err(status) => {
            tracing::warn!(error = %status.message(), "snapshot failed");
            let _ = tx.blocking_send(Err(status));
        }
    }
}

fn io_status(e: io::Error) -> Status {
    Status::internal(format!("snapshot: {e}"))
}

/// Cuts the snapshot bytes into blobs and sends them, holding one back so the last data blob
/// can say that nothing remains.
struct ChunkSink {
    tx: mpsc::Sender<Result<SnapshotResponse, Status>>,
    header: Option<ResponseHeader>,
    estimate: u64,
    sent: u64,
    filling: Vec<u8>,
    held: Option<Vec<u8>>,
}

impl ChunkSink {
    fn send(&mut self, blob: Vec<u8>, remaining_bytes: u64) -> io::Result<()> {
        let resp = SnapshotResponse {
            header: self.header,
            remaining_bytes,
            blob,
        };
        self.tx
            .blocking_send(Ok(resp))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "client went away"))
    }

    fn hold(&mut self, blob: Vec<u8>) -> io::Result<()> {
        if let Some(prev) = self.held.replace(blob) {
            self.sent += prev.len() as u64;
            let remaining = self.estimate.saturating_sub(self.sent).max(1);
            self.send(prev, remaining)?;
        }
        Ok(())
    }

    /// Sends the rest of the data, then the digest.
    fn finish(mut self, hash: [u8; HASH_LEN]) -> io::Result<()> {
        let rest = std::mem::take(&mut self.filling);
        if !rest.is_empty() {
            self.hold(rest)?;
        }
        if let Some(last) = self.held.take() {
            self.sent += last.len() as u64;
            self.send(last, 0)?;
        }
        self.send(hash.to_vec(), 0)
    }
}

impl Write for ChunkSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = (SNAPSHOT_CHUNK - self.filling.len()).min(data.len());
        self.filling.extend_from_slice(&data[..n]);
        if self.filling.len() == SNAPSHOT_CHUNK {
            let full = std::mem::replace(&mut self.filling, Vec::with_capacity(SNAPSHOT_CHUNK));
            self.hold(full)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        // etcd answers every alarm request from its applier, without a response header.
        let req = req.into_inner();
        if let Ok(AlarmAction::Get) = AlarmAction::try_from(req.action) {
            // A linearizable read of the applied alarms (etcd sends GET through raft).
            self.gw.read_barrier().await?;
            return Ok(Response::new(AlarmResponse {
                header: None,
                alarms: self.gw.alarms().get(req.alarm),
            }));
        }
        let out = self
            .gw
            .propose(oxcd_proto::etcdserverpb::InternalRaftRequest {
                alarm: Some(req),
                ..Default::default()
            })
            .await?;
        match out {
            applier::ApplyResponse::Alarm(resp) => Ok(Response::new(resp)),
            other => Err(Status::internal(format!("alarm applied as {other:?}"))),
        }
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let raft = self.gw.raft_status().await?;
        let store = self.gw.store();
        self.gw.headers().set_term(raft.term);
        // As etcd 3.4: a missing leader, then every alarm in Go's protobuf text.
        let mut errors = Vec::new();
        if raft.leader_id == 0 {
            errors.push(GatewayError::NoLeader.to_string());
        }
        let all = oxcd_proto::etcdserverpb::AlarmType::None as i32;
        errors.extend(self.gw.alarms().get(all).iter().map(applier::alarm_text));
        Ok(Response::new(StatusResponse {
            header: self.header(),
            version: ETCD_VERSION.to_string(),
            db_size: store.db_size(),
            leader: raft.leader_id,
            raft_index: raft.commit_index,
            raft_term: raft.term,
            raft_applied_index: self.gw.applied_index(),
            errors,
            db_size_in_use: store.db_size_in_use(),
            is_learner: raft.learners.contains(&raft.id),
        }))
    }

    async fn defragment(
        &self,
        _: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        // Rewrites the whole engine: off the async workers.
        let store = self.gw.store().clone();
        tokio::task::spawn_blocking(move || store.defragment())
            .await
            .map_err(|e| Status::internal(format!("defragment task failed: {e}")))?
            .map_err(StatusError::from)?;
        Ok(Response::new(DefragmentResponse {
            header: self.header(),
        }))
    }

    async fn hash(&self, _: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        let (hash, _, _) = self.gw.store().hash_kv(0).map_err(StatusError::from)?;
        Ok(Response::new(HashResponse {
            header: self.header(),
            hash,
        }))
    }

    async fn hash_kv(
        &self,
        req: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        let rev = req.into_inner().revision;
        let (hash, compact_revision, hash_revision) =
            self.gw.store().hash_kv(rev).map_err(StatusError::from)?;
        Ok(Response::new(HashKvResponse {
            header: self.header(),
            hash,
            compact_revision,
            hash_revision,
        }))
    }

    type SnapshotStream = SnapshotStream;

    async fn snapshot(
        &self,
        _: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        // Reading the whole store is blocking work; the bounded channel makes it wait for the
        // network, so a slow client holds a few chunks in memory, not the store.
        let store = self.gw.store().clone();
        let header = self.header();
        let (tx, rx) = mpsc::channel(SNAPSHOT_QUEUE);
        tokio::task::spawn_blocking(move || send_snapshot(&store, header, tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn move_leader(
        &self,
        req: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        let target = req.into_inner().target_id;
        let raft = self.gw.raft_status().await?;
        if !raft.is_leader {
            return Err(Status::new(
                Code::FailedPrecondition,
                "etcdserver: not leader",
            ));
        }
        if target == raft.id {
            return Ok(Response::new(MoveLeaderResponse {
                header: self.header(),
            }));
        }
        if !raft.voters.contains(&target) {
            return Err(GatewayError::BadLeaderTransferee.into());
        }
        self.gw.transfer_leader(target).await?;
        // raft hands over once the target's log matches; watch for the outcome.
        let deadline = tokio::time::Instant::now() + self.gw.limits().request_timeout;
        loop {
            let now = self.gw.raft_status().await?;
            if now.leader_id == target {
                return Ok(Response::new(MoveLeaderResponse {
                    header: self.header(),
                }));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Status::new(
                    Code::Unavailable,
                    "etcdserver: request timed out, leader transfer took too long",
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    async fn downgrade(
        &self,
        _: Request<DowngradeRequest>,
    ) -> Result<Response<DowngradeResponse>, Status> {
        Err(Status::new(
            Code::Unimplemented,
            "oxcd: cluster downgrade is not supported",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvcc_store::{MemEngine, WriteOp};
    use oxcd_proto::etcdserverpb::PutRequest;
    use std::sync::Arc;

    fn store_with(keys: usize, value_len: usize) -> MvccStore {
        let store = MvccStore::open(Arc::new(MemEngine::default())).unwrap();
        for i in 0..keys {
            let put = PutRequest {
                key: format!("key/{i:05}").into_bytes(),
                value: vec![b'v'; value_len],
                ..Default::default()
            };
            store
                .apply(i as u64 + 1, WriteOp::Put(&put), &|_| true)
                .unwrap();
        }
        store
    }

    /// Runs one Snapshot stream to its end, as a client would receive it.
    fn receive(store: MvccStore, queue: usize) -> Vec<Result<SnapshotResponse, Status>> {
        let (tx, mut rx) = mpsc::channel(queue);
        let t = std::thread::spawn(move || send_snapshot(&store, None, tx));
        let mut got = Vec::new();
        while let Some(m) = rx.blocking_recv() {
            got.push(m);
        }
        t.join().unwrap();
        got
    }

    #[test]
    fn stream_is_the_snapshot_file_in_chunks_then_its_digest() {
        let store = store_with(200, 3000);
        let msgs: Vec<SnapshotResponse> = receive(store.clone(), 1)
            .into_iter()
            .map(|m| m.unwrap())
            .collect();
        assert!(msgs.len() >= 4, "{} messages", msgs.len());
        let (digest, data) = msgs.split_last().unwrap();
        assert_eq!(digest.blob.len(), HASH_LEN);
        assert_eq!(digest.remaining_bytes, 0);
        let (last, rest) = data.split_last().unwrap();
        assert_eq!(
            last.remaining_bytes, 0,
            "the last data blob says nothing remains"
        );
        for m in rest {
            assert_eq!(m.blob.len(), SNAPSHOT_CHUNK);
            assert!(m.remaining_bytes > 0);
        }
        let file: Vec<u8> = msgs.iter().flat_map(|m| m.blob.clone()).collect();
        assert!(
            snapshot_file::has_hash_trailer(file.len() as u64),
            "etcdctl keeps only a size of 512·n + 32, got {}",
            file.len()
        );
        // The bytes are the store's export, records in order.
        let body = &file[..file.len() - HASH_LEN];
        let mut r = snapshot_file::Reader::new(body, body.len() as u64).unwrap();
        let mut want = Vec::new();
        store
            .export(&mut |k, v| {
                want.push((k.to_vec(), v.to_vec()));
                true
            })
            .unwrap();
        let mut got = Vec::new();
        while let Some(rec) = r.next_record().unwrap() {
            got.push(rec);
        }
        assert_eq!(got, want);
    }

    #[test]
    fn a_client_that_goes_away_stops_the_export() {
        let store = store_with(200, 3000);
        let (tx, mut rx) = mpsc::channel(1);
        let t = std::thread::spawn(move || send_snapshot(&store, None, tx));
        let first = rx.blocking_recv().unwrap().unwrap();
        assert_eq!(first.blob.len(), SNAPSHOT_CHUNK);
        drop(rx);
        // Returns instead of blocking on a channel nobody reads.
        t.join().unwrap();
    }
}
