//! Snapshot and restore of the i8042 controller.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::{BUF_MAX, I8042};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct I8042State {
    pub status: u8,
    pub ctr: u8,
    pub outp: u8,
    /// A controller command waiting for its data byte.
    pub pending_cmd: Option<u8>,
    /// A keyboard command waiting for its argument.
    pub pending_kbd_arg: bool,
    /// Bytes not yet read by the guest, oldest first.
    pub buf: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum I8042RestoreError {
    #[error("i8042: saved output buffer of {len} bytes exceeds {BUF_MAX}")]
    BufferTooLong { len: usize },
}

impl I8042 {
    pub fn state(&self) -> I8042State {
        I8042State {
            status: self.status,
            ctr: self.ctr,
            outp: self.outp,
            pending_cmd: self.pending_cmd,
            pending_kbd_arg: self.pending_kbd_arg,
            buf: self.buf.iter().copied().collect(),
        }
    }

    /// Recreates the controller; unread output raises IRQ 1 again (if the
    /// guest enabled it) so the guest does not wait for an edge it missed.
    pub fn restore(
        irq: EventFd,
        reset: EventFd,
        state: &I8042State,
    ) -> Result<I8042, I8042RestoreError> {
        if state.buf.len() > BUF_MAX {
            return Err(I8042RestoreError::BufferTooLong {
                len: state.buf.len(),
            });
        }
        let dev = I8042 {
            status: state.status,
            ctr: state.ctr,
            outp: state.outp,
            pending_cmd: state.pending_cmd,
            pending_kbd_arg: state.pending_kbd_arg,
            buf: VecDeque::from(state.buf.clone()),
            irq,
            reset,
            reset_requested: false,
        };
        dev.raise_irq();
        Ok(dev)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{CMD_WRITE_CTR, KBD_CMD_SET_LEDS, OFS_DATA, OFS_STATUS, SB_OUT_FULL};
    use super::*;
    use crate::devices::bus::BusDevice;

    fn evt() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    fn read(d: &mut I8042, off: u64) -> u8 {
        let mut b = [0u8];
        d.read(off, &mut b);
        b[0]
    }

    fn round_trip(d: &I8042, irq: EventFd) -> I8042 {
        let json = serde_json::to_string(&d.state()).unwrap();
        let state: I8042State = serde_json::from_str(&json).unwrap();
        assert_eq!(state, d.state());
        I8042::restore(irq, evt(), &state).unwrap()
    }

    #[test]
    fn restores_pending_output_and_commands() {
        let mut d = I8042::new(evt(), evt());
        d.trigger_ctrl_alt_del();
        assert_eq!(read(&mut d, OFS_DATA), 0x14); // first byte consumed before the snapshot
        d.write(OFS_STATUS, &[CMD_WRITE_CTR]); // data byte still to come
        let irq = evt();
        let mut r = round_trip(&d, irq.try_clone().unwrap());
        assert_eq!(irq.read().unwrap(), 1, "unread bytes re-raise IRQ 1");
        assert_eq!(r.state(), d.state());
        assert_eq!(read(&mut r, OFS_STATUS), read(&mut d, OFS_STATUS));
        assert_ne!(read(&mut r, OFS_STATUS) & SB_OUT_FULL, 0);
        // The pending CTR write completes on the restored device.
        r.write(OFS_DATA, &[0x45]);
        d.write(OFS_DATA, &[0x45]);
        assert_eq!(r.state().ctr, 0x45);
        let rest = |x: &mut I8042| (0..10).map(|_| read(x, OFS_DATA)).collect::<Vec<_>>();
        assert_eq!(rest(&mut r), rest(&mut d));
        assert_eq!(r.state(), d.state());
    }

    #[test]
    fn restores_pending_keyboard_argument() {
        let mut d = I8042::new(evt(), evt());
        d.write(OFS_DATA, &[KBD_CMD_SET_LEDS]);
        let mut r = round_trip(&d, evt());
        assert!(r.state().pending_kbd_arg);
        r.write(OFS_DATA, &[0x07]); // the LED argument, acked
        assert!(!r.state().pending_kbd_arg);
    }

    #[test]
    fn oversized_buffer_is_refused() {
        let mut state = I8042::new(evt(), evt()).state();
        state.buf = vec![0; BUF_MAX + 1];
        let err = I8042::restore(evt(), evt(), &state).err().unwrap();
        assert!(
            matches!(err, I8042RestoreError::BufferTooLong { len: 33 }),
            "{err}"
        );
    }
}
