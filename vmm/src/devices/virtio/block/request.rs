//! Parsing and executing one virtio-blk request (virtio 1.1 section 5.2.6).
//!
//! A request is a descriptor chain: a 16-byte header (device-readable), data
//! (readable for OUT, writable for IN/GET_ID) and a final device-writable
//! status byte. Framing across descriptors is not assumed: the readable and
//! writable parts are each treated as one byte stream.

use std::io::{Read, Write};

use virtio_queue::{Reader, Writer};
use vm_memory::bitmap::BitmapSlice;

use super::disk::Disk;
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

/// Executes the request in `chain`; returns the number of bytes written to
/// the chain (data + status), for the used ring. Never panics on bad input:
/// a malformed request gets VIRTIO_BLK_S_IOERR when there is somewhere to put
/// the status, and is otherwise returned with length 0.
pub(crate) fn execute(disk: &mut Disk, chain: Chain<'_>, mem: &Mem, bounce: &mut [u8]) -> u32 {
    let reader = Reader::new(mem, chain.clone());
    let mut writer = match Writer::new(mem, chain) {
        Ok(w) => w,
        Err(e) => {
            log::warn!("virtio-blk: unusable writable descriptors: {e}");
            return 0;
        }
    };
    let Some(status_at) = writer.available_bytes().checked_sub(1) else {
        log::warn!("virtio-blk: request without a status byte");
        return 0;
    };
    let mut status_writer = match writer.split_at(status_at) {
        Ok(w) => w,
        Err(e) => {
            log::warn!("virtio-blk: cannot locate the status byte: {e}");
            return 0;
        }
    };
    let status = match reader {
        Ok(mut reader) => handle(disk, &mut reader, &mut writer, bounce),
        Err(e) => {
            log::warn!("virtio-blk: unusable readable descriptors: {e}");
            VIRTIO_BLK_S_IOERR
        }
    };
    let data_len = writer.bytes_written();
    match status_writer.write_all(&[status]) {
        Ok(()) => u32::try_from(data_len + 1).unwrap_or(u32::MAX),
        Err(e) => {
            log::warn!("virtio-blk: cannot write status: {e}");
            u32::try_from(data_len).unwrap_or(u32::MAX)
        }
    }
}

fn handle<B: BitmapSlice>(
    disk: &mut Disk,
    reader: &mut Reader<'_, B>,
    data: &mut Writer<'_, B>,
    bounce: &mut [u8],
) -> u8 {
    let mut hdr = [0u8; HEADER_LEN];
    if reader.read_exact(&mut hdr).is_err() {
        log::warn!("virtio-blk: request header shorter than {HEADER_LEN} bytes");
        return VIRTIO_BLK_S_IOERR;
    }
    let hdr = RequestHeader::parse(&hdr);
    match hdr.request_type {
        RequestType::In => read(disk, hdr.sector, data, bounce),
        RequestType::Out => write(disk, hdr.sector, reader, bounce),
        RequestType::Flush => match disk.flush() {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(e) => {
                log::warn!("virtio-blk: flush failed: {e}");
                VIRTIO_BLK_S_IOERR
            }
        },
        RequestType::GetId => {
            let n = disk.id.len().min(data.available_bytes());
            match data.write_all(&disk.id[..n]) {
                Ok(()) => VIRTIO_BLK_S_OK,
                Err(_) => VIRTIO_BLK_S_IOERR,
            }
        }
        RequestType::Discard if disk.can_discard() => ranges(disk, reader, false),
        RequestType::WriteZeroes if disk.can_write_zeroes() => ranges(disk, reader, true),
        RequestType::Discard | RequestType::WriteZeroes => VIRTIO_BLK_S_UNSUPP,
        RequestType::Unsupported(t) => {
            log::debug!("virtio-blk: unsupported request type {t}");
            VIRTIO_BLK_S_UNSUPP
        }
    }
}

/// Checks the transfer is whole sectors within the disk; returns its offset.
fn check_transfer(disk: &Disk, sector: u64, len: usize) -> Option<u64> {
    let len = len as u64;
    if !len.is_multiple_of(SECTOR_SIZE) {
        log::warn!("virtio-blk: transfer of {len} bytes is not whole sectors");
        return None;
    }
    if !disk.in_range(sector, len) {
        log::warn!("virtio-blk: transfer of {len} bytes at sector {sector} is out of range");
        return None;
    }
    Some(sector * SECTOR_SIZE)
}

fn read<B: BitmapSlice>(
    disk: &mut Disk,
    sector: u64,
    data: &mut Writer<'_, B>,
    bounce: &mut [u8],
) -> u8 {
    let Some(mut offset) = check_transfer(disk, sector, data.available_bytes()) else {
        return VIRTIO_BLK_S_IOERR;
    };
    while data.available_bytes() > 0 {
        let n = data.available_bytes().min(bounce.len());
        let buf = &mut bounce[..n];
        if let Err(e) = disk.read_at(buf, offset) {
            log::warn!("virtio-blk: read at {offset} failed: {e}");
            return VIRTIO_BLK_S_IOERR;
        }
        if data.write_all(buf).is_err() {
            return VIRTIO_BLK_S_IOERR;
        }
        offset += n as u64;
    }
    VIRTIO_BLK_S_OK
}

fn write<B: BitmapSlice>(
    disk: &mut Disk,
    sector: u64,
    data: &mut Reader<'_, B>,
    bounce: &mut [u8],
) -> u8 {
    if disk.read_only {
        log::debug!("virtio-blk: write to a read-only drive refused");
        return VIRTIO_BLK_S_IOERR;
    }
    let Some(mut offset) = check_transfer(disk, sector, data.available_bytes()) else {
        return VIRTIO_BLK_S_IOERR;
    };
    while data.available_bytes() > 0 {
        let n = data.available_bytes().min(bounce.len());
        let buf = &mut bounce[..n];
        if data.read_exact(buf).is_err() {
            return VIRTIO_BLK_S_IOERR;
        }
        if let Err(e) = disk.write_at(buf, offset) {
            log::warn!("virtio-blk: write at {offset} failed: {e}");
            return VIRTIO_BLK_S_IOERR;
        }
        offset += n as u64;
    }
    VIRTIO_BLK_S_OK
}

/// DISCARD or WRITE_ZEROES: the data is a list of 16-byte segments
/// (`struct virtio_blk_discard_write_zeroes`: sector, num_sectors, flags).
fn ranges<B: BitmapSlice>(disk: &mut Disk, reader: &mut Reader<'_, B>, zero: bool) -> u8 {
    if disk.read_only {
        return VIRTIO_BLK_S_IOERR;
    }
    let n = reader.available_bytes();
    if n == 0 || !n.is_multiple_of(16) {
        log::warn!("virtio-blk: {n}-byte discard/write-zeroes payload");
        return VIRTIO_BLK_S_IOERR;
    }
    while reader.available_bytes() > 0 {
        let mut seg = [0u8; 16];
        if reader.read_exact(&mut seg).is_err() {
            return VIRTIO_BLK_S_IOERR;
        }
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&seg[..8]);
        let sector = u64::from_le_bytes(sector);
        let sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
        let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
        // Only the unmap flag (bit 0, write-zeroes only) is defined.
        if flags & !1 != 0 || (!zero && flags != 0) {
            return VIRTIO_BLK_S_UNSUPP;
        }
        let len = u64::from(sectors) * SECTOR_SIZE;
        if !disk.in_range(sector, len) {
            log::warn!("virtio-blk: range of {sectors} sectors at {sector} is out of range");
            return VIRTIO_BLK_S_IOERR;
        }
        let offset = sector * SECTOR_SIZE;
        let res = if zero {
            disk.write_zeroes(offset, len)
        } else {
            disk.discard(offset, len)
        };
        if let Err(e) = res {
            log::warn!("virtio-blk: discard/write-zeroes at {offset} failed: {e}");
            return VIRTIO_BLK_S_IOERR;
        }
    }
    VIRTIO_BLK_S_OK
}
