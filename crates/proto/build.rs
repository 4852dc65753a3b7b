//! Compiles the etcd v3 API in `proto/` with protox (pure Rust), so no system protoc is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not baked in at compile time: the compiled script is shared by every
    // checkout that uses the same target dir, and must read its own checkout's protos.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        "mvccpb/kv.proto",
        "authpb/auth.proto",
        "etcdserverpb/rpc.proto",
        "etcdserverpb/raft_internal.proto",
        "v3lockpb/v3lock.proto",
        "v3electionpb/v3election.proto",
        "oxcdpeerpb/peer.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(files, [&root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
