//! A network block device backend: the VMM speaks the NBD protocol itself
//! (its wire format is `ember_nbd`'s).

mod client;
mod conn;
mod engine;
#[cfg(test)]
mod server_tests;
mod uri;

pub use client::NbdClient;
pub use conn::probe;
pub use ember_nbd::{
    Error as NbdError, ExportInfo, TFLAG_READ_ONLY, TFLAG_SEND_TRIM, TFLAG_SEND_WRITE_ZEROES,
};
pub use engine::{Completion, Durability, NbdEngine, Op, DEFAULT_TIMEOUT, MAX_REQUEST};
pub use uri::NbdUri;
