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
}

/// This member's identity, fixed when the data dir is bootstrapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub member_id: u64,
    pub cluster_id: u64,
}

pub struct DataDir {
    root: PathBuf,
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
        if format_file.exists() {
            let found = fs::read_to_string(&format_file).map_err(io(&format_file))?;
            if found.trim() != FORMAT {
                return Err(DataDirError::UnknownFormat {
                    path: data_dir.to_path_buf(),
                    found: found.trim().to_string(),
                });
            }
            return Ok(DataDir { root });
        }
        if data_dir.join("member").exists() {
            return Err(DataDirError::EtcdDataDir(data_dir.to_path_buf()));
        }
        fs::create_dir_all(&root).map_err(io(&root))?;
        write_durably(&format_file, FORMAT.as_bytes())?;
        Ok(DataDir { root })
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
        self.root.join("wal")
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
