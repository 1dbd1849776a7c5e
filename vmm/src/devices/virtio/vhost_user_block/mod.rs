//! virtio-blk served by an external vhost-user-blk backend (e.g.
//! qemu-storage-daemon) over a unix socket. The VMM keeps the virtio-mmio
//! transport and relays interrupts; the backend reads the rings and guest
//! memory (shared by file descriptor) itself.
//!
//! Pausing the VM stops the ring in the backend (GET_VRING_BASE gives its
//! position, which the snapshot saves); resuming starts it again. Requests
//! the backend still had in flight at the pause are not tracked (no
//! inflight-fd support yet).
//!
//! A backend that disconnects: the device sets DEVICE_NEEDS_RESET and
//! raises a config interrupt, logs one error line, and stops relaying. The
//! guest's in-flight requests never complete (its block layer times them
//! out); the VMM and its API keep running. Every request to the backend has
//! a socket timeout, so a stuck backend cannot hang a vCPU or the API.

mod backend;
mod device;
mod persist;
#[cfg(test)]
mod tests;
mod watchdog;

pub use device::VhostUserBlock;
pub use persist::VhostUserBlockState;

/// Why a vhost-user block device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserBlockError {
    #[error("drive {drive_id}: cannot connect to the vhost-user socket {path}: {source}")]
    Connect {
        drive_id: String,
        path: String,
        source: std::io::Error,
    },
    #[error("drive {drive_id}: vhost-user backend at {path}: {what}: {source}")]
    Protocol {
        drive_id: String,
        path: String,
        what: &'static str,
        source: vhost::Error,
    },
    #[error("drive {drive_id}: vhost-user backend at {path} lacks {what}")]
    Features {
        drive_id: String,
        path: String,
        what: String,
    },
    #[error("drive {drive_id}: cannot create eventfd: {source}")]
    EventFd {
        drive_id: String,
        source: std::io::Error,
    },
}
