//! Invocations, proxied: the cluster picks the host and relays the
//! request and the answer. (Handing the client a host's address instead
//! would need clients that follow it; unmodified AWS SDKs and the CLI do
//! not, and hosts would have to check SigV4 themselves.) A version goes
//! to a host that has it deployed: one with an idle warm instance first,
//! else the one with the most free capacity; when no live host has it, it
//! is deployed on the host with the most free capacity, and the
//! invocation waits for that snapshot.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::{Method, StatusCode};

use crate::deploy::{self, BuildState};
use crate::functions::{deployment_name, FunctionRecord, Version};
use crate::placement::place;
use crate::service::Cluster;
use ember_lambda::error::ApiError;
use ember_lambda::host_client::{HostError, HostReply};
use ember_lambda::hosts::{live_hosts, HostReport};

/// `candidates` in the order placement prefers them.
fn by_preference(candidates: &[HostReport], name: &str) -> Vec<HostReport> {
    let mut left: Vec<HostReport> = candidates.to_vec();
    let mut out = Vec::new();
    while !left.is_empty() {
        let i = match place(&left, name, "$LATEST") {
            Some(p) => left.iter().position(|h| h.id == p.host()).unwrap_or(0),
            // Reports say full; they may be stale: try the least loaded.
            None => (0..left.len())
                .min_by_key(|&i| (left[i].running, left[i].id.clone()))
                .unwrap_or(0),
        };
        out.push(left.remove(i));
    }
    out
}

/// A rough uniform number in [0, 1) for weighted alias routing.
pub fn roll() -> f64 {
    let b = uuid::Uuid::new_v4().as_u64_pair().0;
    (b >> 11) as f64 / (1u64 << 53) as f64
}

/// Runs `v` of `rec` synchronously somewhere and returns the host's answer.
pub async fn run(
    c: &Arc<Cluster>,
    rec: &FunctionRecord,
    v: &Version,
    payload: Bytes,
    log_tail: bool,
) -> Result<HostReply, ApiError> {
    let _slot = crate::concurrency::acquire(c, rec).await?;
    let name = deployment_name(&rec.account, &rec.name, &v.spec);
    let mut tried: HashSet<String> = HashSet::new();
    let mut throttled = false;
    let store_err = |e: ember_store::StoreError| ApiError::service(format!("cluster store: {e}"));
    loop {
        let hosts = live_hosts(&c.store).await.map_err(store_err)?;
        if hosts.is_empty() {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceException",
                "no host is available to run the function",
            ));
        }
        let placed: HashSet<String> = deploy::placed(&c.store, &name)
            .await?
            .into_iter()
            .map(|d| d.host)
            .collect();
        let with_it: Vec<HostReport> = hosts
            .iter()
            .filter(|h| placed.contains(&h.id) && !tried.contains(&h.id))
            .cloned()
            .collect();
        let host = if let Some(h) = by_preference(&with_it, &name).into_iter().next() {
            h
        } else if throttled {
            // Every host with it is busy: build it on one more host for the
            // next invocations, and say so to this one.
            scale_out(c, &hosts, &placed, &name, v);
            return Err(ApiError::throttled("Rate Exceeded."));
        } else {
            let fresh: Vec<HostReport> = hosts
                .iter()
                .filter(|h| !tried.contains(&h.id))
                .cloned()
                .collect();
            let Some(h) = by_preference(&fresh, &name).into_iter().next() else {
                return Err(ApiError::service("no host could run the function"));
            };
            deploy::deploy(c, &h, &name, &v.spec).await?;
            h
        };
        tried.insert(host.id.clone());
        match deploy::wait_built(c, &host.endpoint, &name).await {
            Some(BuildState::Active) => {}
            Some(BuildState::Missing) => {
                deploy::forget(&c.store, &name, &host.id).await?;
                tried.remove(&host.id);
                continue;
            }
            Some(BuildState::Failed(reason)) => {
                return Err(ApiError::conflict(format!(
                    "The operation cannot be performed at this time. The function is currently in the following state: Failed. {reason}"
                )))
            }
            Some(BuildState::InProgress) | None => continue,
        }
        let mut headers = vec![("x-amz-invocation-type", "RequestResponse".to_string())];
        if log_tail {
            headers.push(("x-amz-log-type", "Tail".to_string()));
        }
        let timeout = Duration::from_secs(u64::from(v.spec.timeout) + 300);
        let path = format!("/2015-03-31/functions/{name}/invocations");
        match c
            .hosts
            .call(
                &host.endpoint,
                Method::POST,
                &path,
                &headers,
                payload.clone(),
                timeout,
            )
            .await
        {
            Ok(r) if r.status == StatusCode::TOO_MANY_REQUESTS => throttled = true,
            Ok(r)
                if r.status == StatusCode::NOT_FOUND
                    && r.error_type() == Some("ResourceNotFoundException") =>
            {
                deploy::forget(&c.store, &name, &host.id).await?;
            }
            Ok(r) => return Ok(r),
            Err(HostError::Connect(e)) => log::warn!("invoke {name}: {e}; trying another host"),
            Err(e @ HostError::Failed(_)) => return Err(ApiError::service(e.to_string())),
        }
    }
}

/// Deploys `name` on the best host that lacks it, in the background.
fn scale_out(
    c: &Arc<Cluster>,
    hosts: &[HostReport],
    placed: &HashSet<String>,
    name: &str,
    v: &Version,
) {
    let others: Vec<HostReport> = hosts
        .iter()
        .filter(|h| !placed.contains(&h.id) && h.free() > 0)
        .cloned()
        .collect();
    let Some(h) = by_preference(&others, name).into_iter().next() else {
        return;
    };
    let c = c.clone();
    let (name, spec) = (name.to_string(), v.spec.clone());
    tokio::spawn(async move {
        if let Err(e) = deploy::deploy(&c, &h, &name, &spec).await {
            log::warn!("scaling {name} out to {}: {e}", h.id);
        }
    });
}
