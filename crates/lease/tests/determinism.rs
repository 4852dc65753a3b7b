//! Every member applies the same operations; their lessors must end up identical even
//! though each one's hash maps iterate in a different order.

use std::sync::Arc;
use std::time::Duration;

use lease::{FakeClock, InMemoryLeaseStore, Lessor, LessorConfig};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Grant(i64, i64),
    Revoke(i64),
    Attach(i64, u8),
    Detach(i64, u8),
    Checkpoint(i64, i64),
    Advance(u64),
    Promote,
    Demote,
    Renew(i64),
    Expired(usize),
    CheckpointsDue(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let id = 1..12i64;
    prop_oneof![
        (id.clone(), 0..900i64).prop_map(|(i, t)| Op::Grant(i, t)),
        id.clone().prop_map(Op::Revoke),
        (id.clone(), any::<u8>()).prop_map(|(i, k)| Op::Attach(i, k % 16)),
        (id.clone(), any::<u8>()).prop_map(|(i, k)| Op::Detach(i, k % 16)),
        (id.clone(), 0..900i64).prop_map(|(i, r)| Op::Checkpoint(i, r)),
        (0..400_000u64).prop_map(Op::Advance),
        Just(Op::Promote),
        Just(Op::Demote),
        id.prop_map(Op::Renew),
        (0..5usize).prop_map(Op::Expired),
        (0..5usize).prop_map(Op::CheckpointsDue),
    ]
}

/// Applies `op` and renders everything it returned.
fn apply(l: &mut Lessor, clock: &FakeClock, op: &Op) -> String {
    match op {
        Op::Grant(i, t) => format!("{:?}", l.grant(*i, *t).map(|x| (x.id, x.ttl))),
        Op::Revoke(i) => format!("{:?}", l.revoke(*i)),
        Op::Attach(i, k) => format!("{:?}", l.attach(*i, &[*k])),
        Op::Detach(i, k) => format!("{:?}", l.detach(*i, &[*k])),
        Op::Checkpoint(i, r) => format!("{:?}", l.checkpoint(*i, *r)),
        Op::Advance(ms) => {
            clock.advance(Duration::from_millis(*ms));
            String::new()
        }
        Op::Promote => {
            l.promote(Duration::from_secs(1));
            String::new()
        }
        Op::Demote => {
            l.demote();
            String::new()
        }
        Op::Renew(i) => format!("{:?}", l.renew(*i)),
        Op::Expired(n) => format!("{:?}", l.expired(*n)),
        Op::CheckpointsDue(n) => format!("{:?}", l.checkpoints_due(*n)),
    }
}

proptest! {
    #[test]
    fn same_operations_same_outcome(ops in proptest::collection::vec(op(), 1..120)) {
        let mut cfg = LessorConfig::new(3);
        cfg.checkpoint_interval = Duration::from_secs(60);
        let clock = FakeClock::new();
        let stores = [InMemoryLeaseStore::new(), InMemoryLeaseStore::new()];
        let mut a = Lessor::new(cfg.clone(), Arc::new(clock.clone()), Box::new(stores[0].clone())).unwrap();
        let mut b = Lessor::new(cfg, Arc::new(clock.clone()), Box::new(stores[1].clone())).unwrap();
        for op in &ops {
            let ra = apply(&mut a, &clock, op);
            // Both members see the same time: `b` runs at the same clock reading.
            let rb = match op {
                Op::Advance(_) => String::new(),
                _ => apply(&mut b, &clock, op),
            };
            prop_assert_eq!(ra, rb, "diverged at {:?}", op);
            prop_assert_eq!(a.leases(), b.leases());
        }
        prop_assert_eq!(stores[0].records(), stores[1].records());
        for info in a.leases() {
            prop_assert_eq!(a.keys(info.id), b.keys(info.id));
        }
    }
}
