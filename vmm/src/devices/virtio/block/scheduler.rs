//! Write-aware I/O scheduling between the virtio queue and the backend:
//! writes are held back while too many are outstanding or while they are
//! slow, so that reads queued behind a write flood still go out at once
//! and their latency stays bounded. Reads, flushes and requests answered
//! without the backend are never held.
//!
//! Holding a write reorders nothing the guest may rely on: virtio-blk
//! orders no requests that are in flight together, and a flush covers
//! only writes the guest saw complete, which a held write has not.

use std::time::Duration;

/// A drive's `io_scheduler`, as the API gives it.
pub use ember_vmm_api::drive::IoSchedulerConfig;

#[derive(Debug, Default)]
pub struct WriteScheduler {
    config: Option<IoSchedulerConfig>,
    outstanding: u32,
    /// Average write latency in microseconds (weight 1/8 per sample).
    latency_us: u64,
}

impl WriteScheduler {
    pub fn new(config: Option<IoSchedulerConfig>) -> WriteScheduler {
        WriteScheduler {
            config,
            ..Default::default()
        }
    }

    pub fn set_config(&mut self, config: Option<IoSchedulerConfig>) {
        self.config = config;
    }

    /// Whether a write may go to the backend now. With none outstanding it
    /// always may: the latency can only be learned from a write, and a
    /// held write must not wait forever.
    pub fn may_send_write(&self) -> bool {
        let Some(c) = self.config else {
            return true;
        };
        if self.outstanding == 0 {
            return true;
        }
        let too_many = c
            .max_outstanding_writes
            .is_some_and(|m| self.outstanding >= m);
        let too_slow = c.max_write_latency_us.is_some_and(|m| self.latency_us > m);
        !too_many && !too_slow
    }

    pub fn write_sent(&mut self) {
        self.outstanding += 1;
    }

    pub fn write_done(&mut self, latency: Duration) {
        self.outstanding = self.outstanding.saturating_sub(1);
        let sample = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_us = if self.latency_us == 0 {
            sample
        } else {
            (self.latency_us.saturating_mul(7)).saturating_add(sample) / 8
        };
    }

    /// Forgets outstanding writes (device reset: their answers are dropped).
    pub fn reset(&mut self) {
        self.outstanding = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_never_holds() {
        let mut s = WriteScheduler::new(None);
        for _ in 0..1000 {
            s.write_sent();
        }
        assert!(s.may_send_write());
    }

    #[test]
    fn holds_on_count_and_latency() {
        let mut s = WriteScheduler::new(Some(IoSchedulerConfig {
            max_outstanding_writes: Some(2),
            max_write_latency_us: Some(1000),
        }));
        s.write_sent();
        assert!(s.may_send_write());
        s.write_sent();
        assert!(!s.may_send_write(), "two outstanding");
        s.write_done(Duration::from_micros(100));
        assert!(s.may_send_write());
        // Slow writes: held while any is outstanding, never with none.
        s.write_done(Duration::from_millis(50));
        s.write_sent();
        s.write_done(Duration::from_millis(50));
        assert!(s.may_send_write(), "none outstanding");
        s.write_sent();
        assert!(!s.may_send_write(), "latency above the threshold");
        for _ in 0..64 {
            s.write_done(Duration::from_micros(10));
            s.write_sent();
        }
        assert!(s.may_send_write(), "latency recovered");
    }

    #[test]
    fn zero_thresholds_are_refused() {
        let c = IoSchedulerConfig {
            max_outstanding_writes: Some(0),
            max_write_latency_us: None,
        };
        assert!(c.validate().is_err());
    }
}
