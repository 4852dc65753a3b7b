//! Watch scenarios: put-to-event latency (`watch-latency`) and delivery to many watchers over
//! many streams (`watch-fanout`). Both create every watcher first, then issue paced puts whose
//! value carries the put's number, and time each event from the moment its put was sent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use futures::channel::mpsc;
use oxcd_proto::etcdserverpb::{watch_request, PutRequest, WatchCreateRequest, WatchRequest};
use tokio::sync::watch as signal;

use super::{status_kind, Common, Percentiles, Pool, Progress, Report, Stats};
use crate::error::{Error, Result};

#[derive(Args, Debug, Clone)]
pub struct WatchArgs {
    /// Watch streams (gRPC Watch calls), spread over the connections.
    #[arg(long, default_value_t = 1)]
    pub streams: usize,
    /// Watchers created on each stream.
    #[arg(long, default_value_t = 10)]
    pub watchers_per_stream: usize,
    /// Puts issued once every watcher is created.
    #[arg(long, default_value_t = 1000)]
    pub put_total: u64,
    /// Puts per second (0: back to back, one in flight).
    #[arg(long, default_value_t = 100.0)]
    pub put_rate: f64,
    /// The watched key.
    #[arg(long, default_value = "watch-bench")]
    pub key: String,
    /// Watch the key as a prefix and put to distinct keys under it.
    #[arg(long)]
    pub prefix: bool,
    /// Value size of the puts in bytes (at least the digits of the put number).
    #[arg(long, default_value_t = 8)]
    pub val_size: usize,
    /// Seconds to wait after the last put for events still in flight; missing ones are errors.
    #[arg(long, default_value_t = 10.0)]
    pub settle_timeout: f64,
    /// Watchers ask for the previous value of each key (as Kubernetes' API server does); an
    /// event of an overwritten key that comes without it counts as an error.
    #[arg(long)]
    pub prev_kv: bool,
}

impl WatchArgs {
    /// Defaults of the `watch-fanout` scenario: many watchers on many streams, fewer puts.
    pub fn fanout_defaults() -> Self {
        WatchArgs {
            streams: 50,
            watchers_per_stream: 100,
            put_total: 100,
            put_rate: 20.0,
            key: "watch-fanout".into(),
            prefix: false,
            val_size: 8,
            settle_timeout: 10.0,
            prev_kv: false,
        }
    }
}

/// Prefix watch: everything under `key` (etcd's prefix end: last byte below 0xff plus one).
fn prefix_end(key: &[u8]) -> Vec<u8> {
    let mut end = key.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Put number carried at the start of an event's value.
fn put_number(value: &[u8]) -> Option<u64> {
    let digits = value.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&value[..digits]).ok()?.parse().ok()
}

/// What one stream task saw.
struct StreamOutcome {
    events: Stats,
    creates: Stats,
}

/// Messages from stream tasks to the coordinator during set-up.
enum Ready {
    Created,
    Failed,
}

pub async fn run(label: &str, common: &Common, args: &WatchArgs) -> Result<Report> {
    if args.streams == 0 || args.watchers_per_stream == 0 || args.put_total == 0 {
        return Err(Error::Usage(
            "--streams, --watchers-per-stream and --put-total must be at least 1".into(),
        ));
    }
    let pool = Pool::connect(common).await?;
    let watchers = (args.streams * args.watchers_per_stream) as u64;
    let expected = watchers * args.put_total;
    let key = args.key.clone().into_bytes();
    let range_end = if args.prefix {
        prefix_end(&key)
    } else {
        Vec::new()
    };

    // Send time of each put, in ns since `base`; u64::MAX until sent.
    let base = Instant::now();
    let sent: Arc<Vec<AtomicU64>> = Arc::new(
        (0..args.put_total)
            .map(|_| AtomicU64::new(u64::MAX))
            .collect(),
    );
    let delivered = Arc::new(AtomicU64::new(0));
    let last_event_ns = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = signal::channel(false);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel();
    let setup_timeout = Duration::from_secs_f64(common.request_timeout.max(1.0) * 3.0);
    let per_stream = args.watchers_per_stream as u64 * args.put_total;

    let mut tasks = Vec::with_capacity(args.streams);
    for s in 0..args.streams {
        let mut client = pool.watch(s);
        let (key, range_end) = (key.clone(), range_end.clone());
        let (sent, delivered, last_event_ns) =
            (sent.clone(), delivered.clone(), last_event_ns.clone());
        let mut stop_rx = stop_rx.clone();
        let ready_tx = ready_tx.clone();
        let n = args.watchers_per_stream;
        let prev_kv = args.prev_kv;
        tasks.push(tokio::spawn(async move {
            let mut out = StreamOutcome {
                events: Stats::new(),
                creates: Stats::new(),
            };
            let (tx, rx) = mpsc::unbounded();
            let t0 = Instant::now();
            for _ in 0..n {
                let req = WatchRequest {
                    request_union: Some(watch_request::RequestUnion::CreateRequest(
                        WatchCreateRequest {
                            key: key.clone(),
                            range_end: range_end.clone(),
                            prev_kv,
                            ..Default::default()
                        },
                    )),
                };
                let _ = tx.unbounded_send(req);
            }
            let mut stream = match tokio::time::timeout(setup_timeout, client.watch(rx)).await {
                Ok(Ok(resp)) => resp.into_inner(),
                Ok(Err(status)) => {
                    out.creates
                        .record_errs(status_kind("watch create: ", &status), n as u64);
                    let _ = ready_tx.send(Ready::Failed);
                    return out;
                }
                Err(_) => {
                    out.creates
                        .record_errs("watch create: no response in time", n as u64);
                    let _ = ready_tx.send(Ready::Failed);
                    return out;
                }
            };
            let mut created = 0usize;
            let mut seen = 0u64;
            loop {
                let msg = tokio::select! {
                    m = stream.message() => m,
                    _ = stop_rx.changed() => break,
                };
                let resp = match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => {
                        out.events.record_err("watch stream closed by the server");
                        break;
                    }
                    Err(status) => {
                        out.events
                            .record_err(status_kind("watch stream: ", &status));
                        break;
                    }
                };
                if resp.created {
                    created += 1;
                    out.creates.record_ok(t0.elapsed());
                    if created == n {
                        let _ = ready_tx.send(Ready::Created);
                    }
                }
                if resp.canceled {
                    let why = if resp.cancel_reason.is_empty() {
                        "no reason given".into()
                    } else {
                        resp.cancel_reason
                    };
                    out.events.record_err(format!("watch canceled: {why}"));
                    if created < n {
                        let _ = ready_tx.send(Ready::Failed);
                    }
                    break;
                }
                let now_ns = base.elapsed().as_nanos() as u64;
                for ev in resp.events {
                    let overwrite = ev.kv.as_ref().is_some_and(|kv| kv.version > 1);
                    if prev_kv && overwrite && ev.prev_kv.is_none() {
                        out.events
                            .record_err("event of an overwrite without prev_kv");
                        continue;
                    }
                    let value = ev.kv.map(|kv| kv.value).unwrap_or_default();
                    match put_number(&value).and_then(|i| sent.get(i as usize)) {
                        Some(at) => {
                            let at = at.load(Ordering::Acquire);
                            if at == u64::MAX {
                                out.events.record_err("event for a put not yet sent");
                            } else {
                                out.events
                                    .record_ok(Duration::from_nanos(now_ns.saturating_sub(at)));
                            }
                        }
                        None => out.events.record_err("event with a foreign value"),
                    }
                    seen += 1;
                    delivered.fetch_add(1, Ordering::Relaxed);
                    last_event_ns.fetch_max(now_ns, Ordering::Relaxed);
                }
                if seen >= per_stream {
                    break;
                }
            }
            drop(tx);
            out
        }));
    }
    drop(ready_tx);

    // Wait until every stream has all its watchers, or has failed.
    let mut failed_streams = 0usize;
    let mut answered = 0usize;
    let setup_deadline = tokio::time::Instant::now() + setup_timeout;
    while answered < args.streams {
        match tokio::time::timeout_at(setup_deadline, ready_rx.recv()).await {
            Ok(Some(Ready::Created)) => answered += 1,
            Ok(Some(Ready::Failed)) => {
                answered += 1;
                failed_streams += 1
            }
            Ok(None) | Err(_) => break,
        }
    }
    let setup_incomplete = args.streams - answered;
    let setup_s = base.elapsed().as_secs_f64();

    // Paced puts; each value starts with the put's number.
    let mut kv = pool.kv(0);
    let mut put_stats = Stats::new();
    let progress = Progress::start(label, expected, common.progress);
    let counters = progress.counters();
    let put_start = Instant::now();
    let deadline = common.deadline_from(put_start);
    let mut capped = false;
    let mut puts_ok = 0u64;
    if failed_streams + setup_incomplete < args.streams {
        let period = (args.put_rate > 0.0).then(|| Duration::from_secs_f64(1.0 / args.put_rate));
        for i in 0..args.put_total {
            if let Some(p) = period {
                tokio::time::sleep_until((put_start + p.mul_f64(i as f64)).into()).await;
            }
            if Instant::now() >= deadline {
                capped = true;
                break;
            }
            let put_key = if args.prefix {
                let mut k = key.clone();
                k.extend_from_slice(format!("/{i}").as_bytes());
                k
            } else {
                key.clone()
            };
            let mut value = i.to_string().into_bytes();
            value.resize(args.val_size.max(value.len()), b' ');
            sent[i as usize].store(base.elapsed().as_nanos() as u64, Ordering::Release);
            let t0 = Instant::now();
            match tokio::time::timeout(
                common.request_timeout(),
                kv.put(PutRequest {
                    key: put_key,
                    value,
                    ..Default::default()
                }),
            )
            .await
            {
                Ok(Ok(_)) => {
                    put_stats.record_ok(t0.elapsed());
                    puts_ok += 1;
                }
                Ok(Err(status)) => put_stats.record_err(status_kind("put: ", &status)),
                Err(_) => put_stats.record_err("put: request timed out"),
            }
            counters
                .ok
                .store(delivered.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        // Let in-flight events arrive, bounded by the settle timeout.
        let settle = Instant::now() + Duration::from_secs_f64(args.settle_timeout);
        let live_streams = (args.streams - failed_streams - setup_incomplete) as u64;
        let want = live_streams * args.watchers_per_stream as u64 * puts_ok;
        while delivered.load(Ordering::Relaxed) < want && Instant::now() < settle {
            counters
                .ok
                .store(delivered.load(Ordering::Relaxed), Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let _ = stop_tx.send(true);
    progress.finish().await;

    let mut events = Stats::new();
    let mut creates = Stats::new();
    for t in tasks {
        match t.await {
            Ok(o) => {
                events.merge(o.events);
                creates.merge(o.creates);
            }
            Err(e) => events.record_err(format!("watch stream task failed: {e}")),
        }
    }
    let got = delivered.load(Ordering::Relaxed);
    // Every event a watcher should have had for a put that succeeded, and did not get.
    let live_watchers =
        watchers - (failed_streams + setup_incomplete) as u64 * args.watchers_per_stream as u64;
    let missing = (live_watchers * puts_ok).saturating_sub(got);
    events.record_errs(
        format!(
            "events not delivered within {}s of the last put",
            args.settle_timeout
        ),
        missing,
    );
    if setup_incomplete > 0 {
        events.record_errs(
            "watch create: not confirmed in time",
            (setup_incomplete * args.watchers_per_stream) as u64,
        );
    }
    let create_errors = creates.errors.clone();
    let create_p = Percentiles::of(&creates.hist);
    let put_p = Percentiles::of(&put_stats.hist);
    for (k, n) in create_errors {
        events.record_errs(k, n);
    }
    for (k, n) in put_stats.errors.clone() {
        events.record_errs(k, n);
    }
    // The delivery window runs from the first put to the last event received.
    let first_put_ns = put_start.duration_since(base).as_nanos() as u64;
    let last = last_event_ns.load(Ordering::Relaxed);
    let window =
        Duration::from_nanos(last.saturating_sub(first_put_ns)).max(Duration::from_millis(1));
    let mut report = Report::from_stats(label, expected, events, window);
    report.time_capped = capped;
    report.extra.insert("watchers".into(), watchers as f64);
    report.extra.insert("puts_ok".into(), puts_ok as f64);
    report.extra.insert("watch_setup_s".into(), setup_s);
    report
        .extra
        .insert("watch_create_p99_ms".into(), create_p.p99);
    report
        .extra
        .insert("watch_create_max_ms".into(), create_p.max);
    report.extra.insert("put_p99_ms".into(), put_p.p99);
    report
        .extra
        .insert("events_per_s".into(), report.throughput);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(prefix_end(b"abc"), b"abd".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn put_number_reads_leading_digits() {
        assert_eq!(put_number(b"42      "), Some(42));
        assert_eq!(put_number(b"7"), Some(7));
        assert_eq!(put_number(b"x1"), None);
        assert_eq!(put_number(b""), None);
    }
}
