//! Legacy PC devices on port I/O: the 8250 serial console and the i8042
//! keyboard controller (guest reboot and Ctrl-Alt-Del).

pub mod i8042;
pub mod serial;

pub use i8042::{I8042RestoreError, I8042State, I8042};
pub use serial::{SerialConsole, SerialConsoleState, SerialRestoreError};

/// COM1.
pub const SERIAL_PORT_BASE: u64 = 0x3f8;
pub const SERIAL_PORT_LEN: u64 = 8;
pub const SERIAL_IRQ: u32 = 4;
/// The i8042 data (0x60) and command/status (0x64) ports.
pub const I8042_PORT_BASE: u64 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;
pub const I8042_IRQ: u32 = 1;
