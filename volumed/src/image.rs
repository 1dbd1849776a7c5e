//! A volume's image file, as both servers (NBD and vhost-user) open and
//! change it: one place for the fallocate rules.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use crate::registry::Registry;

/// Opens the image of volume `name` for reading and writing.
pub fn open(reg: &Registry, name: &str) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(reg.image_path(name))
}

/// Deallocates a range (reads of it return zeroes); the size stays.
pub fn discard(f: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// Zeroes a range: deallocated if `may_unmap`, else kept allocated. On a
/// filesystem without either mode the zeroes are written.
pub fn write_zeroes(f: &File, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
    let done = if may_unmap {
        discard(f, offset, len)
    } else {
        fallocate(f, libc::FALLOC_FL_ZERO_RANGE, offset, len)
    };
    done.or_else(|_| f.write_all_at(&vec![0u8; len as usize], offset))
}

fn fallocate(f: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate on an fd we own, with plain integer arguments.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), mode, off, n) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
