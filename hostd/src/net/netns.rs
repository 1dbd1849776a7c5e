//! Network namespaces and the commands that configure them (`ip`, `nft`):
//! a command run from a thread that joined a namespace configures that
//! namespace, so nothing here changes hostd's own.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sched::{setns, CloneFlags};

/// A command or namespace step that failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{program}: {error}")]
    Run {
        program: String,
        #[source]
        error: std::io::Error,
    },
    #[error("{program}: writing its input: {error}")]
    Input {
        program: String,
        #[source]
        error: std::io::Error,
    },
    /// It ran and said no; its stderr says why.
    #[error("{program} {args}: {stderr} ({status})")]
    Failed {
        program: String,
        args: String,
        stderr: String,
        status: std::process::ExitStatus,
    },
    #[error("{}: {error}", path.display())]
    File {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("joining {}: {error}", path.display())]
    Join {
        path: PathBuf,
        #[source]
        error: nix::Error,
    },
    #[error("namespace worker panicked")]
    Panicked,
}

/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Runs `program args`, feeding it `stdin`; its stderr is the error.
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<(), CommandError> {
    let ran = |error| CommandError::Run {
        program: program.to_string(),
        error,
    };
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
        .map_err(ran)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|error| CommandError::Input {
                program: program.to_string(),
                error,
            })?;
    }
    let out = child.wait_with_output().map_err(ran)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(CommandError::Failed {
            program: program.to_string(),
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            status: out.status,
        })
    }
}

/// Runs `f` on a thread that has joined the namespace at `ns`.
pub fn within<T: Send>(
    ns: &Path,
    f: impl FnOnce() -> Result<T, CommandError> + Send,
) -> Result<T, CommandError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(ns).map_err(|error| CommandError::File {
                path: ns.to_path_buf(),
                error,
            })?;
            // Only this thread moves; it ends with the scope.
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(|error| CommandError::Join {
                path: ns.to_path_buf(),
                error,
            })?;
            f()
        })
        .join()
        .unwrap_or(Err(CommandError::Panicked))
    })
}

pub fn create(name: &str) -> Result<(), CommandError> {
    run("ip", &["netns", "add", name], None)
}

/// Deletes a namespace (its tap and veth end go with it). Absent is fine.
pub fn delete(name: &str) -> Result<(), CommandError> {
    if !path(name).exists() {
        return Ok(());
    }
    run("ip", &["netns", "delete", name], None)
}

/// Writes a sysctl of the calling thread's namespace.
pub fn sysctl(key: &str, value: &str) -> Result<(), CommandError> {
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    std::fs::write(&path, value).map_err(|error| CommandError::File { path, error })
}
