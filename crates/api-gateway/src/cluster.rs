//! The Cluster service. Membership is static until replication lands: the list is served, and
//! changes that would need a reconfiguration are refused with a clear error.

use oxcd_proto::etcdserverpb::{
    cluster_server::Cluster, MemberAddRequest, MemberAddResponse, MemberListRequest,
    MemberListResponse, MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest,
    MemberRemoveResponse, MemberUpdateRequest, MemberUpdateResponse,
};
use tonic::{Code, Request, Response, Status};

use crate::errors::GatewayError;
use crate::gateway::Gateway;

pub struct ClusterService {
    gw: Gateway,
}

impl ClusterService {
    pub fn new(gw: Gateway) -> Self {
        ClusterService { gw }
    }

    fn header(&self) -> Option<oxcd_proto::etcdserverpb::ResponseHeader> {
        Some(self.gw.headers().header(self.gw.store().current_revision()))
    }

    fn known(&self, id: u64) -> Result<oxcd_proto::etcdserverpb::Member, Status> {
        self.gw
            .membership()
            .get(id)
            .ok_or_else(|| GatewayError::MemberNotFound.into())
    }
}

fn reconfiguration_unsupported() -> Status {
    Status::new(
        Code::Unimplemented,
        "oxcd: membership changes are not supported yet",
    )
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        _: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        Err(reconfiguration_unsupported())
    }

    async fn member_remove(
        &self,
        req: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        self.known(req.into_inner().id)?;
        Err(reconfiguration_unsupported())
    }

    async fn member_update(
        &self,
        req: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        self.known(req.into_inner().id)?;
        Err(reconfiguration_unsupported())
    }

    async fn member_list(
        &self,
        _: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        Ok(Response::new(MemberListResponse {
            header: self.header(),
            members: self.gw.members(),
        }))
    }

    async fn member_promote(
        &self,
        req: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        let member = self.known(req.into_inner().id)?;
        if !member.is_learner {
            return Err(Status::new(
                Code::FailedPrecondition,
                "etcdserver: can only promote a learner member",
            ));
        }
        Err(reconfiguration_unsupported())
    }
}
