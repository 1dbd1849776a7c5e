//! The migration stream: a preamble (magic and version), then messages,
//! each `kind: u8, len: u32 (LE), payload, crc64(kind, len, payload)`.
//! Source to destination: `Hello`, `Pages`..., `Overrides` (optional),
//! `State`, `Resume` (or `Abort`); destination to source: `Loaded` or
//! `Refused`, then `Resumed`.
//! Post-copy adds, from the source, `PostCopy` (which pages the
//! destination lacks) before `State`, and after `Resumed` more `Pages`
//! (pushed, or answering requests); from the destination, `PageRequest`s
//! (from `PostCopy` on, interleaved with the replies above) and finally
//! `PostCopyDone`. A VMM that predates them refuses the stream at
//! `PostCopy`, before the switch-over, so the source keeps the VM.
//! Every message is checked on arrival, so a corrupt or truncated stream
//! is refused before anything from it runs.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use crate::snapshot::memory::GuestMemoryState;

pub const MAGIC: [u8; 8] = *b"EMBERMIG";
/// Bumped whenever the stream's shape changes incompatibly.
pub const STREAM_VERSION: u32 = 1;
/// Largest message accepted: a pages message carries at most
/// [`MAX_PAGES_BYTES`] of page data; the state is small JSON.
pub const MAX_MESSAGE: u32 = 64 << 20;
/// Page data per `Pages` message, so cancellation and progress stay prompt.
pub const MAX_PAGES_BYTES: usize = 1 << 20;

const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Pages = 2,
    State = 3,
    Resume = 4,
    Abort = 5,
    Loaded = 6,
    Refused = 7,
    Resumed = 8,
    /// Drive overrides the source adds at the switch-over (JSON).
    Overrides = 9,
    /// Post-copy begins: [`PostCopyStart`] (JSON).
    PostCopy = 10,
    /// Pages the destination faulted on: [`encode_page_request`].
    PageRequest = 11,
    /// The destination has every page; the source may let go.
    PostCopyDone = 12,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        [
            Hello,
            Pages,
            State,
            Resume,
            Abort,
            Loaded,
            Refused,
            Resumed,
            Overrides,
            PostCopy,
            PageRequest,
            PostCopyDone,
        ]
        .into_iter()
        .find(|k| *k as u8 == b)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("migration stream I/O: {0}")]
    Io(#[from] io::Error),
    #[error("not an Ember migration stream (bad magic)")]
    BadMagic,
    #[error("migration stream version {found}; this VMM speaks version {STREAM_VERSION}")]
    Version { found: u32 },
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("message of {0} bytes exceeds the limit")]
    TooLarge(u32),
    #[error("message {0:?} is corrupt: checksum mismatch")]
    Checksum(Kind),
    #[error("malformed {kind:?} message: {why}")]
    Malformed { kind: Kind, why: Malformation },
    #[error("expected {expected}, got {got:?}")]
    Unexpected { expected: &'static str, got: Kind },
}

/// What is wrong inside a message.
#[derive(Debug, thiserror::Error)]
pub enum Malformation {
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("version {0}; this VMM speaks {POSTCOPY_VERSION}")]
    Version(u8),
    #[error("empty")]
    Empty,
    #[error("{0} address bytes")]
    AddressBytes(usize),
    #[error("address {0:#x} is not page-aligned")]
    Unaligned(u64),
    #[error("run header cut short at byte {0}")]
    RunHeaderCut(usize),
    #[error("run at {gpa:#x} of {npages} pages")]
    BadRun { gpa: u64, npages: u32 },
    #[error("run at {0:#x} cut short")]
    RunCut(u64),
    #[error("unknown run tag {0}")]
    RunTag(u8),
}

/// The first message: what the destination must prepare.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    pub vmm_version: String,
    pub memory: GuestMemoryState,
}

/// Version of the post-copy messages' payloads ([`PostCopyStart`] and
/// `PageRequest`), checked on arrival.
pub const POSTCOPY_VERSION: u8 = 1;

/// `PostCopy`: the pages the destination must get from the source, a
/// bitmap per memory region (bit `p` of word `p / 64`: page `p`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PostCopyStart {
    pub version: u8,
    pub needed: Vec<Vec<u64>>,
}

/// A `PageRequest` payload: the version byte, then each page's guest
/// address (u64 LE).
pub fn encode_page_request(gpas: &[u64]) -> Vec<u8> {
    let mut b = Vec::with_capacity(1 + gpas.len() * 8);
    b.push(POSTCOPY_VERSION);
    for g in gpas {
        b.extend_from_slice(&g.to_le_bytes());
    }
    b
}

pub fn parse_page_request(payload: &[u8], page_size: usize) -> Result<Vec<u64>, StreamError> {
    let bad = |why| StreamError::Malformed {
        kind: Kind::PageRequest,
        why,
    };
    match payload.first() {
        Some(&POSTCOPY_VERSION) => {}
        Some(&v) => return Err(bad(Malformation::Version(v))),
        None => return Err(bad(Malformation::Empty)),
    }
    let body = &payload[1..];
    if body.is_empty() || !body.len().is_multiple_of(8) {
        return Err(bad(Malformation::AddressBytes(body.len())));
    }
    body.chunks_exact(8)
        .map(|c| {
            let g = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            if g.is_multiple_of(page_size as u64) {
                Ok(g)
            } else {
                Err(bad(Malformation::Unaligned(g)))
            }
        })
        .collect()
}

/// One message as read off the stream.
#[derive(Debug)]
pub struct Message {
    pub kind: Kind,
    pub payload: Vec<u8>,
}

pub fn write_preamble(w: &mut impl Write) -> io::Result<()> {
    w.write_all(&MAGIC)?;
    w.write_all(&STREAM_VERSION.to_le_bytes())
}

pub fn read_preamble(r: &mut impl Read) -> Result<(), StreamError> {
    let mut b = [0u8; 12];
    r.read_exact(&mut b)?;
    if b[..8] != MAGIC {
        return Err(StreamError::BadMagic);
    }
    let found = u32::from_le_bytes(b[8..].try_into().expect("4 bytes"));
    if found != STREAM_VERSION {
        return Err(StreamError::Version { found });
    }
    Ok(())
}

fn checksum(kind: u8, len: [u8; 4], payload: &[u8]) -> u64 {
    let mut d = CRC.digest();
    d.update(&[kind]);
    d.update(&len);
    d.update(payload);
    d.finalize()
}

pub fn write_message(w: &mut impl Write, kind: Kind, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l <= MAX_MESSAGE)
        .ok_or_else(|| io::Error::other("migration message too large"))?
        .to_le_bytes();
    w.write_all(&[kind as u8])?;
    w.write_all(&len)?;
    w.write_all(payload)?;
    w.write_all(&checksum(kind as u8, len, payload).to_le_bytes())
}

pub fn write_json<T: Serialize>(w: &mut impl Write, kind: Kind, value: &T) -> io::Result<()> {
    let payload = serde_json::to_vec(value).map_err(io::Error::other)?;
    write_message(w, kind, &payload)
}

pub fn read_message(r: &mut impl Read) -> Result<Message, StreamError> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head)?;
    let kind = Kind::from_u8(head[0]).ok_or(StreamError::UnknownKind(head[0]))?;
    let len_bytes: [u8; 4] = head[1..].try_into().expect("4 bytes");
    let len = u32::from_le_bytes(len_bytes);
    if len > MAX_MESSAGE {
        return Err(StreamError::TooLarge(len));
    }
    // Grow with what arrives rather than trusting `len`.
    let mut payload = Vec::with_capacity((len as usize).min(MAX_PAGES_BYTES + 4096));
    r.take(u64::from(len)).read_to_end(&mut payload)?;
    if payload.len() != len as usize {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
    }
    let mut crc = [0u8; 8];
    r.read_exact(&mut crc)?;
    if u64::from_le_bytes(crc) != checksum(head[0], len_bytes, &payload) {
        return Err(StreamError::Checksum(kind));
    }
    Ok(Message { kind, payload })
}

impl Message {
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, StreamError> {
        serde_json::from_slice(&self.payload).map_err(|e| StreamError::Malformed {
            kind: self.kind,
            why: e.into(),
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    pub fn expect(self, kind: Kind, expected: &'static str) -> Result<Message, StreamError> {
        if self.kind == kind {
            Ok(self)
        } else {
            Err(StreamError::Unexpected {
                expected,
                got: self.kind,
            })
        }
    }
}

/// A run of pages in a `Pages` message: `npages` pages at guest address
/// `gpa`, either carried (`data`) or all zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRun<'a> {
    pub gpa: u64,
    pub npages: u32,
    /// None: the pages are all zero (nothing carried).
    pub data: Option<&'a [u8]>,
}

const RUN_DATA: u8 = 0;
const RUN_ZERO: u8 = 1;
const RUN_HEADER: usize = 8 + 4 + 1;

/// Builds `Pages` payloads of at most [`MAX_PAGES_BYTES`] of data.
#[derive(Default)]
pub struct PagesBuilder {
    buf: Vec<u8>,
    data_bytes: usize,
}

impl PagesBuilder {
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Whether `bytes` more page data would overflow this message.
    pub fn would_overflow(&self, bytes: usize) -> bool {
        self.data_bytes > 0 && self.data_bytes + bytes > MAX_PAGES_BYTES
    }

    pub fn push_data(&mut self, gpa: u64, data: &[u8], page_size: usize) {
        self.buf.extend_from_slice(&gpa.to_le_bytes());
        self.buf
            .extend_from_slice(&((data.len() / page_size) as u32).to_le_bytes());
        self.buf.push(RUN_DATA);
        self.buf.extend_from_slice(data);
        self.data_bytes += data.len();
    }

    pub fn push_zero(&mut self, gpa: u64, npages: u32) {
        self.buf.extend_from_slice(&gpa.to_le_bytes());
        self.buf.extend_from_slice(&npages.to_le_bytes());
        self.buf.push(RUN_ZERO);
    }

    pub fn take(&mut self) -> Vec<u8> {
        self.data_bytes = 0;
        std::mem::take(&mut self.buf)
    }
}

/// Splits a `Pages` payload into runs, checking that each is complete.
pub fn parse_pages(payload: &[u8], page_size: usize) -> Result<Vec<PageRun<'_>>, StreamError> {
    let bad = |why| StreamError::Malformed {
        kind: Kind::Pages,
        why,
    };
    let mut runs = Vec::new();
    let mut at = 0;
    while at < payload.len() {
        if payload.len() - at < RUN_HEADER {
            return Err(bad(Malformation::RunHeaderCut(at)));
        }
        let gpa = u64::from_le_bytes(payload[at..at + 8].try_into().expect("8 bytes"));
        let npages = u32::from_le_bytes(payload[at + 8..at + 12].try_into().expect("4 bytes"));
        let tag = payload[at + 12];
        at += RUN_HEADER;
        if gpa % page_size as u64 != 0 || npages == 0 {
            return Err(bad(Malformation::BadRun { gpa, npages }));
        }
        let data = match tag {
            RUN_ZERO => None,
            RUN_DATA => {
                let len = npages as usize * page_size;
                if payload.len() - at < len {
                    return Err(bad(Malformation::RunCut(gpa)));
                }
                let d = &payload[at..at + len];
                at += len;
                Some(d)
            }
            t => return Err(bad(Malformation::RunTag(t))),
        };
        runs.push(PageRun { gpa, npages, data });
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_damage_is_refused() {
        let mut buf = Vec::new();
        write_preamble(&mut buf).unwrap();
        write_message(&mut buf, Kind::State, b"{\"x\":1}").unwrap();
        write_message(&mut buf, Kind::Resume, b"").unwrap();
        let mut r = &buf[..];
        read_preamble(&mut r).unwrap();
        let m = read_message(&mut r).unwrap();
        assert_eq!(
            (m.kind, m.payload.as_slice()),
            (Kind::State, &b"{\"x\":1}"[..])
        );
        assert_eq!(read_message(&mut r).unwrap().kind, Kind::Resume);
        assert!(matches!(read_message(&mut r), Err(StreamError::Io(_))));

        // One flipped payload bit.
        let mut bad = buf.clone();
        bad[12 + 5 + 2] ^= 1;
        let mut r = &bad[12..];
        assert!(matches!(
            read_message(&mut r),
            Err(StreamError::Checksum(Kind::State))
        ));
        // Truncated inside the payload.
        let mut r = &buf[12..12 + 8];
        assert!(matches!(read_message(&mut r), Err(StreamError::Io(_))));
        // Another stream, another version, an unknown kind, a huge length.
        assert!(matches!(
            read_preamble(&mut &b"EMBERSNP\x01\0\0\0"[..]),
            Err(StreamError::BadMagic)
        ));
        assert!(matches!(
            read_preamble(&mut &b"EMBERMIG\x09\0\0\0"[..]),
            Err(StreamError::Version { found: 9 })
        ));
        assert!(matches!(
            read_message(&mut &[42u8, 0, 0, 0, 0][..]),
            Err(StreamError::UnknownKind(42))
        ));
        assert!(matches!(
            read_message(&mut &[2u8, 0xff, 0xff, 0xff, 0xff][..]),
            Err(StreamError::TooLarge(_))
        ));
    }

    #[test]
    fn page_requests_round_trip_and_bad_ones_are_refused() {
        let p = encode_page_request(&[0x1000, 0x7000]);
        assert_eq!(parse_page_request(&p, 4096).unwrap(), vec![0x1000, 0x7000]);
        let mut other = p.clone();
        other[0] = 9;
        for bad in [&b""[..], &p[..1], &p[..5], &other[..]] {
            assert!(parse_page_request(bad, 4096).is_err(), "{bad:?}");
        }
        let misaligned = encode_page_request(&[0x1001]);
        assert!(parse_page_request(&misaligned, 4096).is_err());
        // Through the stream, CRC and all.
        let mut buf = Vec::new();
        write_message(&mut buf, Kind::PageRequest, &p).unwrap();
        let m = read_message(&mut &buf[..]).unwrap();
        assert_eq!(m.kind, Kind::PageRequest);
        buf[7] ^= 1;
        assert!(matches!(
            read_message(&mut &buf[..]),
            Err(StreamError::Checksum(Kind::PageRequest))
        ));
    }

    #[test]
    fn page_runs_round_trip_and_bad_runs_are_refused() {
        let mut b = PagesBuilder::default();
        let page = vec![7u8; 4096 * 2];
        b.push_data(0x1000, &page, 4096);
        b.push_zero(0x8000, 3);
        assert!(!b.would_overflow(MAX_PAGES_BYTES - page.len()));
        assert!(b.would_overflow(MAX_PAGES_BYTES));
        let payload = b.take();
        assert!(b.is_empty());
        let runs = parse_pages(&payload, 4096).unwrap();
        assert_eq!(
            runs,
            vec![
                PageRun {
                    gpa: 0x1000,
                    npages: 2,
                    data: Some(&page[..])
                },
                PageRun {
                    gpa: 0x8000,
                    npages: 3,
                    data: None
                }
            ]
        );
        assert!(parse_pages(&payload[..payload.len() - 5], 4096).is_err());
        assert!(parse_pages(&payload[..20], 4096).is_err());
        let mut misaligned = PagesBuilder::default();
        misaligned.push_zero(0x1001, 1);
        assert!(parse_pages(&misaligned.take(), 4096).is_err());
    }
}
