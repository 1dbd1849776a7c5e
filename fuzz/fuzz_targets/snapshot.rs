//! The snapshot file decoder (header, checksum, the JSON payload into the
//! real `MicrovmState`) and the memory layout check with the mapping of a
//! memory file that follows it.
//!
//! Input: a mode byte. 0: the file's bytes as they are. 1: the JSON
//! payload, put behind a valid header (so checksums do not stop the
//! fuzzer). 2: a memory layout, 24-byte records `base, size, file_offset`
//! (u64 LE), checked and then mapped from a file of its size.
#![no_main]

use std::path::Path;

use ember_fuzz::Cursor;
use ember_vmm::fuzzing::check_layout;
use ember_vmm::snapshot::format::{decode, FORMAT_VERSION, MAGIC};
use ember_vmm::snapshot::memory::{
    describe, load_copy, map_file, GuestMemoryState, MemoryRegionState,
};
use ember_vmm::snapshot::MicrovmState;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::tempfile::TempFile;

/// Layouts larger than this are checked but not mapped here.
const MAX_FUZZ_MEM: u64 = 1 << 20;
const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

fn with_header(payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(28 + payload.len());
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    b.extend_from_slice(&CRC.checksum(payload).to_le_bytes());
    b.extend_from_slice(payload);
    b
}

/// A memory file of `size` bytes (in /dev/shm: no disk I/O), removed on drop.
fn memory_file(size: u64) -> TempFile {
    let f = TempFile::new_in(Path::new("/dev/shm")).expect("a temp file in /dev/shm");
    f.as_file().set_len(size).expect("set_len");
    f
}

/// check_layout, then (when small) the two ways a restore maps memory.
fn layout(state: &GuestMemoryState) {
    let _ = state.total_size();
    if check_layout(state).is_err() {
        return;
    }
    let total = state.total_size();
    if total > MAX_FUZZ_MEM {
        return;
    }
    let f = memory_file(total);
    let mem = map_file(f.as_path(), state).expect("a checked layout maps from a file of its size");
    assert_eq!(&describe(&mem), state, "mapped otherwise than described");
    let shared = load_copy(f.as_path(), state, false).expect("a checked layout loads");
    assert_eq!(&describe(&shared), state);
    // A file of the wrong size is refused, not mapped.
    let short = memory_file(total - 1);
    assert!(map_file(short.as_path(), state).is_err());
}

fn snapshot(bytes: &[u8]) {
    if let Ok(state) = decode::<MicrovmState>(bytes, "fuzz") {
        let _ = serde_json::to_vec(&state).expect("a decoded state encodes");
        layout(&state.memory);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => snapshot(rest),
        1 => snapshot(&with_header(rest)),
        _ => {
            let mut input = Cursor::new(rest);
            let mut regions = Vec::new();
            while !input.is_empty() && regions.len() < 64 {
                regions.push(MemoryRegionState {
                    base_address: input.u64(),
                    size: input.u64(),
                    file_offset: input.u64(),
                });
            }
            layout(&GuestMemoryState { regions });
        }
    }
});
