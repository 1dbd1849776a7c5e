//! Signatures already used, so that a captured request cannot be sent
//! again while its date is still within the allowed skew.
//!
//! * Only signatures that verified are inserted (a stranger without a
//!   secret cannot add entries), and each is kept until its `X-Amz-Date`
//!   plus the skew has passed on our clock: after that the date refuses a
//!   replay by itself.
//! * Memory is bounded: at most `max_entries` in all and a quarter of that
//!   per access key, so that one key cannot fill the cache for the others.
//!   A key (or the cache) that is full is throttled (429) until entries
//!   expire; nothing is evicted early, since an evicted signature could be
//!   replayed.
//! * The cache is this replica's: a replay sent to another replica of the
//!   same cluster is not caught (documented in docs/cluster.md).
//! * A legitimate client can send the same bytes twice: botocore signs
//!   only `host` and `x-amz-date` for Lambda, so two identical calls in
//!   the same second carry the same signature. The second is refused like
//!   a replay, with a throttling error that SDKs retry (re-signing, at a
//!   later second), rather than an error they give up on.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use crate::sigv4::MAX_SKEW_SECS;

/// Why [`ReplayCache::admit`] refused a signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Seen before within its window.
    Replayed,
    /// This key (or everyone) has `max` signatures live; try later.
    Full,
}

pub struct ReplayCache {
    max_entries: usize,
    max_per_key: usize,
    inner: Mutex<Inner>,
}

/// When an entry goes: (expires, signature, key).
type Expiry = Reverse<(i64, [u8; 32], Arc<str>)>;

#[derive(Default)]
struct Inner {
    seen: HashSet<[u8; 32]>,
    /// (expires, signature, key), soonest first.
    expiry: BinaryHeap<Expiry>,
    per_key: HashMap<Arc<str>, usize>,
}

impl ReplayCache {
    /// `max_entries` 0 turns the cache off (every signature is admitted).
    pub fn new(max_entries: usize) -> ReplayCache {
        ReplayCache {
            max_entries,
            max_per_key: (max_entries / 4).max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Signatures held now.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .seen
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Admits a verified signature (hex) of `key`, signed at `signed_at`
    /// (seconds), if it was not seen; `now` is our clock (seconds).
    pub fn admit(
        &self,
        signature_hex: &str,
        key: &str,
        signed_at: i64,
        now: i64,
    ) -> Result<(), Refusal> {
        if self.max_entries == 0 {
            return Ok(());
        }
        let mut sig = [0u8; 32];
        // A signature that verified is 64 hex digits; anything else
        // cannot have verified, and is refused as a replay would be.
        if hex::decode_to_slice(signature_hex, &mut sig).is_err() {
            return Err(Refusal::Replayed);
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.expire(now);
        if inner.seen.contains(&sig) {
            return Err(Refusal::Replayed);
        }
        let held = inner.per_key.get(key).copied().unwrap_or(0);
        if inner.seen.len() >= self.max_entries || held >= self.max_per_key {
            return Err(Refusal::Full);
        }
        let key: Arc<str> = match inner.per_key.get_key_value(key) {
            Some((k, _)) => k.clone(),
            None => Arc::from(key),
        };
        *inner.per_key.entry(key.clone()).or_insert(0) += 1;
        inner.seen.insert(sig);
        // Refused by its date after this, whatever the cache holds.
        let expires = signed_at.saturating_add(MAX_SKEW_SECS + 1).max(now);
        inner.expiry.push(Reverse((expires, sig, key)));
        Ok(())
    }
}

impl Inner {
    fn expire(&mut self, now: i64) {
        while let Some(Reverse((at, _, _))) = self.expiry.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, sig, key))) = self.expiry.pop() else {
                break;
            };
            self.seen.remove(&sig);
            if let Some(n) = self.per_key.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    self.per_key.remove(&key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(i: u32) -> String {
        format!("{:064x}", i)
    }

    #[test]
    fn a_signature_is_admitted_once_within_its_window() {
        let c = ReplayCache::new(100);
        assert_eq!(c.admit(&sig(1), "k", 1000, 1000), Ok(()));
        assert_eq!(c.admit(&sig(1), "k", 1000, 1001), Err(Refusal::Replayed));
        assert_eq!(
            c.admit(&sig(1), "other", 1000, 1000 + MAX_SKEW_SECS),
            Err(Refusal::Replayed),
            "still within the window"
        );
        // Past the window the entry goes (the date refuses it then).
        assert_eq!(c.admit(&sig(2), "k", 3000, 3000), Ok(()));
        assert_eq!(c.len(), 1);
        assert_eq!(
            c.admit(&"zz".repeat(32), "k", 3000, 3000),
            Err(Refusal::Replayed)
        );
    }

    #[test]
    fn one_key_cannot_fill_the_cache_for_others() {
        let c = ReplayCache::new(8);
        for i in 0..2 {
            assert_eq!(c.admit(&sig(i), "greedy", 1000, 1000), Ok(()));
        }
        assert_eq!(c.admit(&sig(99), "greedy", 1000, 1000), Err(Refusal::Full));
        for i in 10..16 {
            assert_eq!(c.admit(&sig(i), &format!("k{i}"), 1000, 1000), Ok(()));
        }
        assert_eq!(c.len(), 8);
        assert_eq!(c.admit(&sig(20), "late", 1000, 1000), Err(Refusal::Full));
        // Once the window has passed, room again, for everyone.
        let later = 1000 + MAX_SKEW_SECS + 1;
        assert_eq!(c.admit(&sig(99), "greedy", later, later), Ok(()));
        assert_eq!(c.len(), 1);
        assert!(ReplayCache::new(0).admit(&sig(1), "k", 1, 1).is_ok());
        assert!(ReplayCache::new(0).admit(&sig(1), "k", 1, 1).is_ok());
    }
}
