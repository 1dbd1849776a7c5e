//! A minimal i8042 keyboard controller: enough for Linux's driver to probe a
//! keyboard, for "reboot=k" (pulse reset, 0xfe) to end the VM, and for the
//! host to send Ctrl-Alt-Del.

use std::collections::VecDeque;

use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;

mod persist;
pub use persist::{I8042RestoreError, I8042State};

const OFS_DATA: u64 = 0;
const OFS_STATUS: u64 = 4; // reads status, writes commands

const SB_OUT_FULL: u8 = 0x01;
const SB_SYSTEM_FLAG: u8 = 0x04;
const SB_LAST_WAS_CMD: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

const CTR_KBD_INT: u8 = 0x01;
const CTR_AUX_DISABLED: u8 = 0x20;

const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_OK: u8 = 0xaa;
const KBD_CMD_RESET: u8 = 0xff;
const KBD_CMD_GET_ID: u8 = 0xf2;
const KBD_CMD_SET_LEDS: u8 = 0xed;
const KBD_CMD_SET_RATE: u8 = 0xf3;

/// Scan codes (set 2, as the guest expects before translation) for
/// Ctrl-Alt-Del: press Ctrl, Alt, Del, then release them.
const CTRL_ALT_DEL: [u8; 14] = [
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14, 0, 0, 0,
];
const CTRL_ALT_DEL_LEN: usize = 11;
const BUF_MAX: usize = 32;

pub struct I8042 {
    status: u8,
    ctr: u8,
    outp: u8,
    /// The command whose data byte comes next on the data port.
    pending_cmd: Option<u8>,
    /// A keyboard command waiting for its argument (LEDs, rate).
    pending_kbd_arg: bool,
    buf: VecDeque<u8>,
    irq: EventFd,
    reset: EventFd,
    /// The guest asked for a reset (logged once; not part of the state:
    /// a VM that asked never runs again).
    reset_requested: bool,
}

impl I8042 {
    /// `irq` is the keyboard interrupt (IRQ 1) irqfd; `reset` is written when
    /// the guest resets the CPU through the controller.
    pub fn new(irq: EventFd, reset: EventFd) -> Self {
        I8042 {
            status: SB_SYSTEM_FLAG | SB_KBD_ENABLED,
            ctr: CTR_KBD_INT | CTR_AUX_DISABLED | SB_SYSTEM_FLAG,
            outp: 0,
            pending_cmd: None,
            pending_kbd_arg: false,
            buf: VecDeque::new(),
            irq,
            reset,
            reset_requested: false,
        }
    }

    /// Queues Ctrl-Alt-Del key presses and releases for the guest.
    pub fn trigger_ctrl_alt_del(&mut self) {
        for b in &CTRL_ALT_DEL[..CTRL_ALT_DEL_LEN] {
            self.push(*b);
        }
        self.raise_irq();
    }

    fn push(&mut self, b: u8) {
        if self.buf.len() < BUF_MAX {
            self.buf.push_back(b);
        }
        self.status |= SB_OUT_FULL;
    }

    fn raise_irq(&self) {
        if self.ctr & CTR_KBD_INT != 0 && !self.buf.is_empty() {
            if let Err(e) = self.irq.write(1) {
                crate::guest_warn!("i8042: cannot raise IRQ: {e}");
            }
        }
    }

    fn pop(&mut self) -> u8 {
        let b = self.buf.pop_front().unwrap_or(0);
        if self.buf.is_empty() {
            self.status &= !SB_OUT_FULL;
        } else {
            self.raise_irq();
        }
        b
    }

    fn command(&mut self, cmd: u8) {
        self.status |= SB_LAST_WAS_CMD;
        match cmd {
            CMD_READ_CTR => self.push(self.ctr),
            CMD_WRITE_CTR | CMD_WRITE_OUTP => self.pending_cmd = Some(cmd),
            CMD_READ_OUTP => self.push(self.outp),
            CMD_SELF_TEST => self.push(0x55),
            CMD_KBD_TEST => self.push(0x00),
            // No auxiliary (mouse) port: its test fails, as on a keyboard-only controller.
            CMD_AUX_TEST => self.push(0xff),
            CMD_DISABLE_KBD => self.status &= !SB_KBD_ENABLED,
            CMD_ENABLE_KBD => self.status |= SB_KBD_ENABLED,
            CMD_DISABLE_AUX | CMD_ENABLE_AUX => {}
            CMD_RESET_CPU => {
                // The VM ends at the first request; a guest that keeps
                // asking until its vCPU is stopped logs no more lines.
                if !self.reset_requested {
                    log::info!("i8042: guest requested CPU reset");
                }
                self.reset_requested = true;
                if let Err(e) = self.reset.write(1) {
                    crate::guest_warn!("i8042: cannot signal reset: {e}");
                }
            }
            _ => log::debug!("i8042: ignoring command {cmd:#x}"),
        }
        self.raise_irq();
    }

    fn data(&mut self, b: u8) {
        self.status &= !SB_LAST_WAS_CMD;
        match self.pending_cmd.take() {
            Some(CMD_WRITE_CTR) => {
                self.ctr = b;
                return;
            }
            Some(CMD_WRITE_OUTP) => {
                self.outp = b;
                return;
            }
            _ => {}
        }
        // A byte to the keyboard itself.
        if self.pending_kbd_arg {
            self.pending_kbd_arg = false;
            self.push(KBD_ACK);
        } else {
            match b {
                KBD_CMD_RESET => {
                    self.push(KBD_ACK);
                    self.push(KBD_SELF_TEST_OK);
                }
                KBD_CMD_GET_ID => {
                    self.push(KBD_ACK);
                    self.push(0xab);
                    self.push(0x83);
                }
                KBD_CMD_SET_LEDS | KBD_CMD_SET_RATE => {
                    self.pending_kbd_arg = true;
                    self.push(KBD_ACK);
                }
                _ => self.push(KBD_ACK),
            }
        }
        self.raise_irq();
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            OFS_DATA => self.pop(),
            OFS_STATUS => self.status,
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&b) = data.first() else { return };
        match offset {
            OFS_DATA => self.data(b),
            OFS_STATUS => self.command(b),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> I8042 {
        I8042::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        )
    }

    fn read(d: &mut I8042, off: u64) -> u8 {
        let mut b = [0u8];
        d.read(off, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_signals_reset() {
        let mut d = dev();
        assert!(d.reset.read().is_err()); // nothing yet (EAGAIN)
        d.write(OFS_STATUS, &[CMD_RESET_CPU]);
        assert_eq!(d.reset.read().unwrap(), 1);
    }

    #[test]
    fn self_test_and_ctr_round_trip() {
        let mut d = dev();
        d.write(OFS_STATUS, &[CMD_SELF_TEST]);
        assert_ne!(read(&mut d, OFS_STATUS) & SB_OUT_FULL, 0);
        assert_eq!(read(&mut d, OFS_DATA), 0x55);
        assert_eq!(read(&mut d, OFS_STATUS) & SB_OUT_FULL, 0);
        d.write(OFS_STATUS, &[CMD_WRITE_CTR]);
        d.write(OFS_DATA, &[0x47]);
        d.write(OFS_STATUS, &[CMD_READ_CTR]);
        assert_eq!(read(&mut d, OFS_DATA), 0x47);
    }

    #[test]
    fn keyboard_reset_and_ctrl_alt_del() {
        let mut d = dev();
        d.write(OFS_DATA, &[KBD_CMD_RESET]);
        assert_eq!(read(&mut d, OFS_DATA), KBD_ACK);
        assert_eq!(read(&mut d, OFS_DATA), KBD_SELF_TEST_OK);
        d.trigger_ctrl_alt_del();
        assert!(d.irq.read().unwrap() >= 1);
        let got: Vec<u8> = (0..CTRL_ALT_DEL_LEN)
            .map(|_| read(&mut d, OFS_DATA))
            .collect();
        assert_eq!(got, CTRL_ALT_DEL[..CTRL_ALT_DEL_LEN]);
    }
}
