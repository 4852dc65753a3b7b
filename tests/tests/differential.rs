//! One etcdctl script run against real etcd 3.4 and against the server under test: every output
//! (stdout, the error line, the exit code) must be identical once cluster_id, member_id and
//! raft_term are normalized. Revisions are not normalized: they must match exactly.

use oxcd_tests::{etcd_available, etcdctl, normalize_ids, server_bin, ConfigVia, Server, ETCD_BIN};
use std::path::Path;

/// (etcdctl args, stdin). Written so each step's output depends on everything before it.
fn script() -> Vec<(Vec<String>, Option<String>)> {
    let mut steps: Vec<(Vec<&str>, Option<&str>)> = vec![
        (vec!["put", "alpha", "1"], None),
        (vec!["put", "beta", "2", "-w", "json"], None),
        (vec!["put", "gamma/1", "g1"], None),
        (vec!["put", "gamma/2", "g2"], None),
        (vec!["put", "gamma/3", "g3"], None),
        (vec!["put", "alpha", "1b", "--prev-kv"], None),
        (vec!["put", "alpha", "1c", "--prev-kv", "-w", "json"], None),
        (vec!["get", "alpha", "-w", "json"], None),
        (vec!["get", "--prefix", "gamma/"], None),
        (vec!["get", "--prefix", "gamma/", "-w", "json"], None),
        (vec!["get", "--from-key", "b", "-w", "json"], None),
        (vec!["get", "--prefix", "gamma/", "--limit", "2", "-w", "json"], None),
        (vec!["get", "--prefix", "", "--sort-by=MODIFY", "--order=DESCEND", "-w", "json"], None),
        (vec!["get", "--prefix", "", "--sort-by=VERSION", "--order=ASCEND", "--keys-only"], None),
        (vec!["get", "--prefix", "", "--limit", "1", "-w", "json"], None),
        (vec!["get", "--prefix", "gamma/", "--keys-only", "-w", "json"], None),
        (vec!["get", "absent", "-w", "json"], None),
        (vec!["del", "beta"], None),
        (vec!["del", "beta", "-w", "json"], None),
        (vec!["del", "--prefix", "gamma/", "--prev-kv", "-w", "json"], None),
        (vec!["put", "gamma/2", "again"], None),
        (vec!["get", "gamma/2", "-w", "json"], None),
        (
            vec!["txn", "-w", "json"],
            Some("value(\"alpha\") = \"1c\"\ncreate(\"beta\") = \"0\"\n\nput beta 3\nget alpha\ndel gamma/2\n\nput fail x\n\n"),
        ),
        (
            vec!["txn"],
            Some("mod(\"alpha\") < \"3\"\n\nput nope 1\n\nget --prefix gamma/\nput delta 4\n\n"),
        ),
        (
            vec!["txn", "-w", "json"],
            Some("version(\"beta\") > \"0\"\n\nput beta 4 --prev-kv\nget --prefix \"\" --keys-only\n\n\n"),
        ),
        (vec!["get", "alpha", "--rev", "2", "-w", "json"], None),
        (vec!["get", "alpha", "--rev", "6"], None),
        (vec!["get", "--prefix", "gamma/", "--rev", "5", "-w", "json"], None),
        (vec!["get", "--prefix", "gamma/", "--rev", "11"], None),
        (vec!["get", "alpha", "--rev", "99"], None),
        (vec!["compaction", "7"], None),
        (vec!["get", "alpha", "--rev", "6"], None),
        (vec!["get", "alpha", "--rev", "7", "-w", "json"], None),
        (vec!["compaction", "5"], None),
        (vec!["compaction", "999"], None),
        (vec!["put", "", "empty"], None),
        (vec!["txn"], Some("\nput dup 1\nput dup 2\n\n\n")),
        (vec!["del", "--from-key", "", "--prev-kv", "-w", "json"], None),
        (vec!["get", "--from-key", "", "-w", "json"], None),
        (vec!["put", "last", "x", "-w", "json"], None),
        (vec!["compaction", "--physical", "16", "-w", "json"], None),
        (vec!["get", "--from-key", "", "--rev", "16", "-w", "json"], None),
    ];
    // Bulk writes so revisions go well past single digits before the last reads.
    for i in 0..20 {
        steps.push((vec!["put", "bulk", "v"], None));
        if i % 5 == 0 {
            steps.push((vec!["get", "bulk", "-w", "json"], None));
        }
    }
    steps.push((vec!["get", "--from-key", "", "-w", "json"], None));
    steps
        .into_iter()
        .map(|(a, s)| {
            (
                a.into_iter().map(String::from).collect(),
                s.map(String::from),
            )
        })
        .collect()
}

/// Runs the script on a fresh single-member `bin`; one transcript line group per step.
fn run(bin: &Path) -> Vec<String> {
    let mut server = Server::spawn_new(bin, &[], ConfigVia::Flags);
    server.wait_healthy(oxcd_tests::START_TIMEOUT);
    script()
        .iter()
        .map(|(args, stdin)| {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = etcdctl(&server.endpoint(), &args, stdin.as_deref());
            // stderr also carries client-side log lines with timestamps: only the error counts.
            let error = out.error_lines();
            format!(
                "$ etcdctl {}\nexit: {:?}\n{}error: {}\n",
                args.join(" "),
                out.code,
                normalize_ids(&out.stdout),
                error
            )
        })
        .collect()
}

#[test]
fn etcdctl_script_matches_etcd() {
    if !etcd_available() {
        eprintln!(
            "\n\n!!! SKIPPED etcdctl_script_matches_etcd: {ETCD_BIN} is not installed, \
             so there is no reference to compare with !!!\n\n"
        );
        return;
    }
    let reference = run(Path::new(ETCD_BIN));
    let actual = run(&server_bin());
    assert_eq!(reference.len(), actual.len());
    let mut diffs = Vec::new();
    for (want, got) in reference.iter().zip(&actual) {
        if want != got {
            diffs.push(format!(
                "--- etcd 3.4:\n{want}+++ {}:\n{got}",
                server_bin().display()
            ));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} of {} steps differ from etcd 3.4:\n{}",
        diffs.len(),
        reference.len(),
        diffs.join("\n")
    );
    // The script must actually exercise failures and JSON, or the comparison proves little.
    let all = reference.concat();
    for needle in [
        "error: Error: etcdserver: mvcc: required revision has been compacted",
        "error: Error: etcdserver: mvcc: required revision is a future revision",
        "error: Error: etcdserver: key is not provided",
        "error: Error: etcdserver: duplicate key given in txn request",
        "\"succeeded\":true",
        "compacted revision 7",
    ] {
        assert!(
            all.contains(needle),
            "reference transcript lacks {needle:?}:\n{all}"
        );
    }
}
