//! The state of all devices in a snapshot, and the glue the builder uses to
//! save and restore the virtio ones. Each device saves its own state next to
//! its code (`<device>/persist.rs`); this only groups them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;
use serde::{Deserialize, Serialize};

use super::bus::lock;

use super::legacy::{I8042State, SerialConsoleState};
use super::virtio::block::{Block, BlockError, BlockState};
use super::virtio::mmio::MmioRestoreError;
use super::virtio::net::{Net, NetError, NetState};
use super::virtio::vhost_user_block::{VhostUserBlock, VhostUserBlockError, VhostUserBlockState};
use super::virtio::vsock::{Vsock, VsockError, VsockState};
use super::virtio::{Mem, MmioTransport, MmioTransportState, VirtioDevice};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum VirtioDeviceState {
    Block(BlockState),
    Vsock(VsockState),
    Net(NetState),
    VhostUserBlock(VhostUserBlockState),
}

/// One virtio-mmio slot: the transport and the device behind it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct VirtioSlotState {
    pub transport: MmioTransportState,
    pub device: VirtioDeviceState,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct DevicesState {
    pub serial: SerialConsoleState,
    pub i8042: I8042State,
    /// Indexed by MMIO slot (`builder::mmio_slot(index)`): a restored
    /// device must go back to the same address and GSI.
    pub virtio: Vec<VirtioSlotState>,
}

/// Per-restore changes: each clone may use its own disk files and socket.
#[derive(Debug, Default, Clone)]
pub struct RestoreOverrides {
    /// drive_id -> path_on_host.
    pub drive_paths: HashMap<String, String>,
    pub vsock_uds_path: Option<String>,
    /// iface_id -> host_dev_name (each clone its own tap).
    pub net_tap_names: HashMap<String, String>,
    /// drive_id -> socket of its vhost-user backend.
    pub vhost_user_sockets: HashMap<String, String>,
    /// drive_id -> the source its (local) file fills from.
    pub drive_fills: HashMap<String, crate::vmm_config::drive::FillFrom>,
}

#[derive(Debug, thiserror::Error)]
pub enum DevicePersistError {
    #[error("virtio slot {slot}: {source}")]
    Block { slot: usize, source: BlockError },
    #[error("virtio slot {slot}: vsock: {source}")]
    Vsock { slot: usize, source: VsockError },
    #[error("virtio slot {slot}: {source}")]
    Net { slot: usize, source: NetError },
    #[error("virtio slot {slot}: {source}")]
    VhostUserBlock {
        slot: usize,
        source: VhostUserBlockError,
    },
    #[error("virtio slot {slot}: transport: {source}")]
    Transport {
        slot: usize,
        source: MmioRestoreError,
    },
}

/// A virtio device by kind, as the VMM keeps it (for runtime control and
/// snapshots) and as an event-loop subscriber.
#[derive(Clone)]
pub enum VirtioDeviceHandle {
    Block(Arc<Mutex<Block>>),
    Vsock(Arc<Mutex<Vsock>>),
    Net(Arc<Mutex<Net>>),
    VhostUserBlock(Arc<Mutex<VhostUserBlock>>),
}

impl VirtioDeviceHandle {
    /// Runs `f` on the device, locked.
    pub fn with_device<R>(&self, f: impl FnOnce(&mut dyn VirtioDevice) -> R) -> R {
        match self {
            VirtioDeviceHandle::Block(b) => f(&mut *lock(b)),
            VirtioDeviceHandle::Vsock(v) => f(&mut *lock(v)),
            VirtioDeviceHandle::Net(n) => f(&mut *lock(n)),
            VirtioDeviceHandle::VhostUserBlock(b) => f(&mut *lock(b)),
        }
    }

    /// For `EventManager::add_subscriber`.
    pub fn subscriber(&self) -> Arc<Mutex<dyn MutEventSubscriber + Send>> {
        match self {
            VirtioDeviceHandle::Block(b) => b.clone(),
            VirtioDeviceHandle::Vsock(v) => v.clone(),
            VirtioDeviceHandle::Net(n) => n.clone(),
            VirtioDeviceHandle::VhostUserBlock(b) => b.clone(),
        }
    }
}

/// Saves every virtio slot, in slot order. Run on the VMM thread (no queue
/// processing meanwhile), with the vCPUs paused, at the same point as
/// guest memory.
pub fn save_virtio(
    slots: &[(VirtioDeviceHandle, Arc<Mutex<MmioTransport>>)],
) -> Vec<VirtioSlotState> {
    slots
        .iter()
        .map(|(dev, transport)| VirtioSlotState {
            device: match dev {
                VirtioDeviceHandle::Block(b) => VirtioDeviceState::Block(lock(b).state()),
                VirtioDeviceHandle::Vsock(v) => VirtioDeviceState::Vsock(lock(v).state()),
                VirtioDeviceHandle::Net(n) => VirtioDeviceState::Net(lock(n).state()),
                VirtioDeviceHandle::VhostUserBlock(b) => {
                    VirtioDeviceState::VhostUserBlock(lock(b).state())
                }
            },
            transport: lock(transport).state(),
        })
        .collect()
}

/// Restores the device and transport of one slot. `mem` must already hold
/// the snapshot's memory. The caller then wires it up exactly as
/// `builder::attach_one` does for a new device (ioeventfds, irqfd, MMIO bus
/// at `mmio_slot(slot)`, event manager subscriber, kernel command line not
/// needed). An activated vsock has already queued its transport reset.
pub fn restore_virtio(
    mem: &Mem,
    slot: usize,
    state: &VirtioSlotState,
    overrides: &RestoreOverrides,
) -> Result<(VirtioDeviceHandle, MmioTransport), DevicePersistError> {
    let (restored, device): (_, Arc<Mutex<dyn VirtioDevice>>) = match &state.device {
        VirtioDeviceState::Block(b) => {
            let path = overrides.drive_paths.get(&b.config.drive_id);
            let fill = overrides.drive_fills.get(&b.config.drive_id);
            let dev = Block::restore(b, path.map(String::as_str), fill)
                .map_err(|source| DevicePersistError::Block { slot, source })?;
            let dev = Arc::new(Mutex::new(dev));
            (VirtioDeviceHandle::Block(dev.clone()), dev)
        }
        VirtioDeviceState::Vsock(v) => {
            let dev = Vsock::restore(v, overrides.vsock_uds_path.as_deref())
                .map_err(|source| DevicePersistError::Vsock { slot, source })?;
            let dev = Arc::new(Mutex::new(dev));
            (VirtioDeviceHandle::Vsock(dev.clone()), dev)
        }
        VirtioDeviceState::Net(n) => {
            let name = overrides.net_tap_names.get(&n.config.iface_id);
            let dev = Net::restore(n, name.map(String::as_str))
                .map_err(|source| DevicePersistError::Net { slot, source })?;
            let dev = Arc::new(Mutex::new(dev));
            (VirtioDeviceHandle::Net(dev.clone()), dev)
        }
        VirtioDeviceState::VhostUserBlock(b) => {
            let socket = overrides.vhost_user_sockets.get(&b.config.drive_id);
            let dev = VhostUserBlock::restore(b, socket.map(String::as_str))
                .map_err(|source| DevicePersistError::VhostUserBlock { slot, source })?;
            let dev = Arc::new(Mutex::new(dev));
            (VirtioDeviceHandle::VhostUserBlock(dev.clone()), dev)
        }
    };
    let transport = MmioTransport::restore(mem.clone(), device, &state.transport)
        .map_err(|source| DevicePersistError::Transport { slot, source })?;
    Ok((restored, transport))
}

#[cfg(test)]
mod tests;
