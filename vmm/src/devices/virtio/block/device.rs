//! The virtio-blk device: config space, features, queue processing.

use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::EventFd;

use super::disk::Disk;
use super::{request, BlockError, CacheType, QUEUE_SIZE};
use crate::devices::virtio::queue::{drain, notify};
use crate::devices::virtio::{
    new_queue_events, read_config_bytes, ActivateError, Interrupt, Mem, VirtioDevice, TYPE_BLOCK,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::vmm_config::drive::BlockDeviceConfig;

const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
const VIRTIO_BLK_F_RO: u32 = 5;
const VIRTIO_BLK_F_FLUSH: u32 = 9;
const VIRTIO_BLK_F_DISCARD: u32 = 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;

/// Most sectors in one DISCARD or WRITE_ZEROES segment (1 GiB); one
/// segment per request.
const MAX_RANGE_SECTORS: u32 = 1 << 21;
/// Length of `struct virtio_blk_config` up to `write_zeroes_may_unmap`
/// and its padding.
const CONFIG_LEN: usize = 60;

/// Data segments per request the driver may use (SEG_MAX). Without it Linux
/// sends one segment per request; more segments mean fewer, larger requests,
/// and every request costs guest kernel time and a VM exit.
const SEG_MAX: u32 = 128;

/// Bounce buffer for moving data between guest memory and the file.
const BOUNCE_LEN: usize = 128 * 1024;

struct Active {
    mem: Mem,
    interrupt: Arc<Interrupt>,
    queue: Queue,
}

pub struct Block {
    config: BlockDeviceConfig,
    disk: Disk,
    /// `struct virtio_blk_config`: capacity (le64), size_max (le32, not
    /// offered), seg_max (le32), then at 36.. the discard and at 48.. the
    /// write-zeroes limits.
    config_space: [u8; CONFIG_LEN],
    avail_features: u64,
    acked_features: u64,
    queue_evts: Vec<Arc<EventFd>>,
    active: Option<Active>,
    /// The driver broke the queue protocol; nothing is processed until reset.
    broken: bool,
    bounce: Vec<u8>,
}

impl Block {
    pub fn new(config: &BlockDeviceConfig) -> Result<Block, BlockError> {
        let disk = Disk::open(config)?;
        let mut avail_features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SEG_MAX);
        if disk.read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        }
        if disk.cache_type == CacheType::Writeback {
            avail_features |= 1 << VIRTIO_BLK_F_FLUSH;
        }
        if !disk.read_only && disk.can_discard() {
            avail_features |= 1 << VIRTIO_BLK_F_DISCARD;
        }
        if !disk.read_only && disk.can_write_zeroes() {
            avail_features |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        let queue_evts = new_queue_events(1).map_err(|source| BlockError::EventFd {
            drive_id: config.drive_id.clone(),
            source,
        })?;
        let mut config_space = [0u8; CONFIG_LEN];
        config_space[..8].copy_from_slice(&disk.sectors().to_le_bytes());
        config_space[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        // max_discard_sectors, max_discard_seg, discard_sector_alignment.
        config_space[36..40].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
        config_space[40..44].copy_from_slice(&1u32.to_le_bytes());
        config_space[44..48].copy_from_slice(&1u32.to_le_bytes());
        // max_write_zeroes_sectors, max_write_zeroes_seg; may_unmap stays 0.
        config_space[48..52].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
        config_space[52..56].copy_from_slice(&1u32.to_le_bytes());
        Ok(Block {
            config: config.clone(),
            config_space,
            disk,
            avail_features,
            acked_features: 0,
            queue_evts,
            active: None,
            broken: false,
            bounce: vec![0; BOUNCE_LEN],
        })
    }

    /// Connects to the drive's NBD export and hangs up: tells at
    /// configuration time whether the server is there and speaks NBD.
    pub fn probe(config: &BlockDeviceConfig) -> Result<(), BlockError> {
        if let Some(uri) = &config.nbd_uri {
            let cache_type = CacheType::parse(&config.drive_id, config.cache_type.as_deref())?;
            super::disk::open_nbd(config, uri, cache_type)?;
        }
        Ok(())
    }

    pub fn id(&self) -> &str {
        &self.config.drive_id
    }

    pub fn config(&self) -> &BlockDeviceConfig {
        &self.config
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.sectors()
    }

    /// Runs every pending request and interrupts the guest if it asked to be.
    pub fn process_queue(&mut self) {
        if self.broken {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let (disk, bounce) = (&mut self.disk, &mut self.bounce);
        let mem = &active.mem;
        let res = drain(&mut active.queue, mem, |chain| {
            request::execute(disk, chain, mem, bounce)
        });
        match res {
            Ok(true) => notify(&mut active.queue, mem, &active.interrupt),
            Ok(false) => {}
            Err(e) => {
                log::warn!(
                    "virtio-blk {}: queue error, device needs reset: {e}",
                    self.config.drive_id
                );
                self.broken = true;
                active.interrupt.signal_needs_reset();
            }
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn queue_events(&self) -> &[Arc<EventFd>] {
        &self.queue_evts
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::warn!("virtio-blk: guest write to read-only config space at {offset:#x}");
    }

    fn activate(
        &mut self,
        mem: Mem,
        interrupt: Arc<Interrupt>,
        mut queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: queues.len(),
            });
        }
        let queue = queues.remove(0);
        self.active = Some(Active {
            mem,
            interrupt,
            queue,
        });
        self.broken = false;
        // Requests queued before DRIVER_OK are picked up on the device thread.
        if let Err(e) = self.queue_evts[0].write(1) {
            log::warn!("virtio-blk: cannot kick queue after activation: {e}");
        }
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active.iter().map(|a| a.queue.state()).collect()
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.broken = false;
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        let evt = &self.queue_evts[0];
        if let Err(e) = ops.add(Events::new(evt.as_ref(), EventSet::IN)) {
            log::error!(
                "virtio-blk {}: cannot register queue event: {e:?}",
                self.config.drive_id
            );
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        // Drain the eventfd first so a notification that races with
        // processing re-arms it instead of being lost.
        if let Err(e) = self.queue_evts[0].read() {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                log::warn!("virtio-blk: queue event read failed: {e}");
            }
        }
        if !events.event_set().contains(EventSet::IN) {
            log::warn!("virtio-blk: unexpected event set {:?}", events.event_set());
            return;
        }
        self.process_queue();
    }
}
