//! `PUT /migrate/send` and `PUT /migrate/receive`.

use serde::{Deserialize, Serialize};

use super::snapshot::{
    DriveOverride, FillOverride, LoadSnapshotParams, NetworkOverride, VhostUserOverride,
    VsockOverride,
};
use crate::migration::transport::Endpoint;

fn default_downtime_ms() -> u64 {
    300
}

fn default_max_rounds() -> u32 {
    30
}

/// Who ends the pause: the VMM at once, or its caller (after moving what
/// the VM uses, e.g. a volume's attachment) with `PUT /migrate/switch-over`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum SwitchOver {
    #[default]
    Auto,
    Manual,
}

/// How the memory goes: all before the destination resumes (`PreCopy`),
/// or the destination resumes at once and pulls the rest on fault while
/// the source pushes it (`PostCopy`, for guests whose dirty rate never
/// converges).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum MigrationMode {
    #[default]
    PreCopy,
    PostCopy,
}

/// `PUT /migrate/send`: move this running VM to a VMM waiting in
/// `PUT /migrate/receive`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SendMigrationParams {
    /// `tcp://HOST:PORT` or `unix:///PATH`.
    pub destination_uri: String,
    /// The pause the guest may see: pre-copy ends once what is still dirty
    /// would go in this time at the bandwidth measured.
    #[serde(default = "default_downtime_ms")]
    pub downtime_ms: u64,
    /// Pre-copy rounds before stopping whatever is still dirty.
    #[serde(default = "default_max_rounds")]
    pub max_rounds: u32,
    #[serde(default)]
    pub switch_over: SwitchOver,
    /// With `Manual`: how long the source waits, paused, for
    /// `PUT /migrate/switch-over` before it gives up and resumes.
    #[serde(default = "default_switch_over_timeout_ms")]
    pub switch_over_timeout_ms: u64,
    #[serde(default)]
    pub mode: MigrationMode,
    /// With `PostCopy`: pre-copy rounds first (0, the default: pause at
    /// once). A pre-copy that converges within `downtime_ms` in these
    /// rounds ends as pre-copy; one that does not switches to post-copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_after_rounds: Option<u32>,
}

fn default_switch_over_timeout_ms() -> u64 {
    30_000
}

/// `PUT /migrate/switch-over`: drive overrides for the destination (the
/// volume's new attachment URI, say), applied over those it listens with.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SwitchOverParams {
    #[serde(default)]
    pub drive_overrides: Vec<DriveOverride>,
}

impl SendMigrationParams {
    pub fn validate(&self) -> Result<Endpoint, String> {
        if !(1..=60_000).contains(&self.downtime_ms) {
            return Err(format!(
                "downtime_ms must be 1 to 60000, got {}",
                self.downtime_ms
            ));
        }
        if !(1..=110_000).contains(&self.switch_over_timeout_ms) {
            return Err(format!(
                "switch_over_timeout_ms must be 1 to 110000 (the destination waits 120 s), got {}",
                self.switch_over_timeout_ms
            ));
        }
        if !(1..=1000).contains(&self.max_rounds) {
            return Err(format!(
                "max_rounds must be 1 to 1000, got {}",
                self.max_rounds
            ));
        }
        match (self.mode, self.postcopy_after_rounds) {
            (MigrationMode::PreCopy, Some(_)) => {
                return Err("postcopy_after_rounds needs \"mode\": \"PostCopy\"".into())
            }
            (MigrationMode::PostCopy, Some(n)) if n > self.max_rounds => {
                return Err(format!(
                    "postcopy_after_rounds ({n}) exceeds max_rounds ({})",
                    self.max_rounds
                ))
            }
            _ => {}
        }
        Endpoint::parse(&self.destination_uri).map_err(|e| format!("destination_uri {e}"))
    }

    /// Pre-copy rounds before the pause: `postcopy_after_rounds` in
    /// post-copy (0 pauses at once), `max_rounds` in pre-copy.
    pub fn precopy_rounds(&self) -> u32 {
        match self.mode {
            MigrationMode::PreCopy => self.max_rounds,
            MigrationMode::PostCopy => self.postcopy_after_rounds.unwrap_or(0),
        }
    }
}

/// `PUT /migrate/receive`: wait for a VM on `listen_uri`; the overrides
/// are those of `PUT /snapshot/load` (this host's tap, vsock socket,
/// drive paths).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReceiveMigrationParams {
    pub listen_uri: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drive_overrides: Vec<DriveOverride>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vhost_user_overrides: Vec<VhostUserOverride>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fill_overrides: Vec<FillOverride>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<String>,
}

impl ReceiveMigrationParams {
    pub fn validate(&self) -> Result<Endpoint, String> {
        Endpoint::parse(&self.listen_uri).map_err(|e| format!("listen_uri {e}"))
    }

    /// The restore parameters the received VM is built with (paused; the
    /// source says when to resume).
    pub fn load_params(&self) -> LoadSnapshotParams {
        LoadSnapshotParams {
            snapshot_path: format!("migration stream on {}", self.listen_uri),
            mem_backend: None,
            mem_file_path: None,
            resume_vm: false,
            enable_diff_snapshots: false,
            vsock_override: self.vsock_override.clone(),
            drive_overrides: self.drive_overrides.clone(),
            network_overrides: self.network_overrides.clone(),
            vhost_user_overrides: self.vhost_user_overrides.clone(),
            fill_overrides: self.fill_overrides.clone(),
            serial_out_path: self.serial_out_path.clone(),
        }
    }
}
