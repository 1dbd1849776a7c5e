//! Jails for VMM processes: the `ember-jailer` binary's work ([`setup`])
//! and hostd's view of a jail ([`JailSpec`], [`cleanup`], [`cgroup_usage`]).
//!
//! A jail `<chroot_base>/<id>/root` is the jailed program's `/` in its own
//! mount namespace; it holds a copy of the program, `/dev/kvm` (and
//! optionally `/dev/net/tun`, `/dev/userfaultfd`), `/dev/null`,
//! `/dev/urandom`, the requested bind mounts and directories, and
//! optionally a minimal `/proc`. The process runs in the cgroup
//! `ember/<id>` (v1 or v2) as an unprivileged uid:gid, without
//! capabilities and with `no_new_privs`, as PID 1 of its own PID
//! namespace, in its own IPC and UTS namespaces, with the resource limits
//! asked for (RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_NPROC).
//!
//! No user namespace is made for the jail, so `user.max_user_namespaces`
//! (a per-user-namespace sysctl) cannot be set for the jail alone; setting
//! it in the host's namespace would affect the whole host. The VMM's
//! seccomp filter refuses `unshare`, `setns` and `clone` with namespace
//! flags instead.
//!
//! hostd: build a [`JailSpec`], spawn [`JailSpec::command`] (the child is
//! the jailer, which stays the program's parent and exits as it does;
//! [`jailed_pid`] finds the program's pid), talk to it through
//! [`JailSpec::host_path`] (e.g. the API socket), and once the child has
//! been reaped call [`cleanup`]. An exit code from [`Step::from_exit_code`]
//! means the jailer failed at that step (its message is on stderr).

pub mod cgroup;
pub mod mounts;
pub mod setup;
pub mod spec;

use std::path::{Path, PathBuf};

use thiserror::Error;

pub use cgroup::CgroupStats;
pub use setup::{setup, JailError, JailerArgs, Step};
pub use spec::{
    validate_id, Bind, Device, JailSpec, ResourceLimits, SpecError, DEFAULT_CHROOT_BASE,
};

/// The jailed program's pid (in the host's PID namespace) under the
/// jailer `jailer_pid`, which stays as its parent: its only child.
pub fn jailed_pid(jailer_pid: u32) -> Option<u32> {
    let path = format!("/proc/{jailer_pid}/task/{jailer_pid}/children");
    let text = std::fs::read_to_string(path).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Why [`cleanup`] refused or failed.
#[derive(Debug, Error)]
pub enum CleanupError {
    #[error(transparent)]
    Id(#[from] SpecError),
    #[error("jail {0} still has processes in cgroup {1}")]
    Running(String, PathBuf),
    #[error("refusing to remove {dir}: mount points under it in this mount namespace: {mounts:?}")]
    Mounted { dir: PathBuf, mounts: Vec<PathBuf> },
    #[error("{0}")]
    Io(String),
}

/// Removes jail `id`: its directory `<chroot_base>/<id>` and its cgroup
/// directories. Call it after the jailed process has exited and been
/// reaped; it refuses while the cgroup holds processes, and refuses to
/// delete anything if a mount point lies under the directory in this
/// mount namespace (the jail's own mounts lived only in its namespace and
/// vanished with it; `remove_dir_all` does not follow symlinks). Removing
/// a jail that does not exist is not an error.
pub fn cleanup(chroot_base: &Path, id: &str) -> Result<(), CleanupError> {
    validate_id(id)?;
    let layout = cgroup::detect().map_err(|e| CleanupError::Io(format!("mountinfo: {e}")))?;
    if let Some(layout) = &layout {
        for dir in layout.dirs(id) {
            if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                if !procs.trim().is_empty() {
                    return Err(CleanupError::Running(id.to_string(), dir));
                }
            }
        }
    }
    let dir = chroot_base.join(id);
    match std::fs::symlink_metadata(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(CleanupError::Io(format!("{}: {e}", dir.display()))),
        Ok(_) => {
            let canonical = dir
                .canonicalize()
                .map_err(|e| CleanupError::Io(format!("{}: {e}", dir.display())))?;
            let all = mounts::mountinfo()
                .map_err(|e| CleanupError::Io(format!("/proc/self/mountinfo: {e}")))?;
            let under = mounts::mounts_under(&all, &canonical);
            if !under.is_empty() {
                return Err(CleanupError::Mounted {
                    dir: canonical,
                    mounts: under,
                });
            }
            std::fs::remove_dir_all(&dir)
                .map_err(|e| CleanupError::Io(format!("cannot remove {}: {e}", dir.display())))?;
        }
    }
    if let Some(layout) = &layout {
        layout.remove(id).map_err(|e| CleanupError::Io(e.0))?;
    }
    Ok(())
}

/// Memory (current and peak) and CPU time of jail `id`'s cgroup, if it
/// exists (two or three small file reads).
pub fn cgroup_usage(id: &str) -> Option<CgroupStats> {
    validate_id(id).ok()?;
    cgroup::detect().ok()??.usage(id)
}
