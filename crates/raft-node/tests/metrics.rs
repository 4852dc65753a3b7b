//! The etcd-named metrics the Ready loop publishes. Its own test binary: it installs the
//! process-wide metrics recorder.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use raft_node::{Committed, RaftCommand, RaftConfig, RaftNode, RaftStatus};
use tokio::sync::{mpsc, oneshot};

/// Last value (counters: running total; gauges: current) and every histogram sample.
#[derive(Default)]
struct Cell {
    value: Mutex<f64>,
    samples: Mutex<Vec<f64>>,
}

impl CounterFn for Cell {
    fn increment(&self, v: u64) {
        *self.value.lock().unwrap() += v as f64;
    }
    fn absolute(&self, v: u64) {
        *self.value.lock().unwrap() = v as f64;
    }
}

impl GaugeFn for Cell {
    fn increment(&self, v: f64) {
        *self.value.lock().unwrap() += v;
    }
    fn decrement(&self, v: f64) {
        *self.value.lock().unwrap() -= v;
    }
    fn set(&self, v: f64) {
        *self.value.lock().unwrap() = v;
    }
}

impl HistogramFn for Cell {
    fn record(&self, v: f64) {
        self.samples.lock().unwrap().push(v);
    }
}

#[derive(Clone, Default)]
struct Rec(Arc<Mutex<HashMap<String, Arc<Cell>>>>);

impl Rec {
    fn cell(&self, key: &Key) -> Arc<Cell> {
        self.0
            .lock()
            .unwrap()
            .entry(key.name().to_string())
            .or_default()
            .clone()
    }
    fn value(&self, name: &str) -> Option<f64> {
        let cells = self.0.lock().unwrap();
        cells.get(name).map(|c| *c.value.lock().unwrap())
    }
    fn samples(&self, name: &str) -> Vec<f64> {
        let cells = self.0.lock().unwrap();
        cells
            .get(name)
            .map(|c| c.samples.lock().unwrap().clone())
            .unwrap_or_default()
    }
}

impl Recorder for Rec {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.cell(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.cell(key))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.cell(key))
    }
}

fn recorder() -> &'static Rec {
    static REC: OnceLock<Rec> = OnceLock::new();
    REC.get_or_init(|| {
        let rec = Rec::default();
        metrics::set_global_recorder(rec.clone()).expect("first recorder");
        rec
    })
}

type Reply = oneshot::Sender<()>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_voter_reports_leadership_fsyncs_and_commits() {
    let rec = recorder();
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = mpsc::channel::<RaftCommand<Reply>>(64);
    let (ctx, mut crx) = mpsc::channel::<Committed<Reply>>(64);
    let handle = RaftNode::start(RaftConfig::default(), dir.path(), 0, rx, ctx).unwrap();
    let applier = std::thread::spawn(move || {
        while let Some(b) = crx.blocking_recv() {
            for e in b.entries {
                if let Some(r) = e.reply {
                    let _ = r.send(());
                }
            }
        }
    });
    for i in 0..10u8 {
        let (reply, done) = oneshot::channel();
        tx.send(RaftCommand::Propose {
            data: vec![i],
            reply,
        })
        .await
        .unwrap();
        tokio::time::timeout(Duration::from_secs(5), done)
            .await
            .unwrap()
            .unwrap();
    }
    // Answered on a later loop pass, so everything above has been published.
    let (reply, st) = oneshot::channel();
    tx.send(RaftCommand::Status { reply }).await.unwrap();
    let st: RaftStatus = st.await.unwrap();

    assert_eq!(rec.value("etcd_server_has_leader"), Some(1.0));
    assert_eq!(rec.value("etcd_server_is_leader"), Some(1.0));
    assert_eq!(
        rec.value("etcd_server_leader_changes_seen_total"),
        Some(1.0)
    );
    assert_eq!(
        rec.value("etcd_server_proposals_committed_total"),
        Some(st.commit_index as f64)
    );
    let fsyncs = rec.samples("etcd_disk_wal_fsync_duration_seconds");
    assert!(fsyncs.len() >= 10, "{} fsync samples", fsyncs.len());
    assert!(fsyncs.iter().all(|s| (0.0..10.0).contains(s)), "{fsyncs:?}");

    drop(tx);
    handle.join();
    applier.join().unwrap();
}
