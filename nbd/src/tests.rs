//! Round trips of every message, truncated and oversized input, scripted
//! servers, and the client's steps against a server built from this
//! crate's server side over a unix socket pair.

use std::io::{self, Cursor, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::*;

/// A stream with scripted peer bytes; records what was written to it.
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
    ServerGreeting {
        flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
    }
    .encode()
    .to_vec()
}

fn opt_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    write_option_reply(&mut v, option, reply, data).unwrap();
    v
}

fn info_export(size: u64, flags: u16) -> Vec<u8> {
    InfoExport { size, flags }.encode().to_vec()
}

/// Every proper prefix of `bytes` fails to decode with `decode`.
fn prefixes_fail<T: std::fmt::Debug>(bytes: &[u8], decode: impl Fn(&[u8]) -> Result<T, Error>) {
    for n in 0..bytes.len() {
        let r = decode(&bytes[..n]);
        assert!(r.is_err(), "{n} of {} bytes decoded: {r:?}", bytes.len());
    }
}

#[test]
fn greeting_round_trip_and_garbage() {
    let g = ServerGreeting {
        flags: FLAG_FIXED_NEWSTYLE,
    };
    let b = g.encode();
    assert_eq!(&b[..8], b"NBDMAGIC");
    assert_eq!(&b[8..16], b"IHAVEOPT");
    assert_eq!(ServerGreeting::decode(&b).unwrap(), g);
    prefixes_fail(&b, |p| ServerGreeting::read(&mut &p[..]));
    let mut old = b;
    old[8..16].copy_from_slice(&0x0000_4202_8186_1253_u64.to_be_bytes());
    assert!(matches!(
        ServerGreeting::decode(&old),
        Err(Error::Protocol(_))
    ));
    let mut http = [0u8; 18];
    http.copy_from_slice(b"HTTP/1.1 200 OK\r\n\r");
    assert!(ServerGreeting::decode(&http).is_err());
}

#[test]
fn client_flags_follow_the_server() {
    assert_eq!(client_flags_for(FLAG_FIXED_NEWSTYLE), FLAG_C_FIXED_NEWSTYLE);
    assert_eq!(
        client_flags_for(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES),
        FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES
    );
}

#[test]
fn option_round_trip_truncated_and_oversized() {
    let mut b = Vec::new();
    write_option(&mut b, OPT_GO, b"data").unwrap();
    assert_eq!(b, encode_option(OPT_GO, b"data").unwrap());
    let h = OptionHeader::decode(b[..16].try_into().unwrap()).unwrap();
    assert_eq!(h, OptionHeader { option: 7, len: 4 });
    assert_eq!(h.encode()[..], b[..16]);
    let o = OptionRequest::read(&mut &b[..]).unwrap();
    assert_eq!(
        o,
        OptionRequest {
            option: OPT_GO,
            data: b"data".to_vec()
        }
    );
    prefixes_fail(&b, |p| OptionRequest::read(&mut &p[..]));
    // A bad magic, and an option longer than the bound: refused, with
    // nothing allocated for the claimed length.
    let mut bad = b.clone();
    bad[0] ^= 1;
    assert!(matches!(
        OptionRequest::read(&mut &bad[..]),
        Err(Error::Protocol(_))
    ));
    for len in [MAX_OPTION_DATA + 1, u32::MAX] {
        let big = OptionHeader { option: 1, len }.encode();
        let e = OptionRequest::read(&mut &big[..]).unwrap_err();
        assert!(matches!(e, Error::Protocol(_)), "{e}");
    }
    // At the bound exactly: read.
    let data = vec![7u8; MAX_OPTION_DATA as usize];
    let b = encode_option(OPT_LIST, &data).unwrap();
    assert_eq!(OptionRequest::read(&mut &b[..]).unwrap().data, data);
}

#[test]
fn option_reply_round_trip_truncated_and_oversized() {
    let b = opt_reply(OPT_INFO, REP_ERR_UNKNOWN, b"no such export");
    let h = OptionReplyHeader::decode(b[..20].try_into().unwrap()).unwrap();
    assert_eq!(
        h,
        OptionReplyHeader {
            option: OPT_INFO,
            reply: REP_ERR_UNKNOWN,
            len: 14
        }
    );
    assert_eq!(h.encode()[..], b[..20]);
    let r = OptionReply::read(&mut &b[..]).unwrap();
    assert!(r.is_error());
    assert_eq!(r.describe(), "unknown export: no such export");
    assert_eq!(
        OptionReply::read_for(&mut &b[..], OPT_INFO).unwrap().data,
        b"no such export"
    );
    assert!(OptionReply::read_for(&mut &b[..], OPT_GO).is_err());
    prefixes_fail(&b, |p| OptionReply::read(&mut &p[..]));
    let ack = OptionReply::read(&mut &opt_reply(OPT_GO, REP_ACK, &[])[..]).unwrap();
    assert!(!ack.is_error());
    let big = OptionReplyHeader {
        option: OPT_GO,
        reply: REP_INFO,
        len: u32::MAX,
    }
    .encode();
    assert!(matches!(
        OptionReply::read(&mut &big[..]),
        Err(Error::Protocol(_))
    ));
}

#[test]
fn info_round_trips() {
    let e = InfoExport {
        size: 1 << 40,
        flags: TFLAG_HAS_FLAGS | TFLAG_READ_ONLY,
    };
    assert_eq!(Info::decode(&e.encode()).unwrap(), Info::Export(e));
    prefixes_fail(&e.encode(), Info::decode);
    let bs = InfoBlockSize {
        min: 1,
        preferred: 4096,
        max: MAX_PAYLOAD,
    };
    assert_eq!(Info::decode(&bs.encode()).unwrap(), Info::BlockSize(bs));
    prefixes_fail(&bs.encode(), Info::decode);
    assert_eq!(Info::decode(&[0, 1, 9, 9]).unwrap(), Info::Other(1));
}

#[test]
fn go_request_round_trip_and_malformed() {
    let g = GoRequest {
        export: "vol@cred".into(),
        info_requests: vec![INFO_EXPORT, INFO_BLOCK_SIZE],
    };
    let b = g.encode().unwrap();
    assert_eq!(b.len(), 4 + 8 + 2 + 4);
    assert_eq!(GoRequest::decode(&b).unwrap(), g);
    prefixes_fail(&b, GoRequest::decode);
    let mut long = b.clone();
    long.push(0);
    assert!(GoRequest::decode(&long).is_err(), "trailing bytes");
    // A name length past the data (or past usize on 32 bits).
    let mut huge = u32::MAX.to_be_bytes().to_vec();
    huge.extend_from_slice(&[0; 8]);
    assert!(GoRequest::decode(&huge).is_err());
    let empty = GoRequest {
        export: String::new(),
        info_requests: vec![],
    };
    assert_eq!(GoRequest::decode(&empty.encode().unwrap()).unwrap(), empty);
}

#[test]
fn export_name_reply_and_server_entry_round_trips() {
    let r = ExportNameReply {
        size: 4096,
        flags: TFLAG_HAS_FLAGS,
    };
    let short = r.encode(true);
    assert_eq!(short.len(), ExportNameReply::LEN);
    let long = r.encode(false);
    assert_eq!(long.len(), ExportNameReply::LEN + ExportNameReply::ZEROES);
    assert!(long[ExportNameReply::LEN..].iter().all(|b| *b == 0));
    assert_eq!(ExportNameReply::decode(long[..10].try_into().unwrap()), r);

    let e = encode_server_entry("disk").unwrap();
    assert_eq!(decode_server_entry(&e).unwrap(), "disk");
    prefixes_fail(&e, decode_server_entry);
    let mut details = e.clone();
    details.extend_from_slice(b"a description");
    assert_eq!(decode_server_entry(&details).unwrap(), "disk");
}

#[test]
fn request_round_trip_and_bad_magic() {
    let r = Request::new(Command::Write, CMD_FLAG_FUA, 0xdead_beef, 4096, 512);
    let b = r.encode();
    assert_eq!(&b[0..4], &REQUEST_MAGIC.to_be_bytes());
    assert_eq!(&b[4..6], &1u16.to_be_bytes());
    assert_eq!(&b[6..8], &1u16.to_be_bytes());
    assert_eq!(&b[8..16], &0xdead_beefu64.to_be_bytes());
    assert_eq!(&b[16..24], &4096u64.to_be_bytes());
    assert_eq!(&b[24..28], &512u32.to_be_bytes());
    assert_eq!(Request::decode(&b).unwrap(), r);
    assert_eq!(Request::read(&mut &b[..]).unwrap(), r);
    prefixes_fail(&b, |p| Request::read(&mut &p[..]));
    let mut bad = b;
    bad[0] = 0;
    let e = Request::read(&mut &bad[..]).unwrap_err();
    assert!(e.to_string().contains("bad request magic"), "{e}");
    // A truncated request is a transport error (the peer hung up).
    let e = Request::read(&mut &b[..10]).unwrap_err();
    assert!(e.is_transport());
    assert_eq!(io::Error::from(e).kind(), io::ErrorKind::UnexpectedEof);
    for (cmd, kind) in [
        (Command::Read, CMD_READ),
        (Command::Disconnect, CMD_DISC),
        (Command::Flush, CMD_FLUSH),
        (Command::Trim, CMD_TRIM),
        (Command::WriteZeroes, CMD_WRITE_ZEROES),
    ] {
        assert_eq!(Request::new(cmd, 0, 0, 0, 0).kind, kind);
    }
}

#[test]
fn reply_headers_round_trip() {
    let s = SimpleReply {
        errno: EPERM,
        cookie: 7,
    };
    let b = s.encode();
    assert_eq!(&b[0..4], &[0x67, 0x44, 0x66, 0x98]);
    assert_eq!(
        ReplyHeader::read(&mut &b[..]).unwrap(),
        ReplyHeader::Simple(s)
    );
    prefixes_fail(&b, |p| ReplyHeader::read(&mut &p[..]));
    let c = ChunkHeader {
        flags: REPLY_FLAG_DONE,
        typ: REPLY_TYPE_OFFSET_HOLE,
        cookie: 9,
        len: 12,
    };
    let b = c.encode();
    let h = ReplyHeader::read(&mut &b[..]).unwrap();
    assert_eq!(h, ReplyHeader::Chunk(c));
    assert_eq!(h.cookie(), 9);
    assert!(c.done());
    prefixes_fail(&b, |p| ReplyHeader::read(&mut &p[..]));
    let e = ReplyHeader::read(&mut &[0xa5u8; 20][..]).unwrap_err();
    assert!(matches!(e, Error::Protocol(_)), "{e}");
}

#[test]
fn chunk_payloads_round_trip() {
    let hole = OffsetHole {
        offset: 100,
        length: 4,
    };
    assert_eq!(hole.encode().len() as u32, OffsetHole::LEN);
    let e = ErrorChunk {
        errno: EIO,
        message: "disk on fire".into(),
    };
    let b = e.encode();
    assert_eq!(ErrorChunk::decode(&b).unwrap(), e);
    prefixes_fail(&b[..6], ErrorChunk::decode);
    // A message length past the chunk: the message is left out.
    let cut = ErrorChunk::decode(&b[..8]).unwrap();
    assert_eq!((cut.errno, cut.message.as_str()), (EIO, ""));
    let long = ErrorChunk {
        errno: EIO,
        message: "x".repeat(70_000),
    };
    assert_eq!(
        ErrorChunk::decode(&long.encode()).unwrap().message.len(),
        usize::from(u16::MAX)
    );
}

// The client's steps against scripted servers.

#[test]
fn handshake_with_structured_replies() {
    let mut input = greeting();
    input.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    input.extend(opt_reply(OPT_GO, REP_INFO, &info_export(1 << 20, 0x4d)));
    input.extend(opt_reply(OPT_GO, REP_ACK, &[]));
    let mut s = script(input);
    client_greet(&mut s).unwrap();
    assert_eq!(opt_structured_reply(&mut s).unwrap(), None);
    let e = opt_go(&mut s, "exp").unwrap();
    assert_eq!(e.size, 1 << 20);
    let info = ExportInfo {
        size: e.size,
        flags: e.flags,
        structured: true,
    };
    assert!(info.has(TFLAG_SEND_FLUSH) && info.has(TFLAG_SEND_FUA));
    assert!(!info.has(TFLAG_READ_ONLY));
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
    let mut s = script(input);
    client_greet(&mut s).unwrap();
    let declined = opt_structured_reply(&mut s).unwrap().unwrap();
    assert_eq!(declined.describe(), "unsupported");
    assert_eq!(opt_go(&mut s, "").unwrap().size, 4096);
}

#[test]
fn go_refusals() {
    let mut input = opt_reply(OPT_GO, REP_ERR_UNKNOWN, b"no such export");
    let err = opt_go(&mut script(input), "x").unwrap_err();
    assert!(matches!(err, Error::Refused { .. }), "{err}");
    assert!(err.to_string().contains("unknown export"), "{err}");
    input = opt_reply(OPT_GO, REP_ERR_UNSUP, &[]);
    let err = opt_go(&mut script(input), "x").unwrap_err();
    assert!(matches!(err, Error::Protocol(_)), "{err}");
    // ACK without the export's size.
    input = opt_reply(OPT_GO, REP_INFO, &[0, 3]);
    input.extend(opt_reply(OPT_GO, REP_ACK, &[]));
    assert!(opt_go(&mut script(input), "x").is_err());
}

#[test]
fn handshake_rejects_garbage() {
    let err = client_greet(&mut script(b"HTTP/1.1 200 OK\r\n\r\n".to_vec())).unwrap_err();
    assert!(matches!(err, Error::Protocol(_)), "{err}");
    // A stream that ends mid-greeting is a transport error.
    let err = client_greet(&mut script(NBDMAGIC.to_be_bytes().to_vec())).unwrap_err();
    assert!(err.is_transport());
    // A server without fixed newstyle.
    let plain = ServerGreeting { flags: 0 }.encode().to_vec();
    assert!(matches!(
        client_greet(&mut script(plain)),
        Err(Error::Protocol(_))
    ));
    // Oversized option replies are refused, not allocated.
    let big = OptionReplyHeader {
        option: OPT_STRUCTURED_REPLY,
        reply: REP_ACK,
        len: u32::MAX,
    }
    .encode()
    .to_vec();
    assert!(matches!(
        opt_structured_reply(&mut script(big)),
        Err(Error::Protocol(_))
    ));
}

#[test]
fn server_greet_requires_fixed_newstyle() {
    let mut out = Vec::new();
    let flags = server_greet(&mut &FLAG_C_NO_ZEROES.to_be_bytes()[..], &mut out).unwrap_err();
    assert!(matches!(flags, Error::Protocol(_)));
    assert_eq!(out, greeting());
    let mut out = Vec::new();
    let both = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    assert_eq!(
        server_greet(&mut &both.to_be_bytes()[..], &mut out).unwrap(),
        both
    );
}

// Structured replies to reads, scripted.

/// Reads the whole reply to request `cookie`, the only one in flight:
/// `Ok(Err(errno))` is a server-side error.
fn read_reply<R: Read>(
    r: &mut R,
    cookie: u64,
    offset: u64,
    mut buf: Option<&mut [u8]>,
) -> Result<Result<(), u32>, Error> {
    let mut progress = ChunkProgress::default();
    loop {
        let hdr = ReplyHeader::read(r)?;
        if hdr.cookie() != cookie {
            return Err(Error::Protocol(format!(
                "reply for cookie {}",
                hdr.cookie()
            )));
        }
        match hdr {
            ReplyHeader::Simple(s) => {
                read_simple_data(r, s.errno, buf)?;
                return Ok(if s.errno == 0 { Ok(()) } else { Err(s.errno) });
            }
            ReplyHeader::Chunk(c) => {
                if let Some(res) = progress.chunk(r, c, offset, buf.as_deref_mut())? {
                    return Ok(res);
                }
            }
        }
    }
}

fn simple(errno: u32, cookie: u64, data: &[u8]) -> Vec<u8> {
    let mut v = SimpleReply { errno, cookie }.encode().to_vec();
    v.extend_from_slice(data);
    v
}

fn chunk(flags: u16, typ: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = ChunkHeader {
        flags,
        typ,
        cookie,
        len: payload.len() as u32,
    }
    .encode()
    .to_vec();
    v.extend_from_slice(payload);
    v
}

fn data_payload(offset: u64, data: &[u8]) -> Vec<u8> {
    let mut v = offset.to_be_bytes().to_vec();
    v.extend_from_slice(data);
    v
}

#[test]
fn simple_replies() {
    let mut buf = [0u8; 4];
    let mut r = Cursor::new(simple(0, 7, b"abcd"));
    assert_eq!(read_reply(&mut r, 7, 0, Some(&mut buf)).unwrap(), Ok(()));
    assert_eq!(&buf, b"abcd");
    let mut r = Cursor::new(simple(ENOSPC, 8, &[]));
    assert_eq!(read_reply(&mut r, 8, 0, None).unwrap(), Err(ENOSPC));
}

#[test]
fn structured_read_with_data_and_hole() {
    let mut input = chunk(0, REPLY_TYPE_OFFSET_DATA, 3, &data_payload(104, b"wxyz"));
    let hole = OffsetHole {
        offset: 100,
        length: 4,
    };
    input.extend(chunk(
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_HOLE,
        3,
        &hole.encode(),
    ));
    let mut buf = [0xffu8; 8];
    let res = read_reply(&mut Cursor::new(input), 3, 100, Some(&mut buf)).unwrap();
    assert_eq!(res, Ok(()));
    assert_eq!(&buf, b"\0\0\0\0wxyz");
}

#[test]
fn structured_errors_keep_their_value_and_message() {
    for errno in [EPERM, EIO, ENOSPC] {
        let err = ErrorChunk {
            errno,
            message: "io".into(),
        };
        let input = chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 1, &err.encode());
        let mut progress = ChunkProgress::default();
        let mut r = Cursor::new(input);
        let ReplyHeader::Chunk(c) = ReplyHeader::read(&mut r).unwrap() else {
            panic!("not a chunk");
        };
        let mut buf = [0u8; 4];
        let res = progress.chunk(&mut r, c, 0, Some(&mut buf)).unwrap();
        assert_eq!(res, Some(Err(errno)));
        assert_eq!(progress.error().unwrap().message, "io");
    }
    // errno 0 in an error chunk still fails the request.
    let zero = ErrorChunk {
        errno: 0,
        message: String::new(),
    };
    let input = chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 1, &zero.encode());
    assert_eq!(
        read_reply(&mut Cursor::new(input), 1, 0, None).unwrap(),
        Err(EIO)
    );
}

#[test]
fn bad_structured_replies_are_errors() {
    let mut buf = [0u8; 4];
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "out of range",
            chunk(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                1,
                &data_payload(2, b"abcd"),
            ),
        ),
        (
            "short of the range",
            chunk(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                1,
                &data_payload(0, b"ab"),
            ),
        ),
        (
            "offset before the read",
            chunk(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                1,
                &data_payload(u64::MAX, b"ab"),
            ),
        ),
        (
            "short data chunk",
            chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 1, &[0; 4]),
        ),
        (
            "hole of the wrong length",
            chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, 1, &[0; 16]),
        ),
        (
            "NONE with a payload",
            chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1, &[0; 4]),
        ),
        (
            "short error chunk",
            chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 1, &[0; 3]),
        ),
        (
            "oversized error chunk",
            ChunkHeader {
                flags: REPLY_FLAG_DONE,
                typ: REPLY_TYPE_ERROR,
                cookie: 1,
                len: u32::MAX,
            }
            .encode()
            .to_vec(),
        ),
        (
            "oversized unknown chunk",
            ChunkHeader {
                flags: 0,
                typ: 5,
                cookie: 1,
                len: MAX_OPTION_DATA + 1,
            }
            .encode()
            .to_vec(),
        ),
    ];
    for (what, input) in cases {
        let r = read_reply(&mut Cursor::new(input), 1, 0, Some(&mut buf));
        assert!(r.is_err(), "{what}: {r:?}");
    }
    // A data chunk answering a write.
    let input = chunk(
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        1,
        &data_payload(0, b"ab"),
    );
    assert!(read_reply(&mut Cursor::new(input), 1, 0, None).is_err());
    // Truncated in the payload: a transport error.
    let input = chunk(
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        1,
        &data_payload(0, b"abcd"),
    );
    let r = read_reply(
        &mut Cursor::new(&input[..input.len() - 1]),
        1,
        0,
        Some(&mut buf),
    );
    assert!(r.unwrap_err().is_transport());
}

#[test]
fn unknown_chunks_are_skipped_and_none_ends_a_write() {
    let mut input = chunk(0, 5, 4, &[1, 2, 3]);
    input.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 4, &[]));
    assert_eq!(
        read_reply(&mut Cursor::new(input), 4, 0, None).unwrap(),
        Ok(())
    );
}

// The client's steps against a server made of this crate's server side,
// over a unix socket pair.

const EXPORT: &str = "disk";
const SIZE: u64 = 1 << 20;

/// A small server: greeting, options until GO or EXPORT_NAME opens
/// `EXPORT` (or ABORT), then reads answered with structured replies
/// when they were negotiated (data and a hole), writes with simple ones.
fn serve(mut s: UnixStream) -> Result<Vec<Request>, Error> {
    let mut r = s.try_clone()?;
    let client_flags = server_greet(&mut r, &mut s)?;
    let mut structured = false;
    loop {
        let o = OptionRequest::read(&mut r)?;
        match o.option {
            OPT_STRUCTURED_REPLY => {
                structured = true;
                write_option_reply(&mut s, o.option, REP_ACK, &[])?;
            }
            OPT_GO | OPT_INFO => {
                let Ok(go) = GoRequest::decode(&o.data) else {
                    write_option_reply(&mut s, o.option, REP_ERR_INVALID, b"malformed")?;
                    continue;
                };
                if go.export != EXPORT {
                    write_option_reply(&mut s, o.option, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                }
                let flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH;
                let info = InfoExport { size: SIZE, flags }.encode();
                write_option_reply(&mut s, o.option, REP_INFO, &info)?;
                let bs = InfoBlockSize {
                    min: 1,
                    preferred: 4096,
                    max: MAX_PAYLOAD,
                };
                write_option_reply(&mut s, o.option, REP_INFO, &bs.encode())?;
                write_option_reply(&mut s, o.option, REP_ACK, &[])?;
                if o.option == OPT_GO {
                    break;
                }
            }
            OPT_EXPORT_NAME => {
                let reply = ExportNameReply {
                    size: SIZE,
                    flags: TFLAG_HAS_FLAGS,
                };
                s.write_all(&reply.encode(client_flags & FLAG_C_NO_ZEROES != 0))?;
                break;
            }
            OPT_LIST => {
                let entry = encode_server_entry(EXPORT)?;
                write_option_reply(&mut s, o.option, REP_SERVER, &entry)?;
                write_option_reply(&mut s, o.option, REP_ACK, &[])?;
            }
            OPT_ABORT => {
                write_option_reply(&mut s, o.option, REP_ACK, &[])?;
                return Ok(Vec::new());
            }
            _ => write_option_reply(&mut s, o.option, REP_ERR_UNSUP, &[])?,
        }
    }
    let mut seen = Vec::new();
    loop {
        let req = Request::read(&mut r)?;
        seen.push(req);
        match req.kind {
            CMD_DISC => return Ok(seen),
            CMD_READ if structured => {
                // The second half as a hole, the first as data, in that
                // order.
                let half = req.length / 2;
                let hole = OffsetHole {
                    offset: req.offset + u64::from(half),
                    length: req.length - half,
                };
                let h = ChunkHeader {
                    flags: 0,
                    typ: REPLY_TYPE_OFFSET_HOLE,
                    cookie: req.cookie,
                    len: OffsetHole::LEN,
                };
                s.write_all(&h.encode())?;
                s.write_all(&hole.encode())?;
                let h = ChunkHeader {
                    flags: REPLY_FLAG_DONE,
                    typ: REPLY_TYPE_OFFSET_DATA,
                    cookie: req.cookie,
                    len: 8 + half,
                };
                s.write_all(&h.encode())?;
                s.write_all(&req.offset.to_be_bytes())?;
                s.write_all(&vec![0xab; half as usize])?;
            }
            CMD_READ => {
                s.write_all(
                    &SimpleReply {
                        errno: 0,
                        cookie: req.cookie,
                    }
                    .encode(),
                )?;
                s.write_all(&vec![0xab; req.length as usize])?;
            }
            CMD_WRITE => {
                let mut data = vec![0; req.length as usize];
                r.read_exact(&mut data)?;
                let errno = if req.offset + u64::from(req.length) > SIZE {
                    ENOSPC
                } else {
                    0
                };
                s.write_all(
                    &SimpleReply {
                        errno,
                        cookie: req.cookie,
                    }
                    .encode(),
                )?;
            }
            _ => s.write_all(
                &SimpleReply {
                    errno: EINVAL,
                    cookie: req.cookie,
                }
                .encode(),
            )?,
        }
    }
}

fn pair() -> (
    UnixStream,
    std::thread::JoinHandle<Result<Vec<Request>, Error>>,
) {
    let (client, server) = UnixStream::pair().unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    (client, std::thread::spawn(move || serve(server)))
}

#[test]
fn client_and_server_over_a_socket_pair() {
    let (mut c, server) = pair();
    let greeting = client_greet(&mut c).unwrap();
    assert_eq!(greeting.flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    // LIST, an unknown option, an unknown export, then structured replies
    // and GO.
    write_option(&mut c, OPT_LIST, &[]).unwrap();
    let entry = OptionReply::read_for(&mut c, OPT_LIST).unwrap();
    assert_eq!(entry.reply, REP_SERVER);
    assert_eq!(decode_server_entry(&entry.data).unwrap(), EXPORT);
    assert_eq!(OptionReply::read(&mut c).unwrap().reply, REP_ACK);
    let tls = opt_starttls(&mut c).unwrap();
    assert_eq!(tls.reply, REP_ERR_UNSUP);
    let e = opt_go(&mut c, "nope").unwrap_err();
    assert!(matches!(e, Error::Refused { .. }), "{e}");
    assert_eq!(opt_structured_reply(&mut c).unwrap(), None);
    let info = opt_go(&mut c, EXPORT).unwrap();
    assert_eq!(info.size, SIZE);

    // A structured read (hole and data, out of order), a write, a write
    // past the end, then the end.
    c.write_all(&Request::new(Command::Read, 0, 1, 4096, 8).encode())
        .unwrap();
    let mut buf = [0x11u8; 8];
    assert_eq!(read_reply(&mut c, 1, 4096, Some(&mut buf)).unwrap(), Ok(()));
    assert_eq!(buf, [0xab, 0xab, 0xab, 0xab, 0, 0, 0, 0]);
    c.write_all(&Request::new(Command::Write, CMD_FLAG_FUA, 2, 0, 3).encode())
        .unwrap();
    c.write_all(b"abc").unwrap();
    assert_eq!(read_reply(&mut c, 2, 0, None).unwrap(), Ok(()));
    c.write_all(&Request::new(Command::Write, 0, 3, SIZE, 1).encode())
        .unwrap();
    c.write_all(b"x").unwrap();
    assert_eq!(read_reply(&mut c, 3, 0, None).unwrap(), Err(ENOSPC));
    c.write_all(&Request::new(Command::Disconnect, 0, 4, 0, 0).encode())
        .unwrap();
    let seen = server.join().unwrap().unwrap();
    assert_eq!(seen.len(), 4);
    assert_eq!(seen[1], Request::new(Command::Write, CMD_FLAG_FUA, 2, 0, 3));
}

#[test]
fn simple_replies_and_export_name_over_a_socket_pair() {
    // Without structured replies: GO, a simple read.
    let (mut c, server) = pair();
    client_greet(&mut c).unwrap();
    assert_eq!(opt_go(&mut c, EXPORT).unwrap().size, SIZE);
    c.write_all(&Request::new(Command::Read, 0, 9, 0, 4).encode())
        .unwrap();
    let mut buf = [0u8; 4];
    assert_eq!(read_reply(&mut c, 9, 0, Some(&mut buf)).unwrap(), Ok(()));
    assert_eq!(buf, [0xab; 4]);
    c.write_all(&Request::new(Command::Disconnect, 0, 10, 0, 0).encode())
        .unwrap();
    assert_eq!(server.join().unwrap().unwrap().len(), 2);

    // NBD_OPT_EXPORT_NAME, with and without the zeroes.
    for no_zeroes in [true, false] {
        let (mut c, server) = pair();
        let g = ServerGreeting::read(&mut c).unwrap();
        let flags = if no_zeroes {
            client_flags_for(g.flags)
        } else {
            FLAG_C_FIXED_NEWSTYLE
        };
        c.write_all(&flags.to_be_bytes()).unwrap();
        write_option(&mut c, OPT_EXPORT_NAME, EXPORT.as_bytes()).unwrap();
        let mut b = [0u8; ExportNameReply::LEN];
        c.read_exact(&mut b).unwrap();
        assert_eq!(ExportNameReply::decode(&b).size, SIZE);
        if !no_zeroes {
            let mut z = [1u8; ExportNameReply::ZEROES];
            c.read_exact(&mut z).unwrap();
            assert_eq!(z, [0; ExportNameReply::ZEROES]);
        }
        c.write_all(&Request::new(Command::Disconnect, 0, 1, 0, 0).encode())
            .unwrap();
        assert_eq!(server.join().unwrap().unwrap().len(), 1);
    }

    // ABORT ends negotiation.
    let (mut c, server) = pair();
    client_greet(&mut c).unwrap();
    write_option(&mut c, OPT_ABORT, &[]).unwrap();
    assert_eq!(
        OptionReply::read_for(&mut c, OPT_ABORT).unwrap().reply,
        REP_ACK
    );
    assert!(server.join().unwrap().unwrap().is_empty());

    // A client that hangs up mid-option: the server sees a transport
    // error, not a panic.
    let (mut c, server) = pair();
    client_greet(&mut c).unwrap();
    c.write_all(
        &OptionHeader {
            option: OPT_GO,
            len: 100,
        }
        .encode(),
    )
    .unwrap();
    c.write_all(&[0; 10]).unwrap();
    drop(c);
    assert!(server.join().unwrap().unwrap_err().is_transport());
}
