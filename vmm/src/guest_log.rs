//! Log lines that a guest can trigger at will (an unknown register, a
//! malformed request) are limited per call site: a guest that repeats the
//! same mistake a million times must not grow the host's log files by a
//! million lines. Each call site may log [`BURST`] lines per [`WINDOW`];
//! the first line after a quiet window says how many were suppressed.
//!
//! Use [`guest_warn!`](crate::guest_warn) instead of `log::warn!` for
//! every line whose cause is under the guest's control.
//!
//! What was suppressed in the last window is reported by
//! [`report_suppressed`], which the VMM calls when it exits: every
//! guest-triggered event is either logged or counted in a logged line.
//!
//! The per-site rate still lets a guest that never stops grow the log by a
//! few lines a second for as long as its VMM lives (days, for a warm
//! instance), so one process logs at most [`MAX_LINES`] of them in all;
//! past that they are only counted, and the counts logged at exit.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Lines one call site may log per window.
pub const BURST: u64 = 10;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Guest-triggered lines one process logs in all (a few hundred bytes
/// each as the VMM writes them: well under 1 MiB).
pub const MAX_LINES: u64 = 2000;

/// The process-wide allowance of guest-triggered lines.
struct Budget {
    max: u64,
    used: AtomicU64,
    said_so: AtomicBool,
}

static BUDGET: Budget = Budget::new(MAX_LINES);

impl Budget {
    const fn new(max: u64) -> Budget {
        Budget {
            max,
            used: AtomicU64::new(0),
            said_so: AtomicBool::new(false),
        }
    }

    /// True when one more line may be logged. The first refusal says so
    /// in the log.
    fn take(&self) -> bool {
        // fetch_add cannot wrap: it is called at most once per admitted
        // line (BURST per WINDOW per call site).
        if self.used.fetch_add(1, Ordering::Relaxed) < self.max {
            return true;
        }
        if !self.said_so.swap(true, Ordering::Relaxed) {
            log::warn!(
                "{} guest-triggered warnings logged; the rest are only counted \
                 (the counts are logged when the VMM exits)",
                self.max
            );
        }
        false
    }
}

/// One call site's budget (a `static` in each use of the macro).
pub struct LogLimit {
    /// The window's number (since the process's first limited line).
    window: AtomicU64,
    /// Lines asked for in that window.
    count: AtomicU64,
    /// Lines suppressed and not yet reported.
    suppressed: AtomicU64,
    /// The last line logged and its log target (the call site's module),
    /// repeated with the count in the report at exit.
    last: Mutex<(&'static str, String)>,
    /// In [`SITES`] already.
    registered: AtomicBool,
}

/// Every call site that has logged a line (a few dozen at most: one per
/// use of the macro in the source).
static SITES: Mutex<Vec<&'static LogLimit>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Logs, for every call site with lines suppressed since its last logged
/// line, "suppressed N more like: " and that line. For the VMM's exit, when
/// no more lines will come to carry the count.
pub fn report_suppressed() {
    let sites: Vec<&'static LogLimit> = lock(&SITES).clone();
    for site in sites {
        let n = site.suppressed.swap(0, Ordering::Relaxed);
        if n > 0 {
            let last = lock(&site.last);
            log::warn!(target: last.0, "suppressed {n} more like: {}", last.1);
        }
    }
}

fn epoch() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

impl LogLimit {
    #[allow(clippy::new_without_default)]
    pub const fn new() -> LogLimit {
        LogLimit {
            window: AtomicU64::new(0),
            count: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            last: Mutex::new(("", String::new())),
            registered: AtomicBool::new(false),
        }
    }

    /// Logs an admitted line (`suppressed` lines were dropped before it)
    /// with `target` (the call site's module) and keeps it for
    /// [`report_suppressed`]; past the process's [`MAX_LINES`], only
    /// counts it.
    pub fn log(&'static self, target: &'static str, suppressed: u64, line: String) {
        self.log_within(&BUDGET, target, suppressed, line);
    }

    fn log_within(
        &'static self,
        budget: &Budget,
        target: &'static str,
        suppressed: u64,
        line: String,
    ) {
        if !budget.take() {
            self.suppressed.fetch_add(suppressed + 1, Ordering::Relaxed);
        } else {
            match suppressed {
                0 => log::warn!(target: target, "{line}"),
                n => log::warn!(target: target, "{line} ({n} more like it suppressed)"),
            }
        }
        *lock(&self.last) = (target, line);
        if !self.registered.swap(true, Ordering::Relaxed) {
            lock(&SITES).push(self);
        }
    }

    /// `Some(n)` when this line may be logged, `n` being the lines
    /// suppressed before it; `None` when it is to be dropped.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(epoch().elapsed())
    }

    fn admit_at(&self, since_start: Duration) -> Option<u64> {
        let w = since_start.as_secs() / WINDOW.as_secs() + 1;
        if self.window.swap(w, Ordering::Relaxed) != w {
            self.count.store(0, Ordering::Relaxed);
        }
        if self.count.fetch_add(1, Ordering::Relaxed) < BURST {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// `log::warn!`, at most [`BURST`](crate::guest_log::BURST) lines per
/// call site per [`WINDOW`](crate::guest_log::WINDOW).
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::guest_log::LogLimit = $crate::guest_log::LogLimit::new();
        if let Some(n) = LIMIT.admit() {
            LIMIT.log(module_path!(), n, format!($($arg)+));
        }
    }};
}

/// How many guest-triggered events one logged line stands for: 1 for a
/// line, plus N for "(N more like it suppressed)"; N for the report at
/// exit ("suppressed N more like: ..."). For tests that count them.
pub fn events_in(line: &str) -> u64 {
    let count = |n: &str| n.parse::<u64>().unwrap_or(0);
    if let Some(rest) = line.strip_prefix("suppressed ") {
        return rest.split_once(' ').map_or(0, |(n, _)| count(n));
    }
    1 + line
        .strip_suffix(" more like it suppressed)")
        .and_then(|l| l.rsplit_once(" ("))
        .map_or(0, |(_, n)| count(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_window_then_a_count_of_what_was_dropped() {
        let l = LogLimit::new();
        let t = Duration::from_secs(3);
        let admitted: Vec<_> = (0..1000).filter_map(|_| l.admit_at(t)).collect();
        assert_eq!(admitted, vec![0; BURST as usize]);
        // The next window: its first line reports the rest.
        let t = t + WINDOW;
        assert_eq!(l.admit_at(t), Some(1000 - BURST));
        assert_eq!(l.admit_at(t), Some(0));
    }

    /// Through a real logger (one per process, so one test): a million
    /// guest-triggered lines from one call site log a handful, and with the
    /// report at exit they account for every one; past the process-wide
    /// budget, lines are only counted.
    #[test]
    fn through_a_real_logger() {
        static LINES: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());
        struct Keeping;
        impl log::Log for Keeping {
            fn enabled(&self, _: &log::Metadata) -> bool {
                true
            }
            fn log(&self, r: &log::Record) {
                let line = (r.target().to_string(), r.args().to_string());
                lock(&LINES).push(line);
            }
            fn flush(&self) {}
        }
        // Another test may have set a logger: then this one is moot.
        if log::set_logger(&Keeping).is_err() {
            return;
        }
        log::set_max_level(log::LevelFilter::Warn);
        let kept = |prefix: &str| -> Vec<(String, String)> {
            lock(&LINES)
                .iter()
                .filter(|(_, l)| l.contains(prefix))
                .cloned()
                .collect()
        };

        for i in 0..1_000_000u32 {
            crate::guest_warn!("guest_log test: unknown register {:#x}", i % 0x100);
        }
        report_suppressed();
        let lines = kept("guest_log test: ");
        let bytes: usize = lines.iter().map(|(_, l)| l.len() + 1).sum();
        assert!(!lines.is_empty(), "nothing logged");
        assert!(
            bytes < 64 * 1024,
            "{bytes} bytes logged for a million lines"
        );
        // Each line stands for itself and the ones it says were dropped.
        let events: u64 = lines.iter().map(|(_, l)| events_in(l)).sum();
        assert!(lines.iter().all(|(t, _)| t == module_path!()), "{lines:?}");
        assert_eq!(events, 1_000_000, "{lines:?}");
        // Reported once: nothing is left to report.
        let before = lock(&LINES).len();
        report_suppressed();
        let again = lock(&LINES)[before..]
            .iter()
            .filter(|(_, l)| l.contains("guest_log test: "))
            .count();
        assert_eq!(again, 0);

        // A guest that keeps at it for 1000 windows (hours): the per-site
        // limit admits 10 000 lines, a budget of 25 logs 25 and counts the
        // rest, and says so once.
        static SITE: LogLimit = LogLimit::new();
        let budget = Budget::new(25);
        for w in 0..1000u64 {
            let t = Duration::from_secs(3) + WINDOW * w as u32;
            for _ in 0..50 {
                if let Some(n) = SITE.admit_at(t) {
                    SITE.log_within(&budget, "t", n, "budget test: line".into());
                }
            }
        }
        report_suppressed();
        let lines = kept("budget test: ");
        assert_eq!(lines.len(), 25 + 1, "{lines:?}");
        let events: u64 = lines.iter().map(|(_, l)| events_in(l)).sum();
        assert_eq!(events, 1000 * 50);
        assert_eq!(
            kept("25 guest-triggered warnings logged; the rest are only counted").len(),
            1
        );
    }
}
