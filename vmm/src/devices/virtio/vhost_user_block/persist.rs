//! Snapshot and restore of a vhost-user block device: the VMM side only
//! (configuration, negotiated features, config space). The queues are the
//! transport's; the backend is reconnected at restore, possibly on another
//! socket, and must serve a disk of the same capacity.

use serde::{Deserialize, Serialize};

use super::{VhostUserBlock, VhostUserBlockError};
use crate::devices::virtio::{VirtioCommonState, VirtioDevice};
use crate::vmm_config::drive::BlockDeviceConfig;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct VhostUserBlockState {
    pub config: BlockDeviceConfig,
    #[serde(flatten)]
    pub common: VirtioCommonState,
    pub config_space: Vec<u8>,
}

impl VhostUserBlock {
    pub fn state(&self) -> VhostUserBlockState {
        VhostUserBlockState {
            config: self.config().clone(),
            common: self.common().state(),
            config_space: self.config_space().to_vec(),
        }
    }

    /// Reconnects (to `socket_override` if given) and checks that the new
    /// backend offers what the guest already negotiated. The transport
    /// then re-activates it with the saved queues, which starts the rings.
    pub fn restore(
        state: &VhostUserBlockState,
        socket_override: Option<&str>,
    ) -> Result<VhostUserBlock, VhostUserBlockError> {
        let mut config = state.config.clone();
        if let Some(s) = socket_override {
            config.socket = Some(s.to_string());
        }
        let mut dev = VhostUserBlock::new(&config)?;
        let lacks = |what: String| VhostUserBlockError::Features {
            drive_id: config.drive_id.clone(),
            path: config.socket.clone().unwrap_or_default(),
            what,
        };
        if let Err(e) = dev.common_mut().restore(&state.common) {
            return Err(lacks(format!(
                "features {:#x} the guest negotiated before the snapshot",
                e.missing()
            )));
        }
        if dev.capacity() != state.capacity() {
            return Err(lacks(format!(
                "the snapshot's capacity ({} sectors; it serves {})",
                state.capacity(),
                dev.capacity()
            )));
        }
        Ok(dev)
    }
}

impl VhostUserBlockState {
    fn capacity(&self) -> u64 {
        let mut b = [0u8; 8];
        crate::devices::virtio::read_config_bytes(&self.config_space, 0, &mut b);
        u64::from_le_bytes(b)
    }
}
