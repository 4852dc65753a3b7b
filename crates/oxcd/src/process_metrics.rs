//! The process metrics etcd 3.4 exposes through Prometheus' Go client (`process_*`) and its own
//! file descriptor gauges (`os_fd_used`, `os_fd_limit`), read from the OS at every scrape.
//!
//! The values come from the `metrics-process` crate's collector (procfs on Linux); they are
//! rendered here rather than through its `metrics` integration, because the `metrics` crate's
//! counters hold integers: `process_cpu_seconds_total` would move in whole seconds, and its
//! `rate()` on a dashboard would read 0 or 1 core. Differences from Go's collector: the start
//! time is whole seconds, and an unlimited limit (which the crate reports as 0) is rendered as
//! Go renders it, 2^64 - 1.

use std::fmt::Write as _;

/// Appends the process families, in Prometheus' text format, to `out`.
pub fn render(out: &mut String) {
    let m = metrics_process::collector::collect();
    // The crate reports an unlimited resource limit as 0; Go reports RLIM_INFINITY.
    let limit = |v: Option<u64>| v.map(|v| if v == 0 { u64::MAX } else { v } as f64);
    let families: [(&str, &str, &str, Option<f64>); 9] = [
        (
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            m.cpu_seconds_total,
        ),
        (
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            limit(m.max_fds),
        ),
        (
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            m.open_fds.map(|v| v as f64),
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            m.resident_memory_bytes.map(|v| v as f64),
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            m.start_time_seconds.map(|v| v as f64),
        ),
        (
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            m.virtual_memory_bytes.map(|v| v as f64),
        ),
        (
            "process_virtual_memory_max_bytes",
            "gauge",
            "Maximum amount of virtual memory available in bytes.",
            limit(m.virtual_memory_max_bytes),
        ),
        (
            "os_fd_limit",
            "gauge",
            "The file descriptor limit.",
            limit(m.max_fds),
        ),
        (
            "os_fd_used",
            "gauge",
            "The number of used file descriptors.",
            m.open_fds.map(|v| v as f64),
        ),
    ];
    if !out.is_empty() && !out.ends_with("\n\n") {
        out.push('\n');
    }
    for (name, kind, help, value) in families {
        let Some(value) = value else { continue };
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n\n"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    }

    #[test]
    fn renders_the_families_etcd_has_with_plausible_values() {
        // Spend a little CPU so the counter is above zero at a resolution finer than seconds.
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let mut text = String::from("some_other 1\n");
        render(&mut text);
        assert!(text.starts_with("some_other 1\n\n# HELP "), "{text}");
        for (name, kind) in [
            ("process_cpu_seconds_total", "counter"),
            ("process_resident_memory_bytes", "gauge"),
            ("process_virtual_memory_bytes", "gauge"),
            ("process_open_fds", "gauge"),
            ("process_max_fds", "gauge"),
            ("process_start_time_seconds", "gauge"),
            ("os_fd_used", "gauge"),
            ("os_fd_limit", "gauge"),
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name}: {text}"
            );
            assert!(sample(&text, name) > 0.0, "{name}: {text}");
        }
        let cpu = sample(&text, "process_cpu_seconds_total");
        assert!(cpu.fract() != 0.0 || cpu >= 1.0, "cpu seconds {cpu}");
        let rss = sample(&text, "process_resident_memory_bytes");
        assert!(rss < sample(&text, "process_virtual_memory_bytes"));
        assert!(sample(&text, "process_open_fds") <= sample(&text, "process_max_fds"));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = sample(&text, "process_start_time_seconds");
        assert!(
            start <= now && start > now - 24.0 * 3600.0,
            "{start} vs {now}"
        );
    }
}
