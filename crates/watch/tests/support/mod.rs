//! A fake store for driving the hub: an in-memory event history plus a publisher that, like
//! the applier, writes a revision to the history first and then announces it on the channel.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oxcd_proto::mvccpb::{event::EventType, Event, KeyValue};
use tokio::sync::mpsc;
use watch::{Events, History, HistoryError, Notice, WatchConfig, WatchHub, WatchSpec, WatchStream};

#[derive(Default)]
struct State {
    events: Vec<Event>,
    rev: i64,
    compact: i64,
    live: HashMap<Vec<u8>, KeyValue>,
    reads: usize,
}

#[derive(Clone, Default)]
pub struct FakeHistory {
    state: Arc<Mutex<State>>,
}

impl FakeHistory {
    /// Records one revision made of `ops` (`Some(value)` puts, `None` deletes) and returns
    /// what the applier would publish for it.
    pub fn apply(&self, ops: &[(&[u8], Option<&[u8]>)]) -> Events {
        let mut st = self.state.lock().unwrap();
        st.rev += 1;
        let rev = st.rev;
        let mut events = Vec::new();
        for (key, value) in ops {
            let prev = st.live.get(*key).cloned();
            let ev = match value {
                Some(v) => {
                    let kv = KeyValue {
                        key: key.to_vec(),
                        value: v.to_vec(),
                        create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
                        mod_revision: rev,
                        version: prev.as_ref().map_or(1, |p| p.version + 1),
                        lease: 0,
                    };
                    st.live.insert(key.to_vec(), kv.clone());
                    Event {
                        r#type: EventType::Put as i32,
                        kv: Some(kv),
                        prev_kv: prev,
                    }
                }
                None => {
                    st.live.remove(*key);
                    Event {
                        r#type: EventType::Delete as i32,
                        kv: Some(KeyValue {
                            key: key.to_vec(),
                            mod_revision: rev,
                            ..Default::default()
                        }),
                        prev_kv: prev,
                    }
                }
            };
            events.push(ev);
        }
        st.events.extend(events.iter().cloned());
        Events {
            revision: rev,
            events,
        }
    }

    pub fn put(&self, key: &[u8], value: &[u8]) -> Events {
        self.apply(&[(key, Some(value))])
    }

    pub fn compact(&self, rev: i64) {
        let mut st = self.state.lock().unwrap();
        st.compact = rev;
        st.events
            .retain(|e| e.kv.as_ref().unwrap().mod_revision >= rev);
    }

    pub fn revision(&self) -> i64 {
        self.state.lock().unwrap().rev
    }

    /// (revision, key, type) of every event recorded.
    pub fn all_events(&self) -> Vec<(i64, Vec<u8>, i32)> {
        let st = self.state.lock().unwrap();
        st.events
            .iter()
            .map(|e| {
                let kv = e.kv.as_ref().unwrap();
                (kv.mod_revision, kv.key.clone(), e.r#type)
            })
            .collect()
    }

    /// How many times the hub read the history.
    pub fn reads(&self) -> usize {
        self.state.lock().unwrap().reads
    }
}

impl History for FakeHistory {
    fn current_revision(&self) -> i64 {
        self.state.lock().unwrap().rev
    }

    fn compact_revision(&self) -> i64 {
        self.state.lock().unwrap().compact
    }

    fn events_since(&self, start_rev: i64, limit: usize) -> Result<Vec<Event>, HistoryError> {
        let mut st = self.state.lock().unwrap();
        st.reads += 1;
        if start_rev < st.compact {
            return Err(HistoryError::Compacted {
                compact_revision: st.compact,
            });
        }
        let rev = |e: &Event| e.kv.as_ref().unwrap().mod_revision;
        let from = st.events.partition_point(|e| rev(e) < start_rev);
        let mut out: Vec<Event> = Vec::new();
        for e in &st.events[from..] {
            if out.len() >= limit && rev(e) != rev(out.last().unwrap()) {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    fn value_at(&self, key: &[u8], rev: i64) -> Result<Option<KeyValue>, HistoryError> {
        let mut st = self.state.lock().unwrap();
        st.reads += 1;
        if rev < st.compact {
            return Err(HistoryError::Compacted {
                compact_revision: st.compact,
            });
        }
        let last = st.events.iter().rev().find(|e| {
            let kv = e.kv.as_ref().unwrap();
            kv.key == key && kv.mod_revision <= rev
        });
        Ok(last
            .filter(|e| e.r#type == EventType::Put as i32)
            .and_then(|e| e.kv.clone()))
    }
}

pub struct Rig {
    pub history: FakeHistory,
    pub hub: WatchHub,
    pub publish: mpsc::Sender<Events>,
}

impl Rig {
    pub fn new(cfg: WatchConfig) -> Rig {
        Self::with_history(FakeHistory::default(), cfg)
    }

    pub fn with_history(history: FakeHistory, cfg: WatchConfig) -> Rig {
        let (publish, events) = mpsc::channel(64);
        let hub = WatchHub::start(Arc::new(history.clone()), events, cfg);
        Rig {
            history,
            hub,
            publish,
        }
    }

    pub async fn put(&self, key: &[u8], value: &[u8]) -> i64 {
        let ev = self.history.put(key, value);
        let rev = ev.revision;
        self.publish.send(ev).await.unwrap();
        rev
    }

    pub async fn apply(&self, ops: &[(&[u8], Option<&[u8]>)]) -> i64 {
        let ev = self.history.apply(ops);
        let rev = ev.revision;
        self.publish.send(ev).await.unwrap();
        rev
    }

    pub fn stream(&self, capacity: usize) -> (WatchStream, mpsc::Receiver<Notice>) {
        let (tx, rx) = mpsc::channel(capacity);
        (self.hub.open_stream(tx), rx)
    }

    /// Waits until the hub has taken in every revision published so far.
    pub async fn settle(&self) {
        let want = self.history.revision();
        for _ in 0..2000 {
            if self.hub.revision() >= want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("hub stuck below revision {want}");
    }
}

pub fn spec(key: &[u8], range_end: &[u8]) -> WatchSpec {
    WatchSpec {
        key: key.to_vec(),
        range_end: range_end.to_vec(),
        ..Default::default()
    }
}

pub async fn next(rx: &mut mpsc::Receiver<Notice>) -> Notice {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("no notice within 10s")
        .expect("sink closed")
}

/// Asserts nothing arrives for a short while.
pub async fn quiet(rx: &mut mpsc::Receiver<Notice>) {
    if let Ok(Some(n)) = tokio::time::timeout(Duration::from_millis(150), rx.recv()).await {
        panic!("unexpected notice {n:?}");
    }
}

/// (revision, key, type) of each event, for compact assertions.
pub fn summary(events: &[Event]) -> Vec<(i64, String, i32)> {
    events
        .iter()
        .map(|e| {
            let kv = e.kv.as_ref().unwrap();
            (
                kv.mod_revision,
                String::from_utf8_lossy(&kv.key).into_owned(),
                e.r#type,
            )
        })
        .collect()
}

/// Collects events for `watch_id` until `count` have arrived, checking that they come in
/// strictly increasing (revision, position) order with whole revisions per notice.
pub async fn collect_events(
    rx: &mut mpsc::Receiver<Notice>,
    watch_id: i64,
    count: usize,
) -> Vec<Event> {
    let mut out: Vec<Event> = Vec::with_capacity(count);
    while out.len() < count {
        match next(rx).await {
            Notice::Events {
                watch_id: id,
                revision,
                events,
                ..
            } if id == watch_id => {
                let events = events.to_vec();
                let last = events.last().unwrap().kv.as_ref().unwrap().mod_revision;
                assert!(
                    revision >= last,
                    "header revision {revision} below event {last}"
                );
                if let Some(prev) = out.last() {
                    let prev = prev.kv.as_ref().unwrap().mod_revision;
                    let first = events[0].kv.as_ref().unwrap().mod_revision;
                    assert!(first > prev, "revision {first} after {prev}: not ordered");
                }
                out.extend(events);
            }
            Notice::Progress { .. } | Notice::Created { .. } => {}
            other => panic!("unexpected notice {other:?}"),
        }
    }
    out
}
