//! A network block device backend: the VMM speaks the NBD protocol itself.

mod client;
mod conn;
mod engine;
mod protocol;
#[cfg(test)]
mod server_tests;
mod uri;

pub use client::NbdClient;
pub use conn::probe;
pub use engine::{Completion, Durability, NbdEngine, Op, DEFAULT_TIMEOUT, MAX_REQUEST};
pub use protocol::{ExportInfo, NbdError, TF_READ_ONLY, TF_SEND_TRIM, TF_SEND_WRITE_ZEROES};
pub use uri::NbdUri;
