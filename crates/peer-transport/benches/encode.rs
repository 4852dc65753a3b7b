//! The transport's hot path per message: encoding a raft append (with entries) and decoding it
//! on the other side.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use peer_transport::{decode_message, encode_message};
use raft::prelude::{Entry, Message, MessageType};

fn append(entries: usize, size: usize) -> Message {
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgAppend);
    m.from = 1;
    m.to = 2;
    m.term = 3;
    m.index = 100;
    m.log_term = 3;
    m.commit = 99;
    m.entries = (0..entries)
        .map(|i| Entry {
            index: 101 + i as u64,
            term: 3,
            data: vec![7u8; size].into(),
            context: vec![1u8; 8].into(),
            ..Default::default()
        })
        .collect();
    m
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("raft_message");
    for n in [1usize, 64] {
        let m = append(n, 256);
        let bytes = encode_message(&m);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("encode_append_{n}x256B"), |b| {
            b.iter(|| encode_message(std::hint::black_box(&m)))
        });
        g.bench_function(format!("decode_append_{n}x256B"), |b| {
            b.iter(|| decode_message(std::hint::black_box(&bytes)).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
