//! The vhost-user-blk device of one connection, on the rust-vmm
//! `vhost-user-backend` crate: features, config space, and the request
//! queue, with the attachment's fencing token checked before every request.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueOwnedT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::request::{self, Disk, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SECTOR};
use crate::image;
use crate::registry::{Registry, RegistryError};

pub type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// Bit 30 of the device features: vhost-user protocol features.
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
const QUEUE_SIZE: usize = 1024;
/// `struct virtio_blk_config` up to `write_zeroes_may_unmap` (and padding).
pub const CONFIG_LEN: usize = 60;

/// One connection's device: the volume it opened, with the credential it
/// was opened under.
pub struct BlkBackend {
    reg: Arc<Registry>,
    name: String,
    token: String,
    /// The volume's name, also the GET_ID answer (never the credential:
    /// the guest reads it as the disk's serial).
    id: String,
    file: File,
    /// Bytes; read again when the frontend reads the config space, so a
    /// connection sees the size the volume has when it connects.
    size: AtomicU64,
    mem: RwLock<Mem>,
    event_idx: AtomicBool,
}

impl BlkBackend {
    /// Opens the volume if `token` is its current attachment's credential.
    pub fn open(
        reg: Arc<Registry>,
        name: &str,
        token: &str,
        mem: Mem,
    ) -> Result<BlkBackend, RegistryError> {
        let rec = reg.check(name, token)?;
        let file = image::open(&reg, name).map_err(|e| RegistryError::Io(e.to_string()))?;
        Ok(BlkBackend {
            id: name.to_string(),
            name: name.into(),
            token: token.to_string(),
            file,
            size: AtomicU64::new(rec.size_bytes),
            reg,
            mem: RwLock::new(mem),
            event_idx: AtomicBool::new(false),
        })
    }

    /// Whether the token is still the volume's attachment.
    pub fn allowed(&self) -> bool {
        match self.reg.check(&self.name, &self.token) {
            Ok(_) => true,
            Err(e) => {
                log::warn!("vhost-user {}: request refused: {e}", self.id);
                false
            }
        }
    }

    /// Answers every request on the ring; whether any was used.
    fn process_queue(&self, vring: &VringRwLock<Mem>) -> io::Result<bool> {
        let mem = self.mem.read().unwrap_or_else(|p| p.into_inner()).memory();
        let chains: Vec<_> = vring
            .get_mut()
            .get_queue_mut()
            .iter(mem.clone())
            .map_err(|e| io::Error::other(format!("queue: {e}")))?
            .collect();
        let written = |off: u64, len: u64| self.reg.mark_dirty(&self.name, off, len);
        let disk = Disk {
            file: &self.file,
            size: self.size.load(Ordering::Relaxed),
            id: &self.id,
            written: &written,
        };
        let mut used = false;
        for chain in chains {
            let head = chain.head_index();
            // The gate from the token check until the effect is on the
            // image, as in the NBD server.
            let gate = self.reg.gate_shared();
            // A malformed chain is still given back, with nothing written.
            let len = request::handle(&disk, chain, &mem, || self.allowed()).unwrap_or(0);
            drop(gate);
            vring
                .add_used(head, len)
                .map_err(|e| io::Error::other(format!("used ring: {e}")))?;
            used = true;
        }
        if used
            && vring
                .needs_notification()
                .map_err(|e| io::Error::other(format!("event index: {e}")))?
        {
            vring.signal_used_queue()?;
        }
        Ok(used)
    }
}

/// `struct virtio_blk_config` (little-endian, as virtio 1.x has it).
pub fn config_space(size: u64) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let mut put = |off: usize, b: &[u8]| c[off..off + b.len()].copy_from_slice(b);
    put(0, &(size / SECTOR).to_le_bytes()); // capacity
    put(12, &(QUEUE_SIZE as u32 - 2).to_le_bytes()); // seg_max
    put(20, &(SECTOR as u32).to_le_bytes()); // blk_size
    put(34, &1u16.to_le_bytes()); // num_queues
    put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(40, &MAX_DISCARD_SEG.to_le_bytes());
    put(44, &8u32.to_le_bytes()); // discard_sector_alignment: 4 KiB
    put(48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    put(52, &MAX_DISCARD_SEG.to_le_bytes()); // max_write_zeroes_seg
    put(56, &[1]); // write_zeroes_may_unmap
    c
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock<Mem>;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_DISCARD)
            | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
            | VHOST_USER_F_PROTOCOL_FEATURES
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // Volumes only grow, and the image with them.
        if let Ok(rec) = self.reg.get(&self.name) {
            self.size.fetch_max(rec.size_bytes, Ordering::Relaxed);
        }
        let c = config_space(self.size.load(Ordering::Relaxed));
        let (off, n) = (offset as usize, size as usize);
        // The spec wants the size asked for: bytes past the end read as 0.
        let mut out = vec![0u8; n];
        if off < c.len() {
            let end = c.len().min(off.saturating_add(n));
            out[..end - off].copy_from_slice(&c[off..end]);
        }
        out
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // Only `writeback` is writable, and CONFIG_WCE is not offered.
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the config space is read-only",
        ))
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = mem;
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
            .map_err(|e| log::warn!("vhost-user {}: exit eventfd: {e}", self.id))
            .ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock<Mem>],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected events {evset:?}")));
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Err(io::Error::other(format!("no queue {device_event}")));
        };
        if !self.event_idx.load(Ordering::Relaxed) {
            self.process_queue(vring)?;
            return Ok(());
        }
        // With EVENT_IDX, the ring is drained with notifications off, and
        // looked at again if the driver added requests meanwhile.
        loop {
            vring
                .disable_notification()
                .map_err(|e| io::Error::other(format!("event index: {e}")))?;
            self.process_queue(vring)?;
            if !vring
                .enable_notification()
                .map_err(|e| io::Error::other(format!("event index: {e}")))?
            {
                return Ok(());
            }
        }
    }
}

impl BlkBackend {
    pub fn id(&self) -> &str {
        &self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_fields() {
        let c = config_space(3 << 20);
        let le32 = |o: usize| u32::from_le_bytes(c[o..o + 4].try_into().unwrap());
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 6144);
        assert_eq!(le32(20), 512, "blk_size");
        assert_eq!(le32(40), MAX_DISCARD_SEG);
        assert_eq!(c[56], 1, "write_zeroes_may_unmap");
    }
}
