//! The agent protocol's frame decoder, both ways (the agent reads
//! `Request`s from the host, hostd reads `Response`s from a guest that may
//! be hostile), and the in-guest Runtime API's router. The Runtime API's
//! HTTP parsing itself is tiny_http's, not Ember's.
//!
//! Input: a byte selecting the limit and the message type, then a stream
//! of frames (u32 BE length, JSON body).
#![no_main]

use std::io::Cursor;

use ember_agent::protocol::{
    encode_frame, read_frame_bytes_limited, ProtocolError, Request, Response,
};
use ember_agent::runtime::http::route;
use libfuzzer_sys::fuzz_target;
// Links ember_fuzz, whose global allocator aborts on one allocation over 128 MiB
// (without a use of the crate, it is not linked and the limit is off).
use ember_fuzz as _;

fn decode_all<T>(stream: &[u8], max: usize)
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    let mut r = Cursor::new(stream);
    // Each frame takes at least its 4-byte header: the loop ends.
    loop {
        match read_frame_bytes_limited(&mut r, max) {
            Ok(None) => break,
            Ok(Some(body)) => {
                assert!(body.len() <= max, "a frame of {} over {max}", body.len());
                if let Ok(msg) = serde_json::from_slice::<T>(&body) {
                    // What decodes encodes again, and round-trips.
                    let again = encode_frame(&msg).expect("re-encode");
                    let mut r2 = Cursor::new(&again[..]);
                    let back = read_frame_bytes_limited(&mut r2, usize::MAX)
                        .expect("re-read")
                        .expect("a frame");
                    let back: T = serde_json::from_slice(&back).expect("re-decode");
                    assert_eq!(back, msg, "a message that does not round-trip");
                }
            }
            Err(ProtocolError::FrameTooLarge { len, max: m }) => {
                assert!(len > m);
                break;
            }
            Err(_) => break,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let max = match (sel >> 2) & 3 {
        0 => ember_agent::MAX_FRAME_LEN,
        1 => ember_agent::protocol::MAX_INVOKE_FRAME_LEN,
        2 => 64,
        _ => 0,
    };
    match sel & 3 {
        0 => decode_all::<Request>(rest, max),
        1 => decode_all::<Response>(rest, max),
        2 => {
            // The Runtime API router: method byte, then the URL.
            let Some((&m, url)) = rest.split_first() else {
                return;
            };
            let url = String::from_utf8_lossy(url);
            let method = match m % 4 {
                0 => tiny_http::Method::Get,
                1 => tiny_http::Method::Post,
                2 => tiny_http::Method::Put,
                _ => tiny_http::Method::Delete,
            };
            let _ = route(&method, &url);
        }
        _ => {
            decode_all::<Request>(rest, max);
            decode_all::<Response>(rest, max);
        }
    }
});
