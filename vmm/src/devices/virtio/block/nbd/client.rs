//! A connection to one NBD export that survives the server going away:
//! transport failures reconnect with backoff and the request is retried.
//!
//! Requests are issued one at a time, so retrying any of them is safe: reads
//! and flushes trivially, writes because NBD writes are idempotent and no
//! other request to the same range can be in flight. Writes acknowledged
//! since the last flush are kept (up to `JOURNAL_MAX`) and replayed after a
//! reconnect, because a restarted server may have lost them; when they were
//! too many to keep, the next flush fails so the guest learns of the loss.

use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::protocol::{
    self, Command, ExportInfo, NbdError, CMD_FLAG_FUA, TF_READ_ONLY, TF_SEND_FLUSH, TF_SEND_FUA,
    TF_SEND_TRIM, TF_SEND_WRITE_ZEROES,
};
use super::uri::{Address, NbdUri};

/// Default bound on one request's round trip, and on a reconnect.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Unflushed write bytes kept for replay after a reconnect.
const JOURNAL_MAX: usize = 64 << 20;
/// Transport failures one request may see before it fails to the guest.
const MAX_ATTEMPTS: u32 = 4;
const BACKOFF_START: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Longest single request we send (servers commonly cap at 32 MiB).
pub const MAX_REQUEST: usize = 1 << 20;

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
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

struct Conn {
    reader: BufReader<Stream>,
    writer: Stream,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.writer.shutdown();
    }
}

/// Opens a connection and runs the handshake, all within `timeout`.
fn connect(uri: &NbdUri, timeout: Duration) -> Result<(Conn, ExportInfo), NbdError> {
    let mut stream = match &uri.address {
        Address::Tcp { host, port } => {
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
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
            Stream::Tcp(s)
        }
        Address::Unix { path } => {
            let s = UnixStream::connect(path)?;
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
            Stream::Unix(s)
        }
    };
    let info = protocol::handshake(&mut stream, &uri.export)?;
    let writer = stream.try_clone()?;
    Ok((
        Conn {
            reader: BufReader::with_capacity(256 * 1024, stream),
            writer,
        },
        info,
    ))
}

/// Whether acknowledged writes must be made durable, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// No flushes at all (cache_type Unsafe).
    None,
    /// The guest flushes; FLUSH is sent, or FUA on each write when the
    /// server offers FUA but not FLUSH.
    OnFlush,
}

/// A write acknowledged but not yet flushed, kept for replay.
enum Journaled {
    Data(u64, Vec<u8>),
    /// WRITE_ZEROES: replayed too, or an older journaled write would
    /// reappear over the zeroes.
    Zeroes(u64, u32),
}

pub struct NbdClient {
    uri: NbdUri,
    timeout: Duration,
    conn: Option<Conn>,
    info: ExportInfo,
    durability: Durability,
    next_cookie: u64,
    /// Writes acknowledged since the last successful flush.
    journal: Vec<Journaled>,
    journal_bytes: usize,
    journal_overflow: bool,
    /// A reconnect happened while unjournaled writes were unflushed.
    lost_unflushed: bool,
}

impl NbdClient {
    /// Connects once; errors here (bad server, refused export) are final.
    pub fn connect(
        uri: NbdUri,
        timeout: Duration,
        durability: Durability,
    ) -> Result<NbdClient, NbdError> {
        let (conn, info) = connect(&uri, timeout)?;
        Ok(NbdClient {
            uri,
            timeout,
            conn: Some(conn),
            info,
            durability,
            next_cookie: 1,
            journal: Vec::new(),
            journal_bytes: 0,
            journal_overflow: false,
            lost_unflushed: false,
        })
    }

    pub fn size(&self) -> u64 {
        self.info.size
    }

    pub fn read_only(&self) -> bool {
        self.info.has(TF_READ_ONLY)
    }

    pub fn info(&self) -> ExportInfo {
        self.info
    }

    pub fn uri(&self) -> &NbdUri {
        &self.uri
    }

    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        for (i, chunk) in buf.chunks_mut(MAX_REQUEST).enumerate() {
            let at = offset + (i * MAX_REQUEST) as u64;
            self.request(Command::Read, 0, at, chunk.len(), None, Some(chunk))?;
        }
        Ok(())
    }

    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let flags = if self.durability == Durability::OnFlush
            && !self.info.has(TF_SEND_FLUSH)
            && self.info.has(TF_SEND_FUA)
        {
            CMD_FLAG_FUA
        } else {
            0
        };
        for (i, chunk) in buf.chunks(MAX_REQUEST).enumerate() {
            let at = offset + (i * MAX_REQUEST) as u64;
            self.request(Command::Write, flags, at, chunk.len(), Some(chunk), None)?;
            if flags == 0 {
                self.journal_write(at, chunk);
            }
        }
        Ok(())
    }

    pub fn can_trim(&self) -> bool {
        self.info.has(TF_SEND_TRIM)
    }

    pub fn can_write_zeroes(&self) -> bool {
        self.info.has(TF_SEND_WRITE_ZEROES)
    }

    /// Discards `len` bytes at `offset` (a hint: contents become unspecified).
    pub fn trim(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if !self.can_trim() {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        for (at, n) in split_range(offset, len) {
            self.request(Command::Trim, 0, at, n as usize, None, None)?;
        }
        Ok(())
    }

    /// Writes `len` zero bytes at `offset` without sending them.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if !self.can_write_zeroes() {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        for (at, n) in split_range(offset, len) {
            self.request(Command::WriteZeroes, 0, at, n as usize, None, None)?;
            if self.durability == Durability::OnFlush && !self.journal_overflow {
                self.journal.push(Journaled::Zeroes(at, n));
            }
        }
        Ok(())
    }

    /// Makes every acknowledged write durable on the server.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.durability == Durability::None {
            return Ok(());
        }
        if self.info.has(TF_SEND_FLUSH) {
            self.request(Command::Flush, 0, 0, 0, None, None)?;
        }
        if std::mem::take(&mut self.lost_unflushed) {
            self.clear_journal();
            return Err(io::Error::other(
                "writes acknowledged before a reconnect may have been lost on the server",
            ));
        }
        self.clear_journal();
        Ok(())
    }

    fn journal_write(&mut self, offset: u64, data: &[u8]) {
        if self.durability == Durability::None || self.journal_overflow {
            return;
        }
        if self.journal_bytes + data.len() > JOURNAL_MAX {
            self.journal_overflow = true;
            self.journal.clear();
            self.journal_bytes = 0;
            return;
        }
        self.journal_bytes += data.len();
        self.journal.push(Journaled::Data(offset, data.to_vec()));
    }

    fn clear_journal(&mut self) {
        self.journal.clear();
        self.journal_bytes = 0;
        self.journal_overflow = false;
    }

    /// One request with retries across reconnects. A server-side error
    /// (errno in the reply) is final and not retried.
    fn request(
        &mut self,
        cmd: Command,
        flags: u16,
        offset: u64,
        len: usize,
        data: Option<&[u8]>,
        mut buf: Option<&mut [u8]>,
    ) -> io::Result<()> {
        let len32 = u32::try_from(len).map_err(|_| io::Error::other("request too long"))?;
        let mut last_err = None;
        for attempt in 0..MAX_ATTEMPTS {
            if let Err(e) = self.ensure_connected() {
                last_err = Some(e);
                break;
            }
            let res = self.round_trip(cmd, flags, offset, len32, data, buf.as_deref_mut());
            match res {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(errno)) => {
                    return Err(io::Error::other(NbdError::Server { errno }));
                }
                Err(e) => {
                    log::warn!(
                        "nbd {}: {cmd:?} at {offset} failed (attempt {}): {e}; reconnecting",
                        self.uri,
                        attempt + 1
                    );
                    self.conn = None;
                    last_err = Some(e);
                }
            }
        }
        let e = last_err.map_or_else(|| "unknown".to_string(), |e| e.to_string());
        Err(io::Error::other(format!(
            "nbd {}: {cmd:?} at {offset} failed: {e}",
            self.uri
        )))
    }

    fn round_trip(
        &mut self,
        cmd: Command,
        flags: u16,
        offset: u64,
        len: u32,
        data: Option<&[u8]>,
        buf: Option<&mut [u8]>,
    ) -> Result<Result<(), u32>, NbdError> {
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| NbdError::Io(io::Error::from(io::ErrorKind::NotConnected)))?;
        let hdr = protocol::encode_request(cmd, flags, cookie, offset, len);
        match data {
            // One write for small requests saves a packet and a syscall.
            Some(d) if d.len() <= 64 * 1024 => {
                let mut msg = Vec::with_capacity(hdr.len() + d.len());
                msg.extend_from_slice(&hdr);
                msg.extend_from_slice(d);
                conn.writer.write_all(&msg)?;
            }
            Some(d) => {
                conn.writer.write_all(&hdr)?;
                conn.writer.write_all(d)?;
            }
            None => conn.writer.write_all(&hdr)?,
        }
        protocol::read_reply(&mut conn.reader, cookie, offset, buf)
    }

    /// Reconnects with backoff for up to `timeout`, then replays journaled
    /// writes so the server holds every write the guest was told about.
    fn ensure_connected(&mut self) -> Result<(), NbdError> {
        if self.conn.is_some() {
            return Ok(());
        }
        let deadline = Instant::now() + self.timeout;
        let mut backoff = BACKOFF_START;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match connect(&self.uri, left.max(Duration::from_millis(100))) {
                Ok((conn, info)) => {
                    if info.size != self.info.size {
                        return Err(NbdError::Protocol(format!(
                            "export size changed from {} to {} across a reconnect",
                            self.info.size, info.size
                        )));
                    }
                    self.conn = Some(conn);
                    self.info = info;
                    log::info!("nbd {}: reconnected", self.uri);
                    return self.replay_journal();
                }
                Err(e) if Instant::now() + backoff >= deadline => return Err(e),
                Err(e) => {
                    log::debug!("nbd {}: reconnect failed: {e}", self.uri);
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    fn replay_journal(&mut self) -> Result<(), NbdError> {
        if self.journal_overflow {
            self.lost_unflushed = true;
            self.clear_journal();
        }
        let journal = std::mem::take(&mut self.journal);
        let mut res = Ok(());
        for entry in &journal {
            let res_one = match entry {
                Journaled::Data(offset, data) => {
                    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
                    self.round_trip(Command::Write, 0, *offset, len, Some(data), None)
                }
                Journaled::Zeroes(offset, len) => {
                    self.round_trip(Command::WriteZeroes, 0, *offset, *len, None, None)
                }
            };
            match res_one {
                Ok(Ok(())) => {}
                Ok(Err(errno)) => {
                    res = Err(NbdError::Server { errno });
                    break;
                }
                Err(e) => {
                    self.conn = None;
                    res = Err(e);
                    break;
                }
            }
        }
        self.journal = journal;
        res
    }
}

/// Splits a range into pieces whose lengths fit a request (u32, and well
/// below the 4 GiB limit so servers do not refuse them).
fn split_range(offset: u64, len: u64) -> impl Iterator<Item = (u64, u32)> {
    const STEP: u64 = 1 << 30;
    (0..len.div_ceil(STEP)).map(move |i| {
        let at = i * STEP;
        (offset + at, (len - at).min(STEP) as u32)
    })
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            let hdr = protocol::encode_request(Command::Disconnect, 0, 0, 0, 0);
            let _ = conn.writer.write_all(&hdr);
        }
    }
}
