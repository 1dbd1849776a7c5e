//! Volume attachments through hostd: attach a volume to this host, detach
//! it, or move its attachment to another host. hostd asks the volume
//! service ([`crate::volumes::Volumes`]) and hands back the service's
//! answer (the fencing token and the URIs to open).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::parse;
use crate::daemon::Daemon;
use crate::volumes::{check_name, ServiceCall, VolumeError, Volumes};
use ember_lambda::error::ApiError;

type D = State<Arc<Daemon>>;

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct MoveInput {
    host: String,
}

/// This host's volumes, for a request about volume `name` (checked
/// first, as the service would).
fn volumes<'a>(d: &'a Daemon, name: &str) -> Result<&'a Volumes, ApiError> {
    check_name(name)?;
    Ok(d.volumes.as_deref().ok_or(VolumeError::NotConfigured)?)
}

/// The volume service's answer to `call`, passed through.
async fn relay(vs: &Volumes, name: &str, call: ServiceCall<'_>) -> Result<Response, ApiError> {
    let r = vs.relay(name, call).await?;
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY);
    Ok((status, [(header::CONTENT_TYPE, "application/json")], r.body).into_response())
}

/// `POST /ember/v1/volumes/{name}/attach`: to this host.
pub async fn attach(State(d): D, Path(name): Path<String>) -> Result<Response, ApiError> {
    relay(volumes(&d, &name)?, &name, ServiceCall::Attach).await
}

/// `POST /ember/v1/volumes/{name}/detach`.
pub async fn detach(State(d): D, Path(name): Path<String>) -> Result<Response, ApiError> {
    relay(volumes(&d, &name)?, &name, ServiceCall::Detach).await
}

/// `POST /ember/v1/volumes/{name}/move` with `{"Host": "other"}`: the
/// attachment goes to that host with a new token; this host's is stale.
pub async fn move_to(
    State(d): D,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let vs = volumes(&d, &name)?;
    let m: MoveInput = parse(&body)?;
    relay(vs, &name, ServiceCall::Move { host: &m.host }).await
}
