//! The agent's side of the protocol, generic over the byte stream so that
//! the same code serves vsock in the guest and unix sockets / in-memory
//! buffers in tests.

use std::io::{Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use crate::protocol::{
    read_frame_bytes, write_frame, HealthInfo, ProtocolError, Request, Response,
};
use crate::runtime::{RuntimeConfig, RuntimeHost};

/// What `Shutdown` / `Reboot` ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    Shutdown,
    Reboot,
}

/// Called after the `Ack` for a power request was sent. As PID 1 this
/// syncs and reboots; in test mode it may just end the process.
pub type PowerHandler = Arc<dyn Fn(PowerAction) + Send + Sync>;

/// Shared server state (cheap to clone into connection threads).
#[derive(Clone)]
pub struct Agent {
    power: PowerHandler,
    runtime: Arc<RuntimeHost>,
}

impl Agent {
    /// An agent whose Runtime API listens on Lambda's 127.0.0.1:9001.
    pub fn new(power: PowerHandler) -> Agent {
        Agent::with_runtime(power, RuntimeConfig::default())
    }

    /// An agent with its own Runtime API settings (tests pick a port).
    pub fn with_runtime(power: PowerHandler, config: RuntimeConfig) -> Agent {
        Agent {
            power,
            runtime: Arc::new(RuntimeHost::new(config)),
        }
    }

    /// Answers one request. Never panics: a panic inside becomes an
    /// `Error` response.
    pub fn handle(&self, req: Request) -> Response {
        let result = catch_unwind(AssertUnwindSafe(|| match req {
            Request::Health => Response::Health(HealthInfo::current()),
            Request::Exec(exec) => match crate::exec::run(&exec) {
                Ok(r) => Response::Exec(r),
                Err(e) => Response::Error {
                    message: e.to_string(),
                },
            },
            Request::Refresh {
                entropy,
                realtime_ns,
            } => {
                let applied = crate::refresh::apply(&entropy, realtime_ns);
                // Refresh is also the sign that this is a restored clone:
                // a SnapStart runtime's restore/next is answered now (even
                // if the refresh failed: the restore did happen, and the
                // host learns of the failure from the Error).
                self.runtime.restored();
                match applied {
                    Ok(()) => Response::Ack,
                    Err(message) => Response::Error { message },
                }
            }
            // The action itself runs after the Ack is on the wire.
            Request::Shutdown | Request::Reboot => Response::Ack,
            Request::StartRuntime(spec) => self.runtime.start(spec),
            Request::Invoke(ev) => self.runtime.invoke(ev),
        }));
        result.unwrap_or_else(|p| Response::Error {
            message: format!("internal error: {}", panic_message(&p)),
        })
    }

    /// Serves requests from `reader`, answering on `writer`, until the peer
    /// closes the stream (`Ok`) or the stream breaks (`Err`). A frame that
    /// is not a valid request gets an `Error` reply and the loop goes on; an
    /// oversized or truncated frame gets an `Error` reply (if possible) and
    /// ends the connection, since the stream cannot be resynchronised.
    pub fn serve_connection<R: Read, W: Write>(
        &self,
        mut reader: R,
        mut writer: W,
    ) -> Result<(), ProtocolError> {
        loop {
            let body = match read_frame_bytes(&mut reader) {
                Ok(Some(body)) => body,
                Ok(None) => return Ok(()),
                Err(ProtocolError::Io(e)) => return Err(ProtocolError::Io(e)),
                Err(e) => {
                    let _ = write_frame(
                        &mut writer,
                        &Response::Error {
                            message: format!("{e}; closing the connection"),
                        },
                    );
                    return Err(e);
                }
            };
            let (resp, power) = match serde_json::from_slice::<Request>(&body) {
                Ok(req) => {
                    let power = match req {
                        Request::Shutdown => Some(PowerAction::Shutdown),
                        Request::Reboot => Some(PowerAction::Reboot),
                        _ => None,
                    };
                    (self.handle(req), power)
                }
                Err(e) => (
                    Response::Error {
                        message: format!("invalid request: {e}"),
                    },
                    None,
                ),
            };
            write_frame(&mut writer, &resp)?;
            if let Some(action) = power {
                (self.power)(action);
            }
        }
    }
}

/// Text of a panic payload.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{read_frame, write_frame_bytes, MAX_FRAME_LEN};
    use std::io::Cursor;
    use std::sync::Mutex;

    fn agent_recording() -> (Agent, Arc<Mutex<Vec<PowerAction>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l2 = log.clone();
        let agent = Agent::new(Arc::new(move |a| l2.lock().unwrap().push(a)));
        (agent, log)
    }

    fn responses(out: Vec<u8>) -> Vec<Response> {
        let mut cur = Cursor::new(out);
        let mut v = Vec::new();
        while let Some(r) = read_frame::<_, Response>(&mut cur).unwrap() {
            v.push(r);
        }
        v
    }

    #[test]
    fn malformed_json_gets_error_and_connection_continues() {
        let (agent, _) = agent_recording();
        let mut input = Vec::new();
        write_frame_bytes(&mut input, b"{not json").unwrap();
        write_frame_bytes(&mut input, br#"{"type":"no_such_request"}"#).unwrap();
        write_frame(&mut input, &Request::Health).unwrap();
        let mut out = Vec::new();
        agent
            .serve_connection(Cursor::new(input), &mut out)
            .unwrap();
        let resps = responses(out);
        assert_eq!(resps.len(), 3, "{resps:?}");
        match &resps[0] {
            Response::Error { message } => {
                assert!(message.contains("invalid request"), "{message}")
            }
            r => panic!("expected error, got {r:?}"),
        }
        match &resps[1] {
            Response::Error { message } => {
                assert!(message.contains("no_such_request"), "{message}")
            }
            r => panic!("expected error, got {r:?}"),
        }
        match &resps[2] {
            Response::Health(h) => {
                assert_eq!(h.protocol_version, crate::protocol::PROTOCOL_VERSION);
                assert_eq!(h.pid, std::process::id());
            }
            r => panic!("expected health, got {r:?}"),
        }
    }

    #[test]
    fn oversized_frame_gets_error_then_close() {
        let (agent, _) = agent_recording();
        let mut input = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes().to_vec();
        // A request after it must not be served: the stream is unusable.
        write_frame(&mut input, &Request::Health).unwrap();
        let mut out = Vec::new();
        let res = agent.serve_connection(Cursor::new(input), &mut out);
        assert!(matches!(res, Err(ProtocolError::FrameTooLarge { .. })));
        let resps = responses(out);
        assert_eq!(resps.len(), 1);
        match &resps[0] {
            Response::Error { message } => assert!(message.contains("exceeds"), "{message}"),
            r => panic!("expected error, got {r:?}"),
        }
    }

    #[test]
    fn power_requests_ack_then_act() {
        let (agent, log) = agent_recording();
        let mut input = Vec::new();
        write_frame(&mut input, &Request::Reboot).unwrap();
        write_frame(&mut input, &Request::Shutdown).unwrap();
        let mut out = Vec::new();
        agent
            .serve_connection(Cursor::new(input), &mut out)
            .unwrap();
        assert_eq!(responses(out), vec![Response::Ack, Response::Ack]);
        assert_eq!(
            *log.lock().unwrap(),
            vec![PowerAction::Reboot, PowerAction::Shutdown]
        );
    }

    #[test]
    fn empty_argv_is_an_error_reply() {
        let (agent, _) = agent_recording();
        let resp = agent.handle(Request::Exec(crate::protocol::ExecRequest::new(Vec::<
            String,
        >::new(
        ))));
        match resp {
            Response::Error { message } => assert!(message.contains("argv"), "{message}"),
            r => panic!("expected error, got {r:?}"),
        }
    }
}
