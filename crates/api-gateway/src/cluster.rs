//! The Cluster service: the member list from the applied membership records, and membership
//! changes as raft configuration changes (add, add learner, promote, remove) or a replicated
//! record update (peer URLs), with etcd's checks and error texts.

use std::time::{SystemTime, UNIX_EPOCH};

use oxcd_proto::etcdserverpb::cluster_client::ClusterClient;
use oxcd_proto::etcdserverpb::{
    cluster_server::Cluster, InternalRaftRequest, Member, MemberAddRequest, MemberAddResponse,
    MemberListRequest, MemberListResponse, MemberPromoteRequest, MemberPromoteResponse,
    MemberRemoveRequest, MemberRemoveResponse, MemberUpdateRequest, MemberUpdateResponse,
};
use prost::Message as _;
use raft_node::{ConfChange, ConfChangeType};
use tonic::{Request, Response, Status};

use crate::errors::GatewayError;
use crate::forward;
use crate::gateway::Gateway;

/// etcd allows one learner at a time.
const MAX_LEARNERS: usize = 1;

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

    fn known(&self, id: u64) -> Result<Member, Status> {
        self.gw
            .membership()
            .get(id)
            .ok_or_else(|| GatewayError::MemberNotFound.into())
    }

    fn check_peer_urls(&self, urls: &[String], except: u64) -> Result<(), Status> {
        for u in urls {
            let ok = u
                .strip_prefix("http://")
                .or_else(|| u.strip_prefix("https://"))
                .is_some_and(|rest| !rest.is_empty());
            if !ok {
                return Err(GatewayError::BadPeerUrl.into());
            }
        }
        let taken = self
            .gw
            .members()
            .iter()
            .filter(|m| m.id != except)
            .any(|m| m.peer_ur_ls.iter().any(|p| urls.contains(p)));
        if taken {
            return Err(GatewayError::PeerUrlExists.into());
        }
        Ok(())
    }

    /// etcd's strict reconfiguration check: after the change, the voters that have started
    /// (published their attributes) must still make a quorum.
    fn check_quorum_after(&self, voters_after: &[Member]) -> Result<(), Status> {
        let started = voters_after.iter().filter(|m| !m.name.is_empty()).count();
        if started < voters_after.len() / 2 + 1 {
            return Err(GatewayError::NotEnoughStartedMembers.into());
        }
        Ok(())
    }

    async fn change(&self, t: ConfChangeType, id: u64, member: &Member) -> Result<(), Status> {
        let mut cc = ConfChange::default();
        cc.set_change_type(t);
        cc.node_id = id;
        cc.context = member.encode_to_vec().into();
        self.gw.propose_conf_change(cc).await?;
        Ok(())
    }
}

fn new_member_id(peer_urls: &[String], cluster_id: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let mut urls = peer_urls.to_vec();
    urls.sort();
    h.write(urls.concat().as_bytes());
    h.write_u64(cluster_id);
    h.write_u128(now);
    // Zero means "no member" in raft.
    h.finish().max(1)
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        req: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        let req = req.into_inner();
        self.check_peer_urls(&req.peer_ur_ls, 0)?;
        let members = self.gw.members();
        let member = Member {
            id: new_member_id(&req.peer_ur_ls, self.gw.headers().cluster_id),
            name: String::new(),
            peer_ur_ls: req.peer_ur_ls.clone(),
            client_ur_ls: Vec::new(),
            is_learner: req.is_learner,
        };
        if req.is_learner {
            if members.iter().filter(|m| m.is_learner).count() >= MAX_LEARNERS {
                return Err(GatewayError::TooManyLearners.into());
            }
        } else {
            let mut voters: Vec<Member> =
                members.iter().filter(|m| !m.is_learner).cloned().collect();
            voters.push(member.clone());
            self.check_quorum_after(&voters)?;
        }
        let t = if req.is_learner {
            ConfChangeType::AddLearnerNode
        } else {
            ConfChangeType::AddNode
        };
        self.change(t, member.id, &member).await?;
        Ok(Response::new(MemberAddResponse {
            header: self.header(),
            member: Some(member),
            members: self.gw.members(),
        }))
    }

    async fn member_remove(
        &self,
        req: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        let id = req.into_inner().id;
        let member = self.known(id)?;
        if !member.is_learner {
            let voters: Vec<Member> = self
                .gw
                .members()
                .into_iter()
                .filter(|m| !m.is_learner && m.id != id)
                .collect();
            self.check_quorum_after(&voters)?;
        }
        self.change(ConfChangeType::RemoveNode, id, &member).await?;
        Ok(Response::new(MemberRemoveResponse {
            header: self.header(),
            members: self.gw.members(),
        }))
    }

    async fn member_update(
        &self,
        req: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        let req = req.into_inner();
        self.known(req.id)?;
        self.check_peer_urls(&req.peer_ur_ls, req.id)?;
        self.gw
            .propose(InternalRaftRequest {
                member_update: Some(req),
                ..Default::default()
            })
            .await?;
        Ok(Response::new(MemberUpdateResponse {
            header: self.header(),
            members: self.gw.members(),
        }))
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
        let id = req.into_inner().id;
        let member = self.known(id)?;
        if !member.is_learner {
            return Err(GatewayError::NotLearner.into());
        }
        let status = self.gw.raft_status().await?;
        if !status.is_leader {
            // Only the leader knows how far the learner's log matches its own.
            let ch = forward::leader_channel(&self.gw).await?;
            let mut resp = ClusterClient::new(ch)
                .member_promote(MemberPromoteRequest { id })
                .await?
                .into_inner();
            resp.header = self.header();
            return Ok(Response::new(resp));
        }
        let matched = |who: u64| {
            status
                .matched
                .iter()
                .find(|(m, _)| *m == who)
                .map_or(0, |(_, i)| *i)
        };
        // etcd's rule: the learner has at least 90% of the leader's log.
        if (matched(id) as f64) < 0.9 * matched(status.id) as f64 {
            return Err(GatewayError::LearnerNotReady.into());
        }
        self.change(ConfChangeType::AddNode, id, &member).await?;
        Ok(Response::new(MemberPromoteResponse {
            header: self.header(),
            members: self.gw.members(),
        }))
    }
}
