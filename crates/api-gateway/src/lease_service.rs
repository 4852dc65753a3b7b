//! etcd's Lease service. Grants and revokes go through raft (every member applies them);
//! keep-alives, time-to-live and listing ask the lessor, which on the leader tracks the
//! deadlines.

use std::pin::Pin;
use std::time::Duration;

use applier::{request_cost, ApplyResponse};
use lease::{LeaseError, LeaseHandle, MAX_LEASE_TTL};
use oxcd_proto::etcdserverpb::{
    lease_server::Lease, InternalRaftRequest, LeaseGrantRequest, LeaseGrantResponse,
    LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseLeasesRequest, LeaseLeasesResponse,
    LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus, LeaseTimeToLiveRequest,
    LeaseTimeToLiveResponse,
};
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::errors::StatusError;
use crate::forward;
use crate::gateway::Gateway;
use oxcd_proto::etcdserverpb::lease_client::LeaseClient;

pub struct LeaseService {
    gw: Gateway,
    leases: LeaseHandle,
}

impl LeaseService {
    pub fn new(gw: Gateway, leases: LeaseHandle) -> Self {
        LeaseService { gw, leases }
    }

    fn header(&self) -> Option<oxcd_proto::etcdserverpb::ResponseHeader> {
        Some(self.gw.headers().header(self.gw.store().current_revision()))
    }
}

/// A follower's keep-alive stream to the leader, opened on the first renewal it must forward.
type LeaderStream = (
    mpsc::Sender<LeaseKeepAliveRequest>,
    Streaming<LeaseKeepAliveResponse>,
);

/// Renews `id` on the leader; one retry on a fresh stream covers a leader change.
async fn forward_keep_alive(
    gw: &Gateway,
    stream: &mut Option<LeaderStream>,
    id: i64,
) -> Result<i64, Status> {
    let mut last = Status::unavailable("etcdserver: no leader");
    for _ in 0..2 {
        if stream.is_none() {
            let ch = forward::leader_channel(gw).await?;
            let (tx, rx) = mpsc::channel(4);
            let resp = LeaseClient::new(ch)
                .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?;
            *stream = Some((tx, resp.into_inner()));
        }
        let (tx, rx) = stream.as_mut().expect("opened above");
        if tx.send(LeaseKeepAliveRequest { id }).await.is_ok() {
            match tokio::time::timeout(gw.limits().request_timeout, rx.message()).await {
                Ok(Ok(Some(r))) => return Ok(r.ttl),
                Ok(Err(s)) => last = s,
                Ok(Ok(None)) | Err(_) => {}
            }
        }
        *stream = None;
    }
    Err(last)
}

/// Renews on this member's lessor. A leader whose lessor has not been promoted yet (it
/// follows raft's leadership a moment later) waits for it instead of answering NotPrimary:
/// forwarding would only reach itself again.
async fn renew_here(gw: &Gateway, leases: &LeaseHandle, id: i64) -> Result<i64, LeaseError> {
    let deadline = tokio::time::Instant::now() + gw.limits().request_timeout;
    loop {
        match leases.renew(id).await {
            Err(LeaseError::NotPrimary)
                if tokio::time::Instant::now() < deadline
                    && gw.raft_status().await.is_ok_and(|s| s.is_leader) =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => return other,
        }
    }
}

/// A server-chosen lease id: positive, unlikely to collide, never 0 (0 means "no lease").
pub(crate) fn new_lease_id() -> i64 {
    loop {
        let id = rand::random::<i64>() & i64::MAX;
        if id != 0 {
            return id;
        }
    }
}

/// Revokes a lease through raft; used by the service and by the server's expiry loop.
pub async fn propose_revoke(gw: &Gateway, id: i64) -> Result<LeaseRevokeResponse, StatusError> {
    let out = gw
        .propose(InternalRaftRequest {
            lease_revoke: Some(LeaseRevokeRequest { id }),
            ..Default::default()
        })
        .await?;
    match out {
        ApplyResponse::LeaseRevoke(mut r) => {
            let rev = r.header.as_ref().map_or(0, |h| h.revision);
            r.header = Some(gw.headers().header(rev));
            Ok(r)
        }
        other => Err(StatusError(Status::internal(format!(
            "lease revoke applied as {other:?}"
        )))),
    }
}

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        req: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let mut req = req.into_inner();
        // As etcd's quota layer in front of its lease server: the quota comes first.
        let cost = request_cost(&InternalRaftRequest {
            lease_grant: Some(req),
            ..Default::default()
        });
        self.gw.check_quota(cost).await?;
        if req.ttl > MAX_LEASE_TTL {
            return Err(StatusError::from(LeaseError::TtlTooLarge).into());
        }
        if req.id == 0 {
            req.id = new_lease_id();
        } else if self.leases.contains(req.id) {
            // Checked here so the applier can take a repeated grant as a replay.
            return Err(StatusError::from(LeaseError::Exists).into());
        }
        let out = self
            .gw
            .propose_within_quota(InternalRaftRequest {
                lease_grant: Some(req),
                ..Default::default()
            })
            .await?;
        match out {
            ApplyResponse::LeaseGrant(mut r) => {
                let rev = r.header.as_ref().map_or(0, |h| h.revision);
                r.header = Some(self.gw.headers().header(rev));
                Ok(Response::new(r))
            }
            other => Err(Status::internal(format!(
                "lease grant applied as {other:?}"
            ))),
        }
    }

    async fn lease_revoke(
        &self,
        req: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let id = req.into_inner().id;
        Ok(Response::new(propose_revoke(&self.gw, id).await?))
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let leases = self.leases.clone();
        let gw = self.gw.clone();
        tokio::spawn(async move {
            let mut to_leader = None;
            while let Some(Ok(req)) = inbound.next().await {
                // As etcd: an unknown lease is answered with TTL 0, not an error.
                let ttl = match renew_here(&gw, &leases, req.id).await {
                    Ok(ttl) => ttl,
                    Err(LeaseError::NotFound) => 0,
                    Err(LeaseError::NotPrimary) => {
                        match forward_keep_alive(&gw, &mut to_leader, req.id).await {
                            Ok(ttl) => ttl,
                            Err(status) => {
                                let _ = tx.send(Err(status)).await;
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(StatusError::from(e).into())).await;
                        return;
                    }
                };
                let resp = LeaseKeepAliveResponse {
                    header: Some(gw.headers().header(gw.store().current_revision())),
                    id: req.id,
                    ttl,
                };
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let req = req.into_inner();
        if !self.gw.raft_status().await?.is_leader {
            // Only the leader knows how much of a lease's TTL is left.
            let ch = forward::leader_channel(&self.gw).await?;
            let mut resp = LeaseClient::new(ch)
                .lease_time_to_live(req)
                .await?
                .into_inner();
            resp.header = self.header();
            return Ok(Response::new(resp));
        }
        let t = match self.leases.time_to_live(req.id) {
            Ok(t) => t,
            // etcd answers an unknown lease with TTL -1 rather than an error.
            Err(LeaseError::NotFound) => {
                return Ok(Response::new(LeaseTimeToLiveResponse {
                    header: self.header(),
                    id: req.id,
                    ttl: -1,
                    ..Default::default()
                }))
            }
            Err(e) => return Err(StatusError::from(e).into()),
        };
        Ok(Response::new(LeaseTimeToLiveResponse {
            header: self.header(),
            id: t.id,
            ttl: t.ttl,
            granted_ttl: t.granted_ttl,
            keys: if req.keys { t.keys } else { Vec::new() },
        }))
    }

    async fn lease_leases(
        &self,
        _: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let mut all = self.leases.leases();
        all.sort_by_key(|l| l.id);
        Ok(Response::new(LeaseLeasesResponse {
            header: self.header(),
            leases: all.into_iter().map(|l| LeaseStatus { id: l.id }).collect(),
        }))
    }
}
