//! Proposal to commit through the Ready loop, single voter, fsync on: one proposal at a time
//! versus 64 in flight (their fsyncs are shared).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use raft_node::{Committed, RaftCommand, RaftConfig, RaftNode};
use tokio::sync::{mpsc, oneshot};

type Reply = oneshot::Sender<()>;

fn propose(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = mpsc::channel::<RaftCommand<Reply>>(4096);
    let (ctx, mut crx) = mpsc::channel::<Committed<Reply>>(256);
    let handle = RaftNode::start(RaftConfig::default(), dir.path(), 0, rx, ctx).unwrap();
    let applier = std::thread::spawn(move || {
        while let Some(b) = crx.blocking_recv() {
            for e in b.entries {
                if let Some(r) = e.reply {
                    let _ = r.send(());
                }
            }
        }
    });
    std::thread::sleep(Duration::from_millis(200));

    let mut g = c.benchmark_group("raft_propose_to_commit");
    g.sample_size(20);
    for inflight in [1usize, 64] {
        g.throughput(Throughput::Elements(inflight as u64));
        g.bench_function(format!("{inflight}_in_flight"), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let mut waits = Vec::with_capacity(inflight);
                    for _ in 0..inflight {
                        let (reply, w) = oneshot::channel();
                        tx.send(RaftCommand::Propose {
                            data: vec![0u8; 128],
                            reply,
                        })
                        .await
                        .unwrap();
                        waits.push(w);
                    }
                    for w in waits {
                        w.await.unwrap();
                    }
                })
            })
        });
    }
    g.finish();
    drop(tx);
    handle.join();
    applier.join().unwrap();
}

criterion_group!(benches, propose);
criterion_main!(benches);
