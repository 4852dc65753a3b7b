//! Multi-member clusters of real server processes on loopback: replication, forwarding from
//! followers, a leader killed with SIGKILL while clients write, convergence of every member, and
//! a linearizability check of a history recorded while members are killed and restarted.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};
use oxcd_tests::cluster::TestCluster;
use oxcd_tests::linearizability::{CheckResult, Input, Output, Recorder};

async fn connect(endpoint: &str, timeout: Duration) -> Option<Client> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(timeout);
    tokio::time::timeout(
        Duration::from_secs(3),
        Client::connect([endpoint.to_string()], Some(opts)),
    )
    .await
    .ok()?
    .ok()
}

/// (member id, leader id) as member `endpoint` reports them.
async fn status(endpoint: &str) -> Option<(u64, u64, i64)> {
    let mut c = connect(endpoint, Duration::from_secs(2)).await?;
    let s = c.status().await.ok()?;
    let h = s.header()?;
    Some((h.member_id(), s.leader(), h.revision()))
}

/// Index of the member every live member names as leader.
async fn leader_index(c: &mut TestCluster, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let mut ids = Vec::new();
        let mut leaders = BTreeSet::new();
        for ep in c.endpoints() {
            match status(&ep).await {
                Some((id, leader, _)) => {
                    ids.push(Some(id));
                    leaders.insert(leader);
                }
                None => ids.push(None),
            }
        }
        if let [leader] = leaders.iter().copied().collect::<Vec<_>>()[..] {
            if leader != 0 {
                if let Some(i) = ids.iter().position(|id| *id == Some(leader)) {
                    return i;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no agreed leader after {timeout:?}: ids {ids:?}, leaders {leaders:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every member holds the same data: same revision and the same HashKV at it, and the same
/// keys under `prefix`. Waits for laggards.
async fn assert_converged(c: &mut TestCluster, prefix: &str, timeout: Duration) -> Vec<String> {
    converged_on(&c.endpoints(), prefix, timeout).await
}

async fn converged_on(eps: &[String], prefix: &str, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut views = Vec::new();
        for ep in eps {
            let Some(mut cl) = connect(ep, Duration::from_secs(3)).await else {
                views.push(None);
                continue;
            };
            let rev = cl
                .get(
                    prefix,
                    Some(GetOptions::new().with_prefix().with_serializable()),
                )
                .await
                .ok();
            let hash = match &rev {
                Some(r) => {
                    let at = r.header().map(|h| h.revision()).unwrap_or(0);
                    cl.hash_kv(at).await.ok().map(|h| (at, h.hash()))
                }
                None => None,
            };
            let keys: Option<Vec<String>> = rev.map(|r| {
                r.kvs()
                    .iter()
                    .map(|kv| kv.key_str().unwrap().to_string())
                    .collect()
            });
            views.push(hash.zip(keys));
        }
        if views.iter().all(Option::is_some) && views.windows(2).all(|w| w[0] == w[1]) {
            return views[0].clone().unwrap().1;
        }
        if Instant::now() > deadline {
            let summary: Vec<_> = views
                .iter()
                .map(|v| {
                    v.as_ref()
                        .map(|((rev, hash), keys)| (rev, hash, keys.len()))
                })
                .collect();
            panic!(
                "members did not converge after {timeout:?}: (revision, hash, keys) {summary:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_member_serves_reads_writes_and_membership() {
    let mut c = TestCluster::start(3, &[]);
    let eps = c.endpoints();
    // A write through each member (followers forward), read back linearizably on every member.
    for (i, ep) in eps.iter().enumerate() {
        let mut cl = connect(ep, Duration::from_secs(5)).await.unwrap();
        cl.put(format!("via/{i}"), format!("m{i}"), None)
            .await
            .unwrap_or_else(|e| panic!("put through member {i}: {e}"));
        for (j, other) in eps.iter().enumerate() {
            let mut o = connect(other, Duration::from_secs(5)).await.unwrap();
            let got = o.get(format!("via/{i}"), None).await.unwrap();
            assert_eq!(
                got.kvs()
                    .first()
                    .map(|kv| kv.value_str().unwrap().to_string()),
                Some(format!("m{i}")),
                "member {j} must see the write made through member {i}"
            );
        }
    }
    // Every member lists every member, with names and client URLs once they are published.
    let mut cl = connect(&eps[1], Duration::from_secs(5)).await.unwrap();
    TestCluster::wait_for(
        "published member attributes",
        Duration::from_secs(10),
        || {
            let list = futures_lite_block(cl.member_list());
            list.is_ok_and(|l| {
                l.members().len() == 3
                    && l.members()
                        .iter()
                        .all(|m| !m.name().is_empty() && !m.client_urls().is_empty())
            })
        },
    );
    let mut names: Vec<String> = cl
        .member_list()
        .await
        .unwrap()
        .members()
        .iter()
        .map(|m| m.name().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["m0", "m1", "m2"]);
    assert_converged(&mut c, "via/", Duration::from_secs(10)).await;

    // MoveLeader on the leader hands leadership to the member named; a follower refuses.
    let leader = leader_index(&mut c, Duration::from_secs(10)).await;
    let target = (leader + 1) % eps.len();
    let target_id = status(&eps[target]).await.unwrap().0;
    let mut follower = connect(&eps[target], Duration::from_secs(5)).await.unwrap();
    let refused = follower.move_leader(target_id).await;
    assert!(
        format!("{:?}", refused.unwrap_err()).contains("not leader"),
        "MoveLeader on a follower"
    );
    let mut l = connect(&eps[leader], Duration::from_secs(10))
        .await
        .unwrap();
    l.move_leader(target_id).await.expect("move leader");
    assert_eq!(leader_index(&mut c, Duration::from_secs(10)).await, target);
    let st = follower.status().await.unwrap();
    assert_eq!(st.leader(), target_id);
    assert!(st.raft_applied_index() > 0 && st.raft_index() >= st.raft_applied_index());
}

/// Runs a future to completion from sync code inside the test's runtime.
fn futures_lite_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

/// Watches `prefix` on one member from revision 1, resuming from the last revision + 1
/// whenever the stream breaks (its member killed), until it has seen revision `until` (set
/// later; 0 = not yet). Returns (key, mod revision) per event, in arrival order.
fn spawn_member_watcher(
    ep: String,
    prefix: &'static str,
    until: Arc<std::sync::atomic::AtomicI64>,
) -> tokio::task::JoinHandle<Vec<(String, i64)>> {
    use etcd_client::WatchOptions;
    tokio::spawn(async move {
        let mut seen: Vec<(String, i64)> = Vec::new();
        let mut progress = 0i64;
        loop {
            let target = until.load(Ordering::Relaxed);
            if target > 0 && progress >= target {
                return seen;
            }
            let Some(mut cl) = connect(&ep, Duration::from_secs(3)).await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let opts = WatchOptions::new()
                .with_prefix()
                .with_start_revision(progress + 1)
                .with_progress_notify();
            let Ok(mut stream) = cl.watch(prefix, Some(opts)).await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            loop {
                let target = until.load(Ordering::Relaxed);
                if target > 0 && progress >= target {
                    return seen;
                }
                match tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
                    Ok(Ok(Some(r))) if r.canceled() => break,
                    Ok(Ok(Some(r))) => {
                        for e in r.events() {
                            let kv = e.kv().unwrap();
                            seen.push((kv.key_str().unwrap().to_string(), kv.mod_revision()));
                            progress = progress.max(kv.mod_revision());
                        }
                        // A progress notification says everything up to its revision was sent.
                        if r.events().is_empty() && !r.created() {
                            if let Some(h) = r.header() {
                                progress = progress.max(h.revision());
                            }
                        }
                    }
                    Ok(_) => break,
                    Err(_) => {}
                }
            }
            // The stream ended (its member died or canceled it): retry, but not in a hot loop.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// Small enough that the leader compacts its log during the test, so a killed member that
/// restarts may come back through a snapshot rather than the log.
const FREQUENT_SNAPSHOTS: &[&str] = &[
    "--snapshot-count=300",
    "--experimental-snapshot-catchup-entries=100",
];

async fn leader_kill_while_writing(n: usize) {
    let mut c = TestCluster::start(n, FREQUENT_SNAPSHOTS);
    let eps = c.endpoints();
    let until = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let watchers: Vec<_> = eps
        .iter()
        .map(|ep| spawn_member_watcher(ep.clone(), "w/", until.clone()))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<(String, Instant)>::new()));
    let mut writers = Vec::new();
    for w in 0..4usize {
        let (eps, stop, acked) = (eps.clone(), stop.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            let mut member = w % eps.len();
            let mut client = None;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if client.is_none() {
                    client = connect(&eps[member], Duration::from_secs(3)).await;
                    if client.is_none() {
                        member = (member + 1) % eps.len();
                        continue;
                    }
                }
                let key = format!("w/{w}/{i:06}");
                match client.as_mut().unwrap().put(key.clone(), "v", None).await {
                    Ok(_) => {
                        acked.lock().unwrap().push((key, Instant::now()));
                        i += 1;
                    }
                    Err(_) => {
                        // Unknown outcome; the next attempt uses a new key and maybe another member.
                        i += 1;
                        client = None;
                        member = (member + 1) % eps.len();
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let old = leader_index(&mut c, Duration::from_secs(10)).await;
    let killed_at = Instant::now();
    c.members[old].kill9();
    let new = leader_index(&mut c, Duration::from_secs(10)).await;
    let elected_after = killed_at.elapsed();
    assert_ne!(new, old);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let after_kill = acked.iter().filter(|(_, t)| *t > killed_at).count();
    assert!(
        after_kill > 0,
        "no write was acknowledged after the leader was killed"
    );
    c.restart(old);
    let keys = assert_converged(&mut c, "w/", Duration::from_secs(30)).await;
    let present: BTreeSet<&str> = keys.iter().map(String::as_str).collect();
    let lost: Vec<&String> = acked
        .iter()
        .map(|(k, _)| k)
        .filter(|k| !present.contains(k.as_str()))
        .collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");

    // Every member's watcher, the one whose member was killed and restarted included (it
    // resumed from its last revision + 1), saw the same events: ordered, no gaps, no repeats.
    let final_rev = status(&eps[new]).await.unwrap().2;
    until.store(final_rev, Ordering::Relaxed);
    let mut sequences = Vec::new();
    for w in watchers {
        sequences.push(
            tokio::time::timeout(Duration::from_secs(30), w)
                .await
                .expect("a member's watcher did not reach the final revision")
                .unwrap(),
        );
    }
    for (i, seq) in sequences.iter().enumerate() {
        assert!(
            seq.windows(2).all(|p| p[0].1 < p[1].1),
            "member {i}: events out of order or repeated"
        );
        assert_eq!(
            seq, &sequences[0],
            "member {i} saw other events than member 0"
        );
    }
    let watched: BTreeSet<&str> = sequences[0].iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        watched, present,
        "watch events differ from the store's keys"
    );
    eprintln!(
        "{n} members: {} writes acknowledged ({after_kill} after the kill), new leader after {elected_after:?}, all members converged, {} watch events identical on every member",
        acked.len(),
        sequences[0].len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_lose_no_acknowledged_write_when_the_leader_is_killed() {
    leader_kill_while_writing(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_members_lose_no_acknowledged_write_when_the_leader_is_killed() {
    leader_kill_while_writing(5).await;
}

/// Concurrent put / get / compare-and-swap on a few keys while a nemesis kills (SIGKILL) and
/// restarts members, the leader among them; the recorded history must be linearizable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_under_member_kills_is_linearizable() {
    let mut c = TestCluster::start(3, FREQUENT_SNAPSHOTS);
    let eps = c.endpoints();
    let rec = Recorder::new();
    let stop = Arc::new(AtomicBool::new(false));
    let keys = ["a", "b", "c"];
    let mut clients = Vec::new();
    for id in 0..4usize {
        let (eps, stop, rec) = (eps.clone(), stop.clone(), rec.clone());
        clients.push(tokio::spawn(async move {
            let mut member = id % eps.len();
            let mut client: Option<Client> = None;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if client.is_none() {
                    client = connect(&eps[member], Duration::from_secs(2)).await;
                    if client.is_none() {
                        member = (member + 1) % eps.len();
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
                let cl = client.as_mut().unwrap();
                n += 1;
                let key = keys[(n as usize * 7 + id) % keys.len()];
                let value = format!("c{id}-{n}");
                let ok = match n % 3 {
                    0 => {
                        let t = rec.invoke(id, key, Input::Put(value.clone()));
                        match cl.put(key, value, None).await {
                            Ok(_) => {
                                rec.complete(t, Output::PutOk);
                                true
                            }
                            Err(_) => {
                                rec.unknown(t);
                                false
                            }
                        }
                    }
                    1 => {
                        let t = rec.invoke(id, key, Input::Get);
                        match cl.get(key, None).await {
                            Ok(r) => {
                                let v = r
                                    .kvs()
                                    .first()
                                    .map(|kv| kv.value_str().unwrap().to_string());
                                rec.complete(t, Output::Get(v));
                                true
                            }
                            Err(_) => {
                                // A read that failed changed nothing.
                                rec.fail(t);
                                false
                            }
                        }
                    }
                    _ => {
                        // CAS from what this client last saw is unknown here: read first.
                        let seen = cl
                            .get(key, Some(GetOptions::new().with_serializable()))
                            .await
                            .ok()
                            .and_then(|r| {
                                r.kvs()
                                    .first()
                                    .map(|kv| kv.value_str().unwrap().to_string())
                            });
                        let cmp = match &seen {
                            Some(v) => Compare::value(key, CompareOp::Equal, v.clone()),
                            None => Compare::create_revision(key, CompareOp::Equal, 0),
                        };
                        let t = rec.invoke(
                            id,
                            key,
                            Input::Cas {
                                expected: seen.clone(),
                                new: value.clone(),
                            },
                        );
                        let txn = Txn::new()
                            .when([cmp])
                            .and_then([TxnOp::put(key, value, None)]);
                        match cl.txn(txn).await {
                            Ok(r) => {
                                rec.complete(t, Output::Cas(r.succeeded()));
                                true
                            }
                            Err(_) => {
                                rec.unknown(t);
                                false
                            }
                        }
                    }
                };
                if !ok {
                    client = None;
                    member = (member + 1) % eps.len();
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
            }
        }));
    }
    // The nemesis: kill the leader, then a follower, restarting each after a pause.
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let victim = if round % 2 == 0 {
            leader_index(&mut c, Duration::from_secs(15)).await
        } else {
            (leader_index(&mut c, Duration::from_secs(15)).await + 1) % eps.len()
        };
        c.members[victim].kill9();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        c.restart(victim);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for t in clients {
        t.await.unwrap();
    }
    let history = rec.history();
    let ok = history.ops().iter().filter(|op| op.ret().is_some()).count();
    assert!(ok > 50, "too few completed operations to judge: {ok}");
    let result = history.check();
    eprintln!(
        "{} operations ({ok} completed) checked: {result}",
        history.len()
    );
    assert!(
        matches!(result, CheckResult::Linearizable),
        "history is not linearizable: {result}"
    );
}

/// A lease kept alive through a follower holds its key; it outlives a SIGKILL of the leader
/// (the new leader takes over its deadline) and, once no longer kept alive, expires exactly
/// once: one DELETE event for its key, on every member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_outlives_a_leader_kill_and_expires_once() {
    use etcd_client::{EventType, PutOptions, WatchOptions};
    let mut c = TestCluster::start(3, &[]);
    let eps = c.endpoints();
    let leader = leader_index(&mut c, Duration::from_secs(10)).await;
    let follower = (leader + 1) % eps.len();
    let survivor = (leader + 2) % eps.len();
    let mut f = connect(&eps[follower], Duration::from_secs(5))
        .await
        .unwrap();
    // A follower forwards to the client URL the leader published.
    TestCluster::wait_for(
        "published member attributes",
        Duration::from_secs(10),
        || {
            futures_lite_block(f.member_list())
                .is_ok_and(|l| l.members().iter().all(|m| !m.client_urls().is_empty()))
        },
    );
    let lease = f.lease_grant(3, None).await.unwrap().id();
    let put = f
        .put("leased", "x", Some(PutOptions::new().with_lease(lease)))
        .await
        .unwrap();
    let from = put.header().unwrap().revision() + 1;

    // Keep-alives through the follower for longer than the TTL.
    let (mut keeper, mut acks) = f.lease_keep_alive(lease).await.unwrap();
    for _ in 0..5 {
        keeper.keep_alive().await.unwrap();
        let ack = tokio::time::timeout(Duration::from_secs(5), acks.message())
            .await
            .expect("keep-alive through a follower not answered")
            .unwrap()
            .unwrap();
        assert_eq!(
            ack.ttl(),
            3,
            "a renewal through a follower restores the full TTL"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let ttl = f.lease_time_to_live(lease, None).await.unwrap().ttl();
    assert!(
        (1..=3).contains(&ttl),
        "remaining TTL through a follower: {ttl}"
    );
    drop(keeper);
    drop(acks);

    c.members[leader].kill9();
    let mut s = connect(&eps[survivor], Duration::from_secs(5))
        .await
        .unwrap();
    let mut events = s
        .watch(
            "leased",
            Some(WatchOptions::new().with_start_revision(from)),
        )
        .await
        .unwrap();
    // The key is gone within TTL + election + the new leader's extension, not before the kill.
    let mut deletes = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while deletes.is_empty() && Instant::now() < deadline {
        if let Ok(Some(Ok(r))) = tokio::time::timeout(Duration::from_millis(500), events.message())
            .await
            .map(|m| m.transpose())
        {
            for e in r.events() {
                if e.event_type() == EventType::Delete {
                    deletes.push(e.kv().unwrap().mod_revision());
                }
            }
        }
    }
    assert_eq!(
        deletes.len(),
        1,
        "the expired lease's key must be deleted once"
    );
    c.restart(leader);
    // Every member, the restarted one included, has exactly that one deletion in its history.
    for ep in c.endpoints() {
        let mut cl = connect(&ep, Duration::from_secs(5)).await.unwrap();
        let mut ev = cl
            .watch(
                "leased",
                Some(WatchOptions::new().with_start_revision(from)),
            )
            .await
            .unwrap();
        // Past the `created` response to the first one carrying the replayed history.
        let r = loop {
            let r = tokio::time::timeout(Duration::from_secs(10), ev.message())
                .await
                .expect("history replay")
                .unwrap()
                .unwrap();
            if !r.events().is_empty() {
                break r;
            }
        };
        let dels: Vec<i64> = r
            .events()
            .iter()
            .filter(|e| e.event_type() == EventType::Delete)
            .map(|e| e.kv().unwrap().mod_revision())
            .collect();
        assert_eq!(dels, deletes, "member {ep}");
        let ttl = cl.lease_time_to_live(lease, None).await.unwrap().ttl();
        assert_eq!(ttl, -1, "member {ep}: the lease is gone");
    }
}

/// The leader cut off from its peers (a proxy in front of its peer port drops everything sent
/// to it) steps down: it accepts no write and serves no linearizable read, while the majority
/// elects a new leader and goes on; after healing, every member converges and the write tried
/// on the minority is nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_minority_takes_no_writes_and_serves_no_linearizable_reads() {
    let (mut c, proxies) = TestCluster::start_with_proxies(3, &[]);
    let eps = c.endpoints();
    let mut any = connect(&eps[0], Duration::from_secs(5)).await.unwrap();
    any.put("p/before", "1", None).await.unwrap();
    let old = leader_index(&mut c, Duration::from_secs(10)).await;
    let old_id = status(&eps[old]).await.unwrap().0;
    proxies[old].block();

    // The majority elects another leader.
    let majority: Vec<String> = (0..eps.len())
        .filter(|i| *i != old)
        .map(|i| eps[i].clone())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut leaders = BTreeSet::new();
        for ep in &majority {
            leaders.insert(status(ep).await.map(|s| s.1).unwrap_or(0));
        }
        let l: Vec<u64> = leaders.into_iter().collect();
        if l.len() == 1 && l[0] != 0 && l[0] != old_id {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "majority elected no new leader: {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Past check-quorum's election timeout, the cut-off member knows it leads nobody.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut minority = connect(&eps[old], Duration::from_secs(3)).await.unwrap();
    let put = minority.put("p/minority", "x", None).await;
    assert!(put.is_err(), "the minority accepted a write: {put:?}");
    let read = minority.get("p/before", None).await;
    assert!(
        read.is_err(),
        "the minority served a linearizable read: {read:?}"
    );
    // A serializable read is local by definition: it still answers, from possibly stale data.
    let stale = minority
        .get("p/before", Some(GetOptions::new().with_serializable()))
        .await
        .expect("serializable read on the minority");
    assert_eq!(stale.kvs().len(), 1);

    let mut maj = connect(&majority[0], Duration::from_secs(5)).await.unwrap();
    maj.put("p/during", "2", None)
        .await
        .expect("the majority takes writes");

    proxies[old].heal();
    let keys = assert_converged(&mut c, "p/", Duration::from_secs(30)).await;
    assert_eq!(keys, ["p/before", "p/during"]);
}

/// Membership changes while a client writes: a learner is added and joins with
/// `--initial-cluster-state existing`, is promoted once in sync, and another member is removed
/// (and stops); every acknowledged write is on every remaining member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_added_promoted_and_removed_while_clients_write() {
    use etcd_client::MemberAddOptions;
    let mut c = TestCluster::start(3, FREQUENT_SNAPSHOTS);
    let eps = c.endpoints();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let writer = {
        let (ep, stop, acked) = (eps[0].clone(), stop.clone(), acked.clone());
        tokio::spawn(async move {
            let mut cl = connect(&ep, Duration::from_secs(5)).await.unwrap();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("mw/{i:06}");
                if cl.put(key.clone(), "v", None).await.is_ok() {
                    acked.lock().unwrap().push(key);
                }
                i += 1;
            }
        })
    };
    let mut admin = connect(&eps[1], Duration::from_secs(10)).await.unwrap();
    TestCluster::wait_for(
        "published member attributes",
        Duration::from_secs(10),
        || {
            futures_lite_block(admin.member_list())
                .is_ok_and(|l| l.members().iter().all(|m| !m.client_urls().is_empty()))
        },
    );

    // Add a learner, then start it.
    let peer_port = oxcd_tests::free_port();
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let added = admin
        .member_add(
            [peer_url.clone()],
            Some(MemberAddOptions::new().with_is_learner()),
        )
        .await
        .expect("member add (learner)");
    let new_id = added.member().unwrap().id();
    assert!(added.member().unwrap().is_learner());
    assert_eq!(added.member_list().len(), 4);
    // A second learner is refused while one exists.
    let second = admin
        .member_add(
            [format!("http://127.0.0.1:{}", oxcd_tests::free_port())],
            Some(MemberAddOptions::new().with_is_learner()),
        )
        .await;
    let err = format!("{:?}", second.expect_err("a second learner"));
    assert!(err.contains("too many learner members"), "{err}");
    // A peer URL already in use is refused.
    let dup = admin.member_add([peer_url.clone()], None).await;
    assert!(format!("{:?}", dup.unwrap_err()).contains("Peer URLs already exists"));

    let mut initial: Vec<String> = (0..3)
        .map(|i| format!("m{i}={}", c.members[i].spec().peer_url()))
        .collect();
    initial.push(format!("m3={peer_url}"));
    let joined = c.join("m3", peer_port, initial.join(","));
    c.members[joined].wait_healthy(Duration::from_secs(30));

    // Promote once in sync (the leader refuses before that with etcd's text).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match admin.member_promote(new_id).await {
            Ok(r) => {
                assert!(
                    r.members().iter().all(|m| !m.is_learner()),
                    "after promotion: {:?}",
                    r.members()
                );
                break;
            }
            Err(e) => {
                let text = format!("{e:?}");
                assert!(text.contains("in sync with leader"), "{text}");
                assert!(Instant::now() < deadline, "learner never in sync");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    // Promoting a voter is refused.
    let again = admin.member_promote(new_id).await;
    assert!(format!("{:?}", again.unwrap_err()).contains("can only promote a learner member"));

    // Remove m2; it stops by itself.
    let m2_id = status(&eps[2]).await.unwrap().0;
    let after = admin.member_remove(m2_id).await.expect("member remove");
    assert_eq!(after.members().len(), 3);
    assert!(
        c.members[2].wait_exit(Duration::from_secs(15)).is_some(),
        "a removed member must stop"
    );
    let missing = admin.member_remove(m2_id).await;
    assert!(format!("{:?}", missing.unwrap_err()).contains("member not found"));

    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let live = vec![eps[0].clone(), eps[1].clone(), c.members[joined].endpoint()];
    let keys = converged_on(&live, "mw/", Duration::from_secs(30)).await;
    let present: BTreeSet<&str> = keys.iter().map(String::as_str).collect();
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 10, "too few writes: {}", acked.len());
    let lost: Vec<&String> = acked
        .iter()
        .filter(|k| !present.contains(k.as_str()))
        .collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    // The joined member's name arrives with its published attributes.
    let mut names: Vec<String> = Vec::new();
    TestCluster::wait_for("the joined member's name", Duration::from_secs(10), || {
        let list = futures_lite_block(admin.member_list()).unwrap();
        names = list
            .members()
            .iter()
            .map(|m| m.name().to_string())
            .collect();
        names.sort();
        names == ["m0", "m1", "m3"]
    });
}

/// Mutual exclusion through `etcdctl lock` while the member the lock holder talks to first is
/// killed (SIGKILL): the holder's client fails over to another member, keeps its session and
/// finishes; no two critical sections overlap (enter/exit times recorded by the sections).
#[test]
fn etcdctl_lock_excludes_while_the_holders_member_is_killed() {
    use oxcd_tests::ETCDCTL_BIN;
    let mut c = TestCluster::start(3, &[]);
    let eps = c.endpoints();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("sections");
    let contenders = 4;
    let mut children = Vec::new();
    // Contenders still running when the test ends (it failed half way) are killed, by their
    // own handles, so none outlives it.
    struct Contenders(Vec<std::process::Child>);
    impl Drop for Contenders {
        fn drop(&mut self) {
            for c in &mut self.0 {
                if let Ok(None) = c.try_wait() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        }
    }
    for i in 0..contenders {
        // Endpoints rotated so each contender starts on a different member.
        let mut mine = eps.clone();
        mine.rotate_left(i % eps.len());
        let script = format!(
            "echo enter {i} $(date +%s%N) >> {p}; sleep 1; echo exit {i} $(date +%s%N) >> {p}",
            p = log.display()
        );
        children.push(
            std::process::Command::new(ETCDCTL_BIN)
                .env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={}", mine.join(",")))
                .args([
                    "--command-timeout=20s",
                    "lock",
                    "--ttl=5",
                    "kill-lock",
                    "--",
                ])
                .args(["sh", "-c", &script])
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(dir.path().join(format!("err{i}"))).unwrap())
                .spawn()
                .unwrap(),
        );
    }
    let mut children = Contenders(children);
    let errors = || {
        (0..contenders)
            .map(|i| {
                std::fs::read_to_string(dir.path().join(format!("err{i}"))).unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    // Wait for the first holder, then kill the member its client starts on.
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    TestCluster::wait_for("a first lock holder", Duration::from_secs(20), || {
        read().contains("enter")
    });
    let text = read();
    let holder: usize = text
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let victim = holder % eps.len();
    c.members[victim].kill9();

    // A contender still waiting in Lock on the killed member gets an error and gives up without
    // entering (etcdctl does not retry a Lock; etcd 3.4 behaves the same); the holder fails over.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut failed = Vec::new();
    for (i, ch) in children.0.iter_mut().enumerate() {
        loop {
            if let Some(st) = ch.try_wait().unwrap() {
                if !st.success() {
                    failed.push(i);
                }
                break;
            }
            if Instant::now() > deadline {
                let _ = ch.kill();
                panic!("etcdctl lock did not finish:\n{}\n{}", read(), errors());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    c.restart(victim);
    let text = read();
    let mut sections: Vec<(u128, u128, usize)> = Vec::new();
    let mut open: std::collections::HashMap<usize, u128> = Default::default();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (who, at): (usize, u128) = (f[1].parse().unwrap(), f[2].parse().unwrap());
        match f[0] {
            "enter" => {
                open.insert(who, at);
            }
            _ => sections.push((open.remove(&who).expect("exit without enter"), at, who)),
        }
    }
    assert!(
        open.is_empty(),
        "a section never ended: {open:?}\n{text}\n{}",
        errors()
    );
    // A contender may also fail after its section: its Unlock can meet the leader change (the
    // lock then goes with its session's lease). Only overlap would break mutual exclusion.
    let gave_up = failed
        .iter()
        .filter(|i| !sections.iter().any(|s| s.2 == **i))
        .count();
    assert!(
        sections.iter().any(|s| s.2 == holder),
        "the holder, whose member was killed, finished its section:\n{text}"
    );
    assert_eq!(
        sections.len() + gave_up,
        contenders,
        "every contender either held the lock once or gave up:\n{text}\n{}",
        errors()
    );
    assert!(sections.len() >= 2, "too few sections to judge:\n{text}");
    sections.sort();
    for w in sections.windows(2) {
        assert!(
            w[0].1 <= w[1].0,
            "contender {} entered before contender {} left:\n{text}",
            w[1].2,
            w[0].2
        );
    }
}

/// Value of a counter on member `m`'s /metrics (0 when it was never incremented).
fn counter(m: &oxcd_tests::Server, name: &str) -> f64 {
    let (_, body) = oxcd_tests::http_get(m.spec().client_port, "/metrics").expect("metrics");
    body.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_far_behind_catches_up_through_a_snapshot() {
    // Small numbers so the leader compacts its log several times while a follower is down.
    let mut c = TestCluster::start(
        3,
        &[
            "--snapshot-count=200",
            "--experimental-snapshot-catchup-entries=50",
        ],
    );
    let leader = leader_index(&mut c, Duration::from_secs(10)).await;
    let follower = (leader + 1) % 3;
    let eps = c.endpoints();
    let mut cl = connect(&eps[leader], Duration::from_secs(10))
        .await
        .unwrap();
    cl.put("snap/before", "1", None).await.unwrap();
    assert_converged(&mut c, "snap/", Duration::from_secs(10)).await;
    // The leader measures its round trip to both peers (etcd's peer prober).
    TestCluster::wait_for("round trips to both peers", Duration::from_secs(10), || {
        let port = c.members[leader].spec().client_port;
        let (_, body) = oxcd_tests::http_get(port, "/metrics").expect("metrics");
        body.lines()
            .filter(|l| l.starts_with("etcd_network_peer_round_trip_time_seconds_count{To="))
            .count()
            == 2
    });

    c.members[follower].kill9();
    // A lease with a key, a compaction and a deletion: all of it must arrive in the snapshot.
    let lease = cl.lease_grant(600, None).await.unwrap().id();
    cl.put(
        "snap/leased",
        "l",
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await
    .unwrap();
    let mut writers = Vec::new();
    for w in 0..4 {
        let ep = eps[leader].clone();
        writers.push(tokio::spawn(async move {
            let mut cl = connect(&ep, Duration::from_secs(10)).await.unwrap();
            for i in 0..250 {
                cl.put(format!("snap/{w}/{:03}", i % 100), format!("{i}"), None)
                    .await
                    .unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    cl.delete("snap/before", None).await.unwrap();
    let rev = cl
        .get("snap/", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    cl.compact(rev - 10, None).await.unwrap();
    let compactions = counter(&c.members[leader], "etcd_debugging_snap_save_total_num");
    assert!(
        compactions >= 1.0,
        "the leader compacted its log ({compactions})"
    );

    c.restart(follower);
    let keys = assert_converged(&mut c, "snap/", Duration::from_secs(30)).await;
    assert_eq!(keys.len(), 4 * 100 + 1, "{keys:?}");
    let received = counter(
        &c.members[follower],
        "etcd_network_snapshot_receive_success",
    );
    assert!(received >= 1.0, "the follower caught up through a snapshot");

    // What came with the snapshot works on the follower: the compaction point, the lease
    // and its key, the member list; and the log goes on after it.
    let mut fc = connect(&eps[follower], Duration::from_secs(10))
        .await
        .unwrap();
    let old = fc
        .get(
            "snap/0/000",
            Some(
                GetOptions::new()
                    .with_revision(rev - 20)
                    .with_serializable(),
            ),
        )
        .await;
    assert!(
        format!("{:?}", old.unwrap_err()).contains("required revision has been compacted"),
        "the follower has the leader's compaction point"
    );
    let leased = fc
        .get("snap/leased", Some(GetOptions::new().with_serializable()))
        .await
        .unwrap();
    assert_eq!(leased.kvs()[0].lease(), lease);
    assert_eq!(fc.member_list().await.unwrap().members().len(), 3);
    fc.put("snap/after", "1", None).await.unwrap();
    cl.lease_revoke(lease).await.unwrap();
    let keys = assert_converged(&mut c, "snap/", Duration::from_secs(20)).await;
    assert!(keys.contains(&"snap/after".to_string()) && !keys.contains(&"snap/leased".into()));

    // The follower restarts from the installed state and its shortened log.
    c.members[follower].kill9();
    c.restart(follower);
    fc = connect(&eps[follower], Duration::from_secs(10))
        .await
        .unwrap();
    fc.put("snap/restarted", "1", None).await.unwrap();
    assert_converged(&mut c, "snap/", Duration::from_secs(20)).await;
}
