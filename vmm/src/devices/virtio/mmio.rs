//! virtio-mmio transport, version 2 ("modern"), virtio 1.1 section 4.2.2.

use std::io;
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::{status, Interrupt, Mem, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::devices::bus::{lock, BusDevice};

/// Offset of QueueNotify: the VMM registers each queue's EventFd as a KVM
/// ioeventfd at `mmio_base + NOTIFY_REG_OFFSET` with datamatch = queue index.
pub const NOTIFY_REG_OFFSET: u64 = 0x50;
/// Size of one device's MMIO window.
pub const MMIO_LEN: u64 = 0x1000;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0;
const CONFIG_SPACE_OFFSET: u64 = 0x100;

pub(super) mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// The transport's registers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Regs {
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
}

/// One virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: Mem,
    interrupt: Arc<Interrupt>,
    queue_evts: Vec<Arc<EventFd>>,
    /// The driver's queue configuration; copies go to the device on activation.
    queues: Vec<Queue>,
    /// The driver wrote an invalid size or a misaligned address to a queue.
    queue_config_error: bool,
    regs: Regs,
}

impl MmioTransport {
    pub fn new(mem: Mem, device: Arc<Mutex<dyn VirtioDevice>>) -> io::Result<MmioTransport> {
        let (queue_evts, queues) = {
            let dev = lock(&device);
            let queues = dev
                .queue_max_sizes()
                .iter()
                .map(|&max| {
                    Queue::new(max).unwrap_or_else(|e| {
                        // A device bug, not a guest one: the queue reads as absent.
                        log::error!("virtio: bad queue max size {max}: {e}");
                        Queue::default()
                    })
                })
                .collect();
            (dev.queue_events().to_vec(), queues)
        };
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new()?),
            queue_evts,
            queues,
            queue_config_error: false,
            regs: Regs::default(),
        })
    }

    /// One EventFd per queue, in queue order; register each as a KVM ioeventfd
    /// at `mmio_base + NOTIFY_REG_OFFSET` with datamatch = its index (u32).
    pub fn queue_evts(&self) -> Vec<&EventFd> {
        self.queue_evts.iter().map(|e| e.as_ref()).collect()
    }

    /// The EventFd to register as a KVM irqfd on the device's GSI.
    pub fn irq_evt(&self) -> &EventFd {
        self.interrupt.irq_evt()
    }

    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    fn status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.regs.status | status::DEVICE_NEEDS_RESET
        } else {
            self.regs.status
        }
    }

    fn has_status(&self, bits: u32) -> bool {
        self.regs.status & bits == bits
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.regs.queue_sel as usize)
    }

    /// Queue registers may only change between FEATURES_OK and DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.has_status(status::FEATURES_OK)
            && self.regs.status & (status::DRIVER_OK | status::FAILED) == 0
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => lock(&self.device).device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => {
                let features = lock(&self.device).avail_features();
                match self.regs.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status(),
            reg::CONFIG_GENERATION => self.regs.config_generation,
            _ => {
                crate::guest_warn!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.regs.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.regs.driver_features_sel = v,
            reg::DRIVER_FEATURES => self.write_driver_features(v),
            reg::QUEUE_SEL => self.regs.queue_sel = v,
            reg::QUEUE_NOTIFY => self.notify(v),
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.set_status(v),
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => self.write_queue_reg(offset, v),
            _ => crate::guest_warn!("virtio-mmio: write of unknown register {offset:#x}"),
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        if !self.has_status(status::DRIVER) || self.has_status(status::FEATURES_OK) {
            crate::guest_warn!(
                "virtio-mmio: DriverFeatures written in status {:#x}",
                self.regs.status
            );
            return;
        }
        let f = &mut self.regs.driver_features;
        match self.regs.driver_features_sel {
            0 => *f = (*f & !0xffff_ffff) | u64::from(v),
            1 => *f = (*f & 0xffff_ffff) | (u64::from(v) << 32),
            sel => crate::guest_warn!("virtio-mmio: DriverFeatures written with selector {sel}"),
        }
    }

    fn write_queue_reg(&mut self, offset: u64, v: u32) {
        if !self.queue_config_allowed() {
            // Linux writes QueueReady=0 after a reset while tearing down; harmless.
            if self.has_status(status::DRIVER_OK) {
                crate::guest_warn!(
                    "virtio-mmio: queue register {offset:#x} written after DRIVER_OK"
                );
            }
            return;
        }
        let Some(q) = self.queues.get_mut(self.regs.queue_sel as usize) else {
            crate::guest_warn!("virtio-mmio: queue register written for absent queue");
            return;
        };
        let lo = |old: u64| GuestAddress((old & !0xffff_ffff) | u64::from(v));
        let hi = |old: u64| GuestAddress((old & 0xffff_ffff) | (u64::from(v) << 32));
        let res = match offset {
            reg::QUEUE_NUM => u16::try_from(v)
                .map_err(|_| virtio_queue::Error::InvalidSize)
                .and_then(|size| q.try_set_size(size)),
            reg::QUEUE_READY => {
                q.set_ready(v == 1);
                Ok(())
            }
            reg::QUEUE_DESC_LOW => q.try_set_desc_table_address(lo(q.desc_table())),
            reg::QUEUE_DESC_HIGH => q.try_set_desc_table_address(hi(q.desc_table())),
            reg::QUEUE_DRIVER_LOW => q.try_set_avail_ring_address(lo(q.avail_ring())),
            reg::QUEUE_DRIVER_HIGH => q.try_set_avail_ring_address(hi(q.avail_ring())),
            reg::QUEUE_DEVICE_LOW => q.try_set_used_ring_address(lo(q.used_ring())),
            reg::QUEUE_DEVICE_HIGH => q.try_set_used_ring_address(hi(q.used_ring())),
            _ => Ok(()),
        };
        if let Err(e) = res {
            crate::guest_warn!("virtio-mmio: invalid queue config {offset:#x}={v:#x}: {e}");
            self.queue_config_error = true;
        }
    }

    fn notify(&self, index: u32) {
        match self.queue_evts.get(index as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    crate::guest_warn!("virtio-mmio: failed to signal queue {index}: {e}");
                }
            }
            None => crate::guest_warn!("virtio-mmio: notify for absent queue {index}"),
        }
    }

    fn set_status(&mut self, new: u32) {
        if new == 0 {
            self.reset();
            return;
        }
        let old = self.regs.status;
        if new & old != old {
            crate::guest_warn!(
                "virtio-mmio: status {old:#x} -> {new:#x} clears bits without a reset"
            );
            return;
        }
        let added = new & !old;
        if added & status::FAILED != 0 {
            crate::guest_warn!(
                "virtio-mmio: driver marked device {} FAILED",
                self.device_type()
            );
            self.regs.status |= status::FAILED;
        }
        // Each step of the init sequence needs the previous one (3.1.1).
        let steps = [
            (status::ACKNOWLEDGE, 0),
            (status::DRIVER, status::ACKNOWLEDGE),
            (status::FEATURES_OK, status::DRIVER),
            (status::DRIVER_OK, status::FEATURES_OK),
        ];
        for (bit, needs) in steps {
            if added & bit == 0 {
                continue;
            }
            if !self.has_status(needs) || self.has_status(status::FAILED) {
                crate::guest_warn!("virtio-mmio: invalid status transition {old:#x} -> {new:#x}");
                return;
            }
            match bit {
                status::FEATURES_OK if !self.accept_features() => return,
                status::DRIVER_OK => {
                    self.regs.status |= status::DRIVER_OK;
                    self.activate();
                    continue;
                }
                _ => {}
            }
            self.regs.status |= bit;
        }
    }

    /// FEATURES_OK: the driver's features must be offered and include VERSION_1.
    fn accept_features(&mut self) -> bool {
        let mut dev = lock(&self.device);
        let features = self.regs.driver_features;
        let unknown = features & !dev.avail_features();
        if unknown != 0 || features & (1 << VIRTIO_F_VERSION_1) == 0 {
            crate::guest_warn!(
                "virtio-mmio: refusing driver features {features:#x} (unoffered {unknown:#x})"
            );
            return false;
        }
        dev.set_acked_features(features);
        true
    }

    fn activate(&mut self) {
        let event_idx = self.regs.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            if self.queue_config_error || !q.is_valid(&self.mem) {
                crate::guest_warn!("virtio-mmio: queue {i} is not valid at DRIVER_OK");
                self.interrupt.signal_needs_reset();
                return;
            }
            match Queue::try_from(q.state()) {
                Ok(mut copy) => {
                    copy.set_event_idx(event_idx);
                    queues.push(copy);
                }
                Err(e) => {
                    crate::guest_warn!("virtio-mmio: queue {i}: {e}");
                    self.interrupt.signal_needs_reset();
                    return;
                }
            }
        }
        let res = lock(&self.device).activate(self.mem.clone(), self.interrupt.clone(), queues);
        if let Err(e) = res {
            crate::guest_warn!("virtio-mmio: activation failed: {e}");
            self.interrupt.signal_needs_reset();
        }
    }

    fn reset(&mut self) {
        lock(&self.device).reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_config_error = false;
        self.regs = Regs {
            config_generation: self.regs.config_generation,
            ..Default::default()
        };
        self.interrupt.reset();
    }

    fn device_type(&self) -> u32 {
        lock(&self.device).device_type()
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            lock(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            crate::guest_warn!(
                "virtio-mmio: bad register read at {offset:#x} len {}",
                data.len()
            );
            data.fill(0);
            return;
        }
        let v = self.read_reg(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            lock(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            crate::guest_warn!(
                "virtio-mmio: bad register write at {offset:#x} len {}",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            crate::guest_warn!("virtio-mmio: unaligned register write at {offset:#x}");
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

mod persist;
#[cfg(test)]
mod tests;

pub use persist::{MmioRestoreError, MmioTransportState};
