//! Starting the runtime process and capturing its output.
//!
//! stdout and stderr share one pipe: the kernel then keeps the two streams
//! in the order they were written, and there is one fd to drain instead of
//! two (every syscall is slow in the guest).
//!
//! The read end is non-blocking and only ever read with the machine's lock
//! held, by two parties: the monitor thread (woken by `poll`, so a chatty
//! runtime never blocks on a full pipe) and whoever records an answer
//! (which drains first, so everything written before the answer is in its
//! log even if the monitor has not woken yet).

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::state::Machine;
use super::Shared;
use crate::init::DEFAULT_PATH;
use crate::log;
use crate::protocol::RuntimeSpec;
use crate::reaper::{ExitStatus, Reaper};

/// A started runtime.
pub struct Spawned {
    pub pid: i32,
    /// Read end of the stdout+stderr pipe (non-blocking).
    pub output: OwnedFd,
    /// Becomes readable when the reaper has the runtime's exit status.
    pub exited: OwnedFd,
}

/// Checks what the kernel would refuse with a less helpful error.
pub fn validate(spec: &RuntimeSpec) -> Result<(), String> {
    if spec.argv.is_empty() {
        return Err("StartRuntime: argv must not be empty".into());
    }
    if spec.argv.iter().any(|a| a.contains('\0')) || spec.task_root.contains('\0') {
        return Err("StartRuntime: argv and task_root must not contain NUL bytes".into());
    }
    if spec
        .env
        .iter()
        .any(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'))
    {
        return Err(
            "StartRuntime: env names must be non-empty without '=' or NUL, values without NUL"
                .into(),
        );
    }
    if let Some(net) = &spec.network {
        crate::netconfig::validate(net).map_err(|e| format!("StartRuntime: network: {e}"))?;
    }
    Ok(())
}

/// Mounts the code device read-only at the task root (PID 1 only).
pub fn mount_code(device: &str, task_root: &str) -> Result<(), String> {
    use nix::mount::MsFlags;
    std::fs::create_dir_all(task_root).map_err(|e| format!("mkdir {task_root}: {e}"))?;
    nix::mount::mount(
        Some(device),
        task_root,
        Some("ext4"),
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
        None::<&str>,
    )
    .map_err(|e| format!("mount {device} (ext4, read-only) on {task_root}: {e}"))
}

/// Spawns the runtime with exactly `spec.env` plus `AWS_LAMBDA_RUNTIME_API`
/// (and a default `PATH`), in its own process group, stdin from /dev/null.
/// Errors are the OS's reason the program could not be started.
pub fn spawn(spec: &RuntimeSpec, api_addr: &str) -> std::io::Result<Spawned> {
    let (out_r, out_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    nix::fcntl::fcntl(&out_r, nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    let (wake_r, wake_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;

    let mut cmd = Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .envs(&spec.env)
        .env("AWS_LAMBDA_RUNTIME_API", api_addr)
        .current_dir(&spec.task_root)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out_w.try_clone()?))
        .stderr(Stdio::from(out_w))
        // Its own group, so killing it takes its children along.
        .process_group(0);
    if !spec.env.contains_key("PATH") {
        cmd.env("PATH", DEFAULT_PATH);
    }
    if let Some(gid) = spec.gid {
        cmd.gid(gid);
        if spec.uid.is_none() && nix::unistd::getuid().is_root() {
            // std drops supplementary groups only together with a uid.
            // SAFETY: the closure runs in the forked child before exec and
            // only calls setgroups, which is async-signal-safe; it touches
            // no memory shared with the parent.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setgroups(0, std::ptr::null()) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
    }
    if let Some(uid) = spec.uid {
        // As root, std also calls setgroups(0) before setuid.
        cmd.uid(uid);
    }
    let child = Reaper::global().spawn(&mut cmd, wake_w)?;
    Ok(Spawned {
        pid: child.id() as i32,
        output: out_r,
        exited: wake_r,
    })
}

/// Reads what the pipe holds into the machine's log, without blocking.
/// Returns false at end of file (every writer closed it).
pub fn drain(fd: &OwnedFd, machine: &mut Machine<impl Sized>, buf: &mut [u8]) -> bool {
    loop {
        match nix::unistd::read(fd, buf) {
            Ok(0) => return false,
            Ok(n) => {
                machine.log.push(&buf[..n]);
                // A short read emptied the pipe: no need for the EAGAIN.
                if n < buf.len() {
                    return true;
                }
            }
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => return true,
            Err(e) => {
                log(&format!("reading runtime output: {e}"));
                return false;
            }
        }
    }
}

/// Lambda's (Go's) wording for how a process ended.
pub fn describe_exit(status: ExitStatus) -> String {
    match status {
        ExitStatus::Exited(code) => format!("exit status {code}"),
        ExitStatus::Signaled(sig) => {
            let name = match sig {
                libc::SIGKILL => "killed".to_string(),
                libc::SIGTERM => "terminated".to_string(),
                libc::SIGSEGV => "segmentation fault".to_string(),
                libc::SIGABRT => "aborted".to_string(),
                libc::SIGINT => "interrupt".to_string(),
                libc::SIGBUS => "bus error".to_string(),
                libc::SIGPIPE => "broken pipe".to_string(),
                other => format!("signal {other}"),
            };
            format!("signal: {name}")
        }
    }
}

/// The monitor thread: collects output as it comes and reports the exit.
/// Blocks in `poll`; no timers.
pub fn monitor(shared: Arc<Shared>, pid: i32, output: Arc<OwnedFd>, exited: OwnedFd) {
    let mut output_open = true;
    loop {
        let mut fds = vec![PollFd::new(exited.as_fd(), PollFlags::POLLIN)];
        if output_open {
            fds.push(PollFd::new(output.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => {
                log(&format!("runtime monitor: poll: {e}"));
                return;
            }
        }
        let has = |i: usize| {
            fds.get(i)
                .and_then(|f| f.revents())
                .is_some_and(|r| !r.is_empty())
        };
        let (exit_ready, out_ready) = (has(0), has(1));
        drop(fds);
        if out_ready {
            let mut inner = shared.lock();
            inner.drain();
            output_open = inner.output_open;
        }
        if exit_ready {
            let Some(status) = Reaper::global().take_status(pid) else {
                continue;
            };
            let parked = {
                let mut inner = shared.lock();
                inner.exited = true;
                inner.drain();
                inner.machine.exited(describe_exit(status), Instant::now())
            };
            shared.notify();
            // Dropping a parked GET /next answers it with a 500; nobody is
            // there to read it anyway.
            drop(parked);
            return;
        }
    }
}
