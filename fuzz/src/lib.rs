//! Shared pieces of the fuzz targets: a small guest memory whose
//! virtqueues (descriptor tables and avail rings) come straight from the
//! fuzzer's input, and a byte cursor to split inputs.

use ember_vmm::devices::virtio::Mem;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Guest memory of every virtqueue target: 128 KiB at guest address 0.
pub const MEM_SIZE: usize = 128 << 10;
/// Each queue `q` has its descriptor table at `q * QUEUE_STRIDE`, its avail
/// ring 4 KiB above and its used ring 8 KiB above.
pub const QUEUE_STRIDE: u64 = 0x3000;
/// Where the rest of the input goes: buffers for the descriptors to point at.
pub const DATA_BASE: u64 = 0x9000;

/// Reads an input front to back; past its end everything reads as zero.
pub struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Cursor { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    pub fn u16(&mut self) -> u16 {
        let b = self.bytes(2);
        let mut a = [0u8; 2];
        a[..b.len()].copy_from_slice(b);
        u16::from_le_bytes(a)
    }

    pub fn u64(&mut self) -> u64 {
        let b = self.bytes(8);
        let mut a = [0u8; 8];
        a[..b.len()].copy_from_slice(b);
        u64::from_le_bytes(a)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }
}

/// Guest memory and queues built from an input:
/// - a byte: the queue size, `1 << (b % 7)` (1 to 64 entries);
/// - a byte: bit 0 turns EVENT_IDX on;
/// - per queue: its descriptor table (16 bytes an entry) and its avail
///   ring (flags, idx, ring, used_event), written where the queue is;
/// - the rest: written at [`DATA_BASE`], for the descriptors to point at.
///
/// Anything short reads as zeros. Descriptors may point anywhere: outside
/// memory, over the rings, into each other.
pub struct Guest {
    pub mem: Mem,
    pub queues: Vec<Queue>,
    pub event_idx: bool,
}

pub fn guest(input: &mut Cursor<'_>, nqueues: usize) -> Guest {
    let mem = Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    let size: u16 = 1 << (input.u8() % 7);
    let event_idx = input.u8() & 1 != 0;
    let mut queues = Vec::with_capacity(nqueues);
    for q in 0..nqueues as u64 {
        let desc = q * QUEUE_STRIDE;
        let avail = desc + 0x1000;
        let used = desc + 0x2000;
        let table = input.bytes(16 * usize::from(size));
        mem.write_slice(table, GuestAddress(desc))
            .expect("in memory");
        let ring = input.bytes(6 + 2 * usize::from(size));
        mem.write_slice(ring, GuestAddress(avail))
            .expect("in memory");
        let mut queue = Queue::new(size).expect("queue size");
        queue.set_size(size);
        queue.set_desc_table_address(Some(desc as u32), Some(0));
        queue.set_avail_ring_address(Some(avail as u32), Some(0));
        queue.set_used_ring_address(Some(used as u32), Some(0));
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        queues.push(queue);
    }
    let data = input.rest();
    let room = MEM_SIZE - DATA_BASE as usize;
    let data = &data[..data.len().min(room)];
    mem.write_slice(data, GuestAddress(DATA_BASE))
        .expect("in memory");
    Guest {
        mem,
        queues,
        event_idx,
    }
}

/// The seed shape of [`guest`]: one valid chain per queue, each made of
/// `bufs` (guest address, length, device-writable), in queues of 16 entries,
/// then `data` at [`DATA_BASE`].
pub fn encode_guest(chains: &[Vec<(u64, u32, bool)>], data: &[u8]) -> Vec<u8> {
    const SIZE: usize = 16;
    let mut out = vec![4u8, 0u8]; // 1 << 4 = 16 entries, no EVENT_IDX.
    for bufs in chains {
        let mut table = vec![0u8; 16 * SIZE];
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let flags: u16 = u16::from(write) * 2 + if last { 0 } else { 1 };
            let e = &mut table[16 * i..16 * i + 16];
            e[0..8].copy_from_slice(&addr.to_le_bytes());
            e[8..12].copy_from_slice(&len.to_le_bytes());
            e[12..14].copy_from_slice(&flags.to_le_bytes());
            e[14..16].copy_from_slice(&((i + 1) as u16).to_le_bytes());
        }
        out.extend_from_slice(&table);
        let mut ring = vec![0u8; 6 + 2 * SIZE];
        if !bufs.is_empty() {
            ring[2..4].copy_from_slice(&1u16.to_le_bytes()); // avail.idx = 1
        }
        out.extend_from_slice(&ring); // ring[0] = head 0
    }
    out.extend_from_slice(data);
    out
}

/// Without a sanitizer libFuzzer cannot see single allocations (its
/// `-malloc_limit_mb` needs one; `-rss_limit_mb` only sees pages touched),
/// so every target runs under this allocator: one allocation larger than
/// [`MAX_ALLOC`] aborts the run as a crash, whether or not it is touched.
pub struct LimitAlloc;

/// Far above anything a valid input needs (the largest are 1 MiB page
/// messages and the 12 MiB invoke frames), far below the 4 GiB a length
/// field from a stranger can claim.
pub const MAX_ALLOC: usize = 128 << 20;

// SAFETY: forwards to the system allocator unchanged, or aborts.
unsafe impl std::alloc::GlobalAlloc for LimitAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        check(new);
        // SAFETY: the caller's contract, passed on.
        unsafe { std::alloc::System.realloc(ptr, layout, new) }
    }
}

fn check(size: usize) {
    if size > MAX_ALLOC {
        const MSG: &[u8] = b"ember-fuzz: one allocation over MAX_ALLOC (128 MiB)\n";
        // SAFETY: writes a static buffer to stderr; abort never returns.
        unsafe {
            libc::write(2, MSG.as_ptr().cast(), MSG.len());
            libc::abort();
        }
    }
}

#[global_allocator]
static ALLOC: LimitAlloc = LimitAlloc;
