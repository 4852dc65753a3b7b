//! Alarms and the backend quota, as etcd 3.4 has them (its `v3alarm` store and `backendQuota`).
//!
//! An alarm is a (member, alarm type) pair raised and cleared only through raft, so every
//! member applies the same set. The applier keeps it in the storage engine under a prefix of
//! its own, so a restart (or an installed snapshot) brings it back; while a NOSPACE alarm is
//! set anywhere in the cluster, every member refuses what would grow the store (puts, txns
//! with puts, lease grants), while a CORRUPT alarm refuses every write.
//!
//! Records are plain sets and deletes written before the entry's applied index, so replaying
//! an entry after a crash gives the same set.

use std::collections::BTreeSet;
use std::sync::Arc;

use mvcc_store::{KvEngine, WriteBatch};
use oxcd_proto::etcdserverpb::{
    request_op, AlarmMember, AlarmType, InternalRaftRequest, PutRequest,
};
use parking_lot::RwLock;
use tokio::sync::Notify;

const PREFIX: u8 = b'a';

fn key(member: u64, alarm: i32) -> Vec<u8> {
    let mut k = Vec::with_capacity(13);
    k.push(PREFIX);
    k.extend_from_slice(&member.to_be_bytes());
    k.extend_from_slice(&alarm.to_be_bytes());
    k
}

#[derive(thiserror::Error, Debug)]
pub enum AlarmError {
    #[error("alarm records: {0}")]
    Store(String),
}

/// The applied alarms, shared by the applier (which changes them) and the services (which
/// list them and refuse writes early). Cheap to clone.
#[derive(Clone)]
pub struct Alarms {
    engine: Arc<dyn KvEngine>,
    /// (member id, alarm type as on the wire).
    set: Arc<RwLock<BTreeSet<(u64, i32)>>>,
    /// Signalled when applying found the backend over its quota, so the server raises this
    /// member's NOSPACE alarm through raft (the applier itself cannot propose).
    exceeded: Arc<Notify>,
}

impl Alarms {
    pub fn open(engine: Arc<dyn KvEngine>) -> Result<Self, AlarmError> {
        let set = load(&*engine)?;
        Ok(Alarms {
            engine,
            set: Arc::new(RwLock::new(set)),
            exceeded: Arc::new(Notify::new()),
        })
    }

    /// Reads the records again (the engine's content was replaced by a snapshot).
    pub fn reload(&self) -> Result<(), AlarmError> {
        *self.set.write() = load(&*self.engine)?;
        Ok(())
    }

    /// Every alarm of type `alarm`; `AlarmType::None` selects all of them, as in etcd.
    pub fn get(&self, alarm: i32) -> Vec<AlarmMember> {
        self.set
            .read()
            .iter()
            .filter(|(_, a)| alarm == AlarmType::None as i32 || *a == alarm)
            .map(|&(member_id, alarm)| AlarmMember { member_id, alarm })
            .collect()
    }

    /// True when some member has an alarm of this type.
    pub fn active(&self, alarm: AlarmType) -> bool {
        self.set.read().iter().any(|(_, a)| *a == alarm as i32)
    }

    pub fn has(&self, member: u64, alarm: AlarmType) -> bool {
        self.set.read().contains(&(member, alarm as i32))
    }

    /// Raises `alarm` for `member`; raising it again changes nothing. Returns the alarm.
    pub fn activate(&self, member: u64, alarm: i32) -> Result<AlarmMember, AlarmError> {
        if !self.set.read().contains(&(member, alarm)) {
            let mut batch = WriteBatch::default();
            batch.put(key(member, alarm), Vec::new());
            self.engine
                .write(batch)
                .map_err(|e| AlarmError::Store(e.to_string()))?;
            self.set.write().insert((member, alarm));
        }
        Ok(AlarmMember {
            member_id: member,
            alarm,
        })
    }

    /// Clears `alarm` of `member`; `None` if it was not raised.
    pub fn deactivate(&self, member: u64, alarm: i32) -> Result<Option<AlarmMember>, AlarmError> {
        if !self.set.read().contains(&(member, alarm)) {
            return Ok(None);
        }
        let mut batch = WriteBatch::default();
        batch.delete(key(member, alarm));
        self.engine
            .write(batch)
            .map_err(|e| AlarmError::Store(e.to_string()))?;
        self.set.write().remove(&(member, alarm));
        Ok(Some(AlarmMember {
            member_id: member,
            alarm,
        }))
    }

    /// Called by the applier when a write found the backend over its quota.
    pub fn report_exceeded(&self) {
        self.exceeded.notify_one();
    }

    /// Resolves at the next `report_exceeded` (or at once if one is pending).
    pub async fn exceeded(&self) {
        self.exceeded.notified().await
    }
}

/// An alarm as etcd's Status lists it in `errors`: Go's compact protobuf text of the
/// `AlarmMember` (zero fields left out, each field followed by a space).
pub fn alarm_text(a: &AlarmMember) -> String {
    let mut s = String::new();
    if a.member_id != 0 {
        s.push_str(&format!("memberID:{} ", a.member_id));
    }
    if a.alarm != 0 {
        match AlarmType::try_from(a.alarm) {
            Ok(t) => s.push_str(&format!("alarm:{} ", t.as_str_name())),
            Err(_) => s.push_str(&format!("alarm:{} ", a.alarm)),
        }
    }
    s
}

fn load(engine: &dyn KvEngine) -> Result<BTreeSet<(u64, i32)>, AlarmError> {
    let mut set = BTreeSet::new();
    let mut bad = None;
    engine
        .scan(&[PREFIX], &[PREFIX + 1], &mut |k, _| {
            if k.len() != 13 {
                bad = Some(format!("alarm record under a {}-byte key", k.len()));
                return false;
            }
            let member = u64::from_be_bytes(k[1..9].try_into().expect("8 bytes"));
            let alarm = i32::from_be_bytes(k[9..13].try_into().expect("4 bytes"));
            set.insert((member, alarm));
            true
        })
        .map_err(|e| AlarmError::Store(e.to_string()))?;
    match bad {
        Some(reason) => Err(AlarmError::Store(reason)),
        None => Ok(set),
    }
}

/// etcd's default backend quota (`--quota-backend-bytes` 0).
pub const DEFAULT_QUOTA_BYTES: i64 = 2 * 1024 * 1024 * 1024;
/// Above this etcd warns that performance may suffer; it still uses the given quota.
pub const MAX_QUOTA_BYTES: i64 = 8 * 1024 * 1024 * 1024;
/// etcd's estimates of what storing a lease and a key's metadata cost.
const LEASE_OVERHEAD: u64 = 64;
const KV_OVERHEAD: u64 = 256;

/// The backend quota: how large the storage engine may grow before writes that would grow it
/// further are refused and a NOSPACE alarm is raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// `--quota-backend-bytes` as given (negative: quota disabled; 0: the default).
    pub flag: i64,
}

impl Quota {
    pub fn from_flag(flag: i64) -> Quota {
        Quota { flag }
    }

    /// The limit in bytes, `None` when the quota is disabled.
    pub fn limit(&self) -> Option<i64> {
        match self.flag {
            f if f < 0 => None,
            0 => Some(DEFAULT_QUOTA_BYTES),
            f => Some(f),
        }
    }

    /// What etcd exports as `etcd_server_quota_backend_bytes`: the limit, or the (negative)
    /// flag when the quota is disabled.
    pub fn gauge(&self) -> i64 {
        self.limit().unwrap_or(self.flag)
    }

    /// Whether a request of `cost` fits next to a backend of `size` bytes (requests that cost
    /// nothing always fit).
    pub fn available(&self, size: i64, cost: u64) -> bool {
        match self.limit() {
            None => true,
            Some(_) if cost == 0 => true,
            Some(limit) => size.saturating_add(cost as i64) < limit,
        }
    }
}

impl Default for Quota {
    fn default() -> Self {
        Quota::from_flag(0)
    }
}

fn put_cost(p: &PutRequest) -> u64 {
    KV_OVERHEAD + p.key.len() as u64 + p.value.len() as u64
}

/// What a request costs against the quota, as etcd reckons it: puts by key and value size
/// plus overhead, a txn by the costlier of its branches (top-level puts only, as in etcd),
/// a lease grant a fixed overhead; everything else nothing.
pub fn request_cost(req: &InternalRaftRequest) -> u64 {
    if let Some(p) = &req.put {
        return put_cost(p);
    }
    if let Some(t) = &req.txn {
        let branch = |ops: &[oxcd_proto::etcdserverpb::RequestOp]| -> u64 {
            ops.iter()
                .map(|op| match &op.request {
                    Some(request_op::Request::RequestPut(p)) => put_cost(p),
                    _ => 0,
                })
                .sum()
        };
        return branch(&t.success).max(branch(&t.failure));
    }
    if req.lease_grant.is_some() {
        return LEASE_OVERHEAD;
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvcc_store::MemEngine;
    use oxcd_proto::etcdserverpb::{LeaseGrantRequest, RequestOp, TxnRequest};

    const NOSPACE: i32 = AlarmType::Nospace as i32;
    const CORRUPT: i32 = AlarmType::Corrupt as i32;

    #[test]
    fn alarms_persist_and_reload() {
        let engine: Arc<dyn KvEngine> = Arc::new(MemEngine::default());
        let a = Alarms::open(engine.clone()).unwrap();
        assert!(!a.active(AlarmType::Nospace));
        assert_eq!(a.activate(7, NOSPACE).unwrap().member_id, 7);
        // Raising again is harmless; another member's alarm of the same type is its own.
        a.activate(7, NOSPACE).unwrap();
        a.activate(3, NOSPACE).unwrap();
        a.activate(3, CORRUPT).unwrap();
        assert!(a.active(AlarmType::Nospace) && a.has(7, AlarmType::Nospace));
        assert_eq!(a.get(AlarmType::None as i32).len(), 3);
        assert_eq!(
            a.get(CORRUPT),
            vec![AlarmMember {
                member_id: 3,
                alarm: CORRUPT
            }]
        );

        let again = Alarms::open(engine.clone()).unwrap();
        assert_eq!(
            again.get(AlarmType::None as i32),
            a.get(AlarmType::None as i32)
        );
        assert_eq!(
            again.deactivate(3, NOSPACE).unwrap(),
            Some(AlarmMember {
                member_id: 3,
                alarm: NOSPACE
            })
        );
        assert_eq!(again.deactivate(3, NOSPACE).unwrap(), None);
        again.deactivate(7, NOSPACE).unwrap();
        assert!(!again.active(AlarmType::Nospace));
        // The first handle sees the change only after a reload (as after a snapshot install).
        assert!(a.active(AlarmType::Nospace));
        a.reload().unwrap();
        assert!(!a.active(AlarmType::Nospace) && a.active(AlarmType::Corrupt));
    }

    #[test]
    fn alarm_text_is_gos_compact_text() {
        let a = AlarmMember {
            member_id: 2709736841269262526,
            alarm: NOSPACE,
        };
        assert_eq!(
            alarm_text(&a),
            "memberID:2709736841269262526 alarm:NOSPACE "
        );
        assert_eq!(
            alarm_text(&AlarmMember {
                member_id: 0,
                alarm: CORRUPT
            }),
            "alarm:CORRUPT "
        );
    }

    #[test]
    fn quota_limits_and_costs_follow_etcd() {
        assert_eq!(Quota::from_flag(0).limit(), Some(DEFAULT_QUOTA_BYTES));
        assert_eq!(Quota::from_flag(-1).limit(), None);
        assert_eq!(Quota::from_flag(-1).gauge(), -1);
        assert_eq!(Quota::from_flag(100).gauge(), 100);
        let q = Quota::from_flag(1000);
        assert!(q.available(700, 299));
        assert!(!q.available(700, 300));
        assert!(q.available(5000, 0));
        assert!(Quota::from_flag(-5).available(i64::MAX, 1 << 40));

        let put = |k: &str, v: &str| PutRequest {
            key: k.into(),
            value: v.into(),
            ..Default::default()
        };
        let req = InternalRaftRequest {
            put: Some(put("ab", "cde")),
            ..Default::default()
        };
        assert_eq!(request_cost(&req), 256 + 5);
        let op = |p| RequestOp {
            request: Some(request_op::Request::RequestPut(p)),
        };
        let txn = InternalRaftRequest {
            txn: Some(TxnRequest {
                success: vec![op(put("a", "b"))],
                failure: vec![op(put("a", "bb")), op(put("c", ""))],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(request_cost(&txn), 259 + 257);
        let read_only = InternalRaftRequest {
            txn: Some(TxnRequest::default()),
            ..Default::default()
        };
        assert_eq!(request_cost(&read_only), 0);
        let grant = InternalRaftRequest {
            lease_grant: Some(LeaseGrantRequest { ttl: 5, id: 1 }),
            ..Default::default()
        };
        assert_eq!(request_cost(&grant), 64);
    }
}
