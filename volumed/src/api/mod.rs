//! The volume service's HTTP API (JSON): volumes, and attachments with
//! their fencing tokens. hostd calls it to attach a volume before a VMM
//! opens it and to move the attachment when an instance migrates.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::registry::{export_name, Registry, RegistryError};
use crate::store::{Attachment, VolumeRecord};
use crate::vhost_user::VhostUserServer;

mod live;

/// What the API needs besides the registry: where clients reach the
/// NBD server, for the URIs it hands out.
pub struct Service {
    pub registry: Arc<Registry>,
    /// `host:port` of the NBD TCP listener, if any.
    pub nbd_tcp: Option<String>,
    /// The TLS identity: the NBD TCP listener requires TLS (its URIs are
    /// `nbds://`), and this service presents it when it copies a volume
    /// to another's `nbds://` port.
    pub nbd_tls: Option<ember_tls::Tls>,
    /// Path of the NBD unix socket, if any.
    pub nbd_unix: Option<String>,
    /// The per-attachment vhost-user-blk sockets, if served.
    pub vhost_user: Option<Arc<VhostUserServer>>,
}

pub struct ApiError(StatusCode, String, String);

impl ApiError {
    fn new(status: StatusCode, kind: &str, msg: impl Into<String>) -> ApiError {
        ApiError(status, kind.into(), msg.into())
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let (status, kind) = match &e {
            RegistryError::NotFound(_) => (StatusCode::NOT_FOUND, "NotFound"),
            RegistryError::Exists(_) | RegistryError::Attached { .. } | RegistryError::Owned(_) => {
                (StatusCode::CONFLICT, "Conflict")
            }
            RegistryError::NotAuthorised => (StatusCode::FORBIDDEN, "NotAuthorised"),
            RegistryError::NotAttached(_) | RegistryError::Moved { .. } => {
                (StatusCode::CONFLICT, "Conflict")
            }
            RegistryError::Name(_)
            | RegistryError::Size(_)
            | RegistryError::Shrink { .. }
            | RegistryError::Account(_) => (StatusCode::BAD_REQUEST, "InvalidParameter"),
            RegistryError::Io(_) => (StatusCode::INTERNAL_SERVER_ERROR, "StorageError"),
        };
        ApiError(status, kind.into(), e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"Type": self.1, "Message": self.2}))).into_response()
    }
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "InvalidRequest".into(),
            format!("could not parse the request body: {e}"),
        )
    })
}

type S = State<Arc<Service>>;

pub fn router(svc: Arc<Service>) -> Router {
    Router::new()
        .route("/v1/volumes", get(list).post(create))
        .route(
            "/v1/volumes/{name}",
            get(get_one).delete(delete).patch(resize),
        )
        .route("/v1/volumes/{name}/attach", post(attach))
        .route("/v1/volumes/{name}/move", post(move_to))
        .route("/v1/volumes/{name}/detach", post(detach))
        .route(
            "/v1/volumes/{name}/move-to-server",
            post(live::move_to_server),
        )
        .route("/v1/volumes/{name}/split", post(live::split))
        .route("/v1/volumes/combine", post(live::combine))
        .fallback(|| async {
            ApiError(
                StatusCode::NOT_FOUND,
                "UnknownOperation".into(),
                "no such operation".into(),
            )
        })
        .with_state(svc)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct CreateInput {
    name: String,
    size_bytes: u64,
    /// The owner: only hosts that name this account may attach it.
    #[serde(default)]
    account: Option<String>,
    /// `"ext4"`: the new volume holds an empty ext4 filesystem (for a
    /// function's `FileSystemConfigs`), made with the host's `mkfs.ext4`.
    #[serde(default)]
    filesystem: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct ResizeInput {
    /// Grow to this.
    #[serde(default)]
    size_bytes: Option<u64>,
    /// Give a volume of no account an owner (a volume made before owners
    /// existed); an owner is never changed.
    #[serde(default)]
    account: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct HostInput {
    host: String,
    /// The account the host acts for: the volume must be that account's.
    #[serde(default)]
    account: Option<String>,
}

/// An attachment as clients use it: the export name (with the
/// credential) and the URIs to open (with it too). Only the grantee sees
/// it: attach and move answer it, nothing else does.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Grant {
    pub volume: String,
    pub host: String,
    pub generation: u64,
    /// `<volume>@<credential>`.
    pub export_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unix_uri: Option<String>,
    /// The attachment's vhost-user-blk socket (with `--vhost-user-dir`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vhost_user_socket: Option<String>,
}

impl Service {
    /// After a change to `volume`'s attachment: its vhost-user sockets follow.
    pub(crate) fn sync(&self, volume: &str) -> Result<(), ApiError> {
        match &self.vhost_user {
            Some(v) => v.sync(volume).map_err(|m| {
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "VhostUserError".into(),
                    m,
                )
            }),
            None => Ok(()),
        }
    }

    pub(crate) fn grant(&self, volume: &str, a: Attachment) -> Grant {
        let export = export_name(volume, &a.credential);
        Grant {
            volume: volume.into(),
            host: a.host,
            generation: a.generation,
            uri: self.nbd_tcp.as_ref().map(|t| {
                let scheme = if self.nbd_tls.is_some() {
                    "nbds"
                } else {
                    "nbd"
                };
                format!("{scheme}://{t}/{export}")
            }),
            unix_uri: self
                .nbd_unix
                .as_ref()
                .map(|p| format!("nbd+unix:///{export}?socket={p}")),
            vhost_user_socket: self
                .vhost_user
                .as_ref()
                .map(|v| v.socket_path(&a.credential).display().to_string()),
            export_name: export,
        }
    }
}

async fn list(State(s): S) -> Json<serde_json::Value> {
    let v: Vec<VolumeRecord> = s.registry.list().into_iter().map(|r| r.public()).collect();
    Json(json!({"Volumes": v}))
}

async fn create(State(s): S, body: Bytes) -> Result<(StatusCode, Json<VolumeRecord>), ApiError> {
    let i: CreateInput = parse(&body)?;
    match i.filesystem.as_deref() {
        None | Some("ext4") => {}
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "InvalidInput",
                format!("Filesystem {other:?}: only \"ext4\" is made"),
            ))
        }
    }
    let rec = s
        .registry
        .create(&i.name, i.size_bytes, i.account.as_deref())?;
    if i.filesystem.is_some() {
        let image = s.registry.image_path(&i.name);
        let made = tokio::task::spawn_blocking(move || make_ext4(&image))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        if let Err(e) = made {
            let _ = s.registry.delete(&i.name);
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "FilesystemError",
                format!("making ext4 on {}: {e}", i.name),
            ));
        }
    }
    Ok((StatusCode::CREATED, Json(rec.public())))
}

/// An empty ext4 filesystem on `image` (journal on, no reserved blocks,
/// inode tables left for the kernel to initialise: the file stays sparse).
fn make_ext4(image: &std::path::Path) -> Result<(), String> {
    let out = std::process::Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-m",
            "0",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
        ])
        .arg(image)
        .output()
        .map_err(|e| format!("mkfs.ext4: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

async fn get_one(State(s): S, Path(name): Path<String>) -> Result<Json<VolumeRecord>, ApiError> {
    Ok(Json(s.registry.get(&name)?.public()))
}

async fn delete(State(s): S, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    s.registry.delete(&name)?;
    s.sync(&name)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn resize(
    State(s): S,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<VolumeRecord>, ApiError> {
    let i: ResizeInput = parse(&body)?;
    if i.size_bytes.is_none() && i.account.is_none() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidRequest",
            "want SizeBytes or Account",
        ));
    }
    if let Some(a) = &i.account {
        s.registry.set_account(&name, a)?;
    }
    let rec = match i.size_bytes {
        Some(size) => s.registry.resize(&name, size)?,
        None => s.registry.get(&name)?,
    };
    Ok(Json(rec.public()))
}

async fn attach(
    State(s): S,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Grant>, ApiError> {
    let i: HostInput = parse(&body)?;
    let a = s.registry.attach(&name, &i.host, i.account.as_deref())?;
    s.sync(&name)?;
    Ok(Json(s.grant(&name, a)))
}

async fn move_to(
    State(s): S,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Grant>, ApiError> {
    let i: HostInput = parse(&body)?;
    let a = s.registry.move_to(&name, &i.host, i.account.as_deref())?;
    s.sync(&name)?;
    Ok(Json(s.grant(&name, a)))
}

async fn detach(State(s): S, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    s.registry.detach(&name)?;
    s.sync(&name)?;
    Ok(StatusCode::NO_CONTENT)
}
