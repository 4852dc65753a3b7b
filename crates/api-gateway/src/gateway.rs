//! What every service needs to reach the layers below: the raft command channel, the store for
//! reads, the applied index, and this member's identity. Cheap to clone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use applier::{
    encode_request, request_cost, Alarms, ApplyError, ApplyResponse, Membership, MvccStore, Quota,
    Responder,
};
use oxcd_proto::etcdserverpb::{
    alarm_request::AlarmAction, AlarmRequest, AlarmType, InternalRaftRequest, Member, RangeRequest,
    RangeResponse, RequestHeader,
};
use raft_node::{RaftCommand, RaftStatus};
use tokio::sync::{mpsc, oneshot, watch};

use crate::errors::{GatewayError, StatusError};
use crate::header::HeaderSource;

#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest encoded request accepted into the log (`--max-request-bytes`).
    pub max_request_bytes: usize,
    /// `--max-txn-ops`.
    pub max_txn_ops: usize,
    /// How long a client waits for its proposal or read barrier.
    pub request_timeout: Duration,
    /// `--quota-backend-bytes`.
    pub quota: Quota,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: 1536 * 1024,
            max_txn_ops: 128,
            request_timeout: Duration::from_secs(7),
            quota: Quota::default(),
        }
    }
}

/// The version of etcd whose API this server speaks; clients gate features on it.
pub const ETCD_VERSION: &str = "3.5.17";
pub const ETCD_CLUSTER_VERSION: &str = "3.5.0";

#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    raft: mpsc::Sender<RaftCommand<Responder>>,
    store: MvccStore,
    applied: watch::Receiver<u64>,
    headers: HeaderSource,
    limits: Limits,
    members: Membership,
    alarms: Alarms,
    next_id: AtomicU64,
    /// Dials the leader's peer URLs for forwarded requests (TLS for `https://` ones).
    leader_dialer: oxcd_tls::Connector,
}

impl Gateway {
    pub fn new(
        raft: mpsc::Sender<RaftCommand<Responder>>,
        store: MvccStore,
        applied: watch::Receiver<u64>,
        headers: HeaderSource,
        limits: Limits,
        members: Membership,
        alarms: Alarms,
    ) -> Self {
        log_quota(limits.quota);
        metrics::gauge!("etcd_server_quota_backend_bytes").set(limits.quota.gauge() as f64);
        // Served from the start, as etcd does, so dashboards and alerts see 0 rather than nothing.
        metrics::gauge!("etcd_server_proposals_pending").increment(0.0);
        metrics::counter!("etcd_server_proposals_failed_total").increment(0);
        // Request ids: member id prefix, time, then a counter (unique across restarts in practice).
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let first = ((headers.member_id & 0xffff) << 48) | ((millis & 0xff_ffff_ffff) << 8);
        Gateway {
            inner: Arc::new(Inner {
                raft,
                store,
                applied,
                headers,
                limits,
                members,
                alarms,
                next_id: AtomicU64::new(first),
                leader_dialer: oxcd_tls::Connector::default(),
            }),
        }
    }

    /// Forwarded requests dial the leader with `dialer`. Set once, before the gateway is cloned.
    pub fn with_leader_dialer(mut self, dialer: oxcd_tls::Connector) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.leader_dialer = dialer,
            None => tracing::error!("leader dialer set after the gateway was shared; ignored"),
        }
        self
    }

    pub(crate) fn leader_dialer(&self) -> oxcd_tls::Connector {
        self.inner.leader_dialer.clone()
    }

    pub fn store(&self) -> &MvccStore {
        &self.inner.store
    }

    pub fn headers(&self) -> &HeaderSource {
        &self.inner.headers
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// The members as the applied log says, in id order.
    pub fn members(&self) -> Vec<Member> {
        self.inner.members.list()
    }

    pub fn membership(&self) -> &Membership {
        &self.inner.members
    }

    /// The alarms as the applied log says.
    pub fn alarms(&self) -> &Alarms {
        &self.inner.alarms
    }

    /// etcd's quota check in front of Put, Txn and LeaseGrant: a request of `cost` that would
    /// take the backend over its quota is refused with NOSPACE, after this member's NOSPACE
    /// alarm has been proposed (so that every member refuses such writes from then on).
    pub async fn check_quota(&self, cost: u64) -> Result<(), StatusError> {
        let quota = self.inner.limits.quota;
        if cost == 0 || quota.limit().is_none() {
            return Ok(());
        }
        if quota.available(self.store().db_size(), cost) {
            return Ok(());
        }
        self.raise_nospace().await;
        Err(GatewayError::NoSpace.into())
    }

    /// Proposes this member's NOSPACE alarm unless it is already applied. Best effort, as in
    /// etcd: the caller reports NOSPACE whatever came of it.
    async fn raise_nospace(&self) {
        let me = self.headers().member_id;
        if self.inner.alarms.has(me, AlarmType::Nospace) {
            return;
        }
        let req = InternalRaftRequest {
            alarm: Some(AlarmRequest {
                action: AlarmAction::Activate as i32,
                member_id: me,
                alarm: AlarmType::Nospace as i32,
            }),
            ..Default::default()
        };
        // Boxed: proposing may come back here (an answer of NOSPACE raises the alarm).
        if let Err(e) = Box::pin(self.propose_within_quota(req)).await {
            tracing::warn!(status = %e.0, "NOSPACE alarm not raised");
        }
    }

    /// Raises this member's NOSPACE alarm whenever the applier found a write over the quota
    /// (on any member, whoever proposed the write). Runs until the server stops.
    pub async fn raise_alarms(self) {
        loop {
            self.inner.alarms.exceeded().await;
            self.raise_nospace().await;
        }
    }

    /// Sends one request through raft and waits for the applier's answer. Requests that
    /// would grow the store pass the quota check first.
    pub async fn propose(&self, req: InternalRaftRequest) -> Result<ApplyResponse, StatusError> {
        self.check_quota(request_cost(&req)).await?;
        self.propose_within_quota(req).await
    }

    /// `propose` for a caller that has already checked the quota (or a request that costs
    /// nothing).
    pub async fn propose_within_quota(
        &self,
        mut req: InternalRaftRequest,
    ) -> Result<ApplyResponse, StatusError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        req.id = id;
        req.header = Some(RequestHeader {
            id,
            ..Default::default()
        });
        let data = encode_request(&req);
        if data.len() > self.inner.limits.max_request_bytes {
            return Err(GatewayError::RequestTooLarge.into());
        }
        let (tx, rx) = oneshot::channel();
        self.send(RaftCommand::Propose { data, reply: tx }).await?;
        metrics::gauge!("etcd_server_proposals_pending").increment(1.0);
        let outcome = tokio::time::timeout(self.inner.limits.request_timeout, rx).await;
        metrics::gauge!("etcd_server_proposals_pending").decrement(1.0);
        match outcome {
            Ok(Ok(Err(ApplyError::NoSpace))) => {
                // Applied over the quota: as etcd, the client hears of it once the alarm is
                // up (refused because one already is: nothing to raise).
                if !self.inner.alarms.active(AlarmType::Nospace) {
                    self.raise_nospace().await;
                }
                Err(GatewayError::NoSpace.into())
            }
            Ok(Ok(result)) => Ok(result?),
            // raft dropped the proposal (lost leadership, or it was superseded in the log).
            Ok(Err(_)) => {
                metrics::counter!("etcd_server_proposals_failed_total").increment(1);
                Err(GatewayError::LeaderChanged.into())
            }
            Err(_) => {
                metrics::counter!("etcd_server_proposals_failed_total").increment(1);
                Err(GatewayError::Timeout.into())
            }
        }
    }

    /// Proposes a raft membership change and waits until it is applied everywhere it must be
    /// (here: applied on this member, which then serves the new member list).
    pub async fn propose_conf_change(
        &self,
        change: raft_node::ConfChange,
    ) -> Result<ApplyResponse, StatusError> {
        let (tx, rx) = oneshot::channel();
        self.send(RaftCommand::ProposeConfChange { change, reply: tx })
            .await?;
        match tokio::time::timeout(self.inner.limits.request_timeout, rx).await {
            Ok(Ok(result)) => Ok(result?),
            Ok(Err(_)) => Err(GatewayError::LeaderChanged.into()),
            Err(_) => Err(GatewayError::Timeout.into()),
        }
    }

    pub async fn transfer_leader(&self, to: u64) -> Result<(), StatusError> {
        self.send(RaftCommand::TransferLeader { to }).await
    }

    /// Linearizable read barrier: learn the commit index through raft (ReadIndex), then wait
    /// until the applier has applied at least that far.
    pub async fn read_barrier(&self) -> Result<(), StatusError> {
        let timeout = self.inner.limits.request_timeout;
        let (tx, rx) = oneshot::channel();
        self.send(RaftCommand::ReadIndex { reply: tx }).await?;
        let index = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r?,
            Ok(Err(_)) => return Err(GatewayError::Stopped.into()),
            Err(_) => return Err(GatewayError::Timeout.into()),
        };
        let mut applied = self.inner.applied.clone();
        let waited = tokio::time::timeout(timeout, applied.wait_for(|a| *a >= index)).await;
        match waited {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(GatewayError::Stopped.into()),
            Err(_) => Err(GatewayError::Timeout.into()),
        }
    }

    /// A Range as every service serves it: behind a read barrier unless serializable, with the
    /// response header filled.
    pub async fn range(&self, req: &RangeRequest) -> Result<RangeResponse, StatusError> {
        if !req.serializable {
            self.read_barrier().await?;
        }
        let store = self.store();
        let mut resp = store.range(req)?;
        self.headers()
            .fill(&mut resp.header, store.current_revision());
        Ok(resp)
    }

    pub async fn raft_status(&self) -> Result<RaftStatus, StatusError> {
        let (tx, rx) = oneshot::channel();
        self.send(RaftCommand::Status { reply: tx }).await?;
        rx.await.map_err(|_| GatewayError::Stopped.into())
    }

    pub fn applied_index(&self) -> u64 {
        *self.inner.applied.borrow()
    }

    async fn send(&self, cmd: RaftCommand<Responder>) -> Result<(), StatusError> {
        self.inner
            .raft
            .send(cmd)
            .await
            .map_err(|_| GatewayError::Stopped.into())
    }
}

/// etcd's start-up messages about the quota.
fn log_quota(quota: Quota) {
    match quota.limit() {
        None => tracing::info!(quota_size_bytes = quota.flag, "disabled backend quota"),
        Some(limit) if quota.flag == 0 => tracing::info!(
            quota_size_bytes = limit,
            "enabled backend quota with default value"
        ),
        Some(limit) => {
            if limit > applier::MAX_QUOTA_BYTES {
                tracing::warn!(
                    quota_size_bytes = limit,
                    quota_maximum_size_bytes = applier::MAX_QUOTA_BYTES,
                    "quota exceeds the maximum value"
                );
            }
            tracing::info!(quota_size_bytes = limit, "enabled backend quota");
        }
    }
}
