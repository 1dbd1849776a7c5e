//! The migration stream as a destination reads it (preamble, `Hello` and
//! its memory layout, `Pages` into guest memory, `PostCopy` bitmaps,
//! `Overrides`, the `State` snapshot bytes), and the destination's
//! `PageRequest`s as a post-copy source answers them.
//!
//! Input: a mode byte. Even: records `kind: u8, len: u16 LE, payload`
//! that the target frames itself (preamble, lengths and CRCs right), so
//! the fuzzer reaches the payload decoders. Odd: the raw stream bytes.
#![no_main]

use std::io::Cursor;
use std::sync::mpsc;
use std::time::Duration;

use ember_fuzz::Cursor as Input;
use ember_vmm::fuzzing::check_layout;
use ember_vmm::migration::postcopy::{check_needed, Source};
use ember_vmm::migration::protocol::{
    parse_page_request, parse_pages, read_message, read_preamble, write_message, write_preamble,
    Hello, Kind, Message, PostCopyStart, POSTCOPY_VERSION,
};
use ember_vmm::migration::Progress;
use ember_vmm::snapshot::memory::{GuestMemoryState, PAGE_SIZE};
use ember_vmm::snapshot::MicrovmState;
use ember_vmm::vmm_config::snapshot::DriveOverride;
use ember_vmm::vstate::memory::GuestMemoryMmap;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const PAGE: usize = PAGE_SIZE as usize;
/// Layouts larger than this are checked but not allocated here.
const MAX_FUZZ_MEM: u64 = 1 << 20;

const KINDS: [Kind; 12] = [
    Kind::Hello,
    Kind::Pages,
    Kind::State,
    Kind::Resume,
    Kind::Abort,
    Kind::Loaded,
    Kind::Refused,
    Kind::Resumed,
    Kind::Overrides,
    Kind::PostCopy,
    Kind::PageRequest,
    Kind::PostCopyDone,
];

fn framed(data: &[u8]) -> Vec<u8> {
    let mut input = Input::new(data);
    let mut out = Vec::new();
    write_preamble(&mut out).expect("to a Vec");
    while !input.is_empty() {
        let kind = KINDS[usize::from(input.u8()) % KINDS.len()];
        let len = usize::from(input.u16());
        write_message(&mut out, kind, input.bytes(len)).expect("to a Vec");
    }
    out
}

fn memory(layout: &GuestMemoryState) -> Option<GuestMemoryMmap> {
    check_layout(layout).ok()?;
    if layout.total_size() > MAX_FUZZ_MEM {
        return None;
    }
    let ranges: Vec<_> = layout
        .regions
        .iter()
        .map(|r| (GuestAddress(r.base_address), r.size as usize))
        .collect();
    // check_layout's promise: what it accepts can be laid out.
    Some(GuestMemoryMmap::from_ranges(&ranges).expect("a checked layout maps"))
}

/// Every needed bit of every region set, as a source computes it.
fn all_needed(mem: &GuestMemoryMmap) -> Vec<Vec<u64>> {
    mem.iter()
        .map(|r| {
            let pages = (r.len() / PAGE_SIZE) as usize;
            let mut bits = vec![!0u64; pages.div_ceil(64)];
            if !pages.is_multiple_of(64) {
                *bits.last_mut().expect("a word") = (1u64 << (pages % 64)) - 1;
            }
            bits
        })
        .collect()
}

/// The destination's side, as `migration::receive` takes each message.
fn receive(stream: &[u8]) -> Option<(GuestMemoryMmap, Vec<Message>)> {
    let mut r = Cursor::new(stream);
    read_preamble(&mut r).ok()?;
    let hello = read_message(&mut r).ok()?;
    let hello: Hello = hello.expect(Kind::Hello, "Hello").ok()?.json().ok()?;
    let _ = hello.memory.total_size();
    let mem = memory(&hello.memory)?;
    let mut rest = Vec::new();
    // Any error ends the stream, as it does the receiver.
    while let Ok(msg) = read_message(&mut r) {
        match msg.kind {
            Kind::PostCopy => {
                if let Ok(start) = msg.json::<PostCopyStart>() {
                    if start.version == POSTCOPY_VERSION {
                        let _ = check_needed(&mem, &start.needed);
                    }
                }
            }
            Kind::Pages => {
                let Ok(runs) = parse_pages(&msg.payload, PAGE) else {
                    continue;
                };
                for run in runs {
                    let len = run.npages as usize * PAGE;
                    let at = GuestAddress(run.gpa);
                    if !vm_memory::GuestMemory::check_range(
                        &mem,
                        at,
                        len,
                        vm_memory::Permissions::Write,
                    ) {
                        continue;
                    }
                    match run.data {
                        Some(d) => mem.write_slice(d, at).expect("a checked range"),
                        None => mem
                            .write_slice(&vec![0u8; len], at)
                            .expect("a checked range"),
                    }
                }
            }
            Kind::State => {
                let _ = ember_vmm::snapshot::format::decode::<MicrovmState>(&msg.payload, "fuzz");
            }
            Kind::Overrides => {
                let _ = msg.json::<Vec<DriveOverride>>();
            }
            Kind::Abort | Kind::Refused => {
                let _ = msg.text();
            }
            Kind::PageRequest => {
                let _ = parse_page_request(&msg.payload, PAGE);
            }
            _ => {}
        }
        rest.push(msg);
    }
    Some((mem, rest))
}

/// The source's side: every message the destination sent, answered (page
/// requests) while the needed pages are pushed.
fn source(mem: GuestMemoryMmap, msgs: Vec<Message>) {
    let (tx, rx) = mpsc::channel();
    for m in msgs {
        tx.send(Ok(m)).expect("receiver alive");
    }
    drop(tx);
    let needed = all_needed(&mem);
    let mut src = Source::new(mem.clone(), needed, rx);
    let mut out = Vec::new();
    let _ = src.push_all(&mut out, &Progress::default(), Duration::ZERO);
    // What the source wrote parses as its messages, and its pages as runs
    // inside guest memory.
    let mut r = Cursor::new(&out[..]);
    while let Ok(m) = read_message(&mut r) {
        assert_eq!(m.kind, Kind::Pages);
        for run in parse_pages(&m.payload, PAGE).expect("the source's own pages") {
            let len = run.npages as usize * PAGE;
            assert!(vm_memory::GuestMemory::check_range(
                &mem,
                GuestAddress(run.gpa),
                len,
                vm_memory::Permissions::Read
            ));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let stream = if mode & 1 == 0 {
        framed(rest)
    } else {
        rest.to_vec()
    };
    if let Some((mem, msgs)) = receive(&stream) {
        source(mem, msgs);
    }
});
