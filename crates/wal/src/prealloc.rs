//! Preallocated segments: a segment is created at its full length as real zero bytes and
//! made durable before it receives any record. Appends then overwrite blocks that are already
//! allocated and written, so the file size and extents never change on the hot path and an
//! fdatasync flushes data only, without a second I/O for the inode. (fallocate alone is not
//! enough: its unwritten extents still need a metadata update when first written.)

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Unit of zero writes and zero checks; comparing whole chunks against this static block
/// compiles to memcmp, which keeps a 64 MiB zero tail cheap to verify even in debug builds.
const ZERO_CHUNK: usize = 64 * 1024;
static ZEROS: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];

/// Granularity at which a device or the page cache may leave part of a write unpersisted.
pub(crate) const SECTOR: usize = 512;

pub(crate) fn is_zero(b: &[u8]) -> bool {
    b.chunks(ZERO_CHUNK).all(|c| c == &ZEROS[..c.len()])
}

/// Number of zero bytes `data` starts with.
pub(crate) fn zero_prefix_len(data: &[u8]) -> usize {
    let mut n = 0;
    for c in data.chunks(ZERO_CHUNK) {
        if c != &ZEROS[..c.len()] {
            return n + c.iter().position(|&b| b != 0).expect("chunk is not zero");
        }
        n += c.len();
    }
    n
}

/// Length of `data` without its trailing zero bytes.
pub(crate) fn nonzero_len(data: &[u8]) -> usize {
    let mut end = data.len();
    for c in data.rchunks(ZERO_CHUNK) {
        if c != &ZEROS[..c.len()] {
            let last = c.iter().rposition(|&b| b != 0).expect("chunk is not zero");
            return end - c.len() + last + 1;
        }
        end -= c.len();
    }
    0
}

/// Whether some sector-aligned block inside `[from, to)` of `data` (offsets are file
/// offsets) is entirely zero, the trace a crash leaves when part of a write never landed.
pub(crate) fn has_zero_sector(data: &[u8], from: usize, to: usize) -> bool {
    let mut s = from - from % SECTOR;
    while s + SECTOR <= to.min(data.len()) {
        if is_zero(&data[s..s + SECTOR]) {
            return true;
        }
        s += SECTOR;
    }
    false
}

/// Overwrites `[from, to)` of `file` with zeros; stops early with `Interrupted` once `cancel`
/// is set (checked between chunks, so dropping a writer never waits for a whole segment).
pub(crate) fn write_zeros(file: &File, from: u64, to: u64, cancel: &AtomicBool) -> io::Result<()> {
    let mut at = from;
    while at < to {
        if cancel.load(Ordering::Relaxed) {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "zero-fill cancelled",
            ));
        }
        let n = (to - at).min(ZERO_CHUNK as u64) as usize;
        file.write_all_at(&ZEROS[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Creates `path` as `len` durable zero bytes and returns it open for writing.
pub(crate) fn create_zeroed(path: &Path, len: u64, cancel: &AtomicBool) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)?;
    write_zeros(&file, 0, len, cancel)?;
    file.sync_all()?;
    Ok(file)
}

/// The next segment being zero-filled on a background thread.
pub(crate) struct Preparing {
    /// Sequence number of the segment this file will become.
    pub seq: u64,
    cancel: Arc<AtomicBool>,
    handle: JoinHandle<io::Result<File>>,
}

impl Preparing {
    /// Starts zero-filling `path`; `None` (logged) if no thread could be started, in which
    /// case the rotation that needs the file makes it itself.
    pub fn start(path: PathBuf, seq: u64, len: u64) -> Option<Preparing> {
        let cancel = Arc::new(AtomicBool::new(false));
        let c = cancel.clone();
        match std::thread::Builder::new()
            .name("wal-prealloc".to_string())
            .spawn(move || create_zeroed(&path, len, &c))
        {
            Ok(handle) => Some(Preparing {
                seq,
                cancel,
                handle,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "wal: cannot start the segment preallocation thread");
                None
            }
        }
    }

    pub fn is_ready(&self) -> bool {
        self.handle.is_finished()
    }

    /// Blocks until the file is durable (or preparing it failed).
    pub fn wait(self) -> io::Result<File> {
        self.handle
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("segment preallocation thread panicked")))
    }

    /// Stops the thread and waits for it, so no write to the temporary file can race with
    /// whoever opens this directory next (the file itself is removed as stale at open).
    pub fn cancel(self) {
        self.cancel.store(true, Ordering::Relaxed);
        let _ = self.handle.join();
    }
}
