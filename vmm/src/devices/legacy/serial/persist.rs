//! Snapshot and restore of the serial console (vm-superio's `SerialState`,
//! which has no serde support, mirrored here).

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use super::{IrqFdTrigger, SerialConsole, SerialOut};

/// vm-superio's receive FIFO size: a longer saved input buffer is corrupt.
const FIFO_SIZE: usize = 64;

/// The UART's registers and the guest input not yet read.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SerialConsoleState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum SerialRestoreError {
    #[error("serial: saved input buffer of {len} bytes exceeds the {FIFO_SIZE}-byte FIFO")]
    FifoTooLong { len: usize },
    #[error("serial: cannot raise the pending interrupt: {0}")]
    Irq(std::io::Error),
}

impl SerialConsole {
    pub fn state(&self) -> SerialConsoleState {
        let s = self.serial.state();
        SerialConsoleState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Recreates the console with its saved registers and pending input;
    /// an interrupt the guest had enabled and not yet serviced is raised
    /// again on `irq`.
    pub fn restore(
        irq: EventFd,
        out: SerialOut,
        state: &SerialConsoleState,
    ) -> Result<SerialConsole, SerialRestoreError> {
        if state.in_buffer.len() > FIFO_SIZE {
            return Err(SerialRestoreError::FifoTooLong {
                len: state.in_buffer.len(),
            });
        }
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let serial = Serial::from_state(
            &s,
            IrqFdTrigger(irq),
            NoEvents,
            super::capped(out, super::SERIAL_LIMIT_BYTES),
        )
        .map_err(|e| match e {
            vm_superio::serial::Error::Trigger(e) | vm_superio::serial::Error::IOError(e) => {
                SerialRestoreError::Irq(e)
            }
            vm_superio::serial::Error::FullFifo => SerialRestoreError::FifoTooLong {
                len: state.in_buffer.len(),
            },
        })?;
        Ok(SerialConsole { serial })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::Sink;
    use super::*;
    use crate::devices::bus::BusDevice;

    const IER: u64 = 1;
    const LCR: u64 = 3;
    const SCR: u64 = 7;
    const IER_RDA: u8 = 1;

    fn evt() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    fn read(s: &mut SerialConsole, off: u64) -> u8 {
        let mut b = [0u8];
        s.read(off, &mut b);
        b[0]
    }

    #[test]
    fn round_trip_keeps_registers_and_pending_input() {
        let mut s = SerialConsole::new(evt(), Box::new(Sink::default()));
        s.write(SCR, &[0x5a]);
        s.write(LCR, &[0x03]);
        s.write(IER, &[IER_RDA]);
        s.enqueue_input(b"hi");
        let state = s.state();
        let json = serde_json::to_string(&state).unwrap();
        let back: SerialConsoleState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);

        let irq = evt();
        let out = Sink::default();
        let mut r =
            SerialConsole::restore(irq.try_clone().unwrap(), Box::new(out.clone()), &back).unwrap();
        assert_eq!(r.state(), state);
        // Unread input with RDA enabled: the interrupt is raised again.
        assert_eq!(irq.read().unwrap(), 1);
        for off in [IER, LCR, SCR, 5, 6] {
            assert_eq!(read(&mut r, off), read(&mut s, off), "register {off}");
        }
        assert_eq!(read(&mut r, 0), b'h');
        assert_eq!(read(&mut r, 0), b'i');
        r.write(0, b"x");
        assert_eq!(*out.0.lock().unwrap(), b"x");
    }

    #[test]
    fn oversized_fifo_is_refused() {
        let mut state = SerialConsole::new(evt(), Box::new(Sink::default())).state();
        state.in_buffer = vec![0; FIFO_SIZE + 1];
        let err = SerialConsole::restore(evt(), Box::new(Sink::default()), &state)
            .err()
            .unwrap();
        assert!(
            matches!(err, SerialRestoreError::FifoTooLong { len: 65 }),
            "{err}"
        );
    }
}
