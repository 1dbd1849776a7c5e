//! A small blocking NBD client (fixed newstyle, `NBD_OPT_GO`, simple
//! replies): for tests and benchmarks that talk to NBD servers (ours and
//! others) from the host. It can keep several requests in flight.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::proto::*;

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

pub struct Client {
    s: Box<dyn Stream>,
    next_cookie: u64,
    pub size: u64,
    pub flags: u16,
}

/// The server's greeting, and the client's flags in answer.
fn greet<S: Read + Write>(s: &mut S) -> Result<(), ClientError> {
    if read_u64(s)? != NBDMAGIC || read_u64(s)? != IHAVEOPT {
        return Err(ClientError::Protocol("not a newstyle NBD server".into()));
    }
    let server_flags = read_u16(s)?;
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ClientError::Protocol("server is not fixed newstyle".into()));
    }
    let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
    if server_flags & FLAG_NO_ZEROES != 0 {
        client_flags |= FLAG_C_NO_ZEROES;
    }
    s.write_all(&client_flags.to_be_bytes())?;
    Ok(())
}

fn send_option<S: Write>(s: &mut S, option: u32, data: &[u8]) -> io::Result<()> {
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)?;
    s.flush()
}

/// One option reply: its type and data.
fn read_option_reply<S: Read>(s: &mut S) -> Result<(u32, Vec<u8>), ClientError> {
    if read_u64(s)? != OPT_REPLY_MAGIC {
        return Err(ClientError::Protocol("bad option reply magic".into()));
    }
    let _option = read_u32(s)?;
    let reply = read_u32(s)?;
    let len = read_u32(s)?;
    if len > MAX_OPTION {
        return Err(ClientError::Protocol("option reply too long".into()));
    }
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body)?;
    Ok((reply, body))
}

/// `NBD_OPT_GO` for `export`: its size and transmission flags.
fn go<S: Read + Write>(s: &mut S, export: &str) -> Result<(u64, u16), ClientError> {
    let mut data = Vec::new();
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    send_option(s, OPT_GO, &data)?;
    let (mut size, mut flags) = (None, 0);
    loop {
        let (reply, body) = read_option_reply(s)?;
        match reply {
            REP_ACK => break,
            REP_INFO if body.len() >= 12 && body[0..2] == INFO_EXPORT.to_be_bytes() => {
                size = Some(u64::from_be_bytes(body[2..10].try_into().expect("8 bytes")));
                flags = u16::from_be_bytes(body[10..12].try_into().expect("2 bytes"));
            }
            REP_INFO => {}
            r if r & 0x8000_0000 != 0 => {
                return Err(ClientError::Refused(
                    String::from_utf8_lossy(&body).into_owned(),
                ))
            }
            other => {
                return Err(ClientError::Protocol(format!(
                    "unexpected reply {other:#x}"
                )))
            }
        }
    }
    let size = size.ok_or_else(|| ClientError::Protocol("no export size".into()))?;
    Ok((size, flags))
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
        greet(&mut tcp)?;
        send_option(&mut tcp, OPT_STARTTLS, &[])?;
        let (reply, body) = read_option_reply(&mut tcp)?;
        if reply != REP_ACK {
            return Err(ClientError::Tls(format!(
                "the server at {addr} did not start TLS (reply {reply:#x}: {})",
                String::from_utf8_lossy(&body)
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
        greet(&mut s)?;
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
        if read_u32(&mut self.s)? != SIMPLE_REPLY_MAGIC {
            return Err(ClientError::Protocol("bad or structured reply".into()));
        }
        let error = read_u32(&mut self.s)?;
        let cookie = read_u64(&mut self.s)?;
        let mut data = Vec::new();
        if error == 0 {
            data.resize(read_len(cookie), 0);
            self.s.read_exact(&mut data)?;
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
