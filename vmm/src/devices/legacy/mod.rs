//! 8250 serial console and i8042.
