//! A small blocking NBD client (fixed newstyle, `NBD_OPT_GO`, simple
//! replies): for tests and benchmarks that talk to NBD servers (ours and
//! others) from the host. It can keep several requests in flight.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use ember_nbd::{
    client_greet, opt_go, opt_starttls, read_simple_data, ReplyHeader, Request, CMD_DISC,
    CMD_FLUSH, CMD_READ, CMD_WRITE, REP_ACK,
};

pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("NBD I/O: {0}")]
    Io(#[from] io::Error),
    #[error("the server refused the export: {0}")]
    Refused(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("{0}")]
    Tls(String),
}

impl From<ember_nbd::Error> for ClientError {
    fn from(e: ember_nbd::Error) -> ClientError {
        match e {
            ember_nbd::Error::Io(e) => ClientError::Io(e),
            // The reason only: the export's name holds its credential.
            ember_nbd::Error::Refused { reason, .. } => ClientError::Refused(reason),
            ember_nbd::Error::Protocol(msg) => ClientError::Protocol(msg),
            other => ClientError::Protocol(other.to_string()),
        }
    }
}

pub struct Client {
    s: Box<dyn Stream>,
    next_cookie: u64,
    pub size: u64,
    pub flags: u16,
}

/// `NBD_OPT_GO` for `export`: its size and transmission flags.
fn go<S: Read + Write>(s: &mut S, export: &str) -> Result<(u64, u16), ClientError> {
    let info = opt_go(s, export)?;
    Ok((info.size, info.flags))
}

/// A reply: the error code (0: success) and a read's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub cookie: u64,
    pub error: u32,
    pub data: Vec<u8>,
}

impl Client {
    pub fn connect_unix(path: &Path, export: &str) -> Result<Client, ClientError> {
        Client::handshake(Box::new(UnixStream::connect(path)?), export)
    }

    pub fn connect_tcp(addr: &str, export: &str) -> Result<Client, ClientError> {
        let s = std::net::TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        Client::handshake(Box::new(s), export)
    }

    /// Opens TCP to `addr` (`HOST:PORT`) and upgrades the session to TLS
    /// with `NBD_OPT_STARTTLS` as the first option (the server's
    /// certificate must chain to `tls`'s CA and name `HOST`; `tls`'s
    /// certificate is presented), then opens `export` inside TLS. A server
    /// that will not start TLS is left: nothing is sent in the clear but
    /// the greeting and the request to start TLS. The negotiation is
    /// bounded by [`ember_tls::HANDSHAKE_TIMEOUT`].
    pub fn connect_tcp_tls(
        addr: &str,
        export: &str,
        tls: &ember_tls::Tls,
    ) -> Result<Client, ClientError> {
        let name = ember_tls::server_name(addr).map_err(ClientError::Tls)?;
        let deadline = std::time::Instant::now() + ember_tls::HANDSHAKE_TIMEOUT;
        let mut tcp = std::net::TcpStream::connect(addr)?;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(ember_tls::HANDSHAKE_TIMEOUT))?;
        tcp.set_write_timeout(Some(ember_tls::HANDSHAKE_TIMEOUT))?;
        client_greet(&mut tcp)?;
        let reply = opt_starttls(&mut tcp)?;
        if reply.reply != REP_ACK {
            return Err(ClientError::Tls(format!(
                "the server at {addr} did not start TLS (reply {:#x}: {})",
                reply.reply,
                String::from_utf8_lossy(&reply.data)
            )));
        }
        let mut s = tls
            .connect_sync(name, tcp, deadline)
            .map_err(|e| ClientError::Tls(format!("{addr}: {e}")))?;
        let (size, flags) = go(&mut s, export)?;
        s.sock.set_read_timeout(None)?;
        s.sock.set_write_timeout(None)?;
        Ok(Client {
            s: Box::new(s),
            next_cookie: 1,
            size,
            flags,
        })
    }

    fn handshake(mut s: Box<dyn Stream>, export: &str) -> Result<Client, ClientError> {
        client_greet(&mut s)?;
        let (size, flags) = go(&mut s, export)?;
        Ok(Client {
            s,
            next_cookie: 1,
            size,
            flags,
        })
    }

    /// Sends one request without waiting; returns its cookie.
    pub fn send(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        data: &[u8],
    ) -> io::Result<u64> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let req = Request {
            flags,
            kind,
            cookie,
            offset,
            length,
        };
        self.s.write_all(&req.encode())?;
        if kind == CMD_WRITE {
            self.s.write_all(data)?;
        }
        Ok(cookie)
    }

    /// Reads one simple reply; `read_len` is the data length if it answers
    /// a read (replies come in any order, so the caller says which).
    pub fn receive(&mut self, read_len: impl Fn(u64) -> usize) -> Result<Reply, ClientError> {
        self.s.flush()?;
        let ReplyHeader::Simple(reply) = ReplyHeader::read(&mut self.s)? else {
            return Err(ClientError::Protocol("bad or structured reply".into()));
        };
        let (error, cookie) = (reply.errno, reply.cookie);
        let mut data = Vec::new();
        if error == 0 {
            data.resize(read_len(cookie), 0);
            read_simple_data(&mut self.s, error, Some(&mut data))?;
        }
        Ok(Reply {
            cookie,
            error,
            data,
        })
    }

    /// One request and its reply.
    pub fn call(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        data: &[u8],
    ) -> Result<Reply, ClientError> {
        self.send(kind, flags, offset, length, data)?;
        let n = if kind == CMD_READ { length as usize } else { 0 };
        self.receive(|_| n)
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Result<Reply, ClientError> {
        self.call(CMD_READ, 0, offset, len, &[])
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<Reply, ClientError> {
        self.call(CMD_WRITE, 0, offset, data.len() as u32, data)
    }

    pub fn flush(&mut self) -> Result<Reply, ClientError> {
        self.call(CMD_FLUSH, 0, 0, 0, &[])
    }

    /// Ends the session politely.
    pub fn disconnect(mut self) -> io::Result<()> {
        self.send(CMD_DISC, 0, 0, 0, &[])?;
        self.s.flush()
    }
}
