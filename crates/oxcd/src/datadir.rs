//! The data directory: oxcd's own on-disk format lives under `<data-dir>/oxcd/`. A directory
//! written by etcd (its `member/` tree) or by another oxcd format version is refused untouched,
//! with an error that says what was found and what to do.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "oxcd-data-v1";

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error(
        "data dir {0} holds an etcd data directory (member/), which oxcd cannot read; \
             start oxcd on an empty data dir (etcd data can be moved with a client-level copy)"
    )]
    EtcdDataDir(PathBuf),
    #[error("data dir {path} has format {found:?}, this oxcd reads {FORMAT:?}")]
    UnknownFormat { path: PathBuf, found: String },
    #[error("data dir {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data dir {path}: identity file is damaged: {reason}")]
    BadIdentity { path: PathBuf, reason: String },
    #[error(
        "wal dir {0} holds wal files oxcd did not write (etcd's?), which it cannot read; \
             give --wal-dir an empty directory"
    )]
    ForeignWalDir(PathBuf),
    #[error(
        "data dir {data_dir} was already used, but its wal dir {wal_dir} holds no log{hint}; \
             start with the --wal-dir it was started with"
    )]
    WalMissing {
        data_dir: PathBuf,
        wal_dir: PathBuf,
        hint: String,
    },
}

/// Marks a --wal-dir as oxcd's, so a directory of another program's wal files is told apart.
const WAL_FORMAT_FILE: &str = "OXCD_WAL_FORMAT";
/// Under `<data-dir>/oxcd`: the --wal-dir last used with this data dir.
const WAL_DIR_NOTE: &str = "wal-dir";

/// This member's identity, fixed when the data dir is bootstrapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub member_id: u64,
    pub cluster_id: u64,
}

pub struct DataDir {
    root: PathBuf,
    /// The raft log: `<root>/wal`, or the dedicated --wal-dir.
    wal: PathBuf,
}

/// Whether `marker` exists; an error if it names a format other than oxcd's (`dir` is what the
/// error reports).
fn check_format(marker: &Path, dir: &Path) -> Result<bool, DataDirError> {
    if !marker.exists() {
        return Ok(false);
    }
    let found = fs::read_to_string(marker).map_err(io(marker))?;
    if found.trim() != FORMAT {
        return Err(DataDirError::UnknownFormat {
            path: dir.to_path_buf(),
            found: found.trim().to_string(),
        });
    }
    Ok(true)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataDirError + '_ {
    move |source| DataDirError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl DataDir {
    /// Checks (and if new, creates) `<data_dir>/oxcd`. Nothing is written to a refused dir.
    pub fn open(data_dir: &Path) -> Result<DataDir, DataDirError> {
        let root = data_dir.join("oxcd");
        let format_file = root.join("FORMAT");
        if check_format(&format_file, data_dir)? {
            let wal = root.join("wal");
            return Ok(DataDir { root, wal });
        }
        if data_dir.join("member").exists() {
            return Err(DataDirError::EtcdDataDir(data_dir.to_path_buf()));
        }
        fs::create_dir_all(&root).map_err(io(&root))?;
        write_durably(&format_file, FORMAT.as_bytes())?;
        let wal = root.join("wal");
        Ok(DataDir { root, wal })
    }

    /// Keeps the raft log in `dir` (etcd's --wal-dir) instead of under the data dir. A
    /// directory holding wal files oxcd did not write is refused untouched.
    pub fn with_wal_dir(mut self, dir: &Path) -> Result<DataDir, DataDirError> {
        let marker = dir.join(WAL_FORMAT_FILE);
        if !check_format(&marker, dir)? {
            if has_wal_files(dir)? {
                return Err(DataDirError::ForeignWalDir(dir.to_path_buf()));
            }
            fs::create_dir_all(dir).map_err(io(dir))?;
            write_durably(&marker, FORMAT.as_bytes())?;
        }
        // Remembered beside the data, so a start without it can say where the log is.
        let note = self.root.join(WAL_DIR_NOTE);
        let path = dir.to_string_lossy();
        if fs::read_to_string(&note).ok().as_deref() != Some(&*path) {
            write_durably(&note, path.as_bytes())?;
        }
        self.wal = dir.to_path_buf();
        Ok(self)
    }

    /// A member that already has state must find its log where it left it: starting it with
    /// another wal dir would look like an empty log and lose what it had acknowledged.
    /// `applied`: the store holds state applied from a log (a freshly restored snapshot has
    /// none yet, and no log either).
    pub fn check_wal_present(&self, data_dir: &Path, applied: bool) -> Result<(), DataDirError> {
        if has_wal_files(&self.wal)? {
            return Ok(());
        }
        let default = self.root.join("wal");
        let noted = fs::read_to_string(self.root.join(WAL_DIR_NOTE))
            .ok()
            .map(PathBuf::from);
        let hint = [Some(default), noted]
            .into_iter()
            .flatten()
            .find(|d| *d != self.wal && has_wal_files(d).unwrap_or(false))
            .map(|d| format!(" (its log is in {})", d.display()))
            .unwrap_or_default();
        if !applied && hint.is_empty() {
            return Ok(());
        }
        Err(DataDirError::WalMissing {
            data_dir: data_dir.to_path_buf(),
            wal_dir: self.wal.clone(),
            hint,
        })
    }

    /// Opens a data dir that must already be oxcd's (for read-only tools); creates nothing.
    pub fn open_existing(data_dir: &Path) -> Result<DataDir, DataDirError> {
        let format_file = data_dir.join("oxcd").join("FORMAT");
        if !format_file.exists() {
            if data_dir.join("member").exists() {
                return Err(DataDirError::EtcdDataDir(data_dir.to_path_buf()));
            }
            return Err(DataDirError::Io {
                path: data_dir.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not an oxcd data dir (no oxcd/FORMAT)",
                ),
            });
        }
        DataDir::open(data_dir)
    }

    pub fn wal_dir(&self) -> PathBuf {
        self.wal.clone()
    }

    pub fn kv_dir(&self) -> PathBuf {
        self.root.join("kv")
    }

    /// The stored identity, or `None` on a data dir that was never bootstrapped.
    pub fn identity(&self) -> Result<Option<Identity>, DataDirError> {
        let path = self.root.join("identity");
        if !path.exists() {
            return Ok(None);
        }
        let text = fs::read_to_string(&path).map_err(io(&path))?;
        let bad = |reason: &str| DataDirError::BadIdentity {
            path: path.clone(),
            reason: reason.to_string(),
        };
        let mut member_id = None;
        let mut cluster_id = None;
        for line in text.lines() {
            let (k, v) = line.split_once('=').ok_or_else(|| bad(line))?;
            let v = u64::from_str_radix(v.trim(), 16).map_err(|e| bad(&e.to_string()))?;
            match k.trim() {
                "member_id" => member_id = Some(v),
                "cluster_id" => cluster_id = Some(v),
                _ => return Err(bad(line)),
            }
        }
        match (member_id, cluster_id) {
            (Some(member_id), Some(cluster_id)) => Ok(Some(Identity {
                member_id,
                cluster_id,
            })),
            _ => Err(bad("missing member_id or cluster_id")),
        }
    }

    pub fn save_identity(&self, id: &Identity) -> Result<(), DataDirError> {
        let text = format!(
            "member_id={:x}\ncluster_id={:x}\n",
            id.member_id, id.cluster_id
        );
        write_durably(&self.root.join("identity"), text.as_bytes())
    }
}

/// Whether `dir` holds any `*.wal` file (a missing dir holds none).
fn has_wal_files(dir: &Path) -> Result<bool, DataDirError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io(dir)(e)),
    };
    for e in entries {
        let e = e.map_err(io(dir))?;
        if e.file_name().to_string_lossy().ends_with(".wal") {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Write to a temp file, fsync, rename, fsync the directory: the file is whole or absent.
fn write_durably(path: &Path, data: &[u8]) -> Result<(), DataDirError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(data).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh, empty directory for one test.
    pub(crate) fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "oxcd-datadir-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn refuses_etcd_dir_without_writing() {
        let d = tmp();
        fs::create_dir_all(d.join("member/snap")).unwrap();
        let err = DataDir::open(&d).err().unwrap();
        assert!(matches!(err, DataDirError::EtcdDataDir(_)), "{err}");
        assert!(!d.join("oxcd").exists());
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_wal_dir_of_foreign_wal_files_is_refused_and_an_empty_one_is_marked() {
        let d = tmp();
        let foreign = d.join("etcd-wal");
        fs::create_dir_all(&foreign).unwrap();
        fs::write(foreign.join("0000000000000000-0000000000000000.wal"), b"x").unwrap();
        let err = DataDir::open(&d.join("data"))
            .unwrap()
            .with_wal_dir(&foreign)
            .err()
            .unwrap();
        assert!(matches!(err, DataDirError::ForeignWalDir(_)), "{err}");
        assert!(!foreign.join(WAL_FORMAT_FILE).exists());

        let ours = d.join("wal");
        let dd = DataDir::open(&d.join("data"))
            .unwrap()
            .with_wal_dir(&ours)
            .unwrap();
        assert_eq!(dd.wal_dir(), ours);
        assert!(ours.join(WAL_FORMAT_FILE).exists());
        // Once marked, its own wal files do not make it foreign.
        fs::write(ours.join("0000000000000001-0000000000000001.wal"), b"").unwrap();
        let dd = DataDir::open(&d.join("data"))
            .unwrap()
            .with_wal_dir(&ours)
            .unwrap();
        dd.check_wal_present(&d.join("data"), true).unwrap();
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_used_data_dir_without_its_log_is_refused_with_a_hint() {
        let d = tmp();
        let dd = DataDir::open(&d).unwrap();
        fs::create_dir_all(dd.wal_dir()).unwrap();
        fs::write(
            dd.wal_dir().join("0000000000000001-0000000000000001.wal"),
            b"",
        )
        .unwrap();
        dd.check_wal_present(&d, true).unwrap();
        let elsewhere = d.join("other-wal");
        let moved = DataDir::open(&d).unwrap().with_wal_dir(&elsewhere).unwrap();
        // Even a store that applied nothing yet (a crash before its first flush) is refused
        // when its log is known to be elsewhere.
        let err = moved.check_wal_present(&d, false).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, DataDirError::WalMissing { .. }), "{text}");
        assert!(text.contains(&dd.wal_dir().display().to_string()), "{text}");
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn identity_round_trip_and_format_check() {
        let d = tmp();
        let dd = DataDir::open(&d).unwrap();
        assert_eq!(dd.identity().unwrap(), None);
        let id = Identity {
            member_id: 0x8e9e05c52164694d,
            cluster_id: 0xcdf818194e3a8c32,
        };
        dd.save_identity(&id).unwrap();
        assert_eq!(DataDir::open(&d).unwrap().identity().unwrap(), Some(id));
        fs::write(d.join("oxcd/FORMAT"), "oxcd-data-v999").unwrap();
        assert!(matches!(
            DataDir::open(&d),
            Err(DataDirError::UnknownFormat { .. })
        ));
        fs::remove_dir_all(d).unwrap();
    }
}
