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

/// Most bytes of guest console output one VMM writes: a guest that prints
/// without end must not fill the host's disk (or its run-dir tmpfs).
pub const SERIAL_LIMIT_BYTES: u64 = 16 << 20;

/// A console output that takes `limit` bytes, then one line saying so,
/// then swallows the rest (the guest's writes still succeed).
struct Capped {
    out: SerialOut,
    left: u64,
    said_so: bool,
}

impl Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            if !self.said_so {
                self.said_so = true;
                let _ = self.out.write_all(
                    b"\n[ember-vmm: console output limit reached; the rest is dropped]\n",
                );
                let _ = self.out.flush();
            }
            return Ok(buf.len());
        }
        let n = (buf.len() as u64).min(self.left) as usize;
        let written = self.out.write(&buf[..n])?;
        self.left -= written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

pub(super) fn capped(out: SerialOut, limit: u64) -> SerialOut {
    Box::new(Capped {
        out,
        left: limit,
        said_so: false,
    })
}

pub struct SerialConsole {
    serial: Serial<IrqFdTrigger, NoEvents, SerialOut>,
}

impl SerialConsole {
    pub fn new(irq: EventFd, out: SerialOut) -> Self {
        SerialConsole {
            serial: Serial::new(IrqFdTrigger(irq), capped(out, SERIAL_LIMIT_BYTES)),
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A console output the test can read back.
    #[derive(Clone, Default)]
    pub(crate) struct Sink(pub(crate) Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A guest that prints for ever fills its console up to the limit and
    /// one line more; its writes keep succeeding.
    #[test]
    fn console_output_stops_at_the_limit() {
        let sink = Sink::default();
        let mut out = capped(Box::new(sink.clone()), 1000);
        for _ in 0..10_000 {
            out.write_all(b"0123456789abcdef").unwrap();
        }
        let got = sink.0.lock().unwrap().clone();
        assert!(got.starts_with(b"0123456789abcdef"));
        assert_eq!(got.len(), 1000 + got[1000..].len());
        let tail = String::from_utf8_lossy(&got[1000..]);
        assert!(tail.contains("console output limit reached"), "{tail}");
        assert!(got.len() < 1200, "{}", got.len());
    }
}
