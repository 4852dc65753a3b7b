//! Lease records kept in the storage engine beside the key-value data, under a prefix the
//! mvcc layer never uses, so they survive restarts with the data they govern.

use std::sync::Arc;

use lease::{LeaseError, LeaseRecord, LeaseStore};
use mvcc_store::{KvEngine, MvccStore, WriteBatch};

const PREFIX: u8 = b'l';

fn key(id: i64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(PREFIX);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

pub struct EngineLeaseStore {
    engine: Arc<dyn KvEngine>,
    /// Where writes go when they belong to the entry being applied.
    applied_with: Option<MvccStore>,
}

impl EngineLeaseStore {
    /// Writes go straight to the engine, each in its own batch.
    pub fn new(engine: Arc<dyn KvEngine>) -> Self {
        EngineLeaseStore {
            engine,
            applied_with: None,
        }
    }

    /// For the lessor the applier drives: a write is staged in `store` and lands in the batch
    /// of the raft entry that caused it (grant, revoke, checkpoint), with that entry's index.
    /// Half the engine writes of a lease request, and no restart can find the record without
    /// the index or the other way round.
    pub fn applied_with(engine: Arc<dyn KvEngine>, store: MvccStore) -> Self {
        EngineLeaseStore {
            engine,
            applied_with: Some(store),
        }
    }

    fn write(&self, batch: WriteBatch) -> Result<(), LeaseError> {
        match &self.applied_with {
            Some(store) => {
                store.stage(batch);
                Ok(())
            }
            None => self.engine.write(batch).map_err(io),
        }
    }
}

fn io(e: impl std::fmt::Display) -> LeaseError {
    LeaseError::Store(e.to_string())
}

impl LeaseStore for EngineLeaseStore {
    fn load(&self) -> Result<Vec<LeaseRecord>, LeaseError> {
        let mut out = Vec::new();
        let mut bad = None;
        self.engine
            .scan(&[PREFIX], &[PREFIX + 1], &mut |k, v| {
                if k.len() != 9 || v.len() != 16 {
                    bad = Some(format!(
                        "lease record of {} bytes under a {}-byte key",
                        v.len(),
                        k.len()
                    ));
                    return false;
                }
                let id = i64::from_be_bytes(k[1..9].try_into().expect("8 bytes"));
                let ttl = i64::from_be_bytes(v[0..8].try_into().expect("8 bytes"));
                let remaining_ttl = i64::from_be_bytes(v[8..16].try_into().expect("8 bytes"));
                out.push(LeaseRecord {
                    id,
                    ttl,
                    remaining_ttl,
                });
                true
            })
            .map_err(io)?;
        match bad {
            Some(reason) => Err(LeaseError::Store(reason)),
            None => Ok(out),
        }
    }

    fn save(&mut self, r: &LeaseRecord) -> Result<(), LeaseError> {
        let mut v = Vec::with_capacity(16);
        v.extend_from_slice(&r.ttl.to_be_bytes());
        v.extend_from_slice(&r.remaining_ttl.to_be_bytes());
        let mut batch = WriteBatch::default();
        batch.put(key(r.id), v);
        self.write(batch)
    }

    fn delete(&mut self, id: i64) -> Result<(), LeaseError> {
        let mut batch = WriteBatch::default();
        batch.delete(key(id));
        self.write(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvcc_store::MemEngine;

    #[test]
    fn records_round_trip_and_delete() {
        let engine: Arc<dyn KvEngine> = Arc::new(MemEngine::default());
        let mut s = EngineLeaseStore::new(engine.clone());
        s.save(&LeaseRecord {
            id: 7,
            ttl: 10,
            remaining_ttl: 0,
        })
        .unwrap();
        s.save(&LeaseRecord {
            id: i64::MAX,
            ttl: 60,
            remaining_ttl: 30,
        })
        .unwrap();
        s.save(&LeaseRecord {
            id: 7,
            ttl: 10,
            remaining_ttl: 4,
        })
        .unwrap();
        let reopened = EngineLeaseStore::new(engine);
        let mut got = reopened.load().unwrap();
        got.sort_by_key(|r| r.id);
        assert_eq!(
            got,
            vec![
                LeaseRecord {
                    id: 7,
                    ttl: 10,
                    remaining_ttl: 4
                },
                LeaseRecord {
                    id: i64::MAX,
                    ttl: 60,
                    remaining_ttl: 30
                },
            ]
        );
        s.delete(7).unwrap();
        assert_eq!(s.load().unwrap().len(), 1);
    }
}
