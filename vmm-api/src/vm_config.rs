//! A whole VM's configuration: `GET /vm/config` (Firecracker's
//! `FullVmConfiguration`) and the VMM's `--config-file`.

use serde::{Deserialize, Serialize};

use crate::boot_source::BootSourceConfig;
use crate::drive::BlockDeviceConfig;
use crate::machine_config::MachineConfig;
use crate::net::NetworkInterfaceConfig;
use crate::vsock::VsockConfig;

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
