//! virtio-blk (virtio 1.1 section 5.2) backed by a host file.

mod device;
mod disk;
mod request;
#[cfg(test)]
mod tests;

pub use device::{Block, BlockState};
pub use disk::CacheType;

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
    #[error("drive {drive_id}: cannot create eventfd: {source}")]
    EventFd {
        drive_id: String,
        source: std::io::Error,
    },
}
