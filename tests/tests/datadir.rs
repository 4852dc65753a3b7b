//! A data dir written by etcd must be refused untouched: the server under test exits non-zero
//! quickly, names the data dir in its error, and leaves every file as it was.

use std::time::Duration;

use oxcd_tests::{
    dir_fingerprint, etcd_available, etcdctl, server_bin, server_is_etcd, ConfigVia, Server,
    ServerSpec, ETCD_BIN,
};

#[test]
fn refuses_an_etcd_data_dir_untouched() {
    if server_is_etcd() {
        eprintln!(
            "skipped: the server under test is etcd itself, which of course reads its own data dir"
        );
        return;
    }
    if !etcd_available() {
        eprintln!("\n\n!!! SKIPPED refuses_an_etcd_data_dir_untouched: {ETCD_BIN} is not installed !!!\n\n");
        return;
    }

    // A real etcd data dir with one key in it, cleanly shut down.
    let mut etcd = Server::spawn_new(std::path::Path::new(ETCD_BIN), &[], ConfigVia::Flags);
    etcd.wait_healthy(oxcd_tests::START_TIMEOUT);
    etcdctl(&etcd.endpoint(), &["put", "from-etcd", "v"], None).ok();
    etcd.terminate(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("etcd did not stop on SIGTERM:\n{}", etcd.output()));
    let data_dir = etcd.data_dir().to_path_buf();
    assert!(
        data_dir.join("member").is_dir(),
        "etcd wrote no member/ dir in {}",
        data_dir.display()
    );
    let before = dir_fingerprint(&data_dir);

    // The server under test on the very same dir (and fresh ports).
    let spec = ServerSpec {
        bin: server_bin(),
        client_port: oxcd_tests::free_port(),
        peer_port: oxcd_tests::free_port(),
        ..etcd.spec().clone()
    };
    let mut under_test = Server::spawn(spec, None);
    let output = under_test.expect_refused(Duration::from_secs(10), "on an etcd data dir");
    assert!(
        output.contains(&data_dir.display().to_string()),
        "the error does not name the data dir {}; output:\n{output}",
        data_dir.display()
    );
    assert!(
        output.to_lowercase().contains("etcd"),
        "the error does not say the dir is etcd's; output:\n{output}"
    );

    let after = dir_fingerprint(&data_dir);
    assert_eq!(before, after, "the refused data dir was modified");
    drop(under_test);
    // `etcd` owns the temp dir; keep it alive until the comparison is done.
    drop(etcd);
}

#[test]
fn dump_logs_prints_every_entry_of_a_stopped_member() {
    if server_is_etcd() {
        eprintln!("skipped: dump-logs is oxcd's own subcommand");
        return;
    }
    let mut s = Server::start();
    etcdctl(&s.endpoint(), &["put", "dumped-key", "dumped-value"], None).ok();
    etcdctl(&s.endpoint(), &["del", "dumped-key"], None).ok();
    s.terminate(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("server did not stop on SIGTERM:\n{}", s.output()));
    let out = std::process::Command::new(server_bin())
        .arg("dump-logs")
        .arg(s.data_dir())
        .output()
        .expect("run oxcd dump-logs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let put = text
        .lines()
        .position(|l| l.contains(r#"put key="dumped-key" value="dumped-value""#))
        .unwrap_or_else(|| panic!("no put line:\n{text}"));
    let del = text
        .lines()
        .position(|l| l.contains(r#"delete_range key="dumped-key""#))
        .unwrap_or_else(|| panic!("no delete line:\n{text}"));
    assert!(put < del, "entries in log order:\n{text}");
    // Each entry line: term, index, type, request.
    let line = text.lines().nth(put).unwrap();
    let cols: Vec<&str> = line.split('\t').map(str::trim).collect();
    assert!(
        cols[0].parse::<u64>().is_ok() && cols[1].parse::<u64>().is_ok(),
        "{line}"
    );
    assert_eq!(cols[2], "norm", "{line}");

    // A data dir that is not one is refused with a clear error.
    let empty = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(server_bin())
        .arg("dump-logs")
        .arg(empty.path())
        .output()
        .expect("run oxcd dump-logs");
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).trim().is_empty());
}

/// `--wal-dir` (etcd's flag) puts the raft log in its own directory; the member must be given
/// it again on every start, and a directory of etcd's wal files is refused untouched.
#[test]
fn a_dedicated_wal_dir_holds_the_log_and_is_required_again() {
    let wal = tempfile::tempdir().unwrap();
    let wal_dir = wal.path().join("wal");
    let flag = format!("--wal-dir={}", wal_dir.display());
    let mut s = Server::start_with(&[flag.as_str()]);
    etcdctl(&s.endpoint(), &["put", "walled", "in"], None).ok();
    s.terminate(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("server did not stop on SIGTERM:\n{}", s.output()));
    let names = |d: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(d)
            .map(|it| {
                it.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(
        names(&wal_dir).iter().any(|n| n.ends_with(".wal")),
        "no wal file in --wal-dir {}: {:?}",
        wal_dir.display(),
        names(&wal_dir)
    );
    if !server_is_etcd() {
        let default_wal = s.data_dir().join("oxcd").join("wal");
        assert!(
            !names(&default_wal).iter().any(|n| n.ends_with(".wal")),
            "wal files under the data dir too: {:?}",
            names(&default_wal)
        );
    }

    // Same flags: everything is back.
    s.restart();
    let got = etcdctl(
        &s.endpoint(),
        &["get", "walled", "--print-value-only"],
        None,
    );
    assert_eq!(got.ok().trim(), "in");
    s.terminate(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("server did not stop on SIGTERM:\n{}", s.output()));

    if server_is_etcd() {
        // etcd 3.4 does not check that a used data dir comes with its wal dir.
        return;
    }
    // Without --wal-dir the member would find no log: refused, naming where the log is.
    s.spec_mut()
        .extra_args
        .retain(|a| !a.starts_with("--wal-dir"));
    s.respawn();
    let output = s.expect_refused(Duration::from_secs(10), "started without its wal dir");
    assert!(
        output.contains(&wal_dir.display().to_string()) && output.contains("--wal-dir"),
        "the error does not say where the log is:\n{output}"
    );

    // etcd's own wal dir is refused untouched.
    if !etcd_available() {
        eprintln!("\n\n!!! SKIPPED the etcd wal dir part: {ETCD_BIN} is not installed !!!\n\n");
        return;
    }
    let etcd_wal = wal.path().join("etcd-wal");
    let etcd_flag = format!("--wal-dir={}", etcd_wal.display());
    let mut etcd = Server::spawn_new(
        std::path::Path::new(ETCD_BIN),
        &[etcd_flag.as_str()],
        ConfigVia::Flags,
    );
    etcd.wait_healthy(oxcd_tests::START_TIMEOUT);
    etcd.terminate(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("etcd did not stop on SIGTERM:\n{}", etcd.output()));
    let before = dir_fingerprint(&etcd_wal);
    let fresh = tempfile::tempdir().unwrap();
    let spec = ServerSpec {
        bin: server_bin(),
        data_dir: fresh.path().to_path_buf(),
        client_port: oxcd_tests::free_port(),
        peer_port: oxcd_tests::free_port(),
        extra_args: vec![etcd_flag.clone()],
        ..s.spec().clone()
    };
    let mut refused = Server::spawn(spec, None);
    let output = refused.expect_refused(Duration::from_secs(10), "ran on etcd's wal dir");
    assert!(
        output.contains(&etcd_wal.display().to_string()),
        "the error does not name the wal dir:\n{output}"
    );
    assert_eq!(
        before,
        dir_fingerprint(&etcd_wal),
        "etcd's wal dir was modified"
    );
    drop(etcd);
}
