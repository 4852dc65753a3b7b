use super::*;

type Reply = oneshot::Sender<u64>;
/// (index, data) of every entry an applier saw, in delivery order.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(u64, Vec<u8>)>>>;

struct Node {
    tx: mpsc::Sender<RaftCommand<Reply>>,
    handle: RaftHandle,
    /// Every committed entry's (index, data), as the applier saw them.
    applied: Seen,
    /// Indexes of the conf-change entries among them.
    conf_changes: std::sync::Arc<std::sync::Mutex<Vec<u64>>>,
    applier: std::thread::JoinHandle<()>,
}

/// Starts a node whose "applier" records entries and answers each proposer with the entry's
/// index. `queued` commands are in the channel before the loop starts, so its first
/// iteration handles them before the first Ready (deterministic ordering).
fn spawn(
    cfg: RaftConfig,
    dir: &Path,
    applied_index: u64,
    queued: Vec<RaftCommand<Reply>>,
    transport: Box<dyn Transport>,
) -> Node {
    let (tx, rx) = mpsc::channel(4096);
    for c in queued {
        tx.try_send(c).unwrap_or_else(|_| panic!("queue full"));
    }
    let (ctx, mut crx) = mpsc::channel::<Committed<Reply>>(64);
    let handle =
        RaftNode::start_with_transport(cfg, dir, applied_index, rx, ctx, transport).unwrap();
    let applied = Seen::default();
    let conf_changes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (seen, confs) = (applied.clone(), conf_changes.clone());
    let applier = std::thread::spawn(move || {
        while let Some(batch) = crx.blocking_recv() {
            for e in batch.entries {
                if e.kind == EntryKind::ConfChange {
                    confs.lock().unwrap().push(e.index);
                }
                seen.lock().unwrap().push((e.index, e.data.clone()));
                if let Some(r) = e.reply {
                    let _ = r.send(e.index);
                }
            }
        }
    });
    Node {
        tx,
        handle,
        applied,
        conf_changes,
        applier,
    }
}

/// A single voter.
fn start(dir: &Path, applied_index: u64) -> Node {
    start_with_queued(dir, applied_index, vec![])
}

fn start_with_queued(dir: &Path, applied_index: u64, queued: Vec<RaftCommand<Reply>>) -> Node {
    spawn(
        RaftConfig::default(),
        dir,
        applied_index,
        queued,
        Box::new(NoPeers),
    )
}

impl Node {
    fn seen(&self) -> Vec<(u64, Vec<u8>)> {
        self.applied.lock().unwrap().clone()
    }

    fn stop(self) -> Vec<(u64, Vec<u8>)> {
        drop(self.tx);
        self.handle.join();
        self.applier.join().unwrap();
        std::sync::Arc::try_unwrap(self.applied)
            .unwrap()
            .into_inner()
            .unwrap()
    }
}

async fn propose(tx: &mpsc::Sender<RaftCommand<Reply>>, data: &[u8]) -> u64 {
    let (reply, rx) = oneshot::channel();
    tx.send(RaftCommand::Propose {
        data: data.to_vec(),
        reply,
    })
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .expect("proposal timed out")
        .expect("proposal dropped")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_proposals_commit_in_order_and_share_fsyncs() {
    const N: u32 = 1000;
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), 0);
    let mut tasks = Vec::new();
    for i in 0..N {
        let tx = node.tx.clone();
        tasks.push(tokio::spawn(async move {
            (i, propose(&tx, &i.to_le_bytes()).await)
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let appends = node.handle.stats.wal_appends.load(Ordering::Relaxed);
    assert!(
        appends < u64::from(N),
        "group commit: {appends} wal appends for {N} proposals"
    );
    let applied = node.stop();
    let idx: Vec<u64> = applied.iter().map(|(i, _)| *i).collect();
    assert_eq!(idx.first(), Some(&1));
    assert!(
        idx.windows(2).all(|w| w[1] == w[0] + 1),
        "delivered in log order, once each, without gaps"
    );
    // Each proposer was answered by the entry carrying its own data, and no two shared one.
    let by_index: HashMap<u64, &[u8]> = applied.iter().map(|(i, d)| (*i, &d[..])).collect();
    let mut indexes: Vec<u64> = answers.iter().map(|(_, index)| *index).collect();
    for (i, index) in &answers {
        assert_eq!(by_index[index], &i.to_le_bytes()[..], "proposal {i}");
    }
    indexes.sort_unstable();
    indexes.dedup();
    assert_eq!(
        indexes.len(),
        N as usize,
        "every proposal answered exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_redelivers_exactly_the_unapplied_suffix() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), 0);
    for i in 0..20u8 {
        propose(&node.tx, &[i]).await;
    }
    let first = node.stop();
    let last = first.last().unwrap().0;
    let applied = last - 5;

    let node = start(dir.path(), applied);
    let next = propose(&node.tx, b"after").await;
    assert!(next > last);
    let second = node.stop();
    let redelivered: Vec<u64> = second.iter().map(|(i, _)| *i).collect();
    assert_eq!(redelivered[0], applied + 1, "starts right after applied");
    let old: Vec<_> = first
        .iter()
        .filter(|(i, _)| *i > applied)
        .cloned()
        .collect();
    assert_eq!(&second[..old.len()], &old[..], "same entries, same data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_index_covers_every_committed_write() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), 0);
    let mut last = 0;
    for i in 0..10u8 {
        last = propose(&node.tx, &[i]).await;
    }
    let mut waits = Vec::new();
    for _ in 0..5 {
        let (reply, rx) = oneshot::channel();
        node.tx
            .send(RaftCommand::ReadIndex { reply })
            .await
            .unwrap();
        waits.push(rx);
    }
    for w in waits {
        let index = tokio::time::timeout(Duration::from_secs(5), w)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(index >= last, "read index {index} < committed {last}");
    }
    let (reply, rx) = oneshot::channel();
    node.tx.send(RaftCommand::Status { reply }).await.unwrap();
    let st = rx.await.unwrap();
    assert!(st.is_leader && st.leader_id == st.id && st.commit_index >= last);
    node.stop();
}

#[test]
fn the_loop_ends_when_the_command_channel_closes() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), 0);
    let started = Instant::now();
    node.stop();
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn an_applied_index_beyond_the_log_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_tx, rx) = mpsc::channel::<RaftCommand<Reply>>(1);
    let (ctx, _crx) = mpsc::channel(1);
    let err = RaftNode::start(RaftConfig::default(), dir.path(), 99, rx, ctx).err();
    assert!(matches!(err, Some(RaftError::BadState(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_issued_before_the_first_commit_of_the_term_is_answered() {
    // raft-rs silently drops a read-index request while the leader has not yet committed an
    // entry in its term; right after start that is always the case.
    let dir = tempfile::tempdir().unwrap();
    let (reply, rx) = oneshot::channel();
    let node = start_with_queued(dir.path(), 0, vec![RaftCommand::ReadIndex { reply }]);
    let index = tokio::time::timeout(Duration::from_secs(3), rx)
        .await
        .expect("read index never answered")
        .unwrap()
        .unwrap();
    // The leader's empty entry of term 1 is committed before the read is served.
    assert!(index >= 1, "read index {index}");
    node.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_proposal_is_not_answered_by_an_old_entry_that_reuses_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), 0);
    for i in 0..20u8 {
        propose(&node.tx, &[i]).await;
    }
    let last = node.stop().last().unwrap().0;

    // The state machine lost everything (applied 0): the whole log is delivered again, and
    // with it entries whose contexts carry the ids of the previous run's proposals.
    let (reply, rx) = oneshot::channel();
    let node = start_with_queued(
        dir.path(),
        0,
        vec![RaftCommand::Propose {
            data: b"fresh".to_vec(),
            reply,
        }],
    );
    let index = tokio::time::timeout(Duration::from_secs(5), rx)
        .await
        .expect("proposal timed out")
        .expect("proposal dropped");
    assert!(
        index > last,
        "answered with old entry {index}, the log ended at {last}"
    );
    let applied = node.stop();
    let data = &applied.iter().find(|(i, _)| *i == index).unwrap().1;
    assert_eq!(data, b"fresh");
}

/// Writes a wal whose log starts after a state-machine snapshot at index 10 (as a follower's
/// would after receiving one), with entries 11..=13, and hard states written before the
/// marker and with the entries.
fn wal_after_snapshot(
    dir: &Path,
    before: Option<wal::HardState>,
    with_entries: Option<wal::HardState>,
) {
    use protobuf::Message as _;
    let (mut w, _) = wal::Wal::open(dir, wal::WalOptions::default()).unwrap();
    if let Some(hs) = before {
        w.append(&[], Some(&hs)).unwrap();
    }
    let cs = raft::prelude::ConfState {
        voters: vec![1],
        ..Default::default()
    };
    w.save_snapshot(&wal::SnapshotMarker {
        index: 10,
        term: 2,
        conf_state: cs.write_to_bytes().unwrap(),
    })
    .unwrap();
    let entries: Vec<wal::WalEntry> = (11..=13)
        .map(|index| wal::WalEntry {
            term: 2,
            index,
            entry_type: wal::EntryType::Normal,
            data: vec![index as u8],
            context: vec![],
        })
        .collect();
    w.append(&entries, with_entries.as_ref()).unwrap();
}

#[test]
fn an_applied_index_inside_the_snapshot_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    wal_after_snapshot(
        dir.path(),
        None,
        Some(wal::HardState {
            term: 2,
            vote: 1,
            commit: 12,
        }),
    );
    let (_tx, rx) = mpsc::channel::<RaftCommand<Reply>>(1);
    let (ctx, _crx) = mpsc::channel(1);
    let started =
        std::panic::catch_unwind(|| RaftNode::start(RaftConfig::default(), dir.path(), 5, rx, ctx));
    let err = started.expect("start panicked").err();
    assert!(matches!(err, Some(RaftError::BadState(_))), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_marker_saved_before_its_hard_state_still_loads() {
    // A crash between the marker's fsync and the next hard state leaves a commit index below
    // the snapshot; everything in a snapshot was committed, so start-up must accept it.
    let dir = tempfile::tempdir().unwrap();
    let stale = wal::HardState {
        term: 1,
        vote: 1,
        commit: 3,
    };
    wal_after_snapshot(dir.path(), Some(stale), None);
    let dir2 = dir.path().to_path_buf();
    let node = std::thread::spawn(move || start(&dir2, 10)).join();
    let node = node.expect("start panicked");
    let index = propose(&node.tx, b"next").await;
    assert!(index > 13);
    let applied = node.stop();
    let idx: Vec<u64> = applied.iter().map(|(i, _)| *i).collect();
    assert_eq!(
        idx.first(),
        Some(&11),
        "delivery resumes after the snapshot"
    );
}
#[test]
fn shutdown_stops_the_loop_while_senders_are_alive() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), 0);
    let started = Instant::now();
    node.handle.shutdown();
    assert!(started.elapsed() < Duration::from_secs(5));
    // The loop dropped its receiver: further commands are refused.
    let (reply, _rx) = oneshot::channel();
    assert!(node.tx.try_send(RaftCommand::Status { reply }).is_err());
    drop(node.tx);
    node.applier.join().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conf_change_is_applied_persisted_and_delivered() {
    use protobuf::Message as _;
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), 0);
    let mut change = ConfChange::default();
    change.set_change_type(ConfChangeType::AddLearnerNode);
    change.node_id = 2;
    let (reply, rx) = oneshot::channel();
    node.tx
        .send(RaftCommand::ProposeConfChange { change, reply })
        .await
        .unwrap();
    let index = tokio::time::timeout(Duration::from_secs(5), rx)
        .await
        .expect("conf change timed out")
        .expect("conf change dropped");
    assert_eq!(*node.conf_changes.lock().unwrap(), vec![index]);
    let seen = node.stop();
    let data = &seen.iter().find(|(i, _)| *i == index).unwrap().1;
    let cc = ConfChange::parse_from_bytes(data).unwrap();
    assert_eq!(
        (cc.get_change_type(), cc.node_id),
        (ConfChangeType::AddLearnerNode, 2)
    );

    // The new membership is on disk: reopening, even with another initial membership, keeps it.
    let storage = WalStorage::open(dir.path(), &[1, 7], &[], Arc::new(KeepWholeLog)).unwrap();
    let cs = storage.conf_state();
    assert_eq!((cs.voters, cs.learners), (vec![1], vec![2]));
    drop(storage);

    // A learner does not vote: the only voter still leads from the first moment.
    let (reply, rx) = oneshot::channel();
    let node = start_with_queued(dir.path(), index, vec![RaftCommand::Status { reply }]);
    let st = rx.await.unwrap();
    assert!(
        st.is_leader,
        "the only voter must campaign at start: {st:?}"
    );
    node.stop();
}

/// An in-memory network: each member's raft messages go straight into the addressee's command
/// channel, except to or from an isolated member (a partition).
#[derive(Clone, Default)]
struct Net {
    peers: std::sync::Arc<std::sync::Mutex<HashMap<u64, mpsc::Sender<RaftCommand<Reply>>>>>,
    isolated: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<u64>>>,
    /// The Ready loop of member `paused` waits in its next send until this is reset to 0.
    paused: std::sync::Arc<AtomicU64>,
    /// (type, from, entries) of every message delivered.
    log: std::sync::Arc<std::sync::Mutex<Vec<(raft::prelude::MessageType, u64, usize)>>>,
}

impl Transport for Net {
    fn send(&mut self, msgs: Vec<Message>) {
        while msgs
            .iter()
            .any(|m| m.from == self.paused.load(Ordering::Acquire))
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        let isolated = self.isolated.lock().unwrap();
        let peers = self.peers.lock().unwrap();
        for m in msgs {
            if isolated.contains(&m.from) || isolated.contains(&m.to) {
                continue;
            }
            self.log
                .lock()
                .unwrap()
                .push((m.get_msg_type(), m.from, m.entries.len()));
            if let Some(tx) = peers.get(&m.to) {
                // A full queue is a lost packet; raft retries.
                let _ = tx.try_send(RaftCommand::Step(Box::new(m)));
            }
        }
    }
}

struct Cluster {
    net: Net,
    nodes: HashMap<u64, Node>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Cluster {
    fn start(ids: &[u64]) -> Cluster {
        Self::start_ticking(ids, Duration::from_millis(10))
    }

    /// Election timeouts are 10 to 20 ticks.
    fn start_ticking(ids: &[u64], tick: Duration) -> Cluster {
        let net = Net::default();
        let mut nodes = HashMap::new();
        let mut dirs = Vec::new();
        for &id in ids {
            let dir = tempfile::tempdir().unwrap();
            let cfg = RaftConfig {
                id,
                voters: ids.to_vec(),
                tick_interval: tick,
                ..RaftConfig::default()
            };
            let node = spawn(cfg, dir.path(), 0, vec![], Box::new(net.clone()));
            net.peers.lock().unwrap().insert(id, node.tx.clone());
            nodes.insert(id, node);
            dirs.push(dir);
        }
        Cluster {
            net,
            nodes,
            _dirs: dirs,
        }
    }

    async fn status(&self, id: u64) -> RaftStatus {
        let (reply, rx) = oneshot::channel();
        self.nodes[&id]
            .tx
            .send(RaftCommand::Status { reply })
            .await
            .unwrap();
        rx.await.unwrap()
    }

    /// Waits until exactly one of `among` leads and all of them name it; returns it.
    async fn leader(&self, among: &[u64]) -> RaftStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut st = Vec::new();
            for &id in among {
                st.push(self.status(id).await);
            }
            let leaders: Vec<&RaftStatus> = st.iter().filter(|s| s.is_leader).collect();
            if let [l] = leaders[..] {
                if st.iter().all(|s| s.leader_id == l.id && s.term == l.term) {
                    return l.clone();
                }
            }
            assert!(Instant::now() < deadline, "no single leader: {st:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every member has applied the same entries, at least up to `index`.
    async fn converged(&self, index: u64) -> Vec<(u64, Vec<u8>)> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let logs: Vec<_> = self.nodes.values().map(Node::seen).collect();
            if logs.iter().all(|l| l.last().is_some_and(|e| e.0 >= index))
                && logs.windows(2).all(|w| w[0] == w[1])
            {
                return logs.into_iter().next().unwrap();
            }
            assert!(Instant::now() < deadline, "members did not converge");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn stop(self) {
        self.net.peers.lock().unwrap().clear();
        for (_, n) in self.nodes {
            n.stop();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_elect_one_leader_and_commit_on_all() {
    let c = Cluster::start(&[1, 2, 3]);
    let leader = c.leader(&[1, 2, 3]).await;
    let mut tasks = Vec::new();
    for i in 0..50u32 {
        let tx = c.nodes[&leader.id].tx.clone();
        tasks.push(tokio::spawn(async move {
            (i, propose(&tx, &i.to_le_bytes()).await)
        }));
    }
    let mut last = 0;
    let mut answers = Vec::new();
    for t in tasks {
        let (i, index) = t.await.unwrap();
        last = last.max(index);
        answers.push((i, index));
    }

    // A follower forwards to the leader; its own caller is answered when the entry commits.
    let follower = *c.nodes.keys().find(|id| **id != leader.id).unwrap();
    let via_follower = tokio::time::timeout(
        Duration::from_secs(5),
        propose(&c.nodes[&follower].tx, b"via follower"),
    )
    .await
    .expect("forwarded proposal not answered");
    assert!(via_follower > last);
    last = via_follower;

    let log = c.converged(last).await;
    for (i, index) in answers {
        let entry = log.iter().find(|(x, _)| *x == index).unwrap();
        assert_eq!(
            entry.1,
            i.to_le_bytes(),
            "proposal {i} answered by its own entry"
        );
    }
    assert_eq!(
        log.iter().filter(|(_, d)| d == b"via follower").count(),
        1,
        "the forwarded entry is in the log once"
    );

    // Every member serves linearizable reads at or past what was committed.
    for id in [1, 2, 3] {
        let (reply, rx) = oneshot::channel();
        c.nodes[&id]
            .tx
            .send(RaftCommand::ReadIndex { reply })
            .await
            .unwrap();
        let index = tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .expect("read index timed out")
            .unwrap()
            .unwrap();
        assert!(index >= last, "member {id}: read index {index} < {last}");
    }
    c.stop();
}

impl Cluster {
    /// Holds member `id`'s Ready loop in its next send (it sends at least a heartbeat or its
    /// answer every tick) until `resume`.
    async fn pause(&self, id: u64) {
        self.net.paused.store(id, Ordering::Release);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    fn resume(&self) {
        self.net.paused.store(0, Ordering::Release);
    }

    /// Queues `n` proposals at member `id`, tagged `tag`; returns their answers.
    async fn queue(&self, id: u64, tag: u8, n: u32) -> Vec<(Vec<u8>, oneshot::Receiver<u64>)> {
        let mut answers = Vec::new();
        for i in 0..n {
            let mut data = vec![tag];
            data.extend(i.to_le_bytes());
            let (reply, rx) = oneshot::channel();
            self.nodes[&id]
                .tx
                .send(RaftCommand::Propose {
                    data: data.clone(),
                    reply,
                })
                .await
                .unwrap();
            answers.push((data, rx));
        }
        answers
    }

    /// Waits for every answer and checks each proposer got its own entry.
    async fn check_answers(&self, answers: Vec<(Vec<u8>, oneshot::Receiver<u64>)>) {
        let mut got = Vec::new();
        for (data, rx) in answers {
            let index = tokio::time::timeout(Duration::from_secs(10), rx)
                .await
                .expect("proposal timed out")
                .expect("proposal dropped");
            got.push((data, index));
        }
        let last = got.iter().map(|(_, i)| *i).max().unwrap_or(0);
        let log = self.converged(last).await;
        for (data, index) in got {
            let entry = log.iter().find(|(x, _)| *x == index).unwrap();
            assert_eq!(entry.1, data, "a proposal answered by its own entry");
        }
    }

    /// Sizes of the delivered messages of type `t` that carried entries, and forgets them.
    fn sent_with_entries(&self, t: raft::prelude::MessageType) -> Vec<usize> {
        let mut log = self.net.log.lock().unwrap();
        let sizes = log
            .iter()
            .filter(|(ty, _, n)| *ty == t && *n > 0)
            .map(|(_, _, n)| *n)
            .collect();
        if t == raft::prelude::MessageType::MsgAppend {
            log.clear();
        }
        sizes
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposals_queued_together_are_forwarded_and_replicated_in_shared_messages() {
    use raft::prelude::MessageType;
    const N: u32 = 200;
    // Long ticks: a member held for a while must not cost the leader its term.
    let c = Cluster::start_ticking(&[1, 2, 3], Duration::from_millis(50));
    let leader = c.leader(&[1, 2, 3]).await.id;
    let followers: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != leader).collect();

    // A follower's loop takes every proposal queued meanwhile in one pass and forwards them in
    // one message.
    c.pause(followers[0]).await;
    let answers = c.queue(followers[0], 0, N).await;
    c.net.log.lock().unwrap().clear();
    c.resume();
    c.check_answers(answers).await;
    assert_eq!(
        c.sent_with_entries(MessageType::MsgPropose),
        vec![N as usize]
    );
    let appends = c.sent_with_entries(MessageType::MsgAppend);
    assert!(appends.iter().sum::<usize>() >= 2 * N as usize);

    // The leader takes its own proposals and both followers' forwarded ones in one pass: each
    // follower gets them in one append, not one per proposing member.
    c.pause(leader).await;
    let mut answers = c.queue(leader, 1, N).await;
    for (tag, f) in (2..).zip(&followers) {
        answers.extend(c.queue(*f, tag, N).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.net.log.lock().unwrap().clear();
    c.resume();
    c.check_answers(answers).await;
    let appends = c.sent_with_entries(MessageType::MsgAppend);
    assert!(appends.iter().sum::<usize>() >= 2 * 3 * N as usize);
    assert!(
        appends.len() <= 2 * 2,
        "one append per follower for what one pass proposed: {appends:?}"
    );
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_drops_its_write_and_does_not_hang_its_read() {
    let c = Cluster::start(&[1, 2, 3]);
    let old = c.leader(&[1, 2, 3]).await;
    let first = propose(&c.nodes[&old.id].tx, b"before").await;

    c.net.isolated.lock().unwrap().insert(old.id);
    // Still leader for a moment (until check-quorum notices), so raft takes this one; it can
    // never reach a majority.
    let (reply, lost) = oneshot::channel();
    c.nodes[&old.id]
        .tx
        .send(RaftCommand::Propose {
            data: b"lost".to_vec(),
            reply,
        })
        .await
        .unwrap();

    // A read on the cut-off leader cannot be confirmed by a quorum; once it steps down the
    // read is answered "no leader" instead of waiting forever.
    let (reply, read) = oneshot::channel();
    c.nodes[&old.id]
        .tx
        .send(RaftCommand::ReadIndex { reply })
        .await
        .unwrap();
    let read = tokio::time::timeout(Duration::from_secs(10), read).await;
    assert!(matches!(read, Ok(Ok(Err(RaftError::NoLeader)))), "{read:?}");

    let rest: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != old.id).collect();
    let new = c.leader(&rest).await;
    assert!(new.term > old.term);
    let kept = propose(&c.nodes[&new.id].tx, b"kept").await;

    c.net.isolated.lock().unwrap().clear();
    let log = c.converged(kept).await;
    assert!(log.iter().any(|(i, d)| *i == first && d == b"before"));
    assert!(log.iter().any(|(i, d)| *i == kept && d == b"kept"));
    assert!(!log.iter().any(|(_, d)| d == b"lost"));
    let lost = tokio::time::timeout(Duration::from_secs(10), lost).await;
    assert!(
        matches!(lost, Ok(Err(_))),
        "the lost write must be dropped, not answered: {lost:?}"
    );
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_reach_the_applier_only_after_the_wal_holds_them() {
    let dir = tempfile::tempdir().unwrap();
    let wal_dir = dir.path().to_path_buf();
    let (tx, rx) = mpsc::channel::<RaftCommand<Reply>>(1024);
    let (ctx, mut crx) = mpsc::channel::<Committed<Reply>>(64);
    let handle = RaftNode::start(RaftConfig::default(), dir.path(), 0, rx, ctx).unwrap();
    let applier = std::thread::spawn(move || {
        let mut checked = 0;
        while let Some(batch) = crx.blocking_recv() {
            // Read the log as a crash would leave it: every delivered entry must be there.
            let on_disk: std::collections::HashSet<u64> = wal::read_records(&wal_dir)
                .unwrap()
                .into_iter()
                .filter_map(|r| match r {
                    wal::Record::Entry(e) => Some(e.index),
                    _ => None,
                })
                .collect();
            for e in batch.entries {
                assert!(
                    on_disk.contains(&e.index),
                    "entry {} not in the wal",
                    e.index
                );
                checked += 1;
                if let Some(r) = e.reply {
                    let _ = r.send(e.index);
                }
            }
        }
        checked
    });
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let tx = tx.clone();
        tasks.push(tokio::spawn(
            async move { propose(&tx, &i.to_le_bytes()).await },
        ));
    }
    for t in tasks {
        t.await.unwrap();
    }
    drop(tx);
    handle.join();
    assert!(applier.join().unwrap() > 200);
}

/// A state machine whose applied index is whatever the test's applier reached.
struct Counted(std::sync::Arc<AtomicU64>);

impl StateMachine for Counted {
    fn applied(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
    fn persist(&self) -> Result<u64, String> {
        Ok(self.applied())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_is_compacted_every_snapshot_count_entries_and_restarts_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let applied = std::sync::Arc::new(AtomicU64::new(0));
    let cfg = RaftConfig {
        snapshot_count: 50,
        snapshot_catchup_entries: 10,
        ..RaftConfig::default()
    };
    let (tx, rx) = mpsc::channel(64);
    let (ctx, mut crx) = mpsc::channel::<Committed<Reply>>(64);
    let handle = RaftNode::start_full(
        cfg.clone(),
        dir.path(),
        0,
        rx,
        ctx,
        Box::new(NoPeers),
        std::sync::Arc::new(Counted(applied.clone())),
    )
    .unwrap();
    let seen = applied.clone();
    let applier = std::thread::spawn(move || {
        while let Some(batch) = crx.blocking_recv() {
            for e in batch.entries {
                seen.store(e.index, Ordering::Release);
                if let Some(r) = e.reply {
                    let _ = r.send(e.index);
                }
            }
        }
    });
    let mut last = 0;
    for i in 0..200u32 {
        last = propose(&tx, &i.to_le_bytes()).await;
    }
    drop(tx);
    handle.join();
    applier.join().unwrap();

    // The wal now starts after a compaction point that keeps the catch-up entries.
    let (_, rec) = wal::Wal::open(dir.path(), wal::WalOptions::default()).unwrap();
    let marker = rec.snapshot.expect("a snapshot marker").index;
    assert!(
        marker > 0 && marker + 10 <= last,
        "compacted to {marker}, last entry {last}"
    );
    assert_eq!(rec.entries.first().map(|e| e.index), Some(marker + 1));

    // A restart from the state machine's applied index goes on after it.
    let node = spawn(cfg, dir.path(), last, vec![], Box::new(NoPeers));
    let next = propose(&node.tx, b"after restart").await;
    assert_eq!(
        next,
        last + 2,
        "the new leader's empty entry, then this one"
    );
    node.stop();
}

/// A member whose applier also answers snapshot installs: the first `refusals` requests fail
/// (as when the leader dies mid-transfer), later ones "install" by taking the index.
/// Returns the node and the number of install requests it saw.
fn spawn_installing(
    cfg: RaftConfig,
    dir: &Path,
    transport: Box<dyn Transport>,
    refusals: usize,
) -> (Node, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::AtomicUsize;
    let (tx, rx) = mpsc::channel(4096);
    let (ctx, mut crx) = mpsc::channel::<Committed<Reply>>(64);
    let applied_index = std::sync::Arc::new(AtomicU64::new(0));
    let handle = RaftNode::start_full(
        cfg,
        dir,
        0,
        rx,
        ctx,
        transport,
        std::sync::Arc::new(Counted(applied_index.clone())),
    )
    .unwrap();
    let applied = Seen::default();
    let requests = std::sync::Arc::new(AtomicUsize::new(0));
    let (seen, asked) = (applied.clone(), requests.clone());
    let applier = std::thread::spawn(move || {
        while let Some(batch) = crx.blocking_recv() {
            if let Some(snap) = batch.snapshot {
                let n = asked.fetch_add(1, Ordering::AcqRel) + 1;
                if n <= refusals {
                    let _ = snap.done.send(Err(format!("request {n} refused")));
                } else {
                    applied_index.store(snap.index, Ordering::Release);
                    seen.lock()
                        .unwrap()
                        .push((snap.index, b"snapshot".to_vec()));
                    let _ = snap.done.send(Ok(snap.index));
                }
            }
            for e in batch.entries {
                applied_index.store(e.index, Ordering::Release);
                seen.lock().unwrap().push((e.index, e.data.clone()));
                if let Some(r) = e.reply {
                    let _ = r.send(e.index);
                }
            }
        }
    });
    let node = Node {
        tx,
        handle,
        applied,
        conf_changes: Default::default(),
        applier,
    };
    (node, requests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_snapshot_install_is_asked_for_again_until_it_works() {
    let ids = [1u64, 2, 3];
    let net = Net::default();
    // Member 3 is cut off before the first election, so it falls behind from the start.
    net.isolated.lock().unwrap().insert(3);
    let mut nodes = HashMap::new();
    let mut dirs = Vec::new();
    let mut requests = None;
    for id in ids {
        let dir = tempfile::tempdir().unwrap();
        let cfg = RaftConfig {
            id,
            voters: ids.to_vec(),
            tick_interval: Duration::from_millis(10),
            snapshot_count: 20,
            snapshot_catchup_entries: 5,
            ..RaftConfig::default()
        };
        let refusals = if id == 3 { 2 } else { 0 };
        let (node, asked) = spawn_installing(cfg, dir.path(), Box::new(net.clone()), refusals);
        if id == 3 {
            requests = Some(asked);
        }
        net.peers.lock().unwrap().insert(id, node.tx.clone());
        nodes.insert(id, node);
        dirs.push(dir);
    }
    let requests = requests.unwrap();
    let c = Cluster {
        net,
        nodes,
        _dirs: dirs,
    };
    let leader = c.leader(&[1, 2]).await;
    let mut last = 0;
    for i in 0..100u32 {
        last = propose(&c.nodes[&leader.id].tx, &i.to_le_bytes()).await;
    }
    // The leader's log now starts far past member 3's: only a snapshot can catch it up.
    c.net.isolated.lock().unwrap().clear();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = c.status(3).await;
        if st.applied_index >= last {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "member 3 never caught up ({} install requests): {st:?}",
            requests.load(Ordering::Acquire)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        requests.load(Ordering::Acquire),
        3,
        "two refused requests, then the one that worked"
    );
    // And it goes on applying the log after the snapshot.
    let next = propose(&c.nodes[&leader.id].tx, b"after the snapshot").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.nodes[&3].seen().iter().any(|(i, _)| *i == next) {
        assert!(Instant::now() < deadline, "member 3 stopped applying");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.stop();
}
