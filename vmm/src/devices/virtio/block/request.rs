//! Parsing a virtio-blk request (virtio 1.1 section 5.2.6) into an
//! operation on the backend, and completing it into guest memory later.
//!
//! A request is a descriptor chain: a 16-byte header (device-readable), data
//! (readable for OUT, writable for IN/GET_ID) and a final device-writable
//! status byte. Framing across descriptors is not assumed: the readable part
//! is read as one byte stream, and the writable descriptors are remembered
//! as guest ranges, filled when the backend answers (possibly much later,
//! with other requests completed meanwhile).

use std::io::Read;

use virtio_queue::Reader;
use vm_memory::{Bytes, GuestAddress};

use super::device::MAX_DATA_BYTES;
use super::disk::Disk;
use super::nbd::Op;
use super::SECTOR_SIZE;
use crate::devices::virtio::queue::Chain;
use crate::devices::virtio::Mem;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

const HEADER_LEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Unsupported(u32),
}

/// `struct virtio_blk_req` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub request_type: RequestType,
    pub sector: u64,
}

impl RequestHeader {
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> RequestHeader {
        let mut t = [0u8; 4];
        t.copy_from_slice(&bytes[0..4]);
        let mut s = [0u8; 8];
        s.copy_from_slice(&bytes[8..16]);
        let request_type = match u32::from_le_bytes(t) {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        };
        RequestHeader {
            request_type,
            sector: u64::from_le_bytes(s),
        }
    }
}

/// What a request asks of the backend.
#[derive(Debug)]
pub(crate) enum Work {
    /// Answered without the backend: the status and any data (GET_ID).
    Done(u8, Vec<u8>),
    Io {
        op: Op,
        offset: u64,
    },
}

/// A parsed request waiting for its answer.
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) head: u16,
    /// Device-writable guest ranges before the status byte.
    regions: Vec<(GuestAddress, usize)>,
    status: Option<GuestAddress>,
    pub(crate) work: Work,
}

impl Request {
    /// Bytes the rate limiter charges (data moved).
    pub(crate) fn bytes(&self) -> u64 {
        match &self.work {
            Work::Io {
                op: Op::Read(n), ..
            } => *n as u64,
            Work::Io {
                op: Op::Write(d), ..
            } => d.len() as u64,
            _ => 0,
        }
    }

    pub(crate) fn is_write(&self) -> bool {
        matches!(&self.work, Work::Io { op, .. } if op.is_write())
    }
}

/// Parses the request in `chain`. Never panics on bad input: a malformed
/// request is answered with VIRTIO_BLK_S_IOERR when there is somewhere to
/// put the status, and is otherwise returned with length 0.
pub(crate) fn parse(disk: &Disk, chain: Chain<'_>, mem: &Mem) -> Request {
    let head = chain.head_index();
    let mut regions = Vec::new();
    for d in chain.clone() {
        if d.is_write_only() && d.len() > 0 {
            regions.push((d.addr(), d.len() as usize));
        }
    }
    // The status byte is the last writable byte.
    let status = regions.last_mut().and_then(|(addr, len)| {
        *len -= 1;
        addr.0.checked_add(*len as u64).map(GuestAddress)
    });
    if regions.last().is_some_and(|r| r.1 == 0) {
        regions.pop();
    }
    let mut req = Request {
        head,
        regions,
        status,
        work: Work::Done(VIRTIO_BLK_S_IOERR, Vec::new()),
    };
    if req.status.is_none() {
        crate::guest_warn!("virtio-blk: request without a status byte");
        return req;
    }
    // Summed without overflow: a chain of many large descriptors is refused
    // below, before anything is allocated for it.
    let data_len = req
        .regions
        .iter()
        .fold(0usize, |sum, r| sum.saturating_add(r.1));
    req.work = match Reader::new(mem, chain) {
        Ok(mut reader) => work(disk, &mut reader, data_len),
        Err(e) => {
            crate::guest_warn!("virtio-blk: unusable readable descriptors: {e}");
            Work::Done(VIRTIO_BLK_S_IOERR, Vec::new())
        }
    };
    req
}

fn ioerr() -> Work {
    Work::Done(VIRTIO_BLK_S_IOERR, Vec::new())
}

fn work<B: vm_memory::bitmap::BitmapSlice>(
    disk: &Disk,
    reader: &mut Reader<'_, B>,
    data_len: usize,
) -> Work {
    let mut hdr = [0u8; HEADER_LEN];
    if reader.read_exact(&mut hdr).is_err() {
        crate::guest_warn!("virtio-blk: request header shorter than {HEADER_LEN} bytes");
        return ioerr();
    }
    let hdr = RequestHeader::parse(&hdr);
    match hdr.request_type {
        RequestType::In => match check_transfer(disk, hdr.sector, data_len) {
            Some(offset) => Work::Io {
                op: Op::Read(data_len),
                offset,
            },
            None => ioerr(),
        },
        RequestType::Out => {
            if disk.read_only {
                log::debug!("virtio-blk: write to a read-only drive refused");
                return ioerr();
            }
            let len = reader.available_bytes();
            let Some(offset) = check_transfer(disk, hdr.sector, len) else {
                return ioerr();
            };
            let mut data = vec![0; len];
            if reader.read_exact(&mut data).is_err() {
                return ioerr();
            }
            Work::Io {
                op: Op::Write(data),
                offset,
            }
        }
        RequestType::Flush => Work::Io {
            op: Op::Flush,
            offset: 0,
        },
        RequestType::GetId => {
            let n = disk.id.len().min(data_len);
            Work::Done(VIRTIO_BLK_S_OK, disk.id[..n].to_vec())
        }
        RequestType::Discard if disk.can_discard() => range(disk, reader, false),
        RequestType::WriteZeroes if disk.can_write_zeroes() => range(disk, reader, true),
        RequestType::Discard | RequestType::WriteZeroes => {
            Work::Done(VIRTIO_BLK_S_UNSUPP, Vec::new())
        }
        RequestType::Unsupported(t) => {
            log::debug!("virtio-blk: unsupported request type {t}");
            Work::Done(VIRTIO_BLK_S_UNSUPP, Vec::new())
        }
    }
}

/// Checks the transfer is whole sectors within the disk and no larger than
/// the device buffers; returns its offset.
fn check_transfer(disk: &Disk, sector: u64, len: usize) -> Option<u64> {
    if len > MAX_DATA_BYTES {
        crate::guest_warn!(
            "virtio-blk: transfer of {len} bytes is over the device's {MAX_DATA_BYTES} (SEG_MAX x SIZE_MAX)"
        );
        return None;
    }
    let len = len as u64;
    if !len.is_multiple_of(SECTOR_SIZE) {
        crate::guest_warn!("virtio-blk: transfer of {len} bytes is not whole sectors");
        return None;
    }
    if !disk.in_range(sector, len) {
        crate::guest_warn!(
            "virtio-blk: transfer of {len} bytes at sector {sector} is out of range"
        );
        return None;
    }
    Some(sector * SECTOR_SIZE)
}

/// DISCARD or WRITE_ZEROES: one 16-byte segment (`struct
/// virtio_blk_discard_write_zeroes`: sector, num_sectors, flags), as
/// max_discard_seg and max_write_zeroes_seg say.
fn range<B: vm_memory::bitmap::BitmapSlice>(
    disk: &Disk,
    reader: &mut Reader<'_, B>,
    zero: bool,
) -> Work {
    if disk.read_only {
        return ioerr();
    }
    let n = reader.available_bytes();
    if n != 16 {
        crate::guest_warn!(
            "virtio-blk: {n}-byte discard/write-zeroes payload (one segment expected)"
        );
        return ioerr();
    }
    let mut seg = [0u8; 16];
    if reader.read_exact(&mut seg).is_err() {
        return ioerr();
    }
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&seg[..8]);
    let sector = u64::from_le_bytes(sector);
    let sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
    let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
    // Only the unmap flag (bit 0, write-zeroes only) is defined.
    if flags & !1 != 0 || (!zero && flags != 0) {
        return Work::Done(VIRTIO_BLK_S_UNSUPP, Vec::new());
    }
    let len = u64::from(sectors) * SECTOR_SIZE;
    if !disk.in_range(sector, len) {
        crate::guest_warn!("virtio-blk: range of {sectors} sectors at {sector} is out of range");
        return ioerr();
    }
    let offset = sector * SECTOR_SIZE;
    let op = if zero {
        Op::WriteZeroes(len)
    } else {
        Op::Trim(len)
    };
    Work::Io { op, offset }
}

/// Writes `data` (what the device returns) and `status` into the request's
/// buffers; returns the used length for the used ring.
pub(crate) fn complete(mem: &Mem, req: &Request, mut status: u8, data: &[u8]) -> u32 {
    let Some(status_at) = req.status else {
        return 0;
    };
    let mut written = 0usize;
    for &(addr, len) in &req.regions {
        let n = len.min(data.len() - written);
        if n == 0 {
            break;
        }
        if let Err(e) = mem.write_slice(&data[written..written + n], addr) {
            crate::guest_warn!("virtio-blk: cannot write data to guest memory: {e}");
            status = VIRTIO_BLK_S_IOERR;
            break;
        }
        written += n;
    }
    let used = match mem.write_obj(status, status_at) {
        Ok(()) => written + 1,
        Err(e) => {
            crate::guest_warn!("virtio-blk: cannot write status: {e}");
            written
        }
    };
    u32::try_from(used).unwrap_or(u32::MAX)
}
