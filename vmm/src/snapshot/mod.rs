pub mod format;
pub mod memory;
