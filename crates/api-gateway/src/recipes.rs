//! etcd's v3lock and v3election services: the lock and election recipes run inside the
//! server on the KV, lease and watch layers, as etcd runs its client-side recipes for them.
//!
//! A contender writes `<name>/<lease in hex>` with its lease (only if absent), then waits until
//! every key under `<name>/` created before its own is deleted. Whoever's key is oldest holds
//! the lock or leads the election; a lease expiry or revoke lets the next one in.

use std::pin::Pin;

use applier::ApplyResponse;
use oxcd_proto::etcdserverpb::{
    compare, range_request::SortOrder, range_request::SortTarget, request_op, response_op, Compare,
    DeleteRangeRequest, InternalRaftRequest, LeaseGrantRequest, PutRequest, RangeRequest,
    RangeResponse, RequestOp, ResponseHeader, TxnRequest, TxnResponse,
};
use oxcd_proto::mvccpb::{event::EventType, Event, KeyValue};
use oxcd_proto::v3electionpb::{
    election_server::Election, CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest,
    LeaderResponse, ProclaimRequest, ProclaimResponse, ResignRequest, ResignResponse,
};
use oxcd_proto::v3lockpb::{
    lock_server::Lock, LockRequest, LockResponse, UnlockRequest, UnlockResponse,
};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};
use watch::{Notice, WatchHub, WatchSpec};

use crate::gateway::Gateway;

/// TTL of the lease a recipe grants when the client names none (etcd's session default).
const DEFAULT_SESSION_TTL: i64 = 60;

fn not_leader() -> Status {
    Status::new(Code::Unknown, "election: not leader")
}

fn no_leader() -> Status {
    Status::new(Code::Unknown, "election: no leader")
}

fn missing_leader_key() -> Status {
    Status::new(Code::Unknown, "\"leader\" field must be provided")
}

/// The KV, lease and watch operations the recipes are made of.
#[derive(Clone)]
struct Recipes {
    gw: Gateway,
    hub: WatchHub,
}

/// How long a recipe step keeps retrying while the cluster has no leader.
const LEADERLESS_PATIENCE: std::time::Duration = std::time::Duration::from_secs(15);

/// Runs `op` again while it fails with Unavailable (no leader, leader changed, timeout), as
/// etcd's recipes do through their client's retries: a contender waiting for a lock should
/// outlive a leader election. Every step retried this way is idempotent (reads, txns guarded
/// by a create-revision compare).
async fn through_elections<T, F, Fut>(mut op: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let deadline = tokio::time::Instant::now() + LEADERLESS_PATIENCE;
    let mut pause = std::time::Duration::from_millis(50);
    loop {
        match op().await {
            Err(e) if e.code() == Code::Unavailable && tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e.message(), "recipe step retried");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

impl Recipes {
    async fn txn(&self, txn: TxnRequest) -> Result<TxnResponse, Status> {
        let out = through_elections(|| async {
            Ok(self
                .gw
                .propose(InternalRaftRequest {
                    txn: Some(txn.clone()),
                    ..Default::default()
                })
                .await?)
        })
        .await?;
        match out {
            ApplyResponse::Txn(mut r) => {
                self.gw.headers().fill(&mut r.header, 0);
                Ok(r)
            }
            other => Err(Status::internal(format!("txn applied as {other:?}"))),
        }
    }

    async fn range(&self, req: RangeRequest) -> Result<RangeResponse, Status> {
        through_elections(|| async { Ok(self.gw.range(&req).await?) }).await
    }

    /// The oldest (`first`) or newest key under `prefix`, optionally created at or below
    /// `max_create`.
    async fn by_create(
        &self,
        prefix: &[u8],
        first: bool,
        max_create: i64,
    ) -> Result<RangeResponse, Status> {
        self.range(RangeRequest {
            key: prefix.to_vec(),
            range_end: prefix_end(prefix),
            limit: 1,
            sort_order: if first {
                SortOrder::Ascend
            } else {
                SortOrder::Descend
            } as i32,
            sort_target: SortTarget::Create as i32,
            max_create_revision: max_create,
            ..Default::default()
        })
        .await
    }

    async fn lease_or_new(&self, lease: i64) -> Result<i64, Status> {
        if lease != 0 {
            return Ok(lease);
        }
        let out = self
            .gw
            .propose(InternalRaftRequest {
                lease_grant: Some(LeaseGrantRequest {
                    ttl: DEFAULT_SESSION_TTL,
                    id: crate::lease_service::new_lease_id(),
                }),
                ..Default::default()
            })
            .await?;
        match out {
            ApplyResponse::LeaseGrant(r) => Ok(r.id),
            other => Err(Status::internal(format!(
                "lease grant applied as {other:?}"
            ))),
        }
    }

    /// Puts `key` with `value` and `lease` unless it exists; returns the txn's header and the
    /// key's create revision and value.
    async fn claim(
        &self,
        key: &[u8],
        value: &[u8],
        lease: i64,
    ) -> Result<(ResponseHeader, i64, Vec<u8>), Status> {
        let resp = self
            .txn(TxnRequest {
                compare: vec![create_rev_is(key, 0)],
                success: vec![op_put(key, value, lease)],
                failure: vec![op_get(key)],
            })
            .await?;
        let header = resp.header.unwrap_or_default();
        if resp.succeeded {
            return Ok((header, header.revision, value.to_vec()));
        }
        let kv = first_kv(&resp)
            .ok_or_else(|| Status::internal("claimed key vanished within its txn"))?;
        Ok((header, kv.create_revision, kv.value))
    }

    /// Waits until no key under `prefix` was created at or before `max_create`.
    async fn wait_deletes(&self, prefix: &[u8], max_create: i64) -> Result<ResponseHeader, Status> {
        loop {
            let r = self.by_create(prefix, false, max_create).await?;
            let Some(last) = r.kvs.first() else {
                return Ok(r.header.unwrap_or_default());
            };
            let rev = r.header.as_ref().map_or(0, |h| h.revision);
            let mut w = KeyWatch::open(&self.hub, last.key.clone(), Vec::new(), rev).await?;
            loop {
                let events = w.next().await?;
                if events.iter().any(|e| e.r#type == EventType::Delete as i32) {
                    break;
                }
            }
        }
    }

    async fn delete_if_created_at(&self, key: &[u8], rev: i64) -> Result<TxnResponse, Status> {
        self.txn(TxnRequest {
            compare: vec![create_rev_is(key, rev)],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestDeleteRange(
                    DeleteRangeRequest {
                        key: key.to_vec(),
                        ..Default::default()
                    },
                )),
            }],
            failure: vec![],
        })
        .await
    }
}

/// Deletes a contender's key if its request is abandoned before it won (etcd does the same
/// when the client's context ends while waiting).
struct AbandonGuard {
    recipes: Option<(Recipes, Vec<u8>, i64)>,
}

impl AbandonGuard {
    fn disarm(&mut self) {
        self.recipes = None;
    }
}

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        if let Some((r, key, rev)) = self.recipes.take() {
            tokio::spawn(async move {
                let _ = r.delete_if_created_at(&key, rev).await;
            });
        }
    }
}

/// One watcher on the hub, read as a sequence of event batches.
struct KeyWatch {
    _stream: watch::WatchStream,
    rx: mpsc::Receiver<Notice>,
}

impl KeyWatch {
    async fn open(
        hub: &WatchHub,
        key: Vec<u8>,
        range_end: Vec<u8>,
        start_revision: i64,
    ) -> Result<KeyWatch, Status> {
        let (tx, rx) = mpsc::channel(64);
        let stream = hub.open_stream(tx);
        stream
            .watch(WatchSpec {
                key,
                range_end,
                start_revision,
                ..Default::default()
            })
            .await
            .map_err(|e| Status::unavailable(format!("etcdserver: {e}")))?;
        Ok(KeyWatch {
            _stream: stream,
            rx,
        })
    }

    async fn next(&mut self) -> Result<Vec<Event>, Status> {
        loop {
            match self.rx.recv().await {
                Some(Notice::Events { events, .. }) => return Ok(events.to_vec()),
                Some(Notice::Canceled {
                    compact_revision, ..
                }) if compact_revision != 0 => {
                    return Err(Status::out_of_range(
                        "etcdserver: mvcc: required revision has been compacted",
                    ))
                }
                Some(Notice::Canceled { .. }) | Some(Notice::Rejected { .. }) | None => {
                    return Err(Status::unavailable("etcdserver: watch canceled"))
                }
                Some(_) => continue,
            }
        }
    }
}

/// The end of the range of keys starting with `prefix` (etcd's prefix convention).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn create_rev_is(key: &[u8], rev: i64) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Create as i32,
        key: key.to_vec(),
        target_union: Some(compare::TargetUnion::CreateRevision(rev)),
        range_end: Vec::new(),
    }
}

fn op_put(key: &[u8], value: &[u8], lease: i64) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: key.to_vec(),
            value: value.to_vec(),
            lease,
            ..Default::default()
        })),
    }
}

fn op_get(key: &[u8]) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(RangeRequest {
            key: key.to_vec(),
            ..Default::default()
        })),
    }
}

fn first_kv(resp: &TxnResponse) -> Option<KeyValue> {
    resp.responses.first().and_then(|r| match &r.response {
        Some(response_op::Response::ResponseRange(rr)) => rr.kvs.first().cloned(),
        _ => None,
    })
}

fn contender_key(name: &[u8], lease: i64) -> (Vec<u8>, Vec<u8>) {
    let mut prefix = name.to_vec();
    prefix.push(b'/');
    let mut key = prefix.clone();
    key.extend_from_slice(format!("{lease:x}").as_bytes());
    (prefix, key)
}

pub struct LockService {
    r: Recipes,
}

impl LockService {
    pub fn new(gw: Gateway, hub: WatchHub) -> Self {
        LockService {
            r: Recipes { gw, hub },
        }
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    async fn lock(&self, req: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let req = req.into_inner();
        let lease = self.r.lease_or_new(req.lease).await?;
        let (prefix, key) = contender_key(&req.name, lease);
        let (header, my_rev, _) = self.r.claim(&key, b"", lease).await?;
        let mut guard = AbandonGuard {
            recipes: Some((self.r.clone(), key.clone(), my_rev)),
        };
        let owner = self.r.by_create(&prefix, true, 0).await?;
        let header = if owner.kvs.first().map(|kv| kv.create_revision) == Some(my_rev) {
            header
        } else {
            self.r.wait_deletes(&prefix, my_rev - 1).await?
        };
        guard.disarm();
        Ok(Response::new(LockResponse {
            header: Some(header),
            key,
        }))
    }

    async fn unlock(
        &self,
        req: Request<UnlockRequest>,
    ) -> Result<Response<UnlockResponse>, Status> {
        let key = req.into_inner().key;
        let out = self
            .r
            .gw
            .propose(InternalRaftRequest {
                delete_range: Some(DeleteRangeRequest {
                    key,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await?;
        match out {
            ApplyResponse::DeleteRange(mut r) => {
                self.r.gw.headers().fill(&mut r.header, 0);
                Ok(Response::new(UnlockResponse { header: r.header }))
            }
            other => Err(Status::internal(format!("unlock applied as {other:?}"))),
        }
    }
}

pub struct ElectionService {
    r: Recipes,
}

impl ElectionService {
    pub fn new(gw: Gateway, hub: WatchHub) -> Self {
        ElectionService {
            r: Recipes { gw, hub },
        }
    }
}

type ObserveStream = Pin<Box<dyn Stream<Item = Result<LeaderResponse, Status>> + Send>>;

impl ElectionService {
    async fn proclaim_as(&self, leader: &LeaderKey, value: &[u8]) -> Result<TxnResponse, Status> {
        let resp = self
            .r
            .txn(TxnRequest {
                compare: vec![create_rev_is(&leader.key, leader.rev)],
                success: vec![op_put(&leader.key, value, leader.lease)],
                failure: vec![],
            })
            .await?;
        if resp.succeeded {
            Ok(resp)
        } else {
            Err(not_leader())
        }
    }
}

/// Follows the leader of `name`: sends its key-value whenever the leader or its value changes.
async fn observe(r: Recipes, name: Vec<u8>, tx: mpsc::Sender<Result<LeaderResponse, Status>>) {
    let (prefix, _) = contender_key(&name, 0);
    let end = prefix_end(&prefix);
    let send = |header: Option<ResponseHeader>, kv: KeyValue| {
        let tx = tx.clone();
        async move {
            tx.send(Ok(LeaderResponse {
                header,
                kv: Some(kv),
            }))
            .await
            .is_ok()
        }
    };
    loop {
        let first = match r.by_create(&prefix, true, 0).await {
            Ok(f) => f,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        let rev = first.header.as_ref().map_or(0, |h| h.revision);
        let (mut header, mut leader) = match first.kvs.into_iter().next() {
            Some(kv) => (first.header, kv),
            None => {
                // No leader yet: the first put under the prefix is the new leader.
                let Ok(mut w) = KeyWatch::open(&r.hub, prefix.clone(), end.clone(), rev).await
                else {
                    return;
                };
                let kv = loop {
                    let Ok(events) = w.next().await else { return };
                    if let Some(kv) = events
                        .into_iter()
                        .find(|e| e.r#type == EventType::Put as i32)
                        .and_then(|e| e.kv)
                    {
                        break kv;
                    }
                };
                (Some(r.gw.headers().header(kv.mod_revision)), kv)
            }
        };
        if !send(header.take(), leader.clone()).await {
            return;
        }
        // Follow the leader's key until it goes.
        let Ok(mut w) = KeyWatch::open(
            &r.hub,
            leader.key.clone(),
            Vec::new(),
            leader.mod_revision + 1,
        )
        .await
        else {
            return;
        };
        'leader: loop {
            let Ok(events) = w.next().await else { return };
            for e in events {
                if e.r#type == EventType::Delete as i32 {
                    break 'leader;
                }
                if let Some(kv) = e.kv {
                    if kv.value != leader.value {
                        leader = kv;
                        let h = Some(r.gw.headers().header(leader.mod_revision));
                        if !send(h, leader.clone()).await {
                            return;
                        }
                    }
                }
            }
        }
    }
}

#[tonic::async_trait]
impl Election for ElectionService {
    async fn campaign(
        &self,
        req: Request<CampaignRequest>,
    ) -> Result<Response<CampaignResponse>, Status> {
        let req = req.into_inner();
        let lease = self.r.lease_or_new(req.lease).await?;
        let (prefix, key) = contender_key(&req.name, lease);
        let (header, my_rev, current) = self.r.claim(&key, &req.value, lease).await?;
        let mut guard = AbandonGuard {
            recipes: Some((self.r.clone(), key.clone(), my_rev)),
        };
        let leader = LeaderKey {
            name: req.name.clone(),
            key: key.clone(),
            rev: my_rev,
            lease,
        };
        if current != req.value {
            self.proclaim_as(&leader, &req.value).await?;
        }
        self.r.wait_deletes(&prefix, my_rev - 1).await?;
        guard.disarm();
        Ok(Response::new(CampaignResponse {
            header: Some(header),
            leader: Some(leader),
        }))
    }

    async fn proclaim(
        &self,
        req: Request<ProclaimRequest>,
    ) -> Result<Response<ProclaimResponse>, Status> {
        let req = req.into_inner();
        let leader = req.leader.ok_or_else(missing_leader_key)?;
        let resp = self.proclaim_as(&leader, &req.value).await?;
        Ok(Response::new(ProclaimResponse {
            header: resp.header,
        }))
    }

    async fn leader(
        &self,
        req: Request<LeaderRequest>,
    ) -> Result<Response<LeaderResponse>, Status> {
        let (prefix, _) = contender_key(&req.into_inner().name, 0);
        let r = self.r.by_create(&prefix, true, 0).await?;
        let kv = r.kvs.into_iter().next().ok_or_else(no_leader)?;
        Ok(Response::new(LeaderResponse {
            header: r.header,
            kv: Some(kv),
        }))
    }

    type ObserveStream = ObserveStream;

    async fn observe(
        &self,
        req: Request<LeaderRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        let name = req.into_inner().name;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(observe(self.r.clone(), name, tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn resign(
        &self,
        req: Request<ResignRequest>,
    ) -> Result<Response<ResignResponse>, Status> {
        let leader = req.into_inner().leader.ok_or_else(missing_leader_key)?;
        let resp = self.r.delete_if_created_at(&leader.key, leader.rev).await?;
        Ok(Response::new(ResignResponse {
            header: resp.header,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_follow_etcd() {
        assert_eq!(prefix_end(b"lock/"), b"lock0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn contender_keys_are_name_slash_lease_hex() {
        let (prefix, key) = contender_key(b"my-lock", 0x694d7f1a2b3c);
        assert_eq!(prefix, b"my-lock/".to_vec());
        assert_eq!(key, b"my-lock/694d7f1a2b3c".to_vec());
    }
}
