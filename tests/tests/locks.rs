//! Locks and elections: the v3lock and v3election gRPC services through the `etcd-client`
//! crate, and `etcdctl lock` / `etcdctl elect` (client-side recipes over KV, lease and watch).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, LockOptions, ProclaimOptions, ResignOptions};
use oxcd_tests::{Server, ETCDCTL_BIN};

async fn connect(s: &Server) -> Client {
    common::connect_with(s, Duration::from_secs(30)).await
}

/// Critical sections (enter, exit) recorded by every contender.
type Sections = Arc<Mutex<Vec<(Instant, Instant, usize)>>>;

fn assert_disjoint(sections: &Sections, expected: usize) {
    let mut s = sections.lock().unwrap().clone();
    assert_eq!(s.len(), expected, "every contender got the lock once");
    s.sort_by_key(|x| x.0);
    for w in s.windows(2) {
        assert!(
            w[0].1 <= w[1].0,
            "contender {} entered before contender {} left",
            w[1].2,
            w[0].2
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_service_gives_mutual_exclusion() {
    let server = Server::start();
    let sections: Sections = Arc::default();
    const CONTENDERS: usize = 5;
    let mut tasks = Vec::new();
    for i in 0..CONTENDERS {
        let mut c = connect(&server).await;
        let sections = sections.clone();
        tasks.push(tokio::spawn(async move {
            let lease = c.lease_grant(30, None).await.unwrap().id();
            let locked = c
                .lock("the-lock", Some(LockOptions::new().with_lease(lease)))
                .await
                .unwrap();
            let key = locked.key().to_vec();
            assert!(key.starts_with(b"the-lock/"), "{key:?}");
            let enter = Instant::now();
            tokio::time::sleep(Duration::from_millis(100)).await;
            let exit = Instant::now();
            sections.lock().unwrap().push((enter, exit, i));
            c.unlock(key).await.unwrap();
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("every contender finishes")
            .unwrap();
    }
    assert_disjoint(&sections, CONTENDERS);

    // A holder whose lease is revoked lets the next contender in.
    let mut a = connect(&server).await;
    let mut b = connect(&server).await;
    let la = a.lease_grant(30, None).await.unwrap().id();
    let lb = b.lease_grant(30, None).await.unwrap().id();
    a.lock("l2", Some(LockOptions::new().with_lease(la)))
        .await
        .unwrap();
    let waiter = tokio::spawn(async move {
        b.lock("l2", Some(LockOptions::new().with_lease(lb)))
            .await
            .map(|r| r.key().to_vec())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "second locker waits while the first holds"
    );
    a.lease_revoke(la).await.unwrap();
    let key = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("lock passes on after revoke")
        .unwrap()
        .unwrap();
    assert_eq!(key, format!("l2/{lb:x}").into_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election_service_campaign_proclaim_observe_resign() {
    let server = Server::start();
    let mut c = connect(&server).await;
    let err = c.leader("elec").await.unwrap_err();
    assert!(err.to_string().contains("election: no leader"), "{err}");

    let mut observer = c.observe("elec").await.unwrap();
    let l1 = c.lease_grant(30, None).await.unwrap().id();
    let won = c.campaign("elec", "one", l1).await.unwrap();
    let leader = won.leader().unwrap().clone();
    assert_eq!(leader.key(), format!("elec/{l1:x}").as_bytes());
    assert_eq!(leader.lease(), l1);

    let seen = observer.message().await.unwrap().unwrap();
    assert_eq!(seen.kv().unwrap().value(), b"one");

    c.proclaim(
        "two",
        Some(ProclaimOptions::new().with_leader(leader.clone())),
    )
    .await
    .unwrap();
    let seen = observer.message().await.unwrap().unwrap();
    assert_eq!(seen.kv().unwrap().value(), b"two");
    let now = c.leader("elec").await.unwrap();
    assert_eq!(now.kv().unwrap().value(), b"two");

    // A second candidate waits until the leader resigns, then leads.
    let mut c2 = connect(&server).await;
    let l2 = c2.lease_grant(30, None).await.unwrap().id();
    let second = tokio::spawn(async move { c2.campaign("elec", "three", l2).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!second.is_finished());
    c.resign(Some(ResignOptions::new().with_leader(leader.clone())))
        .await
        .unwrap();
    let won2 = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(won2.leader().unwrap().lease(), l2);
    let seen = observer.message().await.unwrap().unwrap();
    assert_eq!(seen.kv().unwrap().value(), b"three");

    // The old leader key no longer proclaims.
    let err = c
        .proclaim("stale", Some(ProclaimOptions::new().with_leader(leader)))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("election: not leader"), "{err}");
}

#[test]
fn etcdctl_lock_excludes_and_elect_reports_the_leader() {
    let server = Server::start();
    let ep = server.endpoint();
    // Contenders each append "enter N" / "exit N" to a shared file inside the lock.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("sections");
    let mut children = Vec::new();
    for i in 0..4 {
        let script = format!(
            "echo enter {i} >> {p}; sleep 0.2; echo exit {i} >> {p}",
            p = log.display()
        );
        children.push(
            std::process::Command::new(ETCDCTL_BIN)
                .env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={ep}"))
                .args(["lock", "ctl-lock", "--", "sh", "-c", &script])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for mut ch in children {
        loop {
            if let Some(st) = ch.try_wait().unwrap() {
                assert!(st.success());
                break;
            }
            assert!(Instant::now() < deadline, "etcdctl lock did not finish");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 8, "{text}");
    for pair in lines.chunks(2) {
        let n = pair[0].strip_prefix("enter ").expect("enter first");
        assert_eq!(
            pair[1],
            format!("exit {n}"),
            "sections interleaved:\n{text}"
        );
    }

    // etcdctl elect: a campaigner holds leadership; `elect -l` prints the leader key and value.
    let mut campaigner = std::process::Command::new(ETCDCTL_BIN)
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={ep}"))
        .args(["elect", "ctl-elect", "proposal-1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // `elect -l` keeps observing: read what it printed, then stop it.
    let mut observer = std::process::Command::new(ETCDCTL_BIN)
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={ep}"))
        .args(["elect", "-l", "ctl-elect"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let _ = observer.kill();
    let mut printed = String::new();
    std::io::Read::read_to_string(observer.stdout.as_mut().unwrap(), &mut printed).unwrap();
    let _ = observer.wait();
    let _ = campaigner.kill();
    let _ = campaigner.wait();
    let lines: Vec<&str> = printed.lines().collect();
    assert!(lines.len() >= 2, "{printed:?}");
    assert!(lines[0].starts_with("ctl-elect/"), "{printed:?}");
    assert_eq!(lines[1], "proposal-1");
}
