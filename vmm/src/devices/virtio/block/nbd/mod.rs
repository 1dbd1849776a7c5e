//! A network block device backend: the VMM speaks the NBD protocol itself.

mod client;
mod protocol;
#[cfg(test)]
mod server_tests;
mod uri;

pub use client::{Durability, NbdClient, DEFAULT_TIMEOUT};
pub use protocol::NbdError;
pub use uri::NbdUri;
