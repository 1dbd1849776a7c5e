//! Reserved concurrency across the cluster: a function with N reserved
//! has N slots, `/ember/concurrency/<account>/<function>/<i>`; a running
//! invocation holds one (created only if absent, under its replica's
//! lease, so a replica that dies frees its slots), whichever replica took
//! it. None free: 429, as Lambda answers.

use std::sync::Arc;

use ember_store::{Expect, Store};

use crate::functions::FunctionRecord;
use crate::service::Cluster;
use ember_lambda::error::ApiError;

pub const CONCURRENCY_PREFIX: &str = "/ember/concurrency/";

/// A held slot, given back when dropped (also when the invocation's
/// future is dropped because its client hung up).
pub struct Slot {
    cluster: Arc<Cluster>,
    key: String,
    version: i64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let (c, key, version) = (
            self.cluster.clone(),
            std::mem::take(&mut self.key),
            self.version,
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = release(&c.store, &key, version).await;
            });
        }
    }
}

async fn release(store: &Store, key: &str, version: i64) -> Result<bool, ember_store::StoreError> {
    store
        .compare_and_delete(key, Expect::Version(version))
        .await
}

/// A slot for one invocation of `rec`, or `None` when it has no reserved
/// concurrency (no limit but the hosts').
pub async fn acquire(c: &Arc<Cluster>, rec: &FunctionRecord) -> Result<Option<Slot>, ApiError> {
    let Some(n) = rec.reserved_concurrency else {
        return Ok(None);
    };
    let throttled = || {
        ApiError::throttled(format!(
            "Rate Exceeded. (reserved concurrency of {} is {n})",
            rec.name
        ))
    };
    if n == 0 {
        return Err(throttled());
    }
    let lease = c
        .lease()
        .await
        .map_err(|e| ApiError::service(format!("cluster store: {e}")))?;
    // Start anywhere, so invocations do not all contend for slot 0.
    let start = (crate::invoke::roll() * f64::from(n)) as u32;
    for i in 0..n {
        let key = format!(
            "{CONCURRENCY_PREFIX}{}/{}/{}",
            rec.account,
            rec.name,
            (start + i) % n
        );
        let taken = c
            .store
            .compare_and_swap(
                &key,
                Expect::Absent,
                c.cfg.replica_id.as_bytes(),
                Some(lease),
            )
            .await
            .map_err(|e| ApiError::service(format!("cluster store: {e}")))?;
        if let Some(version) = taken {
            return Ok(Some(Slot {
                cluster: c.clone(),
                key,
                version,
            }));
        }
    }
    Err(throttled())
}
