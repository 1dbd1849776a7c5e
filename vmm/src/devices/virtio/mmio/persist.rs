//! Snapshot and restore of the virtio-mmio transport: its registers, the
//! interrupt line and every queue with its ring positions.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::{MmioTransport, Regs};
use crate::devices::bus::lock;
use crate::devices::virtio::{
    status, ActivateError, Mem, VirtQueueState, VirtioDevice, VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING,
};

/// Everything the guest driver sees of a transport, plus the device's queue
/// positions once activated.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct MmioTransportState {
    /// Checked on restore: the state must go back to the same kind of device.
    pub device_type: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub config_generation: u32,
    /// InterruptStatus bits not yet acknowledged by the driver.
    pub interrupt_status: u32,
    /// The device reported DEVICE_NEEDS_RESET.
    pub needs_reset: bool,
    /// The driver wrote an invalid queue configuration before DRIVER_OK.
    pub queue_config_error: bool,
    /// One per queue, in queue order. For an activated device these are the
    /// device's queues (with next_avail/next_used), else the driver's
    /// configuration so far.
    pub queues: Vec<VirtQueueState>,
}

/// Why a transport could not be restored; the state or the device does not
/// fit, or the state points outside guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MmioRestoreError {
    #[error("cannot create the interrupt eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("saved device type {saved} does not match the device's type {actual}")]
    DeviceType { saved: u32, actual: u32 },
    #[error("saved state has {saved} queues, the device has {actual}")]
    QueueCount { saved: usize, actual: usize },
    #[error("queue {index}: saved max size {saved}, the device's is {actual}")]
    QueueMaxSize {
        index: usize,
        saved: u16,
        actual: u16,
    },
    #[error("queue {index}: invalid saved queue: {source}")]
    InvalidQueue {
        index: usize,
        source: virtio_queue::Error,
    },
    #[error(
        "queue {index}: rings of size {size} at desc {desc:#x}, avail {avail:#x}, \
         used {used:#x} are not ready or not within guest memory"
    )]
    QueueOutsideMemory {
        index: usize,
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
    },
    #[error(
        "queue {index}: saved next_used {saved} but the used ring in guest memory \
         says {in_memory} (state and memory are from different snapshots?)"
    )]
    UsedIndexMismatch {
        index: usize,
        saved: u16,
        in_memory: u16,
    },
    #[error("driver features {driver:#x} include ones the device does not offer ({avail:#x})")]
    Features { driver: u64, avail: u64 },
    #[error("cannot re-activate the device: {0}")]
    Activate(#[from] ActivateError),
}

impl MmioTransport {
    /// Transport and queue state, for snapshots. Take it with the device
    /// thread quiescent (the VMM thread, between events) and guest memory
    /// saved at the same point, so ring positions match memory.
    pub fn state(&self) -> MmioTransportState {
        let dev = lock(&self.device);
        let active = if dev.is_activated() {
            dev.queue_states()
        } else {
            Vec::new()
        };
        let queues = if active.is_empty() {
            self.queues.iter().map(|q| q.state().into()).collect()
        } else {
            active.into_iter().map(VirtQueueState::from).collect()
        };
        MmioTransportState {
            device_type: dev.device_type(),
            device_features_sel: self.regs.device_features_sel,
            driver_features_sel: self.regs.driver_features_sel,
            driver_features: self.regs.driver_features,
            queue_sel: self.regs.queue_sel,
            status: self.regs.status,
            config_generation: self.regs.config_generation,
            interrupt_status: self.interrupt.status(),
            needs_reset: self.interrupt.needs_reset(),
            queue_config_error: self.queue_config_error,
            queues,
        }
    }

    /// Rebuilds a transport for `device` (freshly restored, not activated)
    /// from `state`. When the driver had set DRIVER_OK, the device is
    /// activated again with the saved queues, without any driver handshake,
    /// and its `after_restore` hook runs. `mem` must already hold the
    /// snapshot's guest memory: queue addresses are checked against it.
    ///
    /// Pending interrupt bits are re-signalled on the irqfd once; register
    /// the irqfd (and the queue ioeventfds) afterwards as for a new device:
    /// a count already in an eventfd is delivered when KVM picks it up.
    pub fn restore(
        mem: Mem,
        device: Arc<Mutex<dyn VirtioDevice>>,
        state: &MmioTransportState,
    ) -> Result<MmioTransport, MmioRestoreError> {
        let mut t = MmioTransport::new(mem, device).map_err(MmioRestoreError::EventFd)?;
        let queues = t.check_and_build_queues(state)?;
        let activate = state.status & status::DRIVER_OK != 0
            && state.status & status::FAILED == 0
            && !state.needs_reset;
        if activate {
            t.check_rings(&queues)?;
        }
        {
            let mut dev = lock(&t.device);
            let avail = dev.avail_features();
            if state.driver_features & !avail != 0 {
                return Err(MmioRestoreError::Features {
                    driver: state.driver_features,
                    avail,
                });
            }
            if state.status & status::FEATURES_OK != 0 {
                dev.set_acked_features(state.driver_features);
            }
        }

        t.regs = Regs {
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            driver_features: state.driver_features,
            queue_sel: state.queue_sel,
            status: state.status,
            config_generation: state.config_generation,
        };
        t.queue_config_error = state.queue_config_error;
        let bits = state.interrupt_status & (VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
        t.interrupt.status.store(bits, Ordering::SeqCst);
        t.interrupt
            .needs_reset
            .store(state.needs_reset, Ordering::SeqCst);

        if activate {
            // The device gets copies; the transport keeps the driver's view.
            let copies = queues
                .iter()
                .enumerate()
                .map(|(index, q)| {
                    Queue::try_from(q.state())
                        .map_err(|source| MmioRestoreError::InvalidQueue { index, source })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let mut dev = lock(&t.device);
            dev.activate(t.mem.clone(), t.interrupt.clone(), copies)?;
            dev.after_restore();
        }
        t.queues = queues;
        if bits != 0 {
            // The guest may not have seen these yet; a spurious interrupt is harmless.
            if let Err(e) = t.interrupt.irq_evt().write(1) {
                crate::guest_warn!("virtio-mmio: cannot re-signal interrupt after restore: {e}");
            }
        }
        Ok(t)
    }

    /// Validates the saved queues against the device and rebuilds them.
    fn check_and_build_queues(
        &self,
        state: &MmioTransportState,
    ) -> Result<Vec<Queue>, MmioRestoreError> {
        let dev = lock(&self.device);
        let actual = dev.device_type();
        if state.device_type != actual {
            return Err(MmioRestoreError::DeviceType {
                saved: state.device_type,
                actual,
            });
        }
        let max_sizes = dev.queue_max_sizes();
        if state.queues.len() != max_sizes.len() {
            return Err(MmioRestoreError::QueueCount {
                saved: state.queues.len(),
                actual: max_sizes.len(),
            });
        }
        state
            .queues
            .iter()
            .zip(max_sizes)
            .enumerate()
            .map(|(index, (qs, &max))| {
                if qs.max_size != max {
                    return Err(MmioRestoreError::QueueMaxSize {
                        index,
                        saved: qs.max_size,
                        actual: max,
                    });
                }
                Queue::try_from(QueueState::from(qs))
                    .map_err(|source| MmioRestoreError::InvalidQueue { index, source })
            })
            .collect()
    }

    /// An activated device's rings must lie in guest memory, and the used
    /// index there must be where the device left it.
    fn check_rings(&self, queues: &[Queue]) -> Result<(), MmioRestoreError> {
        for (index, q) in queues.iter().enumerate() {
            if !q.is_valid(&self.mem) {
                return Err(MmioRestoreError::QueueOutsideMemory {
                    index,
                    size: q.size(),
                    desc: q.desc_table(),
                    avail: q.avail_ring(),
                    used: q.used_ring(),
                });
            }
            // used_ring + 2 is used.idx; is_valid checked the whole ring.
            let at = q.used_ring().wrapping_add(2);
            let in_memory: u16 = self.mem.read_obj(GuestAddress(at)).map_err(|_| {
                MmioRestoreError::QueueOutsideMemory {
                    index,
                    size: q.size(),
                    desc: q.desc_table(),
                    avail: q.avail_ring(),
                    used: q.used_ring(),
                }
            })?;
            let in_memory = u16::from_le(in_memory);
            if in_memory != q.next_used() {
                return Err(MmioRestoreError::UsedIndexMismatch {
                    index,
                    saved: q.next_used(),
                    in_memory,
                });
            }
        }
        Ok(())
    }
}
