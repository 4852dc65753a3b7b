//! `etcdctl lock` and `etcdctl elect` compared with etcd 3.4: one script, run against a fresh
//! etcd and a fresh server under test, must print the same thing at every step (stdout, stderr
//! and how each etcdctl process ended) once the few genuinely random values are normalized.
//!
//! Both commands are client-side recipes over KV, lease and watch, so the script exercises
//! what they lean on: a lock taken and handed over, a waiter giving up, a holder killed so that
//! only its lease expiry frees the lock, a campaign won and passed on by resignation and by
//! lease revocation, observers following every change of leader, and etcdctl's usage errors.
//!
//! Long-running etcdctl processes run in the background; every wait on them is bounded, and
//! they are stopped by their own PID (SIGTERM for `lock`, SIGINT for `elect`: the signals each
//! command handles to release what it holds; SIGKILL where the test wants nothing released).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use oxcd_tests::{etcd_available, etcdctl, server_bin, ConfigVia, Server, ETCDCTL_BIN, ETCD_BIN};

const LOCK: &str = "recipe-lock";
const ELECT: &str = "recipe-elect";

/// How long any single wait on a background etcdctl (a line, an exit, a key) may take.
/// Generous, as the machine is shared; a correct server answers in well under a second,
/// except for the one lease expiry the script waits for (a 3 s TTL).
const WAIT: Duration = Duration::from_secs(20);

/// Flags given to every etcdctl run, as `oxcd_tests::etcdctl` gives them.
fn ctl_command(ep: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(ETCDCTL_BIN);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ETCDCTL_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={ep}"))
        .arg("--dial-timeout=5s")
        .arg("--command-timeout=10s")
        .args(args);
    cmd
}

fn describe_exit(st: ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => format!("ended: {st}"),
    }
}

/// One etcdctl process running in the background, its stdout read line by line.
struct Bg {
    label: String,
    child: Child,
    lines: Receiver<String>,
    stdout_open: bool,
    stderr: Option<JoinHandle<String>>,
}

impl Bg {
    fn spawn(ep: &str, label: &str, args: &[&str]) -> Bg {
        let mut child = ctl_command(ep, args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run etcdctl");
        let out = child.stdout.take().expect("stdout pipe");
        let mut err = child.stderr.take().expect("stderr pipe");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Bg {
            label: label.to_string(),
            child,
            lines,
            stdout_open: true,
            stderr: Some(stderr),
        }
    }

    /// The next `n` stdout lines, each waited for at most `WAIT`. A line that does not come
    /// is recorded as such (the transcripts then differ) rather than failing here.
    fn read_lines(&mut self, n: usize) -> String {
        let mut text = format!("[{} stdout]\n", self.label);
        for _ in 0..n {
            match self.lines.recv_timeout(WAIT) {
                Ok(line) => {
                    text.push_str(&line);
                    text.push('\n');
                }
                Err(RecvTimeoutError::Timeout) => {
                    text.push_str(&format!("<no line within {WAIT:?}>\n"));
                    break;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.stdout_open = false;
                    text.push_str("<stdout closed>\n");
                    break;
                }
            }
        }
        text
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait etcdctl").is_none()
    }

    /// Whether it is still running and has printed nothing more so far.
    fn still_waiting(&mut self) -> String {
        let quiet = self.lines.try_recv().is_err();
        let running = self.running();
        format!(
            "[{}] running: {running}, printed nothing more: {quiet}\n",
            self.label
        )
    }

    /// Sends `sig` to this etcdctl's own PID, unless it has already exited.
    fn signal(&mut self, sig: i32) {
        if self.running() {
            // SAFETY: plain syscall on the PID of our own child, which has not been reaped.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, sig);
            }
        }
    }

    /// Waits (bounded) for it to exit; returns the rest of its stdout, its stderr and how it
    /// ended. One that does not exit within `WAIT` is killed and recorded as such.
    fn finish(mut self) -> String {
        let deadline = Instant::now() + WAIT;
        let mut status = loop {
            if let Some(st) = self.child.try_wait().expect("try_wait etcdctl") {
                break describe_exit(st);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break format!("<still running after {WAIT:?}, killed>");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut text = format!("[{} rest of stdout]\n", self.label);
        if self.stdout_open {
            loop {
                match self.lines.recv_timeout(WAIT) {
                    Ok(line) => {
                        text.push_str(&line);
                        text.push('\n');
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                    Err(RecvTimeoutError::Timeout) => {
                        status.push_str(" <stdout never closed>");
                        break;
                    }
                }
            }
        }
        let stderr = self
            .stderr
            .take()
            .expect("stderr reader")
            .join()
            .unwrap_or_default();
        text.push_str(&format!(
            "[{} stderr]\n{}[{}] {status}\n",
            self.label,
            client_log_free(&stderr),
            self.label
        ));
        text
    }
}

impl Drop for Bg {
    /// A failed test must not leave etcdctl processes behind.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Normalization 1: etcdctl's gRPC client may log to stderr as JSON lines
/// (`{"level":"warn","ts":...}`) carrying a timestamp and the endpoint's port; those lines are
/// dropped. Everything else on stderr (the `Error: ...` lines) is kept as printed.
fn client_log_free(stderr: &str) -> String {
    stderr
        .lines()
        .filter(|l| !l.starts_with("{\"level\":"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// A blocking etcdctl step, recorded with its stdout, stderr and exit code.
fn run_step(ep: &str, args: &[&str]) -> String {
    let out = etcdctl(ep, args, None);
    format!(
        "$ etcdctl {}\n{}[stderr]\n{}[exit code {:?}]\n",
        args.join(" "),
        out.stdout,
        client_log_free(&out.stderr),
        out.code
    )
}

/// Lease ids (hex) embedded in the keys under `prefix`, in create order.
fn ids_under(ep: &str, prefix: &str) -> Vec<String> {
    let out = etcdctl(
        ep,
        &["get", "--prefix", prefix, "--keys-only", "--sort-by=CREATE"],
        None,
    );
    out.stdout
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(str::to_string)
        .collect()
}

/// Waits (bounded) until exactly `n` keys exist under `prefix`; the outcome is recorded.
fn wait_for_keys(ep: &str, prefix: &str, n: usize) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let have = ids_under(ep, prefix).len();
        if have == n {
            return format!("[{n} keys under {prefix}]\n");
        }
        if Instant::now() > deadline {
            return format!("<{have} keys under {prefix} after {WAIT:?}, not {n}>\n");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The whole script against a fresh single-member `bin`: one raw transcript entry per step.
fn run_script(bin: &Path) -> Vec<String> {
    let mut server = Server::spawn_new(bin, &[], ConfigVia::Flags);
    server.wait_healthy(oxcd_tests::START_TIMEOUT);
    let ep = server.endpoint();
    let ep = ep.as_str();
    let lock_pfx = format!("{LOCK}/");
    let elect_pfx = format!("{ELECT}/");
    // ---- etcdctl lock ----
    let mut t = vec![
        run_step(ep, &["lock"]),
        run_step(ep, &["lock", LOCK, "--", "echo", "inside"]),
        // The command sees the lock's key and the revision it was acquired at.
        run_step(
            ep,
            &[
                "lock",
                LOCK,
                "--",
                "sh",
                "-c",
                "echo \"key $ETCD_LOCK_KEY rev $ETCD_LOCK_REV\"",
            ],
        ),
        run_step(ep, &["lock", LOCK, "--", "sh", "-c", "exit 3"]),
        run_step(ep, &["put", "recipe-marker", "m"]),
    ];

    // A holder without a command prints its key (and the empty value), then holds.
    let mut a = Bg::spawn(ep, "lock A", &["lock", LOCK]);
    t.push(a.read_lines(2));
    t.push(run_step(
        ep,
        &["get", "--prefix", &lock_pfx, "-w", "fields"],
    ));
    // A second locker queues behind it and runs its command only once A lets go.
    let mut b = Bg::spawn(ep, "lock B", &["lock", LOCK, "--", "echo", "second"]);
    t.push(wait_for_keys(ep, &lock_pfx, 2));
    t.push(b.still_waiting());
    t.push(run_step(
        ep,
        &["get", "--prefix", &lock_pfx, "--sort-by=CREATE"],
    ));
    a.signal(libc::SIGTERM);
    t.push(a.finish());
    t.push(b.finish());
    t.push(run_step(ep, &["get", "--prefix", &lock_pfx]));

    // A holder with a short session; a waiter that gives up releases its place in the queue.
    let mut h = Bg::spawn(ep, "lock H", &["lock", "--ttl", "3", LOCK]);
    t.push(h.read_lines(2));
    let mut w = Bg::spawn(ep, "lock W", &["lock", LOCK, "--", "echo", "never"]);
    t.push(wait_for_keys(ep, &lock_pfx, 2));
    t.push(w.still_waiting());
    w.signal(libc::SIGTERM);
    t.push(w.finish());
    t.push(run_step(
        ep,
        &["get", "--prefix", &lock_pfx, "--sort-by=CREATE"],
    ));
    // The holder dies without unlocking: only its lease expiry frees the lock.
    let h_id = ids_under(ep, &lock_pfx)
        .first()
        .cloned()
        .unwrap_or_default();
    h.signal(libc::SIGKILL);
    t.push(h.finish());
    t.push(run_step(
        ep,
        &[
            "lock",
            LOCK,
            "--",
            "sh",
            "-c",
            "echo \"after expiry: $ETCD_LOCK_KEY rev $ETCD_LOCK_REV\"",
        ],
    ));
    t.push(run_step(ep, &["lease", "timetolive", &h_id]));
    t.push(run_step(ep, &["get", "--prefix", &lock_pfx]));

    // ---- etcdctl elect ----
    t.push(run_step(ep, &["elect"]));
    t.push(run_step(ep, &["elect", ELECT]));
    t.push(run_step(ep, &["elect", "-l", ELECT, "v"]));

    // An observer started before there is any leader, then a campaign won at once.
    let mut o1 = Bg::spawn(ep, "observer 1", &["elect", "-l", ELECT]);
    let mut c1 = Bg::spawn(ep, "candidate 1", &["elect", ELECT, "v1"]);
    t.push(c1.read_lines(2));
    t.push(o1.read_lines(2));
    t.push(run_step(
        ep,
        &["get", "--prefix", &elect_pfx, "-w", "fields"],
    ));
    // A second candidate waits; a second observer reports the current leader.
    let mut c2 = Bg::spawn(ep, "candidate 2", &["elect", ELECT, "v2"]);
    t.push(wait_for_keys(ep, &elect_pfx, 2));
    t.push(c2.still_waiting());
    t.push(run_step(
        ep,
        &["get", "--prefix", &elect_pfx, "--sort-by=CREATE"],
    ));
    let mut o2 = Bg::spawn(ep, "observer 2", &["elect", "-l", ELECT]);
    t.push(o2.read_lines(2));
    // The leader resigns: the second candidate leads and both observers say so.
    c1.signal(libc::SIGINT);
    t.push(c1.finish());
    t.push(c2.read_lines(2));
    t.push(o1.read_lines(2));
    t.push(o2.read_lines(2));
    // The new leader dies without resigning; revoking its lease ends its leadership.
    let c2_id = ids_under(ep, &elect_pfx)
        .first()
        .cloned()
        .unwrap_or_default();
    c2.signal(libc::SIGKILL);
    t.push(c2.finish());
    t.push(run_step(ep, &["lease", "revoke", &c2_id]));
    t.push(run_step(ep, &["get", "--prefix", &elect_pfx]));
    let mut c3 = Bg::spawn(ep, "candidate 3", &["elect", ELECT, "v3"]);
    t.push(c3.read_lines(2));
    t.push(o1.read_lines(2));
    t.push(o2.read_lines(2));
    // A candidate that gives up while waiting withdraws its key.
    let mut c4 = Bg::spawn(ep, "candidate 4", &["elect", ELECT, "v4"]);
    t.push(wait_for_keys(ep, &elect_pfx, 2));
    t.push(c4.still_waiting());
    c4.signal(libc::SIGINT);
    t.push(c4.finish());
    t.push(run_step(
        ep,
        &["get", "--prefix", &elect_pfx, "--sort-by=CREATE"],
    ));
    // Observers stop quietly; the last leader resigns.
    o1.signal(libc::SIGINT);
    t.push(o1.finish());
    o2.signal(libc::SIGINT);
    t.push(o2.finish());
    c3.signal(libc::SIGINT);
    t.push(c3.finish());
    t.push(run_step(ep, &["get", "--prefix", &elect_pfx]));
    t.push(run_step(ep, &["get", "--prefix", "recipe", "--keys-only"]));
    t
}

/// Normalization 2: lease ids are random (etcd derives them from its member id and the
/// clock). Every lease id is renamed `<leaseN>`, N counting from 1 in order of first
/// appearance across the whole transcript, so it still shows which lease is which. A lease id
/// appears in hex after a lock or election prefix (`recipe-lock/<hex>`, which is also what
/// `$ETCD_LOCK_KEY` holds), in `lease <hex> ...`, `lease revoke <hex>` and
/// `lease timetolive <hex>`, and in decimal as the `"Lease" : <dec>` field. Both notations map
/// to the same name by numeric value.
///
/// Normalization 3: `"ClusterID"`, `"MemberID"` and `"RaftTerm"` in `-w fields` output differ
/// between any two clusters and become 0. Revisions are not normalized: they must match.
fn normalize(transcript: &[String]) -> Vec<String> {
    let mut names: HashMap<u64, usize> = HashMap::new();
    transcript
        .iter()
        .map(|step| normalize_step(step, &mut names))
        .collect()
}

fn normalize_step(text: &str, names: &mut HashMap<u64, usize>) -> String {
    let lock_pfx = format!("{LOCK}/");
    let elect_pfx = format!("{ELECT}/");
    // (marker, radix of the number after it, 0: a decimal replaced by 0); longer markers
    // first where one is a prefix of another.
    let rules: [(&str, u32); 9] = [
        (lock_pfx.as_str(), 16),
        (elect_pfx.as_str(), 16),
        ("lease revoke ", 16),
        ("lease timetolive ", 16),
        ("lease ", 16),
        ("\"Lease\" : ", 10),
        ("\"ClusterID\" : ", 0),
        ("\"MemberID\" : ", 0),
        ("\"RaftTerm\" : ", 0),
    ];
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    'scan: while !rest.is_empty() {
        for (marker, radix) in rules {
            let Some(after) = rest.strip_prefix(marker) else {
                continue;
            };
            let digits = if radix == 16 {
                after.bytes().take_while(u8::is_ascii_hexdigit).count()
            } else {
                after.bytes().take_while(u8::is_ascii_digit).count()
            };
            // A number ends at a word boundary: `lease already` holds no hex id `a`.
            if after[digits..]
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric())
            {
                continue;
            }
            out.push_str(marker);
            match (radix, u64::from_str_radix(&after[..digits], radix.max(2))) {
                // A cluster-specific number.
                (0, _) => out.push('0'),
                // No number here, or lease 0 (none): kept as printed.
                (_, Err(_) | Ok(0)) => out.push_str(&after[..digits]),
                (_, Ok(id)) => {
                    let n = names.len() + 1;
                    let n = *names.entry(id).or_insert(n);
                    out.push_str(&format!("<lease{n}>"));
                }
            }
            rest = &after[digits..];
            continue 'scan;
        }
        let ch = rest.chars().next().expect("non-empty");
        out.push(ch);
        rest = &rest[ch.len_utf8()..];
    }
    out
}

#[test]
fn normalization_names_leases_by_first_appearance() {
    let mut names = HashMap::new();
    let got = normalize_step(
        "recipe-lock/694d7c1b3f2e5a04\nlease revoke 2a\n\"Lease\" : 7587857403655117316\n\
         lease 000000000000002a revoked\n\"MemberID\" : 123\n\"Revision\" : 7\nlease 0\n\
         lease already\n",
        &mut names,
    );
    assert_eq!(
        got,
        "recipe-lock/<lease1>\nlease revoke <lease2>\n\"Lease\" : <lease1>\n\
         lease <lease2> revoked\n\"MemberID\" : 0\n\"Revision\" : 7\nlease 0\n\
         lease already\n"
    );
}

#[test]
fn etcdctl_lock_and_elect_match_etcd() {
    if !etcd_available() {
        eprintln!(
            "\n\n!!! SKIPPED etcdctl_lock_and_elect_match_etcd: {ETCD_BIN} is not installed, \
             so there is no reference to compare with !!!\n\n"
        );
        return;
    }
    let reference = normalize(&run_script(Path::new(ETCD_BIN)));
    let actual = normalize(&run_script(&server_bin()));
    // Shown with --nocapture, or when the test fails.
    eprintln!("etcd 3.4 transcript:\n{}", reference.concat());
    assert_eq!(reference.len(), actual.len());
    let diffs: Vec<String> = reference
        .iter()
        .zip(&actual)
        .enumerate()
        .filter(|(_, (want, got))| want != got)
        .map(|(i, (want, got))| {
            format!(
                "step {}:\n--- etcd 3.4:\n{want}+++ {}:\n{got}",
                i + 1,
                server_bin().display()
            )
        })
        .collect();
    assert!(
        diffs.is_empty(),
        "{} of {} steps differ from etcd 3.4:\n{}",
        diffs.len(),
        reference.len(),
        diffs.join("\n")
    );
    // The reference itself must show the recipes at work, or the comparison proves little.
    let all = reference.concat();
    for needle in [
        "[lock A stdout]\nrecipe-lock/<lease",
        "inside\n",
        "[lock B rest of stdout]\nsecond\n",
        "after expiry: recipe-lock/",
        "already expired",
        "[lock W stderr]\nError: context canceled\n",
        "[candidate 2 stdout]\nrecipe-elect/<lease",
        "v3\n",
        "[candidate 4 stderr]\nError: context canceled\n",
        "Error: lock takes a lock name argument",
        "Error: elect takes one election name argument",
    ] {
        assert!(
            all.contains(needle),
            "reference transcript lacks {needle:?}:\n{all}"
        );
    }
}
