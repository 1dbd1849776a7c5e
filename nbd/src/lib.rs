//! The NBD wire protocol, as the NBD project's protocol document
//! (`doc/proto.md`) defines it, for every NBD speaker in Ember: the VMM's
//! NBD client, the volume service's server and client, and hostd's
//! forwarder between a jailed VMM and the volume service.
//!
//! - [`consts`]: magic numbers, flags, options, reply and chunk types,
//!   commands and error values (all re-exported at the crate root).
//! - The handshake (fixed newstyle only): [`ServerGreeting`], client
//!   flags, [`OptionHeader`]/[`OptionRequest`],
//!   [`OptionReplyHeader`]/[`OptionReply`], the data of `NBD_OPT_GO`/`INFO`
//!   ([`GoRequest`]) and of `NBD_REP_INFO` ([`Info`]), the answer to
//!   `NBD_OPT_EXPORT_NAME` ([`ExportNameReply`]), and the client's and the
//!   server's steps built from them ([`client_greet`], [`opt_go`],
//!   [`opt_structured_reply`], [`opt_starttls`], [`server_greet`]).
//! - Transmission: [`Request`], [`SimpleReply`], structured reply chunks
//!   ([`ChunkHeader`], [`OffsetHole`], [`ErrorChunk`]), the next reply of
//!   any request ([`ReplyHeader::read`]) and a client's reassembly of a
//!   structured read ([`ChunkProgress`]).
//! - Errors ([`Error`]) and the mapping of I/O errors to NBD error values
//!   ([`errno_of`]).
//!
//! Fixed-size headers encode to and decode from byte arrays, so async
//! code reads the bytes its own way and decodes here; the `read`/`write`
//! helpers work on any blocking `Read`/`Write`. Nothing a peer sends
//! makes this crate allocate more than a stated bound: option data,
//! option replies and non-data chunks are refused over
//! [`MAX_OPTION_DATA`] before they are read.

pub mod consts;
mod error;
mod handshake;
mod transmission;
mod wire;

pub use consts::*;
pub use error::{errno_of, rep_error_name, Error};
pub use handshake::{
    client_flags_for, client_greet, decode_server_entry, encode_option, encode_server_entry,
    opt_go, opt_starttls, opt_structured_reply, server_greet, write_option, write_option_reply,
    ExportInfo, ExportNameReply, GoRequest, Info, InfoBlockSize, InfoExport, OptionHeader,
    OptionReply, OptionReplyHeader, OptionRequest, ServerGreeting,
};
pub use transmission::{
    read_simple_data, ChunkHeader, ChunkProgress, Command, ErrorChunk, OffsetHole, ReplyHeader,
    Request, SimpleReply,
};

#[cfg(test)]
mod tests;
