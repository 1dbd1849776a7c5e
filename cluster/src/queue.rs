//! Async (`Event`) invocations, kept by the cluster: accepted into the
//! store before the 202 (`/ember/async/queued/<account>/<id>`), delivered
//! by the leader through the same path as synchronous ones, retried twice
//! on failure as Lambda does, and their outcome kept under
//! `/ember/async/done/`. The cluster keeps them rather than forwarding to
//! a host, so an event outlives the host it would have run on; delivery
//! is at least once (a new leader retries what the old one had in flight).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ember_store::{Expect, Store};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::functions;
use crate::service::Cluster;

pub const QUEUED_PREFIX: &str = "/ember/async/queued/";
pub const DONE_PREFIX: &str = "/ember/async/done/";
/// Lambda's limit for an async payload.
pub const MAX_ASYNC_PAYLOAD: usize = 256 * 1024;
/// First try and two retries.
const MAX_ATTEMPTS: u32 = 3;
/// Deliveries running at once on the leader.
const PARALLEL: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Queued,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AsyncInvocation {
    pub request_id: String,
    pub account: String,
    pub function_name: String,
    pub qualifier: Option<String>,
    pub payload: String,
    pub status: Status,
    pub attempts: u32,
    /// Not before this (ms since the epoch): the retry delay.
    pub not_before_ms: u64,
    #[serde(default)]
    pub executed_version: Option<String>,
    #[serde(default)]
    pub function_error: Option<String>,
    /// The last answer (the function's payload or the error).
    #[serde(default)]
    pub response: Option<String>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn store_err(e: ember_store::StoreError) -> ApiError {
    ApiError::service(format!("cluster store: {e}"))
}

fn queued_key(account: &str, id: &str) -> String {
    format!("{QUEUED_PREFIX}{account}/{id}")
}

fn done_key(account: &str, id: &str) -> String {
    format!("{DONE_PREFIX}{account}/{id}")
}

pub async fn enqueue(store: &Store, inv: &AsyncInvocation) -> Result<(), ApiError> {
    let body = serde_json::to_vec(inv).expect("serialisable");
    store
        .compare_and_swap(
            &queued_key(&inv.account, &inv.request_id),
            Expect::Absent,
            &body,
            None,
        )
        .await
        .map_err(store_err)?
        .ok_or_else(|| ApiError::conflict("request id already queued"))?;
    Ok(())
}

/// The invocation, queued or done, if it is the account's.
pub async fn get(store: &Store, account: &str, id: &str) -> Result<AsyncInvocation, ApiError> {
    for k in [done_key(account, id), queued_key(account, id)] {
        if let Some(v) = store.get(&k).await.map_err(store_err)? {
            if let Ok(inv) = serde_json::from_slice(&v.value) {
                return Ok(inv);
            }
        }
    }
    Err(ApiError::not_found(format!(
        "async invocation {id} not found"
    )))
}

/// Starts delivering every queued invocation that is due (leader only).
pub async fn deliver_due(c: &Arc<Cluster>) {
    let queued = match c.store.list(QUEUED_PREFIX).await {
        Ok(q) => q,
        Err(e) => {
            log::warn!("async queue: {e}");
            return;
        }
    };
    let now = now_ms();
    for (key, v) in queued {
        let Ok(inv) = serde_json::from_slice::<AsyncInvocation>(&v.value) else {
            continue;
        };
        if inv.not_before_ms > now {
            continue;
        }
        {
            let mut busy = c.delivering.lock().unwrap_or_else(|p| p.into_inner());
            if busy.len() >= PARALLEL || !busy.insert(key.clone()) {
                continue;
            }
        }
        let c = c.clone();
        tokio::spawn(async move {
            deliver(&c, inv, v.version).await;
            c.delivering
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
        });
    }
}

async fn deliver(c: &Arc<Cluster>, mut inv: AsyncInvocation, version: i64) {
    inv.attempts += 1;
    let outcome = async {
        let rec = functions::get(&c.store, &inv.account, &inv.function_name).await?;
        let v = rec
            .route(inv.qualifier.as_deref(), crate::invoke::roll())
            .cloned()
            .ok_or_else(|| ApiError::not_found("the function's qualifier is gone"))?;
        let r = crate::invoke::run(c, &rec, &v, inv.payload.clone().into(), false).await?;
        Ok::<_, ApiError>((v.version, r))
    }
    .await;
    let retry = match outcome {
        Ok((version, r)) => {
            inv.executed_version = Some(version);
            inv.response = Some(String::from_utf8_lossy(&r.body).into_owned());
            inv.function_error = r
                .headers
                .get("x-amz-function-error")
                .and_then(|h| h.to_str().ok())
                .map(str::to_string);
            if r.status.is_success() && inv.function_error.is_none() {
                inv.status = Status::Succeeded;
                false
            } else {
                true
            }
        }
        // Gone: nothing to retry.
        Err(e) if e.status == 404 => {
            inv.response = Some(e.message);
            inv.status = Status::Failed;
            false
        }
        Err(e) => {
            // A throttle is not the function's failure: it does not count.
            if e.status == 429 {
                inv.attempts -= 1;
            }
            inv.response = Some(format!("{}: {}", e.kind, e.message));
            true
        }
    };
    if retry && inv.attempts < MAX_ATTEMPTS {
        let delay = c.cfg.async_retry_delay * inv.attempts.max(1);
        inv.not_before_ms = now_ms() + delay.as_millis() as u64;
        let body = serde_json::to_vec(&inv).expect("serialisable");
        let k = queued_key(&inv.account, &inv.request_id);
        if let Err(e) = c
            .store
            .compare_and_swap(&k, Expect::Version(version), &body, None)
            .await
        {
            log::warn!("async {}: {e}", inv.request_id);
        }
        return;
    }
    if retry {
        inv.status = Status::Failed;
    }
    let body = serde_json::to_vec(&inv).expect("serialisable");
    // Outcome first, then out of the queue: a crash between the two
    // delivers again rather than losing the event.
    let done = c
        .store
        .put(&done_key(&inv.account, &inv.request_id), &body, None)
        .await;
    match done {
        Ok(_) => {
            let k = queued_key(&inv.account, &inv.request_id);
            let _ = c
                .store
                .compare_and_delete(&k, Expect::Version(version))
                .await;
        }
        Err(e) => log::warn!("async {}: {e}", inv.request_id),
    }
}
