//! `PUT /drives/{drive_id}` (Firecracker's `Drive`), `PATCH
//! /drives/{drive_id}` (its `PartialDrive`, plus `nbd_uri`) and
//! `GET /drives/{drive_id}/fill`.
//!
//! The checks of a drive's backend (its file exists, its NBD URI parses)
//! are the VMM's: see `ember_vmm::vmm_config::drive`.

use serde::{Deserialize, Serialize};

use crate::rate_limiter::RateLimiterConfig;

/// `PUT /drives/{drive_id}`: a file, an NBD export or a vhost-user
/// backend.
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

impl BlockDeviceConfig {
    /// A read-write data drive backed by the file `path_on_host`, nothing
    /// else set (not the root device).
    pub fn file(drive_id: impl Into<String>, path_on_host: impl Into<String>) -> Self {
        BlockDeviceConfig {
            drive_id: drive_id.into(),
            path_on_host: path_on_host.into(),
            ..BlockDeviceConfig::default()
        }
    }
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
    /// From `nbd_uri`, with the default timeout and no cap.
    pub fn nbd(nbd_uri: impl Into<String>) -> Self {
        FillFrom {
            nbd_uri: nbd_uri.into(),
            ..FillFrom::default()
        }
    }
}

/// `io_scheduler` of a drive: both thresholds optional; a write waits
/// while either is passed.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IoSchedulerConfig {
    /// Most writes outstanding at the backend at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_outstanding_writes: Option<u32>,
    /// Writes wait while the recent write latency (an exponentially
    /// weighted average) is above this many microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_write_latency_us: Option<u64>,
}

impl IoSchedulerConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_outstanding_writes == Some(0) {
            return Err("io_scheduler: max_outstanding_writes must be > 0".into());
        }
        if self.max_write_latency_us == Some(0) {
            return Err("io_scheduler: max_write_latency_us must be > 0".into());
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

/// Whether a filling drive has all of its chunks.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum FillPhase {
    Filling,
    /// Every chunk is local; the source connection is closed.
    Complete,
}

/// `GET /drives/{drive_id}/fill`: a `fill_from` drive's progress.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FillStatus {
    pub drive_id: String,
    pub state: FillPhase,
    /// The source's NBD URI.
    pub source: String,
    pub chunk_size: u64,
    pub chunks_total: u64,
    pub chunks_local: u64,
    /// Fetched because a guest request needed them.
    pub bytes_on_demand: u64,
    /// Copied by the background filler.
    pub bytes_background: u64,
    /// Guest requests waiting for chunks.
    pub requests_waiting: usize,
    /// The last fetch error, while the source is unreachable (guest reads
    /// of missing chunks then fail with an I/O error).
    pub error: Option<String>,
    /// From the drive's opening to the last chunk.
    pub elapsed_ms: u64,
}
