//! `ember-nbd`'s decoders, as each side meets a hostile peer: the
//! client's handshake steps (`client_greet`, `opt_structured_reply`,
//! `opt_go`) against fuzzed server bytes, the client's reading of replies
//! to a read (`ReplyHeader::read`, `ChunkProgress`), and the server's
//! reading of options and requests (`OptionRequest::read`,
//! `GoRequest::decode`, `Request::read`) and of the payloads
//! (`Info::decode`, `ErrorChunk::decode`, `decode_server_entry`).
//!
//! Input: a mode byte (0 handshake, 1 replies, else server side), then
//! for replies a 16-bit read length (at most 64 KiB) and a 16-bit offset,
//! then the peer's bytes.
//!
//! Checks: no panic, no allocation over 128 MiB (`LimitAlloc`); a failed
//! structured reply never reads as errno 0; every request, GO payload
//! (with a UTF-8 name) and export info that decodes re-encodes to the
//! same bytes.
#![no_main]

use std::io::{self, Read, Write};

use ember_nbd::*;
use libfuzzer_sys::fuzz_target;
// Links ember_fuzz, whose global allocator aborts on one allocation over 128 MiB.
use ember_fuzz as _;

/// The peer's bytes to read; what is written goes nowhere.
struct Peer<'a>(&'a [u8]);

impl Read for Peer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Peer<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn handshake(data: &[u8]) {
    let mut s = Peer(data);
    if client_greet(&mut s).is_err() {
        return;
    }
    let _ = opt_structured_reply(&mut s);
    if let Ok(info) = opt_go(&mut s, "export") {
        // What GO answered came from an NBD_INFO_EXPORT that decoded.
        let again = Info::decode(&info.encode()).expect("an encoded info decodes");
        assert_eq!(again, Info::Export(info));
    }
}

fn replies(data: &[u8]) {
    let (Some(len), Some(offset)) = (data.get(0..2), data.get(2..4)) else {
        return;
    };
    let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    let offset = u64::from(u16::from_be_bytes([offset[0], offset[1]]));
    let mut r = Peer(&data[4..]);
    let mut buf = vec![0xeeu8; len];
    let mut progress = ChunkProgress::default();
    loop {
        match ReplyHeader::read(&mut r) {
            Ok(ReplyHeader::Simple(s)) => {
                let _ = read_simple_data(&mut r, s.errno, Some(&mut buf));
                return;
            }
            Ok(ReplyHeader::Chunk(c)) => match progress.chunk(&mut r, c, offset, Some(&mut buf)) {
                Ok(None) => {}
                // (Success means data and holes covered the read: the
                // crate checks that.)
                Ok(Some(Ok(()))) => return,
                Ok(Some(Err(errno))) => {
                    assert_ne!(errno, 0, "a failed request reads as success");
                    return;
                }
                Err(_) => return,
            },
            Err(_) => return,
        }
    }
}

fn server_side(data: &[u8]) {
    let mut r = Peer(data);
    while let Ok(o) = OptionRequest::read(&mut r) {
        assert!(o.data.len() <= MAX_OPTION_DATA as usize);
        if let Ok(go) = GoRequest::decode(&o.data) {
            // A name in UTF-8 (else it was replaced) re-encodes as it came.
            let name_len = u32::from_be_bytes([o.data[0], o.data[1], o.data[2], o.data[3]]);
            if std::str::from_utf8(&o.data[4..4 + name_len as usize]).is_ok() {
                assert_eq!(go.encode().expect("a decoded GO encodes"), o.data);
            }
        }
        let _ = Info::decode(&o.data);
        let _ = ErrorChunk::decode(&o.data);
        let _ = decode_server_entry(&o.data);
    }
    let mut r = Peer(data);
    while let Ok(req) = Request::read(&mut r) {
        assert_eq!(Request::decode(&req.encode()).expect("re-decodes"), req);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode {
        0 => handshake(rest),
        1 => replies(rest),
        _ => server_side(rest),
    }
});
