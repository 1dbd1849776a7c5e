//! A function's `/tmp` on a local disk (Lambda's `EphemeralStorage`): an
//! ext4 image made for the snapshot build and mounted before the runtime
//! starts, copied (sparse) for every instance restored from it, and, when
//! an instance migrates, served read-only to the destination (mutual TLS
//! and a ticket in front of the export, `migrate::stream`), whose VMM
//! fills its own copy on demand and in the background while the guest
//! runs there (`fill_from`); the source's copy goes once the fill is done.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::beneath::Dir;

/// The VMM's drive id.
pub const DRIVE_ID: &str = "tmp";
/// Its guest device: the third drive, after the root filesystem and the
/// code (a volume, if any, comes after it).
pub const GUEST_DEVICE: &str = "/dev/vdc";
/// The disk's file in an instance's disk directory (bound at `/out`).
pub const FILE: &str = "tmp.img";

/// An instance's `/tmp` disk directory as it should be: 0700.
pub const DIR_MODE: u32 = 0o700;

/// Formats `file` (new and empty) as a sparse `mib` MiB holding an
/// empty ext4 filesystem. mkfs.ext4 gets the open file as its standard
/// input and formats `/dev/stdin`: it never looks the file up by name.
pub fn format_image(file: &File, mib: u32) -> std::io::Result<()> {
    file.set_len(u64::from(mib) << 20)?;
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-L", "tmp"])
        .args(["-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"])
        .arg("/dev/stdin")
        .stdin(file.try_clone()?)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "mkfs.ext4: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Makes `dir/FILE`, an empty ext4 image of `mib` MiB; nothing may be
/// there before (a link included).
pub fn make_image(dir: &Dir, mib: u32) -> std::io::Result<File> {
    let f = dir.create_new(FILE, 0o600)?;
    format_image(&f, mib)?;
    Ok(f)
}

/// A copy of `golden_dir/FILE` at `dest/FILE` (new) that keeps its holes:
/// only the golden image's data ranges are copied (`SEEK_DATA` and
/// `SEEK_HOLE`, with `copy_file_range`, which shares the blocks on
/// filesystems that can).
pub fn copy_image(golden_dir: &Path, dest: &Dir) -> std::io::Result<File> {
    let src = Dir::open(golden_dir)?.open_file(FILE, false)?;
    let dst = dest.create_new(FILE, 0o600)?;
    sparse_copy(&src, &dst).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "copying {} to {}: {e}",
                golden_dir.join(FILE).display(),
                dest.path().display()
            ),
        )
    })?;
    Ok(dst)
}

/// Copies `src`'s data ranges into `dst` (empty) and gives it `src`'s
/// length. `copy_file_range` where the kernel can (same filesystem type),
/// else reads and writes.
pub fn sparse_copy(src: &File, dst: &File) -> std::io::Result<()> {
    use nix::unistd::{lseek, Whence};
    let len = i64::try_from(src.metadata()?.len()).map_err(std::io::Error::other)?;
    dst.set_len(len as u64)?;
    let mut in_kernel = true;
    let mut pos = 0i64;
    while pos < len {
        let data = match lseek(src, pos, Whence::SeekData) {
            Ok(p) => p,
            // No data after pos: the rest is a hole.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(src, data, Whence::SeekHole)
            .map_err(std::io::Error::from)?
            .min(len);
        let mut off = data;
        while off < hole {
            let want = usize::try_from(hole - off)
                .unwrap_or(usize::MAX)
                .min(1 << 30);
            let n = if in_kernel {
                let (mut off_in, mut off_out) = (off, off);
                match nix::fcntl::copy_file_range(
                    src,
                    Some(&mut off_in),
                    dst,
                    Some(&mut off_out),
                    want,
                ) {
                    Ok(n) => n,
                    // Across filesystem types (EXDEV since Linux 5.19), or
                    // not offered here: copy through a buffer instead.
                    Err(
                        nix::errno::Errno::EXDEV
                        | nix::errno::Errno::ENOSYS
                        | nix::errno::Errno::EOPNOTSUPP
                        | nix::errno::Errno::EINVAL,
                    ) => {
                        in_kernel = false;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            } else {
                copy_range(src, dst, off as u64, want.min(1 << 20))?
            };
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the source ended during the copy",
                ));
            }
            off += n as i64;
        }
        pos = hole;
    }
    Ok(())
}

/// Copies up to `len` bytes at `off` from `src` to `dst` through a
/// buffer; answers how many.
fn copy_range(src: &File, dst: &File, off: u64, len: usize) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    let n = src.read_at(&mut buf, off)?;
    dst.write_all_at(&buf[..n], off)?;
    Ok(n)
}

/// A fresh disk directory `id` (0700) in `base`, which is made if need
/// be (0700: nothing under it is anyone else's business).
pub fn new_dir(base: &Path, id: &str) -> std::io::Result<Dir> {
    ensure_base(base)?.mkdir(id, DIR_MODE)
}

/// `base` made if need be, 0700 and (as root) root's.
fn ensure_base(base: &Path) -> std::io::Result<Dir> {
    std::fs::create_dir_all(base)?;
    let d = Dir::open(base)?;
    if nix::unistd::geteuid().is_root() {
        d.chown(0, 0)?;
    }
    d.chmod(0o700)?;
    Ok(d)
}

/// Hands an instance's disk directory to its jailed VMM's uid: the
/// directory (still 0700) and its image, if there is one, become the
/// uid's, so the VMM can open its drive and no other uid can.
pub fn give_dir(dir: &Dir, uid: u32, gid: u32) -> std::io::Result<()> {
    match dir.open_file(FILE, true) {
        Ok(f) => crate::beneath::fchown(&f, uid, gid)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    dir.chown(uid, gid)?;
    dir.chmod(DIR_MODE)
}

/// Removes the disk directories a previous run left in `base` (it
/// crashed, or was killed) except those named in `keep`; answers how many
/// went. Links planted there are removed, never followed.
pub fn clean_base(base: &Path, keep: &[&str]) -> std::io::Result<usize> {
    let d = ensure_base(base)?;
    let mut removed = 0;
    for name in d.names()? {
        if keep.contains(&name.as_str()) {
            continue;
        }
        let p = base.join(&name);
        // symlink_metadata: a link is removed as a link.
        let r = match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&p),
            Ok(_) => std::fs::remove_file(&p),
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => removed += 1,
            Err(e) => log::warn!("removing the stale disk {}: {e}", p.display()),
        }
    }
    Ok(removed)
}

/// ramfs's `f_type` (linux/magic.h).
const RAMFS_MAGIC: u64 = 0x8584_58f6;

/// Whether `path` is on a filesystem held in memory (tmpfs, ramfs), where
/// `/tmp` disks would be charged to the VMMs' memory and never reclaimed.
pub fn in_memory_fs(path: &Path) -> std::io::Result<Option<&'static str>> {
    let st = nix::sys::statfs::statfs(path)?;
    let t = st.filesystem_type();
    Ok(if t == nix::sys::statfs::TMPFS_MAGIC {
        Some("tmpfs")
    } else if t.0 as u64 == RAMFS_MAGIC {
        Some("ramfs")
    } else {
        None
    })
}

/// The guest commands that put `/tmp` on `device`, open to everyone.
pub fn mount_script(device: &str) -> String {
    format!("set -e\nmount -t ext4 -o noatime {device} /tmp\nchmod 1777 /tmp\n")
}

/// A source host's read-only export of an instance's disk: the
/// `ember-export` process on a unix socket in `socket_dir` (hostd's run
/// directory, not the disk directory, which the VMM's uid may write),
/// ended on drop (and the disk directory removed with it once
/// [`Export::own_dir`] said so). hostd opens the image itself, without
/// following links, and hands ember-export the open file as its standard
/// input: ember-export never looks up a path in the disk directory.
pub struct Export {
    child: tokio::process::Child,
    pub socket: PathBuf,
    dir: PathBuf,
    owns_dir: bool,
}

impl Export {
    /// The image `dir/FILE` opened for an export (read-only; no link
    /// followed, a regular file of its own).
    pub fn open_image(dir: &Path) -> std::io::Result<File> {
        Dir::open(dir)?.open_file(FILE, false)
    }

    /// Serves `dir/FILE` on a socket in `socket_dir`.
    pub async fn start(
        export_bin: &Path,
        dir: &Path,
        socket_dir: &Path,
    ) -> std::io::Result<Export> {
        let file = Export::open_image(dir)?;
        std::fs::create_dir_all(socket_dir)?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "disk".into());
        let socket = socket_dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&socket);
        let mut cmd = tokio::process::Command::new(export_bin);
        crate::oom::neutral(&mut cmd);
        let child = cmd
            .arg("--stdin")
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .stdin(file)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let mut e = Export {
            child,
            socket,
            dir: dir.to_path_buf(),
            owns_dir: false,
        };
        for _ in 0..200 {
            if e.socket.exists() {
                return Ok(e);
            }
            if let Ok(Some(st)) = e.child.try_wait() {
                return Err(std::io::Error::other(format!("ember-export exited: {st}")));
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        Err(std::io::Error::other("ember-export did not listen"))
    }
}

impl Export {
    /// The instance is gone: the directory goes with the export, and
    /// until then it is root's again (its VMM's uid may be another
    /// VMM's soon).
    pub fn own_dir(&mut self) {
        self.owns_dir = true;
        if nix::unistd::geteuid().is_root() {
            if let Err(e) = Dir::open(&self.dir).and_then(|d| d.chown(0, 0)) {
                log::warn!("{}: {e}", self.dir.display());
            }
        }
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.socket);
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    const SECRET: &str = "root:$6$secret:19000:0:99999:7:::\n";

    /// A stand-in for /etc/shadow: root's (when run as root), 0600.
    fn decoy(dir: &Path) -> PathBuf {
        let p = dir.join("shadow");
        std::fs::write(&p, SECRET).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    fn unchanged(p: &Path, uid: u32) -> bool {
        let m = std::fs::metadata(p).unwrap();
        std::fs::read_to_string(p).unwrap() == SECRET && m.uid() == uid && m.mode() & 0o777 == 0o600
    }

    /// A disk directory as a jailed VMM's uid may leave it: `tmp.img` a
    /// link to a secret, a hard link to it, a FIFO, or the directory
    /// itself a link to a directory elsewhere. Each thing hostd does
    /// there (make the image, copy the golden image in, copy a planted
    /// golden image out, give it to the VMM's uid, export it) is tried:
    /// none succeeds, the secret is untouched, and nothing hangs. A
    /// control shows the plant works on path-based calls (what hostd did
    /// before: `File::create`, `cp`, `chown`, ember-export `--file`).
    #[test]
    fn planted_links_in_disk_directories_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let secret = decoy(t.path());
        let golden = t.path().join("golden");
        std::fs::create_dir(&golden).unwrap();
        let golden_dir = Dir::open(&golden).unwrap();
        make_image(&golden_dir, 16).unwrap();
        let base = t.path().join("disks");

        // The control: through a planted link, path-based calls reach
        // the secret.
        let control = t.path().join("control");
        std::fs::create_dir(&control).unwrap();
        let other = t.path().join("other");
        std::fs::write(&other, "x").unwrap();
        std::os::unix::fs::symlink(&other, control.join(FILE)).unwrap();
        assert_eq!(
            std::fs::read_to_string(control.join(FILE)).unwrap(),
            "x",
            "a path-based open follows the link"
        );
        drop(std::fs::File::create(control.join(FILE)).unwrap());
        assert_eq!(std::fs::metadata(&other).unwrap().len(), 0, "and truncates");

        let mut plants: Vec<(&str, Dir)> = Vec::new();
        let link = new_dir(&base, "vm-link").unwrap();
        std::os::unix::fs::symlink(&secret, link.path().join(FILE)).unwrap();
        plants.push(("symlink", link));
        let rel = new_dir(&base, "vm-rel").unwrap();
        std::os::unix::fs::symlink("../../shadow", rel.path().join(FILE)).unwrap();
        plants.push(("relative symlink", rel));
        let hard = new_dir(&base, "vm-hard").unwrap();
        std::fs::hard_link(&secret, hard.path().join(FILE)).unwrap();
        plants.push(("hard link", hard));
        let fifo = new_dir(&base, "vm-fifo").unwrap();
        nix::unistd::mkfifo(
            &fifo.path().join(FILE),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        plants.push(("fifo", fifo));

        let mut succeeded = Vec::new();
        for (what, d) in &plants {
            if make_image(d, 16).is_ok() {
                succeeded.push(format!("{what}: make_image"));
            }
            if copy_image(&golden, d).is_ok() {
                succeeded.push(format!("{what}: copy_image into"));
            }
            if copy_image(d.path(), &golden_dir).is_ok() {
                succeeded.push(format!("{what}: copy_image from"));
            }
            if give_dir(d, 4242, 4242).is_ok() {
                succeeded.push(format!("{what}: give_dir"));
            }
            if Export::open_image(d.path()).is_ok() {
                succeeded.push(format!("{what}: export"));
            }
        }
        // The disk directory itself a link to a directory elsewhere (one
        // holding a root-owned image).
        let elsewhere = t.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::write(elsewhere.join(FILE), "not yours").unwrap();
        std::os::unix::fs::symlink(&elsewhere, base.join("vm-dirlink")).unwrap();
        let dirlink = base.join("vm-dirlink");
        if Dir::open(&dirlink).is_ok() {
            succeeded.push("directory link: open".into());
        }
        if Export::open_image(&dirlink).is_ok() {
            succeeded.push("directory link: export".into());
        }
        // A snapshot directory with the golden image planted.
        let snap = t.path().join("snap");
        std::fs::create_dir(&snap).unwrap();
        std::os::unix::fs::symlink(&secret, snap.join(FILE)).unwrap();
        if copy_image(&snap, &new_dir(&base, "vm-from-snap").unwrap()).is_ok() {
            succeeded.push("planted golden image: copy".into());
        }
        assert!(succeeded.is_empty(), "{succeeded:?}");
        assert!(unchanged(&secret, me), "the secret changed");
        assert_eq!(
            std::fs::read_to_string(elsewhere.join(FILE)).unwrap(),
            "not yours"
        );
        // The golden image was not overwritten by any of it either.
        assert!(Dir::open(&golden)
            .unwrap()
            .open_file(FILE, false)
            .is_ok_and(|f| f.metadata().unwrap().len() == 16 << 20));
    }

    /// The real thing still works: a golden image copied (sparse, same
    /// bytes) into a fresh 0700 directory, given to a uid (as root).
    #[test]
    fn images_are_made_copied_sparse_and_given() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().join("disks");
        let golden = new_dir(&base, "golden").unwrap();
        let img = make_image(&golden, 64).unwrap();
        // Some data past the filesystem's own.
        std::os::unix::fs::FileExt::write_all_at(&img, b"hello", 40 << 20).unwrap();
        let d = new_dir(&base, "vm-1").unwrap();
        assert_eq!(d.owner_and_mode().unwrap().1, 0o700);
        let copy = copy_image(golden.path(), &d).unwrap();
        let (a, b) = (img.metadata().unwrap(), copy.metadata().unwrap());
        assert_eq!(a.len(), b.len());
        assert!(
            b.blocks() * 512 < 16 << 20,
            "the copy is sparse ({} blocks)",
            b.blocks()
        );
        let read = |p: &Path| std::fs::read(p).unwrap();
        assert!(
            read(&golden.path().join(FILE)) == read(&d.path().join(FILE)),
            "same bytes"
        );
        if nix::unistd::geteuid().is_root() {
            give_dir(&d, 4242, 4343).unwrap();
            let f = std::fs::metadata(d.path().join(FILE)).unwrap();
            assert_eq!((f.uid(), f.gid(), f.mode() & 0o777), (4242, 4343, 0o600));
            let m = std::fs::metadata(d.path()).unwrap();
            assert_eq!((m.uid(), m.mode() & 0o7777), (4242, 0o700));
            let base_m = std::fs::metadata(&base).unwrap();
            assert_eq!((base_m.uid(), base_m.mode() & 0o7777), (0, 0o700));
            // With the way down open (as a jail's bind mount makes it),
            // the VMM's uid reads and writes its image and another uid
            // gets nowhere.
            for p in [t.path(), base.as_path()] {
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o711)).unwrap();
            }
            let img = d.path().join(FILE);
            let try_as = |uid: u32| {
                use std::os::unix::process::CommandExt;
                std::process::Command::new("dd")
                    .arg(format!("of={}", img.display()))
                    .args([
                        "bs=512",
                        "count=1",
                        "conv=notrunc",
                        "if=/dev/zero",
                        "status=none",
                    ])
                    .uid(uid)
                    .gid(uid)
                    .stderr(std::process::Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false)
            };
            assert!(try_as(4242), "the owner writes its image");
            assert!(!try_as(4243), "another uid writes it");
            assert!(!try_as(4343), "the group writes it");
        }
        assert!(Export::open_image(d.path()).is_ok());
    }

    /// A golden image on one filesystem copied into a disk directory on
    /// another (copy_file_range refuses that across types since Linux
    /// 5.19): the copy still happens, same bytes, holes kept. (The state
    /// directory and --disk-dir may well be on different filesystems.)
    #[test]
    fn images_copy_across_filesystems() {
        let shm = Path::new("/dev/shm");
        if in_memory_fs(shm).ok().flatten().is_none() {
            eprintln!("SKIPPED: no tmpfs at /dev/shm");
            return;
        }
        let golden = tempfile::tempdir_in(shm).unwrap();
        let g = Dir::open(golden.path()).unwrap();
        let img = make_image(&g, 32).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&img, b"across", 20 << 20).unwrap();
        let t = tempfile::tempdir().unwrap();
        let d = new_dir(&t.path().join("disks"), "vm-x").unwrap();
        let copy = copy_image(golden.path(), &d).unwrap();
        assert_eq!(copy.metadata().unwrap().len(), 32 << 20);
        assert!(copy.metadata().unwrap().blocks() * 512 < 16 << 20);
        assert!(
            std::fs::read(golden.path().join(FILE)).unwrap()
                == std::fs::read(d.path().join(FILE)).unwrap()
        );
    }

    /// What a crashed run left in the disk directory goes at the next
    /// start (directories of any owner, links as links, with what they
    /// point to untouched), except what is named to keep; the base is
    /// made 0700 again.
    #[test]
    fn a_crashed_runs_disks_are_removed() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().join("disks");
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keepme"), "x").unwrap();
        for id in ["vm-a", "vm-b", "vm-keep"] {
            let d = new_dir(&base, id).unwrap();
            make_image(&d, 8).unwrap();
            if nix::unistd::geteuid().is_root() {
                give_dir(&d, 4242, 4242).unwrap();
            }
        }
        std::os::unix::fs::symlink(&outside, base.join("vm-b").join("sub")).unwrap();
        std::os::unix::fs::symlink(&outside, base.join("vm-c")).unwrap();
        std::fs::write(base.join("stray"), "x").unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777)).unwrap();
        let n = clean_base(&base, &["vm-keep"]).unwrap();
        assert_eq!(n, 4);
        let left: Vec<String> = std::fs::read_dir(&base)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, vec!["vm-keep".to_string()]);
        assert!(outside.join("keepme").exists());
        assert_eq!(
            std::fs::metadata(&base).unwrap().mode() & 0o7777,
            0o700,
            "the base is 0700 again"
        );
        // A base that does not exist yet is made.
        assert_eq!(clean_base(&t.path().join("new"), &[]).unwrap(), 0);
    }

    #[test]
    fn memory_filesystems_are_told_apart() {
        assert_eq!(in_memory_fs(Path::new("/proc")).unwrap(), None);
        if let Ok(Some(fs)) = in_memory_fs(Path::new("/dev/shm")) {
            assert_eq!(fs, "tmpfs");
        }
    }
}
