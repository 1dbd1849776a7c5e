//! Ember's virtual machine monitor: one microVM per process.

pub mod api;
pub mod devices;
pub mod rpc_interface;
pub mod vmm_config;
