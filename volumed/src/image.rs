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
/// filesystem without either mode (tmpfs has no `ZERO_RANGE`) the zeroes
/// are written, [`ZERO_CHUNK`] bytes at a time: the length is a client's
/// (an NBD request's is up to 4 GiB), never the size of a buffer.
pub fn write_zeroes(f: &File, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
    let done = if may_unmap {
        discard(f, offset, len)
    } else {
        fallocate(f, libc::FALLOC_FL_ZERO_RANGE, offset, len)
    };
    done.or_else(|_| write_zeroes_by_writing(f, offset, len))
}

/// The largest buffer of zeroes [`write_zeroes`] writes from.
pub const ZERO_CHUNK: u64 = 1 << 20;

fn write_zeroes_by_writing(f: &File, offset: u64, len: u64) -> io::Result<()> {
    if offset.checked_add(len).is_none() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let zeroes = vec![0u8; len.min(ZERO_CHUNK) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZERO_CHUNK);
        f.write_all_at(&zeroes[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// On tmpfs (no `FALLOC_FL_ZERO_RANGE`) zeroes are written; the
    /// length must not size one buffer. Checked in a child process whose
    /// address space has room for far less than the range: a buffer of the
    /// range's size cannot be made there (the allocation aborts it).
    #[test]
    fn zeroes_written_by_hand_take_a_bounded_buffer() {
        const LEN: u64 = 192 << 20;
        let shm = std::path::Path::new("/dev/shm");
        if std::env::var_os("EMBER_ZEROES_CHILD").is_some() {
            let dir = tempfile::tempdir_in(shm).unwrap();
            let path = dir.path().join("img");
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .unwrap();
            f.set_len(LEN + 8192).unwrap();
            f.write_all_at(&[0xAA; 8192], LEN - 4096).unwrap();
            // What the fallback is for: this filesystem cannot zero a range.
            assert!(fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 0, 4096).is_err());
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let vm_kib: u64 = status
                .lines()
                .find_map(|l| l.strip_prefix("VmSize:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap();
            // Room for 64 MiB more: a third of the range.
            let limit = vm_kib * 1024 + (64 << 20);
            let rl = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            // SAFETY: setrlimit with a valid struct, in this child only.
            assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &rl) }, 0);
            write_zeroes(&f, 4096, LEN - 4096, false).unwrap();
            let mut tail = [1u8; 8192];
            f.read_exact_at(&mut tail, LEN - 4096).unwrap();
            assert!(tail[..4096].iter().all(|&b| b == 0), "not zeroed");
            assert!(tail[4096..].iter().all(|&b| b == 0xAA), "zeroed too far");
            std::process::exit(0);
        }
        if !shm.is_dir() {
            panic!("no /dev/shm (tmpfs): the fallback of write_zeroes cannot be reached");
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "image::tests::zeroes_written_by_hand_take_a_bounded_buffer",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("EMBER_ZEROES_CHILD", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{:?}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
