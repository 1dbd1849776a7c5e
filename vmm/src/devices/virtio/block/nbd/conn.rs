//! One transport connection to an NBD server (TCP or unix socket), opened
//! and through the handshake within a timeout.

use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use ember_nbd::{Command, ExportInfo, Request};

use super::uri::{Address, NbdUri};
use super::NbdError;

pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub(crate) fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    /// Ends the connection both ways: a thread blocked reading it wakes up.
    pub(crate) fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(b),
            Stream::Unix(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(b),
            Stream::Unix(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The two halves of a connection after the handshake: replies are read
/// on one thread while requests are written on another.
pub(crate) struct Conn {
    pub(crate) reader: BufReader<Stream>,
    pub(crate) writer: Stream,
}

/// The fixed newstyle handshake: structured replies asked for (and used
/// if the server agrees), then `export` opened with `NBD_OPT_GO`.
fn handshake<S: Read + Write>(s: &mut S, export: &str) -> Result<ExportInfo, NbdError> {
    ember_nbd::client_greet(s)?;
    let declined = ember_nbd::opt_structured_reply(s)?;
    if let Some(reply) = &declined {
        log::debug!("nbd: no structured replies: {}", reply.describe());
    }
    let export = ember_nbd::opt_go(s, export)?;
    Ok(ExportInfo {
        size: export.size,
        flags: export.flags,
        structured: declined.is_none(),
    })
}

/// Opens a connection and runs the handshake, all within `timeout`. The
/// read half then blocks without a timeout (an idle connection is fine);
/// request timeouts are the engine's, which shuts a stuck connection down.
pub(crate) fn connect(uri: &NbdUri, timeout: Duration) -> Result<(Conn, ExportInfo), NbdError> {
    let mut stream = match &uri.address {
        Address::Tcp { host, port } => {
            if let Some(e) = crate::seccomp::inet_refused() {
                return Err(e.into());
            }
            let addrs: Vec<_> = (host.as_str(), *port).to_socket_addrs()?.collect();
            let mut last =
                io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"));
            let mut found = None;
            for a in addrs {
                match TcpStream::connect_timeout(&a, timeout) {
                    Ok(s) => {
                        found = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let s = found.ok_or(last)?;
            s.set_nodelay(true)?;
            s.set_write_timeout(Some(timeout))?;
            Stream::Tcp(s)
        }
        Address::Unix { path } => {
            let s = UnixStream::connect(path)?;
            s.set_write_timeout(Some(timeout))?;
            Stream::Unix(s)
        }
    };
    stream.set_read_timeout(Some(timeout))?;
    let info = handshake(&mut stream, &uri.export)?;
    stream.set_read_timeout(None)?;
    let writer = stream.try_clone()?;
    Ok((
        Conn {
            reader: BufReader::with_capacity(256 * 1024, stream),
            writer,
        },
        info,
    ))
}

/// Connects, reads the export's information and hangs up: whether the
/// server is there and speaks NBD, and the export's current size.
pub fn probe(uri: &NbdUri, timeout: Duration) -> Result<ExportInfo, NbdError> {
    let (mut conn, info) = connect(uri, timeout)?;
    let hdr = Request::new(Command::Disconnect, 0, 0, 0, 0);
    let _ = conn.writer.write_all(&hdr.encode());
    conn.writer.shutdown();
    Ok(info)
}
