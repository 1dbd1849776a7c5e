//! The host <-> agent wire protocol.
//!
//! # Framing
//! Every message is one frame: a 4-byte big-endian length `N` followed by
//! `N` bytes of UTF-8 JSON. `N` is at most [`MAX_FRAME_LEN`]; a peer that
//! announces a larger frame gets an error and the connection is closed
//! (there is no way to resynchronise on a byte stream after that).
//!
//! # Messages
//! The host sends [`Request`]s, the agent answers each with exactly one
//! [`Response`], in order, on the same connection. Both are JSON objects
//! tagged by a `"type"` field in snake_case, for example
//! `{"type":"health"}` or `{"type":"exec","argv":["/bin/true"]}`.
//! Byte strings (stdin, stdout, stderr) are standard base64 with padding.
//!
//! Unknown fields are ignored, so either side may add optional fields
//! without bumping [`PROTOCOL_VERSION`]; incompatible changes bump it.
//! The version is reported by `Health` and by the ready `Hello`.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Version of this protocol; reported in [`HealthInfo::protocol_version`].
pub const PROTOCOL_VERSION: u32 = 1;

/// Version of the agent (the crate version).
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// vsock port the agent listens on (host connects: `CONNECT 52\n`).
pub const AGENT_PORT: u32 = 52;

/// vsock port on the host (CID 2) the agent connects to once it is serving,
/// to send one [`Response::Hello`] frame. With Firecracker-style vsock the
/// host listens on the unix socket `<uds_path>_53`.
pub const READY_PORT: u32 = 53;

/// The well-known vsock CID of the host.
pub const HOST_CID: u32 = 2;

/// Largest frame body accepted or produced (64 MiB).
pub const MAX_FRAME_LEN: usize = 64 << 20;

/// Captured stdout and stderr are each cut at this many bytes (the rest is
/// read and discarded, and [`ExecResult::truncated`] is set). Two full
/// streams in base64 still fit in one frame.
pub const MAX_OUTPUT_LEN: usize = 16 << 20;

/// Errors of the framing layer.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: usize, max: usize },
    #[error("connection closed in the middle of a frame ({got} of {want} bytes)")]
    Truncated { got: usize, want: usize },
    #[error("invalid JSON message: {0}")]
    Json(#[from] serde_json::Error),
}

/// A request from the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Liveness and identity: answered with [`Response::Health`].
    Health,
    /// Run a program: answered with [`Response::Exec`] (or `Error` if it
    /// could not be started).
    Exec(ExecRequest),
    /// Flush filesystems and stop the VM: answered with [`Response::Ack`],
    /// then the agent calls `sync()` and `reboot()`.
    Shutdown,
    /// Like `Shutdown` but asks for a reboot. On a Firecracker-like VMM a
    /// guest reboot ends the VMM process, so both end the VM there.
    Reboot,
    /// Sent by the host right after a restore: mix `entropy` into the
    /// kernel's RNG (and reseed it) and set the clock, so clones of one
    /// snapshot share no secrets and keep the right time. Answered with
    /// [`Response::Ack`] (or `Error` if the refresh failed).
    ///
    /// It is also the agent's "restored" signal (send it once after every
    /// restore): a SnapStart runtime parked on `GET .../restore/next` gets
    /// its answer after the refresh and before the `Ack`, and then runs its
    /// after-restore hooks (the `Ack` does not wait for them; an `Invoke`
    /// waits for the runtime's next `invocation/next` anyway).
    Refresh {
        #[serde(with = "b64")]
        entropy: Vec<u8>,
        /// Host CLOCK_REALTIME in nanoseconds since the epoch.
        realtime_ns: u64,
    },
    /// Start the function's runtime under the Lambda Runtime API: answered
    /// with [`Response::RuntimeReady`] once the runtime first asks for an
    /// invocation (`GET .../invocation/next`) or, with
    /// `AWS_LAMBDA_INITIALIZATION_TYPE=snap-start`, for the restore
    /// (`GET .../restore/next`, parked until the next `Refresh`); or with
    /// [`Response::InitError`]. At most one runtime per agent.
    StartRuntime(RuntimeSpec),
    /// Hand one event to the runtime: answered with [`Response::Invoked`]
    /// when the runtime posts its response or error (or exits). One at a
    /// time; a second concurrent `Invoke` gets `Error`. A SnapStart runtime
    /// still parked on `restore/next` (no `Refresh` came) is released
    /// first; one that posted `restore/error` fails every `Invoke` with
    /// [`InvokeStatus::RuntimeExited`] and the posted error.
    Invoke(InvokeRequest),
}

/// Parameters of [`Request::StartRuntime`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeSpec {
    /// The runtime process: `["/var/task/bootstrap"]` for `provided`,
    /// `["/usr/bin/python3", "-m", "awslambdaric", "app.handler"]` for
    /// Python. Must not be empty.
    pub argv: Vec<String>,
    /// The runtime's whole environment apart from what the agent adds
    /// (`AWS_LAMBDA_RUNTIME_API`): the Lambda variables (`_HANDLER`,
    /// `AWS_LAMBDA_FUNCTION_NAME`, ...) and the function's own.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Block device holding the function code (ext4, mounted read-only at
    /// `task_root`), e.g. `/dev/vdb`. None: the code is already there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_device: Option<String>,
    /// Where the code is (`LAMBDA_TASK_ROOT`, default `/var/task`); also
    /// the runtime's working directory.
    #[serde(default = "default_task_root")]
    pub task_root: String,
    /// Run the runtime with this uid/gid (Lambda runs functions unprivileged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// Give up on the init phase after this long (the runtime is killed and
    /// `InitError` with `Runtime.InitTimeout` comes back). None: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_timeout_ms: Option<u64>,
    /// Address the guest's network interface before the runtime starts
    /// (None: leave the network alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<GuestNetwork>,
}

/// An IPv4 configuration for one guest interface: the logical address a
/// function's snapshot keeps, whatever host its clones run on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNetwork {
    /// Interface name in the guest, e.g. `eth0`.
    pub interface: String,
    pub address: std::net::Ipv4Addr,
    /// Prefix length of the interface's subnet (1 to 32).
    pub prefix_len: u8,
    /// Default route via this address (None: no default route).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<std::net::Ipv4Addr>,
}

fn default_task_root() -> String {
    "/var/task".to_string()
}

/// Parameters of [`Request::Invoke`]; they become the `Lambda-Runtime-*`
/// headers of the runtime's `invocation/next` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvokeRequest {
    /// `Lambda-Runtime-Aws-Request-Id`.
    pub request_id: String,
    /// The event, as the body of `invocation/next`.
    #[serde(with = "b64")]
    pub payload: Vec<u8>,
    /// `Lambda-Runtime-Deadline-Ms`: milliseconds since the epoch.
    pub deadline_ms: u64,
    /// `Lambda-Runtime-Invoked-Function-Arn`.
    pub invoked_function_arn: String,
    /// `Lambda-Runtime-Trace-Id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// `Lambda-Runtime-Client-Context` (JSON text), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_context: Option<String>,
    /// `Lambda-Runtime-Cognito-Identity` (JSON text), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cognito_identity: Option<String>,
}

/// How an invocation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InvokeStatus {
    /// The runtime posted `invocation/{id}/response`.
    Success,
    /// The runtime posted `invocation/{id}/error`.
    FunctionError,
    /// The runtime exited (or crashed) before answering, or its
    /// after-restore hooks failed (`restore/error`); the agent cannot
    /// serve further invocations and the instance should be discarded.
    RuntimeExited,
}

/// Answer to [`Request::Invoke`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvokeResult {
    pub status: InvokeStatus,
    /// The response body, or the error body (`{"errorMessage":..,
    /// "errorType":..,"stackTrace":[..]}`) as the runtime posted it; for
    /// `RuntimeExited` an error body made by the agent, or the body of the
    /// runtime's `restore/error`.
    #[serde(with = "b64")]
    pub payload: Vec<u8>,
    /// `Lambda-Runtime-Function-Error-Type` header of an error post
    /// (invocation or `restore/error`), or `errorType` from its body, or
    /// `Runtime.ExitError` (exit) / `Runtime.Unknown` (restore error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_type: Option<String>,
    /// What the runtime wrote to stdout and stderr during this invocation
    /// (at most [`MAX_LOG_LEN`] bytes, the newest kept).
    #[serde(with = "b64")]
    pub log: Vec<u8>,
    /// From handing the event to `invocation/next` to the runtime's answer.
    pub duration_ms: u64,
}

/// Answer to [`Request::StartRuntime`] on success.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeReady {
    /// From spawning the runtime to its first `invocation/next` (or
    /// `restore/next`: before-snapshot hooks count as init, as in Lambda).
    pub init_duration_ms: u64,
    /// Output of the runtime during init.
    #[serde(with = "b64")]
    pub log: Vec<u8>,
}

/// Answer to [`Request::StartRuntime`] when init failed: the runtime posted
/// `init/error`, exited, or exceeded `init_timeout_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitFailure {
    /// `Lambda-Runtime-Function-Error-Type` or `errorType` of the post, or
    /// `Runtime.ExitError` / `Runtime.InitTimeout`.
    pub error_type: String,
    /// The error body posted by the runtime, or one made by the agent.
    #[serde(with = "b64")]
    pub payload: Vec<u8>,
    #[serde(with = "b64")]
    pub log: Vec<u8>,
}

/// Captured function output returned per invocation is cut to this size.
pub const MAX_LOG_LEN: usize = 1 << 20;

/// Largest invocation result the host reads: Lambda's 6 MB response and
/// [`MAX_LOG_LEN`] of log, both in base64, and the JSON around them. An
/// agent that sends more is broken or not ours; its frame is refused
/// before it is read.
pub const MAX_INVOKE_FRAME_LEN: usize = 12 << 20;

/// Parameters of [`Request::Exec`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH` if it has
    /// no slash. Must not be empty.
    pub argv: Vec<String>,
    /// Variables added to (or overriding) the agent's environment, which
    /// has `PATH` and `HOME` set.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Bytes written to the child's stdin, which is then closed. Without
    /// it stdin is an empty pipe (the child reads EOF at once).
    #[serde(default, with = "b64_opt", skip_serializing_if = "Option::is_none")]
    pub stdin: Option<Vec<u8>>,
    /// Kill the child's process group with SIGKILL after this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Working directory (default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

impl ExecRequest {
    /// A request running `argv` with no stdin, no timeout, default env.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            env: BTreeMap::new(),
            stdin: None,
            timeout_ms: None,
            cwd: None,
        }
    }

    /// Adds one environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Sets the bytes fed to stdin.
    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(data.into());
        self
    }

    /// Sets the timeout (rounded down to milliseconds).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout_ms = Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// Sets the working directory.
    pub fn cwd(mut self, dir: impl Into<String>) -> Self {
        self.cwd = Some(dir.into());
        self
    }
}

/// A response or unsolicited message from the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// Answer to [`Request::Health`].
    Health(HealthInfo),
    /// The one frame the agent sends on its own connection to
    /// [`HOST_CID`]:[`READY_PORT`] once it is serving on [`AGENT_PORT`].
    Hello(HealthInfo),
    /// Answer to [`Request::Exec`].
    Exec(ExecResult),
    /// Answer to `Shutdown` / `Reboot`, sent before acting on it.
    Ack,
    /// Answer to [`Request::StartRuntime`]: the runtime is waiting for its
    /// first event.
    RuntimeReady(RuntimeReady),
    /// Answer to [`Request::StartRuntime`]: init failed.
    InitError(InitFailure),
    /// Answer to [`Request::Invoke`].
    Invoked(InvokeResult),
    /// The request failed; the connection stays usable unless the framing
    /// itself was broken.
    Error { message: String },
}

/// Identity and uptime of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthInfo {
    pub protocol_version: u32,
    pub agent_version: String,
    /// Time since guest boot (CLOCK_BOOTTIME), in milliseconds.
    pub uptime_ms: u64,
    /// The agent's process id (1 when it runs as init).
    pub pid: u32,
}

impl HealthInfo {
    /// Information about the current process.
    pub fn current() -> HealthInfo {
        HealthInfo {
            protocol_version: PROTOCOL_VERSION,
            agent_version: AGENT_VERSION.to_string(),
            uptime_ms: uptime_ms(),
            pid: std::process::id(),
        }
    }
}

/// Outcome of [`Request::Exec`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    /// Exit status if the child exited normally.
    pub exit_code: Option<i32>,
    /// Signal number if the child was killed by a signal.
    pub signal: Option<i32>,
    #[serde(with = "b64")]
    pub stdout: Vec<u8>,
    #[serde(with = "b64")]
    pub stderr: Vec<u8>,
    /// The timeout expired before the child exited (it was then killed).
    pub timed_out: bool,
    /// Output beyond [`MAX_OUTPUT_LEN`] per stream was discarded.
    #[serde(default)]
    pub truncated: bool,
    /// Wall-clock time from spawn to the end of output collection.
    #[serde(default)]
    pub duration_ms: u64,
}

/// Milliseconds since boot (CLOCK_BOOTTIME), 0 if the clock is unavailable.
pub fn uptime_ms() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    match clock_gettime(ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => {
            let ms = ts.tv_sec() as i128 * 1000 + ts.tv_nsec() as i128 / 1_000_000;
            u64::try_from(ms).unwrap_or(0)
        }
        Err(_) => 0,
    }
}

/// Serialises `msg` into one frame (length prefix included).
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtocolError> {
    let mut buf = vec![0u8; 4];
    serde_json::to_writer(&mut buf, msg)?;
    let len = buf.len() - 4;
    if len > MAX_FRAME_LEN {
        return Err(ProtocolError::FrameTooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    // len <= MAX_FRAME_LEN < u32::MAX, so the cast is lossless.
    buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(buf)
}

/// Writes `msg` as one frame with a single `write_all` and flushes.
pub fn write_frame<W: Write + ?Sized, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> Result<(), ProtocolError> {
    let buf = encode_frame(msg)?;
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// Writes raw bytes as one frame body (for tests of malformed input).
pub fn write_frame_bytes<W: Write + ?Sized>(w: &mut W, body: &[u8]) -> Result<(), ProtocolError> {
    if body.len() > MAX_FRAME_LEN {
        return Err(ProtocolError::FrameTooLarge {
            len: body.len(),
            max: MAX_FRAME_LEN,
        });
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(body);
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame body. `Ok(None)` means the peer closed the stream
/// cleanly between frames.
pub fn read_frame_bytes<R: Read + ?Sized>(r: &mut R) -> Result<Option<Vec<u8>>, ProtocolError> {
    read_frame_bytes_limited(r, MAX_FRAME_LEN)
}

/// [`read_frame_bytes`] with a custom size limit.
pub fn read_frame_bytes_limited<R: Read + ?Sized>(
    r: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, ProtocolError> {
    let mut header = [0u8; 4];
    let got = read_full(r, &mut header)?;
    if got == 0 {
        return Ok(None);
    }
    if got < header.len() {
        return Err(ProtocolError::Truncated { got, want: 4 });
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(ProtocolError::FrameTooLarge { len, max });
    }
    // Grow with the data actually received rather than trusting `len`.
    let mut body = Vec::with_capacity(len.min(64 * 1024));
    r.take(len as u64).read_to_end(&mut body)?;
    if body.len() < len {
        return Err(ProtocolError::Truncated {
            got: body.len(),
            want: len,
        });
    }
    Ok(Some(body))
}

/// Reads and decodes one frame; `Ok(None)` on a clean end of stream.
pub fn read_frame<R: Read + ?Sized, T: DeserializeOwned>(
    r: &mut R,
) -> Result<Option<T>, ProtocolError> {
    match read_frame_bytes(r)? {
        None => Ok(None),
        Some(body) => Ok(Some(serde_json::from_slice(&body)?)),
    }
}

/// Fills `buf` unless EOF comes first; returns the number of bytes read.
fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// serde helper: `Vec<u8>` as a base64 string.
mod b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(|e| serde::de::Error::custom(format!("invalid base64: {e}")))
    }
}

/// serde helper: `Option<Vec<u8>>` as an optional base64 string.
mod b64_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => super::b64::serialize(b, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(with = "super::b64")] Vec<u8>);
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn round_trip<T>(msg: &T) -> T
    where
        T: Serialize + DeserializeOwned,
    {
        let mut buf = Vec::new();
        write_frame(&mut buf, msg).unwrap();
        let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
        assert_eq!(len, buf.len() - 4, "length prefix must match the body");
        let mut cur = Cursor::new(buf);
        let out = read_frame(&mut cur).unwrap().expect("one frame");
        assert!(
            read_frame_bytes(&mut cur).unwrap().is_none(),
            "clean EOF after the frame"
        );
        out
    }

    #[test]
    fn requests_round_trip() {
        let reqs = [
            Request::Health,
            Request::Shutdown,
            Request::Reboot,
            Request::Exec(
                ExecRequest::new(["/bin/sh", "-c", "cat"])
                    .env("A", "1")
                    .stdin(vec![0u8, 1, 2, 255])
                    .timeout(Duration::from_millis(1500))
                    .cwd("/tmp"),
            ),
            Request::Exec(ExecRequest::new(["true"])),
        ];
        for req in reqs {
            assert_eq!(round_trip(&req), req);
        }
    }

    #[test]
    fn responses_round_trip() {
        let resps = [
            Response::Health(HealthInfo::current()),
            Response::Hello(HealthInfo::current()),
            Response::Ack,
            Response::Error {
                message: "boom".into(),
            },
            Response::Exec(ExecResult {
                exit_code: Some(3),
                signal: None,
                stdout: b"hi\n".to_vec(),
                stderr: vec![0xff, 0x00],
                timed_out: false,
                truncated: false,
                duration_ms: 12,
            }),
        ];
        for resp in resps {
            assert_eq!(round_trip(&resp), resp);
        }
    }

    #[test]
    fn wire_format_is_stable() {
        assert_eq!(
            serde_json::to_string(&Request::Health).unwrap(),
            r#"{"type":"health"}"#
        );
        let req = Request::Exec(ExecRequest::new(["cat"]).stdin(b"hi".to_vec()));
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"type":"exec","argv":["cat"],"stdin":"aGk="}"#
        );
        let parsed: Request = serde_json::from_str(
            r#"{"type":"exec","argv":["x"],"env":{"K":"V"},"timeout_ms":5,"cwd":"/","stdin":null,"future":1}"#,
        )
        .unwrap();
        let Request::Exec(e) = parsed else {
            panic!("expected exec, got {parsed:?}")
        };
        assert_eq!(e.env.get("K").map(String::as_str), Some("V"));
        assert_eq!(e.timeout_ms, Some(5));
        assert_eq!(e.stdin, None);
        let err: Response = serde_json::from_str(r#"{"type":"error","message":"m"}"#).unwrap();
        assert_eq!(
            err,
            Response::Error {
                message: "m".into()
            }
        );
    }

    #[test]
    fn bad_base64_is_rejected() {
        let r: Result<Request, _> =
            serde_json::from_str(r#"{"type":"exec","argv":["x"],"stdin":"!!!"}"#);
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains("base64"), "{msg}");
    }

    #[test]
    fn oversized_frame_is_refused_without_reading_body() {
        let mut data = (MAX_FRAME_LEN as u32 + 1).to_be_bytes().to_vec();
        data.extend_from_slice(b"{}");
        let mut cur = Cursor::new(data);
        match read_frame_bytes(&mut cur) {
            Err(ProtocolError::FrameTooLarge { len, max }) => {
                assert_eq!(len, MAX_FRAME_LEN + 1);
                assert_eq!(max, MAX_FRAME_LEN);
            }
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        assert_eq!(cur.position(), 4, "the body must not be read");

        let mut cur = Cursor::new(u32::MAX.to_be_bytes().to_vec());
        assert!(matches!(
            read_frame_bytes(&mut cur),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
        // A custom limit applies too.
        let mut buf = Vec::new();
        write_frame_bytes(&mut buf, b"0123456789").unwrap();
        assert!(matches!(
            read_frame_bytes_limited(&mut Cursor::new(buf), 9),
            Err(ProtocolError::FrameTooLarge { len: 10, max: 9 })
        ));
    }

    #[test]
    fn oversized_body_is_not_written() {
        let body = vec![b' '; MAX_FRAME_LEN + 1];
        let mut out = Vec::new();
        assert!(matches!(
            write_frame_bytes(&mut out, &body),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn truncated_frames_are_errors() {
        let mut cur = Cursor::new(vec![0u8, 0]);
        assert!(matches!(
            read_frame_bytes(&mut cur),
            Err(ProtocolError::Truncated { got: 2, want: 4 })
        ));
        let mut data = 10u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"abc");
        assert!(matches!(
            read_frame_bytes(&mut Cursor::new(data)),
            Err(ProtocolError::Truncated { got: 3, want: 10 })
        ));
    }

    #[test]
    fn empty_stream_is_clean_eof() {
        assert!(read_frame_bytes(&mut Cursor::new(Vec::new()))
            .unwrap()
            .is_none());
    }

    #[test]
    fn uptime_is_monotonic_and_positive() {
        let a = uptime_ms();
        std::thread::sleep(Duration::from_millis(20));
        let b = uptime_ms();
        assert!(a > 0);
        assert!(b >= a + 15, "a={a} b={b}");
    }
}
