//! The client port's gRPC metrics under the names etcd 3.4 exposes them: go-grpc-prometheus'
//! server counters (`grpc_server_started_total`, `grpc_server_handled_total`,
//! `grpc_server_msg_received_total`, `grpc_server_msg_sent_total`, labelled by `grpc_type`,
//! `grpc_service`, `grpc_method` and, for `handled`, `grpc_code`) and etcd's own byte counters
//! (`etcd_network_client_grpc_received_bytes_total`, `etcd_network_client_grpc_sent_bytes_total`).
//!
//! [`GrpcMetricsLayer`] wraps the client gRPC router. Per call it:
//! - counts `started` when the request arrives;
//! - counts the gRPC messages of the request and response bodies as they pass, by reading the
//!   5-byte length prefix of each message (so a message split over several HTTP/2 DATA frames, or
//!   several messages in one, count right), adding each message's length to the byte counters;
//! - counts `handled` once per call, with the code of the `grpc-status` the server sent: in the
//!   response headers (a trailers-only answer, which is how errors before the first message go
//!   out) or in the trailers at the end of the response body (unary successes, and every
//!   stream, which is therefore counted when it ends). A call whose response or body is dropped
//!   before any `grpc-status` went out (the client reset the stream, or went away) counts as
//!   `Canceled`.
//!
//! Where this differs from etcd 3.4 (grpc-go with go-grpc-prometheus interceptors and etcd's
//! counting codec):
//! - etcd counts bytes in its codec, i.e. uncompressed message sizes; this counts the message
//!   lengths on the wire, which are the same unless a client compresses its requests (then the
//!   compressed size is counted);
//! - a stream the client cancels is `Canceled` here, whatever the handler would have returned:
//!   etcd's LeaseKeepAlive, for one, reports such a stream as `Unavailable`;
//! - a request grpc-go cannot decode never reaches etcd's interceptors; here it is counted as
//!   started and handled with the code the server answered (`Internal`, usually).
//!
//! As etcd 3.4 does (`grpc_prometheus.Register` in its v3rpc), every method of KV, Watch,
//! Lease, Cluster and Maintenance is pre-registered: its series exist at zero from start-up,
//! `handled` with every code. Lock and Election (registered after that call in etcd 3.4) and
//! Maintenance.Downgrade (newer than 3.4) get their series on first use. etcd 3.4 also
//! pre-registers Auth and grpc.health.v1.Health, which oxcd does not serve: those have no
//! series, and calls to them (answered Unimplemented outside this layer) are not counted.
//!
//! Cost per call: one hash lookup of the request path, no label strings (every metric handle
//! is created once per method and kept), two `Arc` clones, the boxing of the wrapped request
//! body, and a few atomic increments per message.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use axum::http::{HeaderMap, Request, Response};
use http_body::{Frame, SizeHint};
use metrics::Counter;

const STARTED: &str = "grpc_server_started_total";
const HANDLED: &str = "grpc_server_handled_total";
const MSG_RECEIVED: &str = "grpc_server_msg_received_total";
const MSG_SENT: &str = "grpc_server_msg_sent_total";
const BYTES_RECEIVED: &str = "etcd_network_client_grpc_received_bytes_total";
const BYTES_SENT: &str = "etcd_network_client_grpc_sent_bytes_total";

/// gRPC status codes by number, named as grpc-go's `codes.Code.String()` names them.
const CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];
const CANCELED: usize = 1;
const UNKNOWN: usize = 2;

/// How a method streams, as the `grpc_type` label names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Unary,
    ServerStream,
    BidiStream,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Unary => "unary",
            Kind::ServerStream => "server_stream",
            Kind::BidiStream => "bidi_stream",
        }
    }
}

/// The methods the client port serves: (service, method, kind, series from start-up).
#[rustfmt::skip]
const METHODS: &[(&str, &str, Kind, bool)] = &[
    ("etcdserverpb.KV", "Range", Kind::Unary, true),
    ("etcdserverpb.KV", "Put", Kind::Unary, true),
    ("etcdserverpb.KV", "DeleteRange", Kind::Unary, true),
    ("etcdserverpb.KV", "Txn", Kind::Unary, true),
    ("etcdserverpb.KV", "Compact", Kind::Unary, true),
    ("etcdserverpb.Watch", "Watch", Kind::BidiStream, true),
    ("etcdserverpb.Lease", "LeaseGrant", Kind::Unary, true),
    ("etcdserverpb.Lease", "LeaseRevoke", Kind::Unary, true),
    ("etcdserverpb.Lease", "LeaseKeepAlive", Kind::BidiStream, true),
    ("etcdserverpb.Lease", "LeaseTimeToLive", Kind::Unary, true),
    ("etcdserverpb.Lease", "LeaseLeases", Kind::Unary, true),
    ("etcdserverpb.Cluster", "MemberAdd", Kind::Unary, true),
    ("etcdserverpb.Cluster", "MemberRemove", Kind::Unary, true),
    ("etcdserverpb.Cluster", "MemberUpdate", Kind::Unary, true),
    ("etcdserverpb.Cluster", "MemberList", Kind::Unary, true),
    ("etcdserverpb.Cluster", "MemberPromote", Kind::Unary, true),
    ("etcdserverpb.Maintenance", "Alarm", Kind::Unary, true),
    ("etcdserverpb.Maintenance", "Status", Kind::Unary, true),
    ("etcdserverpb.Maintenance", "Defragment", Kind::Unary, true),
    ("etcdserverpb.Maintenance", "Hash", Kind::Unary, true),
    ("etcdserverpb.Maintenance", "HashKV", Kind::Unary, true),
    ("etcdserverpb.Maintenance", "Snapshot", Kind::ServerStream, true),
    ("etcdserverpb.Maintenance", "MoveLeader", Kind::Unary, true),
    ("etcdserverpb.Maintenance", "Downgrade", Kind::Unary, false),
    ("v3lockpb.Lock", "Lock", Kind::Unary, false),
    ("v3lockpb.Lock", "Unlock", Kind::Unary, false),
    ("v3electionpb.Election", "Campaign", Kind::Unary, false),
    ("v3electionpb.Election", "Proclaim", Kind::Unary, false),
    ("v3electionpb.Election", "Leader", Kind::Unary, false),
    ("v3electionpb.Election", "Observe", Kind::ServerStream, false),
    ("v3electionpb.Election", "Resign", Kind::Unary, false),
];

/// Every metric handle of one method.
struct Handles {
    started: Counter,
    handled: [Counter; CODES.len()],
    msg_received: Counter,
    msg_sent: Counter,
    bytes_received: Counter,
    bytes_sent: Counter,
}

impl Handles {
    fn new(service: &'static str, method: &'static str, kind: Kind) -> Handles {
        let kind = kind.label();
        // Labels in etcd's (alphabetical) order.
        let labels = [
            metrics::Label::from_static_parts("grpc_method", method),
            metrics::Label::from_static_parts("grpc_service", service),
            metrics::Label::from_static_parts("grpc_type", kind),
        ];
        let per_method = |name: &'static str| metrics::counter!(name, labels.iter());
        Handles {
            started: per_method(STARTED),
            handled: std::array::from_fn(|code| {
                metrics::counter!(
                    HANDLED,
                    "grpc_code" => CODES[code],
                    "grpc_method" => method,
                    "grpc_service" => service,
                    "grpc_type" => kind
                )
            }),
            msg_received: per_method(MSG_RECEIVED),
            msg_sent: per_method(MSG_SENT),
            bytes_received: metrics::counter!(BYTES_RECEIVED),
            bytes_sent: metrics::counter!(BYTES_SENT),
        }
    }

    fn handled(&self, code: usize) {
        self.handled[code].increment(1);
    }
}

/// One method's handles, created at start-up or on first use.
struct Entry {
    service: &'static str,
    method: &'static str,
    kind: Kind,
    handles: OnceLock<Arc<Handles>>,
}

impl Entry {
    fn handles(&self) -> &Arc<Handles> {
        self.handles
            .get_or_init(|| Arc::new(Handles::new(self.service, self.method, self.kind)))
    }
}

/// Counts the gRPC calls of the service it wraps; see the module docs.
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    /// By request path, `/<service>/<method>`.
    methods: Arc<HashMap<Box<str>, Entry>>,
}

impl GrpcMetricsLayer {
    /// Registers the metrics with the installed recorder (and the pre-registered series).
    pub fn new() -> GrpcMetricsLayer {
        describe();
        // The byte counters exist from start-up, as etcd's do.
        let _ = (
            metrics::counter!(BYTES_RECEIVED),
            metrics::counter!(BYTES_SENT),
        );
        let methods = METHODS
            .iter()
            .map(|&(service, method, kind, eager)| {
                let entry = Entry {
                    service,
                    method,
                    kind,
                    handles: OnceLock::new(),
                };
                if eager {
                    entry.handles();
                }
                (format!("/{service}/{method}").into_boxed_str(), entry)
            })
            .collect();
        GrpcMetricsLayer {
            methods: Arc::new(methods),
        }
    }
}

fn describe() {
    use metrics::describe_counter;
    describe_counter!(STARTED, "Total number of RPCs started on the server.");
    describe_counter!(
        HANDLED,
        "Total number of RPCs completed on the server, regardless of success or failure."
    );
    describe_counter!(
        MSG_RECEIVED,
        "Total number of RPC stream messages received on the server."
    );
    describe_counter!(
        MSG_SENT,
        "Total number of gRPC stream messages sent by the server."
    );
    describe_counter!(
        BYTES_RECEIVED,
        "The total number of bytes received from grpc clients."
    );
    describe_counter!(
        BYTES_SENT,
        "The total number of bytes sent to grpc clients."
    );
}

impl<S> tower_layer::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics {
            inner,
            methods: self.methods.clone(),
        }
    }
}

/// The service [`GrpcMetricsLayer`] makes.
#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    methods: Arc<HashMap<Box<str>, Entry>>,
}

impl<S, B> tower_service::Service<Request<Body>> for GrpcMetrics<S>
where
    S: tower_service::Service<Request<Body>, Response = Response<B>>,
{
    type Response = Response<ResponseBody<B>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // Paths no method answers to (tonic answers them Unimplemented) are not counted, as
        // grpc-go's interceptors never see them.
        let Some(handles) = self.methods.get(req.uri().path()).map(Entry::handles) else {
            return ResponseFuture {
                inner: self.inner.call(req),
                call: Call(None),
            };
        };
        handles.started.increment(1);
        let counted = handles.clone();
        let req = req.map(|body| {
            Body::new(RequestBody {
                inner: body,
                messages: Messages::default(),
                handles: counted,
            })
        });
        ResponseFuture {
            inner: self.inner.call(req),
            call: Call(Some(handles.clone())),
        }
    }
}

/// A call whose `handled` is not counted yet; dropped unanswered, it counts as `Canceled`.
struct Call(Option<Arc<Handles>>);

impl Drop for Call {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.handled(CANCELED);
        }
    }
}

pin_project_lite::pin_project! {
    /// The response of a counted call, once the wrapped service has it.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        call: Call,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let handles = this.call.0.take();
        Poll::Ready(match result {
            Ok(resp) => {
                let mut pending = handles.clone();
                if let (Some(h), Some(code)) = (&handles, grpc_status(resp.headers())) {
                    // Trailers-only: the call is over.
                    h.handled(code);
                    pending = None;
                }
                Ok(resp.map(|inner| ResponseBody {
                    inner,
                    messages: Messages::default(),
                    handles,
                    pending: Call(pending),
                }))
            }
            Err(e) => {
                if let Some(h) = handles {
                    h.handled(UNKNOWN);
                }
                Err(e)
            }
        })
    }
}

/// The code of a `grpc-status` header (`Unknown` for a value that is not a code).
fn grpc_status(headers: &HeaderMap) -> Option<usize> {
    let value = headers.get("grpc-status")?.as_bytes();
    let code = std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|c| *c < CODES.len());
    Some(code.unwrap_or(UNKNOWN))
}

/// Splits a byte stream into gRPC messages (1 byte compressed flag, 4 bytes big-endian length,
/// the message).
#[derive(Default)]
struct Messages {
    prefix: [u8; 5],
    /// Bytes of `prefix` read so far.
    have: usize,
    /// Length of the message being read.
    len: u64,
    /// Bytes of it still to come; 0 while a prefix is read.
    remaining: u64,
}

impl Messages {
    /// Feeds the next bytes; returns how many messages they completed and those messages'
    /// lengths, summed.
    fn feed(&mut self, mut data: &[u8]) -> (u64, u64) {
        let (mut count, mut bytes) = (0, 0);
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(data.len() as u64);
                self.remaining -= n;
                data = &data[n as usize..];
                if self.remaining == 0 {
                    count += 1;
                    bytes += self.len;
                }
                continue;
            }
            let n = (5 - self.have).min(data.len());
            self.prefix[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 5 {
                self.have = 0;
                let p = self.prefix;
                self.len = u32::from_be_bytes([p[1], p[2], p[3], p[4]]) as u64;
                self.remaining = self.len;
                if self.len == 0 {
                    count += 1;
                }
            }
        }
        (count, bytes)
    }
}

/// A request body whose messages are counted as the service reads them.
struct RequestBody {
    inner: Body,
    messages: Messages,
    handles: Arc<Handles>,
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(data) = frame.as_ref().and_then(|f| f.as_ref().ok()?.data_ref()) {
            let (count, bytes) = this.messages.feed(data);
            if count > 0 {
                this.handles.msg_received.increment(count);
                this.handles.bytes_received.increment(bytes);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body whose messages are counted as they go out, and whose trailers end the call.
pub struct ResponseBody<B> {
    inner: B,
    messages: Messages,
    /// None for calls that are not counted.
    handles: Option<Arc<Handles>>,
    /// Set until the call's `handled` is counted.
    pending: Call,
}

impl<B> HttpBody for ResponseBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        let Some(handles) = &this.handles else {
            return Poll::Ready(frame);
        };
        match &frame {
            Some(Ok(f)) => {
                if let Some(data) = f.data_ref() {
                    let (count, bytes) = this.messages.feed(data);
                    if count > 0 {
                        handles.msg_sent.increment(count);
                        handles.bytes_sent.increment(bytes);
                    }
                } else if let Some(trailers) = f.trailers_ref() {
                    if let Some(h) = this.pending.0.take() {
                        h.handled(grpc_status(trailers).unwrap_or(UNKNOWN));
                    }
                }
            }
            // The body failed, or ended without a status: not a call that went right.
            Some(Err(_)) | None => {
                if let Some(h) = this.pending.0.take() {
                    h.handled(UNKNOWN);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::convert::Infallible;

    use axum::http::HeaderValue;
    use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
    use tower_layer::Layer;
    use tower_service::Service;

    use super::*;

    /// A gRPC message as it goes over the wire.
    fn message(payload: &[u8]) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        m.extend_from_slice(payload);
        m
    }

    #[test]
    fn messages_are_counted_however_the_bytes_are_split() {
        let mut wire = message(b"hello");
        wire.extend(message(b""));
        wire.extend(message(&[7; 300]));
        let expect = (3, 305);
        for chunk in [1, 2, 3, 5, 6, 7, 64, wire.len()] {
            let mut m = Messages::default();
            let mut got = (0, 0);
            for part in wire.chunks(chunk) {
                let (c, b) = m.feed(part);
                got = (got.0 + c, got.1 + b);
            }
            assert_eq!(got, expect, "chunks of {chunk}");
            assert_eq!((m.have, m.remaining), (0, 0));
        }
        // A message not complete yet is not counted.
        let mut m = Messages::default();
        assert_eq!(m.feed(&message(b"abc")[..7]), (0, 0));
        assert_eq!(m.feed(b"c"), (1, 3));
    }

    /// A response body made of given frames.
    struct Frames(VecDeque<Frame<Bytes>>);

    impl HttpBody for Frames {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    /// One frame of a response body.
    #[derive(Clone)]
    enum Part {
        Data(Vec<u8>),
        Status(u8),
    }

    impl Part {
        fn frame(self) -> Frame<Bytes> {
            match self {
                Part::Data(d) => Frame::data(d.into()),
                Part::Status(code) => {
                    let mut t = HeaderMap::new();
                    t.insert("grpc-status", HeaderValue::from(u16::from(code)));
                    Frame::trailers(t)
                }
            }
        }
    }

    /// A service that reads the whole request, then answers with `reply`'s frames (or a
    /// trailers-only response with `status` when `reply` is None).
    #[derive(Clone)]
    struct Fake {
        reply: Option<Vec<Part>>,
        status: u8,
    }

    impl Service<Request<Body>> for Fake {
        type Response = Response<Frames>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Response<Frames>, Infallible>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<Body>) -> Self::Future {
            let me = self.clone();
            Box::pin(async move {
                let _ = axum::body::to_bytes(req.into_body(), usize::MAX).await;
                let trailers_only = me.reply.is_none();
                let frames = me.reply.unwrap_or_default().into_iter().map(Part::frame);
                let mut resp = Response::new(Frames(frames.collect()));
                if trailers_only {
                    resp.headers_mut()
                        .insert("grpc-status", HeaderValue::from(u16::from(me.status)));
                }
                Ok(resp)
            })
        }
    }

    fn recorder() -> (
        metrics_exporter_prometheus::PrometheusRecorder,
        PrometheusHandle,
    ) {
        let r = PrometheusBuilder::new().build_recorder();
        let h = r.handle();
        (r, h)
    }

    /// The value of the sample `series` (name and labels as rendered) in `text`.
    fn value(text: &str, series: &str) -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    fn request(path: &str, body: Vec<u8>) -> Request<Body> {
        Request::post(path)
            .header("content-type", "application/grpc")
            .body(Body::from(body))
            .unwrap()
    }

    async fn drain<B: HttpBody + Unpin>(mut body: B) {
        while std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx))
            .await
            .is_some()
        {}
    }

    #[tokio::test]
    async fn unary_calls_are_counted_by_method_and_code() {
        let (recorder, handle) = recorder();
        let layer = metrics::with_local_recorder(&recorder, GrpcMetricsLayer::new);

        // A Put answered with one message and OK in the trailers.
        let mut ok = layer.layer(Fake {
            reply: Some(vec![Part::Data(message(b"resp")), Part::Status(0)]),
            status: 0,
        });
        let put = message(b"key-value");
        for _ in 0..3 {
            let resp = ok
                .call(request("/etcdserverpb.KV/Put", put.clone()))
                .await
                .unwrap();
            drain(resp.into_body()).await;
        }
        // A Range refused before any message: trailers-only, InvalidArgument.
        let mut refused = layer.layer(Fake {
            reply: None,
            status: 3,
        });
        let resp = refused
            .call(request("/etcdserverpb.KV/Range", message(b"")))
            .await
            .unwrap();
        drain(resp.into_body()).await;
        // An unknown method is not counted at all.
        let resp = refused
            .call(request("/etcdserverpb.KV/Nope", message(b"x")))
            .await
            .unwrap();
        drain(resp.into_body()).await;

        let text = handle.render();
        let put = r#"grpc_method="Put",grpc_service="etcdserverpb.KV",grpc_type="unary"}"#;
        let range = r#"grpc_method="Range",grpc_service="etcdserverpb.KV",grpc_type="unary"}"#;
        let v = |s: String| value(&text, &s);
        assert_eq!(v(format!("{STARTED}{{{put}")), Some(3), "{text}");
        assert_eq!(v(format!("{HANDLED}{{grpc_code=\"OK\",{put}")), Some(3));
        assert_eq!(
            v(format!("{HANDLED}{{grpc_code=\"Canceled\",{put}")),
            Some(0)
        );
        assert_eq!(v(format!("{MSG_RECEIVED}{{{put}")), Some(3));
        assert_eq!(v(format!("{MSG_SENT}{{{put}")), Some(3));
        assert_eq!(v(format!("{STARTED}{{{range}")), Some(1));
        assert_eq!(
            v(format!("{HANDLED}{{grpc_code=\"InvalidArgument\",{range}")),
            Some(1)
        );
        assert_eq!(v(format!("{HANDLED}{{grpc_code=\"OK\",{range}")), Some(0));
        assert_eq!(v(format!("{MSG_SENT}{{{range}")), Some(0));
        assert_eq!(v(BYTES_RECEIVED.into()), Some(3 * 9));
        assert_eq!(v(BYTES_SENT.into()), Some(3 * 4));
        assert!(!text.contains("Nope"));
        // Pre-registered series exist at zero; methods etcd 3.4 registers late do not.
        let watch =
            r#"grpc_method="Watch",grpc_service="etcdserverpb.Watch",grpc_type="bidi_stream"}"#;
        assert_eq!(
            v(format!("{HANDLED}{{grpc_code=\"Unavailable\",{watch}")),
            Some(0)
        );
        assert!(!text.contains("v3lockpb.Lock"), "{text}");
    }

    #[tokio::test]
    async fn streams_are_handled_at_their_end_or_canceled_when_dropped() {
        let (recorder, handle) = recorder();
        let layer = metrics::with_local_recorder(&recorder, GrpcMetricsLayer::new);
        let mut watch = layer.layer(Fake {
            reply: Some(vec![
                Part::Data(message(b"created")),
                // Two messages in one DATA frame.
                Part::Data([message(b"ev1"), message(b"ev2")].concat()),
                Part::Status(0),
            ]),
            status: 0,
        });
        let two = [message(b"create"), message(b"cancel")].concat();
        let series =
            r#"grpc_method="Watch",grpc_service="etcdserverpb.Watch",grpc_type="bidi_stream"}"#;

        // A stream read to its end: OK when the trailers pass.
        let resp = watch
            .call(request("/etcdserverpb.Watch/Watch", two.clone()))
            .await
            .unwrap();
        let ok = format!("{HANDLED}{{grpc_code=\"OK\",{series}");
        assert_eq!(value(&handle.render(), &ok), Some(0), "not ended yet");
        drain(resp.into_body()).await;
        let text = handle.render();
        assert_eq!(value(&text, &ok), Some(1), "{text}");
        assert_eq!(value(&text, &format!("{MSG_RECEIVED}{{{series}")), Some(2));
        assert_eq!(value(&text, &format!("{MSG_SENT}{{{series}")), Some(3));

        // A stream whose client went away before its end.
        let resp = watch
            .call(request("/etcdserverpb.Watch/Watch", two))
            .await
            .unwrap();
        drop(resp);
        let text = handle.render();
        let canceled = format!("{HANDLED}{{grpc_code=\"Canceled\",{series}");
        assert_eq!(value(&text, &canceled), Some(1), "{text}");
        assert_eq!(value(&text, &format!("{STARTED}{{{series}")), Some(2));

        // A call dropped before the service answered.
        let fut = watch.call(request("/etcdserverpb.Watch/Watch", Vec::new()));
        drop(fut);
        assert_eq!(value(&handle.render(), &canceled), Some(2));

        // Lazily registered methods get their series on first use.
        let mut lock = layer.layer(Fake {
            reply: Some(vec![Part::Data(message(b"")), Part::Status(0)]),
            status: 0,
        });
        let resp = metrics::with_local_recorder(&recorder, || {
            lock.call(request("/v3lockpb.Lock/Lock", message(b"name")))
        })
        .await
        .unwrap();
        drain(resp.into_body()).await;
        let text = handle.render();
        let lock_ok = r#"grpc_server_handled_total{grpc_code="OK",grpc_method="Lock",grpc_service="v3lockpb.Lock",grpc_type="unary"}"#;
        assert_eq!(value(&text, lock_ok), Some(1), "{text}");
    }

    #[test]
    fn the_method_table_matches_the_protos() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
        let mut from_protos = Vec::new();
        for (file, package, services) in [
            (
                "etcdserverpb/rpc.proto",
                "etcdserverpb",
                &["KV", "Watch", "Lease", "Cluster", "Maintenance"][..],
            ),
            ("v3lockpb/v3lock.proto", "v3lockpb", &["Lock"][..]),
            (
                "v3electionpb/v3election.proto",
                "v3electionpb",
                &["Election"][..],
            ),
        ] {
            let text = std::fs::read_to_string(root.join(file)).unwrap();
            let mut service = None;
            for line in text.lines().map(str::trim) {
                if let Some(rest) = line.strip_prefix("service ") {
                    service = Some(rest.trim_end_matches(['{', ' ']).to_string());
                } else if let (Some(s), Some(rpc)) = (&service, line.strip_prefix("rpc ")) {
                    if !services.contains(&s.as_str()) {
                        continue;
                    }
                    let (name, rest) = rpc.split_once('(').unwrap();
                    let (request, response) = rest.split_once("returns").unwrap();
                    let kind = match (
                        request.trim().starts_with("stream "),
                        response
                            .trim()
                            .trim_start_matches('(')
                            .starts_with("stream "),
                    ) {
                        (false, false) => Kind::Unary,
                        (false, true) => Kind::ServerStream,
                        (true, true) => Kind::BidiStream,
                        (true, false) => panic!("client streams are not in etcd's API"),
                    };
                    from_protos.push((format!("{package}.{s}"), name.trim().to_string(), kind));
                }
            }
        }
        let table: Vec<_> = METHODS
            .iter()
            .map(|(s, m, k, _)| (s.to_string(), m.to_string(), *k))
            .collect();
        assert_eq!(table, from_protos);
    }
}
