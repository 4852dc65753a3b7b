//! Request validation runs on every write before it reaches raft: a maximal txn (128 ops,
//! nested branches) must stay cheap.

use api_gateway::validate::check_txn;
use criterion::{criterion_group, criterion_main, Criterion};
use oxcd_proto::etcdserverpb::{
    request_op::Request, DeleteRangeRequest, PutRequest, RequestOp, TxnRequest,
};

fn put(k: String) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(PutRequest {
            key: k.into_bytes(),
            value: b"v".to_vec(),
            ..Default::default()
        })),
    }
}

fn validate(c: &mut Criterion) {
    let mut success: Vec<RequestOp> = (0..120).map(|i| put(format!("key/{i:04}"))).collect();
    success.push(RequestOp {
        request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
            key: b"other/".to_vec(),
            range_end: b"other0".to_vec(),
            ..Default::default()
        })),
    });
    success.push(RequestOp {
        request: Some(Request::RequestTxn(TxnRequest {
            compare: vec![],
            success: (0..4).map(|i| put(format!("nested/{i}"))).collect(),
            failure: (0..4).map(|i| put(format!("nested/{i}"))).collect(),
        })),
    });
    let txn = TxnRequest {
        compare: vec![],
        success,
        failure: vec![],
    };
    c.bench_function("check_txn_128_ops", |b| {
        b.iter(|| check_txn(&txn, 128).unwrap())
    });
}

criterion_group!(benches, validate);
criterion_main!(benches);
