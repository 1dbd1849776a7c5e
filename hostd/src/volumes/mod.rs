//! A function's volume (Lambda's `FileSystemConfigs`, an Ember volume in
//! place of EFS). [`Volumes`], owned by the daemon, is the one part that
//! talks to the volume service, always in this host's account's name (a
//! volume of another account is refused): a clone's attachment and the
//! mount of it in the guest, the move of an attachment to another host
//! (a migration) and back, the size a snapshot's placeholder is built
//! with, and the relay of hostd's own volume API. The NBD path from a
//! jailed VMM to the service is in [`forward`]; the names and paths a
//! volume may have in [`rules`].

mod forward;
mod grant;
mod rules;
mod service;

use std::path::PathBuf;

pub use forward::forward_pinned;
pub use grant::{Grant, NbdTarget, Pin, SharedPin};
pub use rules::{check_name, guest_device, mount_script, validate, DRIVE_ID};
pub use service::{Answer, ServiceCall};

use crate::model::FileSystem;

/// Where the volume service is and who this host is to it.
#[derive(Debug, Clone)]
pub struct VolumeService {
    pub socket: PathBuf,
    pub host_id: String,
    /// This host's account: named when it attaches or moves a volume, so
    /// the volume service refuses a volume of another account.
    pub account: String,
    /// This host's TLS identity (with `--listen-tcp`): NBD to a volume
    /// service across hosts (`nbds://`) runs inside mutual TLS with it.
    pub tls: Option<ember_tls::Tls>,
}

/// Why a volume could not be had, or a request of the volume service
/// failed.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("this host has no volume service configured (--volume-service)")]
    NotConfigured,
    #[error("invalid volume name {0:?}")]
    InvalidName(String),
    #[error("FileSystemConfigs: LocalMountPath {0:?} must be /mnt/NAME")]
    BadMountPath(String),
    #[error("FileSystemConfigs: invalid volume name {0:?}")]
    BadVolumeName(String),
    #[error("the volume service: {0}")]
    Unreachable(#[source] crate::vm::api_client::ApiError),
    /// The service said no; its status says why (see the API's errors).
    #[error("the volume service answered {status} to {method} {uri}: {body}")]
    Refused {
        status: u16,
        method: &'static str,
        uri: String,
        body: String,
    },
    #[error("the volume service: {0}")]
    BadAnswer(#[source] serde_json::Error),
    #[error("the volume service's grant: {0}")]
    BadGrant(#[source] serde_json::Error),
    #[error("volume {volume}: not authorised (not a volume of account {account})")]
    OtherAccount { volume: String, account: String },
    #[error("the volume service gave no size for {0}")]
    NoSize(String),
    #[error("the volume service serves {0} over no NBD endpoint hostd can use")]
    NoEndpoint(String),
    #[error(
        "the volume service serves {volume} over NBD with TLS (nbds://{addr}) and this host \
         has no TLS identity (start emberd with --tls-cert, --tls-key and --tls-ca, or \
         --tls-dev-dir)"
    )]
    NoTlsIdentity { volume: String, addr: String },
}

/// A grant an instance cannot open is a failure to start it.
impl From<VolumeError> for crate::vm::InstanceError {
    fn from(e: VolumeError) -> Self {
        crate::vm::InstanceError::Spawn(e.to_string())
    }
}

/// A clone's volume: attached to this host before the clone is restored
/// (the VMM opens it through its jail's NBD path), mounted in the guest
/// before the clone serves.
pub struct CloneVolume {
    pub grant: Grant,
    /// The guest commands that mount it.
    pub mount_script: String,
}

/// This host's side of the volume service.
#[derive(Debug)]
pub struct Volumes {
    service: VolumeService,
}

impl Volumes {
    pub fn new(service: VolumeService) -> Volumes {
        Volumes { service }
    }

    /// The name this host has at the volume service.
    pub fn host_id(&self) -> &str {
        &self.service.host_id
    }

    /// This host's attachment of `volume` (the same one while it holds
    /// it; a conflict while another host does).
    pub async fn attach(&self, volume: &str) -> Result<Grant, VolumeError> {
        let body = self.call(volume, ServiceCall::Attach).await?;
        self.grant(&body)
    }

    /// A clone's volume, attached here, and how the guest mounts it (the
    /// drive after its `/tmp` disk, if it has one).
    pub async fn attach_clone(
        &self,
        fs: &FileSystem,
        with_tmp_disk: bool,
    ) -> Result<CloneVolume, VolumeError> {
        Ok(CloneVolume {
            grant: self.attach(&fs.volume).await?,
            mount_script: mount_script(
                guest_device(with_tmp_disk),
                &fs.mount_path,
                crate::functions::FUNCTION_UID,
                crate::functions::FUNCTION_GID,
            ),
        })
    }

    /// Moves the attachment to `host` (a new generation: the holder's
    /// requests are refused from now on).
    pub async fn move_to(&self, volume: &str, host: &str) -> Result<Grant, VolumeError> {
        let body = self.call(volume, ServiceCall::Move { host }).await?;
        self.grant(&body)
    }

    /// Moves the attachment back to this host (after a failed migration:
    /// again a new generation).
    pub async fn bring_back(&self, volume: &str) -> Result<Grant, VolumeError> {
        self.move_to(volume, &self.service.host_id).await
    }

    /// The size of `volume`, refused unless it is this host's account's.
    pub async fn size(&self, volume: &str) -> Result<u64, VolumeError> {
        let b = self.call(volume, ServiceCall::Describe).await?;
        let v: serde_json::Value = serde_json::from_slice(&b).map_err(VolumeError::BadAnswer)?;
        if v["Account"].as_str() != Some(self.service.account.as_str()) {
            return Err(VolumeError::OtherAccount {
                volume: volume.to_string(),
                account: self.service.account.clone(),
            });
        }
        v["SizeBytes"]
            .as_u64()
            .ok_or_else(|| VolumeError::NoSize(volume.to_string()))
    }

    /// The service's answer, with this host's TLS identity; refused at
    /// once if the service is reached over TLS and this host has none.
    fn grant(&self, body: &[u8]) -> Result<Grant, VolumeError> {
        let mut g: Grant = serde_json::from_slice(body).map_err(VolumeError::BadGrant)?;
        g.tls = self.service.tls.clone();
        if matches!(g.target(), Ok(NbdTarget::TcpTls(_))) {
            g.pin()?;
        }
        Ok(g)
    }
}
