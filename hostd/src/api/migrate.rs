//! Migrations: an instance to another host, a whole host drained, and
//! the destination's side that the source host calls (over TCP, with the
//! hosts' token).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::parse;
use crate::daemon::Daemon;
use crate::migrate::incoming::{self, IncomingRequest};
use crate::migrate::outgoing::{self, MigrateInput};
use ember_lambda::error::ApiError;

type D = State<Arc<Daemon>>;

/// `POST /ember/v1/instances/{id}/migrate {"Destination", "DowntimeMs"}`.
pub async fn migrate(
    State(d): D,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let input: MigrateInput = parse(&body)?;
    let r = outgoing::migrate_instance(&d, &id, &input).await?;
    Ok(Json(r).into_response())
}

/// `DELETE /ember/v1/instances/{id}/migrate`: cancels a migration before
/// its switch-over; the instance runs on here (the migration's caller
/// gets its error).
pub async fn cancel(State(d): D, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    let inst = d
        .pools
        .migrating(&id)
        .ok_or_else(|| ApiError::not_found(format!("instance {id} is not migrating")))?;
    inst.cancel_migration().await.map_err(|e| {
        ApiError::conflict(format!(
            "the migration of {id} cannot be cancelled (past its switch-over?): {e}"
        ))
    })?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /ember/v1/drain {"Destination", "DowntimeMs"}`.
pub async fn drain(State(d): D, body: Bytes) -> Result<Response, ApiError> {
    let input: MigrateInput = parse(&body)?;
    let r = outgoing::drain(&d, &input).await?;
    Ok(Json(r).into_response())
}

/// `GET /ember/v1/drain`: whether this host is draining.
pub async fn draining(State(d): D) -> Json<serde_json::Value> {
    Json(json!({"Draining": d.is_draining()}))
}

/// `DELETE /ember/v1/drain`: pools are warmed here again.
pub async fn undrain(State(d): D) -> StatusCode {
    d.set_draining(false);
    StatusCode::NO_CONTENT
}

/// `POST /ember/v1/migrations`: prepare to receive an instance.
pub async fn prepare(State(d): D, body: Bytes) -> Result<Response, ApiError> {
    let req: IncomingRequest = parse(&body)?;
    let a = incoming::prepare(&d, req).await?;
    Ok((StatusCode::CREATED, Json(a)).into_response())
}

/// `POST /ember/v1/migrations/{id}/switch-over`: the source paused the VM
/// and moved its volume here; answers the URI for the VM's drive.
pub async fn switch_over(State(d): D, Path(id): Path<String>) -> Result<Response, ApiError> {
    let a = incoming::switch_over(&d, &id).await?;
    Ok(Json(a).into_response())
}

/// `GET /ember/v1/migrations`.
pub async fn list(State(d): D) -> Json<serde_json::Value> {
    Json(json!({"Migrations": d.incoming.list()}))
}

/// `GET /ember/v1/migrations/{id}`.
pub async fn get(State(d): D, Path(id): Path<String>) -> Result<Response, ApiError> {
    d.incoming
        .get(&id)
        .map(|s| Json(s).into_response())
        .ok_or_else(|| ApiError::not_found(format!("no migration {id} to this host")))
}

/// `DELETE /ember/v1/migrations/{id}`: the source gave up; a migration
/// still receiving ends and its VMM goes.
pub async fn abort(State(d): D, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    match d.incoming.get(&id) {
        None => Err(ApiError::not_found(format!(
            "no migration {id} to this host"
        ))),
        Some(_) if d.incoming.abort(&id) => Ok(StatusCode::NO_CONTENT),
        Some(s) => Err(ApiError::conflict(format!(
            "migration {id} is {:?}, no longer receiving",
            s.state
        ))),
    }
}
