//! The NBD wire protocol (NBD project's proto.md): fixed newstyle handshake
//! with NBD_OPT_STRUCTURED_REPLY and NBD_OPT_GO, requests, and simple and
//! structured replies. Everything here works on any `Read`/`Write` stream so
//! it is tested against in-memory servers.

use std::io::{self, Read, Write};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_FLAG_ERROR: u32 = 1 << 31;
const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;

const INFO_EXPORT: u16 = 0;

/// Transmission flags the client looks at.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;

/// Command flag: the write is durable when acknowledged.
pub const CMD_FLAG_FUA: u16 = 1;

const REPLY_FLAG_DONE: u16 = 1;
const CHUNK_NONE: u16 = 0;
const CHUNK_OFFSET_DATA: u16 = 1;
const CHUNK_OFFSET_HOLE: u16 = 2;
const CHUNK_ERROR_BIT: u16 = 1 << 15;

/// Longest option reply or non-data chunk we accept: a bound so a hostile
/// server cannot make us allocate without limit.
const MAX_META_LEN: u32 = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Command {
    Read = 0,
    Write = 1,
    Disconnect = 2,
    Flush = 3,
    Trim = 4,
    WriteZeroes = 6,
}

/// What NBD_OPT_GO told us about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    /// The server agreed to structured replies.
    pub structured: bool,
}

impl ExportInfo {
    pub fn has(&self, flag: u16) -> bool {
        self.flags & TF_HAS_FLAGS != 0 && self.flags & flag != 0
    }
}

/// Errors of the protocol layer. `Io` is a transport failure (worth a
/// reconnect); the others mean the server misbehaves or refuses.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("server does not speak NBD fixed newstyle: {0}")]
    Protocol(String),
    #[error("server refused export {export:?}: {reason}")]
    Refused { export: String, reason: String },
    /// The server answered the request with an error (errno value).
    #[error("server error {errno} ({})", io::Error::from_raw_os_error(*errno as i32))]
    Server { errno: u32 },
}

impl NbdError {
    pub fn is_transport(&self) -> bool {
        matches!(self, NbdError::Io(_))
    }
}

fn proto(msg: impl Into<String>) -> NbdError {
    NbdError::Protocol(msg.into())
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn read_vec(r: &mut impl Read, len: u32) -> Result<Vec<u8>, NbdError> {
    if len > MAX_META_LEN {
        return Err(proto(format!("{len}-byte message is too long")));
    }
    let mut v = vec![0; len as usize];
    r.read_exact(&mut v)?;
    Ok(v)
}

fn send_option(w: &mut impl Write, option: u32, data: &[u8]) -> Result<(), NbdError> {
    let len = u32::try_from(data.len()).map_err(|_| proto("option data too long"))?;
    let mut msg = Vec::with_capacity(16 + data.len());
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&len.to_be_bytes());
    msg.extend_from_slice(data);
    w.write_all(&msg)?;
    w.flush()?;
    Ok(())
}

/// One option reply: (type, data).
fn read_option_reply(r: &mut impl Read, option: u32) -> Result<(u32, Vec<u8>), NbdError> {
    if read_u64(r)? != OPT_REPLY_MAGIC {
        return Err(proto("bad option reply magic"));
    }
    let opt = read_u32(r)?;
    if opt != option {
        return Err(proto(format!("reply to option {opt}, expected {option}")));
    }
    let typ = read_u32(r)?;
    let len = read_u32(r)?;
    Ok((typ, read_vec(r, len)?))
}

fn option_error(typ: u32, data: &[u8]) -> String {
    let msg = String::from_utf8_lossy(data);
    let name = match typ & !REP_FLAG_ERROR {
        1 => "unsupported",
        2 => "policy",
        3 => "invalid",
        4 => "platform",
        5 => "TLS required",
        6 => "unknown export",
        7 => "shutdown",
        8 => "block size required",
        9 => "too big",
        _ => "error",
    };
    if msg.is_empty() {
        name.to_string()
    } else {
        format!("{name}: {msg}")
    }
}

/// Runs the fixed newstyle handshake and opens `export` with NBD_OPT_GO.
/// Structured replies are asked for and used if the server agrees.
pub fn handshake<S: Read + Write>(s: &mut S, export: &str) -> Result<ExportInfo, NbdError> {
    if read_u64(s)? != NBDMAGIC {
        return Err(proto("no NBDMAGIC greeting"));
    }
    if read_u64(s)? != IHAVEOPT {
        return Err(proto("oldstyle negotiation is not supported"));
    }
    let server_flags = read_u16(s)?;
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(proto("server lacks fixed newstyle negotiation"));
    }
    let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES));
    s.write_all(&client_flags.to_be_bytes())?;

    send_option(s, OPT_STRUCTURED_REPLY, &[])?;
    let (typ, data) = read_option_reply(s, OPT_STRUCTURED_REPLY)?;
    let structured = match typ {
        REP_ACK => true,
        t if t & REP_FLAG_ERROR != 0 => {
            log::debug!("nbd: no structured replies: {}", option_error(t, &data));
            false
        }
        t => return Err(proto(format!("unexpected reply {t} to STRUCTURED_REPLY"))),
    };

    let name_len = u32::try_from(export.len()).map_err(|_| proto("export name too long"))?;
    let mut go = Vec::with_capacity(6 + export.len());
    go.extend_from_slice(&name_len.to_be_bytes());
    go.extend_from_slice(export.as_bytes());
    go.extend_from_slice(&0u16.to_be_bytes()); // no extra info requests
    send_option(s, OPT_GO, &go)?;
    let mut export_info = None;
    loop {
        let (typ, data) = read_option_reply(s, OPT_GO)?;
        match typ {
            REP_INFO => {
                if data.len() >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT {
                    let mut size = [0; 8];
                    size.copy_from_slice(&data[2..10]);
                    export_info = Some((
                        u64::from_be_bytes(size),
                        u16::from_be_bytes([data[10], data[11]]),
                    ));
                }
            }
            REP_ACK => break,
            REP_ERR_UNSUP => {
                return Err(proto("server does not support NBD_OPT_GO"));
            }
            t if t & REP_FLAG_ERROR != 0 => {
                return Err(NbdError::Refused {
                    export: export.to_string(),
                    reason: option_error(t, &data),
                })
            }
            t => log::debug!("nbd: ignoring reply type {t} to GO"),
        }
    }
    let (size, flags) = export_info.ok_or_else(|| proto("GO acknowledged without export info"))?;
    Ok(ExportInfo {
        size,
        flags,
        structured,
    })
}

/// Encodes a request header (data for writes follows separately).
pub fn encode_request(cmd: Command, flags: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&(cmd as u16).to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

/// The start of one reply: a simple reply, or one structured chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple {
        cookie: u64,
        errno: u32,
    },
    Chunk {
        cookie: u64,
        flags: u16,
        typ: u16,
        len: u32,
    },
}

impl ReplyHeader {
    pub fn cookie(&self) -> u64 {
        match *self {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => cookie,
        }
    }
}

/// Reads the header of the next reply or chunk, of whichever request: with
/// several requests in flight the server answers in any order (and may
/// interleave structured chunks of different requests).
pub fn read_reply_header<R: Read>(r: &mut R) -> Result<ReplyHeader, NbdError> {
    match read_u32(r)? {
        SIMPLE_REPLY_MAGIC => {
            let errno = read_u32(r)?;
            let cookie = read_u64(r)?;
            Ok(ReplyHeader::Simple { cookie, errno })
        }
        STRUCTURED_REPLY_MAGIC => {
            let flags = read_u16(r)?;
            let typ = read_u16(r)?;
            let cookie = read_u64(r)?;
            let len = read_u32(r)?;
            Ok(ReplyHeader::Chunk {
                cookie,
                flags,
                typ,
                len,
            })
        }
        m => Err(proto(format!("bad reply magic {m:#x}"))),
    }
}

/// What a structured reply to one request has delivered so far.
#[derive(Debug, Default)]
pub struct ChunkProgress {
    /// Bytes of the read filled by data and hole chunks, which the spec
    /// forbids to overlap: a short total would hand the guest whatever the
    /// buffer held before.
    covered: u64,
    errno: Option<u32>,
}

impl ChunkProgress {
    /// Reads the payload of one chunk (its header already read) into `buf`
    /// (a read of `buf.len()` bytes at `offset`). Returns the request's
    /// outcome once the chunk is the last one: `Some(Ok(()))`, or
    /// `Some(Err(errno))` for a server-side error.
    pub fn chunk<R: Read>(
        &mut self,
        r: &mut R,
        hdr: ReplyHeader,
        offset: u64,
        buf: Option<&mut [u8]>,
    ) -> Result<Option<Result<(), u32>>, NbdError> {
        let ReplyHeader::Chunk {
            flags, typ, len, ..
        } = hdr
        else {
            return Err(proto("simple reply mid structured reply"));
        };
        let want = buf.as_ref().map_or(0, |b| b.len() as u64);
        match read_chunk(r, typ, len, offset, buf)? {
            Ok(n) => self.covered += n,
            Err(errno) => self.errno = Some(errno),
        }
        if flags & REPLY_FLAG_DONE == 0 {
            return Ok(None);
        }
        if let Some(errno) = self.errno {
            return Ok(Some(Err(errno)));
        }
        if self.covered != want {
            return Err(proto(format!(
                "read reply covered {} of {want} bytes",
                self.covered
            )));
        }
        Ok(Some(Ok(())))
    }
}

/// Reads the rest of a simple reply: the data of a successful read.
pub fn read_simple_data<R: Read>(r: &mut R, errno: u32, buf: Option<&mut [u8]>) -> io::Result<()> {
    match buf {
        Some(buf) if errno == 0 => r.read_exact(buf),
        _ => Ok(()),
    }
}

#[cfg(test)]
/// Reads the whole reply to request `cookie`, the only one in flight. For a
/// read of `buf.len()` bytes at `offset`, the data lands in `buf` (holes
/// read as zeroes). `Ok(Err(errno))` is a server-side error for this
/// request; the stream is still in sync. `Err` means the stream cannot be
/// trusted any more.
pub fn read_reply<R: Read>(
    r: &mut R,
    cookie: u64,
    offset: u64,
    mut buf: Option<&mut [u8]>,
) -> Result<Result<(), u32>, NbdError> {
    let mut progress = ChunkProgress::default();
    loop {
        let hdr = read_reply_header(r)?;
        check_cookie(hdr.cookie(), cookie)?;
        match hdr {
            ReplyHeader::Simple { errno, .. } => {
                read_simple_data(r, errno, buf)?;
                return Ok(if errno == 0 { Ok(()) } else { Err(errno) });
            }
            ReplyHeader::Chunk { .. } => {
                if let Some(res) = progress.chunk(r, hdr, offset, buf.as_deref_mut())? {
                    return Ok(res);
                }
            }
        }
    }
}

#[cfg(test)]
fn check_cookie(got: u64, want: u64) -> Result<(), NbdError> {
    if got == want {
        Ok(())
    } else {
        Err(proto(format!("reply for cookie {got}, expected {want}")))
    }
}

/// Places one structured chunk's payload; returns how many bytes of the
/// read it filled, or the server error if it is one.
fn read_chunk<R: Read>(
    r: &mut R,
    typ: u16,
    len: u32,
    offset: u64,
    buf: Option<&mut [u8]>,
) -> Result<Result<u64, u32>, NbdError> {
    match typ {
        CHUNK_NONE => {
            if len != 0 {
                return Err(proto("NONE chunk with a payload"));
            }
        }
        CHUNK_OFFSET_DATA | CHUNK_OFFSET_HOLE => {
            let buf = buf.ok_or_else(|| proto("data chunk in a reply to a non-read"))?;
            if len < 8 {
                return Err(proto("short data chunk"));
            }
            let at = read_u64(r)?;
            let n = if typ == CHUNK_OFFSET_DATA {
                u64::from(len - 8)
            } else {
                if len != 12 {
                    return Err(proto("bad hole chunk length"));
                }
                u64::from(read_u32(r)?)
            };
            let range = at
                .checked_sub(offset)
                .and_then(|start| Some((start, start.checked_add(n)?)))
                .filter(|&(_, end)| end <= buf.len() as u64)
                .ok_or_else(|| proto("chunk outside the requested range"))?;
            let dst = &mut buf[range.0 as usize..range.1 as usize];
            if typ == CHUNK_OFFSET_DATA {
                r.read_exact(dst)?;
            } else {
                dst.fill(0);
            }
            return Ok(Ok(n));
        }
        t if t & CHUNK_ERROR_BIT != 0 => {
            let data = read_vec(r, len)?;
            if data.len() < 6 {
                return Err(proto("short error chunk"));
            }
            let errno = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
            let msg_len = usize::from(u16::from_be_bytes([data[4], data[5]]));
            let msg = data.get(6..6 + msg_len).unwrap_or(&[]);
            crate::guest_warn!(
                "nbd: server error {errno}: {}",
                String::from_utf8_lossy(msg)
            );
            // errno 0 in an error chunk is a protocol violation; still fail.
            return Ok(Err(errno.max(5)));
        }
        _ => {
            // Unknown non-error chunk types must be ignored (e.g. block status).
            read_vec(r, len)?;
        }
    }
    Ok(Ok(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A stream with scripted server bytes; records what the client wrote.
    struct Script {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Script {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.input.read(b)
        }
    }
    impl Write for Script {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn script(input: Vec<u8>) -> Script {
        Script {
            input: Cursor::new(input),
            output: Vec::new(),
        }
    }

    fn greeting() -> Vec<u8> {
        let mut v = NBDMAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        v
    }

    fn opt_reply(opt: u32, typ: u32, data: &[u8]) -> Vec<u8> {
        let mut v = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&typ.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn info_export(size: u64, flags: u16) -> Vec<u8> {
        let mut d = INFO_EXPORT.to_be_bytes().to_vec();
        d.extend_from_slice(&size.to_be_bytes());
        d.extend_from_slice(&flags.to_be_bytes());
        d
    }

    #[test]
    fn handshake_with_structured_replies() {
        let mut input = greeting();
        input.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
        input.extend(opt_reply(OPT_GO, REP_INFO, &info_export(1 << 20, 0x4d)));
        input.extend(opt_reply(OPT_GO, REP_ACK, &[]));
        let mut s = script(input);
        let info = handshake(&mut s, "exp").unwrap();
        assert_eq!(info.size, 1 << 20);
        assert!(info.structured);
        assert!(info.has(TF_SEND_FLUSH) && info.has(TF_SEND_FUA));
        assert!(!info.has(TF_READ_ONLY));
        // Client flags, then STRUCTURED_REPLY, then GO naming "exp".
        assert_eq!(&s.output[..4], &3u32.to_be_bytes());
        assert!(s.output.windows(3).any(|w| w == b"exp"));
    }

    #[test]
    fn handshake_without_structured_replies() {
        let mut input = greeting();
        input.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[]));
        input.extend(opt_reply(OPT_GO, REP_INFO, &info_export(4096, 1)));
        input.extend(opt_reply(OPT_GO, REP_ACK, &[]));
        let info = handshake(&mut script(input), "").unwrap();
        assert!(!info.structured);
        assert_eq!(info.size, 4096);
    }

    #[test]
    fn handshake_reports_unknown_export() {
        let mut input = greeting();
        input.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
        input.extend(opt_reply(OPT_GO, REP_FLAG_ERROR | 6, b"no such export"));
        let err = handshake(&mut script(input), "x").unwrap_err();
        assert!(err.to_string().contains("unknown export"), "{err}");
    }

    #[test]
    fn handshake_rejects_garbage() {
        let err = handshake(&mut script(b"HTTP/1.1 200 OK\r\n\r\n".to_vec()), "").unwrap_err();
        assert!(matches!(err, NbdError::Protocol(_)), "{err}");
        // A stream that ends mid-greeting is a transport error.
        let err = handshake(&mut script(NBDMAGIC.to_be_bytes().to_vec()), "").unwrap_err();
        assert!(err.is_transport());
        // Oversized option replies are refused, not allocated.
        let mut input = greeting();
        input.extend(&OPT_REPLY_MAGIC.to_be_bytes());
        input.extend(&OPT_STRUCTURED_REPLY.to_be_bytes());
        input.extend(&REP_ACK.to_be_bytes());
        input.extend(&u32::MAX.to_be_bytes());
        assert!(matches!(
            handshake(&mut script(input), ""),
            Err(NbdError::Protocol(_))
        ));
    }

    fn simple(errno: u32, cookie: u64, data: &[u8]) -> Vec<u8> {
        let mut v = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&errno.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn chunk(flags: u16, typ: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&typ.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn simple_replies() {
        let mut buf = [0u8; 4];
        let mut r = Cursor::new(simple(0, 7, b"abcd"));
        assert_eq!(read_reply(&mut r, 7, 0, Some(&mut buf)).unwrap(), Ok(()));
        assert_eq!(&buf, b"abcd");
        let mut r = Cursor::new(simple(28, 8, &[]));
        assert_eq!(read_reply(&mut r, 8, 0, None).unwrap(), Err(28));
        let mut r = Cursor::new(simple(0, 9, &[]));
        assert!(read_reply(&mut r, 10, 0, None).is_err());
    }

    #[test]
    fn structured_read_with_data_and_hole() {
        let mut input = Vec::new();
        let mut data = 104u64.to_be_bytes().to_vec();
        data.extend_from_slice(b"wxyz");
        input.extend(chunk(0, CHUNK_OFFSET_DATA, 3, &data));
        let mut hole = 100u64.to_be_bytes().to_vec();
        hole.extend_from_slice(&4u32.to_be_bytes());
        input.extend(chunk(REPLY_FLAG_DONE, CHUNK_OFFSET_HOLE, 3, &hole));
        let mut buf = [0xffu8; 8];
        let res = read_reply(&mut Cursor::new(input), 3, 100, Some(&mut buf)).unwrap();
        assert_eq!(res, Ok(()));
        assert_eq!(&buf, b"\0\0\0\0wxyz");
    }

    #[test]
    fn structured_error_and_out_of_range_chunk() {
        let mut err = 5u32.to_be_bytes().to_vec();
        err.extend_from_slice(&2u16.to_be_bytes());
        err.extend_from_slice(b"io");
        let input = chunk(REPLY_FLAG_DONE, CHUNK_ERROR_BIT | 1, 1, &err);
        let mut buf = [0u8; 4];
        let res = read_reply(&mut Cursor::new(input), 1, 0, Some(&mut buf)).unwrap();
        assert_eq!(res, Err(5));

        let mut data = 2u64.to_be_bytes().to_vec();
        data.extend_from_slice(b"abcd");
        let input = chunk(REPLY_FLAG_DONE, CHUNK_OFFSET_DATA, 1, &data);
        assert!(read_reply(&mut Cursor::new(input), 1, 0, Some(&mut buf)).is_err());
    }

    #[test]
    fn structured_read_must_cover_the_range() {
        let mut data = 0u64.to_be_bytes().to_vec();
        data.extend_from_slice(b"ab");
        let input = chunk(REPLY_FLAG_DONE, CHUNK_OFFSET_DATA, 1, &data);
        let mut buf = [0u8; 4];
        assert!(read_reply(&mut Cursor::new(input), 1, 0, Some(&mut buf)).is_err());
    }

    #[test]
    fn structured_none_for_write() {
        let input = chunk(REPLY_FLAG_DONE, CHUNK_NONE, 4, &[]);
        assert_eq!(
            read_reply(&mut Cursor::new(input), 4, 0, None).unwrap(),
            Ok(())
        );
    }

    #[test]
    fn request_encoding() {
        let b = encode_request(Command::Write, CMD_FLAG_FUA, 9, 4096, 512);
        assert_eq!(&b[0..4], &REQUEST_MAGIC.to_be_bytes());
        assert_eq!(&b[4..6], &1u16.to_be_bytes());
        assert_eq!(&b[6..8], &1u16.to_be_bytes());
        assert_eq!(&b[8..16], &9u64.to_be_bytes());
        assert_eq!(&b[16..24], &4096u64.to_be_bytes());
        assert_eq!(&b[24..28], &512u32.to_be_bytes());
    }
}
