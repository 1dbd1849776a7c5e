//! The API thread's socket loop.
//!
//! HTTP stack: hyper 1.x (HTTP/1.1 only) on a tokio `current_thread` runtime
//! driven by the caller's thread. hyper does the framing we must get right
//! for real clients (keep-alive, pipelining, `Content-Length` and chunked
//! bodies, `Expect: 100-continue`), and this runtime flavour runs every task
//! on the thread that calls `block_on`: no worker threads, and nothing here
//! uses the blocking pool, so the per-thread seccomp filter covers all of it.
//! Connections are separate local tasks, so an idle or slow client never
//! holds up others.
//!
//! Requests reach the VMM one at a time: the response channel carries no
//! request ids, so `dispatch` sends an action and blocks this thread until
//! its answer arrives. That also serialises the API, as in Firecracker.

use std::convert::Infallible;
use std::future::poll_fn;
use std::io;
use std::os::unix::net::UnixListener;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::parsed_request::{parse_request, MAX_BODY_BYTES};
use super::response::ApiResponse;
use super::ApiError;
use crate::rpc_interface::{VmmAction, VmmResponse};

/// How often a wait for the VMM checks for shutdown.
const SHUTDOWN_POLL: Duration = Duration::from_millis(100);
/// Pause after a failed accept (e.g. EMFILE) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The API thread's ends of the link to the VMM thread.
pub struct ApiChannel {
    pub to_vmm: Sender<VmmAction>,
    /// Written after each send; wakes the VMM's event loop.
    pub vmm_evt: EventFd,
    pub from_vmm: Receiver<VmmResponse>,
}

/// Stops [`run_api_server`] from any thread. Clone it before handing one
/// copy to the server. `trigger` only stores a flag and writes an eventfd,
/// so it is also safe to call from a signal handler.
#[derive(Clone)]
pub struct ShutdownHandle(Arc<ShutdownInner>);

struct ShutdownInner {
    requested: AtomicBool,
    evt: EventFd,
}

impl ShutdownHandle {
    pub fn new() -> io::Result<Self> {
        Ok(ShutdownHandle(Arc::new(ShutdownInner {
            requested: AtomicBool::new(false),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })))
    }

    pub fn trigger(&self) {
        self.0.requested.store(true, Ordering::SeqCst);
        // Only fails (EAGAIN) when the counter is saturated, i.e. already readable.
        let _ = self.0.evt.write(1);
    }

    pub fn is_triggered(&self) -> bool {
        self.0.requested.load(Ordering::SeqCst)
    }
}

/// Serves the API on `listener` until `shutdown` is triggered; blocks the
/// calling thread, which should be the dedicated API thread. On shutdown it
/// stops accepting, drops open connections and returns `Ok(())`; the socket
/// file is left for the caller to remove.
pub fn run_api_server(
    listener: UnixListener,
    chan: ApiChannel,
    shutdown: ShutdownHandle,
) -> Result<(), ApiError> {
    listener.set_nonblocking(true).map_err(ApiError::Setup)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(ApiError::Setup)?;
    // `LocalSet` lets connection tasks share the (non-`Send`) dispatcher;
    // dropping it on return cancels the connection tasks still open.
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, serve(listener, chan, shutdown))
}

async fn serve(
    listener: UnixListener,
    chan: ApiChannel,
    shutdown: ShutdownHandle,
) -> Result<(), ApiError> {
    let listener = tokio::net::UnixListener::from_std(listener).map_err(ApiError::Setup)?;
    let stop_evt = shutdown.0.evt.try_clone().map_err(ApiError::Setup)?;
    // SAFETY: the `EventFd` owns its descriptor and is moved into the
    // `AsyncFd`, so `as_raw_fd` returns the same open fd until the `AsyncFd`
    // itself is dropped; nothing else can close it.
    let stop_fd = unsafe { AsyncFd::register_with_interest(stop_evt, Interest::READABLE) }
        .map_err(|e| ApiError::Setup(e.into()))?;
    let dispatcher = Rc::new(Dispatcher {
        chan,
        shutdown: shutdown.clone(),
    });

    loop {
        let next = poll_fn(|cx| {
            if shutdown.is_triggered() || stop_fd.poll_read_ready(cx).is_ready() {
                return Poll::Ready(None);
            }
            listener.poll_accept(cx).map(Some)
        })
        .await;
        match next {
            None => break,
            Some(Ok((stream, _))) => {
                tokio::task::spawn_local(serve_connection(stream, Rc::clone(&dispatcher)));
            }
            Some(Err(e)) => {
                log::warn!("API server: accept failed: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
    log::info!("API server: shutting down");
    Ok(())
}

async fn serve_connection(stream: tokio::net::UnixStream, dispatcher: Rc<Dispatcher>) {
    let service = service_fn(move |req| {
        let dispatcher = Rc::clone(&dispatcher);
        async move { Ok::<_, Infallible>(handle(&dispatcher, req).await) }
    });
    // No header timeout: it needs a timer, and idle keep-alive clients
    // (Firecracker's never closes them) are normal on a local socket.
    let conn = http1::Builder::new()
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(stream), service);
    if let Err(e) = conn.await {
        log::debug!("API connection ended: {e}");
    }
}

async fn handle(dispatcher: &Dispatcher, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let (method, path) = (parts.method.as_str(), parts.uri.path());
    let resp = match read_body(body).await {
        Ok(body) => match parse_request(method, path, &body) {
            Ok(action) => dispatcher.dispatch(action),
            Err(e) => e.into(),
        },
        Err(resp) => resp,
    };
    log::info!("API {method} {path}: {}", resp.status);
    into_http(resp)
}

/// Reads the whole body, refusing more than `MAX_BODY_BYTES` whether it is
/// announced by `Content-Length` or arrives chunked.
async fn read_body(body: Incoming) -> Result<Bytes, ApiResponse> {
    let declared = body.size_hint().lower();
    if declared > MAX_BODY_BYTES as u64 {
        return Err(too_large(&format!("Request payload with size {declared}")));
    }
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(too_large("Request payload")),
        Err(e) => Err(ApiResponse::fault(
            400,
            format!("Failed to read the request body: {e}"),
        )),
    }
}

fn too_large(what: &str) -> ApiResponse {
    ApiResponse::fault(
        413,
        format!("{what} is larger than the limit of {MAX_BODY_BYTES} bytes allowed by server."),
    )
}

fn into_http(resp: ApiResponse) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(resp.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let has_body = resp.body.is_some();
    let mut out = Response::new(Full::new(resp.body.map(Bytes::from).unwrap_or_default()));
    *out.status_mut() = status;
    if has_body {
        out.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    out
}

struct Dispatcher {
    chan: ApiChannel,
    shutdown: ShutdownHandle,
}

impl Dispatcher {
    /// Sends one action and blocks (this whole thread) for its answer.
    fn dispatch(&self, action: VmmAction) -> ApiResponse {
        if self.chan.to_vmm.send(action).is_err() {
            return vmm_gone();
        }
        if let Err(e) = self.chan.vmm_evt.write(1) {
            // The action is queued; the VMM still finds it on its next wakeup.
            log::warn!("API server: cannot signal the VMM: {e}");
        }
        loop {
            match self.chan.from_vmm.recv_timeout(SHUTDOWN_POLL) {
                Ok(resp) => return ApiResponse::from_vmm(&resp),
                Err(RecvTimeoutError::Disconnected) => return vmm_gone(),
                Err(RecvTimeoutError::Timeout) if self.shutdown.is_triggered() => {
                    return ApiResponse::fault(503, "The API server is shutting down.");
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }
}

fn vmm_gone() -> ApiResponse {
    ApiResponse::fault(503, "The VMM is not running: cannot process the request.")
}
