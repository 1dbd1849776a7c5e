//! Configuration resources in Firecracker's API shapes. The shapes are
//! `ember-vmm-api`'s (shared with hostd and the tests); the checks that
//! need the host or the VMM's own parsers (files, NBD and migration URIs)
//! are here. The same types are parsed from API bodies and from
//! `--config-file`.

pub use ember_vmm_api::{boot_source, machine_config, metrics, net, snapshot, vsock};

pub mod drive;
pub mod migration;

pub use boot_source::BootSourceConfig;
pub use drive::{BlockDeviceConfig, BlockDeviceUpdate};
pub use machine_config::MachineConfig;
pub use metrics::MetricsConfig;
pub use migration::{ReceiveMigrationParams, SendMigrationParams, SwitchOverParams};
pub use net::{NetworkInterfaceConfig, NetworkInterfaceUpdate};
pub use snapshot::{CreateSnapshotParams, LoadSnapshotParams, SaveWorkingSetParams};
pub use vsock::VsockConfig;

/// Everything needed to build a VM, as given by `--config-file` or
/// accumulated through pre-boot API calls.
pub use ember_vmm_api::VmResources;
