//! `lease-keepalive`: grant L leases, renew them over keep-alive streams (one per client) and
//! time each renewal round trip, then revoke them. Grant and revoke failures count as errors.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use futures::channel::mpsc;
use futures::SinkExt;
use oxcd_proto::etcdserverpb::{LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest};

use super::{closed_loop, status_kind, Common, Percentiles, Pool, Progress, Report, Stats};
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
