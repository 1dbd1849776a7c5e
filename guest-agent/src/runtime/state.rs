//! The runtime's life cycle as a pure state machine: no threads, no I/O,
//! no clocks of its own, so every transition is unit-tested.
//!
//! `P` is a parked `GET /next` (a `tiny_http::Request` in the agent, a
//! plain number in tests). The machine never answers HTTP itself: it hands
//! the parked request back to the caller together with what to send, so
//! socket writes happen outside the lock that guards the machine.

use std::time::Instant;

use crate::protocol::{
    InitFailure, InvokeRequest, InvokeResult, InvokeStatus, RuntimeReady, MAX_LOG_LEN,
};

/// Where the runtime is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No `StartRuntime` yet.
    Idle,
    /// Spawned, waiting for its first `GET /next`.
    Init,
    /// Initialised; events can be handed over.
    Ready,
    /// Init failed (init/error, timeout, exit during init, spawn failure).
    Failed,
    /// The runtime exited after init; nothing more can be served.
    Exited,
}

/// An HTTP-level refusal for the runtime, shaped like Lambda's own
/// (`{"errorMessage":..,"errorType":..}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub error_type: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, error_type: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            error_type,
            message: message.into(),
        }
    }

    /// The JSON body sent to the runtime.
    pub fn body(&self) -> Vec<u8> {
        error_body(self.error_type, &self.message)
    }

    fn invalid_state(what: &str, phase: Phase) -> ApiError {
        ApiError::new(
            403,
            "InvalidStateTransition",
            format!("{what} is not allowed in state {phase:?}"),
        )
    }
}

/// `{"errorMessage":..,"errorType":..}` as Lambda writes it.
pub fn error_body(error_type: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "errorMessage": message,
        "errorType": error_type,
    }))
    .unwrap_or_default()
}

/// What to do with a `GET /next`.
#[derive(Debug, PartialEq, Eq)]
pub enum Next<P> {
    /// Keep it until an event comes; an earlier parked request that it
    /// replaces (a runtime that reconnected) must be refused.
    Parked { displaced: Option<P> },
    /// Answer it now with this event.
    Deliver(P, InvokeRequest),
    /// Answer it with this error.
    Reject(P, ApiError),
}

/// Function output, keeping the newest [`MAX_LOG_LEN`] bytes: the end of
/// a log (the error, the last lines) matters most.
#[derive(Debug, Default)]
pub struct LogBuf {
    data: Vec<u8>,
}

impl LogBuf {
    pub fn push(&mut self, bytes: &[u8]) {
        if bytes.len() >= MAX_LOG_LEN {
            self.data.clear();
            self.data
                .extend_from_slice(&bytes[bytes.len() - MAX_LOG_LEN..]);
            return;
        }
        let overflow = (self.data.len() + bytes.len()).saturating_sub(MAX_LOG_LEN);
        if overflow > 0 {
            self.data.drain(..overflow);
        }
        self.data.extend_from_slice(bytes);
    }

    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.data)
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// The event currently in the runtime's hands.
#[derive(Debug)]
struct Current {
    id: String,
    since: Instant,
}

/// See the module docs.
#[derive(Debug)]
pub struct Machine<P> {
    phase: Phase,
    spawned_at: Option<Instant>,
    parked: Option<P>,
    /// An `Invoke` waiting for a `GET /next`.
    queued: Option<InvokeRequest>,
    current: Option<Current>,
    /// An `Invoke` request is in flight (from `invoke` until its outcome
    /// is taken).
    busy: bool,
    outcome: Option<InvokeResult>,
    init_outcome: Option<Result<RuntimeReady, InitFailure>>,
    /// The runtime's output not yet returned to the host.
    pub log: LogBuf,
    /// Lambda's text for how the runtime ended ("exit status 1").
    exit: Option<String>,
}

impl<P> Default for Machine<P> {
    fn default() -> Self {
        Machine {
            phase: Phase::Idle,
            spawned_at: None,
            parked: None,
            queued: None,
            current: None,
            busy: false,
            outcome: None,
            init_outcome: None,
            log: LogBuf::default(),
            exit: None,
        }
    }
}

fn ms_since(t: Instant, now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(t).as_millis()).unwrap_or(u64::MAX)
}

impl<P> Machine<P> {
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// `StartRuntime`: only once per agent.
    pub fn start(&mut self) -> Result<(), String> {
        match self.phase {
            Phase::Idle => {
                self.phase = Phase::Init;
                Ok(())
            }
            p => Err(format!(
                "a runtime was already started (state {p:?}); at most one per agent"
            )),
        }
    }

    /// The process now runs; init time counts from here.
    pub fn spawned(&mut self, now: Instant) {
        self.spawned_at = Some(now);
    }

    /// Setting up or spawning failed before the runtime ever ran.
    pub fn start_failed(&mut self) {
        self.phase = Phase::Failed;
    }

    fn fail_init(&mut self, error_type: String, payload: Vec<u8>) {
        self.phase = Phase::Failed;
        self.init_outcome = Some(Err(InitFailure {
            error_type,
            payload,
            log: self.log.take(),
        }));
    }

    /// The outcome of init, once known (taken once).
    pub fn take_init(&mut self) -> Option<Result<RuntimeReady, InitFailure>> {
        self.init_outcome.take()
    }

    /// `GET /next`.
    pub fn next(&mut self, p: P, now: Instant) -> Next<P> {
        match self.phase {
            Phase::Init => {
                self.phase = Phase::Ready;
                self.init_outcome = Some(Ok(RuntimeReady {
                    init_duration_ms: self.spawned_at.map_or(0, |t| ms_since(t, now)),
                    log: self.log.take(),
                }));
            }
            Phase::Ready => {}
            phase => return Next::Reject(p, ApiError::invalid_state("invocation/next", phase)),
        }
        if let Some(cur) = &self.current {
            // Lambda's runtime must answer before asking for more.
            let msg = format!(
                "invocation/next while invocation {} is not answered yet",
                cur.id
            );
            return Next::Reject(p, ApiError::new(403, "InvalidStateTransition", msg));
        }
        match self.queued.take() {
            Some(ev) => {
                self.current = Some(Current {
                    id: ev.request_id.clone(),
                    since: now,
                });
                Next::Deliver(p, ev)
            }
            None => Next::Parked {
                displaced: self.parked.replace(p),
            },
        }
    }

    /// `Invoke`: `Ok(Some)` hands the event to a parked `GET /next` now;
    /// `Ok(None)` keeps it for the next one. Either way the caller then
    /// waits for [`Machine::take_outcome`].
    pub fn invoke(
        &mut self,
        ev: InvokeRequest,
        now: Instant,
    ) -> Result<Option<(P, InvokeRequest)>, String> {
        match self.phase {
            Phase::Ready => {}
            Phase::Idle => return Err("no runtime: send StartRuntime first".into()),
            Phase::Init => return Err("the runtime is still initialising".into()),
            Phase::Failed => return Err("the runtime failed to initialise".into()),
            Phase::Exited => {
                return Err(format!(
                    "the runtime has exited ({}); discard this instance",
                    self.exit.as_deref().unwrap_or("unknown status")
                ))
            }
        }
        if self.busy {
            return Err("another Invoke is in flight; one at a time".into());
        }
        self.busy = true;
        self.outcome = None;
        match self.parked.take() {
            Some(p) => {
                self.current = Some(Current {
                    id: ev.request_id.clone(),
                    since: now,
                });
                Ok(Some((p, ev)))
            }
            None => {
                self.queued = Some(ev);
                Ok(None)
            }
        }
    }

    /// The delivery of `ev` failed (the runtime's connection broke): keep
    /// it for the runtime's next `GET /next`.
    pub fn requeue(&mut self, ev: InvokeRequest) {
        if self.current.as_ref().is_some_and(|c| c.id == ev.request_id)
            && self.phase == Phase::Ready
        {
            self.current = None;
            self.queued = Some(ev);
        }
    }

    /// The answer for the waiting `Invoke`, once there is one.
    pub fn take_outcome(&mut self) -> Option<InvokeResult> {
        let out = self.outcome.take();
        if out.is_some() {
            self.busy = false;
        }
        out
    }

    fn check_id(&self, id: &str) -> Result<&Current, ApiError> {
        match &self.current {
            Some(cur) if cur.id == id => Ok(cur),
            _ => Err(ApiError::new(
                400,
                "InvalidRequestID",
                format!("Invalid request ID: {id:?} is not the current invocation"),
            )),
        }
    }

    fn finish(
        &mut self,
        id: &str,
        status: InvokeStatus,
        payload: Vec<u8>,
        error_type: Option<String>,
        now: Instant,
    ) -> Result<(), ApiError> {
        let since = self.check_id(id)?.since;
        self.current = None;
        self.outcome = Some(InvokeResult {
            status,
            payload,
            error_type,
            log: self.log.take(),
            duration_ms: ms_since(since, now),
        });
        Ok(())
    }

    /// `POST /invocation/{id}/response`.
    pub fn respond(&mut self, id: &str, body: Vec<u8>, now: Instant) -> Result<(), ApiError> {
        self.finish(id, InvokeStatus::Success, body, None, now)
    }

    /// `POST /invocation/{id}/error`. `header_type` is the
    /// `Lambda-Runtime-Function-Error-Type` header, if any.
    pub fn fail(
        &mut self,
        id: &str,
        header_type: Option<String>,
        body: Vec<u8>,
        now: Instant,
    ) -> Result<(), ApiError> {
        let error_type = header_type
            .or_else(|| body_error_type(&body))
            .unwrap_or_else(|| "Unhandled".to_string());
        self.finish(id, InvokeStatus::FunctionError, body, Some(error_type), now)
    }

    /// A response or error body over the limit: the invocation fails as
    /// in Lambda, and the runtime gets a 413.
    pub fn too_large(&mut self, id: &str, limit: usize, now: Instant) -> Result<(), ApiError> {
        let t = "Function.ResponseSizeTooLarge";
        let msg =
            format!("Response payload size exceeded maximum allowed payload size ({limit} bytes).");
        self.finish(
            id,
            InvokeStatus::FunctionError,
            error_body(t, &msg),
            Some(t.to_string()),
            now,
        )
    }

    /// `POST /init/error`.
    pub fn init_error(
        &mut self,
        header_type: Option<String>,
        body: Vec<u8>,
    ) -> Result<(), ApiError> {
        if self.phase != Phase::Init {
            return Err(ApiError::invalid_state("init/error", self.phase));
        }
        let error_type = header_type
            .or_else(|| body_error_type(&body))
            .unwrap_or_else(|| "Runtime.Unknown".to_string());
        self.fail_init(error_type, body);
        Ok(())
    }

    /// Init took too long; returns true if that ended init (the caller
    /// then kills the runtime).
    pub fn init_timeout(&mut self, timeout_ms: u64) -> bool {
        if self.phase != Phase::Init {
            return false;
        }
        let t = "Runtime.InitTimeout";
        let msg = format!("Runtime init timed out after {timeout_ms} ms");
        self.fail_init(t.to_string(), error_body(t, &msg));
        true
    }

    /// The runtime process ended, `how` as Lambda words it ("exit status
    /// 1", "signal: killed"). Returns a parked `GET /next` to drop.
    pub fn exited(&mut self, how: String, now: Instant) -> Option<P> {
        let t = "Runtime.ExitError";
        let reason = exit_reason(&how);
        self.exit = Some(how);
        match self.phase {
            Phase::Init => {
                self.fail_init(t.to_string(), error_body(t, &reason));
            }
            Phase::Ready => {
                self.phase = Phase::Exited;
                // An Invoke waiting (delivered or not) gets its answer.
                let pending = self
                    .current
                    .take()
                    .map(|c| (c.id, Some(c.since)))
                    .or_else(|| self.queued.take().map(|q| (q.request_id, None)));
                if let Some((id, since)) = pending {
                    let msg = format!("RequestId: {id} Error: {reason}");
                    self.outcome = Some(InvokeResult {
                        status: InvokeStatus::RuntimeExited,
                        payload: error_body(t, &msg),
                        error_type: Some(t.to_string()),
                        log: self.log.take(),
                        duration_ms: since.map_or(0, |s| ms_since(s, now)),
                    });
                }
            }
            Phase::Idle | Phase::Failed | Phase::Exited => {}
        }
        self.parked.take()
    }
}

/// Lambda's message for a runtime that ended.
fn exit_reason(how: &str) -> String {
    if how == "exit status 0" {
        "Runtime exited without providing a reason".to_string()
    } else {
        format!("Runtime exited with error: {how}")
    }
}

/// `errorType` of a JSON error body, if it has one.
fn body_error_type(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("errorType")?.as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: &str) -> InvokeRequest {
        InvokeRequest {
            request_id: id.to_string(),
            payload: b"{}".to_vec(),
            deadline_ms: 1,
            invoked_function_arn: "arn".into(),
            trace_id: None,
            client_context: None,
            cognito_identity: None,
        }
    }

    fn ready() -> Machine<u32> {
        let mut m = Machine::default();
        m.start().unwrap();
        m.spawned(Instant::now());
        m.log.push(b"init output\n");
        assert_eq!(m.next(1, Instant::now()), Next::Parked { displaced: None });
        let ready = m.take_init().unwrap().unwrap();
        assert_eq!(ready.log, b"init output\n");
        assert_eq!(m.phase(), Phase::Ready);
        m
    }

    #[test]
    fn start_only_once() {
        let mut m = Machine::<u32>::default();
        m.start().unwrap();
        assert!(m.start().unwrap_err().contains("already"));
    }

    #[test]
    fn invoke_before_ready_is_refused() {
        let mut m = Machine::<u32>::default();
        assert!(m.invoke(ev("a"), Instant::now()).is_err());
        m.start().unwrap();
        assert!(m.invoke(ev("a"), Instant::now()).is_err());
    }

    #[test]
    fn parked_next_gets_the_event_and_response_ends_it() {
        let mut m = ready();
        let (p, e) = m.invoke(ev("a"), Instant::now()).unwrap().unwrap();
        assert_eq!((p, e.request_id.as_str()), (1, "a"));
        // A second Invoke while the first is in flight.
        assert!(m
            .invoke(ev("b"), Instant::now())
            .unwrap_err()
            .contains("in flight"));
        m.log.push(b"hello\n");
        let err = m.respond("zzz", b"x".to_vec(), Instant::now()).unwrap_err();
        assert_eq!((err.status, err.error_type), (400, "InvalidRequestID"));
        m.respond("a", b"42".to_vec(), Instant::now()).unwrap();
        let out = m.take_outcome().unwrap();
        assert_eq!(out.status, InvokeStatus::Success);
        assert_eq!(out.payload, b"42");
        assert_eq!(out.log, b"hello\n");
        // Answering twice is an unknown id.
        assert_eq!(
            m.respond("a", b"42".to_vec(), Instant::now())
                .unwrap_err()
                .status,
            400
        );
    }

    #[test]
    fn queued_event_goes_to_the_next_get() {
        let mut m = ready();
        let (p, _) = m.invoke(ev("a"), Instant::now()).unwrap().unwrap();
        assert_eq!(p, 1);
        m.respond("a", vec![], Instant::now()).unwrap();
        m.take_outcome().unwrap();
        // Nobody parked now: the event waits.
        assert!(m.invoke(ev("b"), Instant::now()).unwrap().is_none());
        match m.next(2, Instant::now()) {
            Next::Deliver(2, e) => assert_eq!(e.request_id, "b"),
            other => panic!("{other:?}"),
        }
        // Asking again before answering is refused.
        assert!(matches!(m.next(3, Instant::now()), Next::Reject(3, e) if e.status == 403));
        m.fail(
            "b",
            None,
            br#"{"errorType":"ValueError"}"#.to_vec(),
            Instant::now(),
        )
        .unwrap();
        let out = m.take_outcome().unwrap();
        assert_eq!(out.status, InvokeStatus::FunctionError);
        assert_eq!(out.error_type.as_deref(), Some("ValueError"));
    }

    #[test]
    fn error_type_header_wins_over_body() {
        let mut m = ready();
        m.invoke(ev("a"), Instant::now()).unwrap();
        m.fail(
            "a",
            Some("Custom".into()),
            br#"{"errorType":"ValueError"}"#.to_vec(),
            Instant::now(),
        )
        .unwrap();
        assert_eq!(
            m.take_outcome().unwrap().error_type.as_deref(),
            Some("Custom")
        );
    }

    #[test]
    fn second_parked_get_displaces_the_first() {
        let mut m = ready();
        assert_eq!(
            m.next(2, Instant::now()),
            Next::Parked { displaced: Some(1) }
        );
    }

    #[test]
    fn requeue_after_failed_delivery() {
        let mut m = ready();
        let (_, e) = m.invoke(ev("a"), Instant::now()).unwrap().unwrap();
        m.requeue(e);
        assert!(matches!(m.next(5, Instant::now()), Next::Deliver(5, e) if e.request_id == "a"));
    }

    #[test]
    fn exit_during_invoke_is_runtime_exited() {
        let mut m = ready();
        m.invoke(ev("a"), Instant::now()).unwrap();
        m.log.push(b"dying\n");
        assert_eq!(m.exited("exit status 3".into(), Instant::now()), None);
        let out = m.take_outcome().unwrap();
        assert_eq!(out.status, InvokeStatus::RuntimeExited);
        assert_eq!(out.error_type.as_deref(), Some("Runtime.ExitError"));
        assert_eq!(out.log, b"dying\n");
        let body: serde_json::Value = serde_json::from_slice(&out.payload).unwrap();
        assert_eq!(
            body["errorMessage"],
            "RequestId: a Error: Runtime exited with error: exit status 3"
        );
        assert!(m
            .invoke(ev("b"), Instant::now())
            .unwrap_err()
            .contains("exited"));
    }

    #[test]
    fn exit_with_queued_event_answers_it() {
        let mut m = ready();
        m.invoke(ev("a"), Instant::now()).unwrap();
        m.respond("a", vec![], Instant::now()).unwrap();
        m.take_outcome().unwrap();
        m.invoke(ev("b"), Instant::now()).unwrap();
        m.exited("signal: killed".into(), Instant::now());
        let out = m.take_outcome().unwrap();
        assert_eq!(out.status, InvokeStatus::RuntimeExited);
    }

    #[test]
    fn idle_exit_returns_the_parked_request() {
        let mut m = ready();
        assert_eq!(m.exited("exit status 0".into(), Instant::now()), Some(1));
        assert_eq!(m.phase(), Phase::Exited);
        assert!(m.take_outcome().is_none());
    }

    #[test]
    fn init_failures() {
        let mut m = Machine::<u32>::default();
        m.start().unwrap();
        m.log.push(b"trace");
        m.init_error(
            None,
            br#"{"errorType":"Runtime.ImportModuleError"}"#.to_vec(),
        )
        .unwrap();
        let f = m.take_init().unwrap().unwrap_err();
        assert_eq!(f.error_type, "Runtime.ImportModuleError");
        assert_eq!(f.log, b"trace");
        assert!(m.init_error(None, vec![]).is_err());
        assert!(matches!(m.next(1, Instant::now()), Next::Reject(1, _)));

        let mut m = Machine::<u32>::default();
        m.start().unwrap();
        assert!(m.init_timeout(10));
        assert_eq!(
            m.take_init().unwrap().unwrap_err().error_type,
            "Runtime.InitTimeout"
        );
        assert!(!m.init_timeout(10));

        let mut m = Machine::<u32>::default();
        m.start().unwrap();
        m.exited("exit status 0".into(), Instant::now());
        let f = m.take_init().unwrap().unwrap_err();
        assert_eq!(f.error_type, "Runtime.ExitError");
        let body: serde_json::Value = serde_json::from_slice(&f.payload).unwrap();
        assert_eq!(
            body["errorMessage"],
            "Runtime exited without providing a reason"
        );
    }

    #[test]
    fn too_large_is_a_function_error() {
        let mut m = ready();
        m.invoke(ev("a"), Instant::now()).unwrap();
        m.too_large("a", 10, Instant::now()).unwrap();
        let out = m.take_outcome().unwrap();
        assert_eq!(out.status, InvokeStatus::FunctionError);
        assert_eq!(
            out.error_type.as_deref(),
            Some("Function.ResponseSizeTooLarge")
        );
    }

    #[test]
    fn log_keeps_the_newest_bytes() {
        let mut l = LogBuf::default();
        l.push(&vec![b'a'; MAX_LOG_LEN - 1]);
        l.push(b"bcd");
        assert_eq!(l.len(), MAX_LOG_LEN);
        let d = l.take();
        assert!(d.ends_with(b"abcd"));
        assert!(l.is_empty());
        let mut big = vec![b'x'; MAX_LOG_LEN + 5];
        big.push(b'y');
        l.push(&big);
        let d = l.take();
        assert_eq!(d.len(), MAX_LOG_LEN);
        assert_eq!(d.last(), Some(&b'y'));
    }
}
