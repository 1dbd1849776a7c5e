//! The volume service's NBD server.
pub mod client;
pub mod proto;
pub mod server;

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::Arc;

use crate::registry::Registry;

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
    reg: Arc<Registry>,
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
        let reg = reg.clone();
        let r = s.try_clone();
        std::thread::spawn(move || match r {
            Ok(r) => {
                if let Err(e) = server::serve(r, s, reg, &name) {
                    log::info!("nbd {name}: connection ended: {e}");
                }
            }
            Err(e) => log::warn!("nbd {name}: {e}"),
        });
    }
}

/// Accepts NBD clients on a TCP listener.
pub fn serve_tcp(listener: TcpListener, reg: Arc<Registry>) {
    accept_loop(listener.incoming(), reg, |s| {
        let _ = s.set_nodelay(true);
        s.peer_addr().map(|a| a.to_string()).unwrap_or_default()
    });
}

/// Accepts NBD clients on a unix socket.
pub fn serve_unix(listener: UnixListener, reg: Arc<Registry>) {
    accept_loop(listener.incoming(), reg, |_| "unix".to_string());
}
