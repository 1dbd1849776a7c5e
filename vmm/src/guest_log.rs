//! Log lines that a guest can trigger at will (an unknown register, a
//! malformed request) are limited per call site: a guest that repeats the
//! same mistake a million times must not grow the host's log files by a
//! million lines. Each call site may log [`BURST`] lines per [`WINDOW`];
//! the first line after a quiet window says how many were suppressed.
//!
//! Use [`guest_warn!`](crate::guest_warn) instead of `log::warn!` for
//! every line whose cause is under the guest's control.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Lines one call site may log per window.
pub const BURST: u64 = 10;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(10);

/// One call site's budget (a `static` in each use of the macro).
pub struct LogLimit {
    /// The window's number (since the process's first limited line).
    window: AtomicU64,
    /// Lines asked for in that window.
    count: AtomicU64,
    /// Lines suppressed and not yet reported.
    suppressed: AtomicU64,
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
        match LIMIT.admit() {
            None => {}
            Some(0) => log::warn!($($arg)+),
            Some(n) => log::warn!("{} ({n} more like it suppressed)", format_args!($($arg)+)),
        }
    }};
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

    /// A million guest-triggered lines from one call site, through the
    /// macro into a real logger: a handful reach it.
    #[test]
    fn a_million_lines_log_a_few() {
        use std::sync::atomic::AtomicUsize;
        static BYTES: AtomicUsize = AtomicUsize::new(0);
        struct Counting;
        impl log::Log for Counting {
            fn enabled(&self, _: &log::Metadata) -> bool {
                true
            }
            fn log(&self, r: &log::Record) {
                BYTES.fetch_add(r.args().to_string().len() + 1, Ordering::Relaxed);
            }
            fn flush(&self) {}
        }
        // Another test may have set a logger: then this one is moot.
        if log::set_logger(&Counting).is_err() {
            return;
        }
        log::set_max_level(log::LevelFilter::Warn);
        for i in 0..1_000_000u32 {
            crate::guest_warn!("virtio-mmio: read of unknown register {:#x}", i % 0x100);
        }
        let b = BYTES.load(Ordering::Relaxed);
        assert!(b > 0, "nothing logged");
        assert!(b < 64 * 1024, "{b} bytes logged for a million lines");
    }
}
