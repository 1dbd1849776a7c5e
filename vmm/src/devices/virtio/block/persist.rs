//! Snapshot and restore of a block device. The queue itself (positions and
//! rings) is saved by the transport; see `MmioTransportState`.

use serde::{Deserialize, Serialize};

use super::{Block, BlockError, FillState};
use crate::devices::virtio::{VirtioCommonState, VirtioDevice};
use crate::vmm_config::drive::{BlockDeviceConfig, FillFrom};

/// The drive's configuration (id, path, read-only, cache type, serial),
/// its capacity and the negotiated features.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BlockState {
    pub config: BlockDeviceConfig,
    /// In 512-byte sectors; the backing file at restore must have exactly
    /// this capacity, or the guest's filesystem would be cut or misread.
    pub capacity: u64,
    #[serde(flatten)]
    pub common: VirtioCommonState,
    /// A fill in progress (`config.fill_from` is its source): the chunks
    /// already local. A restore continues it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fill: Option<FillState>,
}

impl Block {
    pub fn state(&self) -> BlockState {
        let fill = self.fill_state();
        let mut config = self.config().clone();
        if fill.is_none() {
            // Filled (or never filling): a plain file from now on.
            config.fill_from = None;
        }
        BlockState {
            config,
            capacity: self.capacity(),
            common: self.common().state(),
            fill,
        }
    }

    /// Reopens the drive (at `path_override` if given, e.g. a per-clone copy
    /// of the disk; for an NBD drive the override is a new NBD URI) in its
    /// saved configuration. An NBD drive reconnects to its export here. The device is not activated:
    /// `MmioTransport::restore` does that with the saved queue.
    ///
    /// `fill` makes the (local, overridden) file fill from that source, from
    /// nothing (a migration's destination). A fill the snapshot caught in
    /// progress continues with its saved chunk map, in the same file only:
    /// another file would lack the chunks the map says are local.
    pub fn restore(
        state: &BlockState,
        path_override: Option<&str>,
        fill: Option<&FillFrom>,
    ) -> Result<Block, BlockError> {
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
        let mut saved = state.fill.as_ref();
        if let Some(from) = fill {
            if config.nbd_uri.is_some() || config.socket.is_some() {
                return Err(BlockError::Fill {
                    drive_id: config.drive_id,
                    reason: "only a drive backed by a file (path_on_host) can fill".into(),
                });
            }
            config.fill_from = Some(from.clone());
            saved = None;
        } else if saved.is_some() && path_override.is_some_and(|p| p != state.config.path_on_host) {
            return Err(BlockError::Fill {
                drive_id: config.drive_id,
                reason: format!(
                    "the snapshot caught the drive filling {} from {}; a fill continues in \
                     that file only (or give a new source in fill_overrides)",
                    state.config.path_on_host,
                    state.config.fill_from.as_ref().map_or("", |f| &f.nbd_uri)
                ),
            });
        }
        let mut block = Block::open(&config, saved)?;
        if block.capacity() != state.capacity {
            return Err(BlockError::CapacityMismatch {
                drive_id: config.drive_id,
                path: config.nbd_uri.unwrap_or(config.path_on_host),
                saved_sectors: state.capacity,
                actual_sectors: block.capacity(),
            });
        }
        block
            .common_mut()
            .restore(&state.common)
            .map_err(|source| BlockError::Features {
                drive_id: config.drive_id,
                source,
            })?;
        Ok(block)
    }
}
