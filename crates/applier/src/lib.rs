//! applier: turns committed raft entries into state, in log order, on every member.
//!
//! Reads: `Committed` batches from raft-node's committed channel.
//! Writes: each entry into mvcc-store (one engine batch per entry, carrying the raft index, so a
//! restart replays exactly what was not applied yet); the resulting `Events` to the watch hub;
//! the applied index on a `tokio::sync::watch` channel (linearizable reads wait on it); and the
//! outcome to the proposer's oneshot, which only the member that proposed the entry holds.

use std::time::Instant;

use oxcd_proto::etcdserverpb::{
    CompactionResponse, DeleteRangeResponse, InternalRaftRequest, PutResponse, TxnResponse,
};
use prost::Message;
use raft_node::{Committed, CommittedEntry, EntryKind};
use tokio::sync::{mpsc, oneshot};

pub use mvcc_store::{CompactionWait, MvccError, MvccStore};

/// The reply channel a proposer hands to raft-node with its proposal.
pub type Responder = oneshot::Sender<Result<ApplyResponse, ApplyError>>;

/// What applying one request produced, for the client that proposed it.
#[derive(Debug)]
pub enum ApplyResponse {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    Compact {
        response: CompactionResponse,
        /// Resolves once the compacted revisions are physically gone.
        physical: Option<CompactionWait>,
    },
    /// Entries with no client-visible result (raft's empty entries, membership changes).
    Empty {
        revision: i64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Mvcc(#[from] MvccError),
    #[error("applier: undecodable entry at index {index}: {reason}")]
    Decode { index: u64, reason: String },
    #[error("applier: entry at index {index} carries no request")]
    EmptyRequest { index: u64 },
}

/// Requests that go through raft, as the api-gateway builds them.
pub fn encode_request(req: &InternalRaftRequest) -> Vec<u8> {
    req.encode_to_vec()
}

/// Decodes an entry payload; also used by `oxcd dump-logs`.
pub fn decode_request(data: &[u8]) -> Result<InternalRaftRequest, prost::DecodeError> {
    InternalRaftRequest::decode(data)
}

/// Everything one applied request changed, at one revision, for the watch layer.
pub use watch::Events;

pub struct Applier {
    store: MvccStore,
    events_tx: Option<mpsc::Sender<Events>>,
    applied_tx: tokio::sync::watch::Sender<u64>,
}

impl Applier {
    pub fn new(
        store: MvccStore,
        events_tx: Option<mpsc::Sender<Events>>,
        applied_tx: tokio::sync::watch::Sender<u64>,
    ) -> Self {
        Applier {
            store,
            events_tx,
            applied_tx,
        }
    }

    /// Runs until raft-node closes the committed channel. Blocking: give it its own thread,
    /// so engine writes never stall the async runtime.
    pub fn run(mut self, mut committed: mpsc::Receiver<Committed<Responder>>) {
        while let Some(batch) = committed.blocking_recv() {
            let mut last = None;
            for entry in batch.entries {
                last = Some(entry.index);
                self.apply_entry(entry);
            }
            if let Some(index) = last {
                self.applied_tx.send_replace(index);
            }
        }
        tracing::info!("applier: committed channel closed, stopping");
    }

    fn apply_entry(&mut self, entry: CommittedEntry<Responder>) {
        let started = Instant::now();
        let index = entry.index;
        let outcome = self.apply_payload(index, entry.kind, &entry.data);
        metrics::counter!("etcd_server_proposals_applied_total").increment(1);
        metrics::gauge!("oxcd_applier_applied_index").set(index as f64);
        let took = started.elapsed();
        if took.as_millis() >= 100 {
            tracing::warn!(
                index,
                took_ms = took.as_millis() as u64,
                "apply request took too long"
            );
        }
        if let Some(reply) = entry.reply {
            // The client may have gone away; its result is applied all the same.
            let _ = reply.send(outcome);
        } else if let Err(e) = outcome {
            tracing::debug!(index, error = %e, "applied entry failed (no waiting client)");
        }
    }

    fn apply_payload(
        &mut self,
        index: u64,
        kind: EntryKind,
        data: &[u8],
    ) -> Result<ApplyResponse, ApplyError> {
        use mvcc_store::WriteOp;
        if matches!(kind, EntryKind::ConfChange) || data.is_empty() {
            let applied = self.store.apply(index, WriteOp::Noop, &|_| false)?;
            return Ok(ApplyResponse::Empty {
                revision: applied.revision,
            });
        }
        let req = decode_request(data).map_err(|e| ApplyError::Decode {
            index,
            reason: e.to_string(),
        })?;
        // Leases arrive with the lease layer; until then no lease id exists.
        let lease_exists = |_id: i64| false;
        let op = if let Some(put) = req.put.as_ref() {
            WriteOp::Put(put)
        } else if let Some(del) = req.delete_range.as_ref() {
            WriteOp::DeleteRange(del)
        } else if let Some(txn) = req.txn.as_ref() {
            WriteOp::Txn(txn)
        } else if let Some(c) = req.compaction.as_ref() {
            WriteOp::Compact(c)
        } else {
            // Record the index even for requests this member does not know, so replay stays exact.
            self.store.apply(index, WriteOp::Noop, &lease_exists)?;
            return Err(ApplyError::EmptyRequest { index });
        };
        let applied = self.store.apply(index, op, &lease_exists)?;
        if let (Some(tx), false) = (&self.events_tx, applied.events.is_empty()) {
            let events = Events {
                revision: applied.revision,
                events: applied.events,
            };
            // Blocking send: the watch hub drains quickly and must see every revision.
            if tx.blocking_send(events).is_err() {
                tracing::debug!("watch hub gone; events dropped");
            }
        }
        use mvcc_store::WriteResponse as W;
        Ok(match applied.response {
            W::Put(r) => ApplyResponse::Put(r),
            W::DeleteRange(r) => ApplyResponse::DeleteRange(r),
            W::Txn(r) => ApplyResponse::Txn(r),
            W::Compact(r) => ApplyResponse::Compact {
                response: r,
                physical: applied.compaction,
            },
            W::None => ApplyResponse::Empty {
                revision: applied.revision,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvcc_store::MemEngine;
    use oxcd_proto::etcdserverpb::{CompactionRequest, PutRequest, RangeRequest};
    use std::sync::Arc;

    struct Rig {
        committed: mpsc::Sender<Committed<Responder>>,
        events: mpsc::Receiver<Events>,
        applied: tokio::sync::watch::Receiver<u64>,
        store: MvccStore,
        thread: std::thread::JoinHandle<()>,
    }

    fn rig() -> Rig {
        let store = MvccStore::open(Arc::new(MemEngine::default())).unwrap();
        let (committed, committed_rx) = mpsc::channel(16);
        let (events_tx, events) = mpsc::channel(16);
        let (applied_tx, applied) = tokio::sync::watch::channel(0);
        let applier = Applier::new(store.clone(), Some(events_tx), applied_tx);
        let thread = std::thread::spawn(move || applier.run(committed_rx));
        Rig {
            committed,
            events,
            applied,
            store,
            thread,
        }
    }

    fn put(key: &str, value: &str) -> Vec<u8> {
        encode_request(&InternalRaftRequest {
            put: Some(PutRequest {
                key: key.into(),
                value: value.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn entry(index: u64, data: Vec<u8>, reply: Option<Responder>) -> CommittedEntry<Responder> {
        CommittedEntry {
            index,
            term: 2,
            kind: EntryKind::Normal,
            data,
            reply,
        }
    }

    #[tokio::test]
    async fn applies_in_order_answers_the_proposer_and_publishes_events() {
        let mut r = rig();
        let (tx, rx) = oneshot::channel();
        r.committed
            .send(Committed {
                entries: vec![
                    entry(1, vec![], None),
                    entry(2, put("a", "1"), None),
                    entry(3, put("a", "2"), Some(tx)),
                ],
            })
            .await
            .unwrap();
        match rx.await.unwrap().unwrap() {
            ApplyResponse::Put(resp) => assert_eq!(resp.header.unwrap().revision, 3),
            other => panic!("unexpected {other:?}"),
        }
        r.applied.wait_for(|a| *a == 3).await.unwrap();
        assert_eq!(r.store.applied_index(), 3);
        let first = r.events.recv().await.unwrap();
        let second = r.events.recv().await.unwrap();
        assert_eq!((first.revision, second.revision), (2, 3));
        assert_eq!(second.events[0].kv.as_ref().unwrap().version, 2);

        let got = r
            .store
            .range(&RangeRequest {
                key: b"a".to_vec(),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(got.kvs[0].value, b"2");
        drop(r.committed);
        r.thread.join().unwrap();
    }

    #[tokio::test]
    async fn failures_reach_the_proposer_and_garbage_never_panics() {
        let r = rig();
        let (tx1, rx1) = oneshot::channel();
        let (tx2, rx2) = oneshot::channel();
        let compact_future = encode_request(&InternalRaftRequest {
            compaction: Some(CompactionRequest {
                revision: 100,
                physical: false,
            }),
            ..Default::default()
        });
        r.committed
            .send(Committed {
                entries: vec![
                    entry(1, compact_future, Some(tx1)),
                    entry(2, vec![0xff, 0xff, 0xff], Some(tx2)),
                ],
            })
            .await
            .unwrap();
        assert!(matches!(
            rx1.await.unwrap(),
            Err(ApplyError::Mvcc(MvccError::FutureRevision))
        ));
        assert!(matches!(
            rx2.await.unwrap(),
            Err(ApplyError::Decode { index: 2, .. })
        ));
        drop(r.committed);
        r.thread.join().unwrap();
    }
}
