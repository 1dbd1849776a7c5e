//! Snapshot and restore of a network device. The queues are saved by the
//! transport (`MmioTransportState`); the tap is reopened by name.

use serde::{Deserialize, Serialize};

use super::{Net, NetError};
use crate::devices::virtio::{VirtioCommonState, VirtioDevice};
use crate::vmm_config::net::NetworkInterfaceConfig;

/// The interface's configuration (id, tap name, MAC, limiters as they are
/// configured at snapshot time) and the negotiated features. Token
/// budgets are not saved: a restored device starts with full buckets.
/// Neither are tracked connections: the pause before a snapshot ended them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NetState {
    pub config: NetworkInterfaceConfig,
    #[serde(flatten)]
    pub common: VirtioCommonState,
    /// Frames for the guest made at the pause (its RSTs) that its receive
    /// ring had no room for yet, vnet header first: delivered first after
    /// the restore.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_rx_frames: Vec<Vec<u8>>,
}

impl Net {
    pub fn state(&self) -> NetState {
        NetState {
            config: self.config().clone(),
            common: self.common().state(),
            pending_rx_frames: self.pending_rx_frames(),
        }
    }

    /// Reopens the tap (`host_dev_name_override` if given: each clone its
    /// own tap) in the saved configuration. Not activated:
    /// `MmioTransport::restore` does that with the saved queues.
    pub fn restore(
        state: &NetState,
        host_dev_name_override: Option<&str>,
    ) -> Result<Net, NetError> {
        let mut config = state.config.clone();
        if let Some(name) = host_dev_name_override {
            config.host_dev_name = name.to_string();
        }
        let mut net = Net::new(&config)?;
        net.common_mut()
            .restore(&state.common)
            .map_err(|source| NetError::Features {
                iface_id: config.iface_id,
                source,
            })?;
        net.set_pending_rx_frames(&state.pending_rx_frames);
        Ok(net)
    }
}
