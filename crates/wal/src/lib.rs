//! wal: the durable, append-only log of raft entries and hard state.
//!
//! Reads: nothing (it is a library owned by raft-node's Ready loop).
//! Writes: segment files under one directory; `append` returns only after fsync, so anything
//! it accepted survives a crash. One `append` call per raft Ready carries every entry of that
//! Ready, which is how concurrent proposals share one fsync (group commit).
//!
//! Format (ours): each segment `NNNNNNNNNNNNNNNN.wal` is a sequence of records
//! `[len: u32 LE][crc32 of body: u32 LE][body: type u8 + payload]`. A new segment starts with the
//! current metadata, hard state and snapshot marker, so any suffix of segments recovers alone.

mod record;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

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
    file: File,
    size: u64,
    buf: Vec<u8>,
    metadata: Option<Vec<u8>>,
    hard_state: HardState,
    snapshot: Option<SnapshotMarker>,
    last_index: u64,
    syncs: u64,
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016}.wal"))
}

fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, WalError> {
    let mut segs = Vec::new();
    for e in fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if let Some(seq) = name
            .strip_suffix(".wal")
            .and_then(|s| s.parse::<u64>().ok())
        {
            segs.push((seq, e.path()));
        }
    }
    segs.sort();
    Ok(segs)
}

fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Outcome of scanning one segment.
struct Scan {
    records: Vec<Record>,
    /// Offset just past the last good record.
    good_len: u64,
    /// Whether bytes after `good_len` were a torn write.
    torn: bool,
}

/// Parses a segment's records. A bad record followed by any valid record is corruption; a
/// bad record with nothing valid after it is a torn tail (allowed only in the last segment).
fn scan(path: &Path, data: &[u8], last_segment: bool) -> Result<Scan, WalError> {
    let mut records = Vec::new();
    let mut off = 0usize;
    while off < data.len() {
        match record::parse_at(data, off) {
            Ok((body, next)) => {
                let rec = decode_body(body).map_err(|reason| WalError::Corrupt {
                    path: path.to_path_buf(),
                    offset: off as u64,
                    reason,
                })?;
                records.push(rec);
                off = next;
            }
            Err(reason) => {
                let valid_later = (off + 1..data.len()).any(|o| record::parse_at(data, o).is_ok());
                if !last_segment || valid_later {
                    return Err(WalError::Corrupt {
                        path: path.to_path_buf(),
                        offset: off as u64,
                        reason,
                    });
                }
                return Ok(Scan {
                    records,
                    good_len: off as u64,
                    torn: true,
                });
            }
        }
    }
    Ok(Scan {
        records,
        good_len: off as u64,
        torn: false,
    })
}

/// Folds records into the recovered state with raft's truncation rule.
fn replay(into: &mut Recovered, rec: Record, path: &Path) -> Result<(), WalError> {
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
                        offset: 0,
                        reason: format!("entry {} follows entry {}", e.index, last.index),
                    });
                }
            }
            into.entries.push(e);
        }
    }
    Ok(())
}

impl Wal {
    /// Opens (creating if empty) the log in `dir`; truncates a torn tail, refuses mid-log corruption.
    pub fn open(dir: &Path, opts: WalOptions) -> Result<(Wal, Recovered), WalError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let found = list_segments(dir)?;
        let mut recovered = Recovered::default();
        let mut segments = Vec::new();
        let mut tail_len = 0;
        let n = found.len();
        for (i, (seq, path)) in found.into_iter().enumerate() {
            let data = fs::read(&path).map_err(io_err(&path))?;
            let last = i + 1 == n;
            let s = scan(&path, &data, last)?;
            let mut max_index = 0;
            for rec in s.records {
                if let Record::Entry(e) = &rec {
                    max_index = max_index.max(e.index);
                }
                replay(&mut recovered, rec, &path)?;
            }
            if s.torn {
                tracing::warn!(
                    path = %path.display(),
                    offset = s.good_len,
                    dropped = data.len() as u64 - s.good_len,
                    "wal: truncating torn tail"
                );
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                f.set_len(s.good_len).map_err(io_err(&path))?;
                f.sync_all().map_err(io_err(&path))?;
            }
            tail_len = s.good_len;
            segments.push(Segment {
                seq,
                path,
                max_index,
            });
        }
        let fresh = segments.is_empty();
        if fresh {
            let path = segment_path(dir, 1);
            File::create(&path).map_err(io_err(&path))?;
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
            .append(true)
            .open(tail)
            .map_err(io_err(tail))?;
        let last_index = recovered
            .entries
            .last()
            .map(|e| e.index)
            .or(recovered.snapshot.as_ref().map(|s| s.index))
            .unwrap_or(0);
        let wal = Wal {
            dir: dir.to_path_buf(),
            opts,
            segments,
            file,
            size: tail_len,
            buf: Vec::with_capacity(64 * 1024),
            metadata: recovered.metadata.clone(),
            hard_state: recovered.hard_state,
            snapshot: recovered.snapshot.clone(),
            last_index,
            syncs: 0,
        };
        Ok((wal, recovered))
    }

    /// Appends entries (an entry whose index is <= the last one truncates the log from there)
    /// and, if given, the hard state; one fsync covers the whole call.
    pub fn append(
        &mut self,
        entries: &[WalEntry],
        hard_state: Option<&HardState>,
    ) -> Result<(), WalError> {
        if entries.is_empty() && hard_state.is_none() {
            return Ok(());
        }
        self.buf.clear();
        let seg = self.segments.last_mut().expect("at least one segment");
        for e in entries {
            put_entry(&mut self.buf, e);
            seg.max_index = seg.max_index.max(e.index);
            self.last_index = e.index;
        }
        if let Some(h) = hard_state {
            put_hard_state(&mut self.buf, h);
            self.hard_state = *h;
        }
        self.write_buf()?;
        self.maybe_rotate()
    }

    /// Records a snapshot marker (fsynced); entries at or below its index are no longer needed.
    pub fn save_snapshot(&mut self, marker: &SnapshotMarker) -> Result<(), WalError> {
        self.buf.clear();
        put_snapshot(&mut self.buf, marker);
        self.snapshot = Some(marker.clone());
        self.last_index = self.last_index.max(marker.index);
        self.write_buf()
    }

    /// Records opaque metadata (member/cluster identity), fsynced.
    pub fn save_metadata(&mut self, metadata: &[u8]) -> Result<(), WalError> {
        self.buf.clear();
        put_metadata(&mut self.buf, metadata);
        self.metadata = Some(metadata.to_vec());
        self.write_buf()
    }

    /// Deletes whole segments whose every entry is at or below `index` (never the live one).
    pub fn release_to(&mut self, index: u64) -> Result<(), WalError> {
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

    fn write_buf(&mut self) -> Result<(), WalError> {
        let path = &self.segments.last().expect("segment").path;
        self.file.write_all(&self.buf).map_err(io_err(path))?;
        self.file.sync_data().map_err(io_err(path))?;
        self.syncs += 1;
        self.size += self.buf.len() as u64;
        Ok(())
    }

    fn maybe_rotate(&mut self) -> Result<(), WalError> {
        if self.size < self.opts.segment_bytes {
            return Ok(());
        }
        let seq = self.segments.last().expect("segment").seq + 1;
        let path = segment_path(&self.dir, seq);
        let mut file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        self.buf.clear();
        if let Some(m) = &self.metadata {
            put_metadata(&mut self.buf, m);
        }
        put_hard_state(&mut self.buf, &self.hard_state);
        if let Some(s) = &self.snapshot {
            put_snapshot(&mut self.buf, s);
        }
        file.write_all(&self.buf).map_err(io_err(&path))?;
        file.sync_all().map_err(io_err(&path))?;
        sync_dir(&self.dir)?;
        self.size = self.buf.len() as u64;
        self.file = file;
        self.segments.push(Segment {
            seq,
            path,
            max_index: 0,
        });
        Ok(())
    }
}

/// Reads every record of the log in `dir` in order without modifying anything.
pub fn read_records(dir: &Path) -> Result<Vec<Record>, WalError> {
    let found = list_segments(dir)?;
    let n = found.len();
    let mut out = Vec::new();
    for (i, (_, path)) in found.into_iter().enumerate() {
        let data = fs::read(&path).map_err(io_err(&path))?;
        out.extend(scan(&path, &data, i + 1 == n)?.records);
    }
    Ok(out)
}

/// Size of a record's fixed header, for tests that cut files at record boundaries.
pub const RECORD_HEADER_LEN: usize = HEADER_LEN;

#[cfg(test)]
mod tests;
