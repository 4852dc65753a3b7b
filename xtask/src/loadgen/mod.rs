//! Load generator for the etcd v3 gRPC API, in the spirit of etcd's `benchmark` tool.
//!
//! It speaks only the wire API (the generated clients of `oxcd-proto`), so the same run drives
//! oxcd and etcd alike. Every scenario is bounded by a request count and a wall-clock cap;
//! latencies go to an HDR histogram, failures are counted by kind and reported, never dropped.

pub mod kv;
pub mod lease;
pub mod watch;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use oxcd_proto::etcdserverpb::kv_client::KvClient;
use oxcd_proto::etcdserverpb::lease_client::LeaseClient;
use oxcd_proto::etcdserverpb::watch_client::WatchClient;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use crate::error::{Error, Result};

/// Largest gRPC message the load generator accepts (a big range result).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// Distinct error texts kept per run; further kinds are folded into one bucket (still counted).
const MAX_ERROR_KINDS: usize = 20;

/// How progress is shown while a scenario runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, plain lines otherwise.
    Auto,
    Bar,
    Lines,
    None,
}

/// Connection and pacing options shared by every scenario.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Client URLs, comma separated (loopback addresses only); connections go round robin.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:2379")]
    pub endpoints: Vec<String>,
    /// Concurrent clients: requests (or streams) in flight at once.
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    /// gRPC connections (one HTTP/2 connection each) the clients share.
    #[arg(long, default_value_t = 1)]
    pub conns: usize,
    /// Wall-clock cap in seconds: no new request is started after it, even if the total is not reached.
    #[arg(long, default_value_t = 60.0)]
    pub max_duration: f64,
    /// Per-request timeout in seconds; a timed-out request counts as an error.
    #[arg(long, default_value_t = 10.0)]
    pub request_timeout: f64,
    /// Progress display.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
}

impl Common {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.clients == 0 || self.conns == 0 {
            return Err(Error::Usage(
                "--clients and --conns must be at least 1".into(),
            ));
        }
        if self.endpoints.is_empty() {
            return Err(Error::Usage("--endpoints is empty".into()));
        }
        if !(self.max_duration > 0.0 && self.request_timeout > 0.0) {
            return Err(Error::Usage(
                "--max-duration and --request-timeout must be positive".into(),
            ));
        }
        Ok(())
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.request_timeout)
    }

    pub(crate) fn deadline_from(&self, start: Instant) -> Instant {
        start + Duration::from_secs_f64(self.max_duration)
    }
}

/// Turns `host:port` or `http://host:port` into a URL, refusing anything but loopback hosts.
pub fn endpoint_url(raw: &str) -> Result<String> {
    let url = if raw.contains("://") {
        raw.to_string()
    } else {
        format!("http://{raw}")
    };
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(&url);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or(v6)
    } else {
        authority
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(authority)
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false);
    if loopback {
        Ok(url)
    } else {
        Err(Error::NotLoopback(raw.to_string()))
    }
}

/// `conns` gRPC channels spread round robin over the endpoints.
#[derive(Clone)]
pub struct Pool {
    channels: Vec<Channel>,
}

impl Pool {
    pub async fn connect(common: &Common) -> Result<Pool> {
        common.validate()?;
        let urls = common
            .endpoints
            .iter()
            .map(|e| endpoint_url(e))
            .collect::<Result<Vec<_>>>()?;
        let mut channels = Vec::with_capacity(common.conns);
        for i in 0..common.conns {
            let url = &urls[i % urls.len()];
            let endpoint = Endpoint::from_shared(url.clone())
                .map_err(|e| Error::Usage(format!("bad endpoint {url}: {e}")))?
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true);
            let channel = endpoint.connect().await.map_err(|source| Error::Connect {
                endpoint: url.clone(),
                source,
            })?;
            channels.push(channel);
        }
        Ok(Pool { channels })
    }

    fn channel(&self, i: usize) -> Channel {
        self.channels[i % self.channels.len()].clone()
    }

    pub fn kv(&self, i: usize) -> KvClient<Channel> {
        KvClient::new(self.channel(i)).max_decoding_message_size(MAX_MESSAGE)
    }

    pub fn watch(&self, i: usize) -> WatchClient<Channel> {
        WatchClient::new(self.channel(i)).max_decoding_message_size(MAX_MESSAGE)
    }

    pub fn lease(&self, i: usize) -> LeaseClient<Channel> {
        LeaseClient::new(self.channel(i)).max_decoding_message_size(MAX_MESSAGE)
    }
}

pub(crate) fn new_histogram() -> Histogram<u64> {
    // Microseconds from 1 us to 10 min at 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("static histogram bounds are valid")
}

/// Outcomes gathered by one worker, merged into a report at the end.
pub(crate) struct Stats {
    pub hist: Histogram<u64>,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
}

impl Stats {
    pub fn new() -> Self {
        Stats {
            hist: new_histogram(),
            ok: 0,
            errors: BTreeMap::new(),
        }
    }

    pub fn record_ok(&mut self, latency: Duration) {
        self.ok += 1;
        self.hist
            .saturating_record((latency.as_micros() as u64).max(1));
    }

    pub fn record_err(&mut self, kind: impl Into<String>) {
        self.record_errs(kind, 1);
    }

    pub fn record_errs(&mut self, kind: impl Into<String>, n: u64) {
        if n == 0 {
            return;
        }
        let kind = kind.into();
        let slot = if self.errors.contains_key(&kind) || self.errors.len() < MAX_ERROR_KINDS {
            kind
        } else {
            "other errors (too many distinct kinds)".to_string()
        };
        *self.errors.entry(slot).or_default() += n;
    }

    pub fn merge(&mut self, other: Stats) {
        self.ok += other.ok;
        self.hist.add(&other.hist).expect("histograms share bounds");
        for (kind, n) in other.errors {
            self.record_errs(kind, n);
        }
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// Text of a failed call, stable enough to group by.
pub(crate) fn status_kind(prefix: &str, status: &tonic::Status) -> String {
    format!("{prefix}{:?}: {}", status.code(), status.message())
}

/// Latency percentiles in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

/// The result of one scenario run; printed for people and as one JSON line for machines.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    /// Operations the run set out to do (for watch scenarios: events expected).
    pub requested: u64,
    /// Operations that succeeded (for watch scenarios: events delivered).
    pub ok: u64,
    /// Failed operations, all kinds together.
    pub errors: u64,
    pub error_kinds: BTreeMap<String, u64>,
    pub elapsed_s: f64,
    /// Successful operations per second of the measured phase.
    pub throughput: f64,
    pub latency_ms: Percentiles,
    /// True when the wall-clock cap stopped the run before its total.
    pub time_capped: bool,
    /// Scenario-specific figures (watch creation latency, events per second, ...).
    pub extra: BTreeMap<String, f64>,
    #[serde(skip)]
    pub hist: Histogram<u64>,
}

impl Report {
    pub(crate) fn from_stats(
        scenario: &str,
        requested: u64,
        stats: Stats,
        elapsed: Duration,
    ) -> Self {
        let secs = elapsed.as_secs_f64().max(1e-9);
        Report {
            scenario: scenario.to_string(),
            requested,
            ok: stats.ok,
            errors: stats.error_count(),
            error_kinds: stats.errors,
            elapsed_s: elapsed.as_secs_f64(),
            throughput: stats.ok as f64 / secs,
            latency_ms: Percentiles::of(&stats.hist),
            time_capped: false,
            extra: BTreeMap::new(),
            hist: stats.hist,
        }
    }

    /// A human summary, several lines.
    pub fn summary(&self) -> String {
        let l = &self.latency_ms;
        let mut s = format!(
            "{}: {} requested, {} ok, {} errors in {:.2} s = {:.1} ok/s{}\n  latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3}\n",
            self.scenario,
            self.requested,
            self.ok,
            self.errors,
            self.elapsed_s,
            self.throughput,
            if self.time_capped { " (stopped by the time cap)" } else { "" },
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            l.mean
        );
        for (k, v) in &self.extra {
            s.push_str(&format!("  {k}: {v:.3}\n"));
        }
        for (k, v) in &self.error_kinds {
            s.push_str(&format!("  error x{v}: {k}\n"));
        }
        s
    }

    pub fn json_line(&self) -> String {
        serde_json::to_string(self).expect("report serializes")
    }
}

/// Live counters behind the progress display.
#[derive(Default)]
pub(crate) struct Counters {
    pub ok: AtomicU64,
    pub err: AtomicU64,
}

/// A progress bar on a terminal, plain lines every few seconds otherwise.
pub(crate) struct Progress {
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    pub fn start(label: &str, total: u64, mode: ProgressMode) -> Self {
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mode = match mode {
            ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Bar,
            ProgressMode::Auto => ProgressMode::Lines,
            m => m,
        };
        let task = match mode {
            ProgressMode::None | ProgressMode::Auto => None,
            ProgressMode::Bar => {
                let bar = indicatif::ProgressBar::new(total);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec} {msg}",
                    )
                    .expect("static template"),
                );
                bar.set_prefix(label.to_string());
                let (c, st) = (counters.clone(), stop.clone());
                Some(tokio::spawn(async move {
                    while !st.load(Ordering::Relaxed) {
                        let (ok, err) =
                            (c.ok.load(Ordering::Relaxed), c.err.load(Ordering::Relaxed));
                        bar.set_position(ok + err);
                        bar.set_message(format!("errors {err}"));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    bar.finish_and_clear();
                }))
            }
            ProgressMode::Lines => {
                let (c, st, label) = (counters.clone(), stop.clone(), label.to_string());
                Some(tokio::spawn(async move {
                    let start = Instant::now();
                    let mut next = start + Duration::from_secs(5);
                    while !st.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        if Instant::now() >= next {
                            next += Duration::from_secs(5);
                            let (ok, err) =
                                (c.ok.load(Ordering::Relaxed), c.err.load(Ordering::Relaxed));
                            eprintln!(
                                "{label}: {}/{total} done, {err} errors, {:.0} ok/s",
                                ok + err,
                                ok as f64 / start.elapsed().as_secs_f64()
                            );
                        }
                    }
                }))
            }
        };
        Progress {
            counters,
            stop,
            task,
        }
    }

    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    pub async fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Runs `total` request/response operations over `clients` workers, each waiting for its
/// reply before sending the next (closed loop). `op(client, i)` performs operation `i`.
pub(crate) async fn closed_loop<F, Fut>(label: &str, common: &Common, total: u64, op: F) -> Report
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = std::result::Result<(), String>> + Send + 'static,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicU64::new(0));
    let capped = Arc::new(AtomicBool::new(false));
    let progress = Progress::start(label, total, common.progress);
    let start = Instant::now();
    let deadline = common.deadline_from(start);
    let timeout = common.request_timeout();
    let mut workers = Vec::with_capacity(common.clients);
    for c in 0..common.clients {
        let (op, next, capped, counters) = (
            op.clone(),
            next.clone(),
            capped.clone(),
            progress.counters(),
        );
        workers.push(tokio::spawn(async move {
            let mut stats = Stats::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                if Instant::now() >= deadline {
                    capped.store(true, Ordering::Relaxed);
                    break;
                }
                let t0 = Instant::now();
                match tokio::time::timeout(timeout, op(c, i)).await {
                    Ok(Ok(())) => {
                        stats.record_ok(t0.elapsed());
                        counters.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(kind)) => {
                        stats.record_err(kind);
                        counters.err.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        stats.record_err(format!("request timed out after {:?}", timeout));
                        counters.err.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            stats
        }));
    }
    let mut stats = Stats::new();
    for w in workers {
        match w.await {
            Ok(s) => stats.merge(s),
            Err(e) => stats.record_err(format!("load worker failed: {e}")),
        }
    }
    let elapsed = start.elapsed();
    progress.finish().await;
    let mut report = Report::from_stats(label, total, stats, elapsed);
    report.time_capped = capped.load(Ordering::Relaxed);
    report
}

/// A well-mixed 64-bit hash (splitmix64): random-looking keys derived from the operation index,
/// so workers need no shared random state.
pub(crate) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Key number `n` as ASCII: `prefix` then the number zero-padded so the key is `size` bytes
/// (longer if the number needs more digits).
pub fn make_key(prefix: &[u8], n: u64, size: usize) -> Vec<u8> {
    let digits = size.saturating_sub(prefix.len());
    let mut k = prefix.to_vec();
    k.extend_from_slice(format!("{n:0digits$}").as_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_only() {
        assert_eq!(
            endpoint_url("127.0.0.1:2379").unwrap(),
            "http://127.0.0.1:2379"
        );
        assert_eq!(
            endpoint_url("http://localhost:1").unwrap(),
            "http://localhost:1"
        );
        assert!(endpoint_url("http://[::1]:2379").is_ok());
        assert!(endpoint_url("127.3.4.5:2379").is_ok());
        assert!(matches!(
            endpoint_url("10.0.0.1:2379"),
            Err(Error::NotLoopback(_))
        ));
        assert!(matches!(
            endpoint_url("http://example.com:2379"),
            Err(Error::NotLoopback(_))
        ));
        assert!(matches!(
            endpoint_url("[2001:db8::1]:2379"),
            Err(Error::NotLoopback(_))
        ));
    }

    #[test]
    fn keys_are_padded_ascii() {
        assert_eq!(make_key(b"", 42, 8), b"00000042".to_vec());
        assert_eq!(make_key(b"k/", 7, 5), b"k/007".to_vec());
        assert_eq!(make_key(b"", 123456, 3), b"123456".to_vec());
    }

    #[test]
    fn stats_merge_and_fold_error_kinds() {
        let mut a = Stats::new();
        a.record_ok(Duration::from_millis(2));
        for i in 0..(MAX_ERROR_KINDS + 5) {
            a.record_err(format!("kind {i}"));
        }
        let mut b = Stats::new();
        b.record_ok(Duration::from_millis(4));
        b.record_err("kind 0");
        a.merge(b);
        assert_eq!(a.ok, 2);
        assert_eq!(a.error_count(), MAX_ERROR_KINDS as u64 + 6);
        assert_eq!(a.errors["kind 0"], 2);
        assert!(a.errors.len() <= MAX_ERROR_KINDS + 1);
        let p = Percentiles::of(&a.hist);
        assert!(p.p50 >= 1.9 && p.max <= 4.01, "{p:?}");
    }
}
