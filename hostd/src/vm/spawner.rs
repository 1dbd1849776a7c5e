//! The one thread that forks hostd's VMMs and jailers.
//!
//! Each is started with `PR_SET_PDEATHSIG` (SIGKILL), so that it dies with
//! the daemon. The kernel sends that signal when the *thread* that forked
//! the child exits, not the process: a tokio worker that once ran
//! `block_in_place` (hostd's record writes do) becomes a blocking-pool
//! thread and exits after an idle spell, taking every VMM it had started
//! with it. Forking from a thread that lives as long as hostd ties each
//! child to the daemon, as meant.

use std::io;
use std::sync::mpsc;
use std::sync::OnceLock;

type Job = Box<dyn FnOnce() + Send>;

/// Spawns `cmd` on the spawner thread, in the caller's runtime (so tokio
/// reaps the child and `Child::wait` works as usual).
pub async fn spawn(mut cmd: tokio::process::Command) -> io::Result<tokio::process::Child> {
    let handle = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _runtime = handle.enter();
        let _ = tx.send(cmd.spawn());
    });
    let gone = || io::Error::other("hostd's process spawner thread is gone");
    spawner().send(job).map_err(|_| gone())?;
    rx.await.map_err(|_| gone())?
}

fn spawner() -> &'static mpsc::Sender<Job> {
    static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        // If the thread cannot start, `rx` is dropped with the closure and
        // every spawn fails with a clear error instead.
        if let Err(e) = std::thread::Builder::new()
            .name("spawner".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
        {
            log::error!("cannot start the process spawner thread: {e}");
        }
        tx
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::time::Duration;

    use super::*;

    /// `sleep 30` that gets SIGKILL when the thread that forked it exits.
    fn tied_sleep() -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("sleep");
        cmd.arg("30").kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe; nothing else runs in the child.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            })
        };
        cmd
    }

    /// Starts a child from a thread that then exits (as a blocking-pool
    /// thread does), with or without the spawner, and says whether the
    /// child is still running a moment later.
    fn survives_its_thread(through_spawner: bool) -> bool {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let handle = rt.handle().clone();
        let mut child = std::thread::spawn(move || {
            handle.block_on(async {
                if through_spawner {
                    spawn(tied_sleep()).await.unwrap()
                } else {
                    tied_sleep().spawn().unwrap()
                }
            })
        })
        .join()
        .unwrap();
        rt.block_on(async {
            let ended = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
            match ended {
                Err(_) => {
                    let _ = child.kill().await;
                    true
                }
                Ok(status) => {
                    let status = status.unwrap();
                    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
                    false
                }
            }
        })
    }

    #[test]
    fn a_child_forked_by_a_thread_that_exits_is_killed() {
        // Why the spawner exists: the kernel ties PDEATHSIG to the thread.
        assert!(!survives_its_thread(false));
    }

    #[test]
    fn children_outlive_the_thread_that_asked_for_them() {
        assert!(survives_its_thread(true));
    }
}
