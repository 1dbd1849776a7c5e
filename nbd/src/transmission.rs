//! The transmission phase: request headers, simple replies, structured
//! reply chunks and their payloads, and a client's reassembly of a
//! structured reply to a read.

use std::io::{self, Read};

use crate::consts::*;
use crate::error::{proto, Error};
use crate::wire::{fixed, read_array, read_bounded, read_u32, read_u64, Fields, Out};

/// The commands Ember sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read = CMD_READ,
    /// `NBD_CMD_WRITE`.
    Write = CMD_WRITE,
    /// `NBD_CMD_DISC`.
    Disconnect = CMD_DISC,
    /// `NBD_CMD_FLUSH`.
    Flush = CMD_FLUSH,
    /// `NBD_CMD_TRIM`.
    Trim = CMD_TRIM,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes = CMD_WRITE_ZEROES,
}

/// A request header (a write's payload follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// The command (`CMD_*`; a server may get any value).
    pub kind: u16,
    /// The client's tag for the request, echoed in its reply.
    pub cookie: u64,
    /// Byte offset in the export.
    pub offset: u64,
    /// Bytes.
    pub length: u32,
}

impl Request {
    /// Bytes on the wire.
    pub const LEN: usize = 28;

    /// A request for `command`.
    pub fn new(command: Command, flags: u16, cookie: u64, offset: u64, length: u32) -> Request {
        Request {
            flags,
            kind: command as u16,
            cookie,
            offset,
            length,
        }
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; Self::LEN] {
        fixed(
            Out::with_capacity(Self::LEN)
                .u32(REQUEST_MAGIC)
                .u16(self.flags)
                .u16(self.kind)
                .u64(self.cookie)
                .u64(self.offset)
                .u32(self.length),
        )
    }

    /// A header from its bytes (the magic checked).
    pub fn decode(b: &[u8; Self::LEN]) -> Result<Request, Error> {
        let mut f = Fields(b);
        let magic = f.u32().unwrap_or_default();
        if magic != REQUEST_MAGIC {
            return Err(proto(format!("bad request magic {magic:#x}")));
        }
        match (f.u16(), f.u16(), f.u64(), f.u64(), f.u32()) {
            (Some(flags), Some(kind), Some(cookie), Some(offset), Some(length)) => Ok(Request {
                flags,
                kind,
                cookie,
                offset,
                length,
            }),
            _ => Err(proto("short request")),
        }
    }

    /// Reads and decodes a header.
    pub fn read(r: &mut impl Read) -> Result<Request, Error> {
        Request::decode(&read_array(r)?)
    }
}

/// A simple reply header (a successful read's data follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// 0, or the NBD error value.
    pub errno: u32,
    /// The request's cookie.
    pub cookie: u64,
}

impl SimpleReply {
    /// Bytes on the wire.
    pub const LEN: usize = 16;

    /// The header's bytes.
    pub fn encode(&self) -> [u8; Self::LEN] {
        fixed(
            Out::with_capacity(Self::LEN)
                .u32(SIMPLE_REPLY_MAGIC)
                .u32(self.errno)
                .u64(self.cookie),
        )
    }
}

/// A structured reply chunk's header (its payload follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// `REPLY_FLAG_*`.
    pub flags: u16,
    /// `REPLY_TYPE_*`.
    pub typ: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// Bytes of payload.
    pub len: u32,
}

impl ChunkHeader {
    /// Bytes on the wire.
    pub const LEN: usize = 20;

    /// The header's bytes.
    pub fn encode(&self) -> [u8; Self::LEN] {
        fixed(
            Out::with_capacity(Self::LEN)
                .u32(STRUCTURED_REPLY_MAGIC)
                .u16(self.flags)
                .u16(self.typ)
                .u64(self.cookie)
                .u32(self.len),
        )
    }

    /// Whether it is the reply's last chunk.
    pub fn done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

/// The start of one reply: a simple reply, or one structured chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply.
    Simple(SimpleReply),
    /// One chunk of a structured reply.
    Chunk(ChunkHeader),
}

impl ReplyHeader {
    /// The cookie of the request it answers.
    pub fn cookie(&self) -> u64 {
        match self {
            ReplyHeader::Simple(s) => s.cookie,
            ReplyHeader::Chunk(c) => c.cookie,
        }
    }

    /// Reads the header of the next reply or chunk, of whichever request:
    /// with several requests in flight the server answers in any order
    /// (and may interleave chunks of different requests).
    pub fn read(r: &mut impl Read) -> Result<ReplyHeader, Error> {
        match read_u32(r)? {
            SIMPLE_REPLY_MAGIC => {
                let b: [u8; 12] = read_array(r)?;
                let mut f = Fields(&b);
                Ok(ReplyHeader::Simple(SimpleReply {
                    errno: f.u32().unwrap_or_default(),
                    cookie: f.u64().unwrap_or_default(),
                }))
            }
            STRUCTURED_REPLY_MAGIC => {
                let b: [u8; 16] = read_array(r)?;
                let mut f = Fields(&b);
                Ok(ReplyHeader::Chunk(ChunkHeader {
                    flags: f.u16().unwrap_or_default(),
                    typ: f.u16().unwrap_or_default(),
                    cookie: f.u64().unwrap_or_default(),
                    len: f.u32().unwrap_or_default(),
                }))
            }
            m => Err(proto(format!("bad reply magic {m:#x}"))),
        }
    }
}

/// Reads the rest of a simple reply: a successful read's data into `buf`.
pub fn read_simple_data<R: Read>(r: &mut R, errno: u32, buf: Option<&mut [u8]>) -> io::Result<()> {
    match buf {
        Some(buf) if errno == 0 => r.read_exact(buf),
        _ => Ok(()),
    }
}

/// The payload of `NBD_REPLY_TYPE_OFFSET_HOLE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetHole {
    /// Where the zeroes start.
    pub offset: u64,
    /// How many bytes read as zeroes.
    pub length: u32,
}

impl OffsetHole {
    /// Bytes of payload.
    pub const LEN: u32 = 12;

    /// The payload's bytes.
    pub fn encode(&self) -> [u8; 12] {
        fixed(Out::with_capacity(12).u64(self.offset).u32(self.length))
    }
}

/// The payload of an error chunk (`NBD_REPLY_TYPE_ERROR`; other error
/// types put more after the message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorChunk {
    /// The NBD error value (nonzero).
    pub errno: u32,
    /// A message for people (may be empty).
    pub message: String,
}

impl ErrorChunk {
    /// The payload's bytes (a message over 64 KiB is cut short).
    pub fn encode(&self) -> Vec<u8> {
        let msg = self.message.as_bytes();
        let msg = &msg[..msg.len().min(usize::from(u16::MAX))];
        Out::with_capacity(6 + msg.len())
            .u32(self.errno)
            .u16(msg.len() as u16)
            .bytes(msg)
            .0
    }

    /// Decodes an error chunk's payload (at least its errno and message
    /// length).
    pub fn decode(data: &[u8]) -> Result<ErrorChunk, Error> {
        let mut f = Fields(data);
        let errno = f.u32().ok_or_else(|| proto("short error chunk"))?;
        let msg_len = f.u16().ok_or_else(|| proto("short error chunk"))?;
        // A message longer than the chunk is left out, not an error: the
        // chunk still says the request failed.
        let msg = f.bytes(usize::from(msg_len)).unwrap_or_default();
        Ok(ErrorChunk {
            errno,
            message: String::from_utf8_lossy(msg).into_owned(),
        })
    }
}

/// What a structured reply to one request has delivered so far (a client
/// keeps one per request with chunks outstanding).
#[derive(Debug, Default)]
pub struct ChunkProgress {
    /// Bytes of the read filled by data and hole chunks, which the
    /// protocol forbids to overlap: a short total would hand the caller
    /// whatever the buffer held before.
    covered: u64,
    error: Option<ErrorChunk>,
}

impl ChunkProgress {
    /// Reads the payload of one chunk (its header `hdr` already read) into
    /// `buf` (for a read of `buf.len()` bytes at `offset`; `None` for other
    /// requests). Returns the request's outcome once the chunk is its
    /// last: `Some(Ok(()))`, or `Some(Err(errno))` for a server-side error
    /// (see [`ChunkProgress::error`] for its message).
    pub fn chunk<R: Read>(
        &mut self,
        r: &mut R,
        hdr: ChunkHeader,
        offset: u64,
        buf: Option<&mut [u8]>,
    ) -> Result<Option<Result<(), u32>>, Error> {
        let want = buf.as_ref().map_or(0, |b| b.len() as u64);
        match read_chunk(r, hdr.typ, hdr.len, offset, buf)? {
            Ok(n) => self.covered += n,
            Err(e) => self.error = Some(e),
        }
        if !hdr.done() {
            return Ok(None);
        }
        if let Some(e) = &self.error {
            // errno 0 in an error chunk breaks the protocol; still fail.
            return Ok(Some(Err(if e.errno == 0 { EIO } else { e.errno })));
        }
        if self.covered != want {
            return Err(proto(format!(
                "read reply covered {} of {want} bytes",
                self.covered
            )));
        }
        Ok(Some(Ok(())))
    }

    /// The last error chunk of the reply, if any.
    pub fn error(&self) -> Option<&ErrorChunk> {
        self.error.as_ref()
    }
}

/// Places one structured chunk's payload; returns how many bytes of the
/// read it filled, or the error chunk.
fn read_chunk<R: Read>(
    r: &mut R,
    typ: u16,
    len: u32,
    offset: u64,
    buf: Option<&mut [u8]>,
) -> Result<Result<u64, ErrorChunk>, Error> {
    match typ {
        REPLY_TYPE_NONE => {
            if len != 0 {
                return Err(proto("NONE chunk with a payload"));
            }
        }
        REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
            let buf = buf.ok_or_else(|| proto("data chunk in a reply to a non-read"))?;
            if len < 8 {
                return Err(proto("short data chunk"));
            }
            let at = read_u64(r)?;
            let n = if typ == REPLY_TYPE_OFFSET_DATA {
                u64::from(len - 8)
            } else {
                if len != OffsetHole::LEN {
                    return Err(proto("bad hole chunk length"));
                }
                u64::from(read_u32(r)?)
            };
            let (start, end) = at
                .checked_sub(offset)
                .and_then(|start| Some((start, start.checked_add(n)?)))
                .filter(|&(_, end)| end <= buf.len() as u64)
                .ok_or_else(|| proto("chunk outside the requested range"))?;
            let dst = &mut buf[start as usize..end as usize];
            if typ == REPLY_TYPE_OFFSET_DATA {
                r.read_exact(dst)?;
            } else {
                dst.fill(0);
            }
            return Ok(Ok(n));
        }
        t if t & REPLY_TYPE_ERROR_BIT != 0 => {
            let data = read_bounded(r, len, MAX_OPTION_DATA, "error chunk")?;
            return Ok(Err(ErrorChunk::decode(&data)?));
        }
        _ => {
            // Unknown non-error chunk types are skipped (e.g. block status).
            read_bounded(r, len, MAX_OPTION_DATA, "chunk")?;
        }
    }
    Ok(Ok(0))
}
