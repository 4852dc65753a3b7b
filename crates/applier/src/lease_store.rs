//! Lease records kept in the storage engine beside the key-value data, under a prefix the
//! mvcc layer never uses, so they survive restarts with the data they govern.

use std::sync::Arc;

use lease::{LeaseError, LeaseRecord, LeaseStore};
use mvcc_store::{KvEngine, WriteBatch};

const PREFIX: u8 = b'l';

fn key(id: i64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(PREFIX);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

pub struct EngineLeaseStore {
    engine: Arc<dyn KvEngine>,
}

impl EngineLeaseStore {
    pub fn new(engine: Arc<dyn KvEngine>) -> Self {
        EngineLeaseStore { engine }
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
        self.engine.write(batch).map_err(io)
    }

    fn delete(&mut self, id: i64) -> Result<(), LeaseError> {
        let mut batch = WriteBatch::default();
        batch.delete(key(id));
        self.engine.write(batch).map_err(io)
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
