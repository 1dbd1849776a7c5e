//! The TCP connection tracker: its frame parser and the tracker fed an
//! arbitrary mix of guest and remote frames, pauses and resumes.
//!
//! Input: records of `op: u8, len: u16 LE, frame[len]`; `op % 5`:
//! 0 guest frame, 1 remote frame (checked, then delivered if allowed),
//! 2 remote frame delivered unchecked, 3 pause (terminate), 4 resume.
#![no_main]

use ember_fuzz::Cursor;
use ember_vmm::devices::virtio::net::conntrack::{parse, ConnTracker, RemoteVerdict, TCP_RST};
use ember_vmm::devices::virtio::net::VNET_HDR_LEN;
use libfuzzer_sys::fuzz_target;

/// Small, so eviction runs too.
const CAPACITY: usize = 8;

fn check_rst(frame: &[u8]) {
    assert!(frame.len() > VNET_HDR_LEN, "an RST without its frame");
    let s = parse(&frame[VNET_HDR_LEN..]).expect("the tracker's own RST parses");
    assert_ne!(s.flags & TCP_RST, 0, "an RST without RST set");
}

fuzz_target!(|data: &[u8]| {
    let mut input = Cursor::new(data);
    let mut t = ConnTracker::new(CAPACITY);
    while !input.is_empty() {
        let op = input.u8() % 5;
        let len = usize::from(input.u16());
        let frame = input.bytes(len);
        if let Some(s) = parse(frame) {
            let _ = (s.seq_len(), s.end_seq());
        }
        match op {
            0 => {
                t.on_guest_frame(frame);
            }
            1 => match t.check_remote_frame(frame) {
                RemoteVerdict::Deliver => t.on_remote_frame(frame),
                RemoteVerdict::Drop => {}
                RemoteVerdict::DropAndReply(rst) => check_rst(&rst),
            },
            2 => t.on_remote_frame(frame),
            3 => {
                for term in t.terminate() {
                    check_rst(&term.to_remote);
                    check_rst(&term.to_guest);
                }
                assert!(t.is_empty());
            }
            _ => t.forget_terminated(),
        }
        assert!(t.len() <= CAPACITY, "{} connections tracked", t.len());
        assert_eq!(t.keys().count(), t.len());
    }
});
