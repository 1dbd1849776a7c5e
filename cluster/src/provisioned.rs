//! Provisioned concurrency, kept placed by the leader: every function
//! qualifier with some has its version deployed on a live host with that
//! many instances kept warm there (the host's own provisioned concurrency).
//! When that host goes down (its lease ends), the next round finds no
//! live host holding it and places it on another.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::json;

use crate::deploy::{self, BuildState, Deployment};
use crate::functions::{self, deployment_name, Spec};
use crate::placement::place;
use crate::service::Cluster;
use ember_lambda::hosts::live_hosts;

/// How often the leader looks (it lists every function).
const EVERY: Duration = Duration::from_secs(2);

static LAST: Mutex<Option<Instant>> = Mutex::new(None);
/// Deployments being placed now (their builds take minutes).
static PLACING: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

pub async fn reconcile(c: &Arc<Cluster>) {
    {
        let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < EVERY) {
            return;
        }
        *last = Some(Instant::now());
    }
    let Ok(records) = functions::list(&c.store, None).await else {
        return;
    };
    // Deployment → (spec, instances): the most any qualifier asks.
    let mut want: BTreeMap<String, (Spec, u32)> = BTreeMap::new();
    for rec in &records {
        for (q, n) in &rec.provisioned {
            if let Some(v) = rec.resolve(Some(q)) {
                let name = deployment_name(&rec.account, &rec.name, &v.spec);
                let e = want.entry(name).or_insert((v.spec.clone(), 0));
                e.1 = e.1.max(*n);
            }
        }
    }
    if want.is_empty() {
        return;
    }
    let Ok(hosts) = live_hosts(&c.store).await else {
        return;
    };
    for (name, (spec, n)) in want {
        let Ok(deps) = deploy::placed(&c.store, &name).await else {
            continue;
        };
        let live: Vec<&Deployment> = deps
            .iter()
            .filter(|d| hosts.iter().any(|h| h.id == d.host))
            .collect();
        if live.iter().any(|d| d.provisioned == n)
            || !PLACING
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.clone())
        {
            continue;
        }
        let done = |name: &str| {
            PLACING
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(name);
        };
        // A live host that has it already, else the best other one.
        let host = live
            .iter()
            .find_map(|d| hosts.iter().find(|h| h.id == d.host))
            .cloned()
            .or_else(|| {
                place(&hosts, &name, "$LATEST")
                    .and_then(|p| hosts.iter().find(|h| h.id == p.host()).cloned())
            });
        let Some(host) = host else {
            log::warn!("provisioned concurrency for {name}: no host has room");
            done(&name);
            continue;
        };
        if !live.iter().any(|d| d.host == host.id) {
            log::info!(
                "placing provisioned concurrency {n} of {name} on {}",
                host.id
            );
            if let Err(e) = deploy::deploy(c, &host, &name, &spec).await {
                log::warn!("provisioned concurrency for {name} on {}: {e}", host.id);
                done(&name);
                continue;
            }
        }
        // Set once built (a host takes it only for a version it has).
        let c = c.clone();
        tokio::spawn(async move {
            set_on_host(&c, &host, &name, n).await;
            PLACING
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&name);
        });
    }
}

async fn set_on_host(c: &Cluster, host: &ember_lambda::hosts::HostReport, name: &str, n: u32) {
    if deploy::wait_built(c, &host.endpoint, name).await != Some(BuildState::Active) {
        return;
    }
    let path = format!("/2019-09-30/functions/{name}/provisioned-concurrency?Qualifier=%24LATEST");
    let body = json!({"ProvisionedConcurrentExecutions": n});
    match c
        .hosts
        .json(&host.endpoint, Method::PUT, &path, &body)
        .await
    {
        Ok(r) if r.status == StatusCode::ACCEPTED || r.status == StatusCode::OK => {
            let d = Deployment {
                host: host.id.clone(),
                provisioned: n,
            };
            if let Err(e) = deploy::record(&c.store, name, &d).await {
                log::warn!("recording provisioned concurrency of {name}: {e}");
            }
        }
        Ok(r) => log::warn!(
            "provisioned concurrency of {name} on {}: {}",
            host.id,
            deploy::host_error(&r)
        ),
        Err(e) => log::warn!("provisioned concurrency of {name} on {}: {e}", host.id),
    }
}
