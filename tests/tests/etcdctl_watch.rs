//! `etcdctl watch` against real etcd 3.4 and against the server under test: the same writes,
//! then the same watch commands (prefix, --rev, --prev-kv, JSON, interactive mode, a compacted
//! start, a live watch), and the outputs must be identical once ids and terms are normalized.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oxcd_tests::{
    etcd_available, etcdctl, normalize_ids, server_bin, ConfigVia, Server, ETCDCTL_BIN, ETCD_BIN,
};

/// A running `etcdctl watch`: its stdout is gathered on a thread; stdin stays open (interactive
/// mode reads commands from it) until the process is stopped.
struct WatchCmd {
    child: std::process::Child,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
}

impl WatchCmd {
    fn start(endpoint: &str, args: &[&str]) -> WatchCmd {
        let mut child = Command::new(ETCDCTL_BIN)
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoint}"))
            .arg("--dial-timeout=5s")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run etcdctl watch");
        let gather = |mut pipe: Box<dyn Read + Send>| {
            let buf = Arc::new(Mutex::new(String::new()));
            let b = buf.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    b.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&chunk[..n]));
                }
            });
            buf
        };
        let out = gather(Box::new(child.stdout.take().unwrap()));
        let err = gather(Box::new(child.stderr.take().unwrap()));
        WatchCmd { child, out, err }
    }

    /// Types a line at the interactive prompt.
    fn send(&mut self, line: &str) {
        let pipe = self.child.stdin.as_mut().expect("stdin");
        pipe.write_all(line.as_bytes()).expect("write stdin");
        pipe.write_all(b"\n").expect("write stdin");
        pipe.flush().unwrap();
    }

    /// Waits until the output has been quiet for `quiet` (or the process exited), at most
    /// 15 s; true if the process exited by itself.
    fn settle(&mut self, quiet: Duration) -> bool {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut last_len = usize::MAX;
        let mut last_change = Instant::now();
        let mut exited = false;
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                exited = true;
                std::thread::sleep(Duration::from_millis(100));
                break;
            }
            let len = self.out.lock().unwrap().len();
            if len != last_len {
                last_len = len;
                last_change = Instant::now();
            } else if last_change.elapsed() >= quiet {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        exited
    }

    /// Settles, then stops the process: (stdout, error lines, exited by itself).
    fn finish(mut self, quiet: Duration) -> (String, String, bool) {
        let exited = self.settle(quiet);
        if !exited {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let out = self.out.lock().unwrap().clone();
        let err = self
            .err
            .lock()
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("Error") || l.contains("canceled"))
            .collect::<Vec<_>>()
            .join("\n");
        (out, err, exited)
    }
}

fn ctl(endpoint: &str, args: &[&str], stdin: Option<&str>) {
    let out = etcdctl(endpoint, args, stdin);
    assert!(out.success, "etcdctl {args:?}: {out:#?}");
}

fn run(bin: &Path) -> Vec<String> {
    let mut server = Server::spawn_new(bin, &[], ConfigVia::Flags);
    server.wait_healthy(oxcd_tests::START_TIMEOUT);
    let ep = server.endpoint();
    for (k, v) in [("k/a", "1"), ("k/b", "2"), ("other", "x"), ("k/a", "3")] {
        ctl(&ep, &["put", k, v], None);
    }
    ctl(&ep, &["del", "k/b"], None);
    ctl(&ep, &["txn"], Some("\nput k/c 4\nput k/d 5\ndel k/a\n\n\n"));
    ctl(&ep, &["put", "k/a", "6"], None);

    let quiet = Duration::from_millis(1500);
    let mut transcript = Vec::new();
    let mut record = |name: &str, (out, err, exited): (String, String, bool)| {
        transcript.push(format!(
            "== {name}\n{}-- errors: {err}\n-- exited: {exited}\n",
            normalize_ids(&out)
        ));
    };
    for args in [
        vec!["watch", "--prefix", "--rev", "1", ""],
        vec!["watch", "--prefix", "--rev", "3", "k/"],
        vec!["watch", "--prev-kv", "--rev", "2", "k/a"],
        vec!["watch", "--rev", "1", "k/a", "k/c"],
        vec!["watch", "-w", "json", "--prefix", "--rev", "1", "k/"],
        vec!["watch", "-w", "json", "--prev-kv", "--rev", "5", "k/a"],
    ] {
        let w = WatchCmd::start(&ep, &args);
        record(&args.join(" "), w.finish(quiet));
    }

    // Interactive: two watchers on one stream, the second created once the first is caught
    // up (two catching up at once may interleave in any order, in etcd too).
    let mut w = WatchCmd::start(&ep, &["watch", "-i"]);
    w.send("watch --rev 1 k/a");
    w.settle(quiet);
    w.send("watch --prev-kv --rev 6 --prefix k/");
    record("interactive", w.finish(quiet));

    // Live: the watch starts before the writes it reports (from revision 9, the next one,
    // so a slow start cannot lose the first events).
    let w = WatchCmd::start(&ep, &["watch", "--prefix", "--rev", "9", "live/"]);
    std::thread::sleep(Duration::from_millis(1000));
    ctl(&ep, &["put", "live/x", "1"], None);
    ctl(&ep, &["put", "live/y", "2"], None);
    ctl(&ep, &["del", "--prefix", "live/"], None);
    record("live", w.finish(quiet));

    ctl(&ep, &["compaction", "8"], None);
    let w = WatchCmd::start(&ep, &["watch", "--rev", "2", "k/a"]);
    record("compacted start", w.finish(quiet));
    let w = WatchCmd::start(&ep, &["watch", "--rev", "8", "--prefix", "k/"]);
    record("start at the compaction point", w.finish(quiet));
    transcript
}

#[test]
fn etcdctl_watch_matches_etcd() {
    if !etcd_available() {
        eprintln!(
            "\n\n!!! SKIPPED etcdctl_watch_matches_etcd: {ETCD_BIN} is not installed, \
             so there is no reference to compare with !!!\n\n"
        );
        return;
    }
    let reference = run(Path::new(ETCD_BIN));
    let actual = run(&server_bin());
    let mut diffs = Vec::new();
    for (want, got) in reference.iter().zip(&actual) {
        if want != got {
            diffs.push(format!("--- etcd 3.4:\n{want}+++ oxcd:\n{got}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} of {} watch commands differ from etcd 3.4:\n{}",
        diffs.len(),
        reference.len(),
        diffs.join("\n")
    );
    let all = reference.concat();
    for needle in ["PUT\nk/a\n1\n", "DELETE\nk/a\n", "\"prev_kv\"", "compacted"] {
        assert!(all.contains(needle), "reference lacks {needle:?}:\n{all}");
    }
}
