//! Disk use stays bounded under a long write stream: with `--snapshot-count` the raft log is
//! compacted and whole wal segments are released, and with regular key-space compaction (what
//! Kubernetes' API server does every few minutes) the store reclaims superseded revisions. The
//! stream writes ten times the wal's 64 MiB segment size, so a log that is never released, or a
//! store that never reclaims, fails the bound.

use std::path::Path;
use std::time::Duration;

use etcd_client::CompactionOptions;
use oxcd_tests::Server;

mod common;

const MIB: u64 = 1024 * 1024;
/// Below `--max-request-bytes` (1.5 MiB).
const VALUE_BYTES: usize = MIB as usize;
/// 640 MiB in all: ten wal segments' worth.
const PUTS: usize = 640;
/// Keys overwritten in turn, so the live data is at most this many values.
const KEYS: usize = 8;
/// Puts between two compactions (and how often disk use is sampled).
const COMPACT_EVERY: usize = 40;

/// Bytes of the files under `root` (allocated length, as `du --apparent-size` counts).
fn dir_bytes(root: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(root) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn value(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..VALUE_BYTES)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b'a' + (x % 26) as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_use_stays_bounded_under_a_long_write_stream() {
    // oxcd only: etcd 3.4 purges old wal files every 30 s and keeps five (--max-wals), so in
    // this test's 20 s its log grows to about 740 MiB (measured), which this bound refuses.
    if oxcd_tests::server_is_etcd() {
        return;
    }
    let s = Server::start_with(&[
        "--snapshot-count=40",
        "--experimental-snapshot-catchup-entries=10",
    ]);
    let mut c = common::connect_with(&s, Duration::from_secs(30)).await;

    let mut samples = Vec::new();
    let mut wal = Vec::new();
    for i in 0..PUTS {
        let put = c
            .put(format!("key-{}", i % KEYS), value(i as u64), None)
            .await
            .expect("put");
        if (i + 1) % COMPACT_EVERY == 0 {
            let rev = put.header().expect("header").revision();
            c.compact(
                rev - KEYS as i64,
                Some(CompactionOptions::new().with_physical()),
            )
            .await
            .expect("compact");
            samples.push(dir_bytes(s.data_dir()));
            // oxcd's and etcd's log directories, for the trace.
            wal.push(
                dir_bytes(&s.data_dir().join("oxcd/wal"))
                    + dir_bytes(&s.data_dir().join("member/wal")),
            );
        }
    }
    let written = PUTS as u64 * VALUE_BYTES as u64;
    let peak = samples.iter().copied().max().unwrap_or(0);
    let last = *samples.last().expect("samples");
    let mib = |b: u64| b / MIB;
    let trace: Vec<u64> = samples.iter().map(|&b| mib(b)).collect();
    let wal_trace: Vec<u64> = wal.iter().map(|&b| mib(b)).collect();
    eprintln!(
        "data dir MiB after every {COMPACT_EVERY} puts of {VALUE_BYTES} B: {trace:?}, of which \
         the log: {wal_trace:?} ({} MiB written)",
        mib(written)
    );

    // The log's live segments plus the store's live values, its unflushed memtables and its
    // files not yet compacted (RocksDB merges level 0 once four 64 MiB memtables are flushed);
    // well below the 640 MiB written.
    assert!(
        peak < 400 * MIB,
        "data dir peaked at {} MiB after {} MiB of writes: {trace:?}",
        mib(peak),
        mib(written)
    );
    // Bounded, not merely slow-growing: the second half of the stream adds nothing over the
    // first half's peak beyond one segment's worth of slack.
    let first_half_peak = samples[..samples.len() / 2]
        .iter()
        .copied()
        .max()
        .unwrap_or(0);
    assert!(
        last <= first_half_peak + 64 * MIB,
        "data dir still growing: {trace:?}"
    );
}
