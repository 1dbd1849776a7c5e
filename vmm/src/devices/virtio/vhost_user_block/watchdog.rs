//! Bounds requests to the backend. The `vhost` crate retries a receive that
//! times out (EAGAIN) forever, so socket timeouts cannot stop a backend that
//! neither answers nor closes; instead a watchdog thread shuts the socket
//! down when a guarded stretch of requests overruns, and the pending
//! request fails as a disconnect.

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::Mutex;
use std::time::Duration;

enum Msg {
    Arm,
    Done,
}

pub(super) struct Watchdog {
    tx: Mutex<Sender<Msg>>,
}

/// Disarms the watchdog when dropped.
pub(super) struct Guard<'a>(&'a Watchdog);

impl Watchdog {
    /// Starts the thread (on the VMM thread: vCPU threads may not clone);
    /// it ends when the watchdog is dropped.
    pub fn new(sock: UnixStream, timeout: Duration, name: &str) -> std::io::Result<Watchdog> {
        let (tx, rx) = channel();
        let name = name.to_string();
        std::thread::Builder::new()
            .name("vhost_user_wd".into())
            .spawn(move || {
                while let Ok(msg) = rx.recv() {
                    if !matches!(msg, Msg::Arm) {
                        continue;
                    }
                    match rx.recv_timeout(timeout) {
                        Ok(_) => {}
                        Err(RecvTimeoutError::Timeout) => {
                            log::error!(
                                "vhost-user drive {name}: backend did not answer within \
                                 {timeout:?}; closing the connection"
                            );
                            let _ = sock.shutdown(Shutdown::Both);
                        }
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
            })?;
        Ok(Watchdog { tx: Mutex::new(tx) })
    }

    pub fn guard(&self) -> Guard<'_> {
        self.send(Msg::Arm);
        Guard(self)
    }

    fn send(&self, msg: Msg) {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        // The thread only ends with the watchdog itself.
        let _ = tx.send(msg);
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.0.send(Msg::Done);
    }
}
