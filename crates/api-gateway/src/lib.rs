//! api-gateway: etcd's v3 gRPC services (tonic) in front of the other layers.
//!
//! Writes: validated requests become proposals on raft-node's command channel
//! (`RaftCommand::Propose` with a oneshot responder the applier answers). Reads: linearizable ones
//! ask raft-node for a ReadIndex and wait on the applier's applied-index channel, then read
//! mvcc-store; serializable ones read it directly. Watch streams register watchers with the
//! watch hub and turn its notices into `WatchResponse`s.
//! Every lower-layer error becomes etcd's gRPC status in one place (`errors`).

pub mod cluster;
pub mod errors;
pub mod forward;
pub mod gateway;
pub mod header;
pub mod kv;
pub mod lease_service;
pub mod maintenance;
pub mod recipes;
pub mod validate;
pub mod watch_service;

pub use gateway::{Gateway, Limits, ETCD_CLUSTER_VERSION, ETCD_VERSION};
pub use header::HeaderSource;
