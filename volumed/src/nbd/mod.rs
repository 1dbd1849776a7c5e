//! The volume service's NBD server.
pub mod client;
pub mod proto;
pub mod server;

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::Arc;

pub use server::{Exports, FileExport};

/// A connection whose two directions can be used from one thread each.
trait Connection: std::io::Read + std::io::Write + Send + Sized + 'static {
    fn try_clone(&self) -> std::io::Result<Self>;
}

impl Connection for std::net::TcpStream {
    fn try_clone(&self) -> std::io::Result<Self> {
        std::net::TcpStream::try_clone(self)
    }
}

impl Connection for std::os::unix::net::UnixStream {
    fn try_clone(&self) -> std::io::Result<Self> {
        std::os::unix::net::UnixStream::try_clone(self)
    }
}

/// Serves each accepted connection on a thread of its own.
fn accept_loop<C: Connection>(
    incoming: impl Iterator<Item = std::io::Result<C>>,
    exports: Exports,
    peer: impl Fn(&C) -> String,
) {
    for conn in incoming {
        let s = match conn {
            Ok(s) => s,
            Err(e) => {
                log::warn!("nbd accept: {e}");
                continue;
            }
        };
        let name = peer(&s);
        let exports = exports.clone();
        let r = s.try_clone();
        std::thread::spawn(move || match r {
            Ok(r) => {
                if let Err(e) = server::serve(r, s, &exports, &name) {
                    log::info!("nbd {name}: connection ended: {e}");
                }
            }
            Err(e) => log::warn!("nbd {name}: {e}"),
        });
    }
}

/// Accepts NBD clients on a TCP listener.
pub fn serve_tcp(listener: TcpListener, exports: Exports) {
    accept_loop(listener.incoming(), exports, |s| {
        let _ = s.set_nodelay(true);
        s.peer_addr().map(|a| a.to_string()).unwrap_or_default()
    });
}

/// Accepts NBD clients on a unix socket.
pub fn serve_unix(listener: UnixListener, exports: Exports) {
    accept_loop(listener.incoming(), exports, |_| "unix".to_string());
}

/// Serves `path` read-only as the NBD export `name` (and the default name
/// `""`) on `listen` (`unix:PATH` or `tcp:HOST:PORT`), each client on a
/// thread of its own, until the process ends. Returns once it listens.
pub fn export_file(path: &std::path::Path, name: &str, listen: &str) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
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
        std::thread::spawn(move || serve_unix(l, exports));
    } else if let Some(a) = listen.strip_prefix("tcp:") {
        let l = TcpListener::bind(a)?;
        std::thread::spawn(move || serve_tcp(l, exports));
    } else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("listen {listen:?}: want unix:PATH or tcp:HOST:PORT"),
        ));
    }
    Ok(())
}
