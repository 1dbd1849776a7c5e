//! virtio-net (virtio 1.1 section 5.1) backed by a host tap device.
//!
//! Two queues (receive 0, transmit 1), no control queue, no mergeable
//! receive buffers: with GUEST_TSO the Linux driver then posts "big
//! packet" receive chains that hold a 64 KiB frame. The tap carries the
//! same 12-byte `virtio_net_hdr_v1` in front of every frame, so frames
//! move between the tap and guest buffers unchanged (only `num_buffers`
//! is set on receive).

pub mod conntrack;
mod device;
mod persist;
pub mod tap;
#[cfg(test)]
mod tests;

pub use device::{Net, NetCounters};
pub use persist::NetState;
pub use tap::{Tap, TapError};

/// Size of `struct virtio_net_hdr_v1`, in front of every frame.
pub const VNET_HDR_LEN: usize = 12;
pub const QUEUE_SIZE: u16 = 256;
pub const RX_INDEX: usize = 0;
pub const TX_INDEX: usize = 1;

/// Largest frame with its header: a 64 KiB GSO frame, Ethernet and VLAN
/// headers, and the vnet header.
pub const MAX_FRAME_LEN: usize = VNET_HDR_LEN + 14 + 4 + 65535;

/// Feature bits (virtio 1.1 section 5.1.3).
pub mod features {
    pub const CSUM: u32 = 0;
    pub const GUEST_CSUM: u32 = 1;
    pub const MAC: u32 = 5;
    pub const GUEST_TSO4: u32 = 7;
    pub const GUEST_TSO6: u32 = 8;
    pub const GUEST_UFO: u32 = 10;
    pub const HOST_TSO4: u32 = 11;
    pub const HOST_TSO6: u32 = 12;
    pub const HOST_UFO: u32 = 14;
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("network interface {iface_id}: {reason}")]
    Config { iface_id: String, reason: String },
    #[error("network interface {iface_id}: {source}")]
    Tap { iface_id: String, source: TapError },
    #[error("network interface {iface_id}: cannot create an eventfd or timerfd: {source}")]
    Fd {
        iface_id: String,
        source: std::io::Error,
    },
    #[error("network interface {iface_id}: {source}")]
    Features {
        iface_id: String,
        source: super::UnofferedFeatures,
    },
}
