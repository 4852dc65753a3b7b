//! oxcd: a distributed, strongly consistent key-value store speaking etcd's v3 API.
//!
//! `oxcd [etcd flags]` runs a member; `oxcd dump-logs DATA_DIR` prints its replicated log;
//! `oxcd snapshot restore FILE [flags]` makes a new data dir from a snapshot.

mod auto_compaction;
mod config;
mod corrupt_check;
mod datadir;
mod dump_logs;
mod grpc_metrics;
mod h2_authority;
mod http;
mod ids;
mod layer_metrics;
mod process_metrics;
mod server;
mod snapshot_restore;
mod tls_setup;

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let first = args.next();
    if first.as_deref() == Some(std::ffi::OsStr::new("snapshot")) {
        return snapshot_restore::main(args);
    }
    if first.as_deref() == Some(std::ffi::OsStr::new("dump-logs")) {
        let Some(dir) = args.next() else {
            eprintln!("usage: oxcd dump-logs DATA_DIR");
            return ExitCode::from(2);
        };
        let stdout = std::io::stdout();
        return match dump_logs::run(std::path::Path::new(&dir), &mut stdout.lock()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("oxcd dump-logs: {e}");
                ExitCode::FAILURE
            }
        };
    }

    let cfg = match config::Config::from_args() {
        Ok(c) => c,
        Err(e) => {
            // clap prints help/version to stdout and usage errors to stderr with its own exit codes.
            let _ = e.print();
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    if cfg.version {
        println!("oxcd Version: {}", env!("CARGO_PKG_VERSION"));
        println!("etcd API Version: {}", api_gateway::ETCD_VERSION);
        return ExitCode::SUCCESS;
    }
    match server::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("oxcd: {e}");
            tracing::error!(error = %e, "oxcd stopped");
            ExitCode::FAILURE
        }
    }
}
