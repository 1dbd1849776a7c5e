//! The fixed newstyle handshake: the server's greeting and the client's
//! flags, options and their replies, and the payloads of the options and
//! replies Ember uses (`NBD_OPT_GO`/`INFO`, `NBD_OPT_EXPORT_NAME`'s
//! answer, `NBD_REP_INFO`, `NBD_REP_SERVER`). Client-side steps
//! ([`client_greet`], [`opt_structured_reply`], [`opt_go`],
//! [`opt_starttls`]) and the server's ([`server_greet`],
//! [`OptionRequest::read`], [`write_option_reply`]) are built from them.

use std::io::{self, Read, Write};

use crate::consts::*;
use crate::error::{proto, rep_error_name, Error};
use crate::wire::{fixed, read_array, read_bounded, read_u32, Fields, Out};

/// The server's newstyle greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerGreeting {
    /// Handshake flags (`FLAG_*`).
    pub flags: u16,
}

impl ServerGreeting {
    /// Bytes on the wire.
    pub const LEN: usize = 18;

    /// The greeting's bytes.
    pub fn encode(&self) -> [u8; Self::LEN] {
        fixed(
            Out::with_capacity(Self::LEN)
                .u64(NBDMAGIC)
                .u64(IHAVEOPT)
                .u16(self.flags),
        )
    }

    /// A greeting from its bytes; anything but a newstyle greeting is an
    /// error.
    pub fn decode(b: &[u8; Self::LEN]) -> Result<ServerGreeting, Error> {
        let mut f = Fields(b);
        if f.u64() != Some(NBDMAGIC) {
            return Err(proto("no NBDMAGIC greeting"));
        }
        if f.u64() != Some(IHAVEOPT) {
            return Err(proto("oldstyle negotiation is not supported"));
        }
        let flags = f.u16().ok_or_else(|| proto("short greeting"))?;
        Ok(ServerGreeting { flags })
    }

    /// Reads and decodes a greeting.
    pub fn read(r: &mut impl Read) -> Result<ServerGreeting, Error> {
        ServerGreeting::decode(&read_array(r)?)
    }
}

/// The client flags that answer a server's handshake flags: fixed
/// newstyle, and no zeroes if the server offers that.
pub fn client_flags_for(server_flags: u16) -> u32 {
    let mut flags = FLAG_C_FIXED_NEWSTYLE;
    if server_flags & FLAG_NO_ZEROES != 0 {
        flags |= FLAG_C_NO_ZEROES;
    }
    flags
}

/// The client's first step: reads the server's greeting (which must offer
/// fixed newstyle) and sends the client flags. Returns the greeting.
pub fn client_greet<S: Read + Write>(s: &mut S) -> Result<ServerGreeting, Error> {
    let greeting = ServerGreeting::read(s)?;
    if greeting.flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(proto("server lacks fixed newstyle negotiation"));
    }
    s.write_all(&client_flags_for(greeting.flags).to_be_bytes())?;
    Ok(greeting)
}

/// The server's first step: sends the greeting (fixed newstyle, no
/// zeroes offered) and reads the client's flags, which must say fixed
/// newstyle. Returns the client flags.
pub fn server_greet(r: &mut impl Read, w: &mut impl Write) -> Result<u32, Error> {
    let greeting = ServerGreeting {
        flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
    };
    w.write_all(&greeting.encode())?;
    w.flush()?;
    let client_flags = read_u32(r)?;
    if client_flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(proto("client does not speak fixed newstyle"));
    }
    Ok(client_flags)
}

/// The fixed part of an option: `IHAVEOPT`, the option, its data's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// `OPT_*`.
    pub option: u32,
    /// Bytes of data that follow.
    pub len: u32,
}

impl OptionHeader {
    /// Bytes on the wire.
    pub const LEN: usize = 16;

    /// The header's bytes.
    pub fn encode(&self) -> [u8; Self::LEN] {
        fixed(
            Out::with_capacity(Self::LEN)
                .u64(IHAVEOPT)
                .u32(self.option)
                .u32(self.len),
        )
    }

    /// A header from its bytes (the magic checked; the length is the
    /// caller's to bound, e.g. by [`MAX_OPTION_DATA`]).
    pub fn decode(b: &[u8; Self::LEN]) -> Result<OptionHeader, Error> {
        let mut f = Fields(b);
        if f.u64() != Some(IHAVEOPT) {
            return Err(proto("bad option magic"));
        }
        match (f.u32(), f.u32()) {
            (Some(option), Some(len)) => Ok(OptionHeader { option, len }),
            _ => Err(proto("short option header")),
        }
    }
}

/// An option as a server reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionRequest {
    /// `OPT_*`.
    pub option: u32,
    /// Its data (at most [`MAX_OPTION_DATA`] bytes).
    pub data: Vec<u8>,
}

impl OptionRequest {
    /// Reads one option; data over [`MAX_OPTION_DATA`] is refused before
    /// it is read.
    pub fn read(r: &mut impl Read) -> Result<OptionRequest, Error> {
        let h = OptionHeader::decode(&read_array(r)?)?;
        let data = read_bounded(r, h.len, MAX_OPTION_DATA, "option")?;
        Ok(OptionRequest {
            option: h.option,
            data,
        })
    }
}

/// The bytes of one option with its data.
pub fn encode_option(option: u32, data: &[u8]) -> Result<Vec<u8>, Error> {
    let len = u32::try_from(data.len()).map_err(|_| proto("option data too long"))?;
    let header = OptionHeader { option, len };
    Ok(Out::with_capacity(OptionHeader::LEN + data.len())
        .bytes(&header.encode())
        .bytes(data)
        .0)
}

/// Sends one option (in one write) and flushes.
pub fn write_option(w: &mut impl Write, option: u32, data: &[u8]) -> Result<(), Error> {
    w.write_all(&encode_option(option, data)?)?;
    w.flush()?;
    Ok(())
}

/// The fixed part of an option reply: the magic, the option, the reply
/// type and the length of its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option answered.
    pub option: u32,
    /// `REP_*`.
    pub reply: u32,
    /// Bytes of data that follow.
    pub len: u32,
}

impl OptionReplyHeader {
    /// Bytes on the wire.
    pub const LEN: usize = 20;

    /// The header's bytes.
    pub fn encode(&self) -> [u8; Self::LEN] {
        fixed(
            Out::with_capacity(Self::LEN)
                .u64(OPT_REPLY_MAGIC)
                .u32(self.option)
                .u32(self.reply)
                .u32(self.len),
        )
    }

    /// A header from its bytes (the magic checked; the length is the
    /// caller's to bound).
    pub fn decode(b: &[u8; Self::LEN]) -> Result<OptionReplyHeader, Error> {
        let mut f = Fields(b);
        if f.u64() != Some(OPT_REPLY_MAGIC) {
            return Err(proto("bad option reply magic"));
        }
        match (f.u32(), f.u32(), f.u32()) {
            (Some(option), Some(reply), Some(len)) => Ok(OptionReplyHeader { option, reply, len }),
            _ => Err(proto("short option reply header")),
        }
    }
}

/// One option reply, as a client reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    /// The option answered.
    pub option: u32,
    /// `REP_*`.
    pub reply: u32,
    /// Its data (at most [`MAX_OPTION_DATA`] bytes): an error's message,
    /// an `NBD_REP_INFO`, an `NBD_REP_SERVER`.
    pub data: Vec<u8>,
}

impl OptionReply {
    /// Reads one reply; data over [`MAX_OPTION_DATA`] is refused before
    /// it is read.
    pub fn read(r: &mut impl Read) -> Result<OptionReply, Error> {
        let h = OptionReplyHeader::decode(&read_array(r)?)?;
        let data = read_bounded(r, h.len, MAX_OPTION_DATA, "option reply")?;
        Ok(OptionReply {
            option: h.option,
            reply: h.reply,
            data,
        })
    }

    /// Reads one reply, which must answer `option`.
    pub fn read_for(r: &mut impl Read, option: u32) -> Result<OptionReply, Error> {
        let reply = OptionReply::read(r)?;
        if reply.option != option {
            return Err(proto(format!(
                "reply to option {}, expected {option}",
                reply.option
            )));
        }
        Ok(reply)
    }

    /// Whether it is an error reply (`NBD_REP_ERR_*`).
    pub fn is_error(&self) -> bool {
        self.reply & REP_FLAG_ERROR != 0
    }

    /// An error reply for people: its type's name, and its message if it
    /// has one.
    pub fn describe(&self) -> String {
        let name = rep_error_name(self.reply);
        let msg = String::from_utf8_lossy(&self.data);
        if msg.is_empty() {
            name.to_string()
        } else {
            format!("{name}: {msg}")
        }
    }
}

/// Sends one option reply (the caller flushes).
pub fn write_option_reply(
    w: &mut impl Write,
    option: u32,
    reply: u32,
    data: &[u8],
) -> io::Result<()> {
    let len = u32::try_from(data.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "option reply too long"))?;
    let header = OptionReplyHeader { option, reply, len };
    let mut buf = Vec::with_capacity(OptionReplyHeader::LEN + data.len());
    buf.extend_from_slice(&header.encode());
    buf.extend_from_slice(data);
    w.write_all(&buf)
}

/// `NBD_INFO_EXPORT`: the export's size and transmission flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InfoExport {
    /// Bytes.
    pub size: u64,
    /// Transmission flags (`TFLAG_*`).
    pub flags: u16,
}

impl InfoExport {
    /// The `NBD_REP_INFO` data.
    pub fn encode(&self) -> [u8; 12] {
        fixed(
            Out::with_capacity(12)
                .u16(INFO_EXPORT)
                .u64(self.size)
                .u16(self.flags),
        )
    }
}

/// `NBD_INFO_BLOCK_SIZE`: the export's minimum, preferred and maximum
/// block sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InfoBlockSize {
    /// Smallest request alignment.
    pub min: u32,
    /// Preferred request alignment.
    pub preferred: u32,
    /// Largest request payload.
    pub max: u32,
}

impl InfoBlockSize {
    /// The `NBD_REP_INFO` data.
    pub fn encode(&self) -> [u8; 14] {
        fixed(
            Out::with_capacity(14)
                .u16(INFO_BLOCK_SIZE)
                .u32(self.min)
                .u32(self.preferred)
                .u32(self.max),
        )
    }
}

/// The data of one `NBD_REP_INFO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`.
    Export(InfoExport),
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize(InfoBlockSize),
    /// Another information type (ignored by Ember).
    Other(u16),
}

impl Info {
    /// Decodes an `NBD_REP_INFO`'s data.
    pub fn decode(data: &[u8]) -> Result<Info, Error> {
        let mut f = Fields(data);
        let short = || proto("short NBD_REP_INFO");
        match f.u16().ok_or_else(short)? {
            INFO_EXPORT => Ok(Info::Export(InfoExport {
                size: f.u64().ok_or_else(short)?,
                flags: f.u16().ok_or_else(short)?,
            })),
            INFO_BLOCK_SIZE => Ok(Info::BlockSize(InfoBlockSize {
                min: f.u32().ok_or_else(short)?,
                preferred: f.u32().ok_or_else(short)?,
                max: f.u32().ok_or_else(short)?,
            })),
            other => Ok(Info::Other(other)),
        }
    }
}

/// The data of `NBD_OPT_GO` and `NBD_OPT_INFO`: an export name and the
/// information types asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoRequest {
    /// The export (invalid UTF-8 is replaced when decoded).
    pub export: String,
    /// `INFO_*` types asked for.
    pub info_requests: Vec<u16>,
}

impl GoRequest {
    /// The option's data.
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        let name_len =
            u32::try_from(self.export.len()).map_err(|_| proto("export name too long"))?;
        let count = u16::try_from(self.info_requests.len())
            .map_err(|_| proto("too many information requests"))?;
        let mut out = Out::with_capacity(6 + self.export.len() + 2 * self.info_requests.len())
            .u32(name_len)
            .bytes(self.export.as_bytes())
            .u16(count);
        for t in &self.info_requests {
            out = out.u16(*t);
        }
        Ok(out.0)
    }

    /// Decodes the option's data, which must be exactly a name and its
    /// information requests.
    pub fn decode(data: &[u8]) -> Result<GoRequest, Error> {
        let malformed = || proto("malformed NBD_OPT_GO/NBD_OPT_INFO");
        let mut f = Fields(data);
        let name_len = f.u32().ok_or_else(malformed)?;
        let name = f
            .bytes(usize::try_from(name_len).map_err(|_| malformed())?)
            .ok_or_else(malformed)?;
        let count = f.u16().ok_or_else(malformed)?;
        if f.rest().len() != 2 * usize::from(count) {
            return Err(malformed());
        }
        let info_requests = (0..count).filter_map(|_| f.u16()).collect();
        Ok(GoRequest {
            export: String::from_utf8_lossy(name).into_owned(),
            info_requests,
        })
    }
}

/// The server's answer to `NBD_OPT_EXPORT_NAME`: the export's size and
/// transmission flags (and 124 zeroes unless the client asked for none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportNameReply {
    /// Bytes.
    pub size: u64,
    /// Transmission flags (`TFLAG_*`).
    pub flags: u16,
}

impl ExportNameReply {
    /// Bytes on the wire before the zeroes.
    pub const LEN: usize = 10;
    /// The zeroes that follow unless `FLAG_C_NO_ZEROES` was negotiated.
    pub const ZEROES: usize = 124;

    /// The answer's bytes, with the zeroes unless `no_zeroes`.
    pub fn encode(&self, no_zeroes: bool) -> Vec<u8> {
        let mut out = Out::with_capacity(Self::LEN + Self::ZEROES)
            .u64(self.size)
            .u16(self.flags)
            .0;
        if !no_zeroes {
            out.resize(Self::LEN + Self::ZEROES, 0);
        }
        out
    }

    /// The answer from its first [`Self::LEN`] bytes.
    pub fn decode(b: &[u8; Self::LEN]) -> ExportNameReply {
        let mut f = Fields(b);
        ExportNameReply {
            size: f.u64().unwrap_or_default(),
            flags: f.u16().unwrap_or_default(),
        }
    }
}

/// `NBD_REP_SERVER`'s data for one export.
pub fn encode_server_entry(name: &str) -> Result<Vec<u8>, Error> {
    let len = u32::try_from(name.len()).map_err(|_| proto("export name too long"))?;
    Ok(Out::with_capacity(4 + name.len())
        .u32(len)
        .bytes(name.as_bytes())
        .0)
}

/// The export name in `NBD_REP_SERVER`'s data (details after it are
/// ignored).
pub fn decode_server_entry(data: &[u8]) -> Result<String, Error> {
    let mut f = Fields(data);
    let malformed = || proto("malformed NBD_REP_SERVER");
    let len = f.u32().ok_or_else(malformed)?;
    let name = f
        .bytes(usize::try_from(len).map_err(|_| malformed())?)
        .ok_or_else(malformed)?;
    Ok(String::from_utf8_lossy(name).into_owned())
}

/// What the handshake settled for an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Bytes.
    pub size: u64,
    /// Transmission flags (`TFLAG_*`).
    pub flags: u16,
    /// The server agreed to structured replies.
    pub structured: bool,
}

impl ExportInfo {
    /// Whether the server set transmission flag `flag` (and the flags are
    /// valid at all).
    pub fn has(&self, flag: u16) -> bool {
        self.flags & TFLAG_HAS_FLAGS != 0 && self.flags & flag != 0
    }
}

/// `NBD_OPT_STRUCTURED_REPLY`: `None` if the server agreed, or the error
/// reply by which it declined (structured replies are then not used).
pub fn opt_structured_reply<S: Read + Write>(s: &mut S) -> Result<Option<OptionReply>, Error> {
    write_option(s, OPT_STRUCTURED_REPLY, &[])?;
    let reply = OptionReply::read_for(s, OPT_STRUCTURED_REPLY)?;
    match reply.reply {
        REP_ACK => Ok(None),
        _ if reply.is_error() => Ok(Some(reply)),
        t => Err(proto(format!("unexpected reply {t} to STRUCTURED_REPLY"))),
    }
}

/// `NBD_OPT_GO` for `export` (no information asked for beyond what
/// every server sends): the export's size and flags once it is open.
/// Information of other types, and reply types it does not know, are
/// skipped.
pub fn opt_go<S: Read + Write>(s: &mut S, export: &str) -> Result<InfoExport, Error> {
    let go = GoRequest {
        export: export.to_string(),
        info_requests: Vec::new(),
    };
    write_option(s, OPT_GO, &go.encode()?)?;
    let mut info = None;
    loop {
        let reply = OptionReply::read_for(s, OPT_GO)?;
        match reply.reply {
            REP_INFO => {
                if let Ok(Info::Export(e)) = Info::decode(&reply.data) {
                    info = Some(e);
                }
            }
            REP_ACK => break,
            REP_ERR_UNSUP => return Err(proto("server does not support NBD_OPT_GO")),
            _ if reply.is_error() => {
                return Err(Error::Refused {
                    export: export.to_string(),
                    reason: reply.describe(),
                })
            }
            _ => {}
        }
    }
    info.ok_or_else(|| proto("GO acknowledged without export info"))
}

/// `NBD_OPT_STARTTLS`: the server's reply (`REP_ACK`: TLS starts now;
/// anything else: it will not).
pub fn opt_starttls<S: Read + Write>(s: &mut S) -> Result<OptionReply, Error> {
    write_option(s, OPT_STARTTLS, &[])?;
    OptionReply::read_for(s, OPT_STARTTLS)
}
