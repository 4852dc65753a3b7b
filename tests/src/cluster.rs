//! A multi-member cluster of real server processes on loopback, for fault tests: start N
//! members with etcd's bootstrap flags, kill or stop any of them, restart them on their data.

use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::{free_port, ClusterFlags, ConfigVia, Server, ServerSpec, START_TIMEOUT};

pub struct TestCluster {
    pub members: Vec<Server>,
    _data: TempDir,
}

impl TestCluster {
    /// Starts `n` members of the server under test and waits until each is healthy (has a
    /// leader). `extra_args` go to every member.
    pub fn start(n: usize, extra_args: &[&str]) -> TestCluster {
        Self::launch(n, extra_args, false).0
    }

    /// Starts the members; with `proxied`, each listens for peers behind a [`FaultProxy`] on
    /// its advertised peer port.
    fn launch(n: usize, extra_args: &[&str], proxied: bool) -> (TestCluster, Vec<FaultProxy>) {
        let data = tempfile::Builder::new()
            .prefix("oxcd-test-cluster")
            .tempdir()
            .expect("temp dir");
        // (client, advertised peer, listened peer) ports.
        let ports: Vec<(u16, u16, u16)> = (0..n)
            .map(|_| {
                let peer = free_port();
                (free_port(), peer, if proxied { free_port() } else { peer })
            })
            .collect();
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer, _))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let flags = ClusterFlags {
            initial_cluster,
            token: format!("oxcd-test-cluster-{}", ports[0].1),
            existing: false,
        };
        let proxies = if proxied {
            ports
                .iter()
                .map(|(_, peer, real)| FaultProxy::start(*peer, *real))
                .collect()
        } else {
            Vec::new()
        };
        let members: Vec<Server> = ports
            .iter()
            .enumerate()
            .map(|(i, (client, peer, real))| {
                let spec = ServerSpec {
                    bin: crate::server_bin(),
                    name: format!("m{i}"),
                    data_dir: data.path().join(format!("m{i}")),
                    client_port: *client,
                    peer_port: *peer,
                    extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
                    via: ConfigVia::Flags,
                    cluster: Some(flags.clone()),
                    peer_listen_port: proxied.then_some(*real),
                };
                Server::spawn(spec, None)
            })
            .collect();
        let mut c = TestCluster {
            members,
            _data: data,
        };
        for m in &mut c.members {
            m.wait_healthy(START_TIMEOUT);
        }
        (c, proxies)
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Server::endpoint).collect()
    }

    /// Endpoints of the members that are running now.
    pub fn live_endpoints(&mut self) -> Vec<String> {
        self.members
            .iter_mut()
            .filter_map(|m| m.try_wait().is_none().then(|| m.endpoint()))
            .collect()
    }

    /// Starts a member that joins the running cluster (`--initial-cluster-state existing`) as
    /// `name` on `peer_port`, after it was added with MemberAdd. `initial_cluster` lists the
    /// members it should contact, itself included. Does not wait for it.
    pub fn join(&mut self, name: &str, peer_port: u16, initial_cluster: String) -> usize {
        let token = self.members[0]
            .spec()
            .cluster
            .as_ref()
            .expect("a multi-member cluster")
            .token
            .clone();
        let spec = ServerSpec {
            bin: crate::server_bin(),
            name: name.to_string(),
            data_dir: self._data.path().join(name),
            client_port: free_port(),
            peer_port,
            extra_args: Vec::new(),
            via: ConfigVia::Flags,
            cluster: Some(ClusterFlags {
                initial_cluster,
                token,
                existing: true,
            }),
            peer_listen_port: None,
        };
        self.members.push(Server::spawn(spec, None));
        self.members.len() - 1
    }

    /// Restarts member `i` (after it exited) and waits until it is healthy.
    pub fn restart(&mut self, i: usize) {
        self.members[i].restart();
    }

    /// Waits until `f` holds, polling; panics with `what` after `timeout`.
    pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A TCP proxy in front of one member's peer port. Blocking it cuts every connection into
/// that member and refuses new ones: the member hears nothing from its peers (a partition of
/// its inbound side; what it sends still arrives, so a partitioned member is only deaf).
pub struct FaultProxy {
    blocked: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    /// Listens on `listen` and forwards to `target` (both loopback ports).
    pub fn start(listen: u16, target: u16) -> FaultProxy {
        let listener = TcpListener::bind(("127.0.0.1", listen)).expect("bind proxy port");
        listener.set_nonblocking(true).expect("nonblocking");
        let blocked = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::<TcpStream>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, c, st) = (blocked.clone(), conns.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let (inbound, _) = match listener.accept() {
                    Ok(x) => x,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                if b.load(Ordering::Relaxed) {
                    drop(inbound);
                    continue;
                }
                let _ = inbound.set_nonblocking(false);
                let Ok(outbound) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let mut list = c.lock().unwrap();
                for s in [&inbound, &outbound] {
                    if let Ok(s) = s.try_clone() {
                        list.push(s);
                    }
                }
                drop(list);
                pipe(&inbound, &outbound);
                pipe(&outbound, &inbound);
            }
        });
        FaultProxy {
            blocked,
            conns,
            stop,
        }
    }

    pub fn block(&self) {
        self.blocked.store(true, Ordering::Relaxed);
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub fn heal(&self) {
        self.blocked.store(false, Ordering::Relaxed);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.block();
    }
}

fn pipe(from: &TcpStream, to: &TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Both);
    });
}

impl TestCluster {
    /// Like [`TestCluster::start`], with a [`FaultProxy`] on every member's advertised peer
    /// port (members listen for peers on another port behind it).
    pub fn start_with_proxies(n: usize, extra_args: &[&str]) -> (TestCluster, Vec<FaultProxy>) {
        Self::launch(n, extra_args, true)
    }
}
