//! The Runtime API server (`AWS_LAMBDA_RUNTIME_API`), version 2018-06-01.
//!
//! tiny_http parses requests and keeps connections alive on its own
//! threads; one thread here takes the requests in turn. No handler blocks:
//! a `GET /next` with no event yet is parked in the state machine and
//! answered later by the `Invoke` that brings one; a SnapStart runtime's
//! `GET /restore/next` is parked until the host's `Refresh` after a
//! restore (see [`super::state`]).
//!
//! Responses are written as one buffer through `Request::into_writer`
//! rather than `Request::respond`: tiny_http would otherwise send headers
//! and body in separate small writes (slow syscalls in the guest, and
//! chunked encoding for bodies over 32 KiB).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tiny_http::{Method, Request};

use super::state::{ApiError, Next, Phase};
use super::Shared;
use crate::log;
use crate::protocol::InvokeRequest;
use crate::server::panic_message;

/// Largest response or error body a runtime may post: Lambda's 6 MB
/// payload limit, in the number of bytes Lambda itself enforces.
pub const MAX_BODY: usize = 6 * 1024 * 1024 + 100;

const PREFIX: &str = "/2018-06-01/runtime/";

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Next,
    Response(String),
    Error(String),
    InitError,
    /// `GET /restore/next` (SnapStart).
    RestoreNext,
    /// `POST /restore/error` (SnapStart).
    RestoreError,
    /// A known path with the wrong method.
    BadMethod,
    NotFound,
}

/// Maps method and URL (query ignored) to a [`Route`].
pub fn route(method: &Method, url: &str) -> Route {
    let path = url.split(['?', '#']).next().unwrap_or("");
    let Some(rest) = path.strip_prefix(PREFIX) else {
        return Route::NotFound;
    };
    let (want, route) = match rest.split('/').collect::<Vec<_>>().as_slice() {
        ["invocation", "next"] => (Method::Get, Route::Next),
        ["init", "error"] => (Method::Post, Route::InitError),
        ["restore", "next"] => (Method::Get, Route::RestoreNext),
        ["restore", "error"] => (Method::Post, Route::RestoreError),
        ["invocation", id, "response"] if !id.is_empty() => {
            (Method::Post, Route::Response(id.to_string()))
        }
        ["invocation", id, "error"] if !id.is_empty() => {
            (Method::Post, Route::Error(id.to_string()))
        }
        _ => return Route::NotFound,
    };
    if *method == want {
        route
    } else {
        Route::BadMethod
    }
}

/// Binds the server (TCP_NODELAY, so small keep-alive answers never wait
/// for a delayed ACK; accepted sockets inherit it on Linux) and starts
/// the thread that serves it. Returns the bound address.
pub fn serve(addr: SocketAddr, shared: Arc<Shared>) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    nix::sys::socket::setsockopt(&listener, nix::sys::socket::sockopt::TcpNoDelay, &true)?;
    let bound = listener.local_addr()?;
    let server = tiny_http::Server::from_listener(listener, None).map_err(io::Error::other)?;
    std::thread::Builder::new()
        .name("runtime-api".into())
        .spawn(move || loop {
            match server.recv() {
                Ok(req) => {
                    if let Err(p) = catch_unwind(AssertUnwindSafe(|| handle(&shared, req))) {
                        log(&format!(
                            "Runtime API handler panicked: {}",
                            panic_message(&*p)
                        ));
                    }
                }
                Err(e) => {
                    log(&format!("Runtime API: {e}"));
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })?;
    Ok(bound)
}

enum BodyError {
    TooLarge,
    Io(io::Error),
}

impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> ApiError {
        match e {
            BodyError::TooLarge => ApiError::new(
                413,
                "RequestEntityTooLarge",
                format!("Exceeded maximum allowed payload size ({MAX_BODY} bytes)."),
            ),
            BodyError::Io(e) => {
                ApiError::new(400, "InvalidRequest", format!("reading the body: {e}"))
            }
        }
    }
}

/// Reads the whole body, at most [`MAX_BODY`] bytes of it. A longer body
/// is read to its end and thrown away, keeping the connection in step
/// (tiny_http would otherwise buffer the unread rest in one allocation).
fn read_body(req: &mut Request) -> Result<Vec<u8>, BodyError> {
    let declared = req.body_length();
    let reader = req.as_reader();
    if declared.is_some_and(|n| n > MAX_BODY) {
        let _ = io::copy(reader, &mut io::sink());
        return Err(BodyError::TooLarge);
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(0));
    reader
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut body)
        .map_err(BodyError::Io)?;
    if body.len() > MAX_BODY {
        let _ = io::copy(reader, &mut io::sink());
        return Err(BodyError::TooLarge);
    }
    Ok(body)
}

/// Throws a body away (sending `100 Continue` first if the client waits
/// for it), so an unread body never stalls or desynchronises the connection.
fn discard_body(req: &mut Request) {
    let _ = io::copy(req.as_reader(), &mut io::sink());
}

fn header(req: &Request, name: &'static str) -> Option<String> {
    req.headers()
        .iter()
        .find(|h| h.field.equiv(name))
        .map(|h| h.value.as_str().to_string())
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        _ => "Unknown",
    }
}

/// Writes one whole response with a single write.
fn write_response(
    req: Request,
    status: u16,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<()> {
    let mut out = Vec::with_capacity(512 + body.len());
    write!(
        out,
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        reason(status),
        body.len()
    )?;
    for (k, v) in headers {
        write!(out, "{k}: {v}\r\n")?;
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    let mut w = req.into_writer();
    w.write_all(&out)?;
    w.flush()
}

fn reply_error(req: Request, e: &ApiError) {
    let _ = write_response(req, e.status, &[], &e.body());
}

fn accepted(req: Request) {
    let _ = write_response(req, 202, &[], br#"{"status":"OK"}"#);
}

/// Answers a parked `GET /restore/next`: the sandbox was restored.
pub fn send_restored(req: Request) -> io::Result<()> {
    write_response(req, 200, &[], b"")
}

/// Answers a `GET /next` with an event.
pub fn send_event(req: Request, ev: &InvokeRequest) -> io::Result<()> {
    let deadline = ev.deadline_ms.to_string();
    let mut headers = vec![
        ("Lambda-Runtime-Aws-Request-Id", ev.request_id.as_str()),
        ("Lambda-Runtime-Deadline-Ms", deadline.as_str()),
        (
            "Lambda-Runtime-Invoked-Function-Arn",
            ev.invoked_function_arn.as_str(),
        ),
    ];
    let optional = [
        ("Lambda-Runtime-Trace-Id", &ev.trace_id),
        ("Lambda-Runtime-Client-Context", &ev.client_context),
        ("Lambda-Runtime-Cognito-Identity", &ev.cognito_identity),
    ];
    for (k, v) in optional {
        if let Some(v) = v {
            headers.push((k, v.as_str()));
        }
    }
    write_response(req, 200, &headers, &ev.payload)
}

fn handle(shared: &Shared, mut req: Request) {
    let route = route(req.method(), req.url());
    match route {
        Route::Next => {
            discard_body(&mut req);
            next(shared, req, false)
        }
        Route::RestoreNext => {
            discard_body(&mut req);
            next(shared, req, true)
        }
        Route::Response(id) => answer(shared, req, &id, None),
        Route::Error(id) => {
            let t = header(&req, "Lambda-Runtime-Function-Error-Type");
            answer(shared, req, &id, Some(t))
        }
        Route::InitError => post_error(shared, req, false),
        Route::RestoreError => post_error(shared, req, true),
        Route::BadMethod => {
            discard_body(&mut req);
            let e = ApiError::new(405, "MethodNotAllowed", "method not allowed on this path");
            reply_error(req, &e);
        }
        Route::NotFound => {
            discard_body(&mut req);
            let e = ApiError::new(404, "NotFound", format!("no such path: {}", req.url()));
            reply_error(req, &e);
        }
    }
}

/// `GET /invocation/next`, or `GET /restore/next` if `restore`.
fn next(shared: &Shared, req: Request, restore: bool) {
    let action = {
        let mut inner = shared.lock();
        let init = inner.machine.phase() == Phase::Init;
        if init {
            // RuntimeReady carries the whole init output.
            inner.drain();
        }
        let action = if restore {
            inner.machine.restore_next(req, Instant::now())
        } else {
            inner.machine.next(req, Instant::now())
        };
        if init {
            shared.notify();
        }
        action
    };
    match action {
        Next::Parked { displaced: None } => {}
        Next::Parked {
            displaced: Some(old),
        } => {
            let e = ApiError::new(
                403,
                "InvalidStateTransition",
                "superseded by a newer invocation/next or restore/next",
            );
            reply_error(old, &e);
        }
        Next::Deliver(req, ev) => {
            if let Err(e) = send_event(req, &ev) {
                log(&format!(
                    "handing event {} to the runtime: {e}",
                    ev.request_id
                ));
                shared.lock().machine.requeue(ev);
            }
        }
        Next::Reject(req, e) => reply_error(req, &e),
    }
}

/// `invocation/{id}/response` (`error_type` None) or `/error`
/// (`Some(header)`).
fn answer(shared: &Shared, mut req: Request, id: &str, error_type: Option<Option<String>>) {
    let body = read_body(&mut req);
    let result = {
        let mut inner = shared.lock();
        // Everything written before this post belongs to its log.
        inner.drain();
        let now = Instant::now();
        let r = match body {
            Ok(body) => match error_type {
                None => inner.machine.respond(id, body, now),
                Some(t) => inner.machine.fail(id, t, body, now),
            },
            Err(BodyError::TooLarge) => inner
                .machine
                .too_large(id, MAX_BODY, now)
                .and(Err(BodyError::TooLarge.into())),
            Err(e) => Err(e.into()),
        };
        shared.notify();
        r
    };
    match result {
        Ok(()) => accepted(req),
        Err(e) => reply_error(req, &e),
    }
}

/// `POST /init/error`, or `POST /restore/error` if `restore`.
fn post_error(shared: &Shared, mut req: Request, restore: bool) {
    let t = header(&req, "Lambda-Runtime-Function-Error-Type");
    let result = match read_body(&mut req) {
        Ok(body) => {
            let mut inner = shared.lock();
            // The error's log has everything written before it.
            inner.drain();
            let r = if restore {
                inner.machine.restore_error(t, body)
            } else {
                inner.machine.init_error(t, body)
            };
            shared.notify();
            r
        }
        Err(e) => Err(e.into()),
    };
    match result {
        Ok(()) => accepted(req),
        Err(e) => reply_error(req, &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let p = |s: &str| format!("{PREFIX}{s}");
        assert_eq!(route(&Method::Get, &p("invocation/next")), Route::Next);
        assert_eq!(route(&Method::Get, &p("invocation/next?x=1")), Route::Next);
        assert_eq!(
            route(&Method::Post, &p("invocation/abc-1/response")),
            Route::Response("abc-1".into())
        );
        assert_eq!(
            route(&Method::Post, &p("invocation/abc/error")),
            Route::Error("abc".into())
        );
        assert_eq!(route(&Method::Post, &p("init/error")), Route::InitError);
        assert_eq!(route(&Method::Get, &p("restore/next")), Route::RestoreNext);
        assert_eq!(
            route(&Method::Get, &p("restore/next?x=1")),
            Route::RestoreNext
        );
        assert_eq!(
            route(&Method::Post, &p("restore/error")),
            Route::RestoreError
        );
        assert_eq!(route(&Method::Post, &p("restore/next")), Route::BadMethod);
        assert_eq!(route(&Method::Get, &p("restore/error")), Route::BadMethod);
        assert_eq!(route(&Method::Get, &p("restore")), Route::NotFound);
        assert_eq!(route(&Method::Get, &p("restore/next/x")), Route::NotFound);
        assert_eq!(
            route(&Method::Post, &p("invocation/next")),
            Route::BadMethod
        );
        assert_eq!(
            route(&Method::Get, &p("invocation/abc/response")),
            Route::BadMethod
        );
        assert_eq!(
            route(&Method::Post, &p("invocation//response")),
            Route::NotFound
        );
        assert_eq!(route(&Method::Get, "/"), Route::NotFound);
        assert_eq!(route(&Method::Get, "/2018-06-01/runtime/"), Route::NotFound);
        assert_eq!(
            route(&Method::Post, &p("invocation/a/b/response")),
            Route::NotFound
        );
        assert_eq!(
            route(&Method::Get, "/2020-01-01/extension/register"),
            Route::NotFound
        );
    }
}
