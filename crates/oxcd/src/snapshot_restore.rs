//! `oxcd snapshot restore FILE [flags]`: turns a snapshot (what `etcdctl snapshot save` stored
//! from an oxcd member, see `mvcc_store::snapshot_file`) into a new data dir, offline, with the
//! flags and defaults of `etcdctl snapshot restore` 3.4. The member started on that dir (same
//! `--name` and `--initial-cluster`) serves the snapshot's keys at the snapshot's revision, with
//! its history since the last compaction and its leases, as a new cluster: the old member
//! records are replaced by the `--initial-cluster` ones, and the store's applied raft index
//! restarts at 0 to match the new, empty raft log.
//!
//! Nothing is written before the snapshot passed its checks. The dir is built beside the
//! target and moved into place whole, so an interrupted restore leaves no half-filled dir that
//! a server could start on.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use applier::{EngineLeaseStore, Membership};
use clap::{ArgAction, Parser, Subcommand};
use lease::LeaseStore as _;
use mvcc_store::snapshot_file::{self, SnapshotFileError};
use mvcc_store::{KvEngine, MvccStore, RocksEngine, WriteBatch, APPLIED_INDEX_KEY};
use oxcd_proto::etcdserverpb::Member;

use crate::config::{initial_members, parse_initial_cluster, ConfigError};
use crate::datadir::{DataDir, DataDirError, Identity};
use crate::ids;

#[derive(Parser, Debug)]
#[command(
    name = "oxcd snapshot",
    about = "Restores snapshots taken from oxcd members"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Restores a member snapshot (from `etcdctl snapshot save`) to a new oxcd data directory.
    Restore(RestoreArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct RestoreArgs {
    /// The snapshot file.
    pub file: PathBuf,
    /// Path to the data directory (default: ${name}.etcd).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Initial cluster configuration for restore bootstrap.
    #[arg(long, default_value = "default=http://localhost:2380")]
    pub initial_cluster: String,
    /// Initial cluster token for the cluster during restore bootstrap.
    #[arg(long, default_value = "etcd-cluster")]
    pub initial_cluster_token: String,
    /// List of this member's peer URLs to advertise to the rest of the cluster.
    #[arg(long, default_value = "http://localhost:2380")]
    pub initial_advertise_peer_urls: String,
    /// Human-readable name for this member.
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Ignore snapshot integrity hash value (required if the file has none).
    #[arg(long, default_value = "false", action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true")]
    pub skip_hash_check: bool,
}

impl RestoreArgs {
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from(format!("{}.etcd", self.name)))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// etcdctl's wording (Go's %q quoting).
    #[error("data-dir {0:?} exists")]
    DataDirExists(String),
    #[error(transparent)]
    File(#[from] SnapshotFileError),
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error("restored data: {0}")]
    Store(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn store_err(e: impl std::fmt::Display) -> RestoreError {
    RestoreError::Store(e.to_string())
}

/// What a restore wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub data_dir: PathBuf,
    pub identity: Identity,
    pub revision: i64,
    pub compact_revision: i64,
    pub keys: usize,
    pub leases: usize,
    pub records: u64,
}

/// `oxcd snapshot ...` with the arguments after `snapshot`.
pub fn main(args: impl Iterator<Item = OsString>) -> ExitCode {
    let cli =
        match Cli::try_parse_from(std::iter::once(OsString::from("oxcd snapshot")).chain(args)) {
            Ok(c) => c,
            Err(e) => {
                let _ = e.print();
                return ExitCode::from(e.exit_code() as u8);
            }
        };
    let Command::Restore(args) = cli.command;
    let started = Instant::now();
    match restore(&args) {
        Ok(s) => {
            // etcdctl prints nothing on stdout here either; this goes where its log goes.
            eprintln!(
                "restored snapshot {} into {}: revision {}, compacted at {}, {} keys, {} leases \
                 (member {:x}, cluster {:x}) in {} ms",
                args.file.display(),
                s.data_dir.display(),
                s.revision,
                s.compact_revision,
                s.keys,
                s.leases,
                s.identity.member_id,
                s.identity.cluster_id,
                started.elapsed().as_millis()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            // etcdctl's shape and exit code for a failed restore.
            eprintln!("Error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The members `--initial-cluster` names and this member's identity among them, derived as
/// a server bootstrapping a new cluster from the same flags derives them.
pub fn bootstrap_members(args: &RestoreArgs) -> Result<(Vec<Member>, Identity), RestoreError> {
    let cluster = parse_initial_cluster(&args.initial_cluster)?;
    let (members, my_peer_urls) = initial_members(
        &cluster,
        &args.name,
        &args.initial_advertise_peer_urls,
        &args.initial_cluster_token,
    )?;
    let token = &args.initial_cluster_token;
    let all: Vec<u64> = members.iter().map(|m| m.id).collect();
    let identity = Identity {
        member_id: ids::member_id(&my_peer_urls, token),
        cluster_id: ids::cluster_id(&all),
    };
    Ok((members, identity))
}

/// Records per engine batch while copying, and bytes: memory stays bounded on big snapshots.
const BATCH_RECORDS: usize = 10_000;
const BATCH_BYTES: usize = 8 << 20;

pub fn restore(args: &RestoreArgs) -> Result<Summary, RestoreError> {
    // The order of etcdctl's checks: flags, then the target dir, then the file.
    let (members, identity) = bootstrap_members(args)?;
    let target = args.data_dir();
    if target.exists() {
        let empty = target.is_dir()
            && fs::read_dir(&target)
                .map_err(io_at(&target))?
                .next()
                .is_none();
        if !empty {
            return Err(RestoreError::DataDirExists(target.display().to_string()));
        }
    }
    let mut reader = snapshot_file::open(&args.file, args.skip_hash_check)?;

    let staging = staging_dir(&target);
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(io_at(&staging))?;
    }
    let cleanup = RemoveOnDrop(Some(staging.clone()));
    let mut summary = fill(&staging, &mut reader, &members, &identity)?;

    // Move the finished store into place: one rename of `<staging>/oxcd`.
    fs::create_dir_all(&target).map_err(io_at(&target))?;
    let from = staging.join("oxcd");
    let to = target.join("oxcd");
    fs::rename(&from, &to).map_err(io_at(&to))?;
    sync_dir(&target)?;
    if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }
    drop(cleanup);
    summary.data_dir = target;
    Ok(summary)
}

/// Builds the data dir under `staging`: engine records from the snapshot, member records and
/// identity from the flags. Returns once the engine is closed.
fn fill<R: std::io::Read>(
    staging: &Path,
    reader: &mut snapshot_file::Reader<R>,
    members: &[Member],
    identity: &Identity,
) -> Result<Summary, RestoreError> {
    let dd = DataDir::open(staging)?;
    let engine: Arc<dyn KvEngine> = Arc::new(RocksEngine::open(&dd.kv_dir()).map_err(store_err)?);
    let mut records = 0u64;
    let mut batch = WriteBatch::default();
    let mut batch_bytes = 0usize;
    while let Some((k, v)) = reader.next_record()? {
        records += 1;
        // The new raft log starts empty: entries from index 1 must apply.
        if k == APPLIED_INDEX_KEY {
            continue;
        }
        batch_bytes += k.len() + v.len();
        batch.put(k, v);
        if batch.len() >= BATCH_RECORDS || batch_bytes >= BATCH_BYTES {
            engine
                .write(std::mem::take(&mut batch))
                .map_err(store_err)?;
            batch_bytes = 0;
        }
    }
    if !batch.is_empty() {
        engine.write(batch).map_err(store_err)?;
    }

    // The snapshot's members belong to the old cluster: drop them, then bootstrap the new
    // list exactly as a server does on a data dir that has none.
    let old = Membership::open(engine.clone(), &[]).map_err(store_err)?;
    for m in old.list() {
        old.remove(m.id).map_err(store_err)?;
    }
    drop(old);
    Membership::open(engine.clone(), members).map_err(store_err)?;

    // Read everything back the way a server will: a damaged record fails here, not there.
    let leases = EngineLeaseStore::new(engine.clone())
        .load()
        .map_err(store_err)?
        .len();
    let store = MvccStore::open(engine.clone()).map_err(store_err)?;
    let summary = Summary {
        data_dir: staging.to_path_buf(),
        identity: identity.clone(),
        revision: store.current_revision(),
        compact_revision: store.compact_revision(),
        keys: store.keys_total(),
        leases,
        records,
    };
    store.flush().map_err(store_err)?;
    drop(store);
    dd.save_identity(identity)?;

    // RocksDB closes when the last handle goes; the store's compactor thread may hold one for
    // a moment (it resumes a compaction the snapshot caught mid-way).
    let weak = Arc::downgrade(&engine);
    drop(engine);
    let deadline = Instant::now() + Duration::from_secs(600);
    while weak.strong_count() > 0 {
        if Instant::now() > deadline {
            return Err(RestoreError::Store(
                "the storage engine did not close within 10 minutes".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(summary)
}

/// A sibling of `target`, on the same file system so the final move is a rename.
fn staging_dir(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    parent.join(format!(".{name}.restoring-{}", std::process::id()))
}

fn sync_dir(dir: &Path) -> Result<(), RestoreError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))
}

struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_dir_all(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lease::LeaseRecord;
    use mvcc_store::WriteOp;
    use oxcd_proto::etcdserverpb::{CompactionRequest, DeleteRangeRequest, PutRequest};

    use crate::datadir::tests::tmp;

    fn args(file: &Path, data_dir: &Path) -> RestoreArgs {
        let mut a = Cli::try_parse_from([
            "oxcd snapshot".into(),
            "restore".into(),
            file.as_os_str().to_owned(),
            format!("--data-dir={}", data_dir.display()).into(),
        ])
        .map(|c| match c.command {
            Command::Restore(a) => a,
        })
        .unwrap();
        a.initial_cluster = "n1=http://127.0.0.1:7001,n2=http://127.0.0.1:7002".into();
        a.name = "n2".into();
        a.initial_advertise_peer_urls = "http://127.0.0.1:7002".into();
        a.initial_cluster_token = "tok".into();
        a
    }

    /// A source member's store on RocksDB, as the server keeps it, written to a snapshot file.
    fn source_snapshot(dir: &Path) -> (PathBuf, i64) {
        let engine: Arc<dyn KvEngine> = Arc::new(RocksEngine::open(&dir.join("src-kv")).unwrap());
        let store = MvccStore::open(engine.clone()).unwrap();
        let old_member = Member {
            id: 42,
            name: "old".into(),
            peer_ur_ls: vec!["http://10.0.0.1:2380".into()],
            client_ur_ls: vec![],
            is_learner: false,
        };
        Membership::open(engine.clone(), &[old_member]).unwrap();
        EngineLeaseStore::new(engine.clone())
            .save(&LeaseRecord {
                id: 0x77,
                ttl: 600,
                remaining_ttl: 0,
            })
            .unwrap();
        let put = |i: u64, k: &str, lease: i64| {
            let req = PutRequest {
                key: k.into(),
                value: format!("v{i}").into(),
                lease,
                ..Default::default()
            };
            store.apply(i, WriteOp::Put(&req), &|_| true).unwrap();
        };
        put(1, "a", 0);
        put(2, "b", 0x77);
        put(3, "a", 0);
        let del = DeleteRangeRequest {
            key: b"b".to_vec(),
            ..Default::default()
        };
        store
            .apply(4, WriteOp::DeleteRange(&del), &|_| true)
            .unwrap();
        let compact = CompactionRequest {
            revision: 3,
            physical: false,
        };
        let done = store
            .apply(5, WriteOp::Compact(&compact), &|_| true)
            .unwrap();
        if let Some(w) = done.compaction {
            w.wait_blocking();
        }
        put(6, "c", 0x77);
        let file = dir.join("snap.db");
        let mut w = snapshot_file::Writer::new(fs::File::create(&file).unwrap()).unwrap();
        store.export(&mut |k, v| w.record(k, v).is_ok()).unwrap();
        let (mut f, _, hash) = w.finish().unwrap();
        std::io::Write::write_all(&mut f, &hash).unwrap();
        (file, store.current_revision())
    }

    #[test]
    fn restore_keeps_data_and_replaces_membership() {
        let d = tmp();
        let (file, revision) = source_snapshot(&d);
        let target = d.join("restored");
        let a = args(&file, &target);
        let s = restore(&a).unwrap();
        assert_eq!(s.revision, revision);
        assert_eq!(s.compact_revision, 3);
        assert_eq!((s.keys, s.leases), (2, 1));
        assert!(!staging_dir(&target).exists(), "staging dir left behind");

        let dd = DataDir::open_existing(&target).unwrap();
        let (members, identity) = bootstrap_members(&a).unwrap();
        assert_eq!(dd.identity().unwrap(), Some(identity.clone()));
        assert_eq!(
            format!("{:x}", identity.member_id),
            format!(
                "{:x}",
                ids::member_id(&["http://127.0.0.1:7002".into()], "tok")
            )
        );
        let engine: Arc<dyn KvEngine> = Arc::new(RocksEngine::open(&dd.kv_dir()).unwrap());
        let store = MvccStore::open(engine.clone()).unwrap();
        assert_eq!(store.current_revision(), revision);
        assert_eq!(store.applied_index(), 0);
        let all = store
            .range(&oxcd_proto::etcdserverpb::RangeRequest {
                key: vec![0],
                range_end: vec![0],
                ..Default::default()
            })
            .unwrap();
        let got: Vec<(String, String, i64)> = all
            .kvs
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(&kv.key).into(),
                    String::from_utf8_lossy(&kv.value).into(),
                    kv.lease,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("a".to_string(), "v3".to_string(), 0),
                ("c".to_string(), "v6".to_string(), 0x77)
            ]
        );
        let m = Membership::open(engine.clone(), &[]).unwrap();
        assert_eq!(m.list(), members);
        let leases = EngineLeaseStore::new(engine).load().unwrap();
        assert_eq!(leases.len(), 1);
        assert_eq!((leases[0].id, leases[0].ttl), (0x77, 600));
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn refusals_write_nothing() {
        let d = tmp();
        let (file, _) = source_snapshot(&d);

        // A corrupted file.
        let mut bytes = fs::read(&file).unwrap();
        bytes[20] ^= 0x01;
        let bad = d.join("bad.db");
        fs::write(&bad, &bytes).unwrap();
        let target = d.join("t1");
        let err = restore(&args(&bad, &target)).unwrap_err();
        assert!(err.to_string().starts_with("expected sha256 ["), "{err}");
        assert!(!target.exists());
        assert!(!staging_dir(&target).exists());
        // ... which --skip-hash-check lets through (the body itself is still well formed).
        let mut skip = args(&bad, &target);
        skip.skip_hash_check = true;
        restore(&skip).unwrap();

        // A data dir that holds anything.
        let busy = d.join("busy");
        fs::create_dir_all(&busy).unwrap();
        fs::write(busy.join("x"), "x").unwrap();
        let err = restore(&args(&file, &busy)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("data-dir {:?} exists", busy.display().to_string())
        );
        assert_eq!(fs::read_dir(&busy).unwrap().count(), 1);

        // An empty one is fine.
        let empty = d.join("empty");
        fs::create_dir_all(&empty).unwrap();
        restore(&args(&file, &empty)).unwrap();

        // A name that is not in --initial-cluster.
        let mut wrong = args(&file, &d.join("t2"));
        wrong.name = "n3".into();
        let err = restore(&wrong).unwrap_err();
        assert_eq!(
            err.to_string(),
            "couldn't find local name \"n3\" in the initial cluster configuration"
        );
        assert!(!d.join("t2").exists());
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn flags_and_defaults_are_etcdctls() {
        let Cli {
            command: Command::Restore(a),
        } = Cli::try_parse_from(["oxcd snapshot", "restore", "s.db"]).unwrap();
        assert_eq!(a.data_dir(), PathBuf::from("default.etcd"));
        assert_eq!(a.initial_cluster, "default=http://localhost:2380");
        assert_eq!(a.initial_cluster_token, "etcd-cluster");
        assert_eq!(a.initial_advertise_peer_urls, "http://localhost:2380");
        assert!(!a.skip_hash_check);
        let (members, id) = bootstrap_members(&a).unwrap();
        // etcd's ids for its defaults.
        assert_eq!(format!("{:x}", id.member_id), "8e9e05c52164694d");
        assert_eq!(format!("{:x}", id.cluster_id), "cdf818194e3a8c32");
        assert_eq!(members.len(), 1);
        let Cli {
            command: Command::Restore(b),
        } = Cli::try_parse_from([
            "oxcd snapshot",
            "restore",
            "s.db",
            "--name=x",
            "--skip-hash-check",
        ])
        .unwrap();
        assert_eq!(b.data_dir(), PathBuf::from("x.etcd"));
        assert!(b.skip_hash_check);
    }
}
