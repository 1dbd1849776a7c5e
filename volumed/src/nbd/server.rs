//! One NBD connection: the fixed newstyle handshake (`NBD_OPT_GO`,
//! `NBD_OPT_INFO`, `NBD_OPT_EXPORT_NAME`), then requests answered with
//! simple replies. A volume's export name is `<volume>@<credential>`: the
//! attachment's secret, checked at the handshake and before every request,
//! so a host whose attachment moved away is refused, never served. Every
//! refusal of a volume says only "not authorised", and neither a refusal
//! nor the log ever shows a credential (given or current).
//! A file export (`ember-export`) serves one file read-only, unfenced.
//!
//! Over TCP with TLS settings the server runs the protocol's FORCEDTLS
//! mode: before `NBD_OPT_STARTTLS` every option but `NBD_OPT_ABORT` is
//! answered `NBD_REP_ERR_TLS_REQD` (and `NBD_OPT_EXPORT_NAME`, which
//! cannot be refused, ends the connection); after its `NBD_REP_ACK` the
//! TLS handshake (the client's certificate must chain to the CA) and the
//! rest of the session run inside TLS.
//!
//! Every read has a deadline: the whole handshake must be done within
//! [`Timeouts::handshake`], a request's payload within [`Timeouts::io`]
//! of its header, and (if set) the next request must start within
//! [`Timeouts::idle`]. Writes time out after [`Timeouts::io`].

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_nbd::*;

use crate::image;
use crate::registry::{parse_export_name, Registry};

/// What a server hands out.
#[derive(Clone)]
pub enum Exports {
    /// Volumes, each by its attachment's fencing token.
    Volumes(Arc<Registry>),
    /// One file, read-only: a local disk served to the host a VM migrates
    /// to, which fills its own copy from it.
    File(Arc<FileExport>),
}

/// A file served read-only under one name (and the default name `""`).
pub struct FileExport {
    pub name: String,
    pub file: File,
    pub size: u64,
}

/// The one answer to a volume export that is not opened, whatever the
/// reason (unknown volume, wrong or stale credential, malformed name).
pub const NOT_AUTHORISED: &str = "not authorised";

/// A connection's time limits.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// From the connection's start to the end of the handshake.
    pub handshake: Duration,
    /// The wait for a request's payload after its header, and for each
    /// write of an answer.
    pub io: Duration,
    /// The wait for the next request; `None`: as long as the client likes
    /// (a VMM's drive may be idle for hours).
    pub idle: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake: Duration::from_secs(10),
            io: Duration::from_secs(60),
            idle: None,
        }
    }
}

/// What a connection's reads and writes are bounded with.
pub trait SetTimeouts {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()>;
}

impl SetTimeouts for std::net::TcpStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        std::net::TcpStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        std::net::TcpStream::set_write_timeout(self, t)
    }
}

impl SetTimeouts for std::os::unix::net::UnixStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        std::os::unix::net::UnixStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        std::os::unix::net::UnixStream::set_write_timeout(self, t)
    }
}

/// A reader whose every read ends by a deadline shared with the
/// connection's loop (`None`: no deadline).
struct Deadlined<R> {
    inner: R,
    deadline: Rc<Cell<Option<Instant>>>,
    /// Whether the socket has no read timeout now (so waiting without a
    /// deadline needs no system call to say so again).
    unbounded: bool,
}

impl<R: Read + SetTimeouts> Read for Deadlined<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = match self.deadline.get() {
            None => None,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
                }
                Some(left)
            }
        };
        if left.is_some() || !self.unbounded {
            self.inner.set_read_timeout(left)?;
            self.unbounded = left.is_none();
        }
        match self.inner.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"))
            }
            r => r,
        }
    }
}

/// The volume part of an export name, for the log (never the credential).
fn volume_part(export: &str) -> String {
    let v = export.split('@').next().unwrap_or_default();
    let v: String = v.chars().take(64).collect();
    format!("{v:?}")
}

/// The export a connection opened: a volume with its credential, or a file.
struct Opened {
    name: String,
    /// `None` for a file export (unfenced, read-only).
    token: Option<String>,
    file: File,
    size: u64,
}

impl Opened {
    fn flags(&self) -> u16 {
        match self.token {
            Some(_) => VOLUME_FLAGS,
            None => TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH,
        }
    }
}

const VOLUME_FLAGS: u16 =
    TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;

/// Whether a connection is to use TLS, and where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsMode {
    /// A server without TLS (`NBD_OPT_STARTTLS` is unsupported).
    Off,
    /// TLS is required and not yet started.
    Required,
    /// Inside TLS.
    On,
}

/// How option haggling ended.
enum Negotiated {
    Opened(Opened),
    /// The client aborted, or was refused where no error reply exists.
    Ended,
    /// `NBD_OPT_STARTTLS` was acknowledged: the TLS handshake is next.
    StartTls,
}

/// Serves one client until it disconnects (or breaks the protocol, or
/// misses a deadline). `r` and `w` are the two halves of one connection.
pub fn serve<R: Read + SetTimeouts, W: Write + SetTimeouts>(
    r: R,
    w: W,
    exports: &Exports,
    peer: &str,
    timeouts: Timeouts,
) -> io::Result<()> {
    w.set_write_timeout(Some(timeouts.io.min(timeouts.handshake)))?;
    let deadline = Rc::new(Cell::new(Some(Instant::now() + timeouts.handshake)));
    let mut r = BufReader::new(Deadlined {
        inner: r,
        deadline: deadline.clone(),
        unbounded: false,
    });
    let mut w = BufWriter::new(w);
    let no_zeroes = greet(&mut r, &mut w)?;
    match options(&mut r, &mut w, exports, peer, no_zeroes, TlsMode::Off)? {
        Negotiated::Opened(o) => serve_opened(r, w, exports, peer, timeouts, &deadline, o),
        Negotiated::Ended | Negotiated::StartTls => Ok(()),
    }
}

/// One side of a TLS stream that a connection's reader and writer share
/// (both on the connection's one thread).
struct Shared(Rc<RefCell<ember_tls::SyncServerStream>>);

impl Read for Shared {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.borrow_mut().read(buf)
    }
}

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.borrow_mut().flush()
    }
}

impl SetTimeouts for Shared {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.0.borrow().sock.set_read_timeout(t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.0.borrow().sock.set_write_timeout(t)
    }
}

/// Serves one TCP client that must use TLS (FORCEDTLS; see the module's
/// description): the greeting and `NBD_OPT_STARTTLS` in the clear, then
/// the TLS handshake on `tcp` with `tls`'s server settings (a client
/// certificate chaining to its CA required), then the rest inside TLS.
/// The handshake deadline covers all of that.
pub fn serve_tls(
    tcp: std::net::TcpStream,
    tls: &ember_tls::Tls,
    exports: &Exports,
    peer: &str,
    timeouts: Timeouts,
) -> io::Result<()> {
    let until = Instant::now() + timeouts.handshake;
    tcp.set_write_timeout(Some(timeouts.io.min(timeouts.handshake)))?;
    let deadline = Rc::new(Cell::new(Some(until)));
    let mut r = BufReader::new(Deadlined {
        inner: tcp.try_clone()?,
        deadline: deadline.clone(),
        unbounded: false,
    });
    let mut w = BufWriter::new(tcp.try_clone()?);
    let no_zeroes = greet(&mut r, &mut w)?;
    match options(&mut r, &mut w, exports, peer, no_zeroes, TlsMode::Required)? {
        Negotiated::StartTls => {}
        Negotiated::Ended | Negotiated::Opened(_) => return Ok(()),
    }
    // The client sends nothing after NBD_OPT_STARTTLS until its ACK, and
    // then only TLS: clear bytes already read were sent in breach.
    if !r.buffer().is_empty() {
        return Err(invalid(
            "data after NBD_OPT_STARTTLS before the TLS handshake",
        ));
    }
    drop((r, w));
    let stream = tls
        .accept_sync(tcp, until)
        .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e))?;
    let stream = Rc::new(RefCell::new(stream));
    let mut r = BufReader::new(Deadlined {
        inner: Shared(stream.clone()),
        deadline: deadline.clone(),
        unbounded: false,
    });
    let mut w = BufWriter::new(Shared(stream.clone()));
    let done = match options(&mut r, &mut w, exports, peer, no_zeroes, TlsMode::On)? {
        Negotiated::Opened(o) => serve_opened(r, w, exports, peer, timeouts, &deadline, o),
        Negotiated::Ended | Negotiated::StartTls => Ok(()),
    };
    // The protocol's end of a session: TLS is shut down, then TCP.
    let mut s = stream.borrow_mut();
    s.conn.send_close_notify();
    let _ = s.flush();
    done
}

/// The transmission phase of an opened export.
fn serve_opened<R: Read + SetTimeouts, W: Write + SetTimeouts>(
    mut r: BufReader<Deadlined<R>>,
    mut w: BufWriter<W>,
    exports: &Exports,
    peer: &str,
    timeouts: Timeouts,
    deadline: &Rc<Cell<Option<Instant>>>,
    opened: Opened,
) -> io::Result<()> {
    w.get_ref().set_write_timeout(Some(timeouts.io))?;
    log::info!(
        "nbd {peer}: serving {} ({}, {} bytes)",
        opened.name,
        if opened.token.is_some() {
            "volume"
        } else {
            "file"
        },
        opened.size
    );
    let phase = |header: bool| {
        deadline.set(if header {
            timeouts.idle.map(|t| Instant::now() + t)
        } else {
            Some(Instant::now() + timeouts.io)
        })
    };
    transmission(&mut r, &mut w, exports, opened, &phase)
}

fn open_export(exports: &Exports, export: &str) -> Result<Opened, (u32, String)> {
    let reg = match exports {
        Exports::Volumes(reg) => reg,
        Exports::File(f) => {
            if !export.is_empty() && export != f.name {
                return Err((REP_ERR_UNKNOWN, format!("no export {export:?}")));
            }
            let file = f
                .file
                .try_clone()
                .map_err(|e| (REP_ERR_UNKNOWN, format!("export {export:?}: {e}")))?;
            return Ok(Opened {
                name: f.name.clone(),
                token: None,
                file,
                size: f.size,
            });
        }
    };
    // Every refusal is the same answer.
    let refused = || (REP_ERR_POLICY, NOT_AUTHORISED.to_string());
    let (name, token) = parse_export_name(export).ok_or_else(refused)?;
    let rec = reg.check(name, token).map_err(|_| refused())?;
    let file = image::open(reg, name).map_err(|e| {
        log::warn!("nbd: volume {name}: {e}");
        (
            REP_ERR_UNKNOWN,
            format!("volume {name}: cannot open its image"),
        )
    })?;
    Ok(Opened {
        name: name.to_string(),
        token: Some(token.to_string()),
        file,
        size: rec.size_bytes,
    })
}

/// The server's greeting and the client's flags: whether the client
/// asked for no zeroes after `NBD_OPT_EXPORT_NAME`'s reply.
fn greet(r: &mut impl Read, w: &mut impl Write) -> io::Result<bool> {
    let client_flags = server_greet(r, w)?;
    Ok(client_flags & FLAG_C_NO_ZEROES != 0)
}

/// An error reply with a message for people.
fn write_option_error(w: &mut impl Write, option: u32, reply: u32, msg: &str) -> io::Result<()> {
    write_option_reply(w, option, reply, msg.as_bytes())
}

/// Option haggling, in `mode`, up to an opened export, the client's end or
/// (in [`TlsMode::Required`]) an acknowledged `NBD_OPT_STARTTLS`.
fn options(
    r: &mut impl Read,
    w: &mut impl Write,
    exports: &Exports,
    peer: &str,
    no_zeroes: bool,
    mode: TlsMode,
) -> io::Result<Negotiated> {
    loop {
        let OptionRequest { option, data } = OptionRequest::read(r)?;
        match (mode, option) {
            (TlsMode::Required, OPT_STARTTLS) => {
                if !data.is_empty() {
                    write_option_error(w, option, REP_ERR_INVALID, "NBD_OPT_STARTTLS has no data")?;
                    w.flush()?;
                    continue;
                }
                write_option_reply(w, option, REP_ACK, &[])?;
                w.flush()?;
                return Ok(Negotiated::StartTls);
            }
            (TlsMode::Required, OPT_ABORT) => {}
            (TlsMode::Required, OPT_EXPORT_NAME) => {
                // It cannot be refused with a reply: the session ends.
                log::warn!("nbd {peer}: refused: NBD_OPT_EXPORT_NAME before TLS");
                return Ok(Negotiated::Ended);
            }
            (TlsMode::Required, _) => {
                write_option_error(
                    w,
                    option,
                    REP_ERR_TLS_REQD,
                    "TLS is required: send NBD_OPT_STARTTLS first",
                )?;
                w.flush()?;
                continue;
            }
            (TlsMode::On, OPT_STARTTLS) => {
                write_option_error(w, option, REP_ERR_INVALID, "TLS is already on")?;
                w.flush()?;
                continue;
            }
            _ => {}
        }
        match option {
            OPT_EXPORT_NAME => {
                let export = String::from_utf8_lossy(&data).into_owned();
                // No error reply exists for this option: refusal is a close.
                let opened = match open_export(exports, &export) {
                    Ok(o) => o,
                    Err((_, msg)) => {
                        log::warn!("nbd {peer}: refused {}: {msg}", volume_part(&export));
                        return Ok(Negotiated::Ended);
                    }
                };
                let reply = ExportNameReply {
                    size: opened.size,
                    flags: opened.flags(),
                };
                w.write_all(&reply.encode(no_zeroes))?;
                w.flush()?;
                return Ok(Negotiated::Opened(opened));
            }
            OPT_GO | OPT_INFO => {
                let Ok(GoRequest { export, .. }) = GoRequest::decode(&data) else {
                    write_option_error(w, option, REP_ERR_INVALID, "malformed request")?;
                    w.flush()?;
                    continue;
                };
                match open_export(exports, &export) {
                    Ok(opened) => {
                        let info = InfoExport {
                            size: opened.size,
                            flags: opened.flags(),
                        };
                        write_option_reply(w, option, REP_INFO, &info.encode())?;
                        let bs = InfoBlockSize {
                            min: 1,
                            preferred: 4096,
                            max: MAX_PAYLOAD,
                        };
                        write_option_reply(w, option, REP_INFO, &bs.encode())?;
                        write_option_reply(w, option, REP_ACK, &[])?;
                        w.flush()?;
                        if option == OPT_GO {
                            return Ok(Negotiated::Opened(opened));
                        }
                    }
                    Err((code, msg)) => {
                        log::warn!("nbd {peer}: refused {}: {msg}", volume_part(&export));
                        write_option_error(w, option, code, &msg)?;
                        w.flush()?;
                    }
                }
            }
            OPT_ABORT => {
                let _ = write_option_reply(w, option, REP_ACK, &[]);
                let _ = w.flush();
                return Ok(Negotiated::Ended);
            }
            OPT_LIST => {
                match exports {
                    Exports::File(f) => {
                        let entry = encode_server_entry(&f.name)?;
                        write_option_reply(w, option, REP_SERVER, &entry)?;
                        write_option_reply(w, option, REP_ACK, &[])?;
                    }
                    // Volumes are not listed: names alone are useless without
                    // a token, and listing them would leak other tenants'.
                    Exports::Volumes(_) => {
                        write_option_error(w, option, REP_ERR_POLICY, "listing is not offered")?
                    }
                }
                w.flush()?;
            }
            _ => {
                write_option_error(w, option, REP_ERR_UNSUP, "option not supported")?;
                w.flush()?;
            }
        }
    }
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// The next request, a write's payload read into `buf` (consumed
/// whatever the answer); `None` once the client ends the session
/// (`NBD_CMD_DISC`, or the end of the stream between requests).
/// `phase(true)` before waiting for its header, `phase(false)` once it
/// is read (the payload then has a deadline).
fn next_request(
    r: &mut impl Read,
    buf: &mut Vec<u8>,
    phase: &dyn Fn(bool),
) -> io::Result<Option<Request>> {
    phase(true);
    let req = Request::read(r).map_err(io::Error::from);
    phase(false);
    let req = match req {
        Ok(q) => q,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    };
    if req.kind == CMD_DISC {
        return Ok(None);
    }
    if req.length > MAX_PAYLOAD && matches!(req.kind, CMD_READ | CMD_WRITE) {
        return Err(invalid("request too large"));
    }
    if req.kind == CMD_WRITE {
        read_payload(r, buf, req.length)?;
    }
    Ok(Some(req))
}

/// The simple reply to `req`, with a successful read's data from `buf`.
fn answer(w: &mut impl Write, req: &Request, error: u32, buf: &[u8]) -> io::Result<()> {
    let reply = SimpleReply {
        errno: error,
        cookie: req.cookie,
    };
    w.write_all(&reply.encode())?;
    if req.kind == CMD_READ && error == 0 {
        w.write_all(buf)?;
    }
    w.flush()
}

/// Serves an opened export's requests (see [`next_request`] for `phase`).
fn transmission(
    r: &mut impl Read,
    w: &mut impl Write,
    exports: &Exports,
    o: Opened,
    phase: &dyn Fn(bool),
) -> io::Result<()> {
    let (reg, token) = match (exports, &o.token) {
        (Exports::Volumes(reg), Some(token)) => (reg, token.clone()),
        _ => return transmission_read_only(r, w, &o, phase),
    };
    let mut buf = Vec::new();
    loop {
        let Some(req) = next_request(r, &mut buf, phase)? else {
            return Ok(());
        };
        // Shared gate from the check until the effect is on the image: a
        // fence waits for this request, or this request sees the fence.
        let gate = reg.gate_shared();
        let error = match reg.check(&o.name, &token) {
            Err(e) => {
                if reg.get(&o.name).is_ok_and(|r| r.disconnect_fenced) {
                    // Nothing applied, nothing answered: the client sends
                    // it again wherever the volume went.
                    log::info!("nbd {}: moved away; ending the connection: {e}", o.name);
                    return Ok(());
                }
                log::warn!("nbd {}: request refused: {e}", o.name);
                EPERM
            }
            Ok(rec) => execute(&o, rec.size_bytes, &req, &mut buf),
        };
        if error == 0 && matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) {
            reg.mark_dirty(&o.name, req.offset, u64::from(req.length));
        }
        drop(gate);
        answer(w, &req, error, &buf)?;
    }
}

/// A file export's requests: reads and flushes; writes are refused with
/// EPERM, as the protocol asks of a read-only export.
fn transmission_read_only(
    r: &mut impl Read,
    w: &mut impl Write,
    o: &Opened,
    phase: &dyn Fn(bool),
) -> io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let Some(req) = next_request(r, &mut buf, phase)? else {
            return Ok(());
        };
        let error = match req.kind {
            CMD_READ | CMD_FLUSH => execute(o, o.size, &req, &mut buf),
            CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => EPERM,
            _ => EINVAL,
        };
        answer(w, &req, error, &buf)?;
    }
}

/// Reads a write's payload of `len` bytes into `buf`. The buffer grows
/// with the bytes that arrive (past [`PAYLOAD_RESERVE`]), not with the
/// length a header claims: a header alone does not make the server commit
/// (and zero) up to [`MAX_PAYLOAD`] bytes.
fn read_payload(r: &mut impl Read, buf: &mut Vec<u8>, len: u32) -> io::Result<()> {
    buf.clear();
    buf.reserve(len.min(PAYLOAD_RESERVE) as usize);
    let got = r.take(u64::from(len)).read_to_end(buf)?;
    if got != len as usize {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the connection ended in a write's payload",
        ));
    }
    Ok(())
}

/// What a write's buffer is sized to before its payload arrives.
const PAYLOAD_RESERVE: u32 = 1 << 20;

/// Runs one request; the NBD error code (0: success).
fn execute(o: &Opened, size: u64, req: &Request, buf: &mut Vec<u8>) -> u32 {
    let (offset, len) = (req.offset, u64::from(req.length));
    if req.kind != CMD_FLUSH && offset.checked_add(len).is_none_or(|end| end > size) {
        return if req.kind == CMD_READ { EINVAL } else { ENOSPC };
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let done = match req.kind {
        CMD_READ => {
            buf.resize(len as usize, 0);
            o.file.read_exact_at(buf, offset)
        }
        CMD_WRITE => o.file.write_all_at(buf, offset),
        CMD_FLUSH => o.file.sync_data(),
        CMD_TRIM => image::discard(&o.file, offset, len),
        CMD_WRITE_ZEROES => {
            image::write_zeroes(&o.file, offset, len, req.flags & CMD_FLAG_NO_HOLE == 0)
        }
        _ => return EINVAL,
    };
    let done = done.and_then(|_| {
        if fua && req.kind != CMD_READ && req.kind != CMD_FLUSH {
            o.file.sync_data()
        } else {
            Ok(())
        }
    });
    match done {
        Ok(()) => 0,
        Err(e) => {
            let errno = errno_of(&e);
            if errno == EIO {
                log::warn!("nbd {}: I/O error: {e}", o.name);
            }
            errno
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write header claiming the most a payload may be, then 10 bytes
    /// and the end: refused as a short payload, with a buffer sized by
    /// what came (not 32 MiB committed and zeroed for a 28-byte header).
    #[test]
    fn a_claimed_payload_does_not_size_the_buffer() {
        let mut buf = Vec::new();
        let mut r: &[u8] = &[7u8; 10];
        let e = read_payload(&mut r, &mut buf, MAX_PAYLOAD).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(
            buf.capacity() <= PAYLOAD_RESERVE as usize,
            "{}",
            buf.capacity()
        );

        // A whole payload is read as before, past the reserve too.
        let data: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
        let mut r: &[u8] = &data;
        read_payload(&mut r, &mut buf, data.len() as u32).unwrap();
        assert!(buf == data);
        let mut r: &[u8] = b"abcdef";
        read_payload(&mut r, &mut buf, 4).unwrap();
        assert_eq!(buf, b"abcd");
        assert_eq!(r, b"ef", "no more than the payload is read");
    }
}
