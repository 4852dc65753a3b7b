//! Wiring: flags → data dir → storage → raft-node → applier → watch → api-gateway, each layer a
//! task or thread joined by typed channels; then serve until SIGTERM/SIGINT and stop in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use api_gateway::cluster::ClusterService;
use api_gateway::kv::KvService;
use api_gateway::lease_service::{propose_revoke, LeaseService};
use api_gateway::maintenance::MaintenanceService;
use api_gateway::recipes::{ElectionService, LockService};
use api_gateway::watch_service::{StoreHistory, WatchService};
use api_gateway::{Gateway, HeaderSource, Limits};
use applier::Applier;
use applier::{Alarms, EngineLeaseStore, Membership, Quota};
use lease::{LeaseHandle, LeaseTick, Lessor, LessorConfig, SystemClock, TickerConfig};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use mvcc_store::{KvEngine, MvccStore, RocksEngine};
use oxcd_proto::etcdserverpb::{
    cluster_server::ClusterServer, kv_server::KvServer, lease_server::LeaseServer,
    maintenance_server::MaintenanceServer, watch_server::WatchServer, InternalRaftRequest,
    LeaseCheckpoint, LeaseCheckpointRequest, Member, MemberAttrSetRequest,
};
use oxcd_proto::oxcdpeerpb::raft_peer_server::RaftPeerServer;
use oxcd_proto::v3electionpb::election_server::ElectionServer;
use oxcd_proto::v3lockpb::lock_server::LockServer;
use peer_transport::{AddressBook, PeerTransport, RaftPeerService};
use raft_node::{RaftConfig, RaftNode};
use tokio::sync::{mpsc, watch as tokio_watch};
use watch::{WatchConfig, WatchHub};

use crate::auto_compaction;
use crate::config::{is_https, parse_url, split_urls, Config, ConfigError};
use crate::corrupt_check;
use crate::datadir::{DataDir, DataDirError, Identity};
use crate::http::{self, HttpState};
use crate::ids;
use crate::layer_metrics::LayerGauges;
use oxcd_tls::ServerConfig;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error(transparent)]
    AutoCompaction(#[from] auto_compaction::RetentionError),
    #[error("storage: {0}")]
    Storage(#[from] mvcc_store::MvccError),
    #[error("raft: {0}")]
    Raft(#[from] raft_node::RaftError),
    #[error("metrics: {0}")]
    Metrics(String),
    #[error("leases: {0}")]
    Lease(String),
    #[error(transparent)]
    Alarms(#[from] applier::AlarmError),
    #[error(transparent)]
    Corrupt(#[from] corrupt_check::CorruptError),
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("join: {0}")]
    Join(String),
    #[error(transparent)]
    Tls(#[from] crate::tls_setup::TlsSetupError),
    #[error("runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// Why gRPC requests may be larger than `--max-request-bytes`: the limit applies to the
/// replicated request; the transport allows headroom so the server can answer with etcd's error.
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

pub fn run(cfg: Config) -> Result<(), ServerError> {
    init_logging(&cfg);
    for flag in cfg.accepted.set_flags() {
        tracing::warn!(
            flag,
            "flag is accepted for compatibility but has no effect in oxcd yet"
        );
    }
    cfg.refuse_unsupported()?;
    let compaction = auto_compaction::Policy::from_flags(
        &cfg.auto_compaction_mode,
        &cfg.auto_compaction_retention,
    )?;
    let metrics = install_metrics()?;

    let cluster = cfg.initial_cluster()?;
    let (initial_members, my_peer_urls) = crate::config::initial_members(
        &cluster,
        &cfg.name,
        &cfg.initial_advertise_peer_urls,
        &cfg.initial_cluster_token,
    )?;
    let peer_addrs = addrs("listen-peer-urls", &cfg.listen_peer_urls)?;
    let client_addrs = addrs("listen-client-urls", &cfg.listen_client_urls)?;
    let metrics_addrs = addrs("listen-metrics-urls", &cfg.listen_metrics_urls)?;

    let data_dir = cfg.data_dir();
    let dd = match &cfg.wal_dir {
        Some(dir) => DataDir::open(&data_dir)?.with_wal_dir(dir)?,
        None => DataDir::open(&data_dir)?,
    };
    let tls = crate::tls_setup::setup(&cfg, &data_dir)?;
    let mut initial_members = initial_members;
    let mut raft_voters: Vec<u64> = initial_members.iter().map(|m| m.id).collect();
    let mut raft_learners = Vec::new();
    let saved = dd.identity()?;
    let had_data = saved.is_some();
    let identity = match saved {
        Some(id) => id,
        None if cfg.initial_cluster_state == "existing" => {
            let dialer = tls.peer_dialer.clone();
            let (id, members) = join_existing(&cluster, &my_peer_urls, &cfg.name, dialer)?;
            // raft starts from the running cluster's configuration without this member; its
            // own addition arrives in the log it receives from the leader.
            raft_voters = members
                .iter()
                .filter(|m| !m.is_learner && m.id != id.member_id)
                .map(|m| m.id)
                .collect();
            raft_learners = members
                .iter()
                .filter(|m| m.is_learner && m.id != id.member_id)
                .map(|m| m.id)
                .collect();
            initial_members = members;
            dd.save_identity(&id)?;
            id
        }
        None => {
            let member_id = ids::member_id(&my_peer_urls, &cfg.initial_cluster_token);
            let all: Vec<u64> = initial_members.iter().map(|m| m.id).collect();
            let id = Identity {
                member_id,
                cluster_id: ids::cluster_id(&all),
            };
            dd.save_identity(&id)?;
            id
        }
    };
    tracing::info!(
        name = %cfg.name,
        data_dir = %data_dir.display(),
        member_id = %format!("{:x}", identity.member_id),
        cluster_id = %format!("{:x}", identity.cluster_id),
        "starting oxcd"
    );
    metrics::gauge!("etcd_server_version", "server_version" => api_gateway::ETCD_VERSION).set(1.0);
    metrics::gauge!("etcd_server_id", "server_id" => format!("{:x}", identity.member_id)).set(1.0);

    let engine: Arc<dyn KvEngine> =
        Arc::new(RocksEngine::open(&dd.kv_dir()).map_err(mvcc_store::MvccError::from)?);
    let store = MvccStore::open(engine.clone())?;
    let membership = Membership::open(engine.clone(), &initial_members)
        .map_err(|e| ServerError::Lease(e.to_string()))?;
    let alarms = Alarms::open(engine.clone())?;
    let lessor = open_lessor(&cfg, engine, &store)?;
    let applied = store.applied_index();
    if had_data {
        // A restored snapshot has applied nothing and no log yet; anything else that finds
        // no log here lost track of it (--wal-dir dropped or changed).
        dd.check_wal_present(&data_dir, applied > 0)?;
    }

    // Channels between the layers.
    let (raft_tx, raft_rx) = mpsc::channel(8192);
    let (committed_tx, committed_rx) = mpsc::channel(1024);
    let (applied_tx, applied_rx) = tokio_watch::channel(applied);
    // Bounded: a hub that falls behind slows applying rather than growing memory.
    let (events_tx, events_rx) = mpsc::channel(1024);
    let gauges = LayerGauges::new()
        .channel("proposals", &raft_tx)
        .channel("committed", &committed_tx)
        .channel("events", &events_tx);

    let election_tick = (cfg.election_timeout / cfg.heartbeat_interval.max(1)).max(2) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("oxcd")
        .build()?;
    let book = AddressBook::with_connector(tls.peer_dialer.clone());
    for m in membership.list() {
        book.set(m.id, m.peer_ur_ls);
    }
    if cfg.experimental_initial_corrupt_check && had_data {
        // As etcd: before raft starts and before peers or clients are served.
        let timeout = request_timeout(&cfg);
        let peers = corrupt_check::StorePeers::new(&identity, &store, &membership, &book, timeout);
        rt.block_on(corrupt_check::initial(&peers))?;
    }
    let transport = PeerTransport::new(
        identity.member_id,
        identity.cluster_id,
        book.clone(),
        rt.handle().clone(),
    );
    let raft_cfg = RaftConfig {
        id: identity.member_id,
        // Used only when the wal is new; afterwards the wal's own configuration holds.
        voters: raft_voters,
        learners: raft_learners,
        election_tick,
        heartbeat_tick: 1,
        tick_interval: Duration::from_millis(cfg.heartbeat_interval.max(1)),
        pre_vote: cfg.pre_vote,
        check_quorum: true,
        snapshot_count: cfg.snapshot_count,
        snapshot_catchup_entries: cfg.experimental_snapshot_catchup_entries,
        ..RaftConfig::default()
    };
    let raft = RaftNode::start_full(
        raft_cfg,
        &dd.wal_dir(),
        applied,
        raft_rx,
        committed_tx,
        Box::new(transport),
        Arc::new(applier::StoreStateMachine(store.clone())),
    )?;

    let leases = LeaseHandle::new(lessor);
    let applier = Applier::new(store.clone(), Some(events_tx), applied_tx)
        .with_leases(leases.clone())
        .with_membership(membership.clone())
        .with_alarms(alarms.clone(), Quota::from_flag(cfg.quota_backend_bytes))
        .with_snapshots(snapshot_fetch(
            &identity,
            book.clone(),
            membership.clone(),
            rt.handle().clone(),
        ));
    let applier_thread = std::thread::Builder::new()
        .name("applier".into())
        .spawn(move || applier.run(committed_rx))?;

    let result = rt.block_on(serve(
        &cfg,
        identity,
        store,
        raft_tx,
        applied_rx,
        events_rx,
        leases,
        metrics,
        Listeners {
            client: client_addrs,
            metrics: metrics_addrs,
            peer: peer_addrs,
            client_tls: tls.client_listener.clone(),
            peer_tls: tls.peer_listener.clone(),
        },
        membership,
        alarms,
        book,
        compaction,
        gauges,
        tls.peer_dialer.clone(),
    ));
    // Every sender to raft-node is gone once serve returns: the Ready loop ends, which closes
    // the committed channel, which ends the applier.
    rt.shutdown_timeout(Duration::from_secs(2));
    raft.join();
    let _ = applier_thread.join();
    tracing::info!("oxcd stopped");
    result
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    cfg: &Config,
    identity: Identity,
    store: MvccStore,
    raft_tx: mpsc::Sender<raft_node::RaftCommand<applier::Responder>>,
    applied_rx: tokio_watch::Receiver<u64>,
    events_rx: mpsc::Receiver<watch::Events>,
    leases: LeaseHandle,
    metrics: PrometheusHandle,
    listeners: Listeners,
    membership: Membership,
    alarms: Alarms,
    book: AddressBook,
    compaction: Option<auto_compaction::Policy>,
    gauges: LayerGauges,
    leader_dialer: oxcd_tls::Connector,
) -> Result<(), ServerError> {
    let headers = HeaderSource::new(identity.cluster_id, identity.member_id);
    let limits = Limits {
        max_request_bytes: cfg.max_request_bytes as usize,
        max_txn_ops: cfg.max_txn_ops as usize,
        request_timeout: request_timeout(cfg),
        quota: Quota::from_flag(cfg.quota_backend_bytes),
    };
    let gw = Gateway::new(
        raft_tx.clone(),
        store.clone(),
        applied_rx,
        headers.clone(),
        limits,
        membership.clone(),
        alarms,
    )
    .with_leader_dialer(leader_dialer);

    let hub = WatchHub::start(
        Arc::new(StoreHistory(store.clone())),
        events_rx,
        WatchConfig::default(),
    );

    let max_recv = cfg.max_request_bytes as usize + GRPC_OVERHEAD_BYTES;
    let grpc = tonic::service::Routes::new(
        KvServer::new(KvService::new(gw.clone()))
            .max_decoding_message_size(max_recv)
            .max_encoding_message_size(usize::MAX),
    )
    .add_service(MaintenanceServer::new(MaintenanceService::new(gw.clone())))
    .add_service(ClusterServer::new(ClusterService::new(gw.clone())))
    .add_service(WatchServer::new(WatchService::new(gw.clone(), hub.clone())))
    .add_service(LockServer::new(LockService::new(gw.clone(), hub.clone())))
    .add_service(ElectionServer::new(ElectionService::new(gw.clone(), hub)))
    .add_service(LeaseServer::new(LeaseService::new(
        gw.clone(),
        leases.clone(),
    )));

    let state = HttpState {
        gw: gw.clone(),
        metrics,
    };
    let client_app = grpc
        .into_axum_router()
        .layer(crate::grpc_metrics::GrpcMetricsLayer::new())
        .merge(http::router(state.clone()))
        .fallback(http::fallback);
    let metrics_app = http::router(state).fallback(http::fallback);

    let (stop_tx, stop_rx) = tokio_watch::channel(false);
    let mut servers = Vec::new();
    let client_tls = |https: bool| listeners.client_tls.clone().filter(|_| https);
    for &(addr, https) in &listeners.client {
        let app = client_app.clone();
        servers.push(listen(addr, app, client_tls(https), stop_rx.clone()).await?);
    }
    for &(addr, https) in &listeners.metrics {
        let app = metrics_app.clone();
        servers.push(listen(addr, app, client_tls(https), stop_rx.clone()).await?);
    }
    let listed = membership.clone();
    let peer_app = tonic::service::Routes::new(
        RaftPeerServer::new(
            RaftPeerService::new(
                identity.member_id,
                identity.cluster_id,
                raft_tx,
                Arc::new(move || listed.list()),
            )
            .with_snapshots(Arc::new(StoreSnapshots(store.clone())))
            .with_hashes(Arc::new(corrupt_check::StoreHashes(store.clone()))),
        )
        .max_decoding_message_size(usize::MAX),
    )
    // Followers forward to the leader here what only it can answer: lease keep-alives and
    // TTL queries, and promotions (whether a learner is in sync), as etcd's peer handlers do.
    .add_service(LeaseServer::new(LeaseService::new(
        gw.clone(),
        leases.clone(),
    )))
    .add_service(ClusterServer::new(ClusterService::new(gw.clone())))
    .into_axum_router()
    .fallback(http::fallback);
    for &(addr, https) in &listeners.peer {
        let tls = listeners.peer_tls.clone().filter(|_| https);
        servers.push(listen(addr, peer_app.clone(), tls, stop_rx.clone()).await?);
    }
    if !cfg.experimental_corrupt_check_time.is_zero() {
        let timeout = request_timeout(cfg);
        let peers = corrupt_check::StorePeers::new(&identity, &store, &membership, &book, timeout);
        let leader = corrupt_check::GatewayLeader {
            peers,
            gw: gw.clone(),
        };
        let every = cfg.experimental_corrupt_check_time;
        tokio::spawn(corrupt_check::run(every, leader));
    }
    tokio::spawn(mirror_addresses(membership.clone(), book));
    tokio::spawn(publish_attributes(
        gw.clone(),
        Member {
            id: identity.member_id,
            name: cfg.name.clone(),
            peer_ur_ls: Vec::new(),
            client_ur_ls: split_urls(&cfg.advertise_client_urls),
            is_learner: false,
        },
    ));
    let (tick_tx, tick_rx) = mpsc::channel(16);
    let gauges = gauges.channel("lease_ticks", &tick_tx);
    tokio::spawn(report_status(gw.clone(), store, gauges));
    tokio::spawn(gw.clone().raise_alarms());
    tokio::spawn(lease_leadership(
        gw.clone(),
        leases.clone(),
        Duration::from_millis(cfg.election_timeout),
    ));
    if let Some(policy) = compaction {
        let compactor = auto_compaction::GatewayCompactor::new(gw.clone());
        tokio::spawn(auto_compaction::run(policy, compactor));
    }
    leases.spawn_ticker(TickerConfig::default(), tick_tx);
    tokio::spawn(propose_lease_ticks(gw.clone(), tick_rx));
    tracing::info!("ready to serve client requests");

    tokio::select! {
        _ = wait_for_signal() => tracing::info!("received shutdown signal, stopping"),
        _ = removed(membership.clone(), identity.member_id) => {
            tracing::warn!("the member has been permanently removed from the cluster; stopping");
        }
    }
    let _ = stop_tx.send(true);
    for s in servers {
        // Long-lived streams (watches) must not hold shutdown hostage.
        let _ = tokio::time::timeout(Duration::from_secs(3), s).await;
    }
    Ok(())
}

/// etcd's request timeout: 5 s plus two election timeouts.
fn request_timeout(cfg: &Config) -> Duration {
    Duration::from_millis(5000 + 2 * cfg.election_timeout)
}

/// Resolves once the applied membership no longer lists this member (MemberRemove).
async fn removed(membership: Membership, me: u64) {
    let mut changes = membership.subscribe();
    let mut listed = membership.get(me).is_some();
    loop {
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
        let now = membership.get(me).is_some();
        if listed && !now {
            return;
        }
        listed = now;
    }
}

/// --initial-cluster-state existing: learn the cluster from the members already running (they
/// must have added this member with MemberAdd, under these peer URLs).
fn join_existing(
    cluster: &[(String, Vec<String>)],
    my_urls: &[String],
    my_name: &str,
    dialer: oxcd_tls::Connector,
) -> Result<(Identity, Vec<Member>), ServerError> {
    let peers: Vec<String> = cluster
        .iter()
        .filter(|(n, _)| n != my_name)
        .flat_map(|(_, u)| u.clone())
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (cluster_id, members) = rt
        .block_on(peer_transport::fetch_members(&peers, dialer))
        .map_err(|e| ServerError::Join(format!("cannot reach the existing cluster: {e}")))?;
    let mut mine = my_urls.to_vec();
    mine.sort();
    let me = members
        .iter()
        .find(|m| {
            let mut u = m.peer_ur_ls.clone();
            u.sort();
            u == mine
        })
        .ok_or_else(|| {
            ServerError::Join(format!(
                "no member with peer URLs {} in the existing cluster; add it with MemberAdd first",
                my_urls.join(",")
            ))
        })?;
    let id = Identity {
        member_id: me.id,
        cluster_id,
    };
    let members = members
        .into_iter()
        .map(|mut m| {
            if m.id == id.member_id && m.name.is_empty() {
                m.name = my_name.to_string();
            }
            m
        })
        .collect();
    Ok((id, members))
}

struct Listeners {
    client: Vec<(SocketAddr, bool)>,
    metrics: Vec<(SocketAddr, bool)>,
    peer: Vec<(SocketAddr, bool)>,
    /// For the client and metrics addresses marked https.
    client_tls: Option<Arc<ServerConfig>>,
    /// For the peer addresses marked https.
    peer_tls: Option<Arc<ServerConfig>>,
}

/// The peer transport dials whatever the applied membership says.
async fn mirror_addresses(membership: Membership, book: AddressBook) {
    let mut changes = membership.subscribe();
    loop {
        let members = membership.list();
        for m in &members {
            book.set(m.id, m.peer_ur_ls.clone());
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// Announces this member's name and client URLs through raft (once the applied records differ),
/// so MemberList on every member names them.
async fn publish_attributes(gw: Gateway, me: Member) {
    let mut wait = Duration::from_millis(100);
    loop {
        let current = gw.membership().get(me.id);
        if current.is_some_and(|m| m.name == me.name && m.client_ur_ls == me.client_ur_ls) {
            return;
        }
        let req = InternalRaftRequest {
            member_attr_set: Some(MemberAttrSetRequest {
                member_id: me.id,
                name: me.name.clone(),
                client_urls: me.client_ur_ls.clone(),
            }),
            ..Default::default()
        };
        if let Err(e) = gw.propose(req).await {
            tracing::debug!(status = %e.0, "member attributes not published yet");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(2));
        }
    }
}

async fn listen(
    addr: SocketAddr,
    app: axum::Router,
    tls: Option<Arc<ServerConfig>>,
    mut stop: tokio_watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, ServerError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Listen { addr, source })?;
    tracing::info!(%addr, tls = tls.is_some(), "listening");
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let served = match tls {
        // etcdctl sends an endpoint given as http(s)://host:port whole as the :authority.
        Some(tls) => {
            let listener = oxcd_tls::TlsListener::new(listener, tls)
                .map_err(|source| ServerError::Listen { addr, source })?;
            let listener = crate::h2_authority::Lenient(listener);
            tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await
            })
        }
        None => {
            // Without TCP_NODELAY, small gRPC responses wait on delayed ACKs (~40 ms each).
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "TCP_NODELAY not set");
                }
            });
            let listener = crate::h2_authority::Lenient(listener);
            tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await
            })
        }
    };
    Ok(tokio::spawn(async move {
        match served.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(%addr, error = %e, "server error"),
            Err(e) => tracing::error!(%addr, error = %e, "server task failed"),
        }
    }))
}

/// A member behind the leader's compacted log fetches the leader's state over the peer
/// transport (from the applier's thread, which waits for it), storing records as they
/// arrive. If the leader cannot serve it (it died or stepped down meanwhile), any other
/// member that applied at least as far can.
fn snapshot_fetch(
    identity: &Identity,
    book: AddressBook,
    membership: Membership,
    rt: tokio::runtime::Handle,
) -> applier::SnapshotFetch {
    struct PeerSnapshots {
        me: u64,
        cluster_id: u64,
        book: AddressBook,
        membership: Membership,
        rt: tokio::runtime::Handle,
    }

    impl applier::SnapshotFetcher for PeerSnapshots {
        fn candidates(&mut self, from: u64) -> Vec<u64> {
            let others = self
                .membership
                .list()
                .into_iter()
                .map(|m| m.id)
                .filter(|id| *id != self.me && *id != from);
            std::iter::once(from).chain(others).collect()
        }

        fn fetch(
            &mut self,
            index: u64,
            member: u64,
            sink: &mut applier::SnapshotSink<'_>,
        ) -> Result<u64, String> {
            let header = oxcd_proto::oxcdpeerpb::PeerHeader {
                cluster_id: self.cluster_id,
                from: self.me,
                to: member,
            };
            self.rt
                .block_on(peer_transport::fetch_snapshot(
                    &self.book, header, index, sink,
                ))
                .map_err(|e| e.to_string())
        }
    }

    Box::new(PeerSnapshots {
        me: identity.member_id,
        cluster_id: identity.cluster_id,
        book,
        membership,
        rt,
    })
}

/// What this member serves to members that need a snapshot.
struct StoreSnapshots(MvccStore);

impl peer_transport::SnapshotSource for StoreSnapshots {
    fn applied(&self) -> u64 {
        self.0.applied_index()
    }

    fn export(&self, f: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), String> {
        self.0.export(f).map_err(|e| e.to_string())
    }
}

/// Lease records from the engine, with every live key that names a lease attached to it.
fn open_lessor(
    cfg: &Config,
    engine: Arc<dyn KvEngine>,
    store: &MvccStore,
) -> Result<Lessor, ServerError> {
    let lease_cfg = LessorConfig::for_timing(
        Duration::from_millis(cfg.heartbeat_interval.max(1)),
        Duration::from_millis(cfg.election_timeout.max(1)),
    );
    let mut lessor = Lessor::new(
        lease_cfg,
        Arc::new(SystemClock),
        Box::new(EngineLeaseStore::applied_with(engine, store.clone())),
    )
    .map_err(|e| ServerError::Lease(e.to_string()))?;
    for (lease, key) in store.leased_keys()? {
        if lessor.attach(lease, &key).is_err() {
            tracing::warn!(lease = %format!("{lease:x}"), "key names a lease that no longer exists");
        }
    }
    Ok(lessor)
}

/// Only the leader tracks lease deadlines; follow raft's leadership.
async fn lease_leadership(gw: Gateway, leases: LeaseHandle, extend: Duration) {
    let mut primary = false;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let Ok(status) = gw.raft_status().await else {
            return;
        };
        if status.is_leader != primary {
            if status.is_leader {
                leases.promote(extend);
            } else {
                leases.demote();
            }
            primary = status.is_leader;
        }
    }
}

/// Expired leases and due checkpoints become raft proposals, so every member applies them.
async fn propose_lease_ticks(gw: Gateway, mut ticks: mpsc::Receiver<LeaseTick>) {
    while let Some(tick) = ticks.recv().await {
        match tick {
            LeaseTick::Revoke(ids) => {
                for id in ids {
                    if let Err(e) = propose_revoke(&gw, id).await {
                        tracing::debug!(lease = %format!("{id:x}"), status = %e.0, "expired lease not revoked yet");
                    }
                }
            }
            LeaseTick::Checkpoint(list) => {
                let req = InternalRaftRequest {
                    lease_checkpoint: Some(LeaseCheckpointRequest {
                        checkpoints: list
                            .into_iter()
                            .map(|(id, remaining_ttl)| LeaseCheckpoint { id, remaining_ttl })
                            .collect(),
                    }),
                    ..Default::default()
                };
                if let Err(e) = gw.propose(req).await {
                    tracing::debug!(status = %e.0, "lease checkpoint not proposed");
                }
            }
        }
    }
}

/// Keeps header terms and the gauges dashboards read up to date.
async fn report_status(gw: Gateway, store: MvccStore, gauges: LayerGauges) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let Ok(status) = gw.raft_status().await else {
            return;
        };
        gw.headers().set_term(status.term);
        gauges.sample(status.commit_index, store.applied_index());
        metrics::gauge!("etcd_mvcc_db_total_size_in_bytes").set(store.db_size() as f64);
        metrics::gauge!("etcd_mvcc_db_total_size_in_use_in_bytes")
            .set(store.db_size_in_use() as f64);
        metrics::gauge!("etcd_debugging_mvcc_keys_total").set(store.keys_total() as f64);
        metrics::gauge!("etcd_debugging_mvcc_current_revision")
            .set(store.current_revision() as f64);
        metrics::gauge!("etcd_debugging_mvcc_compact_revision")
            .set(store.compact_revision() as f64);
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The addresses to listen on, each with whether it serves TLS.
fn addrs(flag: &'static str, list: &str) -> Result<Vec<(SocketAddr, bool)>, ConfigError> {
    let mut out = Vec::new();
    for url in split_urls(list) {
        for a in parse_url(flag, &url)? {
            if !out.iter().any(|(seen, _)| *seen == a) {
                out.push((a, is_https(&url)));
            }
        }
    }
    Ok(out)
}

fn install_metrics() -> Result<PrometheusHandle, ServerError> {
    // etcd's disk histograms: 1ms doubling to ~8s.
    let disk: Vec<f64> = (0..14).map(|i| 0.001 * f64::powi(2.0, i)).collect();
    // etcd's peer round-trip histogram: 0.1ms doubling to ~3.3s.
    let rtt: Vec<f64> = (0..16).map(|i| 0.0001 * f64::powi(2.0, i)).collect();
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("duration_seconds".into()), &disk)
        .map_err(|e| ServerError::Metrics(e.to_string()))?
        .set_buckets_for_metric(
            Matcher::Full("etcd_network_peer_round_trip_time_seconds".into()),
            &rtt,
        )
        .map_err(|e| ServerError::Metrics(e.to_string()))?
        .install_recorder()
        .map_err(|e| ServerError::Metrics(e.to_string()))
}

fn init_logging(cfg: &Config) {
    use tracing_subscriber::{fmt, EnvFilter};
    let level = match cfg.log_level.as_str() {
        "panic" | "fatal" => "error",
        l => l,
    };
    let filter = EnvFilter::try_from_env("OXCD_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if cfg.logger == "zap" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
