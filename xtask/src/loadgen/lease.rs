//! Lease scenarios.
//!
//! - `lease-keepalive`: grant L leases, renew them over keep-alive streams (one per client) and
//!   time each renewal round trip, then revoke them. Grant and revoke failures count as errors.
//! - `lease-grant-revoke`: every client loops LeaseGrant then LeaseRevoke of the lease it just
//!   got. One operation is one grant+revoke pair; grant and revoke latencies are kept apart.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use futures::channel::mpsc;
use futures::SinkExt;
use oxcd_proto::etcdserverpb::{LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest};

use hdrhistogram::Histogram;

use super::{
    closed_loop, new_histogram, status_kind, Common, Percentiles, Pool, Progress, Report, Stats,
};
use crate::error::{Error, Result};

#[derive(Args, Debug, Clone)]
pub struct LeaseArgs {
    /// Leases granted before the keep-alives start.
    #[arg(long, default_value_t = 100)]
    pub leases: u64,
    /// Total keep-alive requests, spread over the leases.
    #[arg(long, default_value_t = 10_000)]
    pub total: u64,
    /// TTL of the granted leases in seconds (long enough to outlive the run).
    #[arg(long, default_value_t = 60)]
    pub ttl: i64,
}

pub async fn keepalive(common: &Common, args: &LeaseArgs) -> Result<Report> {
    if args.leases == 0 || args.ttl <= 0 {
        return Err(Error::Usage("--leases and --ttl must be at least 1".into()));
    }
    let pool = Pool::connect(common).await?;

    // Grants: ids come back from the server.
    let ids = Arc::new(std::sync::Mutex::new(Vec::with_capacity(
        args.leases as usize,
    )));
    let quiet = Common {
        progress: super::ProgressMode::None,
        ..common.clone()
    };
    let (p, ids_g, ttl) = (pool.clone(), ids.clone(), args.ttl);
    let grants = closed_loop("lease-grant", &quiet, args.leases, move |c, _| {
        let mut lc = p.lease(c);
        let ids = ids_g.clone();
        async move {
            let resp = lc
                .lease_grant(LeaseGrantRequest { ttl, id: 0 })
                .await
                .map_err(|s| status_kind("grant: ", &s))?
                .into_inner();
            if !resp.error.is_empty() {
                return Err(format!("grant: {}", resp.error));
            }
            ids.lock().expect("lease id list").push(resp.id);
            Ok(())
        }
    })
    .await;
    let ids: Arc<Vec<i64>> = Arc::new(std::mem::take(&mut *ids.lock().expect("lease id list")));

    let mut stats = Stats::new();
    let start = Instant::now();
    let mut capped = false;
    if !ids.is_empty() {
        let next = Arc::new(AtomicU64::new(0));
        let progress = Progress::start("lease-keepalive", args.total, common.progress);
        let deadline = common.deadline_from(start);
        let timeout = common.request_timeout();
        let mut workers = Vec::with_capacity(common.clients);
        for c in 0..common.clients {
            let (next, ids, counters, pool) =
                (next.clone(), ids.clone(), progress.counters(), pool.clone());
            let total = args.total;
            workers.push(tokio::spawn(async move {
                let mut stats = Stats::new();
                let mut capped = false;
                let mut stream: Option<(mpsc::Sender<LeaseKeepAliveRequest>, tonic::Streaming<_>)> =
                    None;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    if Instant::now() >= deadline {
                        capped = true;
                        break;
                    }
                    let id = ids[(i % ids.len() as u64) as usize];
                    let t0 = Instant::now();
                    let outcome = tokio::time::timeout(timeout, async {
                        let req = LeaseKeepAliveRequest { id };
                        if let Some((tx, _)) = stream.as_mut() {
                            tx.send(req)
                                .await
                                .map_err(|_| "keepalive stream: send failed".to_string())?;
                        } else {
                            // The first request is queued before the call: a server may hold
                            // the response headers until it has something to answer.
                            let (mut tx, rx) = mpsc::channel(1);
                            tx.try_send(req)
                                .map_err(|_| "keepalive stream: send failed".to_string())?;
                            let resp = pool
                                .lease(c)
                                .lease_keep_alive(rx)
                                .await
                                .map_err(|s| status_kind("keepalive stream: ", &s))?;
                            stream = Some((tx, resp.into_inner()));
                        }
                        let (_, rx) = stream.as_mut().expect("stream is open");
                        match rx.message().await {
                            Ok(Some(r)) if r.ttl > 0 => Ok(()),
                            Ok(Some(r)) => {
                                Err(format!("keepalive: lease not found (ttl {})", r.ttl))
                            }
                            Ok(None) => Err("keepalive stream closed by the server".to_string()),
                            Err(s) => Err(status_kind("keepalive: ", &s)),
                        }
                    })
                    .await;
                    match outcome {
                        Ok(Ok(())) => {
                            stats.record_ok(t0.elapsed());
                            counters.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(kind)) => {
                            stats.record_err(kind);
                            counters.err.fetch_add(1, Ordering::Relaxed);
                            stream = None;
                        }
                        Err(_) => {
                            stats.record_err(format!("keepalive timed out after {timeout:?}"));
                            counters.err.fetch_add(1, Ordering::Relaxed);
                            stream = None;
                        }
                    }
                }
                (stats, capped)
            }));
        }
        for w in workers {
            match w.await {
                Ok((s, c)) => {
                    stats.merge(s);
                    capped |= c;
                }
                Err(e) => stats.record_err(format!("load worker failed: {e}")),
            }
        }
        progress.finish().await;
    } else {
        stats.record_errs("keepalive: no lease could be granted", args.total);
    }
    let elapsed = start.elapsed();

    // Revoke what was granted so the server is left clean.
    let (p, ids_r) = (pool.clone(), ids.clone());
    let revokes = closed_loop("lease-revoke", &quiet, ids.len() as u64, move |c, i| {
        let mut lc = p.lease(c);
        let id = ids_r[i as usize];
        async move {
            lc.lease_revoke(LeaseRevokeRequest { id })
                .await
                .map(|_| ())
                .map_err(|s| status_kind("revoke: ", &s))
        }
    })
    .await;

    for (k, n) in grants.error_kinds.iter().chain(revokes.error_kinds.iter()) {
        stats.record_errs(k.clone(), *n);
    }
    let mut report = Report::from_stats("lease-keepalive", args.total, stats, elapsed);
    report.time_capped = capped || grants.time_capped || revokes.time_capped;
    report.extra.insert("leases".into(), ids.len() as f64);
    report
        .extra
        .insert("grant_p99_ms".into(), Percentiles::of(&grants.hist).p99);
    report
        .extra
        .insert("revoke_p99_ms".into(), Percentiles::of(&revokes.hist).p99);
    Ok(report)
}

#[derive(Args, Debug, Clone)]
pub struct GrantRevokeArgs {
    /// Total grant+revoke pairs (each pair is two requests).
    #[arg(long, default_value_t = 10_000)]
    pub total: u64,
    /// TTL of the granted leases in seconds (each is revoked right away; the TTL only bounds
    /// how long a lease whose revoke failed lingers).
    #[arg(long, default_value_t = 60)]
    pub ttl: i64,
}

/// Grant and revoke latencies of one client (kept per client so workers never contend).
struct PairHists {
    grant: Histogram<u64>,
    revoke: Histogram<u64>,
}

fn micros(d: std::time::Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

/// `lease-grant-revoke`: `total` pairs of LeaseGrant(ttl) then LeaseRevoke of that lease, each
/// client waiting for the revoke before its next grant. The report counts pairs: throughput is
/// pairs per second and the main latency is that of the whole pair; a pair whose grant or
/// revoke failed is one error, of kind `grant: ...` or `revoke: ...`. Extra figures give the
/// grant and revoke latencies on their own and the request rate (grants plus revokes).
pub async fn grant_revoke(common: &Common, args: &GrantRevokeArgs) -> Result<Report> {
    if args.ttl <= 0 {
        return Err(Error::Usage("--ttl must be at least 1".into()));
    }
    let pool = Pool::connect(common).await?;
    let hists: Arc<Vec<std::sync::Mutex<PairHists>>> = Arc::new(
        (0..common.clients)
            .map(|_| {
                std::sync::Mutex::new(PairHists {
                    grant: new_histogram(),
                    revoke: new_histogram(),
                })
            })
            .collect(),
    );
    let (p, h, ttl) = (pool.clone(), hists.clone(), args.ttl);
    let mut report = closed_loop("lease-grant-revoke", common, args.total, move |c, _| {
        let mut lc = p.lease(c);
        let h = h.clone();
        async move {
            let t0 = Instant::now();
            let resp = lc
                .lease_grant(LeaseGrantRequest { ttl, id: 0 })
                .await
                .map_err(|s| status_kind("grant: ", &s))?
                .into_inner();
            if !resp.error.is_empty() {
                return Err(format!("grant: {}", resp.error));
            }
            if resp.id == 0 {
                return Err("grant: no lease id in the response".into());
            }
            let t1 = Instant::now();
            h[c].lock()
                .expect("latency histograms")
                .grant
                .saturating_record(micros(t1 - t0));
            lc.lease_revoke(LeaseRevokeRequest { id: resp.id })
                .await
                .map_err(|s| status_kind("revoke: ", &s))?;
            h[c].lock()
                .expect("latency histograms")
                .revoke
                .saturating_record(micros(t1.elapsed()));
            Ok(())
        }
    })
    .await;

    let (mut grant, mut revoke) = (new_histogram(), new_histogram());
    for m in hists.iter() {
        let m = m.lock().expect("latency histograms");
        grant.add(&m.grant).expect("histograms share bounds");
        revoke.add(&m.revoke).expect("histograms share bounds");
    }
    let (g, r) = (Percentiles::of(&grant), Percentiles::of(&revoke));
    let secs = report.elapsed_s.max(1e-9);
    let extra = [
        ("grant_p50_ms", g.p50),
        ("grant_p99_ms", g.p99),
        ("revoke_p50_ms", r.p50),
        ("revoke_p99_ms", r.p99),
        ("grants_ok", grant.len() as f64),
        ("revokes_ok", revoke.len() as f64),
        (
            "grant_and_revoke_requests_per_s",
            (grant.len() + revoke.len()) as f64 / secs,
        ),
    ];
    for (k, v) in extra {
        report.extra.insert(k.into(), v);
    }
    Ok(report)
}
