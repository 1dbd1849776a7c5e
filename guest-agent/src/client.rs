//! Host side: talking to the agent through a Firecracker-style vsock
//! device, which the VMM exposes as unix sockets:
//!
//! * host -> guest: connect to the VMM's `uds_path`, send `CONNECT <port>\n`,
//!   read `OK <host_port>\n`, then the stream is connected to the guest's
//!   listener on `<port>`.
//! * guest -> host: a guest connection to host port `P` arrives as a
//!   connection on the unix socket `<uds_path>_P`, which the host must be
//!   listening on.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::protocol::{
    read_frame, read_frame_bytes_limited, write_frame, ExecRequest, ExecResult, HealthInfo,
    InitFailure, InvokeRequest, InvokeResult, ProtocolError, Request, Response, RuntimeReady,
    RuntimeSpec, MAX_FRAME_LEN, MAX_INVOKE_FRAME_LEN, READY_PORT,
};

/// Errors seen by the host.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("vsock handshake failed: {0}")]
    Handshake(String),
    #[error("agent returned an error: {0}")]
    Agent(String),
    #[error("unexpected response from the agent: {0}")]
    Unexpected(String),
    #[error("the agent closed the connection")]
    Closed,
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

impl ClientError {
    fn from_io(e: io::Error, timeout: Option<Duration>) -> ClientError {
        match (e.kind(), timeout) {
            (io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut, Some(t)) => {
                ClientError::Timeout(t)
            }
            _ => ClientError::Io(e),
        }
    }

    fn from_protocol(e: ProtocolError, timeout: Option<Duration>) -> ClientError {
        match e {
            ProtocolError::Io(e) => ClientError::from_io(e, timeout),
            e => ClientError::Protocol(e),
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// The unix socket path on which guest connections to host port `port`
/// arrive: `<uds_path>_<port>`.
pub fn host_port_socket_path(uds_path: impl AsRef<Path>, port: u32) -> PathBuf {
    let mut s = uds_path.as_ref().as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Binds the listener for the agent's ready hello at
/// `<uds_path>_<READY_PORT>`, removing a stale socket file first. Bind it
/// before starting the VM.
pub fn bind_ready_listener(uds_path: impl AsRef<Path>) -> io::Result<UnixListener> {
    let path = host_port_socket_path(uds_path, READY_PORT);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(path)
}

/// Waits up to `timeout` for the agent's guest-initiated ready connection
/// on `listener`, then up to `timeout` for its hello, and returns the hello.
pub fn wait_ready(listener: &UnixListener, timeout: Duration) -> Result<HealthInfo> {
    let deadline = Instant::now() + timeout;
    listener.set_nonblocking(true)?;
    let accepted = loop {
        match listener.accept() {
            Ok((s, _)) => break Ok(s),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(ClientError::Io(e)),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break Err(ClientError::Timeout(timeout));
        }
        let ms = (left.as_millis() + 1).min(i32::MAX as u128) as i32;
        let mut fds = [nix::poll::PollFd::new(
            listener.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let t = nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::MAX);
        match nix::poll::poll(&mut fds, t) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => break Err(ClientError::Io(e.into())),
        }
    };
    let restore = listener.set_nonblocking(false);
    let mut stream = accepted?;
    restore?;
    stream.set_nonblocking(false)?;
    // Once accepted, the hello gets the whole `timeout` again: cutting its
    // read to what is left of the accept wait would drop a connection that
    // arrived near the end, and the agent says hello only once.
    stream.set_read_timeout(Some(timeout))?;
    match read_frame::<_, Response>(&mut stream)
        .map_err(|e| ClientError::from_protocol(e, Some(timeout)))?
    {
        Some(Response::Hello(info)) => Ok(info),
        Some(other) => Err(ClientError::Unexpected(format!(
            "expected hello, got {other:?}"
        ))),
        None => Err(ClientError::Closed),
    }
}

/// A connection to the agent.
#[derive(Debug)]
pub struct AgentClient {
    stream: UnixStream,
    timeout: Option<Duration>,
    host_port: Option<u32>,
}

impl AgentClient {
    /// Connects through the VMM's vsock unix socket `uds_path` to guest port
    /// `port` (normally [`crate::AGENT_PORT`]). `timeout` bounds the
    /// handshake and becomes the I/O timeout of later calls.
    pub fn connect(uds_path: impl AsRef<Path>, port: u32, timeout: Duration) -> Result<Self> {
        let uds_path = uds_path.as_ref();
        let stream = UnixStream::connect(uds_path).map_err(|e| {
            ClientError::Io(io::Error::new(
                e.kind(),
                format!("connecting to vsock socket {}: {e}", uds_path.display()),
            ))
        })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut client = AgentClient {
            stream,
            timeout: Some(timeout),
            host_port: None,
        };
        client.host_port = Some(client.handshake(port)?);
        Ok(client)
    }

    /// [`AgentClient::connect`], retried until `overall` has passed: useful
    /// while the guest is booting and nothing listens on `port` yet (the
    /// VMM then closes the connection during the handshake).
    pub fn connect_retry(
        uds_path: impl AsRef<Path>,
        port: u32,
        overall: Duration,
        attempt_timeout: Duration,
    ) -> Result<Self> {
        let deadline = Instant::now() + overall;
        loop {
            match Self::connect(uds_path.as_ref(), port, attempt_timeout) {
                Ok(c) => return Ok(c),
                Err(e) => {
                    if Instant::now() + Duration::from_millis(50) >= deadline {
                        return Err(e);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// Wraps an already connected stream (no handshake), for example a
    /// unix socket served by `ember-agent --listen-unix`.
    pub fn from_stream(stream: UnixStream, timeout: Option<Duration>) -> io::Result<Self> {
        stream.set_read_timeout(timeout)?;
        stream.set_write_timeout(timeout)?;
        Ok(AgentClient {
            stream,
            timeout,
            host_port: None,
        })
    }

    /// The host-side port the VMM reported in `OK <port>` (None without a
    /// handshake).
    pub fn host_port(&self) -> Option<u32> {
        self.host_port
    }

    /// The I/O timeout used for every call (an exec with a timeout gets
    /// that much more).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(timeout)?;
        self.stream.set_write_timeout(timeout)?;
        self.timeout = timeout;
        Ok(())
    }

    /// Ends the connection cleanly: stops sending, then waits (at most
    /// `timeout`) for the agent to close its side. A snapshot taken after
    /// this holds no half-closed connection, so its restores have none to
    /// end. Returns whether the agent closed in time.
    pub fn close(self, timeout: Duration) -> bool {
        if self.stream.shutdown(std::net::Shutdown::Write).is_err() {
            return false;
        }
        let deadline = Instant::now() + timeout;
        let mut stream = &self.stream;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
                return false;
            }
            match stream.read(&mut buf) {
                Ok(0) => return true,
                // Anything the agent still sends is of no use now.
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }

    /// The underlying stream.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    fn handshake(&mut self, port: u32) -> Result<u32> {
        self.stream
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .map_err(|e| ClientError::from_io(e, self.timeout))?;
        // Read byte by byte so nothing after the line is consumed.
        let mut line = Vec::with_capacity(32);
        loop {
            let mut b = [0u8; 1];
            match self.stream.read(&mut b) {
                Ok(0) => {
                    return Err(ClientError::Handshake(if line.is_empty() {
                        format!(
                            "the VMM closed the connection after CONNECT {port} \
                             (is anything listening on guest vsock port {port}?)"
                        )
                    } else {
                        format!(
                            "connection closed in the middle of the reply {:?}",
                            String::from_utf8_lossy(&line)
                        )
                    }))
                }
                Ok(_) if b[0] == b'\n' => break,
                Ok(_) => {
                    line.push(b[0]);
                    if line.len() > 64 {
                        return Err(ClientError::Handshake(format!(
                            "reply line too long: {:?}",
                            String::from_utf8_lossy(&line)
                        )));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ClientError::from_io(e, self.timeout)),
            }
        }
        let text = String::from_utf8_lossy(&line);
        text.strip_prefix("OK ")
            .and_then(|p| p.trim().parse::<u32>().ok())
            .ok_or_else(|| {
                ClientError::Handshake(format!(
                    "expected \"OK <port>\" after CONNECT {port}, got {text:?}"
                ))
            })
    }

    /// Sends one request and returns the response as is (including
    /// `Response::Error`).
    pub fn request(&mut self, req: &Request) -> Result<Response> {
        let read_timeout = match req {
            Request::Exec(ExecRequest {
                timeout_ms: Some(ms),
                ..
            }) => self
                .timeout
                .map(|t| t + Duration::from_millis(*ms) + Duration::from_secs(10)),
            Request::Exec(_) => None,
            // Bounded by the caller (init timeout in the request, or the
            // function timeout enforced by killing the VM).
            Request::StartRuntime(_) | Request::Invoke(_) => None,
            _ => self.timeout,
        };
        let max_frame = match req {
            Request::Invoke(_) => MAX_INVOKE_FRAME_LEN,
            _ => MAX_FRAME_LEN,
        };
        self.stream.set_read_timeout(read_timeout)?;
        let res = call_limited(&mut self.stream, req, max_frame);
        let restore = self.stream.set_read_timeout(self.timeout);
        let resp = res.map_err(|e| match e {
            ClientError::Io(e) => ClientError::from_io(e, read_timeout),
            ClientError::Protocol(e) => ClientError::from_protocol(e, read_timeout),
            e => e,
        })?;
        restore?;
        Ok(resp)
    }

    /// `Health`.
    pub fn health(&mut self) -> Result<HealthInfo> {
        match self.request(&Request::Health)? {
            Response::Health(h) => Ok(h),
            other => Err(unexpected(other)),
        }
    }

    /// `Exec`. Without `timeout_ms` the call waits for the child however
    /// long it runs.
    pub fn exec(&mut self, req: &ExecRequest) -> Result<ExecResult> {
        match self.request(&Request::Exec(req.clone()))? {
            Response::Exec(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// `Shutdown`: returns once the agent acknowledged; the VM then stops.
    pub fn shutdown(&mut self) -> Result<()> {
        match self.request(&Request::Shutdown)? {
            Response::Ack => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// `Refresh` with fresh host entropy and the host clock: call right
    /// after restoring a snapshot, before the guest does anything that
    /// needs randomness or the time.
    pub fn refresh(&mut self) -> Result<()> {
        let mut entropy = vec![0u8; 64];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut entropy))
            .map_err(ClientError::Io)?;
        let realtime_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        match self.request(&Request::Refresh {
            entropy,
            realtime_ns,
        })? {
            Response::Ack => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// `StartRuntime`: `Ok(Ok(ready))` once the runtime waits for its first
    /// event, `Ok(Err(failure))` if its init failed.
    pub fn start_runtime(
        &mut self,
        spec: &RuntimeSpec,
    ) -> Result<std::result::Result<RuntimeReady, InitFailure>> {
        match self.request(&Request::StartRuntime(spec.clone()))? {
            Response::RuntimeReady(r) => Ok(Ok(r)),
            Response::InitError(f) => Ok(Err(f)),
            other => Err(unexpected(other)),
        }
    }

    /// `Invoke`: waits for the runtime's answer, however long it takes.
    pub fn invoke(&mut self, req: &InvokeRequest) -> Result<InvokeResult> {
        match self.request(&Request::Invoke(req.clone()))? {
            Response::Invoked(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// `Reboot`: returns once the agent acknowledged.
    pub fn reboot(&mut self) -> Result<()> {
        match self.request(&Request::Reboot)? {
            Response::Ack => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(resp: Response) -> ClientError {
    match resp {
        Response::Error { message } => ClientError::Agent(message),
        other => ClientError::Unexpected(format!("{other:?}")),
    }
}

/// One request/response exchange on any stream (no handshake, no
/// timeouts of its own).
pub fn call<S: Read + Write + ?Sized>(stream: &mut S, req: &Request) -> Result<Response> {
    call_limited(stream, req, MAX_FRAME_LEN)
}

/// [`call`], refusing an answer larger than `max` bytes before reading it.
pub fn call_limited<S: Read + Write + ?Sized>(
    stream: &mut S,
    req: &Request,
    max: usize,
) -> Result<Response> {
    write_frame(stream, req)?;
    match read_frame_bytes_limited(stream, max)? {
        Some(body) => Ok(serde_json::from_slice(&body).map_err(ProtocolError::from)?),
        None => Err(ClientError::Closed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent's answer over the invoke limit is refused from its header,
    /// before its body is read; the same size is fine for other requests.
    #[test]
    fn oversized_invoke_answers_are_refused_unread() {
        struct Peer(io::Cursor<Vec<u8>>, Vec<u8>);
        impl Read for Peer {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.0.read(buf)
            }
        }
        impl Write for Peer {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.1.extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let len = (MAX_INVOKE_FRAME_LEN + 1) as u32;
        let mut peer = Peer(io::Cursor::new(len.to_be_bytes().to_vec()), vec![]);
        let e = call_limited(&mut peer, &Request::Health, MAX_INVOKE_FRAME_LEN).unwrap_err();
        assert!(
            matches!(
                e,
                ClientError::Protocol(ProtocolError::FrameTooLarge { .. })
            ),
            "{e}"
        );
        // Under the general limit it is read (and found short).
        let mut peer = Peer(io::Cursor::new(len.to_be_bytes().to_vec()), vec![]);
        let e = call_limited(&mut peer, &Request::Health, MAX_FRAME_LEN).unwrap_err();
        assert!(
            matches!(e, ClientError::Protocol(ProtocolError::Truncated { .. })),
            "{e}"
        );
    }

    #[test]
    fn host_port_path_appends_port() {
        assert_eq!(
            host_port_socket_path("/run/vm1/v.sock", 53),
            PathBuf::from("/run/vm1/v.sock_53")
        );
    }

    #[test]
    fn wait_ready_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let l = bind_ready_listener(dir.path().join("v.sock")).unwrap();
        assert!(dir.path().join("v.sock_53").exists());
        let t0 = Instant::now();
        let r = wait_ready(&l, Duration::from_millis(100));
        assert!(matches!(r, Err(ClientError::Timeout(_))), "{r:?}");
        assert!(t0.elapsed() >= Duration::from_millis(100));
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn wait_ready_rejects_non_hello() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let l = bind_ready_listener(&uds).unwrap();
        let p = host_port_socket_path(&uds, READY_PORT);
        let t = std::thread::spawn(move || {
            let mut s = UnixStream::connect(p).unwrap();
            write_frame(&mut s, &Response::Ack).unwrap();
        });
        let r = wait_ready(&l, Duration::from_secs(5));
        t.join().unwrap();
        assert!(matches!(r, Err(ClientError::Unexpected(_))), "{r:?}");
    }

    #[test]
    fn agent_error_reply_maps_to_agent_error() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let req: Request = read_frame(&mut b).unwrap().unwrap();
            assert_eq!(req, Request::Health);
            write_frame(
                &mut b,
                &Response::Error {
                    message: "nope".into(),
                },
            )
            .unwrap();
        });
        let mut c = AgentClient::from_stream(a, Some(Duration::from_secs(5))).unwrap();
        match c.health() {
            Err(ClientError::Agent(m)) => assert_eq!(m, "nope"),
            r => panic!("expected agent error, got {r:?}"),
        }
        t.join().unwrap();
    }

    #[test]
    fn silent_agent_times_out() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = AgentClient::from_stream(a, Some(Duration::from_millis(100))).unwrap();
        assert!(matches!(c.health(), Err(ClientError::Timeout(_))));
    }
}
