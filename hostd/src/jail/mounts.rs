//! Mount namespace work: `/proc/self/mountinfo`, bind mounts, procfs,
//! `pivot_root`.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::statvfs::{statvfs, FsFlags};

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// The root of the mount within its filesystem.
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub fs_type: String,
    /// The superblock options (for cgroup v1: the controllers).
    pub super_options: String,
}

/// Decodes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

/// Parses the text of `/proc/<pid>/mountinfo`, skipping malformed lines.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if l.len() < 6 || r.len() < 3 {
                return None;
            }
            Some(MountInfo {
                root: unescape(l[3]),
                mount_point: unescape(l[4]),
                fs_type: r[0].to_string(),
                super_options: r[2].to_string(),
            })
        })
        .collect()
}

/// This process's mounts.
pub fn mountinfo() -> io::Result<Vec<MountInfo>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// Mount points at or under `dir` in `mounts` (`dir` canonical).
pub fn mounts_under(mounts: &[MountInfo], dir: &Path) -> Vec<PathBuf> {
    mounts
        .iter()
        .filter(|m| m.mount_point.starts_with(dir))
        .map(|m| m.mount_point.clone())
        .collect()
}

/// `mount --make-rprivate /`: nothing mounted in this namespace from now
/// on propagates back to the host.
pub fn make_root_private() -> nix::Result<()> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
}

/// Bind-mounts `src` onto `dst` (not recursively: submounts of `src` stay
/// outside), then remounts it nosuid, nodev and, unless `writable`,
/// read-only (a bind ignores MS_RDONLY on its first mount).
pub fn bind(src: &Path, dst: &Path, writable: bool) -> nix::Result<()> {
    mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND, None::<&str>)?;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if !writable {
        flags |= MsFlags::MS_RDONLY;
    }
    // Keep noexec if the source has it (dropping a locked flag fails).
    if let Ok(st) = statvfs(dst) {
        if st.flags().contains(FsFlags::ST_NOEXEC) {
            flags |= MsFlags::MS_NOEXEC;
        }
    }
    mount(None::<&str>, dst, None::<&str>, flags, None::<&str>)
}

/// Binds `dir` onto itself, so that it is a mount point `pivot_root` takes.
pub fn bind_self(dir: &Path) -> nix::Result<()> {
    mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
}

/// True when `dir`'s filesystem is mounted nodev (device nodes would not open).
pub fn is_nodev(dir: &Path) -> nix::Result<bool> {
    Ok(statvfs(dir)?.flags().contains(FsFlags::ST_NODEV))
}

/// Mounts a procfs at `target` that shows only the processes the jailed
/// uid may ptrace (its own) and nothing but the per-process directories
/// (no /proc/sys, /proc/kcore, ...): `hidepid=invisible,subset=pid`.
pub fn mount_proc(target: &Path) -> nix::Result<()> {
    mount(
        Some("proc"),
        target,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("hidepid=invisible,subset=pid"),
    )
}

/// Makes `root` the process's `/` (`pivot_root(".", ".")` then detaching
/// the old root), and changes directory to it.
pub fn pivot_into(root: &Path) -> nix::Result<()> {
    nix::unistd::chdir(root)?;
    nix::unistd::pivot_root(".", ".")?;
    umount2(".", MntFlags::MNT_DETACH)?;
    nix::unistd::chdir("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime shared:5 - cgroup cgroup rw,cpu
35 31 0:32 /a /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
90 27 254:0 /srv/x /srv/with\\040space/root rw - ext4 /dev/vda rw
garbage line
";

    #[test]
    fn parses_mountinfo() {
        let m = parse_mountinfo(SAMPLE);
        assert_eq!(m.len(), 5);
        assert_eq!(m[0].mount_point, Path::new("/"));
        assert_eq!(m[2].fs_type, "cgroup");
        assert_eq!(m[2].super_options, "rw,cpu");
        assert_eq!(m[3].root, Path::new("/a"));
        assert_eq!(m[4].mount_point, Path::new("/srv/with space/root"));
        assert_eq!(
            mounts_under(&m, Path::new("/srv/with space")),
            vec![PathBuf::from("/srv/with space/root")]
        );
        assert!(mounts_under(&m, Path::new("/srv/with")).is_empty());
        assert_eq!(mounts_under(&m, Path::new("/sys/fs/cgroup")).len(), 3);
    }

    #[test]
    fn reads_own_mountinfo() {
        let m = mountinfo().unwrap();
        assert!(m.iter().any(|m| m.mount_point == Path::new("/")));
    }
}
