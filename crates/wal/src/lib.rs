//! wal: the durable, append-only log of raft entries and hard state.
//!
//! Reads: nothing (it is a library owned by raft-node's Ready loop).
//! Writes: segment files under one directory; `append` returns only after fsync, so anything
//! it accepted survives a crash. One `append` call per raft Ready carries every entry of that
//! Ready, which is how concurrent proposals share one fsync (group commit).
//!
//! Format (ours): each segment `<seq>-<first index>.wal` (both zero-padded decimal) is a sequence
//! of records `[len: u32 LE][crc32 of body: u32 LE][body: type u8 + payload]`. A new segment is
//! built under a temporary name, starts with the current metadata, hard state and snapshot
//! marker, and is renamed into place once durable, so any suffix of segments recovers alone.
//!
//! Segments are preallocated: created at `segment_bytes` as written zeros (see `prealloc`), and
//! records overwrite them from offset 0. A record header whose length field is 0 therefore
//! ends a segment's records, and every byte after it must be zero; anything else there is
//! judged like any other bad record (torn tail in the last segment, corruption elsewhere). The
//! last batch may run past `segment_bytes`, extending the file; a segment may also have no zero
//! tail at all (files written before preallocation). Rotation still goes by bytes written.
//! The next segment is zero-filled on a background thread once the tail is half full, so
//! rotation normally finds it ready.

mod prealloc;
mod record;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use prealloc::Preparing;

pub use record::Record;
use record::{decode_body, put_entry, put_hard_state, put_metadata, put_snapshot, HEADER_LEN};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryType {
    Normal,
    ConfChange,
    ConfChangeV2,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalEntry {
    pub term: u64,
    pub index: u64,
    pub entry_type: EntryType,
    pub data: Vec<u8>,
    pub context: Vec<u8>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HardState {
    pub term: u64,
    pub vote: u64,
    pub commit: u64,
}

/// The log before `index` lives in a state-machine snapshot; `conf_state` is opaque bytes
/// (raft-node encodes raft's ConfState) so this crate stays independent of raft types.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotMarker {
    pub index: u64,
    pub term: u64,
    pub conf_state: Vec<u8>,
}

/// Everything `open` found on disk, in log order, ready to load into raft's storage.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    pub metadata: Option<Vec<u8>>,
    pub hard_state: HardState,
    pub snapshot: Option<SnapshotMarker>,
    /// Entries after the snapshot marker; later records with a lower or equal index have
    /// already replaced earlier ones (raft log truncation), so indexes are contiguous.
    pub entries: Vec<WalEntry>,
}

#[derive(Debug, Clone)]
pub struct WalOptions {
    pub segment_bytes: u64,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_bytes: 64 * 1024 * 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("wal: io error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("wal: corrupt record in {path} at offset {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// Refused before anything was written: the log would no longer replay contiguously.
    #[error("wal: entry {index} does not follow the last index {last}")]
    Gap { index: u64, last: u64 },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

struct Segment {
    seq: u64,
    path: PathBuf,
    /// Highest entry index stored in this segment (0 if none).
    max_index: u64,
}

pub struct Wal {
    dir: PathBuf,
    opts: WalOptions,
    segments: Vec<Segment>,
    /// The tail segment, written at explicit offsets (it is longer than what it holds).
    file: File,
    /// Bytes of records in the tail segment: where the next write goes.
    size: u64,
    /// The segment after the tail, being zero-filled in the background.
    next: Option<Preparing>,
    /// Sequence number of the last segment whose preparation was started: at most once per
    /// segment, so a failed or cancelled one is done in line at rotation, not retried.
    prepared_seq: u64,
    buf: Vec<u8>,
    metadata: Option<Vec<u8>>,
    hard_state: HardState,
    snapshot: Option<SnapshotMarker>,
    last_index: u64,
    syncs: u64,
    /// Set once a write or fsync failed: the tail may hold a partial record and the kernel may
    /// have dropped dirty pages, so appending more could turn a torn tail into mid-log damage
    /// or acknowledge data that is not on disk. Reopening recovers the durable prefix.
    broken: Option<String>,
    /// Test hook: the next write stores only this many bytes, then fails.
    #[cfg(test)]
    fail_next_write_after: Option<usize>,
}

/// `<seq>-<first index>.wal`: zero-padded so a plain name sort is log order, and the first
/// entry index a segment may hold is visible without reading it.
fn segment_path(dir: &Path, seq: u64, first_index: u64) -> PathBuf {
    dir.join(format!("{seq:016}-{first_index:016}.wal"))
}

/// A segment is written under this suffix and renamed into place only once its header is
/// durable, so every `.wal` file starts with a complete header.
const TMP_SUFFIX: &str = ".tmp";

/// Where segment `seq` is zero-filled before it is known which index it starts at.
fn prepared_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016}.wal{TMP_SUFFIX}"))
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".wal")?;
    let seq = stem.split_once('-').map_or(stem, |(seq, _)| seq);
    seq.parse().ok()
}

fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, WalError> {
    let mut segs = Vec::new();
    for e in fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        if let Some(seq) = parse_segment_name(&e.file_name().to_string_lossy()) {
            segs.push((seq, e.path()));
        }
    }
    segs.sort();
    Ok(segs)
}

/// Deletes half-built segments left by a crash during rotation; they never held an entry.
fn remove_stale_tmp(dir: &Path) -> Result<(), WalError> {
    let mut removed = false;
    for e in fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(TMP_SUFFIX) && name.contains(".wal") {
            let path = e.path();
            tracing::warn!(path = %path.display(), "wal: removing unfinished segment");
            fs::remove_file(&path).map_err(io_err(&path))?;
            removed = true;
        }
    }
    if removed {
        sync_dir(dir)?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Outcome of scanning one segment.
struct Scan {
    /// Each good record with the byte offset it starts at.
    records: Vec<(u64, Record)>,
    /// Offset just past the last good record.
    good_len: u64,
    /// If bytes after `good_len` were a torn write: the end of their non-zero part (everything
    /// after it is zero already).
    torn_until: Option<u64>,
}

/// Parses a segment's records up to the zero tail. In the last segment a bad record is a torn
/// tail if no valid record follows it, or if a zero sector lies between it and the next valid
/// one: a crash mid-write into preallocated space can persist later pages of the unfinished
/// write but not earlier ones. Anything else, and any bad record in an earlier segment (all
/// of which were fully synced before the next one began), is corruption.
fn scan(path: &Path, data: &[u8], last_segment: bool) -> Result<Scan, WalError> {
    let mut records = Vec::new();
    let mut off = 0usize;
    while off < data.len() {
        let len_field = &data[off..data.len().min(off + 4)];
        if prealloc::is_zero(len_field) && prealloc::is_zero(&data[off..]) {
            break;
        }
        match record::parse_at(data, off) {
            Ok((body, next)) => {
                let rec = decode_body(body).map_err(|reason| WalError::Corrupt {
                    path: path.to_path_buf(),
                    offset: off as u64,
                    reason,
                })?;
                records.push((off as u64, rec));
                off = next;
            }
            Err(reason) => {
                // Bounded by the non-zero part: probing every offset of a 64 MiB zero tail
                // would make opening slow.
                let end = off + prealloc::nonzero_len(&data[off..]);
                let next_valid = (off + 1..end).find(|&o| record::parse_at(data, o).is_ok());
                let torn = last_segment
                    && next_valid.is_none_or(|v| prealloc::has_zero_sector(data, off, v));
                if !torn {
                    let reason = if prealloc::is_zero(len_field) {
                        format!(
                            "zero-length end marker followed by a non-zero byte at offset {}",
                            off + prealloc::zero_prefix_len(&data[off..])
                        )
                    } else {
                        reason
                    };
                    return Err(WalError::Corrupt {
                        path: path.to_path_buf(),
                        offset: off as u64,
                        reason,
                    });
                }
                return Ok(Scan {
                    records,
                    good_len: off as u64,
                    torn_until: Some(end as u64),
                });
            }
        }
    }
    Ok(Scan {
        records,
        good_len: off as u64,
        torn_until: None,
    })
}

/// Folds records into the recovered state with raft's truncation rule.
fn replay(into: &mut Recovered, rec: Record, path: &Path, offset: u64) -> Result<(), WalError> {
    match rec {
        Record::Metadata(m) => into.metadata = Some(m),
        Record::HardState(h) => into.hard_state = h,
        Record::Snapshot(s) => {
            into.entries.retain(|e| e.index > s.index);
            into.snapshot = Some(s);
        }
        Record::Entry(e) => {
            if let Some(pos) = into.entries.iter().position(|x| x.index >= e.index) {
                into.entries.truncate(pos);
            }
            let snap_index = into.snapshot.as_ref().map_or(0, |s| s.index);
            if e.index <= snap_index {
                return Ok(());
            }
            if let Some(last) = into.entries.last() {
                if e.index != last.index + 1 {
                    return Err(WalError::Corrupt {
                        path: path.to_path_buf(),
                        offset,
                        reason: format!("entry {} follows entry {}", e.index, last.index),
                    });
                }
            }
            into.entries.push(e);
        }
    }
    Ok(())
}

/// Writes the records that make a segment recoverable without its predecessors.
fn put_header(
    buf: &mut Vec<u8>,
    metadata: Option<&[u8]>,
    hs: &HardState,
    snapshot: Option<&SnapshotMarker>,
) {
    if let Some(m) = metadata {
        put_metadata(buf, m);
    }
    put_hard_state(buf, hs);
    if let Some(s) = snapshot {
        put_snapshot(buf, s);
    }
}

impl Wal {
    /// Opens (creating if empty) the log in `dir`; zeroes a torn tail, refuses mid-log corruption.
    pub fn open(dir: &Path, opts: WalOptions) -> Result<(Wal, Recovered), WalError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let found = list_segments(dir)?;
        let mut recovered = Recovered::default();
        let mut segments = Vec::new();
        let mut tail_len = 0;
        let n = found.len();
        // Scan everything before touching any file, so a refused log is left exactly as found.
        let mut torn_tail = None;
        for (i, (seq, path)) in found.into_iter().enumerate() {
            let data = fs::read(&path).map_err(io_err(&path))?;
            let last = i + 1 == n;
            let s = scan(&path, &data, last)?;
            let mut max_index = 0;
            for (offset, rec) in s.records {
                if let Record::Entry(e) = &rec {
                    max_index = max_index.max(e.index);
                }
                replay(&mut recovered, rec, &path, offset)?;
            }
            if let Some(until) = s.torn_until {
                torn_tail = Some((path.clone(), s.good_len, until));
            }
            tail_len = s.good_len;
            segments.push(Segment {
                seq,
                path,
                max_index,
            });
        }
        let snap_index = recovered.snapshot.as_ref().map_or(0, |s| s.index);
        if let Some(first) = recovered.entries.first() {
            if first.index != snap_index + 1 {
                // Recovery starts from the oldest segment, so that is where the hole begins.
                return Err(WalError::Corrupt {
                    path: segments[0].path.clone(),
                    offset: 0,
                    reason: format!(
                        "entries resume at {} but the snapshot ends at {snap_index}",
                        first.index
                    ),
                });
            }
        }
        if let Some((path, good_len, until)) = torn_tail {
            tracing::warn!(
                path = %path.display(),
                offset = good_len,
                dropped = until - good_len,
                "wal: zeroing torn tail"
            );
            // Zeroed rather than truncated, so the segment keeps its preallocated length.
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_err(&path))?;
            prealloc::write_zeros(&f, good_len, until, &AtomicBool::new(false))
                .map_err(io_err(&path))?;
            f.sync_all().map_err(io_err(&path))?;
        }
        remove_stale_tmp(dir)?;
        if segments.is_empty() {
            let path = segment_path(dir, 1, 1);
            let tmp = prepared_path(dir, 1);
            prealloc::create_zeroed(&tmp, opts.segment_bytes, &AtomicBool::new(false))
                .map_err(io_err(&tmp))?;
            fs::rename(&tmp, &path).map_err(io_err(&path))?;
            sync_dir(dir)?;
            segments.push(Segment {
                seq: 1,
                path,
                max_index: 0,
            });
            tail_len = 0;
        }
        let tail = &segments.last().expect("at least one segment").path;
        let file = OpenOptions::new()
            .write(true)
            .open(tail)
            .map_err(io_err(tail))?;
        if tail_len == 0 && segments.len() > 1 {
            // An empty later segment (not one this writer leaves behind, but cheap to mend)
            // would otherwise carry entries without the state that makes it self-sufficient.
            let mut buf = Vec::new();
            put_header(
                &mut buf,
                recovered.metadata.as_deref(),
                &recovered.hard_state,
                recovered.snapshot.as_ref(),
            );
            file.write_all_at(&buf, 0).map_err(io_err(tail))?;
            file.sync_data().map_err(io_err(tail))?;
            tail_len = buf.len() as u64;
        }
        let last_index = recovered
            .entries
            .last()
            .map(|e| e.index)
            .unwrap_or(snap_index);
        let mut wal = Wal {
            dir: dir.to_path_buf(),
            opts,
            segments,
            file,
            size: tail_len,
            next: None,
            prepared_seq: 0,
            buf: Vec::with_capacity(64 * 1024),
            metadata: recovered.metadata.clone(),
            hard_state: recovered.hard_state,
            snapshot: recovered.snapshot.clone(),
            last_index,
            syncs: 0,
            broken: None,
            #[cfg(test)]
            fail_next_write_after: None,
        };
        wal.maybe_prepare();
        Ok((wal, recovered))
    }

    /// Appends entries (an entry whose index is <= the last one truncates the log from there)
    /// and, if given, the hard state; one fsync covers the whole call. An entry that would
    /// leave a hole after the last index is refused with `WalError::Gap` before any write.
    pub fn append(
        &mut self,
        entries: &[WalEntry],
        hard_state: Option<&HardState>,
    ) -> Result<(), WalError> {
        if entries.is_empty() && hard_state.is_none() {
            return Ok(());
        }
        self.check_usable()?;
        let mut last = self.last_index;
        for e in entries {
            if e.index > last + 1 {
                return Err(WalError::Gap {
                    index: e.index,
                    last,
                });
            }
            last = e.index;
        }
        self.buf.clear();
        let seg = self.segments.last_mut().expect("at least one segment");
        for e in entries {
            put_entry(&mut self.buf, e);
            seg.max_index = seg.max_index.max(e.index);
        }
        if let Some(h) = hard_state {
            put_hard_state(&mut self.buf, h);
        }
        self.write_buf()?;
        self.last_index = last;
        if let Some(h) = hard_state {
            self.hard_state = *h;
        }
        self.maybe_prepare();
        self.maybe_rotate()
    }

    /// Records a snapshot marker (fsynced); entries at or below its index are no longer needed.
    pub fn save_snapshot(&mut self, marker: &SnapshotMarker) -> Result<(), WalError> {
        self.check_usable()?;
        self.buf.clear();
        put_snapshot(&mut self.buf, marker);
        self.write_buf()?;
        self.snapshot = Some(marker.clone());
        self.last_index = self.last_index.max(marker.index);
        Ok(())
    }

    /// Records opaque metadata (member/cluster identity), fsynced.
    pub fn save_metadata(&mut self, metadata: &[u8]) -> Result<(), WalError> {
        self.check_usable()?;
        self.buf.clear();
        put_metadata(&mut self.buf, metadata);
        self.write_buf()?;
        self.metadata = Some(metadata.to_vec());
        Ok(())
    }

    /// Deletes whole segments whose every entry is at or below `index` (never the live one).
    /// Entries after the latest snapshot marker are still needed to recover, so `index` is
    /// capped at that marker's index: releasing past it would lose log the state machine
    /// cannot rebuild.
    pub fn release_to(&mut self, index: u64) -> Result<(), WalError> {
        let index = index.min(self.snapshot.as_ref().map_or(0, |s| s.index));
        let keep_from = self
            .segments
            .iter()
            .position(|s| s.max_index > index)
            .unwrap_or(self.segments.len() - 1);
        if keep_from == 0 {
            return Ok(());
        }
        for s in self.segments.drain(..keep_from) {
            fs::remove_file(&s.path).map_err(io_err(&s.path))?;
        }
        sync_dir(&self.dir)
    }

    /// Index of the last entry written (or of the snapshot, if later).
    pub fn last_index(&self) -> u64 {
        self.last_index
    }

    /// Number of fsyncs issued since open: lets tests observe group commit.
    pub fn sync_count(&self) -> u64 {
        self.syncs
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    fn check_usable(&self) -> Result<(), WalError> {
        match &self.broken {
            None => Ok(()),
            Some(why) => Err(WalError::Io {
                path: self.segments.last().expect("segment").path.clone(),
                source: std::io::Error::other(format!(
                    "wal is unusable after an earlier failure ({why}); reopen it to recover"
                )),
            }),
        }
    }

    fn write_buf(&mut self) -> Result<(), WalError> {
        if let Err(e) = self.write_and_sync() {
            self.broken = Some(e.to_string());
            let path = &self.segments.last().expect("segment").path;
            return Err(io_err(path)(e));
        }
        self.syncs += 1;
        self.size += self.buf.len() as u64;
        Ok(())
    }

    fn write_and_sync(&mut self) -> std::io::Result<()> {
        #[cfg(test)]
        if let Some(n) = self.fail_next_write_after.take() {
            self.file
                .write_all_at(&self.buf[..n.min(self.buf.len())], self.size)?;
            return Err(std::io::Error::other("injected write failure"));
        }
        // Inside the preallocated length this changes neither size nor extents, so the
        // fdatasync below has only data to flush.
        self.file.write_all_at(&self.buf, self.size)?;
        self.file.sync_data()
    }

    fn maybe_rotate(&mut self) -> Result<(), WalError> {
        if self.size < self.opts.segment_bytes {
            return Ok(());
        }
        match self.rotate() {
            Ok(()) => Ok(()),
            Err(e) => {
                // The entries are durable in the old segment, but a half-made rotation leaves
                // the writer in an unknown place; stop here and let a reopen sort it out.
                self.broken = Some(e.to_string());
                Err(e)
            }
        }
    }

    fn rotate(&mut self) -> Result<(), WalError> {
        let seq = self.segments.last().expect("segment").seq + 1;
        let path = segment_path(&self.dir, seq, self.last_index + 1);
        let (tmp, file) = self.take_prepared(seq)?;
        self.buf.clear();
        put_header(
            &mut self.buf,
            self.metadata.as_deref(),
            &self.hard_state,
            self.snapshot.as_ref(),
        );
        file.write_all_at(&self.buf, 0).map_err(io_err(&tmp))?;
        file.sync_data().map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        sync_dir(&self.dir)?;
        self.file = file;
        self.size = self.buf.len() as u64;
        self.segments.push(Segment {
            seq,
            path,
            max_index: 0,
        });
        Ok(())
    }

    /// The zero-filled file for segment `seq` and its temporary path: the background one if
    /// it worked out, otherwise made here, since a segment that grows per append would bring
    /// back the inode write on every fsync.
    fn take_prepared(&mut self, seq: u64) -> Result<(PathBuf, File), WalError> {
        let tmp = prepared_path(&self.dir, seq);
        match self.next.take() {
            Some(p) if p.seq == seq => {
                let ready = p.is_ready();
                let started = Instant::now();
                match p.wait() {
                    Ok(file) => {
                        if !ready {
                            tracing::warn!(
                                waited_ms = started.elapsed().as_millis() as u64,
                                "wal: rotation waited for the next segment's zero-fill"
                            );
                        }
                        return Ok((tmp, file));
                    }
                    Err(e) => tracing::warn!(
                        error = %e,
                        "wal: background zero-fill of the next segment failed; redoing it in line"
                    ),
                }
            }
            other => {
                if let Some(p) = other {
                    p.cancel();
                }
                tracing::warn!("wal: no next segment prepared; zero-filling it in line");
            }
        }
        let started = Instant::now();
        let file = prealloc::create_zeroed(&tmp, self.opts.segment_bytes, &AtomicBool::new(false))
            .map_err(io_err(&tmp))?;
        tracing::info!(
            took_ms = started.elapsed().as_millis() as u64,
            "wal: zero-filled the next segment in line"
        );
        Ok((tmp, file))
    }

    /// Starts zero-filling the segment after the tail, so rotation finds it ready, once the
    /// tail is half full: not at open, where 64 MiB of zeros would compete with the first
    /// fsyncs of a starting member (and a short-lived member never needs it).
    fn maybe_prepare(&mut self) {
        let seq = self.segments.last().expect("segment").seq + 1;
        if self.prepared_seq >= seq || self.size < self.opts.segment_bytes / 2 {
            return;
        }
        self.prepared_seq = seq;
        self.next = Preparing::start(prepared_path(&self.dir, seq), seq, self.opts.segment_bytes);
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        if let Some(p) = self.next.take() {
            p.cancel();
        }
    }
}

/// Reads every record of the log in `dir` in order without modifying anything.
pub fn read_records(dir: &Path) -> Result<Vec<Record>, WalError> {
    let found = list_segments(dir)?;
    let n = found.len();
    let mut out = Vec::new();
    for (i, (_, path)) in found.into_iter().enumerate() {
        let data = fs::read(&path).map_err(io_err(&path))?;
        out.extend(
            scan(&path, &data, i + 1 == n)?
                .records
                .into_iter()
                .map(|(_, r)| r),
        );
    }
    Ok(out)
}

/// Size of a record's fixed header, for tests that cut files at record boundaries.
pub const RECORD_HEADER_LEN: usize = HEADER_LEN;

#[cfg(test)]
mod tests;
