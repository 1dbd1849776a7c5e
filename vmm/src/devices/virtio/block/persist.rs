//! Snapshot and restore of a block device. The queue itself (positions and
//! rings) is saved by the transport; see `MmioTransportState`.

use serde::{Deserialize, Serialize};

use super::{Block, BlockError};
use crate::devices::virtio::VirtioDevice;
use crate::vmm_config::drive::BlockDeviceConfig;

/// The drive's configuration (id, path, read-only, cache type, serial),
/// its capacity and the negotiated features.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BlockState {
    pub config: BlockDeviceConfig,
    /// In 512-byte sectors; the backing file at restore must have exactly
    /// this capacity, or the guest's filesystem would be cut or misread.
    pub capacity: u64,
    pub acked_features: u64,
}

impl Block {
    pub fn state(&self) -> BlockState {
        BlockState {
            config: self.config().clone(),
            capacity: self.capacity(),
            acked_features: self.acked_features(),
        }
    }

    /// Reopens the drive (at `path_override` if given, e.g. a per-clone copy
    /// of the disk; for an NBD drive the override is a new NBD URI) in its
    /// saved configuration. An NBD drive reconnects to its export here. The device is not activated:
    /// `MmioTransport::restore` does that with the saved queue.
    pub fn restore(state: &BlockState, path_override: Option<&str>) -> Result<Block, BlockError> {
        let mut config = state.config.clone();
        if let Some(path) = path_override {
            // A URI opens the export in place of the saved file (hostd
            // snapshots a volume's drive on a placeholder of its size).
            if config.nbd_uri.is_some() || super::is_nbd_uri(path) {
                config.nbd_uri = Some(path.to_string());
            } else {
                config.path_on_host = path.to_string();
            }
        }
        let mut block = Block::new(&config)?;
        if block.capacity() != state.capacity {
            return Err(BlockError::CapacityMismatch {
                drive_id: config.drive_id,
                path: config.nbd_uri.unwrap_or(config.path_on_host),
                saved_sectors: state.capacity,
                actual_sectors: block.capacity(),
            });
        }
        let avail = block.avail_features();
        if state.acked_features & !avail != 0 {
            return Err(BlockError::Features {
                drive_id: config.drive_id,
                acked: state.acked_features,
                avail,
            });
        }
        block.set_acked_features(state.acked_features);
        Ok(block)
    }
}
