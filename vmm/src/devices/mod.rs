//! Emulated devices: legacy (serial, i8042) and virtio over MMIO.

pub mod bus;
pub mod legacy;
pub mod persist;
pub mod virtio;
