//! Deployments: a function version made runnable on a host. The cluster
//! creates it there as a function of the host's own (named by
//! [`deployment_name`](crate::functions::deployment_name)), whose `$LATEST`
//! the host snapshots once; `/ember/deployments/<name>/<host>` says it is
//! there. Hosts get a deployment lazily (the first invocation that finds
//! none, or the leader placing provisioned concurrency), so a version is
//! built on one host, not on every host.

use std::time::{Duration, Instant};

use base64::Engine;
use ember_store::Store;
use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};

use crate::functions::Spec;
use crate::service::Cluster;
use ember_lambda::error::ApiError;
use ember_lambda::host_client::HostReply;
use ember_lambda::hosts::HostReport;
use ember_lambda::shapes::{CreateFunction, Environment, FunctionCode};

pub const DEPLOYMENTS_PREFIX: &str = "/ember/deployments/";
/// The longest a host's snapshot build is waited for (a Python runtime's
/// first boot and init take minutes on nested KVM).
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Deployment {
    pub host: String,
    /// Provisioned concurrency the leader set on that host.
    #[serde(default)]
    pub provisioned: u32,
}

fn key(name: &str, host: &str) -> String {
    format!("{DEPLOYMENTS_PREFIX}{name}/{host}")
}

fn store_err(e: ember_store::StoreError) -> ApiError {
    ApiError::service(format!("cluster store: {e}"))
}

/// Hosts that have the deployment (live or not).
pub async fn placed(store: &Store, name: &str) -> Result<Vec<Deployment>, ApiError> {
    Ok(store
        .list(&format!("{DEPLOYMENTS_PREFIX}{name}/"))
        .await
        .map_err(store_err)?
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice(&v.value).ok())
        .collect())
}

pub async fn record(store: &Store, name: &str, d: &Deployment) -> Result<(), ApiError> {
    let body = serde_json::to_vec(d).expect("serialisable");
    store
        .put(&key(name, &d.host), &body, None)
        .await
        .map_err(store_err)?;
    Ok(())
}

pub async fn forget(store: &Store, name: &str, host: &str) -> Result<(), ApiError> {
    let k = key(name, host);
    if let Some(v) = store.get(&k).await.map_err(store_err)? {
        store
            .compare_and_delete(&k, ember_store::Expect::Version(v.version))
            .await
            .map_err(store_err)?;
    }
    Ok(())
}

/// An error a host answered with, passed on with its type when it is one
/// of Lambda's.
pub fn host_error(r: &HostReply) -> ApiError {
    const KNOWN: &[&str] = &[
        "InvalidParameterValueException",
        "InvalidRequestContentException",
        "ResourceNotFoundException",
        "ResourceConflictException",
        "RequestTooLargeException",
        "TooManyRequestsException",
        "ServiceException",
    ];
    let kind = r
        .error_type()
        .and_then(|t| KNOWN.iter().find(|k| **k == t).copied())
        .unwrap_or("ServiceException");
    let msg = r
        .json()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&r.body).into_owned());
    ApiError::new(r.status, kind, msg)
}

/// Creates the deployment on `host` (done already is fine) and records it.
pub async fn deploy(
    c: &Cluster,
    host: &HostReport,
    name: &str,
    spec: &Spec,
) -> Result<(), ApiError> {
    let zip = crate::code::get(&c.store, &spec.code_sha256)
        .await
        .map_err(store_err)?
        .ok_or_else(|| ApiError::service(format!("code {} is missing", spec.code_sha256)))?;
    let body = CreateFunction {
        function_name: Some(name.to_string()),
        runtime: Some(spec.runtime.clone()),
        handler: Some(spec.handler.clone()),
        memory_size: Some(spec.memory_size),
        timeout: Some(spec.timeout),
        environment: Some(Environment {
            variables: Some(spec.environment.clone()),
        }),
        code: Some(FunctionCode {
            zip_file: Some(base64::engine::general_purpose::STANDARD.encode(&zip)),
        }),
        ..Default::default()
    };
    log::info!("deploying {name} to host {}", host.id);
    let r = c
        .hosts
        .json(&host.endpoint, Method::POST, "/2015-03-31/functions", &body)
        .await
        .map_err(|e| ApiError::service(format!("host {}: {e}", host.id)))?;
    if r.status != StatusCode::CREATED && r.status != StatusCode::CONFLICT {
        return Err(host_error(&r));
    }
    record(
        &c.store,
        name,
        &Deployment {
            host: host.id.clone(),
            provisioned: 0,
        },
    )
    .await
}

/// What a host says of a deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildState {
    Active,
    InProgress,
    Failed(String),
    /// The host does not have it (restarted on fresh state, or deleted).
    Missing,
}

/// The deployment's state on a host; `None` when the host cannot be asked.
pub async fn build_state(c: &Cluster, endpoint: &str, name: &str) -> Option<BuildState> {
    let r = c
        .hosts
        .get(
            endpoint,
            &format!("/2015-03-31/functions/{name}/configuration"),
        )
        .await
        .ok()?;
    if r.status == StatusCode::NOT_FOUND {
        return Some(BuildState::Missing);
    }
    let v = r.json()?;
    Some(
        match (v["State"].as_str(), v["LastUpdateStatus"].as_str()) {
            (_, Some("InProgress")) | (Some("Pending"), _) => BuildState::InProgress,
            (Some("Active"), _) => BuildState::Active,
            _ => BuildState::Failed(
                v["StateReason"]
                    .as_str()
                    .unwrap_or("the snapshot build failed")
                    .to_string(),
            ),
        },
    )
}

/// Waits for the host's snapshot of the deployment.
pub async fn wait_built(c: &Cluster, endpoint: &str, name: &str) -> Option<BuildState> {
    let start = Instant::now();
    loop {
        match build_state(c, endpoint, name).await? {
            BuildState::InProgress if start.elapsed() < BUILD_TIMEOUT => {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            BuildState::InProgress => {
                return Some(BuildState::Failed(format!(
                    "not built within {BUILD_TIMEOUT:?}"
                )))
            }
            s => return Some(s),
        }
    }
}

/// Removes deployments nothing uses any more, from their hosts and the
/// store (best effort: a host that is down keeps its copy until it is
/// cleaned by hand or its state is reset).
pub async fn retire(c: &Cluster, names: Vec<String>) {
    let hosts = ember_lambda::hosts::live_hosts(&c.store)
        .await
        .unwrap_or_default();
    for name in names {
        let Ok(deps) = placed(&c.store, &name).await else {
            continue;
        };
        for d in deps {
            if let Some(h) = hosts.iter().find(|h| h.id == d.host) {
                let path = format!("/2015-03-31/functions/{name}");
                let r = c
                    .hosts
                    .call(
                        &h.endpoint,
                        Method::DELETE,
                        &path,
                        &[],
                        bytes::Bytes::new(),
                        Duration::from_secs(60),
                    )
                    .await;
                if let Err(e) = r {
                    log::warn!("retiring {name} on {}: {e}", h.id);
                }
            }
            let _ = forget(&c.store, &name, &d.host).await;
        }
    }
}
