//! The server under test driven by the real `etcdctl` (API v3): outputs and error texts must be
//! exactly those etcd 3.4 gives.

use oxcd_tests::{etcdctl, CtlOutput, Server};
use serde_json::Value;

fn ctl(s: &Server, args: &[&str]) -> CtlOutput {
    etcdctl(&s.endpoint(), args, None)
}

fn ok(s: &Server, args: &[&str]) -> String {
    ctl(s, args).ok().to_string()
}

fn json(s: &Server, args: &[&str]) -> Value {
    let mut full = args.to_vec();
    full.push("-w");
    full.push("json");
    ctl(s, &full).json()
}

fn b64(text: &str) -> String {
    // Minimal standard base64, as etcdctl's JSON encodes keys and values.
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = text.as_bytes();
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, &x| (acc << 8) | u32::from(x)) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn revision(v: &Value) -> i64 {
    v["header"]["revision"]
        .as_i64()
        .unwrap_or_else(|| panic!("no header.revision in {v}"))
}

#[test]
fn base64_helper_matches_known_vectors() {
    assert_eq!(b64("a"), "YQ==");
    assert_eq!(b64("foo/1"), "Zm9vLzE=");
    assert_eq!(b64("abc"), "YWJj");
}

#[test]
fn put_get_and_range_options() {
    let s = Server::start();
    assert_eq!(ok(&s, &["put", "a", "1"]), "OK\n");
    for (k, v) in [
        ("b", "2"),
        ("c", "3"),
        ("foo/1", "x"),
        ("foo/2", "y"),
        ("foo/3", "z"),
    ] {
        assert_eq!(ok(&s, &["put", k, v]), "OK\n");
    }
    // Revision 1 is the empty store; six puts → 7.
    assert_eq!(ok(&s, &["get", "a"]), "a\n1\n");
    assert_eq!(ok(&s, &["get", "missing"]), "");
    assert_eq!(
        ok(&s, &["get", "--prefix", "foo/"]),
        "foo/1\nx\nfoo/2\ny\nfoo/3\nz\n"
    );
    // A range [key, range_end).
    assert_eq!(ok(&s, &["get", "a", "c"]), "a\n1\nb\n2\n");
    assert_eq!(
        ok(&s, &["get", "--from-key", "c"]),
        "c\n3\nfoo/1\nx\nfoo/2\ny\nfoo/3\nz\n"
    );
    assert_eq!(
        ok(&s, &["get", "--prefix", "foo/", "--limit", "2"]),
        "foo/1\nx\nfoo/2\ny\n"
    );
    assert_eq!(
        ok(
            &s,
            &[
                "get",
                "--prefix",
                "foo/",
                "--sort-by=KEY",
                "--order=DESCEND"
            ]
        ),
        "foo/3\nz\nfoo/2\ny\nfoo/1\nx\n"
    );
    assert_eq!(
        ok(
            &s,
            &[
                "get",
                "--from-key",
                "",
                "--sort-by=VALUE",
                "--order=ASCEND",
                "--keys-only"
            ]
        ),
        "a\n\nb\n\nc\n\nfoo/1\n\nfoo/2\n\nfoo/3\n\n"
    );
    assert_eq!(
        ok(&s, &["get", "--prefix", "foo/", "--print-value-only"]),
        "x\ny\nz\n"
    );
    assert_eq!(
        ok(&s, &["get", "--prefix", "foo/", "--keys-only"]),
        "foo/1\n\nfoo/2\n\nfoo/3\n\n"
    );

    // etcdctl 3.4 has no --count-only; a limited get reports the full count.
    let limited = json(&s, &["get", "--prefix", "foo/", "--limit", "1"]);
    assert_eq!(limited["more"], true, "{limited}");
    assert_eq!(limited["count"], 3, "{limited}");
    assert_eq!(limited["kvs"].as_array().unwrap().len(), 1, "{limited}");
    assert_eq!(revision(&limited), 7, "{limited}");

    let got = json(&s, &["get", "foo/2"]);
    assert_eq!(revision(&got), 7, "{got}");
    let kv = &got["kvs"][0];
    assert_eq!(kv["key"], b64("foo/2"), "{got}");
    assert_eq!(kv["value"], b64("y"), "{got}");
    assert_eq!(kv["create_revision"], 6, "{got}");
    assert_eq!(kv["mod_revision"], 6, "{got}");
    assert_eq!(kv["version"], 1, "{got}");
    assert_eq!(got["count"], 1, "{got}");
    for field in ["cluster_id", "member_id", "raft_term"] {
        assert!(
            got["header"][field].as_u64().is_some_and(|v| v > 0),
            "{field}: {got}"
        );
    }

    // An overwrite bumps mod_revision and version, keeps create_revision.
    let put = json(&s, &["put", "foo/2", "yy"]);
    assert_eq!(revision(&put), 8, "{put}");
    let kv = json(&s, &["get", "foo/2"])["kvs"][0].clone();
    assert_eq!(
        (
            kv["create_revision"].as_i64(),
            kv["mod_revision"].as_i64(),
            kv["version"].as_i64()
        ),
        (Some(6), Some(8), Some(2)),
        "{kv}"
    );
    // put --prev-kv prints the old pair after OK.
    assert_eq!(ok(&s, &["put", "a", "11", "--prev-kv"]), "OK\na\n1\n");
}

#[test]
fn delete_variants() {
    let s = Server::start();
    for k in ["k1", "k2", "p/1", "p/2", "p/3", "z"] {
        ok(&s, &["put", k, &format!("v-{k}")]);
    }
    assert_eq!(ok(&s, &["del", "k1"]), "1\n");
    assert_eq!(ok(&s, &["del", "k1"]), "0\n");
    assert_eq!(ok(&s, &["del", "nothing-here"]), "0\n");
    assert_eq!(ok(&s, &["del", "--prev-kv", "k2"]), "1\nk2\nv-k2\n");
    let del = json(&s, &["del", "--prefix", "p/", "--prev-kv"]);
    assert_eq!(del["deleted"], 3, "{del}");
    let prev: Vec<_> = del["prev_kvs"]
        .as_array()
        .unwrap_or_else(|| panic!("no prev_kvs: {del}"))
        .iter()
        .map(|kv| kv["key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(prev, [b64("p/1"), b64("p/2"), b64("p/3")], "{del}");
    // 6 puts + 3 effective deletes (one of them covering 3 keys, all at one revision).
    assert_eq!(revision(&del), 10, "{del}");
    assert_eq!(ok(&s, &["get", "--from-key", ""]), "z\nv-z\n");
    // A delete of nothing does not bump the revision.
    let none = json(&s, &["del", "--prefix", "p/"]);
    assert_eq!(revision(&none), 10, "{none}");
    assert!(none.get("deleted").is_none(), "zero is omitted: {none}");
}

#[test]
fn txn_interactive() {
    let s = Server::start();
    ok(&s, &["put", "key1", "v1"]);
    ok(&s, &["put", "key2", "v2"]);
    let txn = |input: &str| etcdctl(&s.endpoint(), &["txn"], Some(input));

    // Compares hold → success branch.
    let out = txn("value(\"key1\") = \"v1\"\nmod(\"key2\") > \"0\"\n\nput key3 v3\nget key1\n\nput key3 failed\n\n");
    assert_eq!(out.ok(), "SUCCESS\n\nOK\n\nkey1\nv1\n", "{out:#?}");
    assert_eq!(ok(&s, &["get", "key3", "--print-value-only"]), "v3\n");

    // A compare fails → failure branch.
    let out = txn("version(\"key1\") = \"5\"\n\nput key4 nope\n\ndel key2\nput key5 v5\n\n");
    assert_eq!(out.ok(), "FAILURE\n\n1\n\nOK\n", "{out:#?}");
    assert_eq!(ok(&s, &["get", "key4"]), "");
    assert_eq!(ok(&s, &["get", "key2"]), "");

    // JSON output: succeeded flag and per-op responses, one revision for the whole txn.
    let out = etcdctl(
        &s.endpoint(),
        &["txn", "-w", "json"],
        Some("create(\"key9\") = \"0\"\n\nput key9 a\nput key10 b\n\n\n"),
    );
    let v = out.json();
    assert_eq!(v["succeeded"], true, "{v}");
    assert_eq!(v["responses"].as_array().map(Vec::len), Some(2), "{v}");
    // key1,key2,key3,(del key2 + put key5 in one txn) → 5, this txn → 6.
    assert_eq!(revision(&v), 6, "{v}");
    let kv = json(&s, &["get", "key10"])["kvs"][0].clone();
    assert_eq!(kv["mod_revision"], 6, "{kv}");

    // A read-only txn that fails with no ops.
    let out = txn("value(\"key9\") = \"zzz\"\n\n\n\n");
    assert_eq!(out.ok(), "FAILURE\n", "{out:#?}");
}

#[test]
fn compaction_and_historic_reads() {
    let s = Server::start();
    ok(&s, &["put", "k", "v1"]); // rev 2
    ok(&s, &["put", "k", "v2"]); // rev 3
    ok(&s, &["put", "k", "v3"]); // rev 4
    ok(&s, &["del", "k"]); // rev 5
    ok(&s, &["put", "k", "v4"]); // rev 6

    assert_eq!(ok(&s, &["get", "k", "--rev", "2"]), "k\nv1\n");
    assert_eq!(ok(&s, &["get", "k", "--rev", "3"]), "k\nv2\n");
    assert_eq!(ok(&s, &["get", "k", "--rev", "5"]), "");
    assert_eq!(ok(&s, &["get", "k", "--rev", "1"]), "");
    let hist = json(&s, &["get", "k", "--rev", "4"]);
    assert_eq!(
        revision(&hist),
        6,
        "header carries the current revision: {hist}"
    );
    assert_eq!(hist["kvs"][0]["mod_revision"], 4, "{hist}");
    assert_eq!(hist["kvs"][0]["version"], 3, "{hist}");
    let recreated = json(&s, &["get", "k"]);
    assert_eq!(recreated["kvs"][0]["create_revision"], 6, "{recreated}");
    assert_eq!(recreated["kvs"][0]["version"], 1, "{recreated}");

    assert_eq!(
        ctl(&s, &["get", "k", "--rev", "7"]).error(),
        "etcdserver: mvcc: required revision is a future revision"
    );

    assert_eq!(ok(&s, &["compaction", "3"]), "compacted revision 3\n");
    assert_eq!(
        ctl(&s, &["get", "k", "--rev", "2"]).error(),
        "etcdserver: mvcc: required revision has been compacted"
    );
    // The compaction revision itself stays readable.
    assert_eq!(ok(&s, &["get", "k", "--rev", "3"]), "k\nv2\n");
    assert_eq!(ok(&s, &["get", "k", "--rev", "4"]), "k\nv3\n");
    // Compacting again at or below the compacted revision is an error.
    assert_eq!(
        ctl(&s, &["compaction", "3"]).error(),
        "etcdserver: mvcc: required revision has been compacted"
    );
    assert_eq!(
        ctl(&s, &["compaction", "100"]).error(),
        "etcdserver: mvcc: required revision is a future revision"
    );
    assert_eq!(
        ok(&s, &["compaction", "--physical", "6"]),
        "compacted revision 6\n"
    );
    assert_eq!(ok(&s, &["get", "k"]), "k\nv4\n");
}

#[test]
fn endpoint_status_health_and_member_list() {
    let s = Server::start();
    ok(&s, &["put", "x", "y"]);
    let status = json(&s, &["endpoint", "status"]);
    let entry = &status[0];
    assert_eq!(entry["Endpoint"], s.endpoint(), "{status}");
    let st = &entry["Status"];
    assert_eq!(revision(st), 2, "{status}");
    for field in [
        "version",
        "dbSize",
        "leader",
        "raftIndex",
        "raftTerm",
        "raftAppliedIndex",
        "dbSizeInUse",
    ] {
        assert!(
            st.get(field).is_some(),
            "endpoint status lacks {field}: {status}"
        );
    }
    assert_eq!(
        st["leader"], st["header"]["member_id"],
        "single member is the leader: {status}"
    );
    assert!(
        st["version"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{status}"
    );

    // etcdctl 3.4 prints the health verdict on stderr.
    let health = ctl(&s, &["endpoint", "health"]);
    assert!(health.success, "{health:#?}");
    let verdict = format!(
        "{} is healthy: successfully committed proposal",
        s.endpoint()
    );
    assert!(
        health.stderr.lines().any(|l| l.starts_with(&verdict)),
        "{health:#?}"
    );

    let members = ok(&s, &["member", "list"]);
    let line = members.trim();
    let cols: Vec<&str> = line.split(", ").collect();
    assert_eq!(cols.len(), 6, "{members}");
    assert_eq!(
        &cols[1..],
        [
            "started",
            "node1",
            &s.spec().peer_url(),
            &s.client_url(),
            "false"
        ],
        "{members}"
    );
    let ml = json(&s, &["member", "list"]);
    let m = &ml["members"][0];
    assert_eq!(m["name"], "node1", "{ml}");
    assert_eq!(m["ID"], ml["header"]["member_id"], "{ml}");
    assert_eq!(m["peerURLs"][0], s.spec().peer_url(), "{ml}");
    assert_eq!(m["clientURLs"][0], s.client_url(), "{ml}");
}

#[test]
fn empty_key_is_rejected() {
    let s = Server::start();
    assert_eq!(
        ctl(&s, &["put", "", "v"]).error(),
        "etcdserver: key is not provided"
    );
    assert_eq!(
        ctl(&s, &["get", ""]).error(),
        "etcdserver: key is not provided"
    );
    assert_eq!(
        ctl(&s, &["del", ""]).error(),
        "etcdserver: key is not provided"
    );
}

#[test]
fn request_size_and_txn_limits() {
    let s = Server::start_with(&["--max-request-bytes", "1024", "--max-txn-ops", "2"]);
    let big = "x".repeat(2000);
    assert_eq!(
        ctl(&s, &["put", "big", &big]).error(),
        "etcdserver: request is too large"
    );
    assert_eq!(ok(&s, &["get", "big"]), "");
    // Just under the limit still works.
    assert_eq!(ok(&s, &["put", "small", &"y".repeat(900)]), "OK\n");

    let txn = |input: &str| etcdctl(&s.endpoint(), &["txn"], Some(input));
    assert_eq!(
        txn("\nput a 1\nput b 2\nput c 3\n\n\n").error(),
        "etcdserver: too many operations in txn request"
    );
    assert_eq!(
        txn("\nput a 1\n\nput b 2\nput c 3\nput d 4\n\n").error(),
        "etcdserver: too many operations in txn request"
    );
    // Two ops per branch are allowed.
    assert_eq!(
        txn("\nput a 1\nput b 2\n\n\n").ok(),
        "SUCCESS\n\nOK\n\nOK\n"
    );
    assert_eq!(
        txn("\nput dup 1\nput dup 2\n\n\n").error(),
        "etcdserver: duplicate key given in txn request"
    );
    assert_eq!(
        txn("\nput p/1 1\ndel --prefix p/\n\n\n").error(),
        "etcdserver: duplicate key given in txn request"
    );
    assert_eq!(ok(&s, &["get", "dup"]), "");
}

#[test]
fn defrag_after_compaction_keeps_the_data() {
    let s = Server::start();
    for i in 0..50 {
        ok(&s, &["put", &format!("d{}", i % 5), &"x".repeat(1000)]);
    }
    ok(&s, &["compaction", "--physical", "45"]);
    let out = ok(&s, &["defrag"]);
    assert_eq!(
        out.trim(),
        format!("Finished defragmenting etcd member[{}]", s.endpoint())
    );
    let v = json(&s, &["get", "--prefix", "d", "--keys-only"]);
    assert_eq!(v["count"], 5, "{v}");
    assert_eq!(
        ok(&s, &["get", "d4", "--print-value-only"]).trim(),
        "x".repeat(1000)
    );
}
