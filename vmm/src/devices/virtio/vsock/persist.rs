//! Snapshot and restore of a vsock device. Connections cannot be saved
//! (their host ends are sockets of the old VMM): the state lists their
//! ports, and the restored device ends each with a RST before anything
//! else reaches the guest. Queues are saved by the transport.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::muxer::HostConnections;
use super::{Vsock, VsockError};
use crate::devices::virtio::{VirtioCommonState, VirtioDevice};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct VsockState {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
    /// The host's side of the guest's connections. A restore ends each of
    /// them with a RST of its own, so connections made after it need not
    /// wait; a snapshot without it (older) gets a transport reset instead.
    #[serde(default)]
    pub host_connections: Option<HostConnections>,
    #[serde(flatten)]
    pub common: VirtioCommonState,
}

impl Vsock {
    pub fn state(&self) -> VsockState {
        VsockState {
            guest_cid: self.guest_cid(),
            uds_path: self.uds_path().to_path_buf(),
            host_connections: Some(self.muxer.saved_connections()),
            common: self.common().state(),
        }
    }

    /// Recreates the device and listens on `uds_path_override` if given
    /// (a clone running next to its origin needs its own socket), else on
    /// the saved path. Not activated: `MmioTransport::restore` does that.
    pub fn restore(
        state: &VsockState,
        uds_path_override: Option<&str>,
    ) -> Result<Vsock, VsockError> {
        let cid =
            u32::try_from(state.guest_cid).map_err(|_| VsockError::CidTooLarge(state.guest_cid))?;
        let path = uds_path_override.map_or_else(|| state.uds_path.clone(), PathBuf::from);
        let mut vsock = Vsock::with_uds_path(cid, path)?;
        vsock.common_mut().restore(&state.common)?;
        vsock.reset_after_restore = !vsock
            .muxer
            .restore_connections(state.host_connections.as_ref());
        Ok(vsock)
    }
}
