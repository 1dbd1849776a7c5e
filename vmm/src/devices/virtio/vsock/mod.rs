//! virtio-vsock (virtio 1.1 section 5.10) with Firecracker's host side:
//! guest streams are bridged to Unix domain sockets.
//!
//! - Host-initiated: connect to `uds_path`, write `CONNECT <port>\n`; once
//!   the guest accepts, the VMM answers `OK <host_port>\n` and the stream
//!   carries the data.
//! - Guest-initiated: a connection to host port P (CID 2) is forwarded to a
//!   connection to the Unix socket `<uds_path>_P`.

mod connection;
mod device;
mod muxer;
pub mod packet;
mod persist;
#[cfg(test)]
mod tests;

pub use device::Vsock;
pub use muxer::HostConnections;
pub use persist::VsockState;

/// The host's CID as seen by the guest.
pub const VSOCK_HOST_CID: u64 = 2;
/// Queue size of each of the three queues (RX, TX, event).
pub const QUEUE_SIZE: u16 = 256;

pub(crate) const RX_QUEUE: usize = 0;
pub(crate) const TX_QUEUE: usize = 1;
pub(crate) const EVT_QUEUE: usize = 2;

/// Largest payload accepted from / sent to the guest in one packet
/// (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PKT_DATA: usize = 64 * 1024;
/// Receive buffer the VMM advertises per connection (`buf_alloc`): the most
/// guest data it holds for a host peer that is slow to read.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// Connections (including ones still reading their CONNECT line).
pub const MAX_CONNECTIONS: usize = 1023;

/// Why a vsock device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved (must be 3 or more and not u32::MAX)")]
    InvalidCid(u32),
    #[error("saved guest CID {0} does not fit in 32 bits")]
    CidTooLarge(u64),
    #[error(transparent)]
    Features(#[from] super::UnofferedFeatures),
    #[error("uds_path is empty")]
    EmptyPath,
    #[error("uds_path {path} exists and is not a socket")]
    PathInUse { path: String },
    #[error("cannot remove stale socket {path}: {source}")]
    RemoveStale {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot create eventfd: {0}")]
    EventFd(std::io::Error),
}
