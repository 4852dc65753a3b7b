//! One write request (put, delete, txn) as a unit: every change gets the same main revision,
//! later ops see earlier ones, and nothing is visible to readers until `commit` writes one
//! engine batch and then updates the index.

use std::collections::{BTreeMap, HashMap};

use oxcd_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use oxcd_proto::etcdserverpb::request_op::Request;
use oxcd_proto::etcdserverpb::response_op::Response;
use oxcd_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest,
    RangeResponse, RequestOp, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use oxcd_proto::mvccpb::{event::EventType, Event, KeyValue};

use crate::index::{Change, Generation, KeyRange, Rev};
use crate::META_APPLIED;
use crate::{encode_value, header, range, rev_key, MvccError, MvccStore};

struct Pending {
    key: Vec<u8>,
    kv: KeyValue,
    tombstone: bool,
    /// The key's value before this request (not before an earlier op of the same txn): a
    /// watcher's `prev_kv` is the value at the revision before the event's. Left out (None
    /// although the put's version is above 1) when nothing in the request needed it: a
    /// watcher that wants it loads it, so the common put does not read its old value.
    prev: Option<KeyValue>,
}

pub(crate) struct WriteTxn<'a> {
    store: &'a MvccStore,
    /// Store revision when the request began; its changes get `begin + 1`.
    begin: i64,
    changes: Vec<Pending>,
    /// Latest state of each key this request changed (None = deleted).
    overlay: HashMap<Vec<u8>, Option<KeyValue>>,
}

impl<'a> WriteTxn<'a> {
    pub fn begin(store: &'a MvccStore) -> Self {
        WriteTxn {
            store,
            begin: store.current_revision(),
            changes: Vec::new(),
            overlay: HashMap::new(),
        }
    }

    fn rev(&self) -> i64 {
        self.begin + 1
    }

    /// The revision reads inside this request observe.
    fn view_rev(&self) -> i64 {
        if self.changes.is_empty() {
            self.begin
        } else {
            self.begin + 1
        }
    }

    fn latest(&self, key: &[u8]) -> Result<Option<KeyValue>, MvccError> {
        match self.overlay.get(key) {
            Some(state) => Ok(state.clone()),
            None => self.store.get_at(key, self.begin),
        }
    }

    /// Create revision and version of the key's latest value as this request sees it,
    /// without reading the value.
    fn latest_generation(&self, key: &[u8]) -> Option<Generation> {
        match self.overlay.get(key) {
            Some(state) => state.as_ref().map(Generation::of),
            None => self.store.shared.state.read().index.latest(key),
        }
    }

    /// The key's committed value before this request began, for events.
    fn before_request(&self, key: &[u8], latest: &Option<KeyValue>) -> Option<KeyValue> {
        if !self.overlay.contains_key(key) {
            return latest.clone();
        }
        self.changes
            .iter()
            .find(|c| c.key == key)
            .and_then(|c| c.prev.clone())
    }

    /// `generation` is the key's latest one as this request sees it; `prev` its latest
    /// value when the caller read it (`self.latest(key)`), None when it did not need to.
    fn put(
        &mut self,
        key: &[u8],
        value: Vec<u8>,
        lease: i64,
        generation: Option<Generation>,
        prev: Option<KeyValue>,
    ) -> Result<(), MvccError> {
        let kv = put_value(key, value, lease, generation, self.rev());
        let prev = self.before_request(key, &prev);
        self.overlay.insert(key.to_vec(), Some(kv.clone()));
        self.changes.push(Pending {
            key: key.to_vec(),
            kv,
            tombstone: false,
            prev,
        });
        Ok(())
    }

    fn delete(&mut self, key: &[u8], prev: KeyValue) {
        let kv = KeyValue {
            key: key.to_vec(),
            mod_revision: self.rev(),
            ..Default::default()
        };
        let prev = self.before_request(key, &Some(prev));
        self.overlay.insert(key.to_vec(), None);
        self.changes.push(Pending {
            key: key.to_vec(),
            kv,
            tombstone: true,
            prev,
        });
    }

    /// Live key-values in `kr` as this request sees them at `at` (<= 0: its own view).
    fn collect(
        &self,
        kr: KeyRange<'_>,
        at: i64,
        limit: usize,
        count_only: bool,
    ) -> Result<(Vec<KeyValue>, usize), MvccError> {
        let view = self.view_rev();
        let reads_own = self.overlay.keys().any(|k| kr.contains(k));
        if !reads_own || (at > 0 && at <= self.begin) {
            if at > view {
                return Err(MvccError::FutureRevision);
            }
            return self
                .store
                .collect(kr, at.min(self.begin), limit, count_only);
        }
        if at > view {
            return Err(MvccError::FutureRevision);
        }
        // Merge the committed view with this request's own changes.
        let (base, _) = self.store.collect(kr, self.begin, 0, false)?;
        let mut merged: BTreeMap<Vec<u8>, KeyValue> =
            base.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
        for (k, state) in &self.overlay {
            if !kr.contains(k) {
                continue;
            }
            match state {
                Some(kv) => {
                    merged.insert(k.clone(), kv.clone());
                }
                None => {
                    merged.remove(k);
                }
            }
        }
        let count = merged.len();
        if count_only {
            return Ok((Vec::new(), count));
        }
        let take = if limit == 0 { count } else { limit.min(count) };
        Ok((merged.into_values().take(take).collect(), count))
    }

    fn range_request(&self, r: &RangeRequest) -> Result<RangeResponse, MvccError> {
        let view = self.view_rev();
        range::respond(r, view, |kr, limit, count_only| {
            self.collect(kr, r.revision, limit, count_only)
        })
    }

    pub fn put_request(
        &mut self,
        p: &PutRequest,
        lease_exists: &dyn Fn(i64) -> bool,
    ) -> Result<PutResponse, MvccError> {
        // A plain put checks its lease first, as etcd does.
        if p.lease != 0 && !lease_exists(p.lease) {
            return Err(MvccError::LeaseNotFound);
        }
        if !(p.prev_kv || p.ignore_value || p.ignore_lease) {
            // Nothing here needs the old value: create revision and version come from the
            // index, and a watcher that wants the old value loads it.
            let generation = self.latest_generation(&p.key);
            self.put(&p.key, p.value.clone(), p.lease, generation, None)?;
            return Ok(PutResponse {
                header: header(self.rev()),
                prev_kv: None,
            });
        }
        let prev = self.latest(&p.key)?;
        if (p.ignore_value || p.ignore_lease) && prev.is_none() {
            return Err(MvccError::KeyNotFound);
        }
        let value = match (&prev, p.ignore_value) {
            (Some(prev), true) => prev.value.clone(),
            _ => p.value.clone(),
        };
        let lease = match (&prev, p.ignore_lease) {
            (Some(prev), true) => prev.lease,
            _ => p.lease,
        };
        let prev_kv = if p.prev_kv { prev.clone() } else { None };
        let generation = prev.as_ref().map(Generation::of);
        self.put(&p.key, value, lease, generation, prev)?;
        Ok(PutResponse {
            header: header(self.rev()),
            prev_kv,
        })
    }

    /// etcd's pre-check of a put inside a txn: missing key first, then the lease.
    fn check_txn_put(
        &self,
        p: &PutRequest,
        lease_exists: &dyn Fn(i64) -> bool,
    ) -> Result<(), MvccError> {
        if (p.ignore_value || p.ignore_lease) && self.latest(&p.key)?.is_none() {
            return Err(MvccError::KeyNotFound);
        }
        if p.lease != 0 && !lease_exists(p.lease) {
            return Err(MvccError::LeaseNotFound);
        }
        Ok(())
    }

    /// etcd's pre-check of a range inside a txn, against the state before the txn.
    fn check_txn_range(&self, r: &RangeRequest) -> Result<(), MvccError> {
        if r.revision == 0 {
            return Ok(());
        }
        let st = self.store.shared.state.read();
        if r.revision > self.begin {
            Err(MvccError::FutureRevision)
        } else if r.revision < st.compacted {
            Err(MvccError::Compacted)
        } else {
            Ok(())
        }
    }

    pub fn delete_request(
        &mut self,
        d: &DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse, MvccError> {
        let (found, _) = self.collect(KeyRange::new(&d.key, &d.range_end), 0, 0, false)?;
        let deleted = found.len() as i64;
        for kv in &found {
            let key = kv.key.clone();
            self.delete(&key, kv.clone());
        }
        Ok(DeleteRangeResponse {
            header: header(self.view_rev()),
            deleted,
            prev_kvs: if d.prev_kv { found } else { Vec::new() },
        })
    }

    pub fn txn_request(
        &mut self,
        t: &TxnRequest,
        lease_exists: &dyn Fn(i64) -> bool,
    ) -> Result<TxnResponse, MvccError> {
        // Every compare, nested ones included, is decided on the state before any write.
        let mut path = Vec::new();
        self.decide(t, &mut path)?;
        // Like etcd: every put on the path is checked before any range is.
        let mut cursor = 0;
        self.check_path(t, &path, &mut cursor, &mut |w, op| match op {
            Request::RequestPut(p) => w.check_txn_put(p, lease_exists),
            _ => Ok(()),
        })?;
        let mut cursor = 0;
        self.check_path(t, &path, &mut cursor, &mut |w, op| match op {
            Request::RequestRange(r) => w.check_txn_range(r),
            _ => Ok(()),
        })?;
        let mut cursor = 0;
        let mut resp = self.run(t, &path, &mut cursor, lease_exists)?;
        resp.header = header(self.view_rev());
        Ok(resp)
    }

    fn decide(&self, t: &TxnRequest, path: &mut Vec<bool>) -> Result<(), MvccError> {
        let ok = t
            .compare
            .iter()
            .try_fold(true, |ok, c| Ok::<_, MvccError>(ok && self.compare(c)?))?;
        path.push(ok);
        let ops = if ok { &t.success } else { &t.failure };
        for op in ops {
            if let Some(Request::RequestTxn(inner)) = &op.request {
                self.decide(inner, path)?;
            }
        }
        Ok(())
    }

    fn compare(&self, c: &Compare) -> Result<bool, MvccError> {
        let (kvs, _) =
            match self
                .store
                .collect(KeyRange::new(&c.key, &c.range_end), self.begin, 0, false)
            {
                Ok(r) => r,
                Err(_) => return Ok(false),
            };
        let target = CompareTarget::try_from(c.target).unwrap_or(CompareTarget::Version);
        if kvs.is_empty() {
            if target == CompareTarget::Value {
                return Ok(false);
            }
            return Ok(compare_kv(c, target, &KeyValue::default()));
        }
        Ok(kvs.iter().all(|kv| compare_kv(c, target, kv)))
    }

    /// Validates the ops on the chosen path before anything is written, so a txn fails whole.
    fn check_path(
        &self,
        t: &TxnRequest,
        path: &[bool],
        cursor: &mut usize,
        check: &mut dyn FnMut(&Self, &Request) -> Result<(), MvccError>,
    ) -> Result<(), MvccError> {
        let ops = if path[*cursor] {
            &t.success
        } else {
            &t.failure
        };
        *cursor += 1;
        for op in ops {
            match &op.request {
                Some(Request::RequestTxn(inner)) => self.check_path(inner, path, cursor, check)?,
                Some(other) => check(self, other)?,
                None => {}
            }
        }
        Ok(())
    }

    fn run(
        &mut self,
        t: &TxnRequest,
        path: &[bool],
        cursor: &mut usize,
        lease_exists: &dyn Fn(i64) -> bool,
    ) -> Result<TxnResponse, MvccError> {
        let succeeded = path[*cursor];
        *cursor += 1;
        let ops: &[RequestOp] = if succeeded { &t.success } else { &t.failure };
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            let response = match &op.request {
                Some(Request::RequestRange(r)) => {
                    Some(Response::ResponseRange(self.range_request(r)?))
                }
                Some(Request::RequestPut(p)) => {
                    Some(Response::ResponsePut(self.put_request(p, lease_exists)?))
                }
                Some(Request::RequestDeleteRange(d)) => {
                    Some(Response::ResponseDeleteRange(self.delete_request(d)?))
                }
                Some(Request::RequestTxn(inner)) => {
                    let mut r = self.run(inner, path, cursor, lease_exists)?;
                    // Nested txn headers stay empty, as etcd leaves them.
                    r.header = Some(ResponseHeader::default());
                    Some(Response::ResponseTxn(r))
                }
                None => None,
            };
            responses.push(ResponseOp { response });
        }
        Ok(TxnResponse {
            header: None,
            succeeded,
            responses,
        })
    }

    /// Writes the changes and the raft index in one batch, then makes them visible.
    pub fn commit(self, index: u64) -> Result<(i64, Vec<Event>), MvccError> {
        let shared = &self.store.shared;
        let mut batch = self.store.take_staged();
        let rev = self.rev();
        for (sub, c) in self.changes.iter().enumerate() {
            let r = Rev {
                main: rev,
                sub: sub as i64,
            };
            batch.put(rev_key(r).to_vec(), encode_value(&c.kv, c.tombstone));
        }
        if index != 0 {
            batch.put(META_APPLIED, (index as i64).to_be_bytes().to_vec());
        }
        if batch.is_empty() {
            return Ok((self.begin, Vec::new()));
        }
        shared.engine.write(batch)?;
        if index != 0 {
            shared
                .applied
                .store(index, std::sync::atomic::Ordering::Release);
        }
        if self.changes.is_empty() {
            return Ok((self.begin, Vec::new()));
        }
        let mut events = Vec::with_capacity(self.changes.len());
        {
            let mut st = shared.state.write();
            for (sub, c) in self.changes.iter().enumerate() {
                st.index.insert(
                    &c.key,
                    Change {
                        rev: Rev {
                            main: rev,
                            sub: sub as i64,
                        },
                        tombstone: c.tombstone,
                    },
                );
            }
            st.current = rev;
        }
        for c in self.changes {
            events.push(Event {
                r#type: if c.tombstone {
                    EventType::Delete as i32
                } else {
                    EventType::Put as i32
                },
                kv: Some(c.kv),
                prev_kv: c.prev,
            });
        }
        Ok((rev, events))
    }
}

/// The value a put at revision `rev` stores, given the key's latest generation (None: the key
/// has no live value, so the put starts a new one).
pub(crate) fn put_value(
    key: &[u8],
    value: Vec<u8>,
    lease: i64,
    generation: Option<Generation>,
    rev: i64,
) -> KeyValue {
    let (create, version) = match generation {
        Some(g) => (g.create, g.version + 1),
        None => (rev, 1),
    };
    KeyValue {
        key: key.to_vec(),
        create_revision: create,
        mod_revision: rev,
        version,
        value,
        lease,
    }
}

fn compare_kv(c: &Compare, target: CompareTarget, kv: &KeyValue) -> bool {
    let ord = match target {
        CompareTarget::Value => {
            let want: &[u8] = match &c.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_slice().cmp(want)
        }
        CompareTarget::Create => kv.create_revision.cmp(&int_target(c)),
        CompareTarget::Mod => kv.mod_revision.cmp(&int_target(c)),
        CompareTarget::Version => kv.version.cmp(&int_target(c)),
        CompareTarget::Lease => kv.lease.cmp(&int_target(c)),
    };
    match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => ord.is_eq(),
        Ok(CompareResult::NotEqual) => ord.is_ne(),
        Ok(CompareResult::Greater) => ord.is_gt(),
        Ok(CompareResult::Less) => ord.is_lt(),
        Err(_) => true,
    }
}

/// The integer a compare names; a missing or mismatched union compares against 0, as etcd does.
fn int_target(c: &Compare) -> i64 {
    let target = CompareTarget::try_from(c.target).unwrap_or(CompareTarget::Version);
    match (&c.target_union, target) {
        (Some(TargetUnion::Version(v)), CompareTarget::Version) => *v,
        (Some(TargetUnion::CreateRevision(v)), CompareTarget::Create) => *v,
        (Some(TargetUnion::ModRevision(v)), CompareTarget::Mod) => *v,
        (Some(TargetUnion::Lease(v)), CompareTarget::Lease) => *v,
        _ => 0,
    }
}
