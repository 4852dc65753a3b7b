//! The KV service: Range, Put, DeleteRange, Txn, Compact.

use applier::{request_cost, ApplyResponse};
use oxcd_proto::etcdserverpb::{
    kv_server::Kv, CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse,
    InternalRaftRequest, PutRequest, PutResponse, RangeRequest, RangeResponse, TxnRequest,
    TxnResponse,
};
use tonic::{Request, Response, Status};

use crate::gateway::Gateway;
use crate::validate;

pub struct KvService {
    gw: Gateway,
}

impl KvService {
    pub fn new(gw: Gateway) -> Self {
        KvService { gw }
    }

    async fn write(&self, req: InternalRaftRequest) -> Result<ApplyResponse, Status> {
        Ok(self.gw.propose(req).await?)
    }

    /// Put and Txn check the quota first, before validation, as etcd's quota layer wraps its
    /// KV server; the proposal then skips the check.
    async fn write_checked(&self, req: InternalRaftRequest) -> Result<ApplyResponse, Status> {
        Ok(self.gw.propose_within_quota(req).await?)
    }
}

fn unexpected(what: &str, got: &ApplyResponse) -> Status {
    Status::internal(format!("etcdserver: {what} applied as {got:?}"))
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let req = req.into_inner();
        validate::check_range(&req)?;
        Ok(Response::new(self.gw.range(&req).await?))
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let req = InternalRaftRequest {
            put: Some(req.into_inner()),
            ..Default::default()
        };
        self.gw.check_quota(request_cost(&req)).await?;
        validate::check_put(req.put.as_ref().expect("set above"))?;
        let out = self.write_checked(req).await?;
        match out {
            ApplyResponse::Put(mut resp) => {
                self.gw.headers().fill(&mut resp.header, 0);
                Ok(Response::new(resp))
            }
            other => Err(unexpected("put", &other)),
        }
    }

    async fn delete_range(
        &self,
        req: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let req = req.into_inner();
        validate::check_delete(&req)?;
        let out = self
            .write(InternalRaftRequest {
                delete_range: Some(req),
                ..Default::default()
            })
            .await?;
        match out {
            ApplyResponse::DeleteRange(mut resp) => {
                self.gw.headers().fill(&mut resp.header, 0);
                Ok(Response::new(resp))
            }
            other => Err(unexpected("delete range", &other)),
        }
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let req = InternalRaftRequest {
            txn: Some(req.into_inner()),
            ..Default::default()
        };
        self.gw.check_quota(request_cost(&req)).await?;
        validate::check_txn(
            req.txn.as_ref().expect("set above"),
            self.gw.limits().max_txn_ops,
        )?;
        let out = self.write_checked(req).await?;
        match out {
            ApplyResponse::Txn(mut resp) => {
                self.gw.headers().fill(&mut resp.header, 0);
                Ok(Response::new(resp))
            }
            other => Err(unexpected("txn", &other)),
        }
    }

    async fn compact(
        &self,
        req: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let req = req.into_inner();
        let physical = req.physical;
        let out = self
            .write(InternalRaftRequest {
                compaction: Some(req),
                ..Default::default()
            })
            .await?;
        match out {
            ApplyResponse::Compact {
                mut response,
                physical: wait,
            } => {
                if let (true, Some(wait)) = (physical, wait) {
                    wait.wait().await;
                }
                self.gw
                    .headers()
                    .fill(&mut response.header, self.gw.store().current_revision());
                Ok(Response::new(response))
            }
            other => Err(unexpected("compaction", &other)),
        }
    }
}
