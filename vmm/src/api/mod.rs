//! HTTP/JSON API on a unix socket (Firecracker's shapes).
//!
//! Layout: `parsed_request` and `request/*` turn an HTTP request into a
//! [`VmmAction`](crate::rpc_interface::VmmAction) as pure functions;
//! `response` turns a [`VmmResponse`](crate::rpc_interface::VmmResponse)
//! into status + JSON; `server` owns the socket loop; `socket` binds the path.

mod parsed_request;
mod request;
mod response;
mod server;
mod socket;

#[cfg(test)]
mod tests;

use std::io;
use std::path::PathBuf;

pub use parsed_request::{parse_request, ParseError, MAX_BODY_BYTES};
pub use request::machine_config::MachineConfigUpdate;
pub use response::ApiResponse;
pub use server::{run_api_server, ApiChannel, ShutdownHandle};
pub use socket::bind_api_socket;

/// Why the API server could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("API socket {0} is in use by a running server")]
    SocketInUse(PathBuf),
    #[error("API socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("cannot check existing API socket {path}: {source}")]
    Probe { path: PathBuf, source: io::Error },
    #[error("cannot remove stale API socket {path}: {source}")]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("cannot bind API socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot set up the API server: {0}")]
    Setup(io::Error),
}

/// Binds `path` and serves the API on a thread of its own ("ember_api"),
/// confined by the API seccomp filter. Returns the VMM thread's ends.
pub fn start_api_thread(path: &std::path::Path) -> Result<crate::event_loop::ApiReceiver, String> {
    use std::sync::mpsc::channel;
    use vmm_sys_util::eventfd::EventFd;

    let listener = bind_api_socket(path).map_err(|e| e.to_string())?;
    let (to_vmm, requests) = channel();
    let (responses, from_vmm) = channel();
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
    let chan = ApiChannel {
        to_vmm,
        vmm_evt: evt.try_clone().map_err(|e| format!("eventfd: {e}"))?,
        from_vmm,
    };
    let shutdown = ShutdownHandle::new().map_err(|e| format!("eventfd: {e}"))?;
    std::thread::Builder::new()
        .name("ember_api".into())
        .spawn(move || {
            crate::seccomp::apply_for_current_thread(crate::seccomp::ThreadKind::Api);
            if let Err(e) = run_api_server(listener, chan, shutdown) {
                log::error!("API server stopped: {e}");
            }
        })
        .map_err(|e| format!("cannot start the API thread: {e}"))?;
    Ok(crate::event_loop::ApiReceiver {
        requests,
        responses,
        evt,
    })
}
