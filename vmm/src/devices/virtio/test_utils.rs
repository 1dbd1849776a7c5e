//! A guest-side split virtqueue for device tests.
//!
//! virtio-queue's `mock::MockSplitQueue` (0.18) places the used ring inside
//! the avail ring (its `end()` adds the element count, not bytes) and never
//! wraps the avail ring, so longer tests and EVENT_IDX tests corrupt it.
//! This small driver-side model lays the rings out without overlap.

use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::Mem;
use crate::vmm_config::drive::BlockDeviceConfig;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// The read-write root drive `rootfs` on the file `path`.
pub(crate) fn root_drive(path: &str) -> BlockDeviceConfig {
    BlockDeviceConfig {
        is_root_device: true,
        ..BlockDeviceConfig::file("rootfs", path)
    }
}

/// A disk of `sectors` sectors whose every byte is its sector number.
pub(crate) fn sector_disk(sectors: u64) -> vmm_sys_util::tempfile::TempFile {
    use std::os::unix::fs::FileExt;
    let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
    for s in 0..sectors {
        f.as_file().write_all_at(&[s as u8; 512], s * 512).unwrap();
    }
    f
}

pub(crate) fn test_mem() -> Mem {
    Mem::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

/// One buffer of a chain: guest address, length, device-writable.
#[derive(Clone, Copy)]
pub(crate) struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

pub(crate) fn rd(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: false,
    }
}

pub(crate) fn wr(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: true,
    }
}

/// The driver's view of one split queue in guest memory.
pub(crate) struct TestQueue<'a> {
    mem: &'a Mem,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// Next free descriptor slot (slots are recycled round-robin).
    next_desc: u16,
}

impl<'a> TestQueue<'a> {
    /// A queue of `size` entries with its rings in the 16 KiB at `base`.
    pub(crate) fn new(mem: &'a Mem, base: u64, size: u16) -> TestQueue<'a> {
        assert!(size <= 256);
        let q = TestQueue {
            mem,
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
        };
        mem.write_slice(&[0u8; 0x4000], GuestAddress(base)).unwrap();
        q
    }

    /// The device-side queue as the transport would configure it.
    pub(crate) fn create_queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Writes a chain into free descriptor slots and makes it available.
    /// Returns its head index.
    pub(crate) fn add_chain(&mut self, bufs: &[Buf]) -> u16 {
        if usize::from(self.next_desc) + bufs.len() > usize::from(self.size) {
            self.next_desc = 0;
        }
        let head = self.next_desc;
        for (i, b) in bufs.iter().enumerate() {
            let index = head + i as u16;
            let last = i + 1 == bufs.len();
            let mut flags = if b.write { VRING_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT;
            }
            let desc = RawDescriptor::from(Descriptor::new(b.addr, b.len, flags, index + 1));
            self.mem
                .write_obj(desc, GuestAddress(self.desc + 16 * u64::from(index)))
                .unwrap();
        }
        self.next_desc += bufs.len() as u16;
        self.publish(head);
        head
    }

    /// Puts `head` in the avail ring and bumps avail.idx.
    pub(crate) fn publish(&self, head: u16) {
        let idx = self.avail_idx();
        let slot = self.avail + 4 + 2 * u64::from(idx % self.size);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.set_avail_idx(idx.wrapping_add(1));
    }

    pub(crate) fn avail_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.avail + 2)).unwrap()
    }

    pub(crate) fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Number of used entries the device has published.
    pub(crate) fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// (head index, length) of used entry number `i`.
    pub(crate) fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (id, len)
    }

    /// EVENT_IDX: interrupt me once used entry `v` is written.
    pub(crate) fn set_used_event(&self, v: u16) {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        self.mem.write_obj(v, GuestAddress(at)).unwrap();
    }

    /// EVENT_IDX: the avail index at which the device wants a kick.
    pub(crate) fn avail_event(&self) -> u16 {
        let at = self.used + 4 + 8 * u64::from(self.size);
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }
}

pub(crate) fn read_bytes(mem: &Mem, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

pub(crate) fn write_bytes(mem: &Mem, addr: u64, data: &[u8]) {
    mem.write_slice(data, GuestAddress(addr)).unwrap();
}

/// Reads a 32-bit virtio-mmio register, as the guest driver does.
pub(crate) fn r(t: &mut super::MmioTransport, off: u64) -> u32 {
    use crate::devices::bus::BusDevice;
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

/// Writes a 32-bit virtio-mmio register, as the guest driver does.
pub(crate) fn w(t: &mut super::MmioTransport, off: u64, v: u32) {
    use crate::devices::bus::BusDevice;
    t.write(off, &v.to_le_bytes());
}
