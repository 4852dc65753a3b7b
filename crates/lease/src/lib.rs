//! Leases: TTL-bound ids that keys attach to, revoked with their keys on expiry.
//!
//! [`Lessor`] is the synchronous, deterministic state: the applier feeds it the
//! raft-ordered grant/revoke/attach/detach/checkpoint operations, and on the leader it
//! also tracks deadlines, renews keep-alives and reports expired leases and due
//! checkpoints. [`LeaseHandle`] shares one lessor between the applier and the gRPC layer,
//! each call a short critical section; its ticker writes [`LeaseTick`]s (revokes and
//! checkpoints to propose) to a channel the server drains. Lease records persist through
//! a [`LeaseStore`].

mod clock;
mod handle;
mod lessor;
pub mod metrics;
mod store;

pub use clock::{Clock, FakeClock, SystemClock};
pub use handle::{LeaseHandle, LeaseTick, TickerConfig};
pub use lessor::{
    min_lease_ttl, LeaseInfo, LeaseTimeToLive, Lessor, LessorConfig, DEFAULT_CHECKPOINT_INTERVAL,
    DEFAULT_EXPIRED_RETRY_INTERVAL, DEFAULT_REVOKE_RATE, MAX_LEASE_TTL, NO_LEASE,
};
pub use store::{InMemoryLeaseStore, LeaseRecord, LeaseStore};

/// Lease errors; the texts are the ones etcd clients see and match on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("etcdserver: requested lease not found")]
    NotFound,
    #[error("etcdserver: lease already exists")]
    Exists,
    #[error("etcdserver: too large lease TTL")]
    TtlTooLarge,
    /// Only the leader renews leases; the caller forwards to it.
    #[error("etcdserver: not primary")]
    NotPrimary,
    /// The lessor is gone (server shutting down).
    #[error("etcdserver: server stopped")]
    Stopped,
    #[error("lease store: {0}")]
    Store(String),
}
