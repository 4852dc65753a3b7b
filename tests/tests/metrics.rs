//! `/metrics` carries the families etcd 3.4 exposes, under etcd's names, types, labels and
//! buckets, and the gRPC counters count what the client port served: calls by method and code
//! (go-grpc-prometheus' `grpc_server_*`), messages, and message bytes.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use etcd_client::{Client, Error, PutOptions};
use oxcd_tests::{http_get, Server};

/// The samples of an exposition, by series: `name{k="v",...}` with the labels sorted.
#[derive(Debug)]
struct Exposition {
    samples: BTreeMap<String, f64>,
    types: BTreeMap<String, String>,
    text: String,
}

impl Exposition {
    fn parse(text: String) -> Exposition {
        let mut samples = BTreeMap::new();
        let mut types = BTreeMap::new();
        for line in text.lines() {
            if let Some(t) = line.strip_prefix("# TYPE ") {
                let (name, kind) = t.split_once(' ').expect("TYPE line");
                types.insert(name.to_string(), kind.to_string());
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            samples.insert(normalize(series), value);
        }
        Exposition {
            samples,
            types,
            text,
        }
    }

    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples.get(&key(name, labels)).copied()
    }

    /// The value of a series that must exist.
    #[track_caller]
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no {} in:\n{}", key(name, labels), self.text))
    }

    /// The label sets of every sample of `name`.
    fn label_sets(&self, name: &str) -> Vec<BTreeMap<String, String>> {
        self.samples
            .keys()
            .filter_map(|k| {
                let rest = k.strip_prefix(name)?;
                if !(rest.is_empty() || rest.starts_with('{')) {
                    return None;
                }
                Some(labels_of(rest))
            })
            .collect()
    }
}

fn key(name: &str, labels: &[(&str, &str)]) -> String {
    let mut l: Vec<(&str, &str)> = labels.to_vec();
    l.sort();
    if l.is_empty() {
        return name.to_string();
    }
    let inner: Vec<String> = l.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", inner.join(","))
}

fn labels_of(braced: &str) -> BTreeMap<String, String> {
    braced
        .trim_start_matches('{')
        .trim_end_matches('}')
        .split("\",")
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').expect("label pair");
            (k.to_string(), v.trim_matches('"').to_string())
        })
        .collect()
}

fn normalize(series: &str) -> String {
    match series.split_once('{') {
        None => series.to_string(),
        Some((name, rest)) => {
            let labels = labels_of(rest);
            let l: Vec<(&str, &str)> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            key(name, &l)
        }
    }
}

fn scrape(s: &Server) -> Exposition {
    let (code, body) = http_get(s.spec().client_port, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200, "{body}");
    Exposition::parse(body)
}

const KV: &str = "etcdserverpb.KV";

/// The labels of one method's series (plus `grpc_code` for `handled`).
fn method<'a>(service: &'a str, name: &'a str, kind: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("grpc_service", service),
        ("grpc_method", name),
        ("grpc_type", kind),
    ]
}

fn with_code<'a>(labels: &[(&'a str, &'a str)], code: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut l = labels.to_vec();
    l.push(("grpc_code", code));
    l
}

async fn connect(s: &Server) -> Client {
    common::connect_with(s, Duration::from_secs(10)).await
}

#[track_caller]
fn grpc_code<T: std::fmt::Debug>(r: Result<T, Error>) -> tonic::Code {
    match r {
        Err(Error::GRpcStatus(st)) => st.code(),
        other => panic!("expected a gRPC error status, got {other:?}"),
    }
}

#[test]
fn families_have_etcds_names_types_and_labels() {
    let s = Server::start();
    let m = scrape(&s);

    for (name, kind) in [
        ("grpc_server_started_total", "counter"),
        ("grpc_server_handled_total", "counter"),
        ("grpc_server_msg_received_total", "counter"),
        ("grpc_server_msg_sent_total", "counter"),
        ("etcd_network_client_grpc_received_bytes_total", "counter"),
        ("etcd_network_client_grpc_sent_bytes_total", "counter"),
        ("etcd_disk_backend_commit_duration_seconds", "histogram"),
        ("process_cpu_seconds_total", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_virtual_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
        ("process_start_time_seconds", "gauge"),
    ] {
        assert_eq!(
            m.types.get(name).map(String::as_str),
            Some(kind),
            "# TYPE of {name} in:\n{}",
            m.text
        );
    }

    // As go-grpc-prometheus registers them: every method of etcd's services, from start-up,
    // `handled` with every code.
    let range = method(KV, "Range", "unary");
    assert_eq!(m.value("grpc_server_started_total", &range), 0.0);
    assert_eq!(
        m.value(
            "grpc_server_handled_total",
            &with_code(&range, "Unavailable")
        ),
        0.0
    );
    let watch = method("etcdserverpb.Watch", "Watch", "bidi_stream");
    assert_eq!(m.value("grpc_server_msg_sent_total", &watch), 0.0);
    let keep_alive = method("etcdserverpb.Lease", "LeaseKeepAlive", "bidi_stream");
    assert_eq!(m.value("grpc_server_msg_received_total", &keep_alive), 0.0);
    let snapshot = method("etcdserverpb.Maintenance", "Snapshot", "server_stream");
    assert_eq!(
        m.value("grpc_server_handled_total", &with_code(&snapshot, "OK")),
        0.0
    );
    for (name, labels) in [
        (
            "grpc_server_handled_total",
            &["grpc_code", "grpc_method", "grpc_service", "grpc_type"][..],
        ),
        (
            "grpc_server_started_total",
            &["grpc_method", "grpc_service", "grpc_type"][..],
        ),
        (
            "grpc_server_msg_received_total",
            &["grpc_method", "grpc_service", "grpc_type"][..],
        ),
        (
            "grpc_server_msg_sent_total",
            &["grpc_method", "grpc_service", "grpc_type"][..],
        ),
        ("etcd_network_client_grpc_received_bytes_total", &[][..]),
        ("etcd_network_client_grpc_sent_bytes_total", &[][..]),
    ] {
        let sets = m.label_sets(name);
        assert!(!sets.is_empty(), "no {name}");
        for set in sets {
            let keys: Vec<&str> = set.keys().map(String::as_str).collect();
            assert_eq!(keys, labels, "{name}");
        }
    }
    let handled = m.label_sets("grpc_server_handled_total");
    assert_eq!(
        handled.iter().filter(|l| l["grpc_method"] == "Put").count(),
        17,
        "one series per gRPC code"
    );

    // etcd's disk buckets: 1 ms doubling to 8.192 s.
    let mut les: Vec<f64> = m
        .label_sets("etcd_disk_backend_commit_duration_seconds_bucket")
        .iter()
        .map(|l| match l["le"].as_str() {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap(),
        })
        .collect();
    les.sort_by(f64::total_cmp);
    let mut expected: Vec<f64> = (0..14).map(|i| 0.001 * f64::powi(2.0, i)).collect();
    expected.push(f64::INFINITY);
    assert_eq!(les.len(), expected.len(), "{les:?}");
    for (a, b) in les.iter().zip(&expected) {
        assert!((a - b).abs() < 1e-9 || a == b, "{les:?} vs {expected:?}");
    }

    assert!(m.value("process_resident_memory_bytes", &[]) > 0.0);
    assert!(m.value("process_open_fds", &[]) > 0.0);
    assert!(m.value("process_open_fds", &[]) <= m.value("process_max_fds", &[]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_are_counted_by_method_and_code() {
    let s = Server::start();
    let mut c = connect(&s).await;
    let put = method(KV, "Put", "unary");
    let range = method(KV, "Range", "unary");
    let compact = method(KV, "Compact", "unary");
    let revoke = method("etcdserverpb.Lease", "LeaseRevoke", "unary");
    let received = "etcd_network_client_grpc_received_bytes_total";
    let sent = "etcd_network_client_grpc_sent_bytes_total";

    // Puts only: their messages and bytes are known exactly.
    let first = scrape(&s);
    let before = &first;
    const PUTS: usize = 7;
    let value = vec![b'v'; 100];
    for i in 0..PUTS {
        c.put(format!("k{i}"), value.clone(), None)
            .await
            .expect("put");
    }
    let after = scrape(&s);
    let delta = |name: &str, labels: &[(&str, &str)]| {
        after.get(name, labels).unwrap_or(0.0) - before.get(name, labels).unwrap_or(0.0)
    };
    assert_eq!(delta("grpc_server_started_total", &put), PUTS as f64);
    assert_eq!(
        delta("grpc_server_handled_total", &with_code(&put, "OK")),
        PUTS as f64,
        "{}",
        after.text
    );
    assert_eq!(delta("grpc_server_msg_received_total", &put), PUTS as f64);
    assert_eq!(delta("grpc_server_msg_sent_total", &put), PUTS as f64);
    // A PutRequest with a 2-byte key and a 100-byte value is 106 bytes of protobuf.
    assert_eq!(delta(received, &[]), (PUTS * 106) as f64);
    assert!(
        delta(sent, &[]) >= PUTS as f64 * 10.0,
        "{}",
        delta(sent, &[])
    );

    // Errors get their codes.
    let before = scrape(&s);
    let r = c.put("", "no key", Some(PutOptions::new())).await;
    assert_eq!(grpc_code(r), tonic::Code::InvalidArgument);
    let r = c.compact(1_000_000, None).await;
    assert_eq!(grpc_code(r), tonic::Code::OutOfRange);
    let r = c.lease_revoke(0x1234_5678).await;
    assert_eq!(grpc_code(r), tonic::Code::NotFound);
    let got = c.get("k0", None).await.expect("get");
    assert_eq!(got.kvs().len(), 1);
    let after = scrape(&s);
    let delta = |name: &str, labels: &[(&str, &str)]| {
        after.get(name, labels).unwrap_or(0.0) - before.get(name, labels).unwrap_or(0.0)
    };
    for (labels, code) in [
        (&put, "InvalidArgument"),
        (&compact, "OutOfRange"),
        (&revoke, "NotFound"),
        (&range, "OK"),
    ] {
        assert_eq!(
            delta("grpc_server_handled_total", &with_code(labels, code)),
            1.0,
            "{labels:?} {code}:\n{}",
            after.text
        );
        assert_eq!(delta("grpc_server_started_total", labels), 1.0);
    }
    assert_eq!(
        delta("grpc_server_handled_total", &with_code(&put, "OK")),
        0.0
    );
    // An error answer carries no message.
    assert_eq!(delta("grpc_server_msg_sent_total", &put), 0.0);
    assert_eq!(delta("grpc_server_msg_received_total", &put), 1.0);

    // A watch stream: started when it opens, messages as they flow, handled when it ends.
    // Dropping the client's stream half-closes it and then resets it: etcd 3.4 keeps a
    // half-closed watch stream open and reports the reset as Canceled; a server that ends the
    // stream on the half-close reports OK. Either way it is handled exactly once.
    let watch = method("etcdserverpb.Watch", "Watch", "bidi_stream");
    let before = scrape(&s);
    let mut stream = c.watch("w", None).await.expect("watch");
    c.put("w", "1", None).await.expect("put");
    let mut events = 0;
    while events == 0 {
        let resp = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("watch response in time")
            .expect("watch stream")
            .expect("watch response");
        events += resp.events().len();
    }
    let open = scrape(&s);
    let delta_open = |name: &str, labels: &[(&str, &str)]| {
        open.get(name, labels).unwrap_or(0.0) - before.get(name, labels).unwrap_or(0.0)
    };
    assert_eq!(delta_open("grpc_server_started_total", &watch), 1.0);
    assert_eq!(delta_open("grpc_server_msg_received_total", &watch), 1.0);
    // The created response and the event.
    assert!(delta_open("grpc_server_msg_sent_total", &watch) >= 2.0);
    let ended = |m: &Exposition| -> f64 {
        m.label_sets("grpc_server_handled_total")
            .iter()
            .filter(|l| l["grpc_method"] == "Watch" && l["grpc_service"] == "etcdserverpb.Watch")
            .map(|l| {
                let l: Vec<(&str, &str)> =
                    l.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                m.value("grpc_server_handled_total", &l)
            })
            .sum::<f64>()
    };
    assert_eq!(ended(&open), ended(&before), "the stream is still open");
    drop(stream);
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(&s);
        let n = ended(&m) - ended(&before);
        if n >= 1.0 {
            assert_eq!(n, 1.0, "{}", m.text);
            let code = |code| {
                m.value("grpc_server_handled_total", &with_code(&watch, code))
                    - before.value("grpc_server_handled_total", &with_code(&watch, code))
            };
            assert_eq!(code("OK") + code("Canceled"), 1.0, "{}", m.text);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the ended watch stream was not counted as handled:\n{}",
            m.text
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The writes reached the backend: its commits were timed. (etcd commits its backend every
    // 100 ms, oxcd once per applied entry, so only an increase is common to both.)
    let commits = |m: &Exposition| m.value("etcd_disk_backend_commit_duration_seconds_count", &[]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while commits(&scrape(&s)) <= commits(&first) {
        assert!(Instant::now() < deadline, "no backend commit was timed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// oxcd's own per-layer figures: the bound and depth of every channel between the layers, and
/// how far applying trails committing (zero once the server is idle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_figures_show_channel_depths_and_apply_lag() {
    if oxcd_tests::server_is_etcd() {
        return;
    }
    let s = Server::start();
    let mut c = connect(&s).await;
    for i in 0..200 {
        c.put(format!("k{i}"), "v", None).await.expect("put");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(&s);
        for (channel, bound) in [
            ("proposals", 8192.0),
            ("committed", 1024.0),
            ("events", 1024.0),
            ("lease_ticks", 16.0),
        ] {
            let labels = [("channel", channel)];
            assert_eq!(
                m.value("oxcd_channel_capacity", &labels),
                bound,
                "{channel}"
            );
            let depth = m.value("oxcd_channel_depth", &labels);
            assert!((0.0..=bound).contains(&depth), "{channel}: {depth}");
        }
        assert_eq!(
            m.types.get("oxcd_apply_lag_entries").map(String::as_str),
            Some("gauge")
        );
        // Sampled every 500 ms: wait for a sample taken after the last put was applied.
        if m.value("oxcd_apply_lag_entries", &[]) == 0.0
            && m.value("oxcd_channel_depth", &[("channel", "committed")]) == 0.0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "apply lag never reached 0:\n{}",
            m.text
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
