//! A function's volume (Lambda's `FileSystemConfigs`, an Ember volume in
//! place of EFS): the attachment of this host, asked of the volume
//! service; the NBD path from a jailed VMM to that service (a unix socket
//! in the jail that hostd joins to the service's NBD socket or port);
//! the placeholder a snapshot is built on; the mount in the guest.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use crate::api::volumes::VolumeService;
use crate::error::ApiError;
use crate::vm::api_client::raw_request;

/// The guest device of a function's volume: the drive after the root
/// filesystem, the code and, if the function has one, its `/tmp` disk.
pub fn guest_device(with_tmp_disk: bool) -> &'static str {
    if with_tmp_disk {
        "/dev/vdd"
    } else {
        "/dev/vdc"
    }
}
/// The VMM's drive id for it.
pub const DRIVE_ID: &str = "volume";

/// An attachment as the volume service grants it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Grant {
    pub volume: String,
    pub host: String,
    pub generation: u64,
    pub export_name: String,
    #[serde(default)]
    pub uri: Option<String>,
    #[serde(default)]
    pub unix_uri: Option<String>,
}

/// Where NBD connections for a volume go from this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdTarget {
    Unix(PathBuf),
    Tcp(String),
}

impl Grant {
    /// The service's NBD endpoint: its unix socket when it has one (same
    /// host), else its TCP address.
    pub fn target(&self) -> Result<NbdTarget, ApiError> {
        if let Some(u) = &self.unix_uri {
            if let Some((_, sock)) = u.split_once("?socket=") {
                return Ok(NbdTarget::Unix(PathBuf::from(sock)));
            }
        }
        if let Some(u) = &self.uri {
            if let Some(rest) = u.strip_prefix("nbd://") {
                let addr = rest.split('/').next().unwrap_or_default();
                return Ok(NbdTarget::Tcp(addr.to_string()));
            }
        }
        Err(ApiError::service(format!(
            "the volume service serves {} over no NBD endpoint hostd can use",
            self.volume
        )))
    }

    /// The URI a VMM opens through the socket at `vm_socket`.
    pub fn uri_via(&self, vm_socket: &Path) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            self.export_name,
            vm_socket.display()
        )
    }
}

impl VolumeService {
    async fn call(
        &self,
        method: &str,
        uri: &str,
        body: serde_json::Value,
    ) -> Result<Vec<u8>, ApiError> {
        let r = raw_request(
            &self.socket,
            method,
            uri,
            &[("Content-Type", "application/json")],
            body.to_string().into_bytes(),
        )
        .await
        .map_err(|e| ApiError::service(format!("the volume service: {e}")))?;
        if (200..300).contains(&r.status) {
            return Ok(r.body.to_vec());
        }
        let msg = format!(
            "the volume service answered {} to {method} {uri}: {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        Err(match r.status {
            404 => ApiError::not_found(msg),
            409 => ApiError::conflict(msg),
            400 => ApiError::invalid(msg),
            _ => ApiError::service(msg),
        })
    }

    fn grant(body: &[u8]) -> Result<Grant, ApiError> {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::service(format!("the volume service's grant: {e}")))
    }

    /// This host's attachment of `volume` (the same one while it holds
    /// it; a conflict while another host does).
    pub async fn attach(&self, volume: &str) -> Result<Grant, ApiError> {
        let b = self
            .call(
                "POST",
                &format!("/v1/volumes/{volume}/attach"),
                json!({"Host": self.host_id}),
            )
            .await?;
        Self::grant(&b)
    }

    /// Moves the attachment to `host` (a new generation: the holder's
    /// requests are refused from now on).
    pub async fn move_to(&self, volume: &str, host: &str) -> Result<Grant, ApiError> {
        let b = self
            .call(
                "POST",
                &format!("/v1/volumes/{volume}/move"),
                json!({"Host": host}),
            )
            .await?;
        Self::grant(&b)
    }

    pub async fn size(&self, volume: &str) -> Result<u64, ApiError> {
        let b = self
            .call("GET", &format!("/v1/volumes/{volume}"), json!({}))
            .await?;
        let v: serde_json::Value = serde_json::from_slice(&b)
            .map_err(|e| ApiError::service(format!("the volume service: {e}")))?;
        v["SizeBytes"].as_u64().ok_or_else(|| {
            ApiError::service(format!("the volume service gave no size for {volume}"))
        })
    }
}

/// Serves NBD connections made on `listener` (in a VMM's jail) by joining
/// each to `target`, until the task is aborted.
pub async fn forward_nbd(listener: tokio::net::UnixListener, target: NbdTarget) {
    loop {
        let Ok((mut vmm, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let target = target.clone();
        tokio::spawn(async move {
            let r = match &target {
                NbdTarget::Unix(p) => match tokio::net::UnixStream::connect(p).await {
                    Ok(mut s) => tokio::io::copy_bidirectional(&mut vmm, &mut s).await,
                    Err(e) => Err(e),
                },
                NbdTarget::Tcp(a) => match tokio::net::TcpStream::connect(a).await {
                    Ok(mut s) => {
                        s.set_nodelay(true).ok();
                        tokio::io::copy_bidirectional(&mut vmm, &mut s).await
                    }
                    Err(e) => Err(e),
                },
            };
            if let Err(e) = r {
                log::debug!("NBD connection to {target:?} ended: {e}");
            }
        });
    }
}

/// Lambda's rule for `LocalMountPath` (`/mnt/` and a name), and a volume
/// name the service takes.
pub fn validate(fs: &crate::model::FileSystem) -> Result<(), ApiError> {
    let name_ok = |n: &str, max: usize| {
        (1..=max).contains(&n.len())
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    };
    let path_ok = fs
        .mount_path
        .strip_prefix("/mnt/")
        .is_some_and(|n| name_ok(n, 160) && n != "." && n != "..");
    if !path_ok {
        return Err(ApiError::invalid(format!(
            "FileSystemConfigs: LocalMountPath {:?} must be /mnt/NAME",
            fs.mount_path
        )));
    }
    if !name_ok(&fs.volume, 64) || fs.volume.contains('.') {
        return Err(ApiError::invalid(format!(
            "FileSystemConfigs: invalid volume name {:?}",
            fs.volume
        )));
    }
    Ok(())
}

/// The guest commands that mount the volume at `path` (under `/mnt`, a
/// tmpfs made for it since the root filesystem is read-only), owned by
/// the function's user.
pub fn mount_script(device: &str, path: &str, uid: u32, gid: u32) -> String {
    format!(
        "set -e\n\
         grep -q ' /mnt ' /proc/mounts || mount -t tmpfs -o mode=0755 tmpfs /mnt\n\
         mkdir -p '{path}'\n\
         mount -t ext4 -o noatime,sync {device} '{path}'\n\
         chown {uid}:{gid} '{path}'\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(uri: Option<&str>, unix: Option<&str>) -> Grant {
        Grant {
            volume: "v".into(),
            host: "h".into(),
            generation: 3,
            export_name: "v@3".into(),
            uri: uri.map(str::to_string),
            unix_uri: unix.map(str::to_string),
        }
    }

    #[test]
    fn grants_name_their_endpoint_and_the_uri_through_a_jail() {
        let g = grant(
            Some("nbd://10.0.0.1:10809/v@3"),
            Some("nbd+unix:///v@3?socket=/run/v.sock"),
        );
        assert_eq!(g.target().unwrap(), NbdTarget::Unix("/run/v.sock".into()));
        let g = grant(Some("nbd://10.0.0.1:10809/v@3"), None);
        assert_eq!(g.target().unwrap(), NbdTarget::Tcp("10.0.0.1:10809".into()));
        assert!(grant(None, None).target().is_err());
        assert_eq!(
            g.uri_via(Path::new("/run/nbd.sock")),
            "nbd+unix:///v@3?socket=/run/nbd.sock"
        );
    }
}
