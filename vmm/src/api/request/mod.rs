//! One module per API resource: body parsing and checks for its routes.

pub mod actions;
pub mod boot_source;
pub mod drive;
pub mod machine_config;
pub mod metrics;
pub mod migration;
pub mod net;
pub mod snapshot;
pub mod vm;
pub mod vsock;
