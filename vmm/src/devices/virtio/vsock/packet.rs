//! `struct virtio_vsock_hdr` and moving packets through descriptor chains.

use std::io::{Read, Write};

use virtio_queue::{Reader, Writer};
use vm_memory::bitmap::BitmapSlice;

use super::MAX_PKT_DATA;

pub const HDR_LEN: usize = 44;

pub const VSOCK_TYPE_STREAM: u16 = 1;

pub const VSOCK_OP_INVALID: u16 = 0;
pub const VSOCK_OP_REQUEST: u16 = 1;
pub const VSOCK_OP_RESPONSE: u16 = 2;
pub const VSOCK_OP_RST: u16 = 3;
pub const VSOCK_OP_SHUTDOWN: u16 = 4;
pub const VSOCK_OP_RW: u16 = 5;
pub const VSOCK_OP_CREDIT_UPDATE: u16 = 6;
pub const VSOCK_OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive / send no more data.
pub const VSOCK_FLAGS_SHUTDOWN_RCV: u32 = 1;
pub const VSOCK_FLAGS_SHUTDOWN_SEND: u32 = 2;

/// `virtio_vsock_event.id` of a transport reset.
pub const VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;

/// A decoded packet header (all fields little-endian on the wire).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VsockHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("packet of {0} bytes is shorter than the {HDR_LEN}-byte header")]
    ShortHeader(usize),
    #[error("payload length {0} exceeds {MAX_PKT_DATA}")]
    PayloadTooLong(u32),
    #[error("payload length {len} but only {avail} bytes follow the header")]
    ShortPayload { len: u32, avail: usize },
    #[error("buffer of {avail} bytes cannot hold a {need}-byte packet")]
    NoSpace { need: usize, avail: usize },
    #[error("guest memory access failed")]
    Memory,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    (u64::from(le32(b, at + 4)) << 32) | u64::from(le32(b, at))
}

impl VsockHeader {
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> VsockHeader {
        VsockHeader {
            src_cid: le64(b, 0),
            dst_cid: le64(b, 8),
            src_port: le32(b, 16),
            dst_port: le32(b, 20),
            len: le32(b, 24),
            type_: le16(b, 28),
            op: le16(b, 30),
            flags: le32(b, 32),
            buf_alloc: le32(b, 36),
            fwd_cnt: le32(b, 40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Reads a guest TX packet: the header, and for RW packets the payload into
/// `payload` (resized to the payload length; empty for other ops).
pub fn read_tx<B: BitmapSlice>(
    reader: &mut Reader<'_, B>,
    payload: &mut Vec<u8>,
) -> Result<VsockHeader, PacketError> {
    payload.clear();
    let avail = reader.available_bytes();
    if avail < HDR_LEN {
        return Err(PacketError::ShortHeader(avail));
    }
    let mut b = [0u8; HDR_LEN];
    reader.read_exact(&mut b).map_err(|_| PacketError::Memory)?;
    let hdr = VsockHeader::from_bytes(&b);
    if hdr.op != VSOCK_OP_RW || hdr.len == 0 {
        return Ok(hdr);
    }
    if hdr.len as usize > MAX_PKT_DATA {
        return Err(PacketError::PayloadTooLong(hdr.len));
    }
    let avail = reader.available_bytes();
    if avail < hdr.len as usize {
        return Err(PacketError::ShortPayload {
            len: hdr.len,
            avail,
        });
    }
    payload.resize(hdr.len as usize, 0);
    reader
        .read_exact(payload)
        .map_err(|_| PacketError::Memory)?;
    Ok(hdr)
}

/// Writes a packet into a guest RX buffer; returns the bytes written.
/// `hdr.len` must equal `data.len()`.
pub fn write_rx<B: BitmapSlice>(
    writer: &mut Writer<'_, B>,
    hdr: &VsockHeader,
    data: &[u8],
) -> Result<usize, PacketError> {
    let need = HDR_LEN + data.len();
    let avail = writer.available_bytes();
    if avail < need {
        return Err(PacketError::NoSpace { need, avail });
    }
    writer
        .write_all(&hdr.to_bytes())
        .and_then(|()| writer.write_all(data))
        .map_err(|_| PacketError::Memory)?;
    Ok(need)
}
