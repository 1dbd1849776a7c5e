//! Whom the kernel's OOM killer takes first. Every VMM of this host dies
//! with emberd (PR_SET_PDEATHSIG), so emberd is made the last choice
//! (`--oom-score-adj`, -800 by default) and each VMM and helper it starts
//! goes back to the neutral 0: a host short of memory loses one instance,
//! not all of them.

use std::io;

/// The score every process emberd starts runs with.
pub const NEUTRAL: i32 = 0;

/// Sets this process's `oom_score_adj` (lowering it needs CAP_SYS_RESOURCE).
pub fn set_own(adj: i32) -> io::Result<()> {
    std::fs::write("/proc/self/oom_score_adj", adj.to_string())
}

/// The score of this process.
pub fn own() -> io::Result<i32> {
    std::fs::read_to_string("/proc/self/oom_score_adj")?
        .trim()
        .parse()
        .map_err(io::Error::other)
}

/// Makes the process `cmd` starts take [`NEUTRAL`] before it runs (a
/// child inherits its parent's score). Raising a score needs no
/// privilege; if /proc is not there, the child keeps emberd's.
pub fn neutral(cmd: &mut tokio::process::Command) {
    // SAFETY: the closure runs in the forked child before exec and makes
    // only async-signal-safe syscalls (open, write, close) on a static
    // path and buffer.
    unsafe {
        cmd.pre_exec(|| {
            let fd = libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd >= 0 {
                libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child started through `neutral` has score 0 whatever its parent's
    /// (raised here to 100, which needs no privilege and which the test
    /// process keeps: each test binary is its own process).
    #[tokio::test]
    async fn children_start_neutral() {
        let before = own().unwrap();
        set_own(before.max(100)).unwrap();
        let mut plain = tokio::process::Command::new("cat");
        plain.arg("/proc/self/oom_score_adj");
        let inherited = plain.output().await.unwrap();
        let mut cmd = tokio::process::Command::new("cat");
        cmd.arg("/proc/self/oom_score_adj");
        neutral(&mut cmd);
        let out = cmd.output().await.unwrap();
        let _ = set_own(before);
        assert_eq!(String::from_utf8_lossy(&inherited.stdout).trim(), "100");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
    }
}
