//! The Maintenance service: status and hashes of this member. Snapshot, Defragment and
//! Downgrade are not served yet and say so with gRPC's Unimplemented code.

use std::pin::Pin;

use oxcd_proto::etcdserverpb::{
    alarm_request::AlarmAction, maintenance_server::Maintenance, AlarmRequest, AlarmResponse,
    DefragmentRequest, DefragmentResponse, DowngradeRequest, DowngradeResponse, HashKvRequest,
    HashKvResponse, HashRequest, HashResponse, MoveLeaderRequest, MoveLeaderResponse,
    SnapshotRequest, SnapshotResponse, StatusRequest, StatusResponse,
};
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

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        // No alarm is ever raised yet (quota and corruption checks arrive later), so the list is
        // truthfully empty and disarming is a no-op; raising one by hand is refused.
        match AlarmAction::try_from(req.into_inner().action) {
            Ok(AlarmAction::Get) | Ok(AlarmAction::Deactivate) => {
                Ok(Response::new(AlarmResponse {
                    header: self.header(),
                    alarms: vec![],
                }))
            }
            _ => Err(Status::new(Code::Unavailable, "etcdserver: not capable")),
        }
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let raft = self.gw.raft_status().await?;
        let store = self.gw.store();
        self.gw.headers().set_term(raft.term);
        Ok(Response::new(StatusResponse {
            header: self.header(),
            version: ETCD_VERSION.to_string(),
            db_size: store.db_size(),
            leader: raft.leader_id,
            raft_index: raft.commit_index,
            raft_term: raft.term,
            raft_applied_index: self.gw.applied_index(),
            errors: vec![],
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
        Err(Status::new(
            Code::Unimplemented,
            "oxcd: snapshot is not supported yet",
        ))
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
