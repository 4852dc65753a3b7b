//! The one place where every layer's error becomes etcd's gRPC status: same code, same text,
//! so clients that match on etcd's messages (etcdctl, client-go's rpctypes) behave the same.

use applier::{ApplyError, MvccError};
use lease::LeaseError;
use raft_node::RaftError;
use tonic::{Code, Status};

/// Errors detected by the gateway itself, before anything is proposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: value is provided")]
    ValueProvided,
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    #[error("etcdserver: request timed out")]
    Timeout,
    #[error("etcdserver: server stopped")]
    Stopped,
    #[error("etcdserver: no leader")]
    NoLeader,
    #[error("etcdserver: leader changed")]
    LeaderChanged,
    #[error("etcdserver: bad leader transferee")]
    BadLeaderTransferee,
    #[error("etcdserver: member not found")]
    MemberNotFound,
    #[error("etcdserver: Peer URLs already exists")]
    PeerUrlExists,
    #[error("etcdserver: too many learner members in cluster")]
    TooManyLearners,
    #[error("etcdserver: re-configuration failed due to not enough started members")]
    NotEnoughStartedMembers,
    #[error("etcdserver: can only promote a learner member")]
    NotLearner,
    #[error("etcdserver: can only promote a learner member which is in sync with leader")]
    LearnerNotReady,
    #[error("etcdserver: invalid peer URL")]
    BadPeerUrl,
    /// The backend is over `--quota-backend-bytes`, or a NOSPACE alarm is set.
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    #[error("etcdserver: corrupt cluster")]
    Corrupt,
}

impl From<GatewayError> for Status {
    fn from(e: GatewayError) -> Status {
        use GatewayError::*;
        let code = match e {
            EmptyKey | KeyNotFound | ValueProvided | LeaseProvided | TooManyOps | DuplicateKey
            | RequestTooLarge => Code::InvalidArgument,
            Timeout | Stopped | NoLeader | LeaderChanged => Code::Unavailable,
            BadLeaderTransferee
            | PeerUrlExists
            | TooManyLearners
            | NotEnoughStartedMembers
            | NotLearner
            | LearnerNotReady => Code::FailedPrecondition,
            MemberNotFound => Code::NotFound,
            BadPeerUrl => Code::InvalidArgument,
            NoSpace => Code::ResourceExhausted,
            Corrupt => Code::DataLoss,
        };
        Status::new(code, e.to_string())
    }
}

pub fn mvcc_status(e: &MvccError) -> Status {
    match e {
        MvccError::Compacted => Status::new(
            Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted",
        ),
        MvccError::FutureRevision => Status::new(
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision",
        ),
        MvccError::KeyNotFound => GatewayError::KeyNotFound.into(),
        MvccError::LeaseNotFound => {
            Status::new(Code::NotFound, "etcdserver: requested lease not found")
        }
        other => Status::new(Code::Internal, other.to_string()),
    }
}

impl From<MvccError> for StatusError {
    fn from(e: MvccError) -> Self {
        StatusError(mvcc_status(&e))
    }
}

pub fn lease_status(e: &LeaseError) -> Status {
    let code = match e {
        LeaseError::NotFound => Code::NotFound,
        LeaseError::Exists => Code::FailedPrecondition,
        LeaseError::TtlTooLarge => Code::OutOfRange,
        LeaseError::NotPrimary => Code::FailedPrecondition,
        LeaseError::Stopped => Code::Unavailable,
        _ => Code::Internal,
    };
    Status::new(code, e.to_string())
}

impl From<LeaseError> for StatusError {
    fn from(e: LeaseError) -> Self {
        StatusError(lease_status(&e))
    }
}

impl From<ApplyError> for StatusError {
    fn from(e: ApplyError) -> Self {
        match e {
            ApplyError::Mvcc(m) => m.into(),
            ApplyError::Lease(l) => l.into(),
            ApplyError::ConfChangeRejected => {
                StatusError(Status::new(Code::FailedPrecondition, e.to_string()))
            }
            ApplyError::NoSpace => GatewayError::NoSpace.into(),
            ApplyError::Corrupt => GatewayError::Corrupt.into(),
            other => StatusError(Status::new(Code::Internal, other.to_string())),
        }
    }
}

impl From<RaftError> for StatusError {
    fn from(e: RaftError) -> Self {
        StatusError(match e {
            RaftError::NoLeader => GatewayError::NoLeader.into(),
            RaftError::Stopped => GatewayError::Stopped.into(),
            other => Status::new(Code::Unavailable, format!("etcdserver: {other}")),
        })
    }
}

impl From<GatewayError> for StatusError {
    fn from(e: GatewayError) -> Self {
        StatusError(e.into())
    }
}

/// Lets handlers use `?` on any layer's error; converts into `Status` at the boundary.
#[derive(Debug)]
pub struct StatusError(pub Status);

impl From<StatusError> for Status {
    fn from(e: StatusError) -> Status {
        e.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_and_codes_match_etcd() {
        let s = mvcc_status(&MvccError::Compacted);
        assert_eq!(s.code(), Code::OutOfRange);
        assert_eq!(
            s.message(),
            "etcdserver: mvcc: required revision has been compacted"
        );
        let s: Status = GatewayError::DuplicateKey.into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(
            s.message(),
            "etcdserver: duplicate key given in txn request"
        );
        let s: Status = GatewayError::RequestTooLarge.into();
        assert_eq!(s.message(), "etcdserver: request is too large");
        let s = mvcc_status(&MvccError::LeaseNotFound);
        assert_eq!(s.code(), Code::NotFound);
        let s = lease_status(&LeaseError::NotFound);
        assert_eq!(
            (s.code(), s.message()),
            (Code::NotFound, "etcdserver: requested lease not found")
        );
        let s = lease_status(&LeaseError::Exists);
        assert_eq!(
            (s.code(), s.message()),
            (Code::FailedPrecondition, "etcdserver: lease already exists")
        );
        let s = lease_status(&LeaseError::TtlTooLarge);
        assert_eq!(s.code(), Code::OutOfRange);
        let applied: Status = StatusError::from(ApplyError::NoSpace).into();
        let checked: Status = GatewayError::NoSpace.into();
        for s in [applied, checked] {
            assert_eq!(
                (s.code(), s.message()),
                (
                    Code::ResourceExhausted,
                    "etcdserver: mvcc: database space exceeded"
                )
            );
        }
        let s: Status = StatusError::from(ApplyError::Corrupt).into();
        assert_eq!(
            (s.code(), s.message()),
            (Code::DataLoss, "etcdserver: corrupt cluster")
        );
    }
}
