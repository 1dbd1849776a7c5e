//! A host tap device opened through /dev/net/tun, with a virtio-net header
//! on every frame (IFF_VNET_HDR, 12 bytes: `struct virtio_net_hdr_v1`).
//!
//! vmm-sys-util 0.15 has no tap helpers, so the few ioctls are here.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};

use super::VNET_HDR_LEN;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_UFO: u32 = 0x10;

/// `struct ifreq` as TUNSETIFF uses it: the name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {0:?} must be 1 to 15 bytes without NUL")]
    InvalidName(String),
    #[error("no network interface named {0:?} on the host")]
    NoSuchDevice(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    #[error("cannot attach to tap {name:?} (is it a tap device this process may use?): {source}")]
    SetIff { name: String, source: io::Error },
    #[error("tap {name:?}: cannot set the vnet header size: {source}")]
    VnetHdr { name: String, source: io::Error },
}

/// An open, non-blocking tap queue.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the existing tap device `name`. Refuses names that are
    /// no interface in this network namespace, so a typo is an error rather
    /// than a new, unconnected tap.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(TapError::InvalidName(name.into()));
        }
        let cname = std::ffi::CString::new(name).map_err(|_| TapError::InvalidName(name.into()))?;
        // SAFETY: a valid NUL-terminated string; the call only reads it.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(TapError::NoSuchDevice(name.into()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req`
        // is (40 bytes, name then flags); the fd is ours.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if r < 0 {
            return Err(TapError::SetIff {
                name: name.into(),
                source: io::Error::last_os_error(),
            });
        }
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len) };
        if r < 0 {
            return Err(TapError::VnetHdr {
                name: name.into(),
                source: io::Error::last_os_error(),
            });
        }
        let tap = Tap {
            file,
            name: name.into(),
        };
        // No offloads until the driver negotiates them.
        tap.set_offload(0).map_err(|source| TapError::VnetHdr {
            name: name.into(),
            source,
        })?;
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Which offloads (`TUN_F_*`) the kernel may hand us in received
    /// frames, i.e. which the guest accepts.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one frame (vnet header first); WouldBlock when none is queued.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (vnet header first).
    pub fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
        (&self.file).write(buf)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_layout() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }

    #[test]
    fn bad_names() {
        assert!(matches!(Tap::open(""), Err(TapError::InvalidName(_))));
        assert!(matches!(
            Tap::open("0123456789abcdefg"),
            Err(TapError::InvalidName(_))
        ));
        assert!(matches!(
            Tap::open("embernosuchtap"),
            Err(TapError::NoSuchDevice(_))
        ));
    }
}
