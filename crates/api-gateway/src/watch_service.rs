//! etcd's Watch service: one bidirectional stream per client call, carrying any number of
//! watchers. Requests become commands on the watch hub (`watch::WatchStream`); the hub's
//! notices for the stream become `WatchResponse`s, split into fragments when a watcher asked
//! for it and the response would exceed `--max-request-bytes`.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use mvcc_store::{MvccError, MvccStore};
use oxcd_proto::etcdserverpb::{
    watch_request::RequestUnion, watch_server::Watch, WatchRequest, WatchResponse,
};
use oxcd_proto::mvccpb::Event;
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use watch::{History, HistoryError, Notice, WatchError, WatchHub, WatchSpec};

use crate::gateway::Gateway;

/// Notices buffered per stream before its watchers are set aside as slow (etcd: 128).
const SINK_CAPACITY: usize = 128;

/// The mvcc store as the watch hub's history.
pub struct StoreHistory(pub MvccStore);

impl History for StoreHistory {
    fn current_revision(&self) -> i64 {
        self.0.current_revision()
    }

    fn compact_revision(&self) -> i64 {
        self.0.compact_revision()
    }

    fn events_since(&self, start_rev: i64, limit: usize) -> Result<Vec<Event>, HistoryError> {
        self.0.events_since(start_rev, limit).map_err(|e| match e {
            MvccError::Compacted => HistoryError::Compacted {
                compact_revision: self.0.compact_revision(),
            },
            other => HistoryError::Unavailable(other.to_string()),
        })
    }
}

pub struct WatchService {
    gw: Gateway,
    hub: WatchHub,
}

impl WatchService {
    pub fn new(gw: Gateway, hub: WatchHub) -> Self {
        WatchService { gw, hub }
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = ResponseStream;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let mut inbound = request.into_inner();
        let (sink_tx, sink_rx) = mpsc::channel::<Notice>(SINK_CAPACITY);
        let (failed_tx, failed_rx) = oneshot::channel();
        let stream = self.hub.open_stream(sink_tx);

        // Requests: the stream's watchers live as long as this task holds `stream`; when the
        // client half-closes or goes away, dropping it cancels them and closes the sink.
        tokio::spawn(async move {
            loop {
                let req = match inbound.next().await {
                    Some(Ok(req)) => req,
                    Some(Err(status)) => {
                        tracing::debug!(%status, "watch stream receive failed");
                        break;
                    }
                    None => break,
                };
                let outcome = match req.request_union {
                    Some(RequestUnion::CreateRequest(create)) => {
                        stream.watch(WatchSpec::from(&create)).await.map(|_| ())
                    }
                    // etcd answers a cancel only when the watcher existed.
                    Some(RequestUnion::CancelRequest(cancel)) => {
                        match stream.cancel(cancel.watch_id).await {
                            Err(WatchError::NotExist) => Ok(()),
                            other => other,
                        }
                    }
                    Some(RequestUnion::ProgressRequest(_)) => stream.request_progress().await,
                    None => Ok(()),
                };
                if let Err(e) = outcome {
                    if matches!(e, WatchError::HubStopped | WatchError::StreamClosed) {
                        let _ = failed_tx.send(Status::unavailable(format!("etcdserver: {e}")));
                        break;
                    }
                    tracing::debug!(error = %e, "watch request refused");
                }
            }
            drop(stream);
        });

        Ok(Response::new(Box::pin(Responses {
            gw: self.gw.clone(),
            max_bytes: self.gw.limits().max_request_bytes,
            notices: sink_rx,
            ready: VecDeque::new(),
            failed: Some(failed_rx),
            ended: false,
        })))
    }
}

/// A watch stream's responses, made from the hub's notices only when gRPC asks for the next
/// one. Nothing is converted, nor copied out of the hub's shared event batches, before the
/// connection can take it: a client that reads slowly holds back notices (a few words each,
/// at most `SINK_CAPACITY`), and the hub then moves its watchers aside to catch up later.
struct Responses {
    gw: Gateway,
    max_bytes: usize,
    notices: mpsc::Receiver<Notice>,
    /// Fragments of a notice not yet handed out.
    ready: VecDeque<WatchResponse>,
    /// The request side failed for good: the stream ends with this status.
    failed: Option<oneshot::Receiver<Status>>,
    ended: bool,
}

impl Stream for Responses {
    type Item = Result<WatchResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let me = self.get_mut();
        if me.ended {
            return Poll::Ready(None);
        }
        if let Some(failed) = me.failed.as_mut() {
            if let Poll::Ready(result) = Pin::new(failed).poll(cx) {
                me.failed = None;
                if let Ok(status) = result {
                    me.ended = true;
                    return Poll::Ready(Some(Err(status)));
                }
            }
        }
        if let Some(resp) = me.ready.pop_front() {
            return Poll::Ready(Some(Ok(resp)));
        }
        match me.notices.poll_recv(cx) {
            Poll::Ready(Some(notice)) => {
                me.ready.extend(to_responses(&me.gw, notice, me.max_bytes));
                Poll::Ready(me.ready.pop_front().map(Ok))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

fn to_responses(gw: &Gateway, notice: Notice, max_bytes: usize) -> Vec<WatchResponse> {
    let header = |rev: i64| Some(gw.headers().header(rev));
    match notice {
        Notice::Created { watch_id, revision } => vec![WatchResponse {
            header: header(revision),
            watch_id,
            created: true,
            ..Default::default()
        }],
        Notice::Rejected { revision, reason } => vec![WatchResponse {
            header: header(revision),
            watch_id: -1,
            created: true,
            canceled: true,
            cancel_reason: reason,
            ..Default::default()
        }],
        Notice::Events {
            watch_id,
            revision,
            events,
            fragment,
            pending: _pending,
        } => {
            let whole = WatchResponse {
                header: header(revision),
                watch_id,
                events: events.to_vec(),
                ..Default::default()
            };
            if fragment {
                fragments(whole, max_bytes)
            } else {
                vec![whole]
            }
        }
        Notice::Progress { watch_id, revision } => vec![WatchResponse {
            header: header(revision),
            watch_id,
            ..Default::default()
        }],
        Notice::Canceled {
            watch_id,
            revision,
            compact_revision,
        } => vec![WatchResponse {
            header: header(revision),
            watch_id,
            canceled: true,
            compact_revision,
            cancel_reason: if compact_revision != 0 {
                "etcdserver: mvcc: required revision has been compacted".into()
            } else {
                String::new()
            },
            ..Default::default()
        }],
    }
}

/// Splits a response whose encoding reaches `max_bytes` into responses of at least one event
/// each, all but the last flagged `fragment`, as etcd does for watchers that ask for it.
pub fn fragments(whole: WatchResponse, max_bytes: usize) -> Vec<WatchResponse> {
    if whole.events.len() < 2 || whole.encoded_len() < max_bytes {
        return vec![whole];
    }
    let mut template = whole;
    let events = std::mem::take(&mut template.events);
    let base = template.encoded_len();
    let mut out: Vec<WatchResponse> = Vec::new();
    let mut cur: Vec<Event> = Vec::new();
    let mut size = base;
    for ev in events {
        let len = ev.encoded_len();
        // Field tag + length prefix of one repeated message.
        let cost = 1 + prost::length_delimiter_len(len) + len;
        if !cur.is_empty() && size + cost >= max_bytes {
            out.push(WatchResponse {
                events: std::mem::take(&mut cur),
                fragment: true,
                ..template.clone()
            });
            size = base;
        }
        size += cost;
        cur.push(ev);
    }
    out.push(WatchResponse {
        events: cur,
        fragment: false,
        ..template
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use oxcd_proto::mvccpb::KeyValue;

    fn ev(key: &str, val_len: usize, rev: i64) -> Event {
        Event {
            r#type: 0,
            kv: Some(KeyValue {
                key: key.as_bytes().to_vec(),
                value: vec![b'x'; val_len],
                mod_revision: rev,
                create_revision: rev,
                version: 1,
                lease: 0,
            }),
            prev_kv: None,
        }
    }

    #[test]
    fn small_responses_are_not_fragmented() {
        let whole = WatchResponse {
            watch_id: 3,
            events: vec![ev("a", 10, 2), ev("b", 10, 2)],
            ..Default::default()
        };
        let parts = fragments(whole.clone(), 1024);
        assert_eq!(parts, vec![whole]);
    }

    #[test]
    fn large_responses_split_below_the_limit_and_keep_every_event_in_order() {
        let events: Vec<Event> = (0..50).map(|i| ev(&format!("k{i:02}"), 100, 7)).collect();
        let whole = WatchResponse {
            watch_id: 1,
            events: events.clone(),
            ..Default::default()
        };
        let parts = fragments(whole, 1000);
        assert!(parts.len() > 5, "{} parts", parts.len());
        for (i, p) in parts.iter().enumerate() {
            assert_eq!(p.fragment, i + 1 < parts.len());
            assert!(
                p.encoded_len() < 1000,
                "part {i} is {} bytes",
                p.encoded_len()
            );
            assert_eq!(p.watch_id, 1);
        }
        let joined: Vec<Event> = parts.into_iter().flat_map(|p| p.events).collect();
        assert_eq!(joined, events);
    }

    #[test]
    fn one_oversized_event_is_sent_alone() {
        let whole = WatchResponse {
            events: vec![ev("a", 5000, 2), ev("b", 5000, 2), ev("c", 10, 2)],
            ..Default::default()
        };
        let parts = fragments(whole, 1000);
        assert_eq!(
            parts.iter().map(|p| p.events.len()).collect::<Vec<_>>(),
            vec![1, 1, 1]
        );
        assert!(!parts[2].fragment && parts[0].fragment && parts[1].fragment);
    }
}
