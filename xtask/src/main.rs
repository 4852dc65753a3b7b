//! Project tasks, run as `cargo xtask <task>`.
//!
//! - `load <scenario>`: the etcd v3 load generator against running servers (loopback only).
//! - `bench`: starts oxcd and etcd 3.4 with the same flags and compares them scenario by
//!   scenario; writes the table into BENCHMARKS.md. `bench --quick` is the CI smoke run.
//! - `cluster up|down|status`: a local oxcd (or etcd) cluster on loopback that outlives the
//!   command; state in `target/cluster/cluster.json`.
//! - `fsync-probe`: the raw fsync rate of a directory's disk.
//!
//! Reads nothing but its arguments (and the cluster state file); talks to servers over gRPC
//! and HTTP and writes reports to stdout (JSON lines, cluster tables), stderr (people) and
//! BENCHMARKS.md.

mod bench;
mod cluster;
mod error;
mod launch;
mod loadgen;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use loadgen::kv::{PutArgs, RangeArgs, TxnPutArgs};
use loadgen::lease::{GrantRevokeArgs, LeaseArgs};
use loadgen::watch::WatchArgs;
use loadgen::Common;

#[derive(Parser)]
#[command(name = "xtask", about = "oxcd project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Drive running servers with one load scenario; prints a summary on stderr and one JSON
    /// line on stdout; exits 1 if any request failed.
    Load {
        #[command(subcommand)]
        scenario: LoadScenario,
    },
    /// Compare oxcd with etcd 3.4: throughput, latency, peak RSS, CPU per operation.
    Bench(bench::BenchArgs),
    /// Run a local cluster on loopback: `up` starts it detached, `status` shows each member,
    /// `down` stops it.
    Cluster(cluster::ClusterArgs),
    /// Measure the raw fsync rate (4 KiB write + fdatasync) of a directory's disk.
    FsyncProbe {
        /// Directory on the disk to measure.
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Seconds to run.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
    },
}

#[derive(Subcommand)]
enum LoadScenario {
    /// Put requests.
    Put {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: PutArgs,
    },
    /// Range requests, linearizable or serializable.
    Range {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: RangeArgs,
    },
    /// Transactions of puts.
    TxnPut {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: TxnPutArgs,
    },
    /// Put-to-event latency of W watchers on a key or prefix, P paced puts.
    WatchLatency {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: WatchArgs,
    },
    /// Event delivery to many watchers over many streams (same options as watch-latency;
    /// defaults are raised unless given).
    WatchFanout {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: WatchArgs,
    },
    /// Keep-alive round trips on L leases.
    LeaseKeepalive {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: LeaseArgs,
    },
    /// Pairs of LeaseGrant then LeaseRevoke of that lease, one pair at a time per client.
    LeaseGrantRevoke {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: GrantRevokeArgs,
    },
}

/// Options of `watch-fanout` left at their watch-latency defaults take the fan-out defaults.
fn fanout_args(given: WatchArgs, matches: &clap::ArgMatches) -> WatchArgs {
    let d = WatchArgs::fanout_defaults();
    let sub = matches
        .subcommand_matches("load")
        .and_then(|m| m.subcommand_matches("watch-fanout"));
    let set = |id: &str| {
        sub.and_then(|m| m.value_source(id))
            .is_some_and(|s| s == clap::parser::ValueSource::CommandLine)
    };
    WatchArgs {
        streams: if set("streams") {
            given.streams
        } else {
            d.streams
        },
        watchers_per_stream: if set("watchers_per_stream") {
            given.watchers_per_stream
        } else {
            d.watchers_per_stream
        },
        put_total: if set("put_total") {
            given.put_total
        } else {
            d.put_total
        },
        put_rate: if set("put_rate") {
            given.put_rate
        } else {
            d.put_rate
        },
        key: if set("key") { given.key } else { d.key },
        ..given
    }
}

async fn load(
    scenario: LoadScenario,
    matches: &clap::ArgMatches,
) -> error::Result<loadgen::Report> {
    match scenario {
        LoadScenario::Put { common, args } => loadgen::kv::put(&common, &args).await,
        LoadScenario::Range { common, args } => loadgen::kv::range(&common, &args).await,
        LoadScenario::TxnPut { common, args } => loadgen::kv::txn_put(&common, &args).await,
        LoadScenario::WatchLatency { common, args } => {
            loadgen::watch::run("watch-latency", &common, &args).await
        }
        LoadScenario::WatchFanout { common, args } => {
            loadgen::watch::run("watch-fanout", &common, &fanout_args(args, matches)).await
        }
        LoadScenario::LeaseKeepalive { common, args } => {
            loadgen::lease::keepalive(&common, &args).await
        }
        LoadScenario::LeaseGrantRevoke { common, args } => {
            loadgen::lease::grant_revoke(&common, &args).await
        }
    }
}

fn main() -> ExitCode {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("xtask: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Everything runs inside block_on on this thread: servers started by `bench` are tied to it
    // (see bench::server), and Ctrl-C drops the running future, whose guards stop them.
    // Members started by `cluster up` are detached and keep running.
    let interrupted = if matches!(cli.task, Task::Cluster(_)) {
        "xtask: interrupted; members already started keep running (see `cargo xtask cluster status`)"
    } else {
        "xtask: interrupted; stopping the servers it started"
    };
    let outcome = runtime.block_on(async {
        let work = async {
            match cli.task {
                Task::Load { scenario } => {
                    let report = load(scenario, &matches).await?;
                    eprint!("{}", report.summary());
                    println!("{}", report.json_line());
                    Ok(if report.errors > 0 { 1 } else { 0 })
                }
                Task::Bench(args) => bench::run(args).await,
                Task::Cluster(args) => cluster::run(args).await,
                Task::FsyncProbe { dir, seconds } => bench::fsync_probe(&dir, seconds).map(|()| 0),
            }
        };
        tokio::select! {
            r = work => r,
            _ = tokio::signal::ctrl_c() => {
                eprintln!("{interrupted}");
                Ok(130)
            }
        }
    });
    match outcome {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}
