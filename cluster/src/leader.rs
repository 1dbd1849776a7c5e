//! One leader among the cluster API's replicas, for background work (any
//! replica serves requests). The leader holds `/ember/cluster/leader`
//! under a lease: created only if absent, so one replica wins; kept by
//! heartbeats; gone with the lease if its holder stops, so another
//! replica's next campaign wins.

use std::time::Duration;

use ember_store::{Expect, Lease, Store, StoreError};

pub const LEADER_KEY: &str = "/ember/cluster/leader";

pub struct Candidate {
    id: String,
    ttl: Duration,
    lease: Option<Lease>,
}

impl Candidate {
    pub fn new(id: &str, ttl: Duration) -> Candidate {
        Candidate {
            id: id.to_string(),
            ttl,
            lease: None,
        }
    }

    /// One round: keeps leadership if held, else tries to take it.
    /// Returns whether this replica leads now.
    pub async fn campaign(&mut self, store: &Store) -> Result<bool, StoreError> {
        if let Some(l) = self.lease {
            match store.keep_alive(l).await {
                Ok(()) => {
                    // Still ours? (The key could only vanish with the lease.)
                    if let Some(v) = store.get(LEADER_KEY).await? {
                        if v.value == self.id.as_bytes() {
                            return Ok(true);
                        }
                    }
                }
                Err(StoreError::LeaseGone(_)) => {}
                Err(e) => return Err(e),
            }
            self.lease = None;
        }
        let lease = store.grant_lease(self.ttl).await?;
        let won = store
            .compare_and_swap(LEADER_KEY, Expect::Absent, self.id.as_bytes(), Some(lease))
            .await?
            .is_some();
        if won {
            self.lease = Some(lease);
        } else {
            store.revoke(lease).await?;
        }
        Ok(won)
    }

    /// Steps down at once (a clean shutdown).
    pub async fn resign(&mut self, store: &Store) -> Result<(), StoreError> {
        if let Some(l) = self.lease.take() {
            store.revoke(l).await?;
        }
        Ok(())
    }
}

/// The current leader's id, if any.
pub async fn leader(store: &Store) -> Result<Option<String>, StoreError> {
    Ok(store
        .get(LEADER_KEY)
        .await?
        .map(|v| String::from_utf8_lossy(&v.value).into_owned()))
}
