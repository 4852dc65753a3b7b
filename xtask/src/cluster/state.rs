//! The cluster's layout (names, ports, paths) and its state file, `DIR/cluster.json`, which
//! `up` writes and `down` and `status` read: the only record of which processes are ours.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::launch::{MemberSpec, ServerKind};

/// Name of the state file inside the cluster directory.
pub const STATE_FILE: &str = "cluster.json";
/// Ports of member i start at base + i * PORT_STRIDE: client, then peer (+1), metrics (+2).
pub const PORT_STRIDE: u16 = 10;
/// `--initial-cluster-token` of every cluster started here.
pub const TOKEN: &str = "xtask-cluster";

/// Member names: m0, m1, ...
pub fn member_name(i: usize) -> String {
    format!("m{i}")
}

/// The client, peer and metrics ports of member `i`.
pub fn ports(base: u16, i: usize) -> Result<(u16, u16, u16)> {
    let client = u32::from(base) + i as u32 * u32::from(PORT_STRIDE);
    if base == 0 || client + 2 > u32::from(u16::MAX) {
        return Err(Error::Usage(format!(
            "--base-port {base} leaves no room for member {i} (ports base+10*i .. base+10*i+2)"
        )));
    }
    let client = client as u16;
    Ok((client, client + 1, client + 2))
}

/// Where each of `nodes` members listens and keeps its data and log under `dir`.
pub fn layout(nodes: usize, base: u16, dir: &Path) -> Result<Vec<MemberSpec>> {
    if nodes == 0 {
        return Err(Error::Usage("--nodes must be at least 1".into()));
    }
    (0..nodes)
        .map(|i| {
            let (client, peer, metrics) = ports(base, i)?;
            let name = member_name(i);
            Ok(MemberSpec {
                client_url: format!("http://127.0.0.1:{client}"),
                peer_url: format!("http://127.0.0.1:{peer}"),
                metrics_url: Some(format!("http://127.0.0.1:{metrics}")),
                data_dir: dir.join(format!("{name}.data")),
                log: dir.join(format!("{name}.log")),
                name,
            })
        })
        .collect()
}

/// A started cluster, as recorded in the state file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub server: ServerKind,
    /// The binary every member runs, exactly as passed to exec (argv[0]).
    pub bin: PathBuf,
    pub token: String,
    pub members: Vec<MemberState>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberState {
    pub name: String,
    pub pid: u32,
    pub client_url: String,
    pub peer_url: String,
    pub metrics_url: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

impl MemberState {
    pub fn new(spec: &MemberSpec, pid: u32) -> MemberState {
        MemberState {
            name: spec.name.clone(),
            pid,
            client_url: spec.client_url.clone(),
            peer_url: spec.peer_url.clone(),
            metrics_url: spec.metrics_url.clone().unwrap_or_default(),
            data_dir: spec.data_dir.clone(),
            log: spec.log.clone(),
        }
    }
}

impl ClusterState {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    /// The recorded cluster, or None if `dir` has no state file.
    pub fn load(dir: &Path) -> Result<Option<ClusterState>> {
        let path = Self::path(dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("read {}", path.display()), e)),
        };
        serde_json::from_str(&text).map(Some).map_err(|e| {
            Error::Usage(format!(
                "{} is not a cluster state file ({e}); remove it if no cluster is running",
                path.display()
            ))
        })
    }

    /// Writes the state file atomically (temporary file, then rename).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = Self::path(dir);
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let mut text = serde_json::to_string_pretty(self).expect("state serializes");
        text.push('\n');
        std::fs::write(&tmp, text).map_err(|source| Error::Write {
            path: tmp.clone(),
            source,
        })?;
        std::fs::rename(&tmp, &path).map_err(|source| Error::Write { path, source })
    }

    pub fn remove(dir: &Path) -> Result<()> {
        let path = Self::path(dir);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io(format!("remove {}", path.display()), e))
            }
            _ => Ok(()),
        }
    }

    /// Client addresses (`host:port`), comma separated, for `--endpoints` of etcdctl and of
    /// the load generator. Without the scheme: etcdctl 3.4's `endpoint status` sends an
    /// http:// endpoint as the HTTP/2 :authority, which strict servers reject.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                m.client_url
                    .split_once("://")
                    .map_or(m.client_url.as_str(), |(_, a)| a)
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_step_by_ten_from_the_base() {
        assert_eq!(ports(2379, 0).unwrap(), (2379, 2380, 2381));
        assert_eq!(ports(2379, 1).unwrap(), (2389, 2390, 2391));
        assert_eq!(ports(2379, 2).unwrap(), (2399, 2400, 2401));
        assert_eq!(ports(30000, 4).unwrap(), (30040, 30041, 30042));
    }

    #[test]
    fn ports_past_65535_are_refused() {
        assert_eq!(ports(65533, 0).unwrap(), (65533, 65534, 65535));
        assert!(ports(65534, 0).is_err());
        assert!(ports(65500, 4).is_err());
        assert!(ports(0, 0).is_err());
    }

    #[test]
    fn layout_names_urls_and_paths() {
        let dir = Path::new("/tmp/c");
        let l = layout(3, 2379, dir).unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(l[0].name, "m0");
        assert_eq!(l[0].client_url, "http://127.0.0.1:2379");
        assert_eq!(l[0].peer_url, "http://127.0.0.1:2380");
        assert_eq!(l[0].metrics_url.as_deref(), Some("http://127.0.0.1:2381"));
        assert_eq!(l[2].name, "m2");
        assert_eq!(l[2].client_url, "http://127.0.0.1:2399");
        assert_eq!(l[2].peer_url, "http://127.0.0.1:2400");
        assert_eq!(l[2].data_dir, dir.join("m2.data"));
        assert_eq!(l[2].log, dir.join("m2.log"));
        assert_eq!(
            crate::launch::initial_cluster(&l),
            "m0=http://127.0.0.1:2380,m1=http://127.0.0.1:2390,m2=http://127.0.0.1:2400"
        );
        assert!(layout(0, 2379, dir).is_err());
    }

    #[test]
    fn state_file_round_trip() {
        let dir = std::env::temp_dir().join(format!("xtask-state-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(ClusterState::load(&dir).unwrap(), None);
        let specs = layout(2, 31000, &dir).unwrap();
        let state = ClusterState {
            server: ServerKind::Etcd,
            bin: PathBuf::from("/usr/bin/etcd"),
            token: TOKEN.into(),
            members: vec![
                MemberState::new(&specs[0], 101),
                MemberState::new(&specs[1], 102),
            ],
        };
        state.save(&dir).unwrap();
        let text = std::fs::read_to_string(dir.join(STATE_FILE)).unwrap();
        assert!(text.contains("\"server\": \"etcd\""), "{text}");
        assert!(text.contains("\"metrics_url\": \"http://127.0.0.1:31012\""));
        assert_eq!(ClusterState::load(&dir).unwrap(), Some(state.clone()));
        assert_eq!(state.endpoints(), "127.0.0.1:31000,127.0.0.1:31010");
        ClusterState::remove(&dir).unwrap();
        assert_eq!(ClusterState::load(&dir).unwrap(), None);
        ClusterState::remove(&dir).unwrap();
        std::fs::write(dir.join(STATE_FILE), "not json").unwrap();
        assert!(ClusterState::load(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
