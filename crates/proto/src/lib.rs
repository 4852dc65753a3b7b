//! etcd v3 wire types, generated at build time from the workspace's `proto/` directory.
//!
//! Every crate that needs `KeyValue`, `Event` or a request/response type takes it from here;
//! generated code lives nowhere else. Client and server stubs are both generated: servers for
//! api-gateway, clients for tests and the load generator.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

pub mod authpb {
    tonic::include_proto!("authpb");
}

pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
}

pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
}

/// oxcd's member-to-member protocol (raft messages and snapshots); not part of etcd's API.
pub mod oxcdpeerpb {
    tonic::include_proto!("oxcdpeerpb");
}
