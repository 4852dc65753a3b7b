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
    let status = under_test.wait_exit(Duration::from_secs(10));
    let output = under_test.output();
    let status = status.unwrap_or_else(|| {
        panic!(
            "server kept running on an etcd data dir (should have refused it); output:\n{output}"
        )
    });
    assert!(
        !status.success(),
        "server exited {status} on an etcd data dir; output:\n{output}"
    );
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
