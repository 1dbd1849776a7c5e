//! Live migration: the shapes are `ember-vmm-api`'s; the URIs are
//! checked here, with the VMM's own transport parser.

pub use ember_vmm_api::migration::*;

use crate::migration::transport::Endpoint;

/// Checks a `PUT /migrate/send` and answers where to connect.
pub fn validate_send(params: &SendMigrationParams) -> Result<Endpoint, String> {
    params.validate_limits()?;
    Endpoint::parse(&params.destination_uri).map_err(|e| format!("destination_uri {e}"))
}

/// Checks a `PUT /migrate/receive` and answers where to listen.
pub fn validate_receive(params: &ReceiveMigrationParams) -> Result<Endpoint, String> {
    Endpoint::parse(&params.listen_uri).map_err(|e| format!("listen_uri {e}"))
}
