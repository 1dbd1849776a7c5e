//! Ember guest agent: PID 1 of the microVM, serving the host over vsock.
//!
//! * [`protocol`]: frames and messages (shared by both sides).
//! * [`client`]: the host side (vsock-over-unix-socket handshake, calls).
//! * [`server`]: the agent side, generic over the byte stream.
//! * [`exec`], [`reaper`]: running programs as PID 1 without losing exit
//!   statuses to the orphan reaper.
//! * [`runtime`]: the AWS Lambda Runtime API for `StartRuntime` / `Invoke`.
//! * [`init`]: PID 1 duties (mounts, console, hostname, power off) and the
//!   accept loops used by the `ember-agent` binary.

pub mod client;
pub mod exec;
pub mod init;
pub mod netconfig;
pub mod protocol;
pub mod reaper;
pub mod refresh;
pub mod runtime;
pub mod server;

pub use client::{
    bind_ready_listener, host_port_socket_path, wait_ready, AgentClient, ClientError,
};
pub use protocol::{
    ExecRequest, ExecResult, GuestNetwork, HealthInfo, InitFailure, InvokeRequest, InvokeResult,
    InvokeStatus, ProtocolError, Request, Response, RuntimeReady, RuntimeSpec, AGENT_PORT,
    AGENT_VERSION, HOST_CID, MAX_FRAME_LEN, MAX_LOG_LEN, MAX_OUTPUT_LEN, PROTOCOL_VERSION,
    READY_PORT,
};
pub use server::{Agent, PowerAction};

/// Writes `ember-agent: <msg>` to stderr (the console when running as
/// init) with a single write, since every syscall is slow in the guest.
pub fn log(msg: &str) {
    use std::io::Write;
    let line = format!("ember-agent: {msg}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}
