//! The volume service's NBD server.
pub mod client;
pub mod proto;
pub mod server;

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::Arc;

use crate::registry::Registry;

/// Accepts NBD clients on `listener`, a thread per connection.
pub fn serve_tcp(listener: TcpListener, reg: Arc<Registry>) {
    for conn in listener.incoming() {
        let s = match conn {
            Ok(s) => s,
            Err(e) => {
                log::warn!("nbd accept: {e}");
                continue;
            }
        };
        let _ = s.set_nodelay(true);
        let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        let reg = reg.clone();
        let r = s.try_clone();
        std::thread::spawn(move || match r {
            Ok(r) => {
                if let Err(e) = server::serve(r, s, reg, &peer) {
                    log::info!("nbd {peer}: connection ended: {e}");
                }
            }
            Err(e) => log::warn!("nbd {peer}: {e}"),
        });
    }
}

/// Accepts NBD clients on a unix socket, a thread per connection.
pub fn serve_unix(listener: UnixListener, reg: Arc<Registry>) {
    for conn in listener.incoming() {
        let s = match conn {
            Ok(s) => s,
            Err(e) => {
                log::warn!("nbd accept: {e}");
                continue;
            }
        };
        let reg = reg.clone();
        let r = s.try_clone();
        std::thread::spawn(move || match r {
            Ok(r) => {
                if let Err(e) = server::serve(r, s, reg, "unix") {
                    log::info!("nbd unix: connection ended: {e}");
                }
            }
            Err(e) => log::warn!("nbd unix: {e}"),
        });
    }
}
