//! Response headers: every etcd response names the cluster, the answering member, the store
//! revision the answer reflects and the current raft term.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use oxcd_proto::etcdserverpb::ResponseHeader;

/// Cheap to clone; the term is updated by the server as raft reports it.
#[derive(Clone, Debug)]
pub struct HeaderSource {
    pub cluster_id: u64,
    pub member_id: u64,
    term: Arc<AtomicU64>,
}

impl HeaderSource {
    pub fn new(cluster_id: u64, member_id: u64) -> Self {
        HeaderSource {
            cluster_id,
            member_id,
            term: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn set_term(&self, term: u64) {
        self.term.store(term, Ordering::Relaxed);
    }

    pub fn term(&self) -> u64 {
        self.term.load(Ordering::Relaxed)
    }

    pub fn header(&self, revision: i64) -> ResponseHeader {
        ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.member_id,
            revision,
            raft_term: self.term(),
        }
    }

    /// Completes a header produced by a lower layer (which only knows the revision).
    pub fn fill(&self, header: &mut Option<ResponseHeader>, fallback_revision: i64) {
        let revision = header
            .as_ref()
            .map(|h| h.revision)
            .filter(|r| *r != 0)
            .unwrap_or(fallback_revision);
        *header = Some(self.header(revision));
    }
}
