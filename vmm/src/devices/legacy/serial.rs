//! The 8250 UART (vm-superio) as the guest's console, writing to a file or
//! stdout. Interrupts go to KVM through an irqfd.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;

mod persist;
pub use persist::{SerialConsoleState, SerialRestoreError};

/// Raises the serial IRQ by writing the irqfd.
pub struct IrqFdTrigger(pub EventFd);

impl Trigger for IrqFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub type SerialOut = Box<dyn Write + Send>;

pub struct SerialConsole {
    serial: Serial<IrqFdTrigger, NoEvents, SerialOut>,
}

impl SerialConsole {
    pub fn new(irq: EventFd, out: SerialOut) -> Self {
        SerialConsole {
            serial: Serial::new(IrqFdTrigger(irq), out),
        }
    }

    /// Feeds host input (e.g. stdin) to the guest.
    pub fn enqueue_input(&mut self, bytes: &[u8]) {
        if let Err(e) = self.serial.enqueue_raw_bytes(bytes) {
            log::debug!("serial input dropped: {e:?}");
        }
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            *b = self.serial.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            if let Err(e) = self.serial.write(off, *b) {
                log::debug!("serial write failed: {e:?}");
            }
        }
    }
}
