//! Persistence of lease records. Attached keys are not stored here: the key-value
//! layer re-attaches them on recovery, as every key carries its lease id.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::LeaseError;

/// What survives a restart for one lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseRecord {
    pub id: i64,
    /// Granted TTL in seconds (already raised to the minimum TTL).
    pub ttl: i64,
    /// Last checkpointed remaining TTL in seconds; 0 means "not checkpointed, use `ttl`".
    pub remaining_ttl: i64,
}

/// Durable home of lease records; written on grant, checkpoint and revoke.
pub trait LeaseStore: Send {
    fn load(&self) -> Result<Vec<LeaseRecord>, LeaseError>;
    fn save(&mut self, r: &LeaseRecord) -> Result<(), LeaseError>;
    fn delete(&mut self, id: i64) -> Result<(), LeaseError>;
}

/// A store kept in memory. Clones share their contents, so a test can keep one clone
/// and build a new lessor from it to simulate a restart.
#[derive(Debug, Clone, Default)]
pub struct InMemoryLeaseStore {
    records: Arc<Mutex<BTreeMap<i64, LeaseRecord>>>,
}

impl InMemoryLeaseStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// All records, ordered by lease id.
    pub fn records(&self) -> Vec<LeaseRecord> {
        self.lock().values().copied().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<i64, LeaseRecord>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl LeaseStore for InMemoryLeaseStore {
    fn load(&self) -> Result<Vec<LeaseRecord>, LeaseError> {
        Ok(self.records())
    }

    fn save(&mut self, r: &LeaseRecord) -> Result<(), LeaseError> {
        self.lock().insert(r.id, *r);
        Ok(())
    }

    fn delete(&mut self, id: i64) -> Result<(), LeaseError> {
        self.lock().remove(&id);
        Ok(())
    }
}
