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

/// Internals the fuzz targets in `fuzz/` drive, reachable only with the
/// `fuzzing` feature (never in the daemon's builds).
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    use crate::devices::virtio::net::Net;
    use crate::snapshot::memory::{GuestMemoryState, MemoryFileError};

    /// [`crate::snapshot::memory`]'s layout check, as snapshot restore and
    /// the migration receiver run it.
    pub fn check_layout(state: &GuestMemoryState) -> Result<(), MemoryFileError> {
        crate::snapshot::memory::check_layout(state)
    }

    /// Queues frames for the guest as if the tap had delivered them (the
    /// path a restored snapshot's pending frames take).
    pub fn set_pending_rx_frames(net: &mut Net, frames: &[Vec<u8>]) {
        net.set_pending_rx_frames(frames)
    }
}
