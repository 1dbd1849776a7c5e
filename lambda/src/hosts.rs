//! Hosts in the cluster store: each host daemon keeps its report under
//! `/ember/hosts/<id>`, put with a lease it keeps alive. A host that stops
//! heartbeating loses its lease, and its key with it: it is down, with no
//! sweeper needed, and whoever lists hosts sees only live ones.

use std::collections::BTreeMap;
use std::time::Duration;

use ember_store::{Lease, Store, StoreError};
use serde::{Deserialize, Serialize};

pub const HOSTS_PREFIX: &str = "/ember/hosts/";

/// What a host reports on every heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HostReport {
    pub id: String,
    /// Where the cluster reaches the host daemon's API.
    pub endpoint: String,
    /// Concurrent invocations it takes in all.
    pub capacity: u32,
    /// Invocations running now.
    pub running: u32,
    /// Idle warm instances per `function:version`.
    #[serde(default)]
    pub warm_idle: BTreeMap<String, u32>,
}

impl HostReport {
    pub fn free(&self) -> u32 {
        self.capacity.saturating_sub(self.running)
    }
}

/// A host's membership: registered with a lease, renewed by heartbeats.
pub struct Membership {
    lease: Lease,
    ttl: Duration,
    key: String,
}

impl Membership {
    /// Registers `report` under a lease of `ttl`.
    pub async fn join(
        store: &Store,
        report: &HostReport,
        ttl: Duration,
    ) -> Result<Membership, StoreError> {
        let lease = store.grant_lease(ttl).await?;
        let key = format!("{HOSTS_PREFIX}{}", report.id);
        store
            .put(
                &key,
                &serde_json::to_vec(report).expect("serialisable"),
                Some(lease),
            )
            .await?;
        Ok(Membership { lease, ttl, key })
    }

    /// Renews the lease and stores the new report. After the lease was
    /// lost (a long pause, a partition) the host joins again with a new one.
    pub async fn heartbeat(
        &mut self,
        store: &Store,
        report: &HostReport,
    ) -> Result<(), StoreError> {
        let body = serde_json::to_vec(report).expect("serialisable");
        match store.keep_alive(self.lease).await {
            Ok(()) => {}
            Err(StoreError::LeaseGone(_)) => {
                log::warn!("host {}: lease lost; joining again", report.id);
                self.lease = store.grant_lease(self.ttl).await?;
            }
            Err(e) => return Err(e),
        }
        store.put(&self.key, &body, Some(self.lease)).await?;
        Ok(())
    }

    /// Leaves at once (a clean shutdown), instead of after the TTL.
    pub async fn leave(self, store: &Store) -> Result<(), StoreError> {
        store.revoke(self.lease).await
    }
}

/// Every live host, by id.
pub async fn live_hosts(store: &Store) -> Result<Vec<HostReport>, StoreError> {
    Ok(store
        .list(HOSTS_PREFIX)
        .await?
        .into_iter()
        .filter_map(|(k, v)| match serde_json::from_slice(&v.value) {
            Ok(r) => Some(r),
            Err(e) => {
                log::warn!("ignoring unreadable host report {k}: {e}");
                None
            }
        })
        .collect())
}
