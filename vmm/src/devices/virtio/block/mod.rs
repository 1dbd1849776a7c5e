//! virtio-blk (virtio 1.1 section 5.2) backed by a host file or an NBD export.

mod device;
mod disk;
pub mod fill;
pub mod nbd;
mod persist;
mod request;
mod scheduler;
#[cfg(test)]
mod tests;

pub use device::Block;
pub use disk::CacheType;
pub use fill::{FillState, FillStatus};
pub use persist::BlockState;
pub use scheduler::{IoSchedulerConfig, WriteScheduler};

/// Queue size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;
pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;

/// Why a block device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("drive {drive_id}: path_on_host is empty")]
    EmptyPath { drive_id: String },
    #[error("drive {drive_id}: cannot open {path}: {source}")]
    Open {
        drive_id: String,
        path: String,
        source: std::io::Error,
    },
    #[error("drive {drive_id}: cannot get the size of {path}: {source}")]
    Size {
        drive_id: String,
        path: String,
        source: std::io::Error,
    },
    #[error(
        "drive {drive_id}: unknown cache_type {value:?} (expected \"Unsafe\" or \"Writeback\")"
    )]
    CacheType { drive_id: String, value: String },
    #[error(
        "drive {drive_id}: {path} holds {actual_sectors} sectors ({} bytes) but the \
         snapshot's disk had {saved_sectors} sectors ({} bytes)",
        actual_sectors * SECTOR_SIZE,
        saved_sectors * SECTOR_SIZE
    )]
    CapacityMismatch {
        drive_id: String,
        path: String,
        saved_sectors: u64,
        actual_sectors: u64,
    },
    #[error("drive {drive_id}: {source}")]
    Features {
        drive_id: String,
        source: super::UnofferedFeatures,
    },
    #[error("drive {drive_id}: NBD export {uri}: {reason}")]
    Nbd {
        drive_id: String,
        uri: String,
        reason: String,
    },
    #[error("drive {drive_id}: fill_from: {reason}")]
    Fill { drive_id: String, reason: String },
    #[error("drive {drive_id}: cannot create eventfd: {source}")]
    EventFd {
        drive_id: String,
        source: std::io::Error,
    },
}

/// An `nbd://` or `nbd+unix://` URI rather than a path.
pub fn is_nbd_uri(s: &str) -> bool {
    s.starts_with("nbd://") || s.starts_with("nbd+unix://")
}
