//! api-gateway: etcd's v3 gRPC services (tonic) in front of the other layers.
//!
//! Writes: validated requests become `Proposal`s sent to raft-node on its command channel; the
//! applier answers each on its oneshot. Reads: linearizable ones ask raft-node for a ReadIndex
//! and wait until the applier has applied that far, then read mvcc-store. Watch streams are
//! served from the watch layer's hub. Every lower-layer error is mapped to etcd's gRPC status
//! in one place (`errors`).

pub mod header;
pub mod watch_service;
