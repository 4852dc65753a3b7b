//! Corruption checks as etcd 3.4 runs them: members compare hashes of their key-value history
//! (HashKV: a checksum of every revision up to one, with the compaction point it was taken at).
//!
//! - Initial (`--experimental-initial-corrupt-check`): a member that already has data hashes its
//!   store before raft starts and asks every peer for its hash at the same revision. A peer with
//!   the same compaction point and another hash is a mismatch, and any mismatch refuses the
//!   start-up. A different compaction point, a peer behind, or this member behind a peer's
//!   compaction is only logged; so is a peer that cannot be reached.
//! - Periodic (`--experimental-corrupt-check-time`): every interval, the leader hashes its store
//!   (h1 at r1, compacted at c1), asks every peer for its hash at r1, waits for a linearizable
//!   read barrier and hashes again (h2 at r2, c2). It blames itself if h1 and h2 differ at the
//!   same revision and compaction point; a peer whose revision is beyond r2, whose compaction
//!   point is beyond c2, or that has c1 as compaction point but a hash other than h1. The first
//!   member blamed in a pass gets a CORRUPT alarm, proposed through raft so every member applies
//!   it (and then refuses writes). Peers that did not answer with a hash are not judged.
//!
//! Which member the alarm names: member 0, as etcd 3.4.23 does (up to 3.4.22 it named the
//! member blamed), because a leader with corrupt data would blame a healthy follower. The
//! member blamed is in the leader's log.
//!
//! The decisions ([`judge_periodic`], [`judge_initial`]) are pure; the passes run over the
//! [`Peers`] and [`Leader`] traits, so tests drive them with fakes on tokio's paused clock.

use std::future::Future;
use std::time::Duration;

use api_gateway::Gateway;
use applier::Membership;
use mvcc_store::{MvccError, MvccStore};
use oxcd_proto::etcdserverpb::{
    alarm_request::AlarmAction, AlarmRequest, AlarmType, InternalRaftRequest,
};
use oxcd_proto::oxcdpeerpb::PeerHeader;
use peer_transport::{AddressBook, HashKvError, HashSource};

use crate::datadir::Identity;

/// A hash of one member's key-value history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvHash {
    pub hash: u32,
    /// The revision hashed.
    pub revision: i64,
    /// The member's compaction point when it hashed (-1: never compacted).
    pub compact_revision: i64,
}

/// One peer's answer to "your hash at revision r".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAnswer {
    pub id: u64,
    pub answer: Result<KvHash, HashKvError>,
}

/// Why the leader blames a member, in the order etcd looks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The leader hashed the same revision at the same compaction point twice and got two
    /// different hashes: its own store changed under it.
    LeaderHashChanged { first: KvHash, second: KvHash },
    /// A follower cannot be ahead of the leader after the read barrier.
    RevisionAhead {
        peer: u64,
        leader_revision: i64,
        peer_revision: i64,
    },
    /// Nor can its compaction point.
    CompactRevisionAhead {
        peer: u64,
        leader_compact_revision: i64,
        peer_compact_revision: i64,
    },
    /// Same compaction point as the leader's first hash, other hash.
    HashMismatch {
        peer: u64,
        revision: i64,
        leader_compact_revision: i64,
        leader_hash: u32,
        peer_compact_revision: i64,
        peer_hash: u32,
    },
}

impl Fault {
    /// The member at fault; `leader` is the member that judged.
    pub fn member(&self, leader: u64) -> u64 {
        match self {
            Fault::LeaderHashChanged { .. } => leader,
            Fault::RevisionAhead { peer, .. }
            | Fault::CompactRevisionAhead { peer, .. }
            | Fault::HashMismatch { peer, .. } => *peer,
        }
    }

    fn log(&self) {
        match self {
            Fault::LeaderHashChanged { first, second } => tracing::warn!(
                revision_1 = first.revision,
                compact_revision_1 = first.compact_revision,
                hash_1 = first.hash,
                revision_2 = second.revision,
                compact_revision_2 = second.compact_revision,
                hash_2 = second.hash,
                "found hash mismatch"
            ),
            Fault::RevisionAhead {
                peer,
                leader_revision,
                peer_revision,
            } => tracing::warn!(
                leader_revision,
                follower_revision = peer_revision,
                follower_peer_id = %format!("{peer:x}"),
                "revision from follower must be less than or equal to leader's"
            ),
            Fault::CompactRevisionAhead {
                peer,
                leader_compact_revision,
                peer_compact_revision,
            } => tracing::warn!(
                leader_compact_revision,
                follower_compact_revision = peer_compact_revision,
                follower_peer_id = %format!("{peer:x}"),
                "compact revision from follower must be less than or equal to leader's"
            ),
            Fault::HashMismatch {
                peer,
                revision,
                leader_compact_revision,
                leader_hash,
                peer_compact_revision,
                peer_hash,
            } => tracing::warn!(
                revision,
                leader_compact_revision,
                leader_hash,
                follower_compact_revision = peer_compact_revision,
                follower_hash = peer_hash,
                follower_peer_id = %format!("{peer:x}"),
                "same compact revision then hashes must match"
            ),
        }
    }
}

/// What one periodic pass found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Verdict {
    /// Every fault, in the order found.
    pub faults: Vec<Fault>,
    /// Peers that answered with a hash.
    pub checked: usize,
}

impl Verdict {
    /// The member that gets the alarm: the first one blamed (one alarm per pass, as in etcd).
    pub fn blamed(&self, leader: u64) -> Option<u64> {
        self.faults.first().map(|f| f.member(leader))
    }
}

/// The leader's judgement: `first` and `second` are its own hashes before asking the peers and
/// after the read barrier; `peers` answered for `first.revision`.
pub fn judge_periodic(first: KvHash, second: KvHash, peers: &[PeerAnswer]) -> Verdict {
    let mut v = Verdict::default();
    if first.hash != second.hash
        && first.revision == second.revision
        && first.compact_revision == second.compact_revision
    {
        v.faults.push(Fault::LeaderHashChanged { first, second });
    }
    for p in peers {
        let Ok(h) = &p.answer else { continue };
        v.checked += 1;
        if h.revision > second.revision {
            v.faults.push(Fault::RevisionAhead {
                peer: p.id,
                leader_revision: second.revision,
                peer_revision: h.revision,
            });
        }
        if h.compact_revision > second.compact_revision {
            v.faults.push(Fault::CompactRevisionAhead {
                peer: p.id,
                leader_compact_revision: second.compact_revision,
                peer_compact_revision: h.compact_revision,
            });
        }
        if h.compact_revision == first.compact_revision && h.hash != first.hash {
            v.faults.push(Fault::HashMismatch {
                peer: p.id,
                revision: first.revision,
                leader_compact_revision: second.compact_revision,
                leader_hash: first.hash,
                peer_compact_revision: h.compact_revision,
                peer_hash: h.hash,
            });
        }
    }
    v
}

/// What the initial check makes of one peer's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitialFinding {
    /// Same compaction point, other hash: a mismatch, start-up is refused.
    HashMismatch { peer: u64, theirs: KvHash },
    /// Other hash but also another compaction point: the hashes cannot be compared.
    CompactRevisionDiffers { peer: u64, theirs: KvHash },
    /// The peer has not reached this member's revision yet.
    PeerBehind { peer: u64 },
    /// The peer compacted past this member's revision.
    LocalBehind { peer: u64 },
}

/// This member's hash against its peers' at the same revision; only disagreements are listed
/// (an unreachable peer is not one).
pub fn judge_initial(local: KvHash, peers: &[PeerAnswer]) -> Vec<InitialFinding> {
    let mut out = Vec::new();
    for p in peers {
        let peer = p.id;
        match &p.answer {
            Ok(theirs) if theirs.hash != local.hash => {
                out.push(if theirs.compact_revision == local.compact_revision {
                    InitialFinding::HashMismatch {
                        peer,
                        theirs: *theirs,
                    }
                } else {
                    InitialFinding::CompactRevisionDiffers {
                        peer,
                        theirs: *theirs,
                    }
                });
            }
            Ok(_) | Err(HashKvError::Failed(_)) => {}
            Err(HashKvError::FutureRevision) => out.push(InitialFinding::PeerBehind { peer }),
            Err(HashKvError::Compacted) => out.push(InitialFinding::LocalBehind { peer }),
        }
    }
    out
}

/// Start-up refused; the texts are etcd's.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CorruptError {
    #[error("{member:x} failed to fetch hash ({reason})")]
    LocalHash { member: u64, reason: String },
    #[error("{member:x} found data inconsistency with peers")]
    Inconsistent { member: u64 },
}

/// What both checks need: this member's hash and its peers'.
pub trait Peers: Send + Sync + 'static {
    fn member_id(&self) -> u64;
    /// This member's hash at its newest revision.
    fn local_hash(&self) -> impl Future<Output = Result<KvHash, String>> + Send;
    /// Every other member's hash at `revision`, in member id order.
    fn peer_hashes(&self, revision: i64) -> impl Future<Output = Vec<PeerAnswer>> + Send;
}

/// What the periodic check needs besides.
pub trait Leader: Peers {
    /// Whether this member leads; `None` once the server is stopping.
    fn is_leader(&self) -> impl Future<Output = Option<bool>> + Send;
    /// Waits until this member applied everything committed when called.
    fn read_barrier(&self) -> impl Future<Output = Result<(), String>> + Send;
    /// Proposes the cluster's CORRUPT alarm through raft, `member` being the one blamed.
    fn raise_corrupt(&self, member: u64) -> impl Future<Output = Result<(), String>> + Send;
}

/// The initial check: `Ok` unless some peer has another hash at the same revision and
/// compaction point.
pub async fn initial<P: Peers>(p: &P) -> Result<(), CorruptError> {
    let me = p.member_id();
    tracing::info!(
        local_member_id = %format!("{me:x}"),
        "starting initial corruption check"
    );
    let local = p
        .local_hash()
        .await
        .map_err(|reason| CorruptError::LocalHash { member: me, reason })?;
    let peers = p.peer_hashes(local.revision).await;
    let findings = judge_initial(local, &peers);
    let mut mismatches = 0;
    for f in &findings {
        match f {
            InitialFinding::HashMismatch { peer, theirs } => {
                mismatches += 1;
                tracing::warn!(
                    local_member_revision = local.revision,
                    local_member_compact_revision = local.compact_revision,
                    local_member_hash = local.hash,
                    remote_peer_id = %format!("{peer:x}"),
                    remote_peer_revision = theirs.revision,
                    remote_peer_compact_revision = theirs.compact_revision,
                    remote_peer_hash = theirs.hash,
                    "found different hash values from remote peer"
                );
            }
            InitialFinding::CompactRevisionDiffers { peer, theirs } => tracing::warn!(
                local_member_revision = local.revision,
                local_member_compact_revision = local.compact_revision,
                local_member_hash = local.hash,
                remote_peer_id = %format!("{peer:x}"),
                remote_peer_revision = theirs.revision,
                remote_peer_compact_revision = theirs.compact_revision,
                remote_peer_hash = theirs.hash,
                "found different compact revision values from remote peer"
            ),
            InitialFinding::PeerBehind { peer } => tracing::warn!(
                local_member_revision = local.revision,
                remote_peer_id = %format!("{peer:x}"),
                "cannot fetch hash from slow remote peer"
            ),
            InitialFinding::LocalBehind { peer } => tracing::warn!(
                local_member_revision = local.revision,
                remote_peer_id = %format!("{peer:x}"),
                "cannot fetch hash from remote peer; local member is behind"
            ),
        }
    }
    if mismatches > 0 {
        return Err(CorruptError::Inconsistent { member: me });
    }
    tracing::info!(
        local_member_id = %format!("{me:x}"),
        "initial corruption checking passed; no corruption"
    );
    Ok(())
}

/// The periodic check: every `interval` (after the previous pass ended), a pass on the leader.
/// Runs until the server stops.
pub async fn run<L: Leader>(interval: Duration, l: L) {
    tracing::info!(
        local_member_id = %format!("{:x}", l.member_id()),
        interval = ?interval,
        "enabled corruption checking"
    );
    loop {
        tokio::time::sleep(interval).await;
        match l.is_leader().await {
            None => return,
            Some(false) => continue,
            Some(true) => {}
        }
        if let Err(e) = check(&l).await {
            tracing::warn!(error = %e, "failed to check hash KV");
        }
    }
}

/// One pass of the leader: judges, raises the alarm for the member blamed, and returns the
/// verdict. `Err` when the leader could not hash its own store or pass the read barrier.
pub async fn check<L: Leader>(l: &L) -> Result<Verdict, String> {
    let first = l.local_hash().await?;
    let peers = l.peer_hashes(first.revision).await;
    l.read_barrier().await?;
    let second = l.local_hash().await?;
    let verdict = judge_periodic(first, second, &peers);
    for f in &verdict.faults {
        f.log();
    }
    if let Some(member) = verdict.blamed(l.member_id()) {
        if let Err(e) = l.raise_corrupt(member).await {
            tracing::warn!(member = %format!("{member:x}"), error = %e, "CORRUPT alarm not raised");
        }
    }
    tracing::info!(
        number_of_peers_checked = verdict.checked,
        "finished peer corruption check"
    );
    Ok(verdict)
}

/// The server's side of [`Peers`]: the store, and the other members over the peer transport.
pub struct StorePeers {
    member_id: u64,
    cluster_id: u64,
    store: MvccStore,
    membership: Membership,
    book: AddressBook,
    /// How long one peer may take to answer (etcd's request timeout).
    timeout: Duration,
}

impl StorePeers {
    pub fn new(
        me: &Identity,
        store: &MvccStore,
        membership: &Membership,
        book: &AddressBook,
        timeout: Duration,
    ) -> Self {
        StorePeers {
            member_id: me.member_id,
            cluster_id: me.cluster_id,
            store: store.clone(),
            membership: membership.clone(),
            book: book.clone(),
            timeout,
        }
    }
}

impl Peers for StorePeers {
    fn member_id(&self) -> u64 {
        self.member_id
    }

    async fn local_hash(&self) -> Result<KvHash, String> {
        let store = self.store.clone();
        let (hash, compact_revision, revision) =
            tokio::task::spawn_blocking(move || store.hash_kv(0))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        Ok(KvHash {
            hash,
            revision,
            compact_revision,
        })
    }

    async fn peer_hashes(&self, revision: i64) -> Vec<PeerAnswer> {
        let mut members = self.membership.list();
        members.sort_by_key(|m| m.id);
        let mut out = Vec::new();
        for m in members {
            if m.id == self.member_id || m.peer_ur_ls.is_empty() {
                continue;
            }
            let header = PeerHeader {
                cluster_id: self.cluster_id,
                from: self.member_id,
                to: m.id,
            };
            let answer =
                peer_transport::fetch_hash_kv(&self.book, header, revision, self.timeout).await;
            if let Err(e) = &answer {
                tracing::warn!(
                    requested_revision = revision,
                    remote_peer_id = %format!("{:x}", m.id),
                    remote_peer_endpoints = ?m.peer_ur_ls,
                    error = %e,
                    "failed hash kv request"
                );
            }
            let answer = answer.map(|r| KvHash {
                hash: r.hash,
                revision: r.header.map_or(r.hash_revision, |h| h.revision),
                compact_revision: r.compact_revision,
            });
            out.push(PeerAnswer { id: m.id, answer });
        }
        out
    }
}

/// The server's side of [`Leader`]: [`StorePeers`] plus raft through the gateway.
pub struct GatewayLeader {
    pub peers: StorePeers,
    pub gw: Gateway,
}

impl Peers for GatewayLeader {
    fn member_id(&self) -> u64 {
        self.peers.member_id
    }

    fn local_hash(&self) -> impl Future<Output = Result<KvHash, String>> + Send {
        self.peers.local_hash()
    }

    fn peer_hashes(&self, revision: i64) -> impl Future<Output = Vec<PeerAnswer>> + Send {
        self.peers.peer_hashes(revision)
    }
}

impl Leader for GatewayLeader {
    async fn is_leader(&self) -> Option<bool> {
        self.gw.raft_status().await.ok().map(|s| s.is_leader)
    }

    async fn read_barrier(&self) -> Result<(), String> {
        self.gw
            .read_barrier()
            .await
            .map_err(|e| e.0.message().to_string())
    }

    async fn raise_corrupt(&self, member: u64) -> Result<(), String> {
        tracing::error!(blamed_member_id = %format!("{member:x}"), "raising the CORRUPT alarm");
        let req = InternalRaftRequest {
            alarm: Some(AlarmRequest {
                action: AlarmAction::Activate as i32,
                // Who is at fault is logged; the alarm is the cluster's (see the module doc).
                member_id: 0,
                alarm: AlarmType::Corrupt as i32,
            }),
            ..Default::default()
        };
        self.gw
            .propose(req)
            .await
            .map(|_| ())
            .map_err(|e| e.0.message().to_string())
    }
}

/// What this member hashes when a peer's check asks.
pub struct StoreHashes(pub MvccStore);

impl HashSource for StoreHashes {
    fn hash_kv(&self, revision: i64) -> Result<(u32, i64, i64), HashKvError> {
        self.0.hash_kv(revision).map_err(|e| match e {
            MvccError::Compacted => HashKvError::Compacted,
            MvccError::FutureRevision => HashKvError::FutureRevision,
            e => HashKvError::Failed(e.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    const LEADER: u64 = 1;

    fn h(hash: u32, revision: i64, compact_revision: i64) -> KvHash {
        KvHash {
            hash,
            revision,
            compact_revision,
        }
    }

    fn ok(id: u64, hash: KvHash) -> PeerAnswer {
        PeerAnswer {
            id,
            answer: Ok(hash),
        }
    }

    fn err(id: u64, e: HashKvError) -> PeerAnswer {
        PeerAnswer { id, answer: Err(e) }
    }

    #[test]
    fn agreeing_peers_are_not_blamed() {
        let mine = h(77, 10, 4);
        // One peer hashed the same revision, one could not be reached, one is behind, one has
        // compacted further but not beyond the leader: none of them is judged corrupt.
        let v = judge_periodic(
            mine,
            h(90, 12, 4),
            &[
                ok(2, mine),
                err(3, HashKvError::Failed("unreachable".into())),
                err(4, HashKvError::FutureRevision),
                ok(5, h(55, 10, 3)),
            ],
        );
        assert_eq!(v.faults, vec![]);
        assert_eq!(v.blamed(LEADER), None);
        assert_eq!(v.checked, 2);
    }

    #[test]
    fn a_follower_with_another_hash_at_the_same_compaction_is_blamed() {
        let mine = h(77, 10, 4);
        let v = judge_periodic(mine, mine, &[ok(2, mine), ok(3, h(78, 10, 4))]);
        assert_eq!(
            v.faults,
            vec![Fault::HashMismatch {
                peer: 3,
                revision: 10,
                leader_compact_revision: 4,
                leader_hash: 77,
                peer_compact_revision: 4,
                peer_hash: 78,
            }]
        );
        assert_eq!(v.blamed(LEADER), Some(3));
        // Another hash with another compaction point proves nothing.
        let v = judge_periodic(mine, mine, &[ok(3, h(78, 10, 2))]);
        assert_eq!(v.blamed(LEADER), None);
    }

    #[test]
    fn a_follower_ahead_of_the_leader_is_blamed() {
        let first = h(77, 10, 4);
        let second = h(80, 11, 4);
        let v = judge_periodic(first, second, &[ok(2, h(81, 12, 4))]);
        assert_eq!(
            v.faults[0],
            Fault::RevisionAhead {
                peer: 2,
                leader_revision: 11,
                peer_revision: 12
            }
        );
        // Its hash also differs at the same compaction point: a second fault, same member.
        assert_eq!(v.faults.len(), 2);
        assert_eq!(v.blamed(LEADER), Some(2));

        let v = judge_periodic(first, second, &[ok(2, h(77, 10, 6))]);
        assert_eq!(
            v.faults,
            vec![Fault::CompactRevisionAhead {
                peer: 2,
                leader_compact_revision: 4,
                peer_compact_revision: 6
            }]
        );
    }

    #[test]
    fn a_leader_whose_hash_changed_blames_itself_first() {
        let v = judge_periodic(h(77, 10, 4), h(79, 10, 4), &[ok(2, h(78, 10, 4))]);
        assert!(matches!(v.faults[0], Fault::LeaderHashChanged { .. }));
        assert_eq!(v.blamed(LEADER), Some(LEADER));
        // A write or a compaction between the two hashes explains a new hash.
        let v = judge_periodic(h(77, 10, 4), h(79, 11, 4), &[]);
        assert_eq!(v.blamed(LEADER), None);
        let v = judge_periodic(h(77, 10, 4), h(79, 10, 5), &[]);
        assert_eq!(v.blamed(LEADER), None);
    }

    #[test]
    fn only_the_first_member_at_fault_gets_the_alarm() {
        let mine = h(77, 10, 4);
        let v = judge_periodic(mine, mine, &[ok(2, h(1, 10, 4)), ok(3, h(2, 10, 4))]);
        assert_eq!(v.faults.len(), 2);
        assert_eq!(v.blamed(LEADER), Some(2));
    }

    #[test]
    fn initial_check_counts_only_hash_mismatches_at_the_same_compaction() {
        let mine = h(77, 10, 4);
        let peers = [
            ok(2, mine),
            ok(3, h(78, 10, 4)),
            ok(4, h(79, 10, 5)),
            err(5, HashKvError::FutureRevision),
            err(6, HashKvError::Compacted),
            err(7, HashKvError::Failed("down".into())),
        ];
        assert_eq!(
            judge_initial(mine, &peers),
            vec![
                InitialFinding::HashMismatch {
                    peer: 3,
                    theirs: h(78, 10, 4)
                },
                InitialFinding::CompactRevisionDiffers {
                    peer: 4,
                    theirs: h(79, 10, 5)
                },
                InitialFinding::PeerBehind { peer: 5 },
                InitialFinding::LocalBehind { peer: 6 },
            ]
        );
    }

    /// A cluster as the leader sees it: its hashes in turn, its peers' answers, and what it did.
    #[derive(Default)]
    struct Fake {
        leader: Mutex<Vec<Option<bool>>>,
        local: Mutex<Vec<Result<KvHash, String>>>,
        peers: Vec<PeerAnswer>,
        barrier_fails: bool,
        asked_at: Mutex<Vec<i64>>,
        raised: Mutex<Vec<u64>>,
        passes: Mutex<Vec<tokio::time::Instant>>,
    }

    impl Peers for Arc<Fake> {
        fn member_id(&self) -> u64 {
            LEADER
        }

        async fn local_hash(&self) -> Result<KvHash, String> {
            self.passes
                .lock()
                .unwrap()
                .push(tokio::time::Instant::now());
            let mut l = self.local.lock().unwrap();
            if l.len() > 1 {
                l.remove(0)
            } else {
                l[0].clone()
            }
        }

        async fn peer_hashes(&self, revision: i64) -> Vec<PeerAnswer> {
            self.asked_at.lock().unwrap().push(revision);
            self.peers.clone()
        }
    }

    impl Leader for Arc<Fake> {
        async fn is_leader(&self) -> Option<bool> {
            let mut l = self.leader.lock().unwrap();
            if l.is_empty() {
                None
            } else {
                l.remove(0)
            }
        }

        async fn read_barrier(&self) -> Result<(), String> {
            if self.barrier_fails {
                Err("etcdserver: request timed out".into())
            } else {
                Ok(())
            }
        }

        async fn raise_corrupt(&self, member: u64) -> Result<(), String> {
            self.raised.lock().unwrap().push(member);
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_pass_asks_peers_at_its_revision_and_raises_the_alarm() {
        let f = Arc::new(Fake {
            local: Mutex::new(vec![Ok(h(77, 10, -1)), Ok(h(77, 12, -1))]),
            peers: vec![ok(2, h(77, 10, -1)), ok(3, h(5, 10, -1))],
            ..Default::default()
        });
        let v = check(&f).await.unwrap();
        assert_eq!(v.checked, 2);
        assert_eq!(*f.asked_at.lock().unwrap(), vec![10]);
        assert_eq!(*f.raised.lock().unwrap(), vec![3]);
    }

    #[tokio::test]
    async fn no_alarm_without_a_read_barrier() {
        let f = Arc::new(Fake {
            local: Mutex::new(vec![Ok(h(77, 10, -1))]),
            peers: vec![ok(3, h(5, 10, -1))],
            barrier_fails: true,
            ..Default::default()
        });
        assert!(check(&f).await.is_err());
        assert!(f.raised.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_leader_checks_once_per_interval() {
        let f = Arc::new(Fake {
            // Follower, leader, leader, then the server stops.
            leader: Mutex::new(vec![Some(false), Some(true), Some(true)]),
            local: Mutex::new(vec![Ok(h(77, 10, -1))]),
            peers: vec![ok(2, h(77, 10, -1))],
            ..Default::default()
        });
        let start = tokio::time::Instant::now();
        run(Duration::from_secs(5), f.clone()).await;
        // Two passes (two hashes each), at 10 s and 15 s; nothing raised on agreement.
        let at: Vec<u64> = f
            .passes
            .lock()
            .unwrap()
            .iter()
            .map(|t| (*t - start).as_secs())
            .collect();
        assert_eq!(at, vec![10, 10, 15, 15]);
        assert!(f.raised.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn initial_check_refuses_a_member_with_another_hash() {
        let f = Arc::new(Fake {
            local: Mutex::new(vec![Ok(h(77, 10, 4))]),
            peers: vec![
                ok(2, h(77, 10, 4)),
                err(3, HashKvError::Failed("down".into())),
            ],
            ..Default::default()
        });
        assert_eq!(initial(&f).await, Ok(()));

        let f = Arc::new(Fake {
            local: Mutex::new(vec![Ok(h(77, 10, 4))]),
            peers: vec![ok(2, h(77, 10, 4)), ok(3, h(78, 10, 4))],
            ..Default::default()
        });
        let e = initial(&f).await.unwrap_err();
        assert_eq!(e, CorruptError::Inconsistent { member: LEADER });
        assert_eq!(e.to_string(), "1 found data inconsistency with peers");

        let f = Arc::new(Fake {
            local: Mutex::new(vec![Err("disk".into())]),
            ..Default::default()
        });
        assert_eq!(
            initial(&f).await.unwrap_err().to_string(),
            "1 failed to fetch hash (disk)"
        );
    }
}
