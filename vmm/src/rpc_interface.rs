//! What the API can ask of the VMM, and what it gets back. The API thread
//! only parses and forwards; the VMM thread validates and acts, keeping the
//! pre-boot (configuration) and runtime controllers apart.

use crate::vmm_config::{
    BlockDeviceConfig, BlockDeviceUpdate, BootSourceConfig, CreateSnapshotParams,
    LoadSnapshotParams, MachineConfig, MetricsConfig, NetworkInterfaceConfig,
    NetworkInterfaceUpdate, ReceiveMigrationParams, SaveWorkingSetParams, SendMigrationParams,
    SwitchOverParams, VsockConfig,
};

#[derive(Debug, Clone, PartialEq)]
pub enum VmmAction {
    GetInstanceInfo,
    GetMachineConfig,
    GetVmConfig,
    PutBootSource(BootSourceConfig),
    PutMachineConfig(MachineConfig),
    /// `PATCH /machine-config`: merge the given fields over the current config.
    PatchMachineConfig(crate::vmm_config::machine_config::MachineConfigUpdate),
    PutDrive(BlockDeviceConfig),
    /// `PATCH /drives/{drive_id}`: new backend location (size re-read),
    /// rate limiter or scheduler thresholds.
    PatchDrive(BlockDeviceUpdate),
    PutVsock(VsockConfig),
    /// `PUT /network-interfaces/{iface_id}` (pre-boot).
    PutNetworkInterface(NetworkInterfaceConfig),
    /// `PATCH /network-interfaces/{iface_id}`: new rate limiters.
    PatchNetworkInterface(NetworkInterfaceUpdate),
    /// `PUT /metrics`.
    PutMetrics(MetricsConfig),
    InstanceStart,
    /// `PATCH /vm` `{"state": "Paused"}`.
    Pause,
    /// `PATCH /vm` `{"state": "Resumed"}`.
    Resume,
    /// `PUT /snapshot/create`; the VM must be paused.
    CreateSnapshot(CreateSnapshotParams),
    /// `PUT /snapshot/load`; only before any other configuration.
    LoadSnapshot(LoadSnapshotParams),
    SendCtrlAltDel,
    FlushMetrics,
    /// `PUT /migrate/send`: live-migrate this running VM.
    SendMigration(SendMigrationParams),
    /// `PUT /migrate/receive`: wait for a migrating VM (unconfigured VMM).
    ReceiveMigration(ReceiveMigrationParams),
    /// `GET /migrate`.
    GetMigration,
    /// `GET /drives/{drive_id}/fill`: a `fill_from` drive's progress.
    GetDriveFill(String),
    /// `PUT /migrate/cancel`.
    CancelMigration,
    /// `PUT /migrate/switch-over`: a manual switch-over may go on.
    SwitchOverMigration(SwitchOverParams),
    /// `GET /snapshot/working-set`.
    GetWorkingSet,
    /// `PUT /snapshot/working-set`: save a recording clone's working set.
    SaveWorkingSet(SaveWorkingSetParams),
}

/// `GET /`, as the API answers it.
pub use ember_vmm_api::InstanceInfo;

#[derive(Debug, Clone, PartialEq)]
pub enum VmmData {
    Empty,
    InstanceInfo(InstanceInfo),
    MachineConfig(MachineConfig),
    /// Any JSON body (e.g. `GET /vm/config`).
    Json(serde_json::Value),
}

/// Why an action was refused. Every variant maps to a 4xx except `Internal`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmmActionError {
    /// The request is well-formed but not valid now (e.g. configuring after boot).
    #[error("{0}")]
    NotAllowed(String),
    /// The request's content is invalid (bad path, bad value).
    #[error("{0}")]
    InvalidInput(String),
    /// Something failed inside the VMM.
    #[error("{0}")]
    Internal(String),
}

impl VmmActionError {
    pub fn http_status(&self) -> u16 {
        match self {
            VmmActionError::NotAllowed(_) | VmmActionError::InvalidInput(_) => 400,
            VmmActionError::Internal(_) => 500,
        }
    }
}

pub type VmmResponse = Result<VmmData, VmmActionError>;
