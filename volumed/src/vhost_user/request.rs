//! One virtio-blk request (virtio 1.2, 5.2.6): parsed from its descriptor
//! chain, run against the volume's image, answered with a status byte.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

use virtio_bindings::virtio_blk::*;
use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::{ByteValued, GuestMemoryMmap};

use crate::image;

pub const SECTOR: u64 = 512;
/// The longest read or write accepted in one request (larger ones fail):
/// bounds the buffer a guest can make the backend allocate.
pub const MAX_DATA: usize = 32 << 20;
/// Most segments in one DISCARD or WRITE_ZEROES request (config space).
pub const MAX_DISCARD_SEG: u32 = 1;
/// Most sectors in one DISCARD or WRITE_ZEROES segment (config space).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Length of the GET_ID answer.
const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

/// `struct virtio_blk_outhdr`.
#[derive(Clone, Copy, Default)]
#[repr(C)]
struct OutHdr {
    kind: u32,
    ioprio: u32,
    sector: u64,
}
// SAFETY: plain integers, no padding, any bit pattern is valid.
unsafe impl ByteValued for OutHdr {}

/// `struct virtio_blk_discard_write_zeroes`.
#[derive(Clone, Copy, Default)]
#[repr(C)]
struct Segment {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}
// SAFETY: plain integers, no padding, any bit pattern is valid.
unsafe impl ByteValued for Segment {}

/// The volume as one connection serves it.
pub struct Disk<'a> {
    pub file: &'a File,
    pub size: u64,
    pub id: &'a str,
    /// Called with each range written (for live copies' dirty logs).
    pub written: &'a dyn Fn(u64, u64),
}

type Mem = GuestMemoryMmap<()>;

/// What the device wrote into the chain (the used length), or None for a
/// chain too malformed to carry a status byte (it is returned unanswered).
/// `allowed` is whether the connection's fencing token is still current:
/// if not, nothing is applied and the status is IOERR.
pub fn handle<M>(
    disk: &Disk,
    chain: DescriptorChain<M>,
    mem: &Mem,
    allowed: impl FnOnce() -> bool,
) -> Option<u32>
where
    M: std::ops::Deref<Target = Mem> + Clone,
{
    let mut r = Reader::new(mem, chain.clone()).ok()?;
    let mut w = Writer::new(mem, chain).ok()?;
    // The status is the last writable byte; the data writable part before it.
    let data_len = w.available_bytes().checked_sub(1)?;
    let mut status_w = w.split_at(data_len).ok()?;
    let (status, written) = match r.read_obj::<OutHdr>() {
        Err(_) => (VIRTIO_BLK_S_IOERR, 0),
        Ok(_) if !allowed() => (VIRTIO_BLK_S_IOERR, 0),
        Ok(hdr) => run(disk, hdr, &mut r, &mut w, data_len),
    };
    status_w.write_obj(status as u8).ok()?;
    Some(written + 1)
}

/// Runs one request: (status, bytes of data written to the guest).
fn run(disk: &Disk, hdr: OutHdr, r: &mut Reader, w: &mut Writer, data_len: usize) -> (u32, u32) {
    let in_range = |len: u64| {
        hdr.sector
            .checked_mul(SECTOR)
            .and_then(|off| off.checked_add(len))
            .is_some_and(|end| end <= disk.size)
    };
    let offset = hdr.sector.wrapping_mul(SECTOR);
    match hdr.kind {
        VIRTIO_BLK_T_IN => {
            if data_len > MAX_DATA || !in_range(data_len as u64) {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            let mut buf = vec![0u8; data_len];
            match disk.file.read_exact_at(&mut buf, offset) {
                Ok(()) if w.write_all(&buf).is_ok() => (VIRTIO_BLK_S_OK, data_len as u32),
                Ok(()) => (VIRTIO_BLK_S_IOERR, 0),
                Err(e) => io_error(disk, "read", e),
            }
        }
        VIRTIO_BLK_T_OUT => {
            let len = r.available_bytes();
            if len > MAX_DATA || !in_range(len as u64) {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            let mut buf = vec![0u8; len];
            if r.read_exact(&mut buf).is_err() {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            match disk.file.write_all_at(&buf, offset) {
                Ok(()) => {
                    (disk.written)(offset, len as u64);
                    (VIRTIO_BLK_S_OK, 0)
                }
                Err(e) => io_error(disk, "write", e),
            }
        }
        // Durable: the data and what is needed to read it back.
        VIRTIO_BLK_T_FLUSH => match disk.file.sync_data() {
            Ok(()) => (VIRTIO_BLK_S_OK, 0),
            Err(e) => io_error(disk, "flush", e),
        },
        VIRTIO_BLK_T_GET_ID => {
            let mut id = [0u8; ID_LEN];
            let n = disk.id.len().min(ID_LEN);
            id[..n].copy_from_slice(&disk.id.as_bytes()[..n]);
            let n = data_len.min(ID_LEN);
            match w.write_all(&id[..n]) {
                Ok(()) => (VIRTIO_BLK_S_OK, n as u32),
                Err(_) => (VIRTIO_BLK_S_IOERR, 0),
            }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            (segments(disk, hdr.kind == VIRTIO_BLK_T_DISCARD, r), 0)
        }
        _ => (VIRTIO_BLK_S_UNSUPP, 0),
    }
}

/// DISCARD and WRITE_ZEROES: each segment checked before any is applied.
fn segments(disk: &Disk, discard: bool, r: &mut Reader) -> u32 {
    let n = r.available_bytes() / std::mem::size_of::<Segment>();
    if n == 0 || n > MAX_DISCARD_SEG as usize {
        return VIRTIO_BLK_S_UNSUPP;
    }
    let mut segs = Vec::with_capacity(n);
    for _ in 0..n {
        let Ok(s) = r.read_obj::<Segment>() else {
            return VIRTIO_BLK_S_IOERR;
        };
        let unmap = s.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        // DISCARD takes no flags; WRITE_ZEROES only UNMAP.
        if (discard && s.flags != 0) || s.flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
            return VIRTIO_BLK_S_UNSUPP;
        }
        let end = s.sector.checked_add(u64::from(s.num_sectors));
        if s.num_sectors > MAX_DISCARD_SECTORS
            || end.is_none_or(|e| e.checked_mul(SECTOR).is_none_or(|b| b > disk.size))
        {
            return VIRTIO_BLK_S_IOERR;
        }
        segs.push((s.sector * SECTOR, u64::from(s.num_sectors) * SECTOR, unmap));
    }
    for (offset, len, unmap) in segs {
        let done = if discard {
            image::discard(disk.file, offset, len)
        } else {
            image::write_zeroes(disk.file, offset, len, unmap)
        };
        // Even a failed one may have changed part of the range.
        (disk.written)(offset, len);
        if let Err(e) = done {
            // A discard is a hint: a filesystem that cannot is not an error.
            if discard && e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                continue;
            }
            return io_error(disk, "discard/write-zeroes", e).0;
        }
    }
    VIRTIO_BLK_S_OK
}

fn io_error(disk: &Disk, what: &str, e: std::io::Error) -> (u32, u32) {
    log::warn!("vhost-user {}: {what} failed: {e}", disk.id);
    (VIRTIO_BLK_S_IOERR, 0)
}
