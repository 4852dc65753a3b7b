//! The cluster's members as the applied log says: who they are (id, name), where peers reach
//! them, where clients reach them, and whether they are learners. Written only by the applier
//! (membership entries and published attributes), kept in the storage engine under a prefix of
//! its own so a restart serves the same list; read by the Cluster service, by the peer transport
//! (addresses) and by followers forwarding to the leader.
//!
//! Changes are written before the entry's applied index, and every change is a plain set or
//! delete, so replaying an entry after a crash gives the same records.

use std::collections::BTreeMap;
use std::sync::Arc;

use mvcc_store::{KvEngine, WriteBatch};
use oxcd_proto::etcdserverpb::Member;
use parking_lot::RwLock;
use prost::Message as _;
use tokio::sync::watch;

const PREFIX: u8 = b'c';

fn key(id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(PREFIX);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

#[derive(thiserror::Error, Debug)]
pub enum MembershipError {
    #[error("member records: {0}")]
    Store(String),
}

#[derive(Clone)]
pub struct Membership {
    engine: Arc<dyn KvEngine>,
    members: Arc<RwLock<BTreeMap<u64, Member>>>,
    /// Bumped on every change, for whoever mirrors the list (the peer transport's addresses).
    version: Arc<watch::Sender<u64>>,
}

impl Membership {
    /// Loads the stored members; a data dir that has none gets `initial` (the bootstrap list
    /// from --initial-cluster).
    pub fn open(engine: Arc<dyn KvEngine>, initial: &[Member]) -> Result<Self, MembershipError> {
        let members = load(&*engine)?;
        let m = Membership {
            engine,
            members: Arc::new(RwLock::new(members)),
            version: Arc::new(watch::channel(0).0),
        };
        if m.members.read().is_empty() && !initial.is_empty() {
            for member in initial {
                m.save(member.clone())?;
            }
            // No raft entry writes these again after a crash: make them durable now.
            m.engine
                .flush()
                .map_err(|e| MembershipError::Store(e.to_string()))?;
        }
        Ok(m)
    }

    /// Reads the records again (the engine's content was replaced by a snapshot).
    pub fn reload(&self) -> Result<(), MembershipError> {
        let members = load(&*self.engine)?;
        *self.members.write() = members;
        self.version.send_modify(|v| *v += 1);
        Ok(())
    }

    pub fn list(&self) -> Vec<Member> {
        self.members.read().values().cloned().collect()
    }

    pub fn get(&self, id: u64) -> Option<Member> {
        self.members.read().get(&id).cloned()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Adds or replaces a member record.
    pub fn save(&self, member: Member) -> Result<(), MembershipError> {
        let mut batch = WriteBatch::default();
        batch.put(key(member.id), member.encode_to_vec());
        self.engine
            .write(batch)
            .map_err(|e| MembershipError::Store(e.to_string()))?;
        self.members.write().insert(member.id, member);
        self.version.send_modify(|v| *v += 1);
        Ok(())
    }

    pub fn remove(&self, id: u64) -> Result<(), MembershipError> {
        let mut batch = WriteBatch::default();
        batch.delete(key(id));
        self.engine
            .write(batch)
            .map_err(|e| MembershipError::Store(e.to_string()))?;
        self.members.write().remove(&id);
        self.version.send_modify(|v| *v += 1);
        Ok(())
    }

    /// Applies a change to one existing member; unknown ids change nothing.
    pub fn update(&self, id: u64, f: impl FnOnce(&mut Member)) -> Result<(), MembershipError> {
        let Some(mut m) = self.get(id) else {
            return Ok(());
        };
        f(&mut m);
        self.save(m)
    }
}

fn load(engine: &dyn KvEngine) -> Result<BTreeMap<u64, Member>, MembershipError> {
    let mut members = BTreeMap::new();
    let mut bad = None;
    engine
        .scan(
            &[PREFIX],
            &[PREFIX + 1],
            &mut |_, v| match Member::decode(v) {
                Ok(m) => {
                    members.insert(m.id, m);
                    true
                }
                Err(e) => {
                    bad = Some(e.to_string());
                    false
                }
            },
        )
        .map_err(|e| MembershipError::Store(e.to_string()))?;
    match bad {
        Some(reason) => Err(MembershipError::Store(reason)),
        None => Ok(members),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvcc_store::MemEngine;

    fn member(id: u64, name: &str) -> Member {
        Member {
            id,
            name: name.into(),
            peer_ur_ls: vec![format!("http://127.0.0.1:{id}")],
            client_ur_ls: vec![],
            is_learner: false,
        }
    }

    #[test]
    fn bootstrap_list_is_used_once_then_the_stored_one_wins() {
        let engine: Arc<dyn KvEngine> = Arc::new(MemEngine::default());
        let m = Membership::open(engine.clone(), &[member(1, "a"), member(2, "b")]).unwrap();
        let rx = m.subscribe();
        m.update(2, |x| x.client_ur_ls = vec!["http://c".into()])
            .unwrap();
        m.remove(1).unwrap();
        m.save(member(3, "c")).unwrap();
        assert!(rx.has_changed().unwrap());
        // Reopening with another bootstrap list keeps what was applied.
        let again = Membership::open(engine, &[member(9, "z")]).unwrap();
        let ids: Vec<u64> = again.list().iter().map(|x| x.id).collect();
        assert_eq!(ids, vec![2, 3]);
        assert_eq!(again.get(2).unwrap().client_ur_ls, vec!["http://c"]);
        // An unknown member is not created by an update.
        again.update(42, |x| x.name = "ghost".into()).unwrap();
        assert!(again.get(42).is_none());
    }
}
