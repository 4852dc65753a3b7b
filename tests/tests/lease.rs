//! Leases through the `etcd-client` crate and through etcdctl (compared with etcd 3.4):
//! expiry within etcd's tolerance, keep-alive, revoke deleting attached keys in one revision,
//! leases surviving a restart, and etcd's errors.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, LeaseTimeToLiveOptions, PutOptions, WatchOptions};
use oxcd_tests::{etcd_available, etcdctl, server_bin, ConfigVia, Server, ETCD_BIN};

async fn connect(s: &Server) -> Client {
    common::connect_with(s, Duration::from_secs(10)).await
}

async fn exists(c: &mut Client, key: &str) -> bool {
    c.get(key, None).await.unwrap().count() == 1
}

/// Waits until `key` is gone; returns how long that took.
async fn wait_gone(c: &mut Client, key: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    while exists(c, key).await {
        assert!(start.elapsed() < limit, "{key} still there after {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_keepalive_and_revoke() {
    let server = Server::start();
    let mut c = connect(&server).await;

    // Expiry: a 2 s lease (etcd's minimum for default timing) deletes its key in 2 s + slack.
    let short = c.lease_grant(2, None).await.unwrap();
    assert_eq!(short.ttl(), 2);
    c.put("short", "v", Some(PutOptions::new().with_lease(short.id())))
        .await
        .unwrap();
    let took = wait_gone(&mut c, "short", Duration::from_secs(6)).await;
    assert!(
        took >= Duration::from_millis(1500),
        "expired too early: {took:?}"
    );
    let ttl = c.lease_time_to_live(short.id(), None).await.unwrap();
    assert_eq!(ttl.ttl(), -1, "an expired lease is gone");

    // Keep-alive holds a key well past its TTL.
    let held = c.lease_grant(2, None).await.unwrap();
    c.put("held", "v", Some(PutOptions::new().with_lease(held.id())))
        .await
        .unwrap();
    let (mut keeper, mut responses) = c.lease_keep_alive(held.id()).await.unwrap();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        keeper.keep_alive().await.unwrap();
        let r = responses.message().await.unwrap().unwrap();
        assert_eq!((r.id(), r.ttl()), (held.id(), 2));
    }
    assert!(
        exists(&mut c, "held").await,
        "kept-alive key survived 4 s on a 2 s lease"
    );
    let ttl = c
        .lease_time_to_live(held.id(), Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    assert_eq!(ttl.granted_ttl(), 2);
    assert_eq!(ttl.keys(), &[b"held".to_vec()]);

    // Revoke: every attached key goes in one revision, one watch event per key.
    let many = c.lease_grant(60, None).await.unwrap();
    for k in ["r/a", "r/b", "r/c"] {
        c.put(k, "v", Some(PutOptions::new().with_lease(many.id())))
            .await
            .unwrap();
    }
    let mut watch = c
        .watch("r/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    assert!(watch.message().await.unwrap().unwrap().created());
    let revoked = c.lease_revoke(many.id()).await.unwrap();
    let rev = revoked.header().unwrap().revision();
    let resp = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let evs: Vec<(EventType, String, i64)> = resp
        .events()
        .iter()
        .map(|e| {
            let kv = e.kv().unwrap();
            (
                e.event_type(),
                kv.key_str().unwrap().to_string(),
                kv.mod_revision(),
            )
        })
        .collect();
    assert_eq!(
        evs,
        vec![
            (EventType::Delete, "r/a".into(), rev),
            (EventType::Delete, "r/b".into(), rev),
            (EventType::Delete, "r/c".into(), rev),
        ]
    );

    // etcd's errors: unknown lease on put and revoke; a duplicate id.
    let err = c
        .put("x", "v", Some(PutOptions::new().with_lease(0x1234)))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("etcdserver: requested lease not found"),
        "{err}"
    );
    let err = c.lease_revoke(0x1234).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("etcdserver: requested lease not found"),
        "{err}"
    );
    let mine = c
        .lease_grant(
            30,
            Some(etcd_client::LeaseGrantOptions::new().with_id(0x77)),
        )
        .await
        .unwrap();
    assert_eq!(mine.id(), 0x77);
    let err = c
        .lease_grant(
            30,
            Some(etcd_client::LeaseGrantOptions::new().with_id(0x77)),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("etcdserver: lease already exists"),
        "{err}"
    );
    let leases = c.leases().await.unwrap();
    let mut ids: Vec<i64> = leases.leases().iter().map(|l| l.id()).collect();
    ids.sort();
    let mut want = vec![held.id(), 0x77];
    want.sort();
    assert_eq!(ids, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_survives_restart_and_still_expires() {
    let mut server = Server::start();
    let mut c = connect(&server).await;
    let l = c.lease_grant(3, None).await.unwrap();
    c.put("survivor", "v", Some(PutOptions::new().with_lease(l.id())))
        .await
        .unwrap();
    let long = c.lease_grant(600, None).await.unwrap();
    c.put("long", "v", Some(PutOptions::new().with_lease(long.id())))
        .await
        .unwrap();
    drop(c);
    server.kill9();
    server.restart();
    let mut c = connect(&server).await;
    let ttl = c
        .lease_time_to_live(l.id(), Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    assert_eq!(
        ttl.keys(),
        &[b"survivor".to_vec()],
        "key re-attached after restart"
    );
    // Expires exactly once: the key goes, and the long lease's key stays.
    wait_gone(&mut c, "survivor", Duration::from_secs(10)).await;
    assert!(exists(&mut c, "long").await);
    let ttl = c.lease_time_to_live(long.id(), None).await.unwrap();
    assert!(ttl.ttl() > 500, "long lease keeps its TTL: {}", ttl.ttl());
}

/// Lease ids are random; name them L1, L2, ... in order of first appearance.
fn normalize_lease_ids(text: &str, ids: &mut Vec<String>) -> String {
    let mut out = String::new();
    for word in text.split_inclusive(|c: char| c.is_whitespace() || c == '(' || c == ')') {
        let core = word.trim_end_matches(|c: char| c.is_whitespace() || c == '(' || c == ')');
        let tail = &word[core.len()..];
        let is_id = core.len() >= 12 && core.chars().all(|c| c.is_ascii_hexdigit());
        if is_id {
            let n = match ids.iter().position(|i| i == core) {
                Some(n) => n,
                None => {
                    ids.push(core.to_string());
                    ids.len() - 1
                }
            };
            out.push_str(&format!("L{}{tail}", n + 1));
        } else {
            out.push_str(word);
        }
    }
    out
}

/// etcd lists a lease's keys in map order (random); compare them as a set.
fn sort_attached_keys(text: &str) -> String {
    const OPEN: &str = "attached keys([";
    let Some(start) = text.find(OPEN).map(|i| i + OPEN.len()) else {
        return text.to_string();
    };
    let Some(len) = text[start..].find("])") else {
        return text.to_string();
    };
    let mut keys: Vec<&str> = text[start..start + len].split(' ').collect();
    keys.sort_unstable();
    format!(
        "{}{}{}",
        &text[..start],
        keys.join(" "),
        &text[start + len..]
    )
}

/// `lease list` order is map order in etcd (random) and id order in oxcd; compare as a set.
fn sort_lease_list(text: &str) -> String {
    let Some(found) = text.find("found ") else {
        return text.to_string();
    };
    let Some(body) = text[found..].find('\n').map(|i| found + i + 1) else {
        return text.to_string();
    };
    let end = text[body..].find("error:").map_or(text.len(), |i| body + i);
    let mut ids: Vec<&str> = text[body..end].lines().collect();
    ids.sort_unstable();
    let mut out = text[..body].to_string();
    for id in ids {
        out.push_str(id);
        out.push('\n');
    }
    out.push_str(&text[end..]);
    out
}

fn run_lease_script(bin: &Path) -> Vec<String> {
    let mut server = Server::spawn_new(bin, &[], ConfigVia::Flags);
    server.wait_healthy(oxcd_tests::START_TIMEOUT);
    let ep = server.endpoint();
    let mut ids = Vec::new();
    let mut transcript = Vec::new();
    let mut step = |args: &[&str], ids: &mut Vec<String>| -> String {
        let out = etcdctl(&ep, args, None);
        let error = out.error_lines();
        let line = format!(
            "$ etcdctl {}\nexit: {:?}\n{}error: {}\n",
            normalize_lease_ids(&args.join(" "), ids),
            out.code,
            normalize_lease_ids(&out.stdout, ids),
            normalize_lease_ids(&error, ids)
        );
        transcript.push(line);
        out.stdout
    };
    let first = step(&["lease", "grant", "100"], &mut ids);
    let l1 = first.split_whitespace().nth(1).unwrap().to_string();
    step(&["lease", "grant", "200"], &mut ids);
    let l2 = ids[1].clone();
    step(&["put", "--lease", &l1, "a", "1"], &mut ids);
    step(&["put", "--lease", &l1, "b", "2"], &mut ids);
    step(&["put", "--lease", &l2, "c", "3"], &mut ids);
    step(&["put", "--lease", "123456789abc", "d", "4"], &mut ids);
    step(&["lease", "timetolive", &l1, "--keys"], &mut ids);
    step(&["lease", "timetolive", &l2], &mut ids);
    step(&["lease", "timetolive", "123456789abc"], &mut ids);
    step(&["lease", "list"], &mut ids);
    step(&["lease", "keep-alive", "--once", &l2], &mut ids);
    step(&["lease", "revoke", &l1], &mut ids);
    step(&["lease", "revoke", &l1], &mut ids);
    step(&["get", "--prefix", ""], &mut ids);
    step(&["put", "--lease", &l2, "a", "again"], &mut ids);
    step(&["put", "a", "no-lease-now"], &mut ids);
    step(&["lease", "timetolive", &l2, "--keys"], &mut ids);
    step(&["lease", "list"], &mut ids);
    step(&["lease", "revoke", &l2], &mut ids);
    step(&["get", "--prefix", ""], &mut ids);
    transcript
        .into_iter()
        .map(|t| {
            // TTLs left are time-dependent by a second either way.
            let t = t
                .replace("remaining(99s)", "remaining(100s)")
                .replace("remaining(199s)", "remaining(200s)");
            sort_lease_list(&sort_attached_keys(&t))
        })
        .collect()
}

#[test]
fn etcdctl_lease_script_matches_etcd() {
    if !etcd_available() {
        eprintln!("\n\n!!! SKIPPED etcdctl_lease_script_matches_etcd: {ETCD_BIN} is not installed !!!\n\n");
        return;
    }
    let reference = run_lease_script(Path::new(ETCD_BIN));
    let actual = run_lease_script(&server_bin());
    let diffs: Vec<String> = reference
        .iter()
        .zip(&actual)
        .filter(|(a, b)| a != b)
        .map(|(a, b)| format!("--- etcd 3.4:\n{a}+++ oxcd:\n{b}"))
        .collect();
    assert!(
        diffs.is_empty(),
        "{} of {} steps differ:\n{}",
        diffs.len(),
        reference.len(),
        diffs.join("\n")
    );
    let all = reference.concat();
    for needle in [
        "granted with TTL(100s)",
        "attached keys([a b])",
        "revoked",
        "requested lease not found",
    ] {
        assert!(all.contains(needle), "reference lacks {needle:?}:\n{all}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_storm_is_revoked_in_batches_without_stalling_writes() {
    const LEASES: usize = 10_000;
    const WORKERS: usize = 32;
    let server = Server::start();
    // Grant every lease and attach one key to each, from concurrent clients.
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let mut c = connect(&server).await;
        tasks.push(tokio::spawn(async move {
            for i in (w..LEASES).step_by(WORKERS) {
                let id = c.lease_grant(3, None).await.unwrap().id();
                c.put(
                    format!("storm/{i:05}"),
                    "v",
                    Some(PutOptions::new().with_lease(id)),
                )
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut c = connect(&server).await;
    let count = |r: etcd_client::GetResponse| r.count();
    let opts = || {
        Some(
            etcd_client::GetOptions::new()
                .with_prefix()
                .with_count_only(),
        )
    };
    // All were granted within a few seconds of each other: most expire together. Writes
    // keep flowing meanwhile, each answered promptly.
    let start = Instant::now();
    let mut worst = Duration::ZERO;
    let mut writes = 0;
    loop {
        let t = Instant::now();
        c.put("storm-writer", format!("{writes}"), None)
            .await
            .unwrap();
        worst = worst.max(t.elapsed());
        writes += 1;
        if writes % 20 == 0 && count(c.get("storm/", opts()).await.unwrap()) == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "leases still not all revoked after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        worst < Duration::from_secs(1),
        "a write waited {worst:?} while leases were revoked"
    );
    assert!(c.leases().await.unwrap().leases().is_empty());
    eprintln!(
        "{LEASES} leases revoked within {:?} of the last grant; worst write latency {worst:?} over {writes} writes",
        start.elapsed()
    );
}
