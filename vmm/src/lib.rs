//! Ember's virtual machine monitor: one microVM per process.

pub mod api;
pub mod arch;
pub mod builder;
pub mod controller;
pub mod devices;
pub mod event_loop;
pub mod guest_log;
pub mod metrics;
pub mod migration;
pub mod rate_limiter;
pub mod rpc_interface;
pub mod seccomp;
pub mod snapshot;
pub mod vmm;
pub mod vmm_config;
pub mod vstate;
