//! Configuration resources in Firecracker's API shapes. The same types are
//! parsed from API bodies and from `--config-file`.

use serde::{Deserialize, Serialize};

pub mod boot_source;
pub mod drive;
pub mod machine_config;
pub mod metrics;
pub mod migration;
pub mod net;
pub mod snapshot;
pub mod vsock;

pub use boot_source::BootSourceConfig;
pub use drive::{BlockDeviceConfig, BlockDeviceUpdate};
pub use machine_config::MachineConfig;
pub use metrics::MetricsConfig;
pub use migration::{ReceiveMigrationParams, SendMigrationParams, SwitchOverParams};
pub use net::{NetworkInterfaceConfig, NetworkInterfaceUpdate};
pub use snapshot::{CreateSnapshotParams, LoadSnapshotParams};
pub use vsock::VsockConfig;

/// Everything needed to build a VM, as given by `--config-file` (Firecracker's
/// field names) or accumulated through pre-boot API calls.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmResources {
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSourceConfig>,
    #[serde(rename = "machine-config", default)]
    pub machine_config: MachineConfig,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drives: Vec<BlockDeviceConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    #[serde(
        rename = "network-interfaces",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub network_interfaces: Vec<NetworkInterfaceConfig>,
}
