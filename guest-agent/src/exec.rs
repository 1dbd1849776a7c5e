//! Running one `Exec` request: spawn, feed stdin, capture stdout/stderr,
//! enforce the timeout, collect the exit status.
//!
//! Everything happens in the calling thread with one `poll` loop over the
//! stdout/stderr pipes, the stdin pipe and a wake-up pipe from the reaper,
//! so a child that fills one pipe while we write to another cannot
//! deadlock, and no extra threads (each costs several slow syscalls in the
//! guest) are needed.

use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;

use crate::protocol::{ExecRequest, ExecResult, MAX_OUTPUT_LEN};
use crate::reaper::{ExitStatus, Reaper};

/// After the child exited, keep reading its pipes this long at most: a
/// background process it left behind may hold them open forever.
pub const EXIT_DRAIN_GRACE: Duration = Duration::from_millis(500);

/// After a timeout kill, wait this long for the child's exit to be reported.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// An `Exec` that could not be carried out (reported as an `Error` reply).
#[derive(Debug)]
pub struct ExecError(pub String);

impl fmt::Display for ExecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ExecError {}

fn err(msg: impl Into<String>) -> ExecError {
    ExecError(msg.into())
}

/// Unregisters (and kills, if still running) the child on early return.
struct ChildGuard {
    pid: i32,
    armed: bool,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.armed {
            let reaper = Reaper::global();
            reaper.kill_group(self.pid, Signal::SIGKILL);
            reaper.forget(self.pid);
        }
    }
}

struct Output {
    fd: Option<OwnedFd>,
    data: Vec<u8>,
    truncated: bool,
}

impl Output {
    fn new(fd: OwnedFd) -> Output {
        Output {
            fd: Some(fd),
            data: Vec::new(),
            truncated: false,
        }
    }

    /// Reads what is available; closes the fd at EOF.
    fn read_some(&mut self, buf: &mut [u8]) -> Result<(), ExecError> {
        let Some(fd) = &self.fd else { return Ok(()) };
        match nix::unistd::read(fd, buf) {
            Ok(0) => self.fd = None,
            Ok(n) => {
                let room = MAX_OUTPUT_LEN.saturating_sub(self.data.len());
                if n > room {
                    self.truncated = true;
                }
                self.data.extend_from_slice(&buf[..n.min(room)]);
            }
            Err(Errno::EINTR) | Err(Errno::EAGAIN) => {}
            Err(e) => return Err(err(format!("reading child output: {e}"))),
        }
        Ok(())
    }
}

/// Runs the request to completion. Errors mean the child could not be
/// started (or output collection failed); a child that fails is a normal
/// result with its exit code.
pub fn run(req: &ExecRequest) -> Result<ExecResult, ExecError> {
    let Some(program) = req.argv.first() else {
        return Err(err("exec: argv must not be empty"));
    };
    if req.argv.iter().any(|a| a.contains('\0')) {
        return Err(err("exec: argv must not contain NUL bytes"));
    }
    if req
        .env
        .iter()
        .any(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'))
    {
        return Err(err(
            "exec: env names must be non-empty without '=' or NUL, values without NUL",
        ));
    }

    let mut cmd = Command::new(program);
    cmd.args(&req.argv[1..])
        .envs(&req.env)
        .current_dir(req.cwd.as_deref().unwrap_or("/"))
        // A pipe even without stdin data (closed at once, so the child reads
        // EOF): unlike Stdio::null() this does not depend on /dev/null.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Own process group, so a timeout kills the child's descendants too.
        .process_group(0);

    let (wake_r, wake_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
        .map_err(|e| err(format!("exec: pipe: {e}")))?;

    let start = Instant::now();
    let mut child = Reaper::global()
        .spawn(&mut cmd, wake_w)
        .map_err(|e| err(format!("exec: cannot start {program:?}: {e}")))?;
    let pid = child.id() as i32;
    let mut guard = ChildGuard { pid, armed: true };

    let mut stdout = Output::new(OwnedFd::from(
        child
            .stdout
            .take()
            .ok_or_else(|| err("exec: no stdout pipe"))?,
    ));
    let mut stderr = Output::new(OwnedFd::from(
        child
            .stderr
            .take()
            .ok_or_else(|| err("exec: no stderr pipe"))?,
    ));
    let mut stdin: Option<OwnedFd> = child.stdin.take().map(OwnedFd::from);
    let stdin_data: &[u8] = req.stdin.as_deref().unwrap_or(&[]);
    let mut stdin_pos = 0usize;
    if let Some(fd) = &stdin {
        if stdin_data.is_empty() {
            stdin = None;
        } else {
            fcntl(fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
                .map_err(|e| err(format!("exec: fcntl: {e}")))?;
        }
    }
    let mut wake = Some(wake_r);

    let deadline = req.timeout_ms.map(|ms| start + Duration::from_millis(ms));
    let mut timed_out = false;
    let mut kill_deadline: Option<Instant> = None;
    let mut status: Option<ExitStatus> = None;
    let mut drain_deadline: Option<Instant> = None;
    let mut buf = vec![0u8; 64 * 1024];

    loop {
        let outputs_open = stdout.fd.is_some() || stderr.fd.is_some();
        if status.is_some() && !outputs_open {
            break;
        }
        let now = Instant::now();
        if drain_deadline.is_some_and(|d| now >= d) {
            break;
        }
        if status.is_none() {
            if let Some(d) = deadline {
                if now >= d && !timed_out {
                    timed_out = true;
                    Reaper::global().kill_group(pid, Signal::SIGKILL);
                    kill_deadline = Some(now + KILL_GRACE);
                    stdin = None;
                }
            }
            if kill_deadline.is_some_and(|d| now >= d) {
                // SIGKILL did not take effect in time; report without a status.
                break;
            }
        }
        // The soonest of the deadlines that still matter.
        let next = [
            if status.is_none() && !timed_out {
                deadline
            } else {
                None
            },
            if status.is_none() {
                kill_deadline
            } else {
                None
            },
            drain_deadline,
        ]
        .into_iter()
        .flatten()
        .min();
        let timeout = match next {
            None => PollTimeout::NONE,
            Some(t) => {
                let ms = t.saturating_duration_since(now).as_millis() + 1;
                PollTimeout::try_from(ms.min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX)
            }
        };

        let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(4);
        let mut which: Vec<u8> = Vec::with_capacity(4);
        if let Some(fd) = &stdout.fd {
            fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
            which.push(0);
        }
        if let Some(fd) = &stderr.fd {
            fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
            which.push(1);
        }
        if let Some(fd) = &stdin {
            fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLOUT));
            which.push(2);
        }
        if let Some(fd) = &wake {
            fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
            which.push(3);
        }
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(err(format!("exec: poll: {e}"))),
        }
        let ready: Vec<u8> = fds
            .iter()
            .zip(&which)
            .filter(|(fd, _)| fd.revents().is_some_and(|r| !r.is_empty()))
            .map(|(_, w)| *w)
            .collect();
        drop(fds);

        for w in ready {
            match w {
                0 => stdout.read_some(&mut buf)?,
                1 => stderr.read_some(&mut buf)?,
                2 => {
                    let Some(fd) = &stdin else { continue };
                    match nix::unistd::write(fd, &stdin_data[stdin_pos..]) {
                        Ok(n) => {
                            stdin_pos += n;
                            if stdin_pos >= stdin_data.len() {
                                stdin = None; // close: the child sees EOF
                            }
                        }
                        Err(Errno::EINTR) | Err(Errno::EAGAIN) => {}
                        // EPIPE: the child closed its stdin; stop feeding it.
                        Err(_) => stdin = None,
                    }
                }
                _ => {
                    if let Some(s) = Reaper::global().take_status(pid) {
                        status = Some(s);
                        guard.armed = false;
                        wake = None;
                        stdin = None;
                        drain_deadline = Some(Instant::now() + EXIT_DRAIN_GRACE);
                    }
                }
            }
        }
    }

    let (exit_code, signal) = match status {
        Some(ExitStatus::Exited(c)) => (Some(c), None),
        Some(ExitStatus::Signaled(s)) => (None, Some(s)),
        None => (None, None),
    };
    Ok(ExecResult {
        exit_code,
        signal,
        truncated: stdout.truncated || stderr.truncated,
        stdout: stdout.data,
        stderr: stderr.data,
        timed_out,
        duration_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}
