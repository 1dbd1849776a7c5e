use serde::{Deserialize, Serialize};

use crate::devices::virtio::block::IoSchedulerConfig;
use crate::rate_limiter::RateLimiterConfig;

/// `PUT /drives/{drive_id}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BlockDeviceConfig {
    pub drive_id: String,
    #[serde(default)]
    pub path_on_host: String,
    pub is_root_device: bool,
    #[serde(default)]
    pub is_read_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Firecracker's `cache_type`: "Unsafe" (default) or "Writeback".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    /// Serial id reported to the guest (VIRTIO_BLK_T_GET_ID); defaults to drive_id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// A network backend instead of `path_on_host`: `nbd://host:port/export`
    /// or `nbd+unix:///export?socket=PATH`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_uri: Option<String>,
    /// Bound on one NBD request's round trip and on a reconnect, in
    /// milliseconds (default 30000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_timeout_ms: Option<u64>,
    /// Firecracker's `socket`: the unix socket of a vhost-user-blk backend
    /// serving this drive (then `path_on_host` stays empty). Absent in
    /// snapshots taken before vhost-user support, hence the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    /// Firecracker's `rate_limiter`: bandwidth (bytes) and ops buckets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
    /// Write-aware scheduling thresholds (off when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_scheduler: Option<IoSchedulerConfig>,
    /// Fill `path_on_host` from this NBD export while the guest runs
    /// (a local disk after a live migration): missing chunks are fetched
    /// on demand, the rest in the background.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fill_from: Option<FillFrom>,
}

/// `fill_from`: where a drive's local file is copied from.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FillFrom {
    /// `nbd://host:port/export` or `nbd+unix:///export?socket=PATH`.
    pub nbd_uri: String,
    /// Bound on one fetch's round trip and on a reconnect (default 30000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_timeout_ms: Option<u64>,
    /// Caps the background copy (on-demand fetches are not held back);
    /// unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub background_bytes_per_sec: Option<u64>,
}

impl FillFrom {
    pub fn validate(&self, drive_id: &str) -> Result<(), String> {
        crate::devices::virtio::block::nbd::NbdUri::parse(&self.nbd_uri)
            .map_err(|e| format!("drive {drive_id}: bad fill_from.nbd_uri: {e}"))?;
        if self.nbd_timeout_ms == Some(0) {
            return Err(format!(
                "drive {drive_id}: fill_from.nbd_timeout_ms must be > 0"
            ));
        }
        if self.background_bytes_per_sec == Some(0) {
            return Err(format!(
                "drive {drive_id}: fill_from.background_bytes_per_sec must be > 0"
            ));
        }
        Ok(())
    }
}

/// `PATCH /drives/{drive_id}` at run time (Firecracker's partial drive):
/// a new backing file or NBD URI (its size is read again: a grown volume
/// is seen by the guest), new limits.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BlockDeviceUpdate {
    pub drive_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_scheduler: Option<IoSchedulerConfig>,
}

impl BlockDeviceUpdate {
    /// Shape checks that need no device.
    pub fn validate(&self) -> Result<(), String> {
        let id = &self.drive_id;
        if self.path_on_host.is_some() && self.nbd_uri.is_some() {
            return Err(format!(
                "drive {id}: give path_on_host or nbd_uri, not both"
            ));
        }
        if let Some(uri) = &self.nbd_uri {
            crate::devices::virtio::block::nbd::NbdUri::parse(uri)
                .map_err(|e| format!("drive {id}: bad nbd_uri: {e}"))?;
        }
        if let Some(rl) = &self.rate_limiter {
            rl.validate()
                .map_err(|e| format!("drive {id}: rate_limiter: {e}"))?;
        }
        if let Some(s) = &self.io_scheduler {
            s.validate().map_err(|e| format!("drive {id}: {e}"))?;
        }
        Ok(())
    }

    /// Writes the fields given into `cfg` (the drive's configuration).
    pub fn apply_to(&self, cfg: &mut BlockDeviceConfig) {
        if let Some(p) = &self.path_on_host {
            cfg.path_on_host = p.clone();
        }
        if let Some(u) = &self.nbd_uri {
            cfg.nbd_uri = Some(u.clone());
        }
        if let Some(rl) = self.rate_limiter {
            cfg.rate_limiter = Some(rl);
        }
        if let Some(s) = self.io_scheduler {
            cfg.io_scheduler = Some(s);
        }
    }

    /// Whether the backend must be reopened (and its size read again).
    pub fn reopens(&self) -> bool {
        self.path_on_host.is_some() || self.nbd_uri.is_some()
    }
}

impl BlockDeviceConfig {
    /// Checks the backend choice without touching files or the network.
    pub fn validate(&self) -> Result<(), String> {
        if self.drive_id.is_empty() {
            return Err("drive_id must not be empty".into());
        }
        if let Some(rl) = &self.rate_limiter {
            rl.validate()
                .map_err(|e| format!("drive {}: rate_limiter: {e}", self.drive_id))?;
        }
        if let Some(s) = &self.io_scheduler {
            s.validate()
                .map_err(|e| format!("drive {}: {e}", self.drive_id))?;
        }
        if self.socket.is_some() {
            if self.rate_limiter.is_some() || self.io_scheduler.is_some() {
                return Err(format!(
                    "drive {}: rate_limiter and io_scheduler apply to file and NBD drives, \
                     not vhost-user (the backend reads the queue itself)",
                    self.drive_id
                ));
            }
            // The controller checks the socket itself.
            if self.nbd_uri.is_some() || !self.path_on_host.is_empty() || self.fill_from.is_some() {
                return Err(format!(
                    "drive {}: path_on_host (and fill_from), nbd_uri and socket are mutually \
                     exclusive",
                    self.drive_id
                ));
            }
            return Ok(());
        }
        match &self.nbd_uri {
            Some(uri) => {
                if self.fill_from.is_some() {
                    return Err(format!(
                        "drive {}: fill_from fills a local path_on_host, not an nbd_uri drive",
                        self.drive_id
                    ));
                }
                if !self.path_on_host.is_empty() {
                    return Err(format!(
                        "drive {}: give path_on_host or nbd_uri, not both",
                        self.drive_id
                    ));
                }
                crate::devices::virtio::block::nbd::NbdUri::parse(uri)
                    .map_err(|e| format!("drive {}: bad nbd_uri: {e}", self.drive_id))?;
                if self.nbd_timeout_ms == Some(0) {
                    return Err(format!(
                        "drive {}: nbd_timeout_ms must be > 0",
                        self.drive_id
                    ));
                }
            }
            None => {
                if self.nbd_timeout_ms.is_some() {
                    return Err(format!(
                        "drive {}: nbd_timeout_ms needs nbd_uri",
                        self.drive_id
                    ));
                }
                if let Some(fill) = &self.fill_from {
                    // The file is created (sparse, the source's size) if absent.
                    if self.path_on_host.is_empty() {
                        return Err(format!(
                            "drive {}: fill_from needs path_on_host, the local file to fill",
                            self.drive_id
                        ));
                    }
                    return fill.validate(&self.drive_id);
                }
                if !std::path::Path::new(&self.path_on_host).exists() {
                    return Err(format!(
                        "drive {}: path_on_host {} does not exist",
                        self.drive_id, self.path_on_host
                    ));
                }
            }
        }
        Ok(())
    }
}
