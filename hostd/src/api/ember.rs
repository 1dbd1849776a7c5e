//! Ember's own endpoints: health, pools, async outcomes, logs.

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::function_ref;
use crate::daemon::Daemon;
use crate::queue::AsyncInvocation;
use ember_lambda::error::ApiError;

type D = State<Arc<Daemon>>;

pub async fn health(State(d): D) -> Json<serde_json::Value> {
    Json(json!({
        "Status": "ok",
        "Version": env!("CARGO_PKG_VERSION"),
        "Functions": d.functions.list().len(),
        "Jailed": d.cfg.launch.jail.is_some(),
        "Draining": d.is_draining(),
    }))
}

pub async fn pools(State(d): D) -> Json<serde_json::Value> {
    Json(json!({"Pools": d.pools.stats()}))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AsyncQuery {
    pub function_name: Option<String>,
}

pub async fn list_async(State(d): D, Query(q): Query<AsyncQuery>) -> Json<serde_json::Value> {
    Json(json!({"Invocations": d.queue.list(q.function_name.as_deref())}))
}

pub async fn get_async(
    State(d): D,
    Path(id): Path<String>,
) -> Result<Json<AsyncInvocation>, ApiError> {
    d.queue
        .get(&id)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no async invocation {id}")))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct LogQuery {
    /// Bytes from the end (default 64 KiB).
    pub tail: Option<u64>,
}

pub async fn logs(
    State(d): D,
    Path(name): Path<String>,
    Query(q): Query<LogQuery>,
) -> Result<String, ApiError> {
    let (name, _) = function_ref(&d, &name)?;
    d.functions.get(&name)?;
    let want = q.tail.unwrap_or(64 * 1024).min(16 << 20);
    let path = d.store.log_path(&name);
    let Ok(mut f) = std::fs::File::open(&path) else {
        return Ok(String::new());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(want)));
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)
        .map_err(|e| ApiError::service(format!("reading the log: {e}")))?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}
