//! Taking part in a cluster: this host's membership in the cluster store
//! (a report under a lease, renewed by heartbeats, so the cluster marks
//! the host down by itself when they stop), and the token that guards the
//! API when it is served over TCP for the cluster.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ember_lambda::hosts::{HostReport, Membership};
use ember_store::Store;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::daemon::Daemon;
use ember_lambda::error::ApiError;

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub etcd: Vec<String>,
    pub host_id: String,
    /// Where the cluster reaches this host's API.
    pub endpoint: String,
    /// Invocations this host takes at once, all functions together.
    pub capacity: u32,
    /// The membership lease: the host is down this long after its last
    /// heartbeat.
    pub ttl: Duration,
}

/// This host's report, from its pools.
pub fn report(d: &Daemon, cfg: &ClusterConfig) -> HostReport {
    let mut warm_idle = BTreeMap::new();
    let mut running = 0u32;
    for p in d.pools.stats() {
        running += p.busy.len() as u32;
        if !p.idle.is_empty() {
            warm_idle.insert(
                format!("{}:{}", p.function_name, p.version),
                p.idle.len() as u32,
            );
        }
    }
    HostReport {
        id: cfg.host_id.clone(),
        endpoint: cfg.endpoint.clone(),
        capacity: cfg.capacity,
        running,
        warm_idle,
    }
}

/// Joins the cluster and heartbeats until `stop` says so, then leaves.
/// A store that cannot be reached is retried; the host serves meanwhile.
pub async fn run_membership(d: Arc<Daemon>, cfg: ClusterConfig, mut stop: watch::Receiver<bool>) {
    let every = cfg.ttl / 3;
    let mut backoff = Duration::from_millis(200);
    let dir = std::env::temp_dir();
    'connect: loop {
        if *stop.borrow() {
            return;
        }
        let joined = async {
            let store = Store::open(&cfg.etcd, &dir).await?;
            let m = Membership::join(&store, &report(&d, &cfg), cfg.ttl).await?;
            Ok::<_, ember_store::StoreError>((store, m))
        }
        .await;
        let (store, mut member) = match joined {
            Ok(j) => j,
            Err(e) => {
                log::warn!("cluster store: {e}; retrying in {backoff:?}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue 'connect;
            }
        };
        log::info!("joined the cluster as {} ({})", cfg.host_id, cfg.endpoint);
        backoff = Duration::from_millis(200);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => {
                    if let Err(e) = member.leave(&store).await {
                        log::warn!("leaving the cluster: {e}");
                    }
                    return;
                }
            }
            if let Err(e) = member.heartbeat(&store, &report(&d, &cfg)).await {
                log::warn!("cluster heartbeat: {e}; reconnecting");
                continue 'connect;
            }
        }
    }
}

/// Requests over TCP must carry `Authorization: Bearer <token>`.
pub async fn require_token(
    State(token_hash): State<Arc<[u8; 32]>>,
    req: Request,
    next: Next,
) -> Response {
    let given = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| Sha256::digest(t.trim().as_bytes()));
    // Comparing digests: equal length, and nothing learnt from timing
    // about the token itself.
    match given {
        Some(g) if g.as_slice() == token_hash.as_slice() => next.run(req).await,
        _ => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "UnrecognizedClientException",
            "missing or wrong API token",
        )
        .into_response(),
    }
}

pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.trim().as_bytes()).into()
}
