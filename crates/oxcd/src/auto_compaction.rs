//! Auto-compaction as etcd 3.4 does it (`--auto-compaction-mode`, `--auto-compaction-retention`).
//!
//! - `periodic`: the retention is a duration (`"30m"`, `"1h30m"`) or a bare integer meaning
//!   hours. The revision is sampled every tenth of the retention (capped at a tenth of an hour);
//!   once a full retention has passed, the member compacts to the oldest sample (the revision of
//!   one retention ago), then again after every `min(retention, 1h)`. A failed compaction is
//!   retried at the next sample.
//! - `revision`: the retention is a revision count N; every 5 minutes the member compacts to
//!   `current revision - N`, unless that is not positive or was the last revision compacted.
//!
//! Only the leader compacts; a follower keeps sampling (periodic) so that it can compact at once
//! should it become leader. Compactions take the path a client's `KV.Compact` takes (proposed
//! through raft, applied by every member). "Required revision has been compacted" counts as done.
//!
//! The loops use tokio's clock, so tests drive them with paused time against a fake
//! [`Compactor`].

use std::future::Future;
use std::time::Duration;

use api_gateway::kv::KvService;
use api_gateway::Gateway;
use oxcd_proto::etcdserverpb::{kv_server::Kv, CompactionRequest};
use tokio::time::Instant;

/// How often revision mode looks at the current revision (etcd's `revInterval`).
pub const REVISION_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// Periodic mode samples the revision every `min(retention, 1h) / RETRY_DIVISOR`.
const RETRY_DIVISOR: u32 = 10;
const HOUR: Duration = Duration::from_secs(3600);

/// What `--auto-compaction-mode` and `--auto-compaction-retention` ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Keep this much history (by time).
    Periodic(Duration),
    /// Keep this many revisions.
    Revision(i64),
}

/// A retention etcd refuses at start-up; the text is etcd's.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RetentionError {
    #[error("error parsing CompactionRetention: {0}")]
    Parse(String),
    #[error("unsupported compaction mode {0}")]
    Mode(String),
}

impl Policy {
    /// Reads the two flags as etcd does; `None`: auto-compaction is off (retention 0 or empty).
    ///
    /// A non-negative integer is hours (periodic) or revisions (revision). Anything else is a Go
    /// duration; in revision mode etcd then takes its nanoseconds as the revision count, and so
    /// does oxcd. A negative duration is refused: etcd accepts it and then compacts in a busy
    /// loop, which no one can want.
    pub fn from_flags(mode: &str, retention: &str) -> Result<Option<Policy>, RetentionError> {
        if mode != "periodic" && mode != "revision" {
            return Err(RetentionError::Mode(mode.to_string()));
        }
        let retention = if retention.is_empty() { "0" } else { retention };
        let periodic = mode == "periodic";
        let policy = match retention.parse::<i64>() {
            Ok(n) if n >= 0 => {
                if periodic {
                    let secs = (n as u64).checked_mul(3600).ok_or_else(|| {
                        RetentionError::Parse(format!("retention {retention:?} hours is too large"))
                    })?;
                    Policy::Periodic(Duration::from_secs(secs))
                } else {
                    Policy::Revision(n)
                }
            }
            _ => {
                let nanos = parse_go_duration(retention).map_err(RetentionError::Parse)?;
                if nanos < 0 {
                    return Err(RetentionError::Parse(format!(
                        "negative retention {retention:?}"
                    )));
                }
                if periodic {
                    Policy::Periodic(Duration::from_nanos(nanos as u64))
                } else {
                    tracing::warn!(
                        retention,
                        revisions = nanos,
                        "--auto-compaction-mode=revision with a duration retention: \
                         read as that many revisions (its nanoseconds), as etcd does"
                    );
                    Policy::Revision(nanos)
                }
            }
        };
        Ok(match policy {
            Policy::Periodic(d) if d.is_zero() => None,
            Policy::Revision(0) => None,
            p => Some(p),
        })
    }
}

/// Why a compaction did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompactError {
    /// The revision is at or below the store's compact revision: nothing to do.
    Compacted,
    /// Anything else (no leader, timeout, ...): try again later.
    Other(String),
}

/// What the compaction loops need from the server.
pub trait Compactor: Send + Sync + 'static {
    /// The store's current revision on this member.
    fn revision(&self) -> i64;
    /// Whether this member leads; `None` once the server is stopping (the loop then ends).
    fn is_leader(&self) -> impl Future<Output = Option<bool>> + Send;
    /// Compacts the key-value history up to `revision` through the replicated log.
    fn compact(&self, revision: i64) -> impl Future<Output = Result<(), CompactError>> + Send;
}

/// Runs the policy's loop until the server stops.
pub async fn run<C: Compactor>(policy: Policy, c: C) {
    match policy {
        Policy::Periodic(retention) => periodic(retention, &c).await,
        Policy::Revision(retention) => revision(retention, REVISION_INTERVAL, &c).await,
    }
}

async fn periodic<C: Compactor>(retention: Duration, c: &C) {
    let compact_interval = retention.min(HOUR);
    // etcd divides by zero below 10ns; a floor keeps such a retention from spinning.
    let retry_interval = (compact_interval / RETRY_DIVISOR).max(Duration::from_millis(1));
    let samples = (retention.as_nanos() / retry_interval.as_nanos()) as usize + 1;
    let shown = go_duration(retention);
    tracing::info!(
        retention = %shown,
        sample_interval = %go_duration(retry_interval),
        "periodic auto-compaction enabled"
    );

    let mut revs = std::collections::VecDeque::with_capacity(samples + 1);
    let mut last_success = Instant::now();
    // The first compaction waits a whole retention, the later ones min(retention, 1h).
    let mut wait = retention;
    loop {
        revs.push_back(c.revision());
        if revs.len() > samples {
            revs.pop_front(); // the front is always the revision of one retention ago
        }
        tokio::time::sleep(retry_interval).await;
        match c.is_leader().await {
            None => return,
            Some(false) => continue,
            Some(true) => {}
        }
        if last_success.elapsed() < wait {
            continue;
        }
        wait = compact_interval;
        let rev = revs[0];
        tracing::info!(
            revision = rev,
            compact_period = %shown,
            "Starting auto-compaction at revision {rev} (retention: {shown})"
        );
        match c.compact(rev).await {
            Ok(()) | Err(CompactError::Compacted) => {
                tracing::info!(
                    revision = rev,
                    compact_period = %shown,
                    took = ?last_success.elapsed(),
                    "Finished auto-compaction at revision {rev}"
                );
                last_success = Instant::now();
            }
            Err(CompactError::Other(e)) => {
                tracing::warn!(
                    revision = rev,
                    compact_period = %shown,
                    retry_interval = %go_duration(retry_interval),
                    error = %e,
                    "Failed auto-compaction at revision {rev} ({e}); retry after {}",
                    go_duration(retry_interval)
                );
            }
        }
    }
}

async fn revision<C: Compactor>(retention: i64, interval: Duration, c: &C) {
    tracing::info!(
        retention,
        interval = %go_duration(interval),
        "revision auto-compaction enabled"
    );
    let mut prev = 0;
    loop {
        tokio::time::sleep(interval).await;
        match c.is_leader().await {
            None => return,
            Some(false) => continue,
            Some(true) => {}
        }
        let rev = c.revision().saturating_sub(retention);
        if rev <= 0 || rev == prev {
            continue;
        }
        let started = Instant::now();
        tracing::info!(
            revision = rev,
            revision_compaction_retention = retention,
            "Starting auto-compaction at revision {rev} (retention: {retention} revisions)"
        );
        match c.compact(rev).await {
            Ok(()) | Err(CompactError::Compacted) => {
                prev = rev;
                tracing::info!(
                    revision = rev,
                    revision_compaction_retention = retention,
                    took = ?started.elapsed(),
                    "Finished auto-compaction at revision {rev}"
                );
            }
            Err(CompactError::Other(e)) => {
                tracing::warn!(
                    revision = rev,
                    revision_compaction_retention = retention,
                    error = %e,
                    "Failed auto-compaction at revision {rev} ({e}); retry after {}",
                    go_duration(interval)
                );
            }
        }
    }
}

/// The server's side: the store's revision, raft's leadership, and the KV service's Compact
/// (exactly what a client's `KV.Compact` runs).
pub struct GatewayCompactor {
    gw: Gateway,
    kv: KvService,
}

impl GatewayCompactor {
    pub fn new(gw: Gateway) -> Self {
        GatewayCompactor {
            kv: KvService::new(gw.clone()),
            gw,
        }
    }
}

impl Compactor for GatewayCompactor {
    fn revision(&self) -> i64 {
        self.gw.store().current_revision()
    }

    async fn is_leader(&self) -> Option<bool> {
        self.gw.raft_status().await.ok().map(|s| s.is_leader)
    }

    async fn compact(&self, revision: i64) -> Result<(), CompactError> {
        let req = tonic::Request::new(CompactionRequest {
            revision,
            physical: false,
        });
        match self.kv.compact(req).await {
            Ok(_) => Ok(()),
            Err(s) if is_compacted(s.message()) => Err(CompactError::Compacted),
            Err(s) => Err(CompactError::Other(s.message().to_string())),
        }
    }
}

fn is_compacted(message: &str) -> bool {
    message.contains("required revision has been compacted")
        || message.contains("already compacted")
}

/// Go's `time.ParseDuration`, with its error texts: a signed sequence of decimal numbers, each
/// with an optional fraction and a unit (`ns`, `us`/`µs`, `ms`, `s`, `m`, `h`). Nanoseconds.
pub(crate) fn parse_go_duration(orig: &str) -> Result<i64, String> {
    const LIMIT: u64 = 1 << 63;
    let invalid = || format!("time: invalid duration {orig:?}");
    let mut s = orig;
    let mut neg = false;
    if let Some(rest) = s.strip_prefix('-') {
        neg = true;
        s = rest;
    } else if let Some(rest) = s.strip_prefix('+') {
        s = rest;
    }
    if s == "0" {
        return Ok(0);
    }
    if s.is_empty() {
        return Err(invalid());
    }
    let mut total: u64 = 0;
    while !s.is_empty() {
        let first = s.as_bytes()[0];
        if !(first == b'.' || first.is_ascii_digit()) {
            return Err(invalid());
        }
        // Integer part.
        let n = s.bytes().take_while(u8::is_ascii_digit).count();
        let mut v: u64 = 0;
        for d in s[..n].bytes() {
            if v > LIMIT / 10 {
                return Err(invalid());
            }
            v = v * 10 + u64::from(d - b'0');
            if v > LIMIT {
                return Err(invalid());
            }
        }
        s = &s[n..];
        // Fraction: digits past what fits are read and dropped.
        let (mut frac, mut scale, mut has_frac) = (0u64, 1f64, false);
        if let Some(rest) = s.strip_prefix('.') {
            let m = rest.bytes().take_while(u8::is_ascii_digit).count();
            let mut overflow = false;
            for d in rest[..m].bytes() {
                if overflow {
                    continue;
                }
                if frac > (LIMIT - 1) / 10 {
                    overflow = true;
                    continue;
                }
                let y = frac * 10 + u64::from(d - b'0');
                if y > LIMIT {
                    overflow = true;
                    continue;
                }
                frac = y;
                scale *= 10.0;
            }
            has_frac = m > 0;
            s = &rest[m..];
        }
        if n == 0 && !has_frac {
            return Err(invalid());
        }
        let end = s
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(s.len());
        if end == 0 {
            return Err(format!("time: missing unit in duration {orig:?}"));
        }
        let unit_name = &s[..end];
        s = &s[end..];
        let unit: u64 = match unit_name {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3600 * 1_000_000_000,
            _ => {
                return Err(format!(
                    "time: unknown unit {unit_name:?} in duration {orig:?}"
                ))
            }
        };
        if v > LIMIT / unit {
            return Err(invalid());
        }
        v *= unit;
        if frac > 0 {
            v += (frac as f64 * (unit as f64 / scale)) as u64;
            if v > LIMIT {
                return Err(invalid());
            }
        }
        total = total.checked_add(v).ok_or_else(invalid)?;
        if total > LIMIT {
            return Err(invalid());
        }
    }
    if neg {
        // total <= 2^63, so its negation fits (2^63 itself is i64::MIN).
        return Ok((total as i64).wrapping_neg());
    }
    if total > LIMIT - 1 {
        return Err(invalid());
    }
    Ok(total as i64)
}

/// Go's `time.Duration.String` (for the log lines etcd writes): `1h0m0s`, `2.5s`, `200ms`.
fn go_duration(d: Duration) -> String {
    let u = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    if u == 0 {
        return "0s".into();
    }
    // The `prec` lowest digits of `v` as a fraction without trailing zeros, and the rest.
    fn split(v: u64, prec: u32) -> (String, u64) {
        let p = 10u64.pow(prec);
        let f = v % p;
        let text = if f == 0 {
            String::new()
        } else {
            let digits = format!("{f:0width$}", width = prec as usize);
            format!(".{}", digits.trim_end_matches('0'))
        };
        (text, v / p)
    }
    if u < 1_000_000_000 {
        let (unit, prec) = if u < 1_000 {
            ("ns", 0)
        } else if u < 1_000_000 {
            ("\u{b5}s", 3)
        } else {
            ("ms", 6)
        };
        let (frac, whole) = split(u, prec);
        return format!("{whole}{frac}{unit}");
    }
    let (frac, mut rest) = split(u, 9);
    let mut out = format!("{}{frac}s", rest % 60);
    rest /= 60;
    if rest > 0 {
        out = format!("{}m{out}", rest % 60);
        rest /= 60;
        if rest > 0 {
            out = format!("{rest}h{out}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::sync::{Arc, Mutex};

    const LEADER: u8 = 1;
    const FOLLOWER: u8 = 0;
    const STOPPED: u8 = 2;

    /// A revision that is a function of (paused) time, a settable leadership, and a log of the
    /// compactions asked for, each with the time since the start.
    #[derive(Clone)]
    struct Fake {
        start: Instant,
        rev_at: Arc<dyn Fn(Duration) -> i64 + Send + Sync>,
        role: Arc<AtomicU8>,
        calls: Arc<Mutex<Vec<(Duration, i64)>>>,
        failures: Arc<Mutex<VecDeque<CompactError>>>,
    }

    impl Fake {
        fn new(rev_at: impl Fn(Duration) -> i64 + Send + Sync + 'static) -> Fake {
            Fake {
                start: Instant::now(),
                rev_at: Arc::new(rev_at),
                role: Arc::new(AtomicU8::new(LEADER)),
                calls: Arc::default(),
                failures: Arc::default(),
            }
        }
        fn calls(&self) -> Vec<(Duration, i64)> {
            self.calls.lock().unwrap().clone()
        }
        fn set_role(&self, role: u8) {
            self.role.store(role, Ordering::SeqCst);
        }
        fn fail_next(&self, e: CompactError) {
            self.failures.lock().unwrap().push_back(e);
        }
    }

    impl Compactor for Fake {
        fn revision(&self) -> i64 {
            (self.rev_at)(self.start.elapsed())
        }
        async fn is_leader(&self) -> Option<bool> {
            match self.role.load(Ordering::SeqCst) {
                STOPPED => None,
                r => Some(r == LEADER),
            }
        }
        async fn compact(&self, revision: i64) -> Result<(), CompactError> {
            self.calls
                .lock()
                .unwrap()
                .push((self.start.elapsed(), revision));
            match self.failures.lock().unwrap().pop_front() {
                Some(e) => Err(e),
                None => Ok(()),
            }
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn mins(m: u64) -> Duration {
        Duration::from_secs(60 * m)
    }

    /// Lets the loop run for `d` of (paused, auto-advancing) time.
    async fn advance(d: Duration) {
        tokio::time::sleep(d).await;
    }

    #[test]
    fn retention_flags_read_as_etcd_reads_them() {
        let p = |mode, r| Policy::from_flags(mode, r);
        assert_eq!(p("periodic", "0"), Ok(None));
        assert_eq!(p("periodic", ""), Ok(None));
        assert_eq!(p("revision", "0"), Ok(None));
        assert_eq!(p("periodic", "0s"), Ok(None));
        assert_eq!(p("periodic", "1"), Ok(Some(Policy::Periodic(HOUR))));
        assert_eq!(p("periodic", "+2"), Ok(Some(Policy::Periodic(2 * HOUR))));
        assert_eq!(p("periodic", "72"), Ok(Some(Policy::Periodic(72 * HOUR))));
        assert_eq!(p("periodic", "5m"), Ok(Some(Policy::Periodic(mins(5)))));
        assert_eq!(p("periodic", "2s"), Ok(Some(Policy::Periodic(secs(2)))));
        assert_eq!(p("periodic", "1h30m"), Ok(Some(Policy::Periodic(mins(90)))));
        assert_eq!(p("periodic", "1.5h"), Ok(Some(Policy::Periodic(mins(90)))));
        assert_eq!(
            p("periodic", "500ms"),
            Ok(Some(Policy::Periodic(Duration::from_millis(500))))
        );
        assert_eq!(p("revision", "1000"), Ok(Some(Policy::Revision(1000))));
        // etcd reads a duration in revision mode as its nanoseconds.
        assert_eq!(
            p("revision", "5m"),
            Ok(Some(Policy::Revision(300_000_000_000)))
        );

        let err = |mode, r| Policy::from_flags(mode, r).unwrap_err().to_string();
        assert_eq!(
            err("periodic", "abc"),
            r#"error parsing CompactionRetention: time: invalid duration "abc""#
        );
        assert_eq!(
            err("periodic", "-5"),
            r#"error parsing CompactionRetention: time: missing unit in duration "-5""#
        );
        assert_eq!(
            err("revision", "1.5"),
            r#"error parsing CompactionRetention: time: missing unit in duration "1.5""#
        );
        assert_eq!(
            err("periodic", "5x"),
            r#"error parsing CompactionRetention: time: unknown unit "x" in duration "5x""#
        );
        assert!(err("periodic", "-1h").contains("negative retention"));
        assert_eq!(
            err("other", "1"),
            "unsupported compaction mode other".to_string()
        );
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("1h2m3.5s"), Ok(3_723_500_000_000));
        assert_eq!(parse_go_duration(".5s"), Ok(500_000_000));
        assert_eq!(parse_go_duration("1µs"), Ok(1_000));
        assert_eq!(parse_go_duration("1us1ns"), Ok(1_001));
        assert_eq!(parse_go_duration("-0"), Ok(0));
        assert!(parse_go_duration(".s").is_err());
        assert!(parse_go_duration("").is_err());
        assert!(parse_go_duration("3000000h").is_err());
        assert_eq!(go_duration(HOUR), "1h0m0s");
        assert_eq!(go_duration(secs(2)), "2s");
        assert_eq!(go_duration(Duration::from_millis(200)), "200ms");
        assert_eq!(go_duration(Duration::from_millis(2500)), "2.5s");
        assert_eq!(go_duration(mins(90)), "1h30m0s");
        assert_eq!(go_duration(Duration::from_micros(1500)), "1.5ms");
        assert_eq!(go_duration(Duration::from_nanos(7)), "7ns");
        assert_eq!(go_duration(Duration::ZERO), "0s");
    }

    #[tokio::test(start_paused = true)]
    async fn periodic_compacts_to_the_revision_of_one_retention_ago() {
        // One revision per second, starting at 100.
        let fake = Fake::new(|t| 100 + t.as_secs() as i64);
        let task = tokio::spawn(run(Policy::Periodic(secs(10)), fake.clone()));
        advance(Duration::from_millis(9_500)).await;
        assert!(fake.calls().is_empty(), "compacted before a full retention");
        advance(secs(26)).await;
        // Samples every second (a tenth of 10s), 11 kept; compaction every 10s.
        assert_eq!(
            fake.calls(),
            vec![(secs(10), 100), (secs(20), 109), (secs(30), 119)]
        );
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn periodic_beyond_an_hour_compacts_hourly() {
        // One revision per minute.
        let fake = Fake::new(|t| t.as_secs() as i64 / 60);
        let task = tokio::spawn(run(Policy::Periodic(24 * HOUR), fake.clone()));
        advance(24 * HOUR - mins(1)).await;
        assert!(fake.calls().is_empty());
        advance(2 * HOUR + mins(2)).await;
        // Samples every 6 minutes, 241 kept: the front is always 24h (and one sample) old.
        assert_eq!(
            fake.calls(),
            vec![(24 * HOUR, 0), (25 * HOUR, 54), (26 * HOUR, 114)]
        );
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn periodic_retries_after_a_tenth_and_counts_compacted_as_done() {
        let fake = Fake::new(|t| 100 + t.as_secs() as i64);
        fake.fail_next(CompactError::Other("etcdserver: request timed out".into()));
        fake.fail_next(CompactError::Compacted);
        let task = tokio::spawn(run(Policy::Periodic(secs(10)), fake.clone()));
        advance(secs(25)).await;
        assert_eq!(
            fake.calls(),
            vec![
                (secs(10), 100), // failed: retried at the next sample
                (secs(11), 100), // "already compacted": done, next one a period later
                (secs(21), 110),
            ]
        );
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_leader_compacts_and_a_new_leader_catches_up_at_once() {
        let fake = Fake::new(|t| 100 + t.as_secs() as i64);
        fake.set_role(FOLLOWER);
        let task = tokio::spawn(run(Policy::Periodic(secs(10)), fake.clone()));
        advance(Duration::from_millis(60_500)).await;
        assert!(fake.calls().is_empty(), "a follower compacted");
        fake.set_role(LEADER);
        advance(secs(11)).await;
        // It kept sampling as a follower: the first compaction comes at the next sample and
        // goes to the revision of one retention (and one sample) ago.
        assert_eq!(fake.calls(), vec![(secs(61), 150), (secs(71), 160)]);
        fake.set_role(STOPPED);
        advance(secs(2)).await;
        assert!(task.is_finished(), "the loop outlived the server");
    }

    #[tokio::test(start_paused = true)]
    async fn revision_mode_keeps_the_last_n_revisions_every_five_minutes() {
        // Revisions 1..=21 in the first five minutes, then no writes until minute 12, then more.
        let fake = Fake::new(|t| {
            let m = t.as_secs() / 60;
            match m {
                0..=4 => 1 + 4 * m as i64,
                5..=11 => 21,
                _ => 21 + m as i64,
            }
        });
        let task = tokio::spawn(run(Policy::Revision(10), fake.clone()));
        advance(mins(4)).await;
        assert!(fake.calls().is_empty());
        advance(mins(12)).await;
        // 5m: 21-10; 10m: unchanged, skipped; 15m: 36-10.
        assert_eq!(fake.calls(), vec![(mins(5), 11), (mins(15), 26)]);
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn revision_mode_skips_non_positive_targets_retries_failures_and_followers_idle() {
        let fake = Fake::new(|t| 5 + (t.as_secs() / 60) as i64);
        let task = tokio::spawn(run(Policy::Revision(10), fake.clone()));
        advance(mins(6)).await;
        assert!(fake.calls().is_empty(), "compacted to a revision <= 0");
        fake.set_role(FOLLOWER);
        advance(mins(10)).await; // 10m and 15m pass as a follower
        assert!(fake.calls().is_empty());
        fake.set_role(LEADER);
        fake.fail_next(CompactError::Other("etcdserver: leader changed".into()));
        advance(mins(10)).await;
        // 20m: 25-10 failed; 25m: 30-10 (a new target, tried again).
        assert_eq!(fake.calls(), vec![(mins(20), 15), (mins(25), 20)]);
        fake.set_role(STOPPED);
        advance(mins(6)).await;
        assert!(task.is_finished());
    }
}
