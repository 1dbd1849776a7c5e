//! Live migration: `PUT /migrate/send`, `PUT /migrate/receive`,
//! `PUT /migrate/switch-over`, `PUT /migrate/cancel` (no body) and
//! `GET /migrate`. Ember's own; Firecracker has no live migration.
//!
//! The URIs (`tcp://HOST:PORT`, `unix:///PATH`) are checked by the VMM
//! (`ember_vmm::vmm_config::migration`).

use serde::{Deserialize, Serialize};

use crate::snapshot::{
    DriveOverride, FillOverride, LoadSnapshotParams, NetworkOverride, VhostUserOverride,
    VsockOverride,
};

/// `downtime_ms` when none is given.
pub const DEFAULT_DOWNTIME_MS: u64 = 300;
/// `max_rounds` when none is given.
pub const DEFAULT_MAX_ROUNDS: u32 = 30;
/// `switch_over_timeout_ms` when none is given.
pub const DEFAULT_SWITCH_OVER_TIMEOUT_MS: u64 = 30_000;

fn default_downtime_ms() -> u64 {
    DEFAULT_DOWNTIME_MS
}

fn default_max_rounds() -> u32 {
    DEFAULT_MAX_ROUNDS
}

fn default_switch_over_timeout_ms() -> u64 {
    DEFAULT_SWITCH_OVER_TIMEOUT_MS
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

impl SendMigrationParams {
    /// To `destination_uri`, every other field as when absent from a body.
    pub fn new(destination_uri: impl Into<String>) -> Self {
        SendMigrationParams {
            destination_uri: destination_uri.into(),
            downtime_ms: DEFAULT_DOWNTIME_MS,
            max_rounds: DEFAULT_MAX_ROUNDS,
            switch_over: SwitchOver::Auto,
            switch_over_timeout_ms: DEFAULT_SWITCH_OVER_TIMEOUT_MS,
            mode: MigrationMode::PreCopy,
            postcopy_after_rounds: None,
        }
    }

    /// Checks the numbers (the VMM checks `destination_uri`).
    pub fn validate_limits(&self) -> Result<(), String> {
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
                Err("postcopy_after_rounds needs \"mode\": \"PostCopy\"".into())
            }
            (MigrationMode::PostCopy, Some(n)) if n > self.max_rounds => Err(format!(
                "postcopy_after_rounds ({n}) exceeds max_rounds ({})",
                self.max_rounds
            )),
            _ => Ok(()),
        }
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

/// `PUT /migrate/switch-over`: drive overrides for the destination (the
/// volume's new attachment URI, say), applied over those it listens with.
/// The body is optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SwitchOverParams {
    #[serde(default)]
    pub drive_overrides: Vec<DriveOverride>,
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
    /// Listens on `listen_uri`, nothing overridden.
    pub fn new(listen_uri: impl Into<String>) -> Self {
        ReceiveMigrationParams {
            listen_uri: listen_uri.into(),
            vsock_override: None,
            drive_overrides: Vec::new(),
            network_overrides: Vec::new(),
            vhost_user_overrides: Vec::new(),
            fill_overrides: Vec::new(),
            serial_out_path: None,
        }
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
            working_set: None,
            huge_pages: None,
            memory_backing: None,
        }
    }
}

/// Which end of a migration a VMM is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Role {
    #[default]
    None,
    Source,
    Destination,
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Phase {
    /// No migration has run.
    #[default]
    None,
    /// Destination: waiting for the source to connect.
    Listening,
    /// Memory goes while the guest runs.
    PreCopy,
    /// The source is paused; the rest and the state go.
    StopAndCopy,
    /// `switch_over: "Manual"`: the source is paused and all memory is at
    /// the destination; `PUT /migrate/switch-over` (with drive overrides,
    /// e.g. a volume's new attachment) lets the destination load the VM.
    AwaitingSwitchOver,
    /// The destination has loaded the VM; it is being resumed.
    SwitchOver,
    /// Post-copy: the destination runs the VM while the pages it lacks
    /// still come from the source (on fault and pushed). Neither side can
    /// go on alone: no cancel.
    PostCopy,
    /// The destination runs the VM.
    Completed,
    /// Ended without moving the VM (the source still runs it), or, on a
    /// destination, nothing was loaded.
    Failed,
    /// Cancelled before the switch-over; the source still runs the VM.
    Cancelled,
}

/// `GET /migrate`: the last (or running) migration, either end.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct MigrationStatus {
    pub role: Role,
    pub state: Phase,
    /// The other VMM (destination URI, or the listen URI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// Guest memory size.
    pub memory_bytes: u64,
    /// Pre-copy rounds done (round 1 sends all non-zero memory).
    pub rounds: u32,
    /// Bytes of the stream sent (source) or received (destination).
    pub bytes: u64,
    /// Pages carried, zero pages included.
    pub pages: u64,
    /// Dirty pages found at the end of the last pre-copy round.
    pub last_dirty_pages: u64,
    /// Stream bandwidth measured in the last round, MiB/s.
    pub bandwidth_mib_s: f64,
    /// Pages sent after the pause.
    pub final_pages: u64,
    /// `PreCopy` or `PostCopy`: how the memory went (a post-copy request
    /// that converged within its pre-copy rounds ends as `PreCopy`).
    pub mode: MigrationMode,
    /// Post-copy: pages the destination faulted on and asked for.
    pub postcopy_pages_on_demand: u64,
    /// Post-copy: pages the source pushed in the background.
    pub postcopy_pages_pushed: u64,
    /// Post-copy: from the destination's resume until it had every page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_ms: Option<u64>,
    /// From the pause on the source to the destination's "resumed".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl MigrationStatus {
    /// Whether the migration still runs (listening included).
    pub fn is_active(&self) -> bool {
        matches!(
            self.state,
            Phase::Listening
                | Phase::PreCopy
                | Phase::StopAndCopy
                | Phase::AwaitingSwitchOver
                | Phase::SwitchOver
                | Phase::PostCopy
        )
    }
}
