//! A function's `/tmp` on a local disk (Lambda's `EphemeralStorage`): an
//! ext4 image made for the snapshot build and mounted before the runtime
//! starts, copied (sparse) for every instance restored from it, and, when
//! an instance migrates, served read-only to the destination (mutual TLS
//! and a ticket in front of the export, `migrate::stream`), whose VMM
//! fills its own copy on demand and in the background while the guest
//! runs there (`fill_from`); the source's copy goes once the fill is done.

use std::path::{Path, PathBuf};
use std::process::Stdio;

/// The VMM's drive id.
pub const DRIVE_ID: &str = "tmp";
/// Its guest device: the third drive, after the root filesystem and the
/// code (a volume, if any, comes after it).
pub const GUEST_DEVICE: &str = "/dev/vdc";
/// The disk's file in an instance's disk directory (bound at `/out`).
pub const FILE: &str = "tmp.img";

/// A sparse file of `mib` MiB holding an empty ext4 filesystem.
pub fn make_image(path: &Path, mib: u32) -> std::io::Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(u64::from(mib) << 20)?;
    drop(f);
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-L", "tmp"])
        .args(["-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"])
        .arg(path)
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

/// A copy of `golden` at `dest` that keeps its holes.
pub fn copy_image(golden: &Path, dest: &Path) -> std::io::Result<()> {
    let st = std::process::Command::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(golden)
        .arg(dest)
        .stderr(Stdio::piped())
        .output()?;
    if st.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "copying {}: {}",
            golden.display(),
            String::from_utf8_lossy(&st.stderr).trim()
        )))
    }
}

/// The guest commands that put `/tmp` on `device`, open to everyone.
pub fn mount_script(device: &str) -> String {
    format!("set -e\nmount -t ext4 -o noatime {device} /tmp\nchmod 1777 /tmp\n")
}

/// A source host's read-only export of an instance's disk: the
/// `ember-export` process on a unix socket beside the disk, ended on drop
/// (and the directory removed with it once [`Export::own_dir`] said so).
pub struct Export {
    child: tokio::process::Child,
    pub socket: PathBuf,
    dir: PathBuf,
    owns_dir: bool,
}

impl Export {
    /// Serves `dir/FILE` on `dir/export.sock`.
    pub async fn start(export_bin: &Path, dir: &Path) -> std::io::Result<Export> {
        let socket = dir.join("export.sock");
        let _ = std::fs::remove_file(&socket);
        let mut cmd = tokio::process::Command::new(export_bin);
        crate::oom::neutral(&mut cmd);
        let child = cmd
            .arg("--file")
            .arg(dir.join(FILE))
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .stdin(Stdio::null())
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
    /// The instance is gone: the directory goes with the export.
    pub fn own_dir(&mut self) {
        self.owns_dir = true;
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
