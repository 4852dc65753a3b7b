//! wal: the durable, append-only log of raft entries and hard state.
//!
//! Reads: nothing (it is a library owned by raft-node's Ready loop).
//! Writes: segment files under one directory; `append` returns only after fsync, so anything
//! it accepted survives a crash. One `append` call per raft Ready carries every entry of that
//! Ready, which is how concurrent proposals share one fsync (group commit).
//!
//! CONTRACT (filled in by the implementation; signatures are fixed for raft-node):

use std::path::{Path, PathBuf};

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

pub struct Wal {}

impl Wal {
    /// Opens (creating if empty) the log in `dir`; truncates a torn tail, refuses mid-log corruption.
    pub fn open(_dir: &Path, _opts: WalOptions) -> Result<(Wal, Recovered), WalError> {
        todo!()
    }
    /// Appends entries (an entry whose index is <= the last one truncates the log from there)
    /// and, if given, the hard state; one fsync covers the whole call.
    pub fn append(
        &mut self,
        _entries: &[WalEntry],
        _hard_state: Option<&HardState>,
    ) -> Result<(), WalError> {
        todo!()
    }
    /// Records a snapshot marker (fsynced); entries at or below its index are no longer needed.
    pub fn save_snapshot(&mut self, _marker: &SnapshotMarker) -> Result<(), WalError> {
        todo!()
    }
    /// Records opaque metadata (member/cluster identity), fsynced.
    pub fn save_metadata(&mut self, _metadata: &[u8]) -> Result<(), WalError> {
        todo!()
    }
    /// Deletes whole segments whose every entry is at or below `index`.
    pub fn release_to(&mut self, _index: u64) -> Result<(), WalError> {
        todo!()
    }
}

/// One record as stored, for `oxcd dump-logs`.
#[derive(Debug, Clone)]
pub enum Record {
    Metadata(Vec<u8>),
    Entry(WalEntry),
    HardState(HardState),
    Snapshot(SnapshotMarker),
}

/// Reads every record of the log in `dir` in order without modifying anything.
pub fn read_records(_dir: &Path) -> Result<Vec<Record>, WalError> {
    todo!()
}
