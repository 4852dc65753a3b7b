//! Raw durability limit of a disk: 4 KiB writes each followed by fdatasync, as a write-ahead
//! log does, in a loop for a fixed time. A server that fsyncs every commit cannot beat this
//! rate with one writer; group commit is how it gets past it.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result};

const BLOCK: usize = 4096;
/// The probe file is preallocated and then overwritten in place, like a preallocated wal segment.
const FILE_BLOCKS: u64 = 256;

#[derive(Clone, Debug, Serialize)]
pub struct FsyncResult {
    pub fsyncs: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub mean_ms: f64,
    /// Latency of one write + fdatasync; virtual disks are often bimodal, so the mean hides a lot.
    pub p50_ms: f64,
    pub p99_ms: f64,
}

pub fn probe(dir: &Path, duration: Duration) -> Result<FsyncResult> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let path = dir.join("fsync-probe.bin");
    let io = |what: &str, e| Error::io(format!("{what} {}", path.display()), e);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| io("open", e))?;
    let block = vec![0xa5u8; BLOCK];
    for _ in 0..FILE_BLOCKS {
        file.write_all(&block).map_err(|e| io("write", e))?;
    }
    file.sync_all().map_err(|e| io("fsync", e))?;

    let mut hist = crate::loadgen::new_histogram();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < duration {
        let t0 = Instant::now();
        file.write_all_at(&block, (n % FILE_BLOCKS) * BLOCK as u64)
            .map_err(|e| io("write", e))?;
        file.sync_data().map_err(|e| io("fdatasync", e))?;
        hist.saturating_record((t0.elapsed().as_micros() as u64).max(1));
        n += 1;
    }
    let seconds = start.elapsed().as_secs_f64();
    drop(file);
    let _ = std::fs::remove_file(&path);
    Ok(FsyncResult {
        fsyncs: n,
        seconds,
        per_second: n as f64 / seconds,
        mean_ms: seconds * 1000.0 / n.max(1) as f64,
        p50_ms: hist.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_counts_syncs_and_cleans_up() {
        let dir = std::env::temp_dir().join(format!("xtask-fsync-test-{}", std::process::id()));
        let r = probe(&dir, Duration::from_millis(100)).unwrap();
        assert!(r.fsyncs > 0 && r.per_second > 0.0);
        assert!(!dir.join("fsync-probe.bin").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
