use super::*;

type Reply = oneshot::Sender<u64>;
/// (index, data) of every entry an applier saw, in delivery order.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(u64, Vec<u8>)>>>;

struct Node {
    tx: mpsc::Sender<RaftCommand<Reply>>,
    handle: RaftHandle,
    /// Every committed entry's (index, data), as the applier saw them.
    applied: Seen,
    applier: std::thread::JoinHandle<()>,
}

/// Starts a single-voter node whose "applier" records entries and answers each proposer with
/// the entry's index.
fn start(dir: &Path, applied_index: u64) -> Node {
    let (tx, rx) = mpsc::channel(4096);
    let (ctx, mut crx) = mpsc::channel::<Committed<Reply>>(64);
    let handle = RaftNode::start(RaftConfig::default(), dir, applied_index, rx, ctx).unwrap();
    let applied = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = applied.clone();
    let applier = std::thread::spawn(move || {
        while let Some(batch) = crx.blocking_recv() {
            for e in batch.entries {
                assert_eq!(e.kind, EntryKind::Normal);
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
        applier,
    }
}

impl Node {
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
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), 0);
    let mut tasks = Vec::new();
    for i in 0..500u32 {
        let tx = node.tx.clone();
        tasks.push(tokio::spawn(
            async move { propose(&tx, &i.to_le_bytes()).await },
        ));
    }
    let mut indexes = Vec::new();
    for t in tasks {
        indexes.push(t.await.unwrap());
    }
    indexes.sort_unstable();
    indexes.dedup();
    assert_eq!(indexes.len(), 500, "every proposal answered exactly once");
    let appends = node.handle.stats.wal_appends.load(Ordering::Relaxed);
    assert!(
        appends < 500,
        "group commit: {appends} wal appends for 500 proposals"
    );
    let applied = node.stop();
    let idx: Vec<u64> = applied.iter().map(|(i, _)| *i).collect();
    let mut sorted = idx.clone();
    sorted.sort_unstable();
    assert_eq!(idx, sorted, "delivered in log order");
    assert_eq!(idx.first(), Some(&1));
    assert_eq!(
        idx.windows(2).filter(|w| w[1] != w[0] + 1).count(),
        0,
        "no gaps"
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

/// Starts a single voter with commands already waiting in its channel, so the first loop
/// iteration handles them before the first Ready (deterministic ordering for the tests below).
fn start_with_queued(dir: &Path, applied_index: u64, queued: Vec<RaftCommand<Reply>>) -> Node {
    let (tx, rx) = mpsc::channel(4096);
    for c in queued {
        tx.try_send(c).unwrap_or_else(|_| panic!("queue full"));
    }
    let (ctx, mut crx) = mpsc::channel::<Committed<Reply>>(64);
    let handle = RaftNode::start(RaftConfig::default(), dir, applied_index, rx, ctx).unwrap();
    let applied = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = applied.clone();
    let applier = std::thread::spawn(move || {
        while let Some(batch) = crx.blocking_recv() {
            for e in batch.entries {
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
        applier,
    }
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
