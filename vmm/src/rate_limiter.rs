//! Token-bucket rate limiters in Firecracker's shape: an optional bucket of
//! bytes (`bandwidth`) and one of operations (`ops`, e.g. frames), each with
//! a size, an optional one-time burst and a refill time in milliseconds.
//!
//! A device asks `consume(bytes)` before moving one unit of work. When a
//! bucket is short, nothing is taken from either bucket, the limiter arms
//! its timerfd for when enough tokens will be there, and reports itself
//! blocked; the device keeps the work and retries when the timer fires
//! (`event_handler`). Nothing is dropped.

use std::os::unix::io::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

/// The API's shapes of a limiter and its buckets.
pub use ember_vmm_api::rate_limiter::{RateLimiterConfig, TokenBucketConfig};

/// A bucket of tokens refilled continuously at `size / refill_time`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    size: u64,
    one_time_burst: u64,
    refill_time_ns: u64,
    budget: u64,
    last_update: Instant,
}

/// What `TokenBucket::reduce` decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduce {
    /// The tokens were taken.
    Success,
    /// Not enough tokens; nothing was taken. The bucket will hold enough
    /// after this long.
    Wait(Duration),
}

impl TokenBucket {
    /// `None` for a bucket that never limits (size or refill time 0).
    pub fn new(cfg: &TokenBucketConfig) -> Option<TokenBucket> {
        if cfg.size == 0 || cfg.refill_time == 0 {
            return None;
        }
        Some(TokenBucket {
            size: cfg.size,
            one_time_burst: cfg.one_time_burst.unwrap_or(0),
            refill_time_ns: cfg.refill_time.saturating_mul(1_000_000),
            budget: cfg.size,
            last_update: Instant::now(),
        })
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last_update).as_nanos();
        // Tokens earned since the last update; the remainder of the
        // division is kept by only advancing `last_update` by what was paid.
        let earned = elapsed * u128::from(self.size) / u128::from(self.refill_time_ns);
        if earned == 0 {
            return;
        }
        let earned = u64::try_from(earned).unwrap_or(u64::MAX);
        if self.budget.saturating_add(earned) >= self.size {
            self.budget = self.size;
            self.last_update = now;
        } else {
            self.budget += earned;
            let spent_ns =
                u128::from(earned) * u128::from(self.refill_time_ns) / u128::from(self.size);
            self.last_update += Duration::from_nanos(u64::try_from(spent_ns).unwrap_or(u64::MAX));
        }
    }

    /// Takes `tokens` if there are enough (the one-time burst first). A
    /// request larger than the bucket goes through once the bucket is
    /// full, emptying it, so it is delayed rather than refused forever.
    pub fn reduce(&mut self, tokens: u64) -> Reduce {
        self.reduce_at(tokens, Instant::now())
    }

    fn reduce_at(&mut self, tokens: u64, now: Instant) -> Reduce {
        let from_burst = tokens.min(self.one_time_burst);
        let rest = tokens - from_burst;
        if rest == 0 {
            self.one_time_burst -= from_burst;
            return Reduce::Success;
        }
        self.refill(now);
        let needed = rest.min(self.size);
        if self.budget >= needed {
            self.one_time_burst -= from_burst;
            self.budget -= needed;
            return Reduce::Success;
        }
        let missing = u128::from(needed - self.budget);
        let wait_ns = missing * u128::from(self.refill_time_ns) / u128::from(self.size);
        Reduce::Wait(Duration::from_nanos(
            u64::try_from(wait_ns).unwrap_or(u64::MAX).max(1_000_000),
        ))
    }

    /// Gives back tokens taken by `reduce` (when the other bucket refused).
    pub fn replenish(&mut self, tokens: u64) {
        self.budget = self.budget.saturating_add(tokens).min(self.size);
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    pub fn one_time_burst(&self) -> u64 {
        self.one_time_burst
    }
}

/// Bandwidth and ops buckets plus the timer that ends a wait.
pub struct RateLimiter {
    config: RateLimiterConfig,
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    blocked: bool,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("config", &self.config)
            .field("blocked", &self.blocked)
            .finish()
    }
}

impl RateLimiter {
    pub fn new(config: &RateLimiterConfig) -> std::io::Result<RateLimiter> {
        Ok(RateLimiter {
            config: *config,
            bandwidth: config.bandwidth.as_ref().and_then(TokenBucket::new),
            ops: config.ops.as_ref().and_then(TokenBucket::new),
            timer: TimerFd::new()?,
            blocked: false,
        })
    }

    pub fn config(&self) -> &RateLimiterConfig {
        &self.config
    }

    /// Whether this limiter limits anything.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    /// Waiting for the timer: the device must not move data.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Takes one operation of `bytes` bytes, or arms the timer and returns
    /// false (taking nothing).
    pub fn consume(&mut self, bytes: u64) -> bool {
        if self.blocked {
            return false;
        }
        let mut wait = None;
        let mut took_bytes = false;
        if let Some(b) = self.bandwidth.as_mut() {
            match b.reduce(bytes) {
                Reduce::Success => took_bytes = true,
                Reduce::Wait(d) => wait = Some(d),
            }
        }
        if wait.is_none() {
            if let Some(o) = self.ops.as_mut() {
                if let Reduce::Wait(d) = o.reduce(1) {
                    wait = Some(d);
                    if took_bytes {
                        if let Some(b) = self.bandwidth.as_mut() {
                            b.replenish(bytes);
                        }
                    }
                }
            }
        }
        match wait {
            None => true,
            Some(d) => {
                self.block_for(d);
                false
            }
        }
    }

    fn block_for(&mut self, d: Duration) {
        match self.timer.reset(d, None) {
            Ok(()) => self.blocked = true,
            // Without a timer nobody would unblock us: don't limit.
            Err(e) => log::warn!("rate limiter: cannot arm timer: {e}"),
        }
    }

    /// The timer fired: the device may try again.
    pub fn event_handler(&mut self) {
        // The fd is readable, so this does not block.
        let _ = self.timer.wait();
        self.blocked = false;
    }

    /// Replaces the buckets (PATCH at run time); a blocked limiter is
    /// released so the device retries under the new limits.
    pub fn update(&mut self, config: &RateLimiterConfig) {
        self.config = *config;
        self.bandwidth = config.bandwidth.as_ref().and_then(TokenBucket::new);
        self.ops = config.ops.as_ref().and_then(TokenBucket::new);
        if self.blocked {
            // Fire now; the device sees the event and retries.
            self.block_for(Duration::from_nanos(1));
        }
    }
}

impl AsRawFd for RateLimiter {
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, burst: Option<u64>, refill_ms: u64) -> TokenBucket {
        TokenBucket::new(&TokenBucketConfig {
            size,
            one_time_burst: burst,
            refill_time: refill_ms,
        })
        .unwrap()
    }

    #[test]
    fn zero_means_unlimited() {
        let c = |size, refill_time| TokenBucketConfig {
            size,
            one_time_burst: None,
            refill_time,
        };
        assert!(TokenBucket::new(&c(0, 100)).is_none());
        assert!(TokenBucket::new(&c(100, 0)).is_none());
        let rl = RateLimiter::new(&RateLimiterConfig::default()).unwrap();
        assert!(rl.is_unlimited());
    }

    #[test]
    fn reduce_and_refill() {
        let mut b = bucket(1000, None, 1000);
        let t0 = b.last_update;
        assert_eq!(b.reduce_at(600, t0), Reduce::Success);
        assert_eq!(b.budget(), 400);
        // 500 more needs 100 tokens = 100 ms.
        assert_eq!(
            b.reduce_at(500, t0),
            Reduce::Wait(Duration::from_millis(100))
        );
        assert_eq!(b.budget(), 400, "a refused reduce takes nothing");
        // 100 ms later there are 500 tokens.
        assert_eq!(
            b.reduce_at(500, t0 + Duration::from_millis(100)),
            Reduce::Success
        );
        assert_eq!(b.budget(), 0);
        // Refill never exceeds size.
        b.refill(t0 + Duration::from_secs(10));
        assert_eq!(b.budget(), 1000);
    }

    #[test]
    fn fractional_refill_is_not_lost() {
        let mut b = bucket(10, None, 1000); // 1 token per 100 ms
        let t0 = b.last_update;
        assert_eq!(b.reduce_at(10, t0), Reduce::Success);
        for i in 1..=10u64 {
            b.refill(t0 + Duration::from_millis(50 * i));
        }
        assert_eq!(b.budget(), 5);
    }

    #[test]
    fn one_time_burst_is_used_first_and_once() {
        let mut b = bucket(100, Some(1000), 1000);
        let t0 = b.last_update;
        assert_eq!(b.reduce_at(900, t0), Reduce::Success);
        assert_eq!((b.one_time_burst(), b.budget()), (100, 100));
        assert_eq!(b.reduce_at(150, t0), Reduce::Success);
        assert_eq!((b.one_time_burst(), b.budget()), (0, 50));
        assert!(matches!(b.reduce_at(100, t0), Reduce::Wait(_)));
    }

    #[test]
    fn oversized_request_waits_for_a_full_bucket() {
        let mut b = bucket(100, None, 100);
        let t0 = b.last_update;
        assert_eq!(b.reduce_at(50, t0), Reduce::Success);
        assert_eq!(
            b.reduce_at(500, t0),
            Reduce::Wait(Duration::from_millis(50))
        );
        assert_eq!(
            b.reduce_at(500, t0 + Duration::from_millis(50)),
            Reduce::Success
        );
        assert_eq!(b.budget(), 0);
    }

    #[test]
    fn limiter_blocks_then_timer_releases() {
        // Refills slow enough that a loaded machine pausing this thread
        // between two calls adds no token (the bytes refill at one per
        // second), yet the ops timer fires well within the poll below.
        let cfg = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 1000,
                one_time_burst: None,
                refill_time: 1_000_000,
            }),
            ops: Some(TokenBucketConfig {
                size: 2,
                one_time_burst: None,
                refill_time: 400,
            }),
        };
        let mut rl = RateLimiter::new(&cfg).unwrap();
        assert!(rl.consume(100));
        assert!(rl.consume(100));
        // The ops bucket is empty; the bytes taken for the refused frame
        // are given back.
        assert!(!rl.consume(100));
        assert!(rl.is_blocked());
        assert_eq!(rl.bandwidth.as_ref().unwrap().budget(), 800);
        assert!(!rl.consume(1), "blocked until the timer fires");
        // Wait for the timer as the event loop would.
        let mut pfd = libc::pollfd {
            fd: rl.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, a bounded timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        assert_eq!(n, 1);
        rl.event_handler();
        assert!(!rl.is_blocked());
        assert!(rl.consume(100));
    }

    #[test]
    fn update_releases_a_blocked_limiter() {
        let cfg = RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                size: 1,
                one_time_burst: None,
                refill_time: 100_000,
            }),
        };
        let mut rl = RateLimiter::new(&cfg).unwrap();
        assert!(rl.consume(1));
        assert!(!rl.consume(1));
        rl.update(&RateLimiterConfig::default());
        assert!(rl.is_unlimited());
        let mut pfd = libc::pollfd {
            fd: rl.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, a bounded timeout.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 1000) }, 1);
        rl.event_handler();
        assert!(rl.consume(1_000_000));
    }
}
