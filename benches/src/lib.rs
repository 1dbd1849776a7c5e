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

/// User + system CPU time of a process so far, from /proc/<pid>/stat.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf(_SC_CLK_TCK) has no preconditions; it reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    Some(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// Resident memory of a process in KiB: (all mappings, the largest
/// anonymous mapping of exactly `guest_bytes`, i.e. guest memory).
pub fn rss_split(pid: u32, guest_bytes: u64) -> Option<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut total = 0;
    let mut guest = 0;
    let mut cur_is_guest = false;
    for line in smaps.lines() {
        let mut parts = line.split_whitespace();
        let first = parts.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping header: "start-end perms offset dev inode [path]".
            let (a, b) = first.split_once('-')?;
            let len = u64::from_str_radix(b, 16).ok()? - u64::from_str_radix(a, 16).ok()?;
            let named = parts.nth(4).is_some();
            cur_is_guest = len == guest_bytes && !named;
        } else if first == "Rss:" {
            let kib: u64 = parts.next()?.parse().ok()?;
            total += kib;
            if cur_is_guest {
                guest += kib;
            }
        }
    }
    Some((total, guest))
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
        let (total, guest) = rss_split(me, 1).unwrap();
        assert!(total > 0);
        assert_eq!(guest, 0);
    }
}
