//! `--quota-backend-bytes` and alarms as etcd 3.4 has them: a write that would take the backend
//! over its quota is refused with `etcdserver: mvcc: database space exceeded` and raises a
//! NOSPACE alarm; while the alarm is set, everything that would grow the store is refused on
//! every member (reads, deletes, compaction and defragmentation still work), the alarm survives
//! a restart, and after compaction, defragmentation and `etcdctl alarm disarm` writes work again.
//!
//! The etcdctl script runs against the server under test and, when installed, against etcd 3.4;
//! the transcripts must match once member ids, ports and revisions are normalized.

use std::path::Path;
use std::time::{Duration, Instant};

use etcd_client::{AlarmAction, AlarmOptions, AlarmType, Client};
use oxcd_tests::cluster::TestCluster;
use oxcd_tests::{
    etcd_available, etcdctl, http_get, server_bin, ConfigVia, CtlOutput, Server, ETCD_BIN,
};

mod common;

const NOSPACE: &str = "etcdserver: mvcc: database space exceeded";
/// Small enough to fill quickly, large enough that a fresh store is far below it.
const QUOTA: u64 = 16 * 1024 * 1024;
/// One value per put, below `--max-request-bytes` (1.5 MiB).
const VALUE_BYTES: usize = 1_000_000;
/// Puts before giving up: the quota must be crossed well before (about 16 are needed).
const MAX_PUTS: usize = 48;

/// Incompressible-looking printable bytes (neither engine compresses, but be safe), fed to
/// `etcdctl put KEY` on stdin since a 1 MB argument exceeds what a command line may carry.
fn big_value() -> String {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..VALUE_BYTES)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (b'a' + (x % 26) as u8) as char
        })
        .collect()
}

/// The parts of an etcdctl run that must match etcd: exit code, stdout, the `Error:` line
/// (stderr also carries client log lines with timestamps).
fn shown(out: &CtlOutput) -> String {
    let error = out.error_lines();
    format!("exit: {:?}\n{}error: {}\n", out.code, out.stdout, error)
}

struct Run<'a> {
    server: &'a Server,
    transcript: Vec<String>,
    /// (text, replacement) applied to every recorded output.
    normalize: Vec<(String, String)>,
}

impl Run<'_> {
    fn ctl(&self, args: &[&str], stdin: Option<&str>) -> CtlOutput {
        etcdctl(&self.server.endpoint(), args, stdin)
    }

    /// Runs a step and records its normalized output.
    fn step(&mut self, args: &[&str], stdin: Option<&str>) -> CtlOutput {
        let out = self.ctl(args, stdin);
        let mut text = format!("$ etcdctl {}\n{}", args.join(" "), shown(&out));
        for (from, to) in &self.normalize {
            text = text.replace(from.as_str(), to);
        }
        self.transcript.push(text);
        out
    }

    fn status(&self) -> serde_json::Value {
        let v = self.ctl(&["endpoint", "status", "-w", "json"], None).json();
        v[0]["Status"].clone()
    }
}

/// The scenario on a fresh single member of `bin`; returns the normalized transcript of every
/// step after the quota was first crossed.
fn scenario(bin: &Path) -> Vec<String> {
    let quota = format!("--quota-backend-bytes={QUOTA}");
    let mut server = Server::spawn_new(bin, &[&quota], ConfigVia::Flags);
    server.wait_healthy(oxcd_tests::START_TIMEOUT);
    let mut run = Run {
        server: &server,
        transcript: Vec::new(),
        normalize: Vec::new(),
    };
    let status = run.status();
    let member = status["header"]["member_id"].as_u64().expect("member_id");
    assert!(
        status["errors"].is_null(),
        "a fresh member reports errors: {status}"
    );
    run.normalize = vec![
        (member.to_string(), "<member>".into()),
        (run.server.endpoint(), "<endpoint>".into()),
    ];

    // Fill the backend: the same three keys over and over, so compaction can free it later.
    let value = big_value();
    let started = Instant::now();
    let mut refused = None;
    for i in 0..MAX_PUTS {
        let key = format!("big{}", i % 3);
        let out = run.ctl(&["put", &key], Some(&value));
        if !out.success {
            refused = Some((i, out));
            break;
        }
        assert_eq!(out.stdout, "OK\n");
    }
    let (accepted, out) = refused.unwrap_or_else(|| {
        panic!(
            "{MAX_PUTS} puts of {VALUE_BYTES} bytes never crossed a quota of {QUOTA} bytes; status: {}",
            run.status()
        )
    });
    assert_eq!(out.error(), NOSPACE, "{out:#?}");
    let db_size = run.status()["dbSize"].as_i64().unwrap_or(0);
    eprintln!(
        "{}: {accepted} puts accepted, refused at db size {db_size} in {:?}",
        bin.display(),
        started.elapsed()
    );
    assert!(
        accepted >= 8,
        "refused after only {accepted} puts of {VALUE_BYTES} bytes"
    );

    // The refusing member raised its own NOSPACE alarm.
    let list = run.step(&["alarm", "list"], None);
    assert_eq!(
        list.ok(),
        format!("memberID:{member} alarm:NOSPACE \n"),
        "{list:#?}"
    );
    run.step(&["alarm", "list", "-w", "json"], None);
    let errors = run.status()["errors"].to_string();
    run.transcript.push(format!(
        "status errors: {}\n",
        errors.replace(&member.to_string(), "<member>")
    ));
    assert_eq!(errors, format!("[\"memberID:{member} alarm:NOSPACE \"]"));
    // An alarm makes the member unhealthy, unless the check is told to overlook it.
    let port = run.server.spec().client_port;
    let (code, body) = http_get(port, "/health").expect("GET /health");
    assert!(
        code == 503 && body.contains(r#""health":"false""#),
        "/health under NOSPACE: {code} {body}"
    );
    let (code, body) = http_get(port, "/health?exclude=NOSPACE").expect("GET /health");
    assert!(
        code == 200 && body.contains(r#""health":"true""#),
        "/health?exclude=NOSPACE: {code} {body}"
    );

    // Reads, deletes and read-only txns work; whatever would grow the store does not.
    run.step(&["get", "big1", "--keys-only"], None);
    run.step(&["get", "--prefix", "big", "--keys-only"], None);
    assert_eq!(run.step(&["put", "small", "v"], None).error(), NOSPACE);
    assert_eq!(
        run.step(&["txn"], Some("\nput small v\n\n\n")).error(),
        NOSPACE
    );
    run.step(&["txn"], Some("\nget big1 --keys-only\n\n\n"));
    let grant = run.step(&["lease", "grant", "10"], None);
    assert_eq!(grant.error(), format!("failed to grant lease ({NOSPACE})"));
    assert_eq!(run.step(&["del", "big0"], None).ok(), "1\n");

    // The alarm is part of the replicated state: a restart keeps it. (The harness' restart
    // waits for a healthy /health, which an alarm rules out: start the same spec again.)
    let mut transcript = run.transcript;
    assert!(
        server.terminate(Duration::from_secs(20)).is_some(),
        "server did not stop on SIGTERM"
    );
    let again = Server::spawn(server.spec().clone(), None);
    let deadline = Instant::now() + oxcd_tests::START_TIMEOUT;
    while !matches!(http_get(port, "/health?exclude=NOSPACE"), Ok((200, _))) {
        assert!(
            Instant::now() < deadline,
            "no healthy restart; output:\n{}",
            again.output()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut run = Run {
        server: &again,
        transcript: Vec::new(),
        normalize: vec![
            (member.to_string(), "<member>".into()),
            (again.endpoint(), "<endpoint>".into()),
        ],
    };
    run.step(&["alarm", "list"], None);
    assert_eq!(run.step(&["put", "small", "v"], None).error(), NOSPACE);

    // Free the space: compact all history away, defragment. The alarm stays until disarmed.
    let rev = run.status()["header"]["revision"]
        .as_i64()
        .expect("revision");
    run.normalize.extend([
        (format!("compact {rev} "), "compact <rev> ".into()),
        (
            format!("compacted revision {rev}"),
            "compacted revision <rev>".into(),
        ),
    ]);
    run.step(&["compact", &rev.to_string(), "--physical"], None)
        .ok();
    run.step(&["defrag"], None).ok();
    let db_size = run.status()["dbSize"].as_i64().unwrap_or(0);
    eprintln!("{}: db size after defrag {db_size}", bin.display());
    assert!(
        (db_size as u64) < QUOTA / 2,
        "defragmentation left {db_size} bytes"
    );
    assert_eq!(run.step(&["put", "small", "v"], None).error(), NOSPACE);
    assert_eq!(
        run.step(&["alarm", "disarm"], None).ok(),
        format!("memberID:{member} alarm:NOSPACE \n")
    );
    assert_eq!(run.step(&["alarm", "list"], None).ok(), "");
    assert_eq!(run.step(&["put", "small", "v"], None).ok(), "OK\n");
    run.step(&["get", "small"], None);
    run.step(&["lease", "grant", "10"], None).ok();
    assert!(run.status()["errors"].is_null());
    transcript.append(&mut run.transcript);
    // Lease ids are random: `lease <hex id> granted with TTL(10s)`.
    for step in &mut transcript {
        if let Some(start) = step.find("\nlease ").map(|p| p + "\nlease ".len()) {
            if let Some(len) = step[start..].find(" granted with TTL") {
                step.replace_range(start..start + len, "<id>");
            }
        }
    }
    transcript
}

#[test]
fn quota_raises_nospace_and_disarm_after_defrag_restores_writes() {
    let actual = scenario(&server_bin());
    if !etcd_available() {
        eprintln!(
            "\n\n!!! quota transcript not compared: {ETCD_BIN} is not installed, \
             so there is no reference to compare with !!!\n\n"
        );
        return;
    }
    let reference = scenario(Path::new(ETCD_BIN));
    let diffs: Vec<String> = reference
        .iter()
        .zip(&actual)
        .filter(|(want, got)| want != got)
        .map(|(want, got)| {
            format!(
                "--- etcd 3.4:\n{want}+++ {}:\n{got}",
                server_bin().display()
            )
        })
        .collect();
    assert_eq!(reference.len(), actual.len());
    assert!(
        diffs.is_empty(),
        "{} of {} steps differ from etcd 3.4:\n{}",
        diffs.len(),
        reference.len(),
        diffs.join("\n")
    );
}

/// An alarm raised through one member (Maintenance.Alarm ACTIVATE, as a member over its quota
/// does) caps every member; disarming it through another lifts the cap everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alarm_on_one_member_caps_the_whole_cluster() {
    let cluster = TestCluster::start(3, &[]);
    let mut clients = Vec::new();
    for m in &cluster.members {
        clients.push(common::connect_with(m, Duration::from_secs(10)).await);
    }
    let first: &mut Client = &mut clients[0];
    first
        .put("before", "1", None)
        .await
        .expect("put before any alarm");
    let member = first.status().await.unwrap().header().unwrap().member_id();
    let mut opts = AlarmOptions::new();
    opts.with_member(member);
    let raised = first
        .alarm(AlarmAction::Activate, AlarmType::Nospace, Some(opts))
        .await
        .expect("activate");
    assert_eq!(raised.alarms().len(), 1);

    for (i, c) in clients.iter_mut().enumerate() {
        // Every member has applied the alarm once it has applied a later write.
        let listed = c
            .alarm(AlarmAction::Get, AlarmType::None, None)
            .await
            .expect("alarm list");
        let got: Vec<(u64, AlarmType)> = listed
            .alarms()
            .iter()
            .map(|a| (a.member_id(), a.alarm()))
            .collect();
        assert_eq!(got, vec![(member, AlarmType::Nospace)], "member {i}");
        match c.put("after", "1", None).await {
            Err(etcd_client::Error::GRpcStatus(st)) => {
                assert_eq!(st.code(), tonic::Code::ResourceExhausted, "member {i}");
                assert_eq!(st.message(), NOSPACE, "member {i}");
            }
            other => panic!("member {i}: put under NOSPACE gave {other:?}"),
        }
        let errors = c.status().await.unwrap().errors().to_vec();
        assert_eq!(
            errors,
            vec![format!("memberID:{member} alarm:NOSPACE ")],
            "member {i}"
        );
        let got = c.get("before", None).await.expect("read under NOSPACE");
        assert_eq!(got.kvs().len(), 1, "member {i}");
    }

    let mut opts = AlarmOptions::new();
    opts.with_member(member);
    let cleared = clients[2]
        .alarm(AlarmAction::Deactivate, AlarmType::Nospace, Some(opts))
        .await
        .expect("deactivate");
    assert_eq!(cleared.alarms().len(), 1);
    for (i, c) in clients.iter_mut().enumerate() {
        c.put("after", i.to_string(), None)
            .await
            .unwrap_or_else(|e| panic!("member {i}: put after disarm: {e}"));
    }
}

/// A CORRUPT alarm (raised by hand here, as a corruption check would) refuses every write but
/// not reads, and makes /health (and /readyz's data_corruption check) fail until disarmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_alarm_refuses_writes_until_disarmed() {
    let s = Server::start();
    let mut c = common::connect_with(&s, Duration::from_secs(10)).await;
    c.put("k", "v", None).await.expect("put");
    let member = c.status().await.unwrap().header().unwrap().member_id();
    let mut opts = AlarmOptions::new();
    opts.with_member(member);
    c.alarm(
        AlarmAction::Activate,
        AlarmType::Corrupt,
        Some(opts.clone()),
    )
    .await
    .expect("activate CORRUPT");

    for result in [
        c.put("k", "w", None).await.map(drop),
        c.delete("k", None).await.map(drop),
    ] {
        match result {
            Err(etcd_client::Error::GRpcStatus(st)) => assert_eq!(
                (st.code(), st.message()),
                (tonic::Code::DataLoss, "etcdserver: corrupt cluster")
            ),
            other => panic!("write under CORRUPT gave {other:?}"),
        }
    }
    let got = c.get("k", None).await.expect("read under CORRUPT");
    assert_eq!(got.kvs()[0].value(), b"v");
    let port = s.spec().client_port;
    let (code, body) = http_get(port, "/health").expect("GET /health");
    assert!(
        code == 503 && body.contains(r#""health":"false""#),
        "{code} {body}"
    );
    if !oxcd_tests::server_is_etcd() {
        // etcd 3.5's reason and readiness check (etcd 3.4 has neither).
        assert!(body.contains("ALARM CORRUPT"), "{body}");
        let (code, body) = http_get(port, "/readyz?verbose").expect("GET /readyz");
        assert!(
            code == 503 && body.contains("[-]data_corruption failed: alarm activated: CORRUPT"),
            "{code} {body}"
        );
    }

    c.alarm(AlarmAction::Deactivate, AlarmType::Corrupt, Some(opts))
        .await
        .expect("deactivate CORRUPT");
    c.put("k", "w", None).await.expect("put after disarm");
    let (code, _) = http_get(port, "/health").expect("GET /health");
    assert_eq!(code, 200);
}
