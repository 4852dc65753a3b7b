//! raft-rs storage backed by the wal: an in-memory mirror (raft's `MemStorage`) answers raft's
//! reads; every change is written to the wal first.

use std::path::Path;

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, EntryType, HardState, Snapshot};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, Storage};
use wal::{Wal, WalEntry, WalOptions};

use std::sync::Arc;

use crate::{snapshot_from_marker, RaftError, StateMachine};

pub struct WalStorage {
    mem: MemStorage,
    wal: Wal,
    /// Index of the snapshot the log starts after (kept with conf-state updates).
    snapshot_index: u64,
    snapshot_term: u64,
    /// Where a snapshot for a lagging follower comes from: the state it is served from is
    /// read by the follower separately, so raft's snapshot carries only the position.
    state_machine: Arc<dyn StateMachine>,
}

pub fn decode_conf_state(bytes: &[u8]) -> Result<ConfState, RaftError> {
    let mut cs = ConfState::default();
    cs.merge_from_bytes(bytes)
        .map_err(|e| RaftError::BadState(format!("conf state: {e}")))?;
    Ok(cs)
}

fn encode_conf_state(cs: &ConfState) -> Vec<u8> {
    cs.write_to_bytes()
        .expect("encoding a ConfState cannot fail")
}

fn to_wal(e: &Entry) -> WalEntry {
    WalEntry {
        term: e.term,
        index: e.index,
        entry_type: match e.get_entry_type() {
            EntryType::EntryNormal => wal::EntryType::Normal,
            EntryType::EntryConfChange => wal::EntryType::ConfChange,
            EntryType::EntryConfChangeV2 => wal::EntryType::ConfChangeV2,
        },
        data: e.data.to_vec(),
        context: e.context.to_vec(),
    }
}

fn from_wal(w: WalEntry) -> Entry {
    let mut e = Entry {
        term: w.term,
        index: w.index,
        ..Default::default()
    };
    e.set_entry_type(match w.entry_type {
        wal::EntryType::Normal => EntryType::EntryNormal,
        wal::EntryType::ConfChange => EntryType::EntryConfChange,
        wal::EntryType::ConfChangeV2 => EntryType::EntryConfChangeV2,
    });
    e.data = w.data.into();
    e.context = w.context.into();
    e
}

impl WalStorage {
    /// Loads the wal; a fresh one is bootstrapped with the given membership.
    pub fn open(
        dir: &Path,
        voters: &[u64],
        learners: &[u64],
        state_machine: Arc<dyn StateMachine>,
    ) -> Result<WalStorage, RaftError> {
        let (mut wal, rec) = Wal::open(dir, WalOptions::default())?;
        let mem = MemStorage::new();
        let (snapshot_index, snapshot_term) = match &rec.snapshot {
            None => {
                let cs = ConfState {
                    voters: voters.to_vec(),
                    learners: learners.to_vec(),
                    ..Default::default()
                };
                // Index 0: no state-machine snapshot, only the initial membership.
                wal.save_snapshot(&wal::SnapshotMarker {
                    index: 0,
                    term: 0,
                    conf_state: encode_conf_state(&cs),
                })?;
                mem.wl().set_conf_state(cs);
                (0, 0)
            }
            Some(m) if m.index == 0 => {
                mem.wl().set_conf_state(decode_conf_state(&m.conf_state)?);
                (0, 0)
            }
            Some(m) => {
                mem.wl().apply_snapshot(snapshot_from_marker(m)?)?;
                (m.index, m.term)
            }
        };
        let entries: Vec<Entry> = rec.entries.into_iter().map(from_wal).collect();
        let hs = HardState {
            term: rec.hard_state.term,
            vote: rec.hard_state.vote,
            commit: rec.hard_state.commit,
            ..Default::default()
        };
        {
            let mut core = mem.wl();
            core.append(&entries)?;
            core.set_hardstate(hs);
        }
        Ok(WalStorage {
            mem,
            wal,
            snapshot_index,
            snapshot_term,
            state_machine,
        })
    }

    /// The state machine may have applied entries whose commit index never reached the wal
    /// (commit advances are persisted lazily); everything it applied was committed, so lift the
    /// commit index to it. An applied index beyond the log means the data dir is inconsistent.
    pub fn clamp_applied(&self, applied: u64) -> Result<u64, RaftError> {
        let last = self.mem.last_index()?;
        if self.snapshot_index > 0 && applied < self.snapshot_index {
            // The log before the snapshot is gone; only the snapshot itself could rebuild the
            // missing state, and raft would abort on an applied index below its first entry.
            return Err(RaftError::BadState(format!(
                "the store has applied index {applied} but the wal starts after snapshot {}",
                self.snapshot_index
            )));
        }
        if applied > last {
            return Err(RaftError::BadState(format!(
                "the store has applied index {applied} but the wal ends at {last}"
            )));
        }
        let mut core = self.mem.wl();
        if core.hard_state().commit < applied {
            core.mut_hard_state().commit = applied;
        }
        Ok(applied)
    }

    pub fn conf_state(&self) -> ConfState {
        self.mem
            .initial_state()
            .map(|s| s.conf_state)
            .unwrap_or_default()
    }

    /// Writes entries and hard state with one fsync, then mirrors them in memory.
    pub fn append(&mut self, entries: &[Entry], hs: Option<&HardState>) -> Result<(), RaftError> {
        let wal_entries: Vec<WalEntry> = entries.iter().map(to_wal).collect();
        let wal_hs = hs.map(|h| wal::HardState {
            term: h.term,
            vote: h.vote,
            commit: h.commit,
        });
        self.wal.append(&wal_entries, wal_hs.as_ref())?;
        let mut core = self.mem.wl();
        if !entries.is_empty() {
            core.append(entries)?;
        }
        if let Some(h) = hs {
            core.set_hardstate(h.clone());
        }
        Ok(())
    }

    /// Commit advances seen after persisting; the next hard state write records them.
    pub fn set_commit(&mut self, commit: u64) {
        self.mem.wl().mut_hard_state().commit = commit;
    }

    pub fn apply_snapshot(&mut self, snap: Snapshot) -> Result<(), RaftError> {
        let md = snap.get_metadata();
        self.wal.save_snapshot(&wal::SnapshotMarker {
            index: md.index,
            term: md.term,
            conf_state: encode_conf_state(md.get_conf_state()),
        })?;
        self.snapshot_index = md.index;
        self.snapshot_term = md.term;
        self.mem.wl().apply_snapshot(snap)?;
        Ok(())
    }

    /// The log holds nothing at or below this index.
    pub fn compacted_index(&self) -> u64 {
        self.snapshot_index
    }

    /// Drops the log up to and including `index` (the state machine has made it durable):
    /// the wal records the new start, then releases the segments wholly below it.
    pub fn compact_to(&mut self, index: u64) -> Result<(), RaftError> {
        // Keep at least the last entry: raft's in-memory log cannot be empty after a compaction.
        let index = index.min(self.mem.last_index()?.saturating_sub(1));
        if index <= self.snapshot_index {
            return Ok(());
        }
        let term = self.mem.term(index)?;
        let cs = self.conf_state();
        self.wal.save_snapshot(&wal::SnapshotMarker {
            index,
            term,
            conf_state: encode_conf_state(&cs),
        })?;
        self.mem.wl().compact(index + 1)?;
        self.snapshot_index = index;
        self.snapshot_term = term;
        self.wal.release_to(index)?;
        Ok(())
    }

    /// Records a membership change so a restart rebuilds the same configuration.
    pub fn set_conf_state(&mut self, cs: ConfState) -> Result<(), RaftError> {
        self.wal.save_snapshot(&wal::SnapshotMarker {
            index: self.snapshot_index,
            term: self.snapshot_term,
            conf_state: encode_conf_state(&cs),
        })?;
        self.mem.wl().set_conf_state(cs);
        Ok(())
    }
}

impl Storage for WalStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.mem.initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        // The compaction point's term stays known: raft checks it when it sends the entries
        // right after it.
        if idx == self.snapshot_index && idx > 0 {
            return Ok(self.snapshot_term);
        }
        self.mem.term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }

    /// A follower needs entries the log no longer has: it gets the position of the state the
    /// state machine reflects now (the follower fetches that state itself), which is at or
    /// after the compaction point and never beyond what was committed.
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let unavailable = || raft::Error::Store(raft::StorageError::SnapshotTemporarilyUnavailable);
        let commit = self.mem.rl().hard_state().commit;
        let index = self.state_machine.applied().min(commit);
        if index < self.snapshot_index.max(1) || index < request_index {
            return Err(unavailable());
        }
        let term = self.term(index).map_err(|_| unavailable())?;
        let mut snap = Snapshot::default();
        let md = snap.mut_metadata();
        md.index = index;
        md.term = term;
        md.set_conf_state(self.conf_state());
        Ok(snap)
    }
}
