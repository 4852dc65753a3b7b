//! Lessor hot paths: grant+attach (every put with a lease), renew (keep-alives) and
//! the expiry scan the leader runs twice a second.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use lease::{FakeClock, InMemoryLeaseStore, Lessor, LessorConfig};

const LEASES: i64 = 10_000;

fn lessor(clock: &FakeClock) -> Lessor {
    let mut l = Lessor::new(
        LessorConfig::new(2),
        Arc::new(clock.clone()),
        Box::new(InMemoryLeaseStore::new()),
    )
    .expect("empty store loads");
    l.promote(Duration::ZERO);
    l
}

fn grant_attach(c: &mut Criterion) {
    let clock = FakeClock::new();
    c.bench_function("grant+attach", |b| {
        b.iter_batched(
            || lessor(&clock),
            |mut l| {
                for id in 1..=1000i64 {
                    l.grant(id, 60).expect("fresh id");
                    l.attach(id, format!("/key/{id}").as_bytes())
                        .expect("granted");
                }
                l
            },
            BatchSize::LargeInput,
        )
    });
}

fn renew(c: &mut Criterion) {
    let clock = FakeClock::new();
    let mut l = lessor(&clock);
    for id in 1..=LEASES {
        l.grant(id, 60).expect("fresh id");
    }
    let mut id = 0i64;
    c.bench_function("renew (10k leases)", |b| {
        b.iter(|| {
            id = id % LEASES + 1;
            black_box(l.renew(black_box(id)).expect("live lease"))
        })
    });
}

fn expired_scan(c: &mut Criterion) {
    let clock = FakeClock::new();
    c.bench_function("expired() drain of 10k leases in batches of 500", |b| {
        b.iter_batched(
            || {
                let mut l = lessor(&clock);
                for id in 1..=LEASES {
                    l.grant(id, 10 + id % 50).expect("fresh id");
                }
                clock.advance(Duration::from_secs(120));
                l
            },
            |mut l| {
                let mut n = 0;
                loop {
                    let batch = l.expired(500);
                    if batch.is_empty() {
                        break;
                    }
                    n += batch.len();
                }
                assert_eq!(n, LEASES as usize);
                l
            },
            BatchSize::LargeInput,
        )
    });

    let mut l = lessor(&clock);
    for id in 1..=LEASES {
        l.grant(id, 600).expect("fresh id");
    }
    c.bench_function("expired() scan, 10k leases none due", |b| {
        b.iter(|| black_box(l.expired(500)))
    });
}

criterion_group!(benches, grant_attach, renew, expired_scan);
criterion_main!(benches);
