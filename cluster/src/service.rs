//! One ember-cluster replica: its store, its client to the hosts, and its
//! background work (a lease of its own, the leader's campaign, and what
//! only the leader does: delivering async invocations and keeping
//! provisioned concurrency placed on live hosts).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ember_store::{Lease, Store, StoreError};
use tokio::sync::watch;

use crate::leader::Candidate;
use ember_lambda::host_client::HostClient;

#[derive(Debug, Clone)]
pub struct Config {
    pub replica_id: String,
    pub region: String,
    /// Leadership (and this replica's own lease) lasts this long unrenewed.
    pub leader_ttl: Duration,
    /// Delay before the first retry of a failed async invocation (doubles
    /// for the second).
    pub async_retry_delay: Duration,
    /// Bytes of request bodies held in memory at once, for all requests
    /// (at least one largest body, [`crate::api::MAX_CODE_BODY`]).
    pub body_budget: usize,
    /// Signatures the replay cache holds at most (0: no cache).
    pub replay_cache_entries: usize,
}

impl Config {
    /// Defaults for what the flags of `ember-cluster serve` leave out.
    pub const DEFAULT_BODY_BUDGET: usize = 160 << 20;
    pub const DEFAULT_REPLAY_CACHE_ENTRIES: usize = 400_000;
}

pub struct Cluster {
    pub store: Store,
    pub hosts: HostClient,
    pub cfg: Config,
    leading: AtomicBool,
    /// This replica's lease: what it holds (concurrency slots) goes with it.
    lease: Mutex<Option<Lease>>,
    pub(crate) delivering: Mutex<std::collections::HashSet<String>>,
    /// Room for request bodies in memory, in bytes ([`Config::body_budget`]).
    pub(crate) bodies: Arc<tokio::sync::Semaphore>,
    pub(crate) body_budget: usize,
    pub(crate) replay: crate::replay::ReplayCache,
}

impl Cluster {
    pub fn new(store: Store, hosts: HostClient, cfg: Config) -> Arc<Cluster> {
        let body_budget = cfg.body_budget.max(crate::api::MAX_CODE_BODY);
        Arc::new(Cluster {
            bodies: Arc::new(tokio::sync::Semaphore::new(body_budget)),
            body_budget,
            replay: crate::replay::ReplayCache::new(cfg.replay_cache_entries),
            store,
            hosts,
            cfg,
            leading: AtomicBool::new(false),
            lease: Mutex::new(None),
            delivering: Mutex::new(Default::default()),
        })
    }

    pub fn is_leader(&self) -> bool {
        self.leading.load(Ordering::Relaxed)
    }

    /// This replica's lease, granted on first use.
    pub async fn lease(&self) -> Result<Lease, StoreError> {
        if let Some(l) = *self.lease.lock().unwrap_or_else(|p| p.into_inner()) {
            return Ok(l);
        }
        let l = self.store.grant_lease(self.cfg.leader_ttl).await?;
        *self.lease.lock().unwrap_or_else(|p| p.into_inner()) = Some(l);
        Ok(l)
    }

    async fn keep_lease(&self) {
        let cur = *self.lease.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = cur {
            if let Err(e) = self.store.keep_alive(l).await {
                log::warn!("replica lease: {e}; a new one on next use");
                *self.lease.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
        }
    }

    /// Campaigns, keeps the lease, and does the leader's work, until `stop`.
    pub async fn run_background(self: Arc<Cluster>, mut stop: watch::Receiver<bool>) {
        let mut candidate = Candidate::new(&self.cfg.replica_id, self.cfg.leader_ttl);
        let every = self.cfg.leader_ttl / 3;
        let mut next_campaign = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => break,
            }
            if tokio::time::Instant::now() >= next_campaign {
                next_campaign = tokio::time::Instant::now() + every;
                self.keep_lease().await;
                let was = self.is_leader();
                let now = match candidate.campaign(&self.store).await {
                    Ok(l) => l,
                    Err(e) => {
                        log::warn!("leader campaign: {e}");
                        false
                    }
                };
                self.leading.store(now, Ordering::Relaxed);
                if now != was {
                    log::info!(
                        "replica {} {} the leader",
                        self.cfg.replica_id,
                        if now { "is now" } else { "is no longer" }
                    );
                }
            }
            if self.is_leader() {
                crate::queue::deliver_due(&self).await;
                crate::provisioned::reconcile(&self).await;
            }
        }
        self.leading.store(false, Ordering::Relaxed);
        let _ = candidate.resign(&self.store).await;
        let lease = self.lease.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(l) = lease {
            let _ = self.store.revoke(l).await;
        }
    }
}
