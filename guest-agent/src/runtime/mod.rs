//! The AWS Lambda Runtime API inside the guest: `StartRuntime` spawns the
//! function's runtime, `Invoke` hands it one event, and the runtime talks
//! to us over HTTP as it would to Lambda.
//!
//! * [`state`]: the life cycle as a pure state machine (including the
//!   SnapStart restore handshake: `restore/next`, `restore/error`).
//! * [`http`]: the Runtime API server (`AWS_LAMBDA_RUNTIME_API`).
//! * [`process`]: spawning the runtime, its output, its exit.
//!
//! Threads meet in [`Shared`]: one mutex over the machine and one condvar
//! that is signalled whenever an outcome (init or invocation) is recorded.
//! Nothing polls or sleeps; waiters block on the condvar.
//!
//! Logs: each answer takes the output collected since the previous answer
//! (so output a runtime writes after posting a response comes back with
//! the next invocation, as in Lambda's logs), draining the pipe first.

pub mod http;
pub mod process;
pub mod state;

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::protocol::{InitFailure, InvokeRequest, Response, RuntimeSpec};
use crate::reaper::Reaper;
use state::{error_body, Dispatch, Machine, Phase};

/// Where the Runtime API listens in the guest (Lambda's own address).
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:9001";

/// How the agent runs runtimes.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// The Runtime API's listening address (port 0: any free port; the
    /// runtime is told the real one).
    pub api_addr: SocketAddr,
    /// Mount `code_device` and configure `network` (only as PID 1, which
    /// may).
    pub mount_code: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            api_addr: DEFAULT_API_ADDR.parse().expect("valid constant address"),
            mount_code: std::process::id() == 1,
        }
    }
}

/// State shared by the host connections, the HTTP thread and the monitor.
pub struct Shared {
    inner: Mutex<Inner>,
    changed: Condvar,
}

pub struct Inner {
    pub machine: Machine<tiny_http::Request>,
    /// Read end of the runtime's stdout+stderr pipe, once spawned.
    output: Option<Arc<OwnedFd>>,
    output_open: bool,
    /// The runtime's pid (= process group), once spawned.
    pid: Option<i32>,
    /// Its exit status was collected: the pid may be reused, never signal it.
    exited: bool,
    buf: Vec<u8>,
}

impl Inner {
    /// Pulls pending runtime output into the log (see `process`).
    pub fn drain(&mut self) {
        if let (Some(fd), true) = (&self.output, self.output_open) {
            if self.buf.is_empty() {
                self.buf = vec![0u8; 64 * 1024];
            }
            self.output_open = process::drain(fd, &mut self.machine, &mut self.buf);
        }
    }

    fn kill(&self) {
        if let (Some(pid), false) = (self.pid, self.exited) {
            Reaper::global().kill_group(pid, Signal::SIGKILL);
        }
    }
}

impl Shared {
    fn new() -> Shared {
        Shared {
            inner: Mutex::new(Inner {
                machine: Machine::default(),
                output: None,
                output_open: false,
                pid: None,
                exited: false,
                buf: Vec::new(),
            }),
            changed: Condvar::new(),
        }
    }

    /// Poisoning is ignored: every update leaves the machine consistent,
    /// and PID 1 must go on after a panic in some thread.
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, Inner>) -> MutexGuard<'a, Inner> {
        self.changed.wait(g).unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes whoever waits for an outcome.
    pub fn notify(&self) {
        self.changed.notify_all();
    }
}

/// The agent's one runtime (see the module docs).
pub struct RuntimeHost {
    config: RuntimeConfig,
    shared: Arc<Shared>,
    /// The bound Runtime API address, once the server runs.
    api: OnceLock<SocketAddr>,
}

fn error(message: impl Into<String>) -> Response {
    Response::Error {
        message: message.into(),
    }
}

/// Answers a parked `GET /restore/next`. If the runtime's connection is
/// gone there is nothing to do: an `Invoke` then gets the runtime's exit
/// or waits for its next `GET /next`.
fn release(parked: tiny_http::Request) {
    if let Err(e) = http::send_restored(parked) {
        crate::log(&format!("answering the runtime's restore/next: {e}"));
    }
}

/// Header values must not break the HTTP framing.
fn header_safe(s: &str) -> bool {
    !s.contains(['\r', '\n', '\0'])
}

impl RuntimeHost {
    pub fn new(config: RuntimeConfig) -> RuntimeHost {
        RuntimeHost {
            config,
            shared: Arc::new(Shared::new()),
            api: OnceLock::new(),
        }
    }

    /// `StartRuntime`: blocks until init ends one way or the other.
    pub fn start(&self, spec: RuntimeSpec) -> Response {
        if let Err(e) = process::validate(&spec) {
            return error(e);
        }
        if let Err(e) = self.shared.lock().machine.start() {
            return error(e);
        }
        let fail = |msg: String| {
            self.shared.lock().machine.start_failed();
            error(msg)
        };
        if let Some(net) = &spec.network {
            if !self.config.mount_code {
                return fail("the network can only be configured when the agent is PID 1".into());
            }
            if let Err(e) = crate::netconfig::configure(net) {
                return fail(format!("network: {e}"));
            }
        }
        if let Some(dev) = &spec.code_device {
            if !self.config.mount_code {
                return fail("code_device can only be mounted when the agent is PID 1".into());
            }
            if let Err(e) = process::mount_code(dev, &spec.task_root) {
                return fail(e);
            }
        }
        let api = match self.api.get() {
            Some(a) => *a,
            None => match http::serve(self.config.api_addr, self.shared.clone()) {
                Ok(a) => *self.api.get_or_init(|| a),
                Err(e) => return fail(format!("Runtime API on {}: {e}", self.config.api_addr)),
            },
        };
        let started = Instant::now();
        let spawned = match process::spawn(&spec, &api.to_string()) {
            Ok(s) => s,
            Err(e) => {
                // Lambda's error for a bootstrap that cannot be executed.
                self.shared.lock().machine.start_failed();
                let t = "Runtime.InvalidEntrypoint";
                let msg = format!("cannot start {:?}: {e}", spec.argv[0]);
                return Response::InitError(InitFailure {
                    error_type: t.into(),
                    payload: error_body(t, &msg),
                    log: Vec::new(),
                });
            }
        };
        let output = Arc::new(spawned.output);
        {
            let mut inner = self.shared.lock();
            inner.output = Some(output.clone());
            inner.output_open = true;
            inner.pid = Some(spawned.pid);
            inner.machine.spawned(started);
        }
        let (shared, pid, exited) = (self.shared.clone(), spawned.pid, spawned.exited);
        let monitor = std::thread::Builder::new()
            .name("runtime-monitor".into())
            .spawn(move || process::monitor(shared, pid, output, exited));
        if let Err(e) = monitor {
            let inner = self.shared.lock();
            inner.kill();
            drop(inner);
            return fail(format!("cannot start the runtime monitor thread: {e}"));
        }
        self.wait_init(&spec, started)
    }

    fn wait_init(&self, spec: &RuntimeSpec, started: Instant) -> Response {
        let deadline = spec
            .init_timeout_ms
            .map(|ms| started + Duration::from_millis(ms));
        let mut inner = self.shared.lock();
        let outcome = loop {
            if let Some(o) = inner.machine.take_init() {
                break o;
            }
            match deadline {
                None => inner = self.shared.wait(inner),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        inner.drain();
                        inner
                            .machine
                            .init_timeout(spec.init_timeout_ms.unwrap_or(0));
                        continue;
                    }
                    inner = self
                        .shared
                        .changed
                        .wait_timeout(inner, d - now)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0);
                }
            }
        };
        match outcome {
            Ok(ready) => Response::RuntimeReady(ready),
            Err(failure) => {
                // Lambda resets the sandbox after a failed init; at least
                // nothing of the runtime keeps running here.
                inner.kill();
                Response::InitError(failure)
            }
        }
    }

    /// `Invoke`: blocks until the runtime answers or exits.
    pub fn invoke(&self, req: InvokeRequest) -> Response {
        let fields = [
            Some(&req.request_id),
            Some(&req.invoked_function_arn),
            req.trace_id.as_ref(),
            req.client_context.as_ref(),
            req.cognito_identity.as_ref(),
        ];
        if req.request_id.is_empty()
            || req.request_id.contains('/')
            || !fields.into_iter().flatten().all(|s| header_safe(s))
        {
            return error(
                "Invoke: request_id must be non-empty without '/', and no field may contain CR, LF or NUL",
            );
        }
        let dispatch = self.shared.lock().machine.invoke(req, Instant::now());
        match dispatch {
            Err(e) => return error(e),
            Ok(Dispatch::Wait) => {}
            Ok(Dispatch::Release(parked)) => {
                crate::log("Invoke before any Refresh: releasing the runtime's restore/next");
                release(parked);
            }
            Ok(Dispatch::Deliver(parked, ev)) => {
                if let Err(e) = http::send_event(parked, &ev) {
                    crate::log(&format!(
                        "handing event {} to the runtime: {e}; keeping it for its next request",
                        ev.request_id
                    ));
                    self.shared.lock().machine.requeue(ev);
                }
            }
        }
        let mut inner = self.shared.lock();
        loop {
            if let Some(out) = inner.machine.take_outcome() {
                return Response::Invoked(out);
            }
            inner = self.shared.wait(inner);
        }
    }

    /// The sandbox was restored from a snapshot (the host's `Refresh`):
    /// answers a SnapStart runtime's parked `GET /restore/next`, so it
    /// runs its after-restore hooks. Does not wait for them: an `Invoke`
    /// waits for the runtime's next `GET /next` anyway.
    pub fn restored(&self) {
        let parked = self.shared.lock().machine.restored();
        if let Some(p) = parked {
            release(p);
        }
    }

    /// The runtime's phase (for tests and diagnostics).
    pub fn phase(&self) -> Phase {
        self.shared.lock().machine.phase()
    }
}

#[cfg(test)]
mod tests;
