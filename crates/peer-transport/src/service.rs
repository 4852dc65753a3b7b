//! The receiving side: peers' streams into raft-node's command channel.

use oxcd_proto::oxcdpeerpb::raft_peer_server::RaftPeer;
use std::sync::Arc;

use oxcd_proto::etcdserverpb::{HashKvResponse, Member};
use oxcd_proto::oxcdpeerpb::{
    HashKvRequest, MembersRequest, MembersResponse, RaftBatch, SnapshotChunk, SnapshotRequest,
    StreamAck,
};
use raft_node::RaftCommand;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::decode_message;
use crate::hash::{self, HashSource};
use crate::snapshot::{self, SnapshotSource};

/// The member list this member serves to a joining member.
pub type MemberSource = Arc<dyn Fn() -> Vec<Member> + Send + Sync>;

pub struct RaftPeerService<R> {
    me: u64,
    cluster_id: u64,
    raft: mpsc::Sender<RaftCommand<R>>,
    members: MemberSource,
    snapshots: Option<Arc<dyn SnapshotSource>>,
    hashes: Option<Arc<dyn HashSource>>,
}

impl<R> RaftPeerService<R> {
    pub fn new(
        me: u64,
        cluster_id: u64,
        raft: mpsc::Sender<RaftCommand<R>>,
        members: MemberSource,
    ) -> Self {
        RaftPeerService {
            me,
            cluster_id,
            raft,
            members,
            snapshots: None,
            hashes: None,
        }
    }

    /// Serves whole-state snapshots from `source` to members the leader cannot catch up
    /// from its log.
    pub fn with_snapshots(mut self, source: Arc<dyn SnapshotSource>) -> Self {
        self.snapshots = Some(source);
        self
    }

    /// Answers peers' corruption checks with hashes of `source`.
    pub fn with_hashes(mut self, source: Arc<dyn HashSource>) -> Self {
        self.hashes = Some(source);
        self
    }

    fn admit(&self, header: Option<&oxcd_proto::oxcdpeerpb::PeerHeader>) -> Result<u64, Status> {
        let h = header.ok_or_else(|| Status::invalid_argument("peer stream without header"))?;
        if h.cluster_id != self.cluster_id {
            return Err(Status::permission_denied(format!(
                "request cluster ID mismatch (got {:x} want {:x})",
                h.cluster_id, self.cluster_id
            )));
        }
        if h.to != self.me {
            return Err(Status::permission_denied(format!(
                "message for member {:x} reached member {:x}",
                h.to, self.me
            )));
        }
        Ok(h.from)
    }
}

#[tonic::async_trait]
impl<R: Send + 'static> RaftPeer for RaftPeerService<R> {
    type SnapshotStream = tokio_stream::wrappers::ReceiverStream<Result<SnapshotChunk, Status>>;

    async fn snapshot(
        &self,
        req: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let req = req.into_inner();
        let from = self.admit(req.header.as_ref())?;
        let source = self
            .snapshots
            .clone()
            .ok_or_else(|| Status::unavailable("this member serves no snapshots"))?;
        tracing::info!(to = %format!("{from:x}"), min_applied = req.min_applied, "sending snapshot");
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            snapshot::serve(source, req.min_applied),
        )))
    }

    async fn hash_kv(
        &self,
        req: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        let req = req.into_inner();
        self.admit(req.header.as_ref())?;
        let source = self
            .hashes
            .clone()
            .ok_or_else(|| Status::unavailable("this member serves no hashes"))?;
        hash::serve(source, self.cluster_id, self.me, req.revision)
            .await
            .map(Response::new)
    }

    async fn members(
        &self,
        _: Request<MembersRequest>,
    ) -> Result<Response<MembersResponse>, Status> {
        Ok(Response::new(MembersResponse {
            cluster_id: self.cluster_id,
            members: (self.members)(),
        }))
    }

    async fn stream(
        &self,
        req: Request<Streaming<RaftBatch>>,
    ) -> Result<Response<StreamAck>, Status> {
        let mut s = req.into_inner();
        let first = s
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty peer stream"))?;
        let from = self.admit(first.header.as_ref())?;
        let label = format!("{from:x}");
        let mut batch = Some(first);
        loop {
            let Some(b) = batch.take() else {
                match s.message().await? {
                    Some(b) => batch = Some(b),
                    None => return Ok(Response::new(StreamAck {})),
                }
                continue;
            };
            let bytes: usize = b.messages.iter().map(Vec::len).sum();
            metrics::counter!("etcd_network_peer_received_bytes_total", "From" => label.clone())
                .increment(bytes as u64);
            for raw in b.messages {
                let m = decode_message(&raw)
                    .map_err(|e| Status::invalid_argument(format!("bad raft message: {e}")))?;
                if m.from != from {
                    return Err(Status::invalid_argument("raft message from another member"));
                }
                if self
                    .raft
                    .send(RaftCommand::Step(Box::new(m)))
                    .await
                    .is_err()
                {
                    return Err(Status::unavailable("etcdserver: server stopped"));
                }
            }
        }
    }
}
