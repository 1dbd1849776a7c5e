//! The protocol layer's errors, and the mapping between NBD error values
//! and I/O errors.

use std::io;

use crate::consts::{EIO, ENOSPC, ENOTSUP};

/// An error of the protocol layer. `Io` is a transport failure (a client
/// may reconnect); the others mean the peer broke the protocol, or the
/// server refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The stream failed or ended.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The peer sent something the protocol does not allow (or that is
    /// over one of this crate's bounds).
    #[error("NBD protocol: {0}")]
    Protocol(String),
    /// The server refused to open the export.
    #[error("server refused export {export:?}: {reason}")]
    Refused {
        /// The export asked for.
        export: String,
        /// The error reply's name and message.
        reason: String,
    },
    /// The server answered a request with an error value.
    #[error("server error {errno} ({})", io::Error::from_raw_os_error(*errno as i32))]
    Server {
        /// The NBD error value (an errno).
        errno: u32,
    },
}

impl Error {
    /// Whether the transport failed (as opposed to the peer misbehaving).
    pub fn is_transport(&self) -> bool {
        matches!(self, Error::Io(_))
    }
}

/// A protocol error with `msg`.
pub(crate) fn proto(msg: impl Into<String>) -> Error {
    Error::Protocol(msg.into())
}

impl From<Error> for io::Error {
    /// Transport errors as they were; the rest as invalid data.
    fn from(e: Error) -> io::Error {
        match e {
            Error::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
        }
    }
}

/// The NBD error value a server answers for a failed I/O: `ENOSPC` and
/// `ENOTSUP` as they are, anything else as `EIO`. (Linux's errno values
/// are the protocol's, so the host's code is compared as is.)
pub fn errno_of(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(code) if code == ENOSPC as i32 => ENOSPC,
        Some(code) if code == ENOTSUP as i32 => ENOTSUP,
        _ => EIO,
    }
}

/// The name of an option error reply type (`NBD_REP_ERR_*`).
pub fn rep_error_name(reply: u32) -> &'static str {
    use crate::consts::*;
    match reply {
        REP_ERR_UNSUP => "unsupported",
        REP_ERR_POLICY => "policy",
        REP_ERR_INVALID => "invalid",
        REP_ERR_PLATFORM => "platform",
        REP_ERR_TLS_REQD => "TLS required",
        REP_ERR_UNKNOWN => "unknown export",
        REP_ERR_SHUTDOWN => "shutdown",
        REP_ERR_BLOCK_SIZE_REQD => "block size required",
        REP_ERR_TOO_BIG => "too big",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consts::*;

    #[test]
    fn io_errors_map_to_nbd_values() {
        let e = io::Error::from_raw_os_error(28);
        assert_eq!(errno_of(&e), ENOSPC);
        assert_eq!(errno_of(&io::Error::from_raw_os_error(95)), ENOTSUP);
        assert_eq!(errno_of(&io::Error::from_raw_os_error(13)), EIO);
        assert_eq!(errno_of(&io::Error::other("x")), EIO);
    }

    #[test]
    fn errors_convert_to_io_errors() {
        let e: io::Error = Error::Io(io::ErrorKind::UnexpectedEof.into()).into();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let e: io::Error = proto("bad magic").into();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("bad magic"));
        assert!(Error::Server { errno: EIO }
            .to_string()
            .contains("server error 5"));
    }

    #[test]
    fn error_reply_names() {
        assert_eq!(rep_error_name(REP_ERR_UNKNOWN), "unknown export");
        assert_eq!(rep_error_name(REP_ERR_POLICY), "policy");
        assert_eq!(rep_error_name(REP_FLAG_ERROR | 77), "error");
    }
}
