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
    watch_request::RequestUnion, watch_server::Watch, RangeRequest, WatchRequest, WatchResponse,
};
use oxcd_proto::mvccpb::{Event, KeyValue};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use watch::{History, HistoryError, Notice, WatchError, WatchHub, WatchSpec};

use crate::gateway::Gateway;
use crate::header::HeaderSource;

/// Notices buffered per stream before its watchers are set aside as slow (etcd: 128).
const SINK_CAPACITY: usize = 128;
/// Encoded responses handed to gRPC in one go, at most (plus one response): what a stream
/// buffers for a client that reads slowly (gRPC's own threshold is 32 KiB, in buffers that
/// grow to 64 KiB, which across 1000 streams is most of the server's memory).
const CHUNK_BYTES: usize = 8 * 1024;

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

    fn value_at(&self, key: &[u8], rev: i64) -> Result<Option<KeyValue>, HistoryError> {
        let req = RangeRequest {
            key: key.to_vec(),
            revision: rev,
            ..Default::default()
        };
        match self.0.range(&req) {
            Ok(resp) => Ok(resp.kvs.into_iter().next()),
            Err(MvccError::Compacted) => Err(HistoryError::Compacted {
                compact_revision: self.0.compact_revision(),
            }),
            Err(other) => Err(HistoryError::Unavailable(other.to_string())),
        }
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

        Ok(Response::new(Box::pin(Responses::new(
            self.gw.headers().clone(),
            self.gw.limits().max_request_bytes,
            sink_rx,
            failed_rx,
        ))))
    }
}

/// A watch stream's responses, made from the hub's notices only when gRPC asks for the next
/// one. Nothing is converted, nor copied out of the hub's shared event batches, before the
/// connection can take it: a client that reads slowly holds back notices (a few words each,
/// at most `SINK_CAPACITY`), and the hub then moves its watchers aside to catch up later.
struct Responses {
    headers: HeaderSource,
    max_bytes: usize,
    notices: mpsc::Receiver<Notice>,
    /// Fragments of a notice not yet handed out.
    ready: VecDeque<WatchResponse>,
    /// The request side failed for good: the stream ends with this status.
    failed: Option<oneshot::Receiver<Status>>,
    ended: bool,
    /// Bytes handed to gRPC since the stream last paused.
    unflushed: usize,
}

impl Responses {
    fn new(
        headers: HeaderSource,
        max_bytes: usize,
        notices: mpsc::Receiver<Notice>,
        failed: oneshot::Receiver<Status>,
    ) -> Self {
        Responses {
            headers,
            max_bytes,
            notices,
            ready: VecDeque::new(),
            failed: Some(failed),
            ended: false,
            unflushed: 0,
        }
    }
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
        if me.unflushed >= CHUNK_BYTES {
            // gRPC encodes what it is given into one buffer until the stream pauses; the
            // buffer then waits whole in HTTP/2's send queue for the client's window. A
            // pause here (with a wake-up) keeps each stream's share of that queue small.
            me.unflushed = 0;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let resp = match me.ready.pop_front() {
            Some(resp) => resp,
            None => match me.notices.poll_recv(cx) {
                Poll::Ready(Some(notice)) => {
                    me.ready
                        .extend(to_responses(&me.headers, notice, me.max_bytes));
                    match me.ready.pop_front() {
                        Some(resp) => resp,
                        None => return Poll::Ready(None),
                    }
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {
                    me.unflushed = 0;
                    return Poll::Pending;
                }
            },
        };
        me.unflushed += resp.encoded_len();
        Poll::Ready(Some(Ok(resp)))
    }
}

fn to_responses(headers: &HeaderSource, notice: Notice, max_bytes: usize) -> Vec<WatchResponse> {
    let header = |rev: i64| Some(headers.header(rev));
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
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Waker;

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

    /// A reader that keeps asking gets every response in order, with a pause (and a
    /// wake-up) after each `CHUNK_BYTES` or so, where gRPC hands its buffer to HTTP/2.
    #[test]
    fn responses_pause_every_chunk_and_keep_their_order() {
        const N: i64 = 2000;
        let (tx, rx) = mpsc::channel(N as usize);
        let (_failed_tx, failed_rx) = oneshot::channel();
        for revision in 0..N {
            tx.try_send(Notice::Progress {
                watch_id: 7,
                revision,
            })
            .unwrap();
        }
        drop(tx);
        let mut responses = Responses::new(HeaderSource::new(1, 2), 1 << 20, rx, failed_rx);
        let woken = Arc::new(Wakes::default());
        let waker = Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);
        let (mut got, mut pauses, mut run, mut longest) = (Vec::new(), 0, 0, 0);
        loop {
            match Pin::new(&mut responses).poll_next(&mut cx) {
                Poll::Ready(Some(Ok(resp))) => {
                    run += resp.encoded_len();
                    got.push(resp.header.unwrap().revision);
                }
                Poll::Ready(Some(Err(status))) => panic!("{status}"),
                Poll::Ready(None) => break,
                Poll::Pending => {
                    assert_eq!(
                        woken.0.swap(0, Ordering::SeqCst),
                        1,
                        "pause without wake-up"
                    );
                    longest = longest.max(run);
                    run = 0;
                    pauses += 1;
                }
            }
        }
        assert_eq!(got, (0..N).collect::<Vec<_>>());
        let per_response = WatchResponse {
            header: Some(HeaderSource::new(1, 2).header(N)),
            watch_id: 7,
            ..Default::default()
        }
        .encoded_len();
        assert!(longest >= CHUNK_BYTES && longest <= CHUNK_BYTES + per_response);
        assert!(pauses >= N as usize * per_response / (CHUNK_BYTES + per_response));
    }

    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
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
