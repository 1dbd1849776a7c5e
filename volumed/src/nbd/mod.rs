//! The volume service's NBD server (and a small client); the wire format
//! is `ember_nbd`'s.
pub mod client;
pub mod server;

use std::collections::HashMap;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use ember_tls::Tls;
pub use server::{Exports, FileExport, SetTimeouts, Timeouts};

/// How many connections a server takes, and their time limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open connections in all.
    pub total: usize,
    /// Open connections per client: a TCP peer's IP address, or a unix
    /// socket peer's uid.
    pub per_client: usize,
    pub timeouts: Timeouts,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            total: 1024,
            per_client: 256,
            timeouts: Timeouts::default(),
        }
    }
}

/// A connection whose two directions can be used from one thread each.
trait Connection: std::io::Read + std::io::Write + SetTimeouts + Send + Sized + 'static {
    fn try_clone(&self) -> std::io::Result<Self>;
    fn shutdown(&self);
}

impl Connection for std::net::TcpStream {
    fn try_clone(&self) -> std::io::Result<Self> {
        std::net::TcpStream::try_clone(self)
    }
    fn shutdown(&self) {
        let _ = std::net::TcpStream::shutdown(self, std::net::Shutdown::Both);
    }
}

impl Connection for std::os::unix::net::UnixStream {
    fn try_clone(&self) -> std::io::Result<Self> {
        std::os::unix::net::UnixStream::try_clone(self)
    }
    fn shutdown(&self) {
        let _ = std::os::unix::net::UnixStream::shutdown(self, std::net::Shutdown::Both);
    }
}

/// The open connections, in all and per client.
#[derive(Default)]
struct Counts {
    total: usize,
    per_client: HashMap<String, usize>,
}

/// One admitted connection's place in [`Counts`], given back when dropped
/// (also when its thread ends by a panic).
struct Admitted {
    counts: Arc<Mutex<Counts>>,
    client: String,
}

impl Admitted {
    fn new(counts: &Arc<Mutex<Counts>>, client: &str, limits: &Limits) -> Option<Admitted> {
        let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
        let mine = c.per_client.get(client).copied().unwrap_or(0);
        if c.total >= limits.total || mine >= limits.per_client {
            return None;
        }
        c.total += 1;
        c.per_client.insert(client.to_string(), mine + 1);
        Some(Admitted {
            counts: counts.clone(),
            client: client.to_string(),
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_client.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_client.remove(&self.client);
            }
        }
    }
}

/// Serves each accepted connection on a thread of its own, within
/// `limits`: a connection over them is closed at once, unanswered.
fn accept_loop<C: Connection>(
    incoming: impl Iterator<Item = std::io::Result<C>>,
    exports: Exports,
    limits: Limits,
    peer: impl Fn(&C) -> (String, String),
    serve: impl Fn(C, &Exports, &str, Timeouts) -> std::io::Result<()> + Clone + Send + 'static,
) {
    let counts = Arc::new(Mutex::new(Counts::default()));
    for conn in incoming {
        let s = match conn {
            Ok(s) => s,
            Err(e) => {
                log::warn!("nbd accept: {e}");
                // (EMFILE and the like: give them a moment to clear.)
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let (client, name) = peer(&s);
        let Some(admitted) = Admitted::new(&counts, &client, &limits) else {
            log::debug!("nbd {name}: refused, over the connection limit");
            s.shutdown();
            continue;
        };
        let exports = exports.clone();
        let serve = serve.clone();
        let spawned = std::thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || {
                let _admitted = admitted;
                if let Err(e) = serve(s, &exports, &name, limits.timeouts) {
                    log::info!("nbd {name}: connection ended: {e}");
                }
            });
        if let Err(e) = spawned {
            log::warn!("nbd: cannot start a connection thread: {e}");
        }
    }
}

/// A connection in the clear: its two halves.
fn serve_plain<C: Connection>(
    s: C,
    exports: &Exports,
    name: &str,
    timeouts: Timeouts,
) -> std::io::Result<()> {
    let r = s.try_clone()?;
    server::serve(r, s, exports, name, timeouts)
}

fn tcp_peer(s: &std::net::TcpStream) -> (String, String) {
    let _ = s.set_nodelay(true);
    match s.peer_addr() {
        Ok(a) => (a.ip().to_string(), a.to_string()),
        Err(_) => ("?".into(), "?".into()),
    }
}

/// Accepts NBD clients on a TCP listener; a client is its IP address.
pub fn serve_tcp(listener: TcpListener, exports: Exports, limits: Limits) {
    accept_loop(listener.incoming(), exports, limits, tcp_peer, serve_plain);
}

/// Accepts NBD clients on a TCP listener that requires TLS with `tls`'s
/// identity and CA (a client certificate chaining to the CA; see
/// [`server::serve_tls`]); a client is its IP address.
pub fn serve_tcp_tls(listener: TcpListener, exports: Exports, limits: Limits, tls: ember_tls::Tls) {
    accept_loop(
        listener.incoming(),
        exports,
        limits,
        tcp_peer,
        move |s, exports, name, timeouts| server::serve_tls(s, &tls, exports, name, timeouts),
    );
}

/// The uid of a unix socket's peer.
fn peer_uid(s: &std::os::unix::net::UnixStream) -> Option<u32> {
    use std::os::unix::io::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of `len` bytes on a socket we own.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(cred.uid)
}

/// Accepts NBD clients on a unix socket; a client is its peer's uid.
pub fn serve_unix(listener: UnixListener, exports: Exports, limits: Limits) {
    accept_loop(
        listener.incoming(),
        exports,
        limits,
        |s| {
            let uid = peer_uid(s).map_or("?".to_string(), |u| u.to_string());
            (format!("uid:{uid}"), format!("unix(uid {uid})"))
        },
        serve_plain,
    );
}

/// Serves `path` read-only as the NBD export `name` (and the default name
/// `""`) on `listen` (`unix:PATH` or `tcp:HOST:PORT`), each client on a
/// thread of its own, until the process ends. Returns once it listens.
pub fn export_file(path: &std::path::Path, name: &str, listen: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    // A link at the last component is refused, not followed.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    export_open_file(file, name, listen)
}

/// [`export_file`] of a file already open (e.g. handed over by a caller
/// that opened it without following links).
pub fn export_open_file(mut file: std::fs::File, name: &str, listen: &str) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    // Seeking also works for block devices, whose metadata length is 0.
    let size = file.seek(SeekFrom::End(0))?;
    let exports = Exports::File(Arc::new(FileExport {
        name: name.to_string(),
        file,
        size,
    }));
    if let Some(p) = listen.strip_prefix("unix:") {
        let _ = std::fs::remove_file(p);
        let l = UnixListener::bind(p)?;
        std::thread::spawn(move || serve_unix(l, exports, Limits::default()));
    } else if let Some(a) = listen.strip_prefix("tcp:") {
        let l = TcpListener::bind(a)?;
        std::thread::spawn(move || serve_tcp(l, exports, Limits::default()));
    } else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("listen {listen:?}: want unix:PATH or tcp:HOST:PORT"),
        ));
    }
    Ok(())
}
