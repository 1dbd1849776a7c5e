//! The HTTP API of `ember-vmm` as typed shapes, defined once for the VMM
//! (which parses them), hostd and the tests (which send them).
//!
//! The wire is Firecracker's API (its OpenAPI document is the contract:
//! field names, which fields are optional, unknown fields refused) plus
//! Ember's additions (NBD drives, fills, live migration). Each module is
//! one API resource:
//!
//! * [`boot_source`]: `PUT /boot-source`;
//! * [`machine_config`]: `GET`/`PUT`/`PATCH /machine-config` and the limits
//!   a VM may have;
//! * [`drive`]: `PUT`/`PATCH /drives/{id}` and `GET /drives/{id}/fill`;
//! * [`rate_limiter`]: the token buckets of drives and interfaces;
//! * [`net`]: `PUT`/`PATCH /network-interfaces/{id}`;
//! * [`vsock`]: `PUT /vsock`;
//! * [`metrics`]: `PUT /metrics`;
//! * [`snapshot`]: `PUT /snapshot/create` and `PUT /snapshot/load`;
//! * [`migration`]: `PUT /migrate/*` and `GET /migrate`;
//! * [`instance`]: `GET /`, `PUT /actions`, `PATCH /vm`, the error body;
//! * [`vm_config`]: `GET /vm/config` and the VMM's `--config-file`.
//!
//! Checks that need nothing but the shape (ranges, exclusive fields, MAC
//! syntax) are here; those that need the host or the VMM's parsers (files,
//! NBD and migration URIs) stay in the VMM.
//!
//! With the `client` feature, `client::VmmClient` is a typed client over
//! the API's unix socket (hyper, with a timeout on every request).

pub mod boot_source;
pub mod drive;
pub mod instance;
pub mod machine_config;
pub mod metrics;
pub mod migration;
pub mod net;
pub mod rate_limiter;
pub mod snapshot;
pub mod vm_config;
pub mod vsock;

#[cfg(feature = "client")]
pub mod client;

pub use boot_source::BootSourceConfig;
pub use drive::{
    BlockDeviceConfig, BlockDeviceUpdate, FillFrom, FillPhase, FillStatus, IoSchedulerConfig,
};
pub use instance::{
    ActionType, FaultBody, InstanceActionInfo, InstanceInfo, VmState, VmStateUpdate,
};
pub use machine_config::{HugePages, MachineConfig, MachineConfigUpdate, MemoryBacking};
pub use metrics::MetricsConfig;
pub use migration::{
    MigrationMode, MigrationStatus, ReceiveMigrationParams, SendMigrationParams, SwitchOver,
    SwitchOverParams,
};
pub use net::{NetworkInterfaceConfig, NetworkInterfaceUpdate};
pub use rate_limiter::{RateLimiterConfig, TokenBucketConfig};
pub use snapshot::{
    CreateSnapshotParams, DriveOverride, FillOverride, GuestMemoryMapping, LoadHugePages,
    LoadSnapshotParams, MemBackend, MemBackendType, NetworkOverride, SaveWorkingSetParams,
    SnapshotType, VhostUserOverride, VsockOverride, WorkingSetLoad, WorkingSetStatus,
};
pub use vm_config::VmResources;
pub use vsock::VsockConfig;

#[cfg(test)]
mod tests;
