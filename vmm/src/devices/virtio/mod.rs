//! Virtio devices on the virtio-mmio transport.
//!
//! A device (`Block`, `Vsock`) is shared as `Arc<Mutex<..>>` between the
//! transport (vCPU threads: register accesses, activation, reset) and the
//! event manager on the device thread (queue and backend events). Lock order
//! is always transport, then device; the device thread only takes the device
//! lock, and the device never calls back into the transport.
//!
//! Writing a device: it holds a [`VirtioCommon`] (type, queue sizes,
//! features, queue EventFds, the activation, the broken flag), writes
//! `virtio_common_accessors!(common)` in its `impl VirtioDevice`, and adds
//! only what is its own: `read_config`, and the hooks `on_activate`,
//! `on_reset`, `on_pause`/`on_resume`, `after_restore`. Its saved state
//! flattens a [`VirtioCommonState`] (the acked features), restored with
//! `VirtioCommon::restore`. `common/tests.rs` has a complete one.
//!
//! Wiring one device (what the builder does):
//! ```ignore
//! let dev = Arc::new(Mutex::new(Block::new(&cfg)?));
//! let transport = MmioTransport::new(mem.clone(), dev.clone())?;
//! for (i, evt) in transport.queue_evts().into_iter().enumerate() {
//!     vm.register_ioevent(evt, &IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET), i as u32)?;
//! }
//! vm.register_irqfd(transport.irq_evt(), gsi)?;
//! mmio_bus.insert(Arc::new(Mutex::new(transport)), base, MMIO_LEN)?;
//! event_manager.add_subscriber(dev); // Arc<Mutex<dyn MutEventSubscriber + Send>>
//! ```
//!
//! Snapshots: `MmioTransport::state()` holds the registers and the queues
//! (with the device's ring positions), `Block::state()`/`Vsock::state()` the
//! rest. Restoring is `Block::restore`/`Vsock::restore`, then
//! `MmioTransport::restore(mem, dev, &state)` in place of `new`, then the
//! same wiring; `devices::persist` does the first two steps per MMIO slot.

pub mod block;
mod common;
pub mod mmio;
pub mod net;
pub mod persist;
mod queue;
#[cfg(test)]
pub(crate) mod test_utils;
pub mod vhost_user_block;
pub mod vsock;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use common::{Activation, UnofferedFeatures, VirtioCommon};
pub use mmio::{MmioTransport, MmioTransportState, MMIO_LEN, NOTIFY_REG_OFFSET};
pub use persist::{VirtQueueState, VirtioCommonState};

/// Guest memory as seen by the devices: the VMM's, with its dirty bitmap,
/// so device writes count for Diff snapshots.
pub type Mem = crate::vstate::memory::GuestMemoryMmap;

/// Device IDs (virtio 1.1, section 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_VSOCK: u32 = 19;

/// Interrupt status bits of the virtio-mmio InterruptStatus register.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x01;
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x02;

/// Feature bits shared by all devices.
pub const VIRTIO_F_VERSION_1: u32 = 32;
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Device status bits (virtio 1.1, section 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// Why a device refused to activate.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("expected {expected} queues, got {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("device is already active")]
    AlreadyActive,
}

/// Interrupt state shared by a transport and its device.
///
/// The status bits back the InterruptStatus register; `irq_evt` is registered
/// by the VMM as a KVM irqfd (edge-triggered) on the device's GSI.
pub struct Interrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    irq_evt: EventFd,
}

impl Interrupt {
    pub fn new() -> io::Result<Interrupt> {
        Ok(Interrupt {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            irq_evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Sets `bits` in InterruptStatus and raises the interrupt line.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.irq_evt.write(1) {
            crate::guest_warn!("virtio: failed to signal irq eventfd: {e}");
        }
    }

    /// Signals used buffers in some queue.
    pub fn signal_used(&self) {
        self.trigger(VIRTIO_MMIO_INT_VRING);
    }

    /// The device hit an error it cannot recover from without a reset
    /// (usually a misbehaving driver): report DEVICE_NEEDS_RESET.
    pub fn signal_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.trigger(VIRTIO_MMIO_INT_CONFIG);
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    pub fn irq_evt(&self) -> &EventFd {
        &self.irq_evt
    }

    fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }
}

/// Writes a device's `VirtioDevice::common` and `common_mut`: its
/// `VirtioCommon` is the field named. Use it inside the
/// `impl VirtioDevice` block: `virtio_common_accessors!(common);`.
macro_rules! virtio_common_accessors {
    ($field:ident) => {
        fn common(&self) -> &$crate::devices::virtio::VirtioCommon {
            &self.$field
        }

        fn common_mut(&mut self) -> &mut $crate::devices::virtio::VirtioCommon {
            &mut self.$field
        }
    };
}
pub(crate) use virtio_common_accessors;

/// A virtio device behind a transport.
///
/// A device implements `common`/`common_mut` (with
/// `virtio_common_accessors!`) and what is its own: its
/// config space and the hooks below. Everything the transport asks about
/// identity, features, activation, queue state and reset is answered by the
/// default methods from [`VirtioCommon`]; devices do not override those.
pub trait VirtioDevice: Send {
    fn common(&self) -> &VirtioCommon;

    fn common_mut(&mut self) -> &mut VirtioCommon;

    /// Reads device config space; bytes outside it read as zero. The
    /// default is a device without config space.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&[], offset, data);
    }

    /// The default is a read-only config space.
    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        crate::guest_warn!(
            "{}: guest write to read-only config space at {offset:#x}",
            self.common().name()
        );
    }

    /// Called once the device was activated (the activation is in
    /// `common()`): start whatever processes the queues, pick up work
    /// queued before DRIVER_OK.
    fn on_activate(&mut self) {}

    /// The device's own part of a reset, called before the common part is
    /// cleared (so the activation is still there to stop). Backend
    /// resources (disk file, vsock listener, tap) are kept.
    fn on_reset(&mut self) {}

    /// Called once by `MmioTransport::restore` right after it re-activated
    /// the device from a snapshot (no driver handshake happened).
    fn after_restore(&mut self) {}

    /// Called on the VMM thread right after the vCPUs stopped (`PATCH /vm`
    /// Paused), before any snapshot is taken.
    fn on_pause(&mut self) {}

    /// Called on the VMM thread just before the vCPUs run again.
    fn on_resume(&mut self) {}

    /// Virtio device ID (`TYPE_BLOCK`, `TYPE_VSOCK`).
    fn device_type(&self) -> u32 {
        self.common().device_type()
    }

    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16] {
        self.common().queue_max_sizes()
    }

    /// One EventFd per queue, written on a driver notification (by a KVM
    /// ioeventfd or by the transport). Handled on the device thread.
    fn queue_events(&self) -> &[Arc<EventFd>] {
        self.common().queue_events()
    }

    fn avail_features(&self) -> u64 {
        self.common().avail_features()
    }

    fn acked_features(&self) -> u64 {
        self.common().acked_features()
    }

    /// Called by the transport once the driver set FEATURES_OK with a subset
    /// of `avail_features()`.
    fn set_acked_features(&mut self, features: u64) {
        self.common_mut().set_acked_features(features);
    }

    /// Starts the device with the queues the driver configured.
    fn activate(
        &mut self,
        mem: Mem,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        self.common_mut().activate(mem, interrupt, queues)?;
        self.on_activate();
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.common().is_activated()
    }

    /// The queues of an activated device, with their ring positions (for
    /// snapshots); empty when not activated.
    fn queue_states(&self) -> Vec<QueueState> {
        self.common().queue_states()
    }

    /// Returns the device to its pre-activation state (driver wrote 0 to
    /// Status): the device's `on_reset`, then the common part.
    fn reset(&mut self) {
        self.on_reset();
        self.common_mut().reset();
    }
}

/// Copies the part of `config` at `offset` into `data`, zero-filling the rest.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}
