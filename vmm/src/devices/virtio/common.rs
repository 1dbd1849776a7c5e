//! The part every virtio device shares: its identity (type, queue sizes),
//! feature negotiation, the queue notification EventFds, the activation
//! (guest memory, interrupt, queues) and the "broken until reset" flag.
//!
//! A device holds one `VirtioCommon`, hands it out through
//! [`VirtioDevice::common`](super::VirtioDevice::common), and the trait's
//! default methods answer the transport from it; the device itself only
//! supplies its config space and its hooks (what activation starts, what a
//! reset drops, pause and resume).

use std::fmt;
use std::io;
use std::sync::Arc;

use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::persist::VirtioCommonState;
use super::{ActivateError, Interrupt, Mem};

/// What an activated device works with: guest memory, the interrupt line
/// shared with its transport, and the queues the driver configured (in
/// queue order).
pub struct Activation {
    pub mem: Mem,
    pub interrupt: Arc<Interrupt>,
    pub queues: Vec<Queue>,
}

/// State and behaviour shared by all virtio devices.
pub struct VirtioCommon {
    device_type: u32,
    /// Prefix of the log lines written here, e.g. "virtio-blk rootfs".
    name: String,
    queue_max_sizes: Vec<u16>,
    avail_features: u64,
    acked_features: u64,
    /// One per queue, written on a driver notification (by a KVM ioeventfd
    /// or by the transport); read on the device thread.
    queue_evts: Vec<Arc<EventFd>>,
    active: Option<Activation>,
    /// The driver broke the queue protocol; nothing is processed until reset.
    broken: bool,
}

/// A saved `acked_features` with bits the (re-created) device does not offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("saved features {acked:#x} are not all offered ({avail:#x})")]
pub struct UnofferedFeatures {
    pub acked: u64,
    pub avail: u64,
}

impl UnofferedFeatures {
    /// The saved bits that are not offered.
    pub fn missing(&self) -> u64 {
        self.acked & !self.avail
    }
}

impl VirtioCommon {
    /// A device of `device_type` with one queue per entry of
    /// `queue_max_sizes` (and an EventFd for each), offering `avail_features`.
    pub fn new(
        device_type: u32,
        name: impl Into<String>,
        queue_max_sizes: &[u16],
        avail_features: u64,
    ) -> io::Result<VirtioCommon> {
        let queue_evts = queue_max_sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK).map(Arc::new))
            .collect::<io::Result<_>>()?;
        Ok(VirtioCommon {
            device_type,
            name: name.into(),
            queue_max_sizes: queue_max_sizes.to_vec(),
            avail_features,
            acked_features: 0,
            queue_evts,
            active: None,
            broken: false,
        })
    }

    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    pub fn queue_events(&self) -> &[Arc<EventFd>] {
        &self.queue_evts
    }

    pub fn avail_features(&self) -> u64 {
        self.avail_features
    }

    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Keeps the offered subset of `features`.
    pub fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    /// Whether the driver acked feature bit `bit`.
    pub fn is_acked(&self, bit: u32) -> bool {
        bit < 64 && self.acked_features & (1 << bit) != 0
    }

    /// The activate guard: refuses a second activation and a wrong number
    /// of queues, else keeps what the device works with from now on and
    /// clears `broken`.
    pub fn activate(
        &mut self,
        mem: Mem,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let expected = self.queue_max_sizes.len();
        if queues.len() != expected {
            return Err(ActivateError::QueueCount {
                expected,
                got: queues.len(),
            });
        }
        self.active = Some(Activation {
            mem,
            interrupt,
            queues,
        });
        self.broken = false;
        Ok(())
    }

    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    pub fn active(&self) -> Option<&Activation> {
        self.active.as_ref()
    }

    pub fn active_mut(&mut self) -> Option<&mut Activation> {
        self.active.as_mut()
    }

    /// The activation, unless the device is broken: what queue processing
    /// works on.
    pub fn working_mut(&mut self) -> Option<&mut Activation> {
        if self.broken {
            return None;
        }
        self.active.as_mut()
    }

    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The driver broke the queue protocol (or the device cannot go on):
    /// warn, stop processing until a reset, and report DEVICE_NEEDS_RESET.
    pub fn mark_broken(&mut self, why: impl fmt::Display) {
        crate::guest_warn!("{}: {why}; device needs reset", self.name);
        self.broken = true;
        self.signal_needs_reset();
    }

    /// Reports DEVICE_NEEDS_RESET to an activated device's driver.
    pub fn signal_needs_reset(&self) {
        if let Some(a) = &self.active {
            a.interrupt.signal_needs_reset();
        }
    }

    /// Wakes the device thread for queue `index`, as a driver notification
    /// would.
    pub fn kick(&self, index: usize) {
        let Some(evt) = self.queue_evts.get(index) else {
            return;
        };
        if let Err(e) = evt.write(1) {
            crate::guest_warn!("{}: cannot kick queue {index}: {e}", self.name);
        }
    }

    /// The queues of an activated device, with their ring positions (for
    /// snapshots); empty when not activated.
    pub fn queue_states(&self) -> Vec<QueueState> {
        self.active
            .iter()
            .flat_map(|a| a.queues.iter().map(|q| q.state()))
            .collect()
    }

    /// Back to the pre-activation state: no activation, nothing acked, not
    /// broken. The EventFds stay (the VMM registered them with KVM).
    pub fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.broken = false;
    }

    /// The part of a device's snapshot that every device has.
    pub fn state(&self) -> VirtioCommonState {
        VirtioCommonState {
            acked_features: self.acked_features,
        }
    }

    /// Takes back a saved [`VirtioCommonState`] into a freshly built device,
    /// which must offer every feature the driver had acked.
    pub fn restore(&mut self, state: &VirtioCommonState) -> Result<(), UnofferedFeatures> {
        if state.acked_features & !self.avail_features != 0 {
            return Err(UnofferedFeatures {
                acked: state.acked_features,
                avail: self.avail_features,
            });
        }
        self.acked_features = state.acked_features;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
