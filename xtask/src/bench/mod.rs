//! `cargo xtask bench`: oxcd against etcd 3.4 on the same machine, flags and disk.
//!
//! For every scenario each server runs in alternation (oxcd, etcd, oxcd, etcd, ...), each run on
//! a freshly started process with a fresh data directory, so peak RSS (VmHWM) belongs to that
//! run alone. Server CPU time (utime + stime) is sampled around the measured phase only, after
//! any preload. Results go to stdout as JSON lines and, for a full run, into BENCHMARKS.md.

mod fsync;
mod procfs;
mod report;
mod server;

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::loadgen::kv::{self, Consistency, KeyArgs, PutArgs, RangeArgs, TxnPutArgs};
use crate::loadgen::lease::{self, GrantRevokeArgs, LeaseArgs};
use crate::loadgen::watch::{self, WatchArgs};
use crate::loadgen::{Common, ProgressMode, Report};
pub use server::ServerKind;

/// Cargo profile the oxcd binary is built with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Profile {
    Release,
    Dev,
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Scenarios to run (default: all): put, put-serial, range-l, range-s, txn-put,
    /// watch-latency, watch-fanout (10k watchers), watch-fanout-100k (full runs only),
    /// lease-keepalive, lease-grant-revoke.
    pub scenarios: Vec<String>,
    /// Members per server: 1, or 3 for a loopback cluster.
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// Smoke run (about a minute): small totals, one round, results not written to BENCHMARKS.md;
    /// exits non-zero if any put, range, txn-put or lease grant/revoke request failed against
    /// oxcd.
    #[arg(long)]
    pub quick: bool,
    /// Runs per server per scenario (default 2; 1 with --quick).
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Servers to run (default: both).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub servers: Vec<ServerKind>,
    /// The oxcd binary; default: built with cargo (release, or dev with --quick).
    #[arg(long)]
    pub oxcd_bin: Option<PathBuf>,
    /// Profile oxcd is built with when --oxcd-bin is not given (default release; dev with --quick).
    #[arg(long, value_enum)]
    pub profile: Option<Profile>,
    /// The etcd binary.
    #[arg(long, default_value = "/usr/bin/etcd")]
    pub etcd_bin: PathBuf,
    /// Where data directories go (default: target/bench-data under the workspace).
    #[arg(long)]
    pub data_root: Option<PathBuf>,
    /// Markdown file whose generated section (one per cluster size) is replaced (default:
    /// BENCHMARKS.md for a full run, nothing with --quick).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Do not write any markdown file.
    #[arg(long)]
    pub no_write: bool,
    /// Multiply every scenario's totals by this factor.
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Wall-clock budget in seconds; runs that would start later are reported as skipped.
    #[arg(long)]
    pub budget: Option<f64>,
    /// Run the load generator in this (possibly unoptimized) build instead of re-running
    /// itself as an optimized build first.
    #[arg(long)]
    pub no_reexec: bool,
}

/// One benchmark scenario: an optional preload (not measured) and the measured load.
struct Scenario {
    name: &'static str,
    /// A short description of the load for the table.
    load: String,
    /// oxcd must serve this without a single failed request for --quick to pass.
    gating: bool,
    preload: Option<PutArgs>,
    common: Common,
    work: Work,
}

#[derive(Clone)]
enum Work {
    Put(PutArgs),
    Range(RangeArgs),
    TxnPut(TxnPutArgs),
    Watch(WatchArgs),
    Lease(LeaseArgs),
    GrantRevoke(GrantRevokeArgs),
}

pub const SCENARIOS: [&str; 10] = [
    "put",
    "put-serial",
    "range-l",
    "range-s",
    "txn-put",
    "watch-latency",
    "watch-fanout",
    "watch-fanout-100k",
    "lease-keepalive",
    "lease-grant-revoke",
];

fn scaled(n: u64, quick_n: u64, quick: bool, scale: f64) -> u64 {
    (((if quick { quick_n } else { n }) as f64) * scale)
        .round()
        .max(1.0) as u64
}

fn scenario(name: &'static str, quick: bool, scale: f64) -> Scenario {
    let s = |n, q| scaled(n, q, quick, scale);
    let common = |clients: usize, conns: usize| Common {
        endpoints: Vec::new(),
        clients,
        conns,
        max_duration: if quick { 15.0 } else { 30.0 },
        request_timeout: 10.0,
        progress: ProgressMode::Auto,
    };
    let keys = |space: u64, sequential: bool| KeyArgs {
        key_size: 8,
        val_size: 256,
        key_space_size: space,
        sequential_keys: sequential,
        key_prefix: String::new(),
    };
    let key_space = s(10_000, 500);
    let preload = PutArgs {
        total: key_space,
        keys: keys(key_space, true),
    };
    let range = |consistency| RangeArgs {
        total: s(40_000, 1_000),
        consistency,
        key: None,
        range_end: None,
        limit: 0,
        key_size: 8,
        key_space_size: key_space,
        key_prefix: String::new(),
    };
    match name {
        "put" => {
            let a = PutArgs {
                total: s(30_000, 1_000),
                keys: keys(100_000, false),
            };
            Scenario {
                name,
                load: format!(
                    "{} puts, 256 B values, 100k random keys, 64 clients, 8 conns",
                    a.total
                ),
                gating: true,
                preload: None,
                common: common(64, 8),
                work: Work::Put(a),
            }
        }
        "put-serial" => {
            let a = PutArgs {
                total: s(1_500, 100),
                keys: keys(100_000, true),
            };
            Scenario {
                name,
                load: format!("{} puts one at a time (1 client): commit latency", a.total),
                gating: true,
                preload: None,
                common: common(1, 1),
                work: Work::Put(a),
            }
        }
        "range-l" | "range-s" => {
            let (c, label) = if name == "range-l" {
                (Consistency::L, "linearizable")
            } else {
                (Consistency::S, "serializable")
            };
            let a = range(c);
            Scenario {
                name,
                load: format!(
                    "{} {label} single-key gets over {key_space} keys, 64 clients, 8 conns",
                    a.total
                ),
                gating: true,
                preload: Some(preload),
                common: common(64, 8),
                work: Work::Range(a),
            }
        }
        "txn-put" => {
            let a = TxnPutArgs {
                total: s(10_000, 500),
                txn_ops: 4,
                keys: keys(100_000, false),
            };
            Scenario {
                name,
                load: format!("{} txns of 4 puts, 64 clients, 8 conns", a.total),
                gating: true,
                preload: None,
                common: common(64, 8),
                work: Work::TxnPut(a),
            }
        }
        "watch-latency" => {
            let a = WatchArgs {
                streams: 10,
                watchers_per_stream: 10,
                put_total: s(1_000, 50),
                put_rate: 200.0,
                key: "watch-latency".into(),
                prefix: false,
                val_size: 256,
                settle_timeout: 10.0,
                prev_kv: false,
            };
            Scenario {
                name,
                load: format!(
                    "100 watchers on 1 key (10 streams), {} puts at 200/s",
                    a.put_total
                ),
                gating: false,
                preload: None,
                common: common(1, 4),
                work: Work::Watch(a),
            }
        }
        "watch-fanout" | "watch-fanout-100k" => {
            let big = name == "watch-fanout-100k";
            let mut a = WatchArgs::fanout_defaults();
            a.streams = match (quick, big) {
                (true, _) => 10,
                (false, false) => 100,
                (false, true) => 1000,
            };
            a.watchers_per_stream = if quick { 10 } else { 100 };
            a.put_total = s(100, 20);
            a.put_rate = 20.0;
            a.prefix = true;
            Scenario {
                name,
                load: format!(
                    "{} prefix watchers ({} streams), {} puts at 20/s",
                    a.streams * a.watchers_per_stream,
                    a.streams,
                    a.put_total
                ),
                gating: false,
                preload: None,
                common: common(1, 8),
                work: Work::Watch(a),
            }
        }
        "lease-keepalive" => {
            // 10k leases: the scale the lease issue asks the keep-alive path to be measured at.
            let a = LeaseArgs {
                leases: s(10_000, 20),
                total: s(100_000, 1_000),
                ttl: 300,
            };
            Scenario {
                name,
                load: format!("{} leases, {} keep-alives, 32 streams", a.leases, a.total),
                gating: false,
                preload: None,
                common: common(32, 8),
                work: Work::Lease(a),
            }
        }
        "lease-grant-revoke" => {
            let a = GrantRevokeArgs {
                total: s(20_000, 500),
                ttl: 60,
            };
            Scenario {
                name,
                load: format!(
                    "{} LeaseGrant (TTL 60 s) + LeaseRevoke pairs, 16 clients, 4 conns; one op is one pair",
                    a.total
                ),
                gating: true,
                preload: None,
                common: common(16, 4),
                work: Work::GrantRevoke(a),
            }
        }
        other => unreachable!("scenario {other} was validated"),
    }
}

async fn run_work(name: &str, common: &Common, work: &Work) -> Result<Report> {
    let mut r = match work {
        Work::Put(a) => kv::put(common, a).await?,
        Work::Range(a) => kv::range(common, a).await?,
        Work::TxnPut(a) => kv::txn_put(common, a).await?,
        Work::Watch(a) => watch::run(name, common, a).await?,
        Work::Lease(a) => lease::keepalive(common, a).await?,
        Work::GrantRevoke(a) => lease::grant_revoke(common, a).await?,
    };
    r.scenario = name.to_string();
    Ok(r)
}

/// One measured run of one scenario on one server.
#[derive(Clone, Debug, Serialize)]
pub struct RunRecord {
    pub server: ServerKind,
    pub nodes: usize,
    pub round: usize,
    pub report: Report,
    /// Largest VmHWM over the members, KiB.
    pub peak_rss_kib: u64,
    /// utime + stime of all members during the measured phase, seconds.
    pub cpu_s: f64,
}

/// A run that produced no measurement, with the reason shown in the table.
#[derive(Clone, Debug, Serialize)]
pub struct RunFailure {
    pub server: ServerKind,
    pub round: usize,
    pub reason: String,
}

#[derive(Default)]
pub struct Outcomes {
    pub runs: BTreeMap<(String, ServerKind), Vec<RunRecord>>,
    pub failures: BTreeMap<(String, ServerKind), Vec<RunFailure>>,
}

/// Facts printed beside the table.
pub struct Context {
    pub machine: String,
    pub data_fs: String,
    pub fsync: Option<fsync::FsyncResult>,
    pub versions: Vec<String>,
    pub nodes: usize,
    pub rounds: usize,
    pub quick: bool,
    pub scenarios: Vec<(String, String)>,
    pub notes: Vec<String>,
    pub wall_s: f64,
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Builds packages with cargo and returns the path of each named binary; `task` prefixes the
/// command line shown on stderr.
pub(crate) fn cargo_build(
    task: &str,
    packages: &[&str],
    profile: Profile,
) -> Result<BTreeMap<String, PathBuf>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(workspace_root())
        .arg("build")
        .arg("--message-format=json-render-diagnostics");
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    for p in packages {
        cmd.arg("-p").arg(p);
    }
    let shown = format!(
        "cargo build {}-p {}",
        if profile == Profile::Release {
            "--release "
        } else {
            ""
        },
        packages.join(" -p ")
    );
    eprintln!("{task}: {shown}");
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| Error::Command {
            command: shown.clone(),
            reason: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(Error::Command {
            command: shown,
            reason: format!("exit status {}", out.status),
        });
    }
    let mut bins = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] == "compiler-artifact" {
            if let (Some(name), Some(exe)) =
                (v["target"]["name"].as_str(), v["executable"].as_str())
            {
                bins.insert(name.to_string(), PathBuf::from(exe));
            }
        }
    }
    Ok(bins)
}

/// Removes the data root when the benchmark ends, however it ends.
struct DataRoot(PathBuf);

impl Drop for DataRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Entry point of `cargo xtask bench`. Returns the process exit code.
pub async fn run(args: BenchArgs) -> Result<i32> {
    let started = Instant::now();
    let quick = args.quick;
    let scenarios: Vec<&'static str> =
        if args.scenarios.is_empty() || args.scenarios.iter().any(|s| s == "all") {
            // The 100k-watcher fan-out only differs from watch-fanout at full scale.
            SCENARIOS
                .iter()
                .copied()
                .filter(|n| !(quick && *n == "watch-fanout-100k"))
                .collect()
        } else {
            let mut v = Vec::new();
            for s in &args.scenarios {
                match SCENARIOS.iter().find(|n| *n == s) {
                    Some(n) => v.push(*n),
                    None => {
                        return Err(Error::Usage(format!(
                            "unknown scenario {s:?}; known: {}",
                            SCENARIOS.join(", ")
                        )));
                    }
                }
            }
            v
        };
    if args.nodes != 1 && args.nodes != 3 {
        return Err(Error::Usage("--nodes must be 1 or 3".into()));
    }
    if args.scale.is_nan() || args.scale <= 0.0 {
        return Err(Error::Usage("--scale must be positive".into()));
    }
    let rounds = args.rounds.unwrap_or(if quick { 1 } else { 2 }).max(1);
    let servers: Vec<ServerKind> = if args.servers.is_empty() {
        vec![ServerKind::Oxcd, ServerKind::Etcd]
    } else {
        args.servers.clone()
    };
    let budget = Duration::from_secs_f64(args.budget.unwrap_or(if quick { 110.0 } else { 570.0 }));
    let mut notes = Vec::new();

    // Binaries: oxcd built by cargo unless given; the load generator itself optimized.
    let profile = args.profile.unwrap_or(if quick {
        Profile::Dev
    } else {
        Profile::Release
    });
    let reexec = !args.no_reexec && cfg!(debug_assertions) && !quick;
    let mut oxcd_bin = args.oxcd_bin.clone();
    if servers.contains(&ServerKind::Oxcd) && oxcd_bin.is_none() || reexec {
        let mut pkgs = vec![];
        if servers.contains(&ServerKind::Oxcd) && oxcd_bin.is_none() {
            pkgs.push("oxcd");
        }
        if reexec {
            pkgs.push("xtask");
        }
        // One cargo call, so both build in parallel; xtask in the same profile as oxcd.
        let build_profile = if reexec { Profile::Release } else { profile };
        if reexec && profile != Profile::Release && pkgs.contains(&"oxcd") {
            let bins = cargo_build("bench", &["oxcd"], profile)?;
            oxcd_bin = bins.get("oxcd").cloned();
            pkgs.retain(|p| *p != "oxcd");
        }
        let bins = cargo_build("bench", &pkgs, build_profile)?;
        if oxcd_bin.is_none() && servers.contains(&ServerKind::Oxcd) {
            oxcd_bin = Some(bins.get("oxcd").cloned().ok_or_else(|| Error::Command {
                command: "cargo build -p oxcd".into(),
                reason: "no oxcd executable reported".into(),
            })?);
        }
        if reexec {
            let exe = bins.get("xtask").cloned().ok_or_else(|| Error::Command {
                command: "cargo build --release -p xtask".into(),
                reason: "no xtask executable reported".into(),
            })?;
            let mut cmd = Command::new(exe);
            cmd.arg("bench")
                .args(std::env::args_os().skip(2))
                .arg("--no-reexec");
            if args.oxcd_bin.is_none() {
                if let Some(b) = &oxcd_bin {
                    cmd.arg("--oxcd-bin").arg(b);
                }
            }
            eprintln!("bench: continuing in the optimized build of the load generator");
            // exec only returns on failure.
            let e = cmd.exec();
            return Err(Error::Command {
                command: "exec optimized xtask".into(),
                reason: e.to_string(),
            });
        }
    }

    let mut available = Vec::new();
    for kind in &servers {
        let bin = match kind {
            ServerKind::Oxcd => oxcd_bin.clone().expect("oxcd binary resolved above"),
            ServerKind::Etcd => args.etcd_bin.clone(),
        };
        if bin.exists() {
            available.push((*kind, bin));
        } else {
            notes.push(format!(
                "{} not found at {}: its columns are n/a.",
                kind.name(),
                bin.display()
            ));
            eprintln!(
                "bench: {} not found at {}; skipping it",
                kind.name(),
                bin.display()
            );
        }
    }

    let root = args.data_root.clone().unwrap_or_else(|| {
        workspace_root()
            .join("target")
            .join(format!("bench-data-{}", std::process::id()))
    });
    std::fs::create_dir_all(&root)
        .map_err(|e| Error::io(format!("create {}", root.display()), e))?;
    let _root_guard = DataRoot(root.clone());

    let fsync = match fsync::probe(&root, Duration::from_secs(if quick { 1 } else { 2 })) {
        Ok(f) => {
            eprintln!(
                "bench: disk fsync limit {:.0} fsyncs/s (mean {:.2} ms, p50 {:.2} ms, p99 {:.2} ms)",
                f.per_second, f.mean_ms, f.p50_ms, f.p99_ms
            );
            println!("{}", serde_json::json!({ "fsync_probe": &f }));
            Some(f)
        }
        Err(e) => {
            notes.push(format!("fsync probe failed: {e}"));
            None
        }
    };

    let mut versions = Vec::new();
    for (kind, bin) in &available {
        versions.push(format!(
            "{}: {} ({})",
            kind.name(),
            server::version_of(bin),
            bin.display()
        ));
    }
    if let Some(rev) = git_revision() {
        versions.push(format!("oxcd source: git {rev}"));
    }
    versions.push(format!(
        "oxcd profile: {}; load generator: {}",
        if args.oxcd_bin.is_some() && args.profile.is_none() {
            "as given".to_string()
        } else {
            format!("{profile:?}").to_lowercase()
        },
        if cfg!(debug_assertions) {
            "unoptimized build"
        } else {
            "optimized build"
        }
    ));

    let mut outcomes = Outcomes::default();
    // Start-up failures are not retried for later runs: a server that cannot start (say, a
    // cluster size it does not support yet) would otherwise cost the start timeout every run.
    let mut cannot_start: BTreeMap<ServerKind, String> = BTreeMap::new();
    let mut scenario_info = Vec::new();
    for name in &scenarios {
        let sc = scenario(name, quick, args.scale);
        scenario_info.push((name.to_string(), sc.load.clone()));
        for round in 0..rounds {
            for (kind, bin) in &available {
                let key = (name.to_string(), *kind);
                let fail = |reason: String| RunFailure {
                    server: *kind,
                    round,
                    reason,
                };
                if let Some(reason) = cannot_start.get(kind) {
                    outcomes
                        .failures
                        .entry(key)
                        .or_default()
                        .push(fail(reason.clone()));
                    continue;
                }
                if started.elapsed() > budget {
                    let reason = format!(
                        "skipped: time budget of {:.0} s used up",
                        budget.as_secs_f64()
                    );
                    outcomes.failures.entry(key).or_default().push(fail(reason));
                    continue;
                }
                eprintln!(
                    "bench: {name} on {} (round {}/{rounds})",
                    kind.name(),
                    round + 1
                );
                let dir = root.join(format!("{}-{name}-r{round}", kind.name()));
                match run_one(&sc, *kind, bin, args.nodes, &dir, round).await {
                    Ok(rec) => {
                        eprint!("{}", rec.report.summary());
                        eprintln!(
                            "  server: peak RSS {:.1} MiB, CPU {:.2} s ({:.1} us/op)",
                            rec.peak_rss_kib as f64 / 1024.0,
                            rec.cpu_s,
                            rec.cpu_s * 1e6 / rec.report.ok.max(1) as f64
                        );
                        println!(
                            "{}",
                            serde_json::to_string(&rec).expect("record serializes")
                        );
                        outcomes.runs.entry(key).or_default().push(rec);
                    }
                    Err(RunError::Start(reason)) => {
                        eprintln!("bench: {} did not start: {reason}", kind.name());
                        let reason = format!("did not start: {reason}");
                        cannot_start.insert(*kind, reason.clone());
                        outcomes.failures.entry(key).or_default().push(fail(reason));
                    }
                    Err(RunError::Run(reason)) => {
                        eprintln!("bench: {name} on {} failed: {reason}", kind.name());
                        println!(
                            "{}",
                            serde_json::json!({"server": kind, "scenario": name, "round": round, "error": &reason})
                        );
                        outcomes.failures.entry(key).or_default().push(fail(reason));
                    }
                }
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }

    let ctx = Context {
        machine: format!(
            "{} CPUs ({}), {:.1} GiB RAM, {}",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            procfs::cpu_model(),
            procfs::memory_gib().unwrap_or(0.0),
            procfs::kernel()
        ),
        data_fs: procfs::filesystem_of(&root),
        fsync,
        versions,
        nodes: args.nodes,
        rounds,
        quick,
        scenarios: scenario_info,
        notes,
        wall_s: started.elapsed().as_secs_f64(),
    };
    let md = report::markdown(&ctx, &outcomes, &scenarios);
    eprintln!("\n{md}");
    let out = if args.no_write {
        None
    } else {
        args.out
            .clone()
            .or_else(|| (!quick).then(|| workspace_root().join("BENCHMARKS.md")))
    };
    if let Some(path) = out {
        report::write_section_for(&path, &md, args.nodes)?;
        eprintln!("bench: results written to {}", path.display());
    }

    // The smoke run's verdict: every request of the gating scenarios succeeded on oxcd.
    let mut failed = Vec::new();
    if quick && servers.contains(&ServerKind::Oxcd) {
        for name in &scenarios {
            if !scenario(name, quick, args.scale).gating {
                continue;
            }
            let key = (name.to_string(), ServerKind::Oxcd);
            for f in outcomes.failures.get(&key).into_iter().flatten() {
                failed.push(format!("{name}: {}", f.reason));
            }
            for r in outcomes.runs.get(&key).into_iter().flatten() {
                if r.report.errors > 0 {
                    failed.push(format!(
                        "{name}: {} failed requests: {:?}",
                        r.report.errors, r.report.error_kinds
                    ));
                }
            }
        }
    }
    if failed.is_empty() {
        if quick && servers.contains(&ServerKind::Oxcd) {
            let gating: Vec<&str> = scenarios
                .iter()
                .copied()
                .filter(|n| scenario(n, quick, args.scale).gating)
                .collect();
            eprintln!(
                "bench --quick: no failed request against oxcd on {}",
                if gating.is_empty() {
                    "any gating scenario (none selected)".to_string()
                } else {
                    gating.join(", ")
                }
            );
        }
        Ok(0)
    } else {
        for f in &failed {
            eprintln!("bench --quick: FAILED {f}");
        }
        Ok(1)
    }
}

enum RunError {
    Start(String),
    Run(String),
}

async fn run_one(
    sc: &Scenario,
    kind: ServerKind,
    bin: &Path,
    nodes: usize,
    dir: &Path,
    round: usize,
) -> std::result::Result<RunRecord, RunError> {
    let cluster = server::Cluster::start(kind, bin, nodes, dir)
        .await
        .map_err(|e| RunError::Start(e.to_string()))?;
    let mut common = sc.common.clone();
    common.endpoints = cluster.endpoints();
    if let Some(pre) = &sc.preload {
        let quiet = Common {
            clients: 32,
            conns: 4,
            progress: ProgressMode::None,
            max_duration: 60.0,
            ..common.clone()
        };
        let r = kv::put(&quiet, pre)
            .await
            .map_err(|e| RunError::Run(format!("preload: {e}")))?;
        if r.errors > 0 || r.ok < pre.total {
            let first = r
                .error_kinds
                .keys()
                .next()
                .cloned()
                .unwrap_or_else(|| "stopped by the time cap".into());
            return Err(RunError::Run(format!(
                "preload: {} of {} puts failed ({first})",
                pre.total - r.ok,
                pre.total
            )));
        }
    }
    let pids = cluster.pids();
    let cpu = || {
        pids.iter()
            .filter_map(|p| procfs::cpu_seconds(*p))
            .sum::<f64>()
    };
    let cpu0 = cpu();
    let report = run_work(sc.name, &common, &sc.work)
        .await
        .map_err(|e| RunError::Run(e.to_string()))?;
    let cpu_s = cpu() - cpu0;
    let peak_rss_kib = pids
        .iter()
        .filter_map(|p| procfs::peak_rss_kib(*p))
        .max()
        .unwrap_or(0);
    // A server that died mid-run is a failure even if some requests got through.
    let mut cluster = cluster;
    if let Some(why) = cluster.exited() {
        return Err(RunError::Run(why));
    }
    drop(cluster);
    if report.ok == 0 {
        let first = report
            .error_kinds
            .iter()
            .next()
            .map(|(k, n)| format!("{k} (x{n})"))
            .unwrap_or_else(|| "no operation completed".into());
        return Err(RunError::Run(format!("error: {first}")));
    }
    Ok(RunRecord {
        server: kind,
        nodes,
        round,
        report,
        peak_rss_kib,
        cpu_s,
    })
}

fn git_revision() -> Option<String> {
    let out = Command::new("git")
        .current_dir(workspace_root())
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Entry point of `cargo xtask fsync-probe`.
pub fn fsync_probe(dir: &Path, seconds: f64) -> Result<()> {
    let r = fsync::probe(dir, Duration::from_secs_f64(seconds))?;
    eprintln!(
        "{}: {:.0} fsyncs/s ({} x 4 KiB write + fdatasync in {:.2} s; mean {:.3} ms, p50 {:.3} ms, p99 {:.3} ms; {})",
        dir.display(),
        r.per_second,
        r.fsyncs,
        r.seconds,
        r.mean_ms,
        r.p50_ms,
        r.p99_ms,
        procfs::filesystem_of(dir)
    );
    println!("{}", serde_json::to_string(&r).expect("serializes"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_scenario_is_defined() {
        for quick in [false, true] {
            for name in SCENARIOS {
                let sc = scenario(name, quick, 1.0);
                assert_eq!(sc.name, name);
                assert!(!sc.load.is_empty());
                assert!(sc.common.clients >= 1 && sc.common.conns >= 1);
            }
        }
    }

    #[test]
    fn lease_grant_revoke_is_bounded_and_gating() {
        for (quick, pairs) in [(false, 20_000), (true, 500)] {
            let sc = scenario("lease-grant-revoke", quick, 1.0);
            assert!(sc.gating, "a failed grant or revoke fails the smoke run");
            assert!(sc.preload.is_none());
            assert_eq!((sc.common.clients, sc.common.conns), (16, 4));
            match sc.work {
                Work::GrantRevoke(a) => assert_eq!((a.total, a.ttl), (pairs, 60)),
                _ => panic!("lease-grant-revoke runs grant/revoke pairs"),
            }
        }
        match scenario("lease-grant-revoke", true, 2.0).work {
            Work::GrantRevoke(a) => assert_eq!(a.total, 1_000),
            _ => unreachable!(),
        }
    }
}
