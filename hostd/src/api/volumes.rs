//! Volume attachments through hostd: attach a volume to this host, detach
//! it, or move its attachment to another host. hostd asks the volume
//! service (`--volume-service`), naming itself by `--host-id`, and hands
//! back the service's answer (the fencing token and the URIs to open).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::parse;
use crate::daemon::Daemon;
use crate::vm::api_client::raw_request;
use ember_lambda::error::ApiError;

type D = State<Arc<Daemon>>;

/// Where the volume service is and who this host is to it.
#[derive(Debug, Clone)]
pub struct VolumeService {
    pub socket: std::path::PathBuf,
    pub host_id: String,
    /// This host's account: named when it attaches or moves a volume, so
    /// the volume service refuses a volume of another account.
    pub account: String,
    /// This host's TLS identity (with `--listen-tcp`): NBD to a volume
    /// service across hosts (`nbds://`) runs inside mutual TLS with it.
    pub tls: Option<ember_tls::Tls>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct MoveInput {
    host: String,
}

fn service(d: &Daemon) -> Result<&VolumeService, ApiError> {
    d.cfg.volumes.as_ref().ok_or_else(|| {
        ApiError::invalid("this host has no volume service configured (--volume-service)")
    })
}

fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!("invalid volume name {name:?}")))
    }
}

/// One call to the volume service, its answer passed through.
async fn forward(
    vs: &VolumeService,
    uri: &str,
    body: serde_json::Value,
) -> Result<Response, ApiError> {
    let r = raw_request(
        &vs.socket,
        "POST",
        uri,
        &[("Content-Type", "application/json")],
        body.to_string().into_bytes(),
    )
    .await
    .map_err(|e| ApiError::service(format!("the volume service: {e}")))?;
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY);
    Ok((status, [(header::CONTENT_TYPE, "application/json")], r.body).into_response())
}

/// `POST /ember/v1/volumes/{name}/attach`: to this host.
pub async fn attach(State(d): D, Path(name): Path<String>) -> Result<Response, ApiError> {
    check_name(&name)?;
    let vs = service(&d)?;
    forward(
        vs,
        &format!("/v1/volumes/{name}/attach"),
        json!({"Host": vs.host_id, "Account": vs.account}),
    )
    .await
}

/// `POST /ember/v1/volumes/{name}/detach`.
pub async fn detach(State(d): D, Path(name): Path<String>) -> Result<Response, ApiError> {
    check_name(&name)?;
    let vs = service(&d)?;
    forward(vs, &format!("/v1/volumes/{name}/detach"), json!({})).await
}

/// `POST /ember/v1/volumes/{name}/move` with `{"Host": "other"}`: the
/// attachment goes to that host with a new token; this host's is stale.
pub async fn move_to(
    State(d): D,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_name(&name)?;
    let vs = service(&d)?;
    let m: MoveInput = parse(&body)?;
    forward(
        vs,
        &format!("/v1/volumes/{name}/move"),
        json!({"Host": m.host, "Account": vs.account}),
    )
    .await
}
