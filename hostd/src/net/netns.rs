//! Network namespaces and the commands that configure them (`ip`, `nft`):
//! a command run from a thread that joined a namespace configures that
//! namespace, so nothing here changes hostd's own.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sched::{setns, CloneFlags};

/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Runs `program args`, feeding it `stdin`; its stderr is the error.
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<(), String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|e| format!("{program}: writing its input: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {} ({})",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim(),
            out.status
        ))
    }
}

/// Runs `f` on a thread that has joined the namespace at `ns`.
pub fn within<T: Send>(
    ns: &Path,
    f: impl FnOnce() -> Result<T, String> + Send,
) -> Result<T, String> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(ns).map_err(|e| format!("{}: {e}", ns.display()))?;
            // Only this thread moves; it ends with the scope.
            setns(&file, CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("joining {}: {e}", ns.display()))?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err("namespace worker panicked".into()))
    })
}

pub fn create(name: &str) -> Result<(), String> {
    run("ip", &["netns", "add", name], None)
}

/// Deletes a namespace (its tap and veth end go with it). Absent is fine.
pub fn delete(name: &str) -> Result<(), String> {
    if !path(name).exists() {
        return Ok(());
    }
    run("ip", &["netns", "delete", name], None)
}

/// Writes a sysctl of the calling thread's namespace.
pub fn sysctl(key: &str, value: &str) -> Result<(), String> {
    let p = Path::new("/proc/sys").join(key.replace('.', "/"));
    std::fs::write(&p, value).map_err(|e| format!("{}: {e}", p.display()))
}
