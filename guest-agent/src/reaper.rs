//! The one place where child processes are waited for.
//!
//! As PID 1 the agent inherits every orphan in the guest, so something has
//! to call `wait` on processes nobody asked for. If that were a plain
//! `waitpid(-1)` loop it would steal the exit status of the children that
//! `Exec` requests are waiting for (and, worse, std's `Command::spawn`
//! waits for a child whose `exec` failed and panics if that wait fails).
//!
//! The design: a single reaper thread owns *all* waiting.
//! * It blocks in `waitid(P_ALL, WEXITED | WNOWAIT)`, which reports an
//!   exited child without reaping it.
//! * It then takes the registry lock and reaps that one pid with
//!   `waitpid(pid, WNOHANG)`. If the pid is registered by an `Exec`, the
//!   status is stored there and the `Exec` thread is woken through a pipe;
//!   otherwise the status is discarded (an orphan).
//! * `Exec` spawns its child *while holding the same lock* and registers
//!   the pid before releasing it. So the reaper cannot reap a child before
//!   it is registered, and cannot interfere with std's internal wait for a
//!   child whose exec failed (that child is gone, or still a zombie that
//!   std reaps, before the reaper gets the lock; the reaper's `waitpid`
//!   then finds nothing).
//! * `Exec` never calls `wait` itself, and it only signals its child while
//!   holding the lock and before the child was reaped, so a recycled pid
//!   is never signalled.
//!
//! The module assumes it owns every child of the process: nothing else in
//! the process may spawn children and wait for them.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::process::{Child, Command};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use crate::log;

/// How a reaped child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Exited(i32),
    Signaled(i32),
}

struct Slot {
    status: Option<ExitStatus>,
    /// Write end of the waiting `Exec`'s wake-up pipe.
    notify: OwnedFd,
}

#[derive(Default)]
struct State {
    children: HashMap<i32, Slot>,
    /// Bumped on every spawn; lets the reaper sleep while there are no
    /// children at all.
    generation: u64,
    thread_started: bool,
}

/// The process-wide reaper. Get it with [`Reaper::global`].
pub struct Reaper {
    state: Mutex<State>,
    spawned: Condvar,
}

impl Reaper {
    /// The process-wide instance (its thread starts on the first spawn).
    pub fn global() -> &'static Reaper {
        static REAPER: OnceLock<Reaper> = OnceLock::new();
        REAPER.get_or_init(|| Reaper {
            state: Mutex::new(State::default()),
            spawned: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (all
        // updates are single inserts/removals), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns `cmd` and registers the child; when it exits, its status is
    /// kept for [`Reaper::take_status`] and one byte is written to `notify`.
    pub fn spawn(&'static self, cmd: &mut Command, notify: OwnedFd) -> io::Result<Child> {
        let mut st = self.lock();
        if !st.thread_started {
            std::thread::Builder::new()
                .name("reaper".into())
                .spawn(move || self.run())?;
            st.thread_started = true;
        }
        let child = cmd.spawn()?;
        let pid = child.id() as i32;
        st.children.insert(
            pid,
            Slot {
                status: None,
                notify,
            },
        );
        st.generation = st.generation.wrapping_add(1);
        drop(st);
        self.spawned.notify_all();
        Ok(child)
    }

    /// The exit status of a registered child, if it has been reaped.
    /// Once returned, the registration is removed.
    pub fn take_status(&self, pid: i32) -> Option<ExitStatus> {
        let mut st = self.lock();
        let status = st.children.get(&pid)?.status?;
        st.children.remove(&pid);
        Some(status)
    }

    /// Sends `signal` to the process group `pgid` (the child was spawned as
    /// a group leader). Done under the lock so it cannot race the reaper.
    pub fn kill_group(&self, pgid: i32, signal: nix::sys::signal::Signal) {
        let _st = self.lock();
        // ESRCH (group already gone) is fine.
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), signal);
    }

    /// Drops the registration of `pid`; its exit status, when it comes, is
    /// discarded like an orphan's.
    pub fn forget(&self, pid: i32) {
        self.lock().children.remove(&pid);
    }

    fn run(&self) {
        let mut seen_generation = 0u64;
        loop {
            // SAFETY: siginfo_t is plain data; zeroed is a valid value and
            // waitid only writes into it.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: valid pointer to a siginfo_t that lives across the call.
            let rc =
                unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
            if rc < 0 {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::ECHILD) => {
                        // No children: sleep until something is spawned.
                        // New children only ever come from spawn() (orphans
                        // are re-parented before their parent becomes a
                        // zombie, so they are seen before ECHILD).
                        let mut st = self.lock();
                        while st.generation == seen_generation {
                            st = self.spawned.wait(st).unwrap_or_else(|e| e.into_inner());
                        }
                        seen_generation = st.generation;
                        continue;
                    }
                    _ => {
                        log(&format!("reaper: waitid failed: {err}"));
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                }
            }
            // SAFETY: waitid succeeded with WEXITED, so si_pid is valid.
            let pid = unsafe { info.si_pid() };
            if pid == 0 {
                continue;
            }
            let mut st = self.lock();
            let mut raw = 0i32;
            // SAFETY: valid out-pointer; WNOHANG never blocks.
            let got = unsafe { libc::waitpid(pid, &mut raw, libc::WNOHANG) };
            if got != pid {
                // Already reaped (by std's spawn after a failed exec).
                continue;
            }
            let status = if libc::WIFSIGNALED(raw) {
                ExitStatus::Signaled(libc::WTERMSIG(raw))
            } else {
                ExitStatus::Exited(libc::WEXITSTATUS(raw))
            };
            if let Some(slot) = st.children.get_mut(&pid) {
                slot.status = Some(status);
                // The pipe is non-blocking and written at most once.
                let _ = nix::unistd::write(&slot.notify, &[1u8]);
            }
            // Unregistered: an orphan (or a forgotten child), now reaped.
        }
    }
}
