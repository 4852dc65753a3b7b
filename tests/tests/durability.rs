//! Crash and restart: what the server acknowledged must survive a SIGKILL, and a graceful
//! SIGTERM must exit cleanly and keep everything.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use oxcd_tests::{server_is_etcd, Server};

async fn connect(s: &Server) -> Client {
    common::connect_with(s, Duration::from_secs(5)).await
}

const WRITERS: usize = 8;
const PUTS_PER_WRITER: usize = 250;
/// The kill lands after this many acknowledgements, while writers are still busy.
const KILL_AFTER_ACKS: usize = 800;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_puts_survive_sigkill() {
    puts_survive_sigkill(&[]).await;
}

/// The store's engine keeps no log of its own: what it had not flushed at the kill comes back
/// from the raft log, which is only cut below what a flush made durable. With a compaction
/// every 50 entries, keeping 10 below the cut (oxcd's own flag; etcd 3.4 keeps 5000), the kill
/// lands after many such cuts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_puts_survive_sigkill_after_log_compactions() {
    if server_is_etcd() {
        puts_survive_sigkill(&["--snapshot-count=50"]).await;
    } else {
        puts_survive_sigkill(&[
            "--snapshot-count=50",
            "--experimental-snapshot-catchup-entries=10",
        ])
        .await;
    }
}

async fn puts_survive_sigkill(flags: &[&str]) {
    let mut server = Server::start_with(flags);
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let client = connect(&server).await;

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mut kv = client.kv_client();
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            for i in 0..PUTS_PER_WRITER {
                if Instant::now() > deadline {
                    break;
                }
                let key = format!("dur/{w}/{i:04}");
                let value = format!("value-{w}-{i}-{}", "x".repeat(i % 97));
                let put = tokio::time::timeout(
                    Duration::from_secs(5),
                    kv.put(key.clone(), value.clone(), None),
                );
                match put.await {
                    Ok(Ok(_)) => acked.lock().unwrap().push((key, value)),
                    // The server is gone (or going): this writer's stream ends here.
                    Ok(Err(_)) | Err(_) => break,
                }
            }
        }));
    }

    // Kill mid-stream: once enough puts are acknowledged, or when time runs out.
    let started = Instant::now();
    loop {
        let n = acked.lock().unwrap().len();
        if n >= KILL_AFTER_ACKS || started.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let status = server.kill9();
    assert!(
        !status.success(),
        "SIGKILL must end the process abnormally: {status}"
    );
    for w in writers {
        tokio::time::timeout(Duration::from_secs(30), w)
            .await
            .expect("writer did not stop after the kill")
            .expect("writer panicked");
    }
    drop(client);

    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= KILL_AFTER_ACKS.min(WRITERS * PUTS_PER_WRITER) / 2,
        "too few puts acknowledged before the kill ({}) for the test to mean anything",
        acked.len()
    );
    assert!(
        acked.len() < WRITERS * PUTS_PER_WRITER,
        "every put finished before the kill: the kill did not land mid-stream"
    );

    eprintln!(
        "{} puts acknowledged before SIGKILL ({} attempted at most)",
        acked.len(),
        WRITERS * PUTS_PER_WRITER
    );
    server.restart();
    let mut c = connect(&server).await;
    let all = c
        .get("dur/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("read after restart");
    let stored: std::collections::HashMap<&[u8], &[u8]> =
        all.kvs().iter().map(|kv| (kv.key(), kv.value())).collect();
    let mut lost = Vec::new();
    for (k, v) in &acked {
        match stored.get(k.as_bytes()) {
            Some(got) if *got == v.as_bytes() => {}
            other => lost.push(format!(
                "{k}: want {v:?}, got {:?}",
                other.map(|b| String::from_utf8_lossy(b))
            )),
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged puts lost or wrong after SIGKILL + restart, e.g.:\n{}",
        lost.len(),
        acked.len(),
        lost.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
    // Revision 1 is the empty store; each acknowledged put made one more.
    let rev = all.header().unwrap().revision();
    assert!(
        rev > acked.len() as i64,
        "revision {rev} after restart, but {} puts were acknowledged",
        acked.len()
    );
    // Unacknowledged puts may or may not have landed, but nothing else can exist.
    assert!(
        (stored.len() as i64) < rev,
        "{} keys at revision {rev}",
        stored.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_cleanly_and_restart_keeps_data() {
    let mut server = Server::start();
    let mut c = connect(&server).await;
    for i in 0..50 {
        c.put(format!("keep/{i:02}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
    c.delete("keep/07", None).await.unwrap();
    c.put("keep/03", "overwritten", None).await.unwrap();
    let before = c
        .get("keep/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    let rev_before = before.header().unwrap().revision();
    assert_eq!(rev_before, 53);
    drop(c);

    let began = Instant::now();
    let status = server
        .terminate(Duration::from_secs(10))
        .unwrap_or_else(|| {
            panic!(
                "no exit within 10s of SIGTERM; output:\n{}",
                server.output()
            )
        });
    let took = began.elapsed();
    // etcd 3.4 shuts down cleanly and then re-raises SIGTERM on itself, so the reference ends
    // "killed by SIGTERM"; oxcd is required to exit 0.
    use std::os::unix::process::ExitStatusExt;
    let clean =
        status.code() == Some(0) || (server_is_etcd() && status.signal() == Some(libc::SIGTERM));
    assert!(
        clean,
        "unclean exit on SIGTERM: {status}; output:\n{}",
        server.output()
    );
    assert!(took < Duration::from_secs(5), "SIGTERM took {took:?}");

    server.restart();
    let mut c = connect(&server).await;
    let after = c
        .get("keep/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(after.header().unwrap().revision(), rev_before);
    let pairs = |r: &etcd_client::GetResponse| {
        r.kvs()
            .iter()
            .map(|kv| {
                (
                    kv.key_str().unwrap().to_string(),
                    kv.value_str().unwrap().to_string(),
                    kv.create_revision(),
                    kv.mod_revision(),
                    kv.version(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(pairs(&after), pairs(&before));
    assert_eq!(after.count(), 49);
    // The store keeps counting from where it was.
    let r = c.put("keep/new", "x", None).await.unwrap();
    assert_eq!(r.header().unwrap().revision(), rev_before + 1);
}
