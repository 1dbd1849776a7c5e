//! Rate limiters in Firecracker's shape (`RateLimiter`, `TokenBucket`): an
//! optional bucket of bytes (`bandwidth`) and one of operations (`ops`),
//! each with a size, an optional one-time burst and a refill time in
//! milliseconds.

use serde::{Deserialize, Serialize};

/// One bucket as configured through the API.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Tokens the bucket holds when full.
    pub size: u64,
    /// Extra tokens available once, at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill an empty bucket completely.
    pub refill_time: u64,
}

/// `rx_rate_limiter` / `tx_rate_limiter` of an interface, `rate_limiter`
/// of a drive.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketConfig>,
}

impl TokenBucketConfig {
    /// A bucket with size 0 or refill_time 0 means "no limit" (as in
    /// Firecracker). Values whose refill rate cannot be computed are refused.
    pub fn validate(&self) -> Result<(), String> {
        if self.size > 0 && self.refill_time > 0 {
            // Refill arithmetic works in nanoseconds.
            if self.refill_time.checked_mul(1_000_000).is_none() {
                return Err(format!("refill_time {} ms is too large", self.refill_time));
            }
            if self.size.checked_mul(1_000).is_none() {
                return Err(format!("size {} is too large", self.size));
            }
        }
        Ok(())
    }
}

impl RateLimiterConfig {
    pub fn validate(&self) -> Result<(), String> {
        if let Some(b) = &self.bandwidth {
            b.validate().map_err(|e| format!("bandwidth: {e}"))?;
        }
        if let Some(b) = &self.ops {
            b.validate().map_err(|e| format!("ops: {e}"))?;
        }
        Ok(())
    }
}
