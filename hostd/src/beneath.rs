//! Files in a directory that another uid may write (a jailed VMM's disk
//! directory, a snapshot being built), reached only through the
//! directory's descriptor and never through a link.
//!
//! Names are one path component. They are opened with `openat2` and
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` where the kernel has it (5.6
//! and later, found out at run time), and otherwise with `openat` and
//! `O_NOFOLLOW`. Existing files are opened `O_NONBLOCK` (a FIFO planted
//! there cannot hang hostd) and must be regular files with one link (a
//! hard link to a file elsewhere is refused too). Ownership and modes
//! change with `fchown`/`fchmod` on the opened descriptor, so whatever
//! is planted in such a directory (`tmp.img -> /etc/shadow`, a linked
//! directory), hostd writes, chowns, copies and exports only what is
//! really there.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

/// A directory opened without following a link at its last component.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

/// Whether this kernel has `openat2` (probed once).
pub fn has_openat2() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        let how = nix::fcntl::OpenHow::new().flags(OFlag::O_PATH | OFlag::O_CLOEXEC);
        !matches!(
            nix::fcntl::openat2(nix::fcntl::AT_FDCWD, ".", how),
            Err(Errno::ENOSYS)
        )
    })
}

fn err(e: Errno) -> io::Error {
    io::Error::from(e)
}

/// `name` is one normal path component.
fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a plain file name"),
        ));
    }
    Ok(())
}

/// Opens `name` in `dir` with `flags` (plus `O_CLOEXEC`), following no
/// link: `openat2` when `use_openat2`, else `openat` with `O_NOFOLLOW`.
fn open_in(
    dir: BorrowedFd<'_>,
    name: &str,
    flags: OFlag,
    mode: u32,
    use_openat2: bool,
) -> io::Result<OwnedFd> {
    check_name(name)?;
    let flags = flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
    let mode = Mode::from_bits_truncate(mode);
    if use_openat2 {
        use nix::fcntl::ResolveFlag;
        let how = nix::fcntl::OpenHow::new()
            .flags(flags)
            .mode(mode)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
        nix::fcntl::openat2(dir, name, how).map_err(err)
    } else {
        nix::fcntl::openat(dir, name, flags, mode).map_err(err)
    }
}

impl Dir {
    /// Opens the directory `path` (a link there is refused; the path
    /// leading to it is the operator's, not a jail's).
    pub fn open(path: &Path) -> io::Result<Dir> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io::Error::new(err(e).kind(), format!("{}: {e}", path.display())))?;
        Ok(Dir {
            fd,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes the directory `name` in this one with `mode` (not there
    /// before) and opens it.
    pub fn mkdir(&self, name: &str, mode: u32) -> io::Result<Dir> {
        check_name(name)?;
        nix::sys::stat::mkdirat(&self.fd, name, Mode::from_bits_truncate(mode)).map_err(err)?;
        let d = self.subdir(name)?;
        // Whatever the umask took away.
        d.chmod(mode)?;
        Ok(d)
    }

    /// Opens the existing directory `name` in this one.
    pub fn subdir(&self, name: &str) -> io::Result<Dir> {
        let fd = open_in(
            self.fd.as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            0,
            has_openat2(),
        )?;
        Ok(Dir {
            fd,
            path: self.path.join(name),
        })
    }

    /// Creates the file `name` (read-write, `mode`); fails if anything
    /// is there already, a link included.
    pub fn create_new(&self, name: &str, mode: u32) -> io::Result<File> {
        self.create_new_with(name, mode, has_openat2())
    }

    fn create_new_with(&self, name: &str, mode: u32, use_openat2: bool) -> io::Result<File> {
        let fd = open_in(
            self.fd.as_fd(),
            name,
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL,
            mode,
            use_openat2,
        )?;
        Ok(File::from(fd))
    }

    /// Opens the existing regular file `name` (read-only, or read-write
    /// with `write`); refuses links, anything but a regular file, and a
    /// file with other names (hard links).
    pub fn open_file(&self, name: &str, write: bool) -> io::Result<File> {
        self.open_file_with(name, write, has_openat2())
    }

    fn open_file_with(&self, name: &str, write: bool, use_openat2: bool) -> io::Result<File> {
        let access = if write {
            OFlag::O_RDWR
        } else {
            OFlag::O_RDONLY
        };
        let fd = open_in(
            self.fd.as_fd(),
            name,
            access | OFlag::O_NONBLOCK | OFlag::O_NOCTTY,
            0,
            use_openat2,
        )?;
        let st = nix::sys::stat::fstat(&fd).map_err(err)?;
        let kind = st.st_mode & libc::S_IFMT;
        if kind != libc::S_IFREG {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: not a regular file (mode {:o})",
                    self.path.join(name).display(),
                    st.st_mode
                ),
            ));
        }
        if st.st_nlink != 1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: has {} links (a file of its own has one)",
                    self.path.join(name).display(),
                    st.st_nlink
                ),
            ));
        }
        // Back to blocking I/O (a no-op for regular files, but plain).
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(OFlag::empty())).map_err(err)?;
        Ok(File::from(fd))
    }

    /// Changes the owner of the entry `name` itself (a socket, say, which
    /// cannot be opened): `fchownat` with `AT_SYMLINK_NOFOLLOW`, so a link
    /// planted there changes owner, never what it points to.
    pub fn chown_entry(&self, name: &str, uid: u32, gid: u32) -> io::Result<()> {
        check_name(name)?;
        nix::unistd::fchownat(
            &self.fd,
            name,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(err)
    }

    /// `fchown` of the directory itself.
    pub fn chown(&self, uid: u32, gid: u32) -> io::Result<()> {
        fchown(&self.fd, uid, gid)
    }

    /// `fchmod` of the directory itself.
    pub fn chmod(&self, mode: u32) -> io::Result<()> {
        nix::sys::stat::fchmod(&self.fd, Mode::from_bits_truncate(mode)).map_err(err)
    }

    /// Owner uid and mode of the directory itself.
    pub fn owner_and_mode(&self) -> io::Result<(u32, u32)> {
        let st = nix::sys::stat::fstat(&self.fd).map_err(err)?;
        Ok((st.st_uid, st.st_mode & 0o7777))
    }

    /// The names in the directory (read through its descriptor).
    pub fn names(&self) -> io::Result<Vec<String>> {
        // A fresh descriptor of its own ("." is the directory itself), so
        // that every listing starts at the beginning.
        let mut d = nix::dir::Dir::openat(
            &self.fd,
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(err)?;
        let mut out = Vec::new();
        for e in d.iter() {
            let e = e.map_err(err)?;
            let n = e.file_name().to_string_lossy().into_owned();
            if n != "." && n != ".." {
                out.push(n);
            }
        }
        Ok(out)
    }
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// `fchown` of an open file or directory.
pub fn fchown(fd: impl AsFd, uid: u32, gid: u32) -> io::Result<()> {
    nix::unistd::fchown(
        fd.as_fd(),
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )
    .map_err(err)
}

/// `fchmod` of an open file.
pub fn fchmod(fd: impl AsFd, mode: u32) -> io::Result<()> {
    nix::sys::stat::fchmod(fd.as_fd(), Mode::from_bits_truncate(mode)).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;

    /// Each way into a directory someone else may write, tried through
    /// planted links (to a file outside, to a directory outside), a hard
    /// link and a FIFO, with openat2 and with the O_NOFOLLOW fallback:
    /// none reaches the file outside, and none hangs.
    #[test]
    fn planted_links_are_refused_both_ways() {
        let t = tempfile::tempdir().unwrap();
        let secret = t.path().join("shadow");
        std::fs::write(&secret, "root:secret\n").unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let dir = t.path().join("disk");
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::symlink(&secret, dir.join("link")).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("linkdir")).unwrap();
        std::fs::hard_link(&secret, dir.join("hard")).unwrap();
        nix::unistd::mkfifo(&dir.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        let d = Dir::open(&dir).unwrap();
        let mut modes = vec![false];
        if has_openat2() {
            modes.push(true);
        }
        let mut reached = 0;
        for use2 in modes {
            for name in ["link", "hard", "fifo", "linkdir", "../shadow", "linkdir/x"] {
                for write in [false, true] {
                    if d.open_file_with(name, write, use2).is_ok() {
                        eprintln!("opened {name} (write {write}, openat2 {use2})");
                        reached += 1;
                    }
                }
                if let Ok(mut f) = d.create_new_with(name, 0o600, use2) {
                    eprintln!("created {name} (openat2 {use2})");
                    let _ = f.write_all(b"x");
                    reached += 1;
                }
            }
            assert!(d.subdir("linkdir").is_err());
        }
        assert_eq!(reached, 0);
        assert!(
            Dir::open(&dir.join("linkdir")).is_err(),
            "a linked directory"
        );
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "root:secret\n");
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
        // A real file of its own is fine.
        std::fs::write(dir.join("real"), "ok").unwrap();
        assert!(d.open_file("real", true).is_ok());
        let made = d.create_new("new", 0o640).unwrap();
        assert_eq!(made.metadata().unwrap().mode() & 0o777, 0o640);
        let mut names = d.names().unwrap();
        names.sort();
        assert_eq!(
            names,
            ["fifo", "hard", "link", "linkdir", "new", "real"].map(String::from)
        );
    }

    /// A socket given to a jailed VMM is chowned by name in a directory
    /// the VMM can write: a link planted there changes owner itself, what
    /// it points to does not.
    #[test]
    fn chown_entry_never_follows() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: needs root (chown)");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let secret = t.path().join("shadow");
        std::fs::write(&secret, "s").unwrap();
        let run = t.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::os::unix::fs::symlink(&secret, run.join("v.sock_53")).unwrap();
        let d = Dir::open(&run).unwrap();
        d.chown_entry("v.sock_53", 4242, 4242).unwrap();
        assert_eq!(std::fs::metadata(&secret).unwrap().uid(), 0);
        assert_eq!(
            std::fs::symlink_metadata(run.join("v.sock_53"))
                .unwrap()
                .uid(),
            4242
        );
        assert!(d.chown_entry("../shadow", 4242, 4242).is_err());
        assert_eq!(std::fs::metadata(&secret).unwrap().uid(), 0);
    }
}
