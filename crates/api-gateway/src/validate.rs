//! Request checks done before anything reaches raft, with etcd's rules and errors.

use oxcd_proto::etcdserverpb::{
    request_op::Request, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};

use crate::errors::GatewayError;

pub fn check_range(r: &RangeRequest) -> Result<(), GatewayError> {
    if r.key.is_empty() {
        return Err(GatewayError::EmptyKey);
    }
    Ok(())
}

pub fn check_put(r: &PutRequest) -> Result<(), GatewayError> {
    if r.key.is_empty() {
        return Err(GatewayError::EmptyKey);
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(GatewayError::ValueProvided);
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(GatewayError::LeaseProvided);
    }
    Ok(())
}

pub fn check_delete(r: &DeleteRangeRequest) -> Result<(), GatewayError> {
    if r.key.is_empty() {
        return Err(GatewayError::EmptyKey);
    }
    Ok(())
}

/// Size and shape of a txn, then the put/delete overlap rule for both branches.
pub fn check_txn(r: &TxnRequest, max_txn_ops: usize) -> Result<(), GatewayError> {
    check_txn_shape(r, max_txn_ops as i64)?;
    check_overlaps(&r.success)?;
    check_overlaps(&r.failure)?;
    Ok(())
}

fn check_txn_shape(r: &TxnRequest, max_ops: i64) -> Result<(), GatewayError> {
    let ops = r.compare.len().max(r.success.len()).max(r.failure.len()) as i64;
    if ops > max_ops {
        return Err(GatewayError::TooManyOps);
    }
    if r.compare.iter().any(|c| c.key.is_empty()) {
        return Err(GatewayError::EmptyKey);
    }
    for op in r.success.iter().chain(r.failure.iter()) {
        // Nested txns share the budget left by their parent, as etcd counts them.
        check_op(op, max_ops - ops)?;
    }
    Ok(())
}

fn check_op(op: &RequestOp, max_ops: i64) -> Result<(), GatewayError> {
    match &op.request {
        Some(Request::RequestRange(r)) => check_range(r),
        Some(Request::RequestPut(r)) => check_put(r),
        Some(Request::RequestDeleteRange(r)) => check_delete(r),
        Some(Request::RequestTxn(t)) => check_txn_shape(t, max_ops),
        None => Err(GatewayError::KeyNotFound),
    }
}

/// A deleted interval; an empty `end` means the single key `start`.
#[derive(Clone)]
struct Deleted {
    start: Vec<u8>,
    end: Vec<u8>,
}

impl Deleted {
    fn contains(&self, key: &[u8]) -> bool {
        if self.end.is_empty() {
            self.start == key
        } else {
            self.start.as_slice() <= key && key < self.end.as_slice()
        }
    }
}

type Puts = std::collections::HashSet<Vec<u8>>;

/// Within one branch, no key may be put twice or both put and deleted (the result would
/// depend on op order in a way etcd forbids); then/else of a nested txn are exclusive.
fn check_overlaps(reqs: &[RequestOp]) -> Result<(Puts, Vec<Deleted>), GatewayError> {
    let mut dels: Vec<Deleted> = reqs
        .iter()
        .filter_map(|op| match &op.request {
            Some(Request::RequestDeleteRange(d)) => Some(Deleted {
                start: d.key.clone(),
                end: d.range_end.clone(),
            }),
            _ => None,
        })
        .collect();
    let deleted = |dels: &[Deleted], k: &[u8]| dels.iter().any(|d| d.contains(k));

    let mut puts = Puts::new();
    for op in reqs {
        let Some(Request::RequestTxn(t)) = &op.request else {
            continue;
        };
        let (puts_then, dels_then) = check_overlaps(&t.success)?;
        let (puts_else, dels_else) = check_overlaps(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || deleted(&dels, k) {
                return Err(GatewayError::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        for k in puts_else {
            if puts.contains(&k) && !puts_then.contains(&k) {
                return Err(GatewayError::DuplicateKey);
            }
            if deleted(&dels, &k) {
                return Err(GatewayError::DuplicateKey);
            }
            puts.insert(k);
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in reqs {
        let Some(Request::RequestPut(p)) = &op.request else {
            continue;
        };
        if puts.contains(&p.key) || deleted(&dels, &p.key) {
            return Err(GatewayError::DuplicateKey);
        }
        puts.insert(p.key.clone());
    }
    Ok((puts, dels))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: k.into(),
                ..Default::default()
            })),
        }
    }
    fn del(k: &str, end: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                key: k.into(),
                range_end: end.into(),
                ..Default::default()
            })),
        }
    }
    fn txn(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> TxnRequest {
        TxnRequest {
            compare: vec![],
            success,
            failure,
        }
    }

    #[test]
    fn duplicate_puts_and_put_over_delete_are_refused() {
        assert_eq!(
            check_txn(&txn(vec![put("a"), put("a")], vec![]), 128),
            Err(GatewayError::DuplicateKey)
        );
        assert_eq!(
            check_txn(&txn(vec![del("a", "c"), put("b")], vec![]), 128),
            Err(GatewayError::DuplicateKey)
        );
        assert!(check_txn(&txn(vec![del("a", "c"), put("c")], vec![]), 128).is_ok());
        // The same key in both branches is fine: only one runs.
        assert!(check_txn(&txn(vec![put("a")], vec![put("a")]), 128).is_ok());
    }

    #[test]
    fn nested_then_else_may_share_keys_but_not_with_parent() {
        let nested = RequestOp {
            request: Some(Request::RequestTxn(txn(vec![put("k")], vec![put("k")]))),
        };
        assert!(check_txn(&txn(vec![nested.clone()], vec![]), 128).is_ok());
        assert_eq!(
            check_txn(&txn(vec![nested, put("k")], vec![]), 128),
            Err(GatewayError::DuplicateKey)
        );
    }

    #[test]
    fn op_count_and_empty_keys() {
        let ops: Vec<_> = (0..3).map(|i| put(&format!("k{i}"))).collect();
        assert_eq!(
            check_txn(&txn(ops.clone(), vec![]), 2),
            Err(GatewayError::TooManyOps)
        );
        assert!(check_txn(&txn(ops, vec![]), 3).is_ok());
        assert_eq!(
            check_txn(&txn(vec![put("")], vec![]), 128),
            Err(GatewayError::EmptyKey)
        );
        assert_eq!(
            check_txn(&txn(vec![RequestOp { request: None }], vec![]), 128),
            Err(GatewayError::KeyNotFound)
        );
        let bad_put = PutRequest {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            ignore_value: true,
            ..Default::default()
        };
        assert_eq!(check_put(&bad_put), Err(GatewayError::ValueProvided));
    }
}
