//! Measurement helpers shared by Ember's benchmarks.

use std::time::Duration;

/// The p-th percentile (0-100) of `samples`, nearest-rank.
pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut s = samples.to_vec();
    s.sort();
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// CPU time of a process so far, summed over its threads, in nanoseconds
/// of run time (from /proc/<pid>/task/*/schedstat: tick-free resolution).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let mut ns: u64 = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path().join("schedstat");
        let text = std::fs::read_to_string(path).unwrap_or_default();
        ns += text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(Duration::from_nanos(ns))
}

/// Resident memory of a process in KiB: (all mappings, guest memory).
/// Guest memory is the anonymous mapping of exactly `guest_bytes` (named
/// `[anon:ember-guest-memory]` where the host kernel supports VMA names).
pub fn rss_split(pid: u32, guest_bytes: u64) -> Option<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut total = 0;
    let mut guest = 0;
    let mut cur_is_guest = false;
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(first) = fields.first() else {
            continue;
        };
        if let Some((a, b)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            // "start-end perms offset dev inode [path]"
            let len = u64::from_str_radix(b, 16).ok()? - u64::from_str_radix(a, 16).ok()?;
            let path = fields.get(5).copied().unwrap_or("");
            cur_is_guest =
                len == guest_bytes && (path.is_empty() || path == "[anon:ember-guest-memory]");
        } else if *first == "Rss:" {
            let kib: u64 = fields.get(1)?.parse().ok()?;
            total += kib;
            if cur_is_guest {
                guest += kib;
            }
        }
    }
    Some((total, guest))
}

/// (Rss, Pss) of a process in KiB, from /proc/<pid>/smaps_rollup.
pub fn smaps_rollup(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("Rss:")?, field("Pss:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let s: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&s, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&s, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }

    #[test]
    fn own_process_stats() {
        let me = std::process::id();
        assert!(cpu_time(me).is_some());
        let (total, guest) = rss_split(me, 12345 * 4096).unwrap();
        assert!(total > 0);
        assert_eq!(guest, 0);
        let (rss, pss) = smaps_rollup(me).unwrap();
        assert!(rss > 0 && pss > 0 && pss <= rss);
    }
}
