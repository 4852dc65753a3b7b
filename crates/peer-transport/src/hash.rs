//! Hashes of the key-value history between members, for the corruption checks: the serving
//! side hashes its store at the asked revision, the asking side gets etcd's `HashKVResponse`
//! back or learns why not (the two revision errors are told apart: the checks treat them
//! differently from a peer that cannot be reached).

use std::sync::Arc;
use std::time::Duration;

use oxcd_proto::etcdserverpb::{HashKvResponse, ResponseHeader};
use oxcd_proto::oxcdpeerpb::{HashKvRequest, PeerHeader};
use tonic::{Code, Status};

use crate::AddressBook;

/// Why a member has no hash to give at a revision.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum HashKvError {
    /// The revision is at or below the member's compaction point.
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    /// The member has not reached the revision yet.
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRevision,
    /// Anything else: unreachable, refused, storage failure.
    #[error("{0}")]
    Failed(String),
}

/// What a member hashes when a peer asks.
pub trait HashSource: Send + Sync + 'static {
    /// (hash, compact revision, revision hashed) of the history up to `revision`, 0 meaning the
    /// newest. Reads the whole store: called from a blocking thread.
    fn hash_kv(&self, revision: i64) -> Result<(u32, i64, i64), HashKvError>;
}

// Both revision errors are OutOfRange in etcd's API; here each has its own code, so the
// asking side need not read messages.
impl From<HashKvError> for Status {
    fn from(e: HashKvError) -> Status {
        match e {
            HashKvError::Compacted => Status::out_of_range(e.to_string()),
            HashKvError::FutureRevision => Status::failed_precondition(e.to_string()),
            HashKvError::Failed(m) => Status::internal(m),
        }
    }
}

fn from_status(s: Status) -> HashKvError {
    match s.code() {
        Code::OutOfRange => HashKvError::Compacted,
        Code::FailedPrecondition => HashKvError::FutureRevision,
        _ => HashKvError::Failed(format!("{}: {}", s.code(), s.message())),
    }
}

/// Answers one request on behalf of member `me` of `cluster_id`.
pub(crate) async fn serve(
    source: Arc<dyn HashSource>,
    cluster_id: u64,
    me: u64,
    revision: i64,
) -> Result<HashKvResponse, Status> {
    let (hash, compact_revision, hash_revision) =
        tokio::task::spawn_blocking(move || source.hash_kv(revision))
            .await
            .map_err(|e| Status::internal(format!("hash task failed: {e}")))??;
    Ok(HashKvResponse {
        header: Some(ResponseHeader {
            cluster_id,
            member_id: me,
            revision: hash_revision,
            raft_term: 0,
        }),
        hash,
        compact_revision,
        hash_revision,
    })
}

/// Asks member `header.to` for its hash at `revision`, within `timeout` (connecting included).
pub async fn fetch_hash_kv(
    book: &AddressBook,
    header: PeerHeader,
    revision: i64,
    timeout: Duration,
) -> Result<HashKvResponse, HashKvError> {
    let call = async {
        let mut client = crate::connect(book, header.to)
            .await
            .map_err(|e| HashKvError::Failed(e.to_string()))?;
        client
            .hash_kv(HashKvRequest {
                header: Some(header),
                revision,
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(from_status)
    };
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| Err(HashKvError::Failed("context deadline exceeded".into())))
}
