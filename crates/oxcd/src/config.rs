//! Flags and environment, as etcd defines them: same names, meanings and defaults, and every
//! flag also read from `ETCD_<NAME>` (upper case, dashes as underscores). A flag etcd knows but
//! oxcd does not act on yet is accepted with a warning, unless ignoring it would be unsafe (TLS:
//! serving plaintext where the operator asked for TLS), in which case start-up is refused.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser};
use oxcd_tls::TlsInfo;

use crate::sched::CpuScheduling;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "oxcd",
    about = "oxcd: a distributed, reliable key-value store speaking etcd's v3 API",
    disable_version_flag = true,
    // Go's flag package, which etcd uses, lets a repeated flag's last value win.
    args_override_self = true
)]
pub struct Config {
    /// Human-readable name for this member.
    #[arg(long, env = "ETCD_NAME", default_value = "default")]
    pub name: String,
    /// Path to the data directory (default: ${name}.etcd).
    #[arg(long, env = "ETCD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Path to a dedicated wal directory.
    #[arg(long, env = "ETCD_WAL_DIR")]
    pub wal_dir: Option<PathBuf>,
    /// List of URLs to listen on for client traffic.
    #[arg(
        long,
        env = "ETCD_LISTEN_CLIENT_URLS",
        default_value = "http://localhost:2379"
    )]
    pub listen_client_urls: String,
    /// List of this member's client URLs to advertise to the public.
    #[arg(
        long,
        env = "ETCD_ADVERTISE_CLIENT_URLS",
        default_value = "http://localhost:2379"
    )]
    pub advertise_client_urls: String,
    /// List of URLs to listen on for peer traffic.
    #[arg(
        long,
        env = "ETCD_LISTEN_PEER_URLS",
        default_value = "http://localhost:2380"
    )]
    pub listen_peer_urls: String,
    /// List of this member's peer URLs to advertise to the rest of the cluster.
    #[arg(
        long,
        env = "ETCD_INITIAL_ADVERTISE_PEER_URLS",
        default_value = "http://localhost:2380"
    )]
    pub initial_advertise_peer_urls: String,
    /// Initial cluster configuration for bootstrapping (name=peerURL,...).
    #[arg(long, env = "ETCD_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,
    /// Initial cluster state ('new' or 'existing').
    #[arg(long, env = "ETCD_INITIAL_CLUSTER_STATE", default_value = "new",
          value_parser = ["new", "existing"])]
    pub initial_cluster_state: String,
    /// Initial cluster token for the cluster during bootstrap.
    #[arg(
        long,
        env = "ETCD_INITIAL_CLUSTER_TOKEN",
        default_value = "etcd-cluster"
    )]
    pub initial_cluster_token: String,
    /// List of additional URLs to listen on that respond to /metrics and /health.
    #[arg(long, env = "ETCD_LISTEN_METRICS_URLS", default_value = "")]
    pub listen_metrics_urls: String,
    /// Maximum client request size in bytes the server will accept.
    #[arg(long, env = "ETCD_MAX_REQUEST_BYTES", default_value_t = 1572864)]
    pub max_request_bytes: u64,
    /// Maximum number of operations permitted in a transaction.
    #[arg(long, env = "ETCD_MAX_TXN_OPS", default_value_t = 128)]
    pub max_txn_ops: u64,
    /// Time (in milliseconds) of a heartbeat interval.
    #[arg(long, env = "ETCD_HEARTBEAT_INTERVAL", default_value_t = 100)]
    pub heartbeat_interval: u64,
    /// Time (in milliseconds) for an election to timeout.
    #[arg(long, env = "ETCD_ELECTION_TIMEOUT", default_value_t = 1000)]
    pub election_timeout: u64,
    /// Number of committed transactions to trigger a snapshot to disk.
    #[arg(long, env = "ETCD_SNAPSHOT_COUNT", default_value_t = 100000)]
    pub snapshot_count: u64,
    /// Number of entries for a slow follower to catch up after compacting the raft log.
    #[arg(
        long,
        env = "ETCD_EXPERIMENTAL_SNAPSHOT_CATCHUP_ENTRIES",
        default_value_t = 5000
    )]
    pub experimental_snapshot_catchup_entries: u64,
    /// Raise alarms when backend size exceeds the given quota (0 means the default quota).
    #[arg(long, env = "ETCD_QUOTA_BACKEND_BYTES", default_value_t = 0)]
    pub quota_backend_bytes: i64,
    /// Auto compaction retention (0 disables auto compaction).
    #[arg(long, env = "ETCD_AUTO_COMPACTION_RETENTION", default_value = "0")]
    pub auto_compaction_retention: String,
    /// Interpret 'auto-compaction-retention' as: periodic|revision.
    #[arg(long, env = "ETCD_AUTO_COMPACTION_MODE", default_value = "periodic",
          value_parser = ["periodic", "revision"])]
    pub auto_compaction_mode: String,
    /// Log level: debug, info, warn, error, panic, or fatal.
    #[arg(long, env = "ETCD_LOG_LEVEL", default_value = "info",
          value_parser = ["debug", "info", "warn", "error", "panic", "fatal"])]
    pub log_level: String,
    /// 'zap' for structured (JSON) logs, 'capnslog' for plain text.
    #[arg(long, env = "ETCD_LOGGER", default_value = "zap")]
    pub logger: String,
    /// Where logs go: 'default', 'stderr', 'stdout', or file paths (comma separated).
    #[arg(long, env = "ETCD_LOG_OUTPUTS", default_value = "default")]
    pub log_outputs: String,
    /// oxcd only: CPU scheduling policy of its threads. 'batch' (SCHED_BATCH): a woken thread
    /// does not preempt a running one, about half the context switches under load; 'inherit':
    /// keep the policy oxcd was started with.
    #[arg(long, env = "OXCD_CPU_SCHEDULING", value_enum, default_value = "batch")]
    pub cpu_scheduling: CpuScheduling,
    /// Enable the raft pre-vote phase.
    #[arg(long, env = "ETCD_PRE_VOTE", default_value = "true", action = ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub pre_vote: bool,
    /// Check data corruption before serving any client or peer traffic.
    #[arg(long, env = "ETCD_EXPERIMENTAL_INITIAL_CORRUPT_CHECK", default_value = "false",
          action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub experimental_initial_corrupt_check: bool,
    /// Duration of time between cluster corruption check passes (0: no periodic check).
    #[arg(long, env = "ETCD_EXPERIMENTAL_CORRUPT_CHECK_TIME", default_value = "0s",
          value_parser = parse_duration)]
    pub experimental_corrupt_check_time: Duration,
    /// Print the version and exit.
    #[arg(long, action = ArgAction::SetTrue)]
    pub version: bool,

    // Client and peer TLS (see crate::tls_setup for how they combine, as in etcd).
    #[arg(long, env = "ETCD_CERT_FILE", default_value = "")]
    pub cert_file: String,
    #[arg(long, env = "ETCD_KEY_FILE", default_value = "")]
    pub key_file: String,
    #[arg(long, env = "ETCD_TRUSTED_CA_FILE", default_value = "")]
    pub trusted_ca_file: String,
    #[arg(long, env = "ETCD_CLIENT_CERT_AUTH", default_value = "false", action = ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub client_cert_auth: bool,
    #[arg(long, env = "ETCD_AUTO_TLS", default_value = "false", action = ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub auto_tls: bool,
    #[arg(long, env = "ETCD_PEER_CERT_FILE", default_value = "")]
    pub peer_cert_file: String,
    #[arg(long, env = "ETCD_PEER_KEY_FILE", default_value = "")]
    pub peer_key_file: String,
    #[arg(long, env = "ETCD_PEER_TRUSTED_CA_FILE", default_value = "")]
    pub peer_trusted_ca_file: String,
    #[arg(long, env = "ETCD_PEER_CLIENT_CERT_AUTH", default_value = "false", action = ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub peer_client_cert_auth: bool,
    #[arg(long, env = "ETCD_PEER_AUTO_TLS", default_value = "false", action = ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub peer_auto_tls: bool,

    #[command(flatten)]
    pub accepted: Accepted,
}

/// Declares etcd flags that oxcd accepts for manifest compatibility but does not act on yet
/// (each logs a warning when set), so that a truly unknown flag is still an error.
macro_rules! accepted_flags {
    ($($field:ident, $env:literal, $kind:ident;)*) => {
        #[derive(clap::Args, Debug, Clone, Default)]
        pub struct Accepted {
            $(
                #[arg(long, env = $env, num_args = accepted_flags!(@args $kind),
                      default_missing_value = "true")]
                pub $field: Option<String>,
            )*
        }

        impl Accepted {
            /// Names of the accepted-but-inactive flags that were set.
            pub fn set_flags(&self) -> Vec<String> {
                let mut set = Vec::new();
                $(
                    if self.$field.is_some() {
                        set.push(stringify!($field).replace('_', "-"));
                    }
                )*
                set
            }
        }
    };
    (@args bool) => { 0..=1 };
    (@args value) => { 1 };
}

accepted_flags! {
    max_snapshots, "ETCD_MAX_SNAPSHOTS", value;
    max_wals, "ETCD_MAX_WALS", value;
    initial_election_tick_advance, "ETCD_INITIAL_ELECTION_TICK_ADVANCE", bool;
    backend_batch_interval, "ETCD_BACKEND_BATCH_INTERVAL", value;
    backend_batch_limit, "ETCD_BACKEND_BATCH_LIMIT", value;
    grpc_keepalive_min_time, "ETCD_GRPC_KEEPALIVE_MIN_TIME", value;
    grpc_keepalive_interval, "ETCD_GRPC_KEEPALIVE_INTERVAL", value;
    grpc_keepalive_timeout, "ETCD_GRPC_KEEPALIVE_TIMEOUT", value;
    max_concurrent_streams, "ETCD_MAX_CONCURRENT_STREAMS", value;
    strict_reconfig_check, "ETCD_STRICT_RECONFIG_CHECK", bool;
    enable_v2, "ETCD_ENABLE_V2", bool;
    client_crl_file, "ETCD_CLIENT_CRL_FILE", value;
    client_cert_allowed_hostname, "ETCD_CLIENT_CERT_ALLOWED_HOSTNAME", value;
    peer_crl_file, "ETCD_PEER_CRL_FILE", value;
    peer_cert_allowed_cn, "ETCD_PEER_CERT_ALLOWED_CN", value;
    peer_cert_allowed_hostname, "ETCD_PEER_CERT_ALLOWED_HOSTNAME", value;
    cipher_suites, "ETCD_CIPHER_SUITES", value;
    cors, "ETCD_CORS", value;
    host_whitelist, "ETCD_HOST_WHITELIST", value;
    enable_pprof, "ETCD_ENABLE_PPROF", bool;
    metrics, "ETCD_METRICS", value;
    auth_token, "ETCD_AUTH_TOKEN", value;
    bcrypt_cost, "ETCD_BCRYPT_COST", value;
    auth_token_ttl, "ETCD_AUTH_TOKEN_TTL", value;
    enable_grpc_gateway, "ETCD_ENABLE_GRPC_GATEWAY", bool;
    experimental_enable_lease_checkpoint, "ETCD_EXPERIMENTAL_ENABLE_LEASE_CHECKPOINT", bool;
    experimental_compaction_batch_limit, "ETCD_EXPERIMENTAL_COMPACTION_BATCH_LIMIT", value;
    experimental_watch_progress_notify_interval, "ETCD_EXPERIMENTAL_WATCH_PROGRESS_NOTIFY_INTERVAL", value;
    experimental_warning_apply_duration, "ETCD_EXPERIMENTAL_WARNING_APPLY_DURATION", value;
    experimental_backend_bbolt_freelist_type, "ETCD_EXPERIMENTAL_BACKEND_BBOLT_FREELIST_TYPE", value;
    force_new_cluster, "ETCD_FORCE_NEW_CLUSTER", bool;
    debug, "ETCD_DEBUG", bool;
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid URL {url:?} in --{flag}: {reason}")]
    BadUrl {
        flag: &'static str,
        url: String,
        reason: String,
    },
    #[error("--{flag} is set, but oxcd does not enforce it yet; refusing to start rather than accept connections it would refuse")]
    TlsRestrictionUnsupported { flag: &'static str },
    #[error("couldn't find local name {name:?} in the initial cluster configuration")]
    NameNotInCluster { name: String },
    #[error("--initial-cluster has an invalid entry {0:?} (want name=peerURL)")]
    BadInitialCluster(String),
    #[error("--initial-advertise-peer-urls {advertised:?} does not match --initial-cluster entry for {name:?} ({listed:?})")]
    PeerUrlsMismatch {
        name: String,
        advertised: Vec<String>,
        listed: Vec<String>,
    },
}

impl Config {
    /// Parses argv the way etcd does: Go's flag package accepts `-name` as well as `--name`.
    pub fn from_args() -> Result<Config, clap::Error> {
        let args = std::env::args_os().enumerate().map(|(i, a)| {
            let s = a.to_string_lossy();
            if i > 0 && s.starts_with('-') && !s.starts_with("--") && s.len() > 2 {
                format!("-{s}").into()
            } else {
                a
            }
        });
        Config::try_parse_from(args)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{}.etcd", self.name)))
    }

    /// TLS flags that narrow who may connect: ignoring one would let in clients or peers the
    /// operator meant to keep out, so oxcd refuses to start with them.
    pub fn refuse_unsupported(&self) -> Result<(), ConfigError> {
        let a = &self.accepted;
        let restrictions: [(&'static str, bool); 6] = [
            ("client-crl-file", a.client_crl_file.is_some()),
            (
                "client-cert-allowed-hostname",
                a.client_cert_allowed_hostname.is_some(),
            ),
            ("peer-crl-file", a.peer_crl_file.is_some()),
            ("peer-cert-allowed-cn", a.peer_cert_allowed_cn.is_some()),
            (
                "peer-cert-allowed-hostname",
                a.peer_cert_allowed_hostname.is_some(),
            ),
            ("cipher-suites", a.cipher_suites.is_some()),
        ];
        match restrictions.iter().find(|(_, set)| *set) {
            Some(&(flag, _)) => Err(ConfigError::TlsRestrictionUnsupported { flag }),
            None => Ok(()),
        }
    }

    /// What the client TLS flags say (`--auto-tls` is resolved later, with the data dir).
    pub fn client_tls(&self) -> TlsInfo {
        TlsInfo {
            cert_file: non_empty(&self.cert_file),
            key_file: non_empty(&self.key_file),
            trusted_ca_file: non_empty(&self.trusted_ca_file),
            client_cert_auth: self.client_cert_auth,
            self_signed: false,
        }
    }

    /// What the peer TLS flags say (`--peer-auto-tls` is resolved later).
    pub fn peer_tls(&self) -> TlsInfo {
        TlsInfo {
            cert_file: non_empty(&self.peer_cert_file),
            key_file: non_empty(&self.peer_key_file),
            trusted_ca_file: non_empty(&self.peer_trusted_ca_file),
            client_cert_auth: self.peer_client_cert_auth,
            self_signed: false,
        }
    }

    /// `--initial-cluster`, defaulting like etcd to this member's name and advertised peer URLs.
    pub fn initial_cluster(&self) -> Result<Vec<(String, Vec<String>)>, ConfigError> {
        let text = match &self.initial_cluster {
            Some(s) if !s.is_empty() => s.clone(),
            _ => split_urls(&self.initial_advertise_peer_urls)
                .iter()
                .map(|u| format!("{}={u}", self.name))
                .collect::<Vec<_>>()
                .join(","),
        };
        parse_initial_cluster(&text)
    }
}

/// `name=url,name=url,...`: each member's peer URLs, in order of first mention.
pub fn parse_initial_cluster(text: &str) -> Result<Vec<(String, Vec<String>)>, ConfigError> {
    let mut members: Vec<(String, Vec<String>)> = Vec::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, url) = entry
            .split_once('=')
            .ok_or_else(|| ConfigError::BadInitialCluster(entry.to_string()))?;
        parse_url("initial-cluster", url)?;
        match members.iter_mut().find(|(n, _)| n == name) {
            Some((_, urls)) => urls.push(url.to_string()),
            None => members.push((name.to_string(), vec![url.to_string()])),
        }
    }
    Ok(members)
}

/// The members a new cluster starts with, derived from the bootstrap flags exactly as every
/// member derives them (so all agree, as in etcd), and this member's peer URLs among them.
/// `name` must be listed, with the URLs it advertises.
pub fn initial_members(
    cluster: &[(String, Vec<String>)],
    name: &str,
    advertise_peer_urls: &str,
    token: &str,
) -> Result<(Vec<oxcd_proto::etcdserverpb::Member>, Vec<String>), ConfigError> {
    let me =
        cluster
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| ConfigError::NameNotInCluster {
                name: name.to_string(),
            })?;
    let advertised = split_urls(advertise_peer_urls);
    let (mut a, mut b) = (advertised.clone(), me.1.clone());
    a.sort();
    b.sort();
    if a != b {
        return Err(ConfigError::PeerUrlsMismatch {
            name: name.to_string(),
            advertised,
            listed: me.1.clone(),
        });
    }
    let members = cluster
        .iter()
        .map(|(name, urls)| oxcd_proto::etcdserverpb::Member {
            id: crate::ids::member_id(urls, token),
            name: name.clone(),
            peer_ur_ls: urls.clone(),
            // Every member must bootstrap identical records; client URLs arrive published.
            client_ur_ls: Vec::new(),
            is_learner: false,
        })
        .collect();
    Ok((members, me.1.clone()))
}

/// A Go duration flag (`1s`, `1m30s`, `0`). A negative one is refused: etcd would run its
/// timer loop without pause.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let nanos = crate::auto_compaction::parse_go_duration(s)?;
    u64::try_from(nanos)
        .map(Duration::from_nanos)
        .map_err(|_| format!("negative duration {s:?}"))
}

pub fn split_urls(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect()
}

/// Resolves `http://host:port` or `https://host:port` to socket addresses (`localhost` may give both families).
pub fn parse_url(flag: &'static str, url: &str) -> Result<Vec<SocketAddr>, ConfigError> {
    let bad = |reason: &str| ConfigError::BadUrl {
        flag,
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let rest = if let Some(r) = url.strip_prefix("http://") {
        r
    } else if let Some(r) = url.strip_prefix("https://") {
        r
    } else if url.starts_with("unix://") || url.starts_with("unixs://") {
        return Err(bad("unix sockets are not supported"));
    } else {
        return Err(bad("URL scheme must be http or https"));
    };
    let hostport = rest.trim_end_matches('/');
    if !hostport.contains(':') || hostport.ends_with(']') {
        return Err(bad("missing port in address"));
    }
    use std::net::ToSocketAddrs;
    let addrs: Vec<SocketAddr> = hostport
        .to_socket_addrs()
        .map_err(|e| bad(&e.to_string()))?
        .collect();
    if addrs.is_empty() {
        return Err(bad("host resolves to no address"));
    }
    Ok(addrs)
}

fn non_empty(path: &str) -> Option<PathBuf> {
    (!path.is_empty()).then(|| PathBuf::from(path))
}

/// Whether a URL is served or dialed with TLS.
pub fn is_https(url: &str) -> bool {
    url.starts_with("https://")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("oxcd").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_are_etcds() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.name, "default");
        assert_eq!(c.data_dir(), PathBuf::from("default.etcd"));
        assert_eq!(c.listen_client_urls, "http://localhost:2379");
        assert_eq!(c.max_request_bytes, 1572864);
        assert_eq!(c.max_txn_ops, 128);
        assert_eq!(c.initial_cluster_token, "etcd-cluster");
        assert_eq!(
            c.initial_cluster().unwrap(),
            vec![(
                "default".to_string(),
                vec!["http://localhost:2380".to_string()]
            )]
        );
    }

    #[test]
    fn unknown_flag_is_an_error_and_known_inactive_ones_are_accepted() {
        assert!(parse(&["--no-such-flag=1"]).is_err());
        let c = parse(&["--log-level=warn", "--log-level", "debug"]).unwrap();
        assert_eq!(
            c.log_level, "debug",
            "the last of a repeated flag wins, as in etcd"
        );
        let c = parse(&["--snapshot-count=5", "--enable-v2", "--max-wals", "3"]).unwrap();
        assert_eq!(c.snapshot_count, 5);
        assert_eq!(
            c.accepted.set_flags(),
            vec!["max-wals".to_string(), "enable-v2".to_string()]
        );
    }

    #[test]
    fn cpu_scheduling_flag() {
        assert_eq!(parse(&[]).unwrap().cpu_scheduling, CpuScheduling::Batch);
        let c = parse(&["--cpu-scheduling=inherit"]).unwrap();
        assert_eq!(c.cpu_scheduling, CpuScheduling::Inherit);
        assert!(parse(&["--cpu-scheduling=fifo"]).is_err());
    }

    #[test]
    fn corrupt_check_flags() {
        let c = parse(&[]).unwrap();
        assert!(!c.experimental_initial_corrupt_check);
        assert!(c.experimental_corrupt_check_time.is_zero());
        let c = parse(&[
            "--experimental-initial-corrupt-check",
            "--experimental-corrupt-check-time=1m30s",
        ])
        .unwrap();
        assert!(c.experimental_initial_corrupt_check);
        assert_eq!(c.experimental_corrupt_check_time, Duration::from_secs(90));
        assert!(c.accepted.set_flags().is_empty());
        assert!(parse(&["--experimental-corrupt-check-time=5"]).is_err());
        assert!(parse(&["--experimental-corrupt-check-time=-1s"]).is_err());
    }

    #[test]
    fn go_style_booleans() {
        assert!(!parse(&["--pre-vote=false"]).unwrap().pre_vote);
        assert!(parse(&["--pre-vote"]).unwrap().pre_vote);
        let c = parse(&["--client-cert-auth", "--cert-file=/c.pem"]).unwrap();
        assert!(c.client_tls().client_cert_auth);
        assert_eq!(c.client_tls().cert_file, Some(PathBuf::from("/c.pem")));
        assert_eq!(c.client_tls().key_file, None);
        assert!(c.peer_tls().is_empty());
        assert!(c.refuse_unsupported().is_ok());
        let c = parse(&["--peer-cert-allowed-cn=etcd-peer"]).unwrap();
        assert!(matches!(
            c.refuse_unsupported(),
            Err(ConfigError::TlsRestrictionUnsupported {
                flag: "peer-cert-allowed-cn"
            })
        ));
    }

    #[test]
    fn urls() {
        assert!(parse_url("x", "http://127.0.0.1:2379").is_ok());
        assert!(parse_url("x", "https://127.0.0.1:2379").is_ok());
        assert!(parse_url("x", "unix://127.0.0.1:2379").is_err());
        assert!(parse_url("x", "http://127.0.0.1").is_err());
        assert!(parse_url("x", "127.0.0.1:1").is_err());
    }
}
