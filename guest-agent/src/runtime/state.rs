//! The runtime's life cycle as a pure state machine: no threads, no I/O,
//! no clocks of its own, so every transition is unit-tested.
//!
//! `P` is a parked `GET /next` or `GET /restore/next` (a
//! `tiny_http::Request` in the agent, a plain number in tests). The machine
//! never answers HTTP itself: it hands the parked request back to the
//! caller together with what to send, so socket writes happen outside the
//! lock that guards the machine.
//!
//! # SnapStart
//! A runtime started with `AWS_LAMBDA_INITIALIZATION_TYPE=snap-start` ends
//! its init with `GET /restore/next` instead of `GET /invocation/next`:
//! that counts as ready (the host then snapshots the VM) and stays parked
//! until the sandbox is restored ([`Machine::restored`], on the host's
//! `Refresh`). The runtime then runs its after-restore hooks and either
//! asks for its first event as usual or posts `restore/error`, after which
//! every `Invoke` fails with what it posted.

use std::time::Instant;

use crate::protocol::{
    InitFailure, InvokeRequest, InvokeResult, InvokeStatus, RuntimeReady, MAX_LOG_LEN,
};

/// Where the runtime is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No `StartRuntime` yet.
    Idle,
    /// Spawned, waiting for its first `GET /next` (or `GET /restore/next`).
    Init,
    /// Initialised; events can be handed over (for a SnapStart runtime,
    /// once its restore handshake is over, see [`Machine::restored`]).
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

/// What an `Invoke` does right away (see [`Machine::invoke`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Dispatch<P> {
    /// Answer this parked `GET /next` with the event.
    Deliver(P, InvokeRequest),
    /// Nothing to send: the event waits for the runtime's next `GET /next`,
    /// or the outcome is already known.
    Wait,
    /// Answer this parked `GET /restore/next` (the host never signalled
    /// the restore): the runtime runs its after-restore hooks and the
    /// event waits for its next `GET /next`.
    Release(P),
}

/// A SnapStart runtime's restore handshake.
#[derive(Debug)]
enum Restore<P> {
    /// No `GET /restore/next` (the runtime does not use SnapStart), or
    /// the handshake is over (the runtime asked for an event).
    None,
    /// `GET /restore/next` waits for the restore.
    Parked(P),
    /// `GET /restore/next` was answered: after-restore hooks are running.
    Hooks,
    /// The runtime posted `restore/error`: it cannot serve any event.
    Failed {
        error_type: String,
        payload: Vec<u8>,
    },
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
    /// SnapStart only; at most one of `parked` and `Restore::Parked` is set.
    restore: Restore<P>,
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
            restore: Restore::None,
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

    /// Init is over: the runtime waits for its first event (or restore).
    fn init_done(&mut self, now: Instant) {
        self.phase = Phase::Ready;
        self.init_outcome = Some(Ok(RuntimeReady {
            init_duration_ms: self.spawned_at.map_or(0, |t| ms_since(t, now)),
            log: self.log.take(),
        }));
    }

    /// `GET /next`.
    pub fn next(&mut self, p: P, now: Instant) -> Next<P> {
        match self.phase {
            Phase::Init => self.init_done(now),
            Phase::Ready => {}
            phase => return Next::Reject(p, ApiError::invalid_state("invocation/next", phase)),
        }
        if matches!(self.restore, Restore::Failed { .. }) {
            let msg = "invocation/next after restore/error: the runtime cannot serve events";
            return Next::Reject(p, ApiError::new(403, "InvalidStateTransition", msg));
        }
        if let Some(cur) = &self.current {
            // Lambda's runtime must answer before asking for more.
            let msg = format!(
                "invocation/next while invocation {} is not answered yet",
                cur.id
            );
            return Next::Reject(p, ApiError::new(403, "InvalidStateTransition", msg));
        }
        // The after-restore hooks are done; a still parked restore/next
        // was given up by the runtime.
        let abandoned = match std::mem::replace(&mut self.restore, Restore::None) {
            Restore::Parked(r) => Some(r),
            _ => None,
        };
        match self.queued.take() {
            Some(ev) => {
                // `invoke` never queues while restore/next is parked.
                debug_assert!(abandoned.is_none());
                self.current = Some(Current {
                    id: ev.request_id.clone(),
                    since: now,
                });
                Next::Deliver(p, ev)
            }
            None => Next::Parked {
                displaced: self.parked.replace(p).or(abandoned),
            },
        }
    }

    /// `GET /restore/next` (SnapStart): ends init like a first `GET /next`
    /// and stays parked until [`Machine::restored`] (or an `Invoke`).
    pub fn restore_next(&mut self, p: P, now: Instant) -> Next<P> {
        match (self.phase, &self.restore) {
            (Phase::Init, _) => self.init_done(now),
            // The runtime asks again (it reconnected): the newest wins.
            (Phase::Ready, Restore::Parked(_)) => {}
            (phase, _) => {
                let msg = format!(
                    "restore/next is only allowed once, at the end of init (state {phase:?})"
                );
                return Next::Reject(p, ApiError::new(403, "InvalidStateTransition", msg));
            }
        }
        let displaced = match std::mem::replace(&mut self.restore, Restore::Parked(p)) {
            Restore::Parked(old) => Some(old),
            _ => None,
        };
        Next::Parked { displaced }
    }

    /// The sandbox was restored from a snapshot (the host's `Refresh`):
    /// returns the parked `GET /restore/next` to answer (200, empty body),
    /// if there is one. The runtime then runs its after-restore hooks.
    pub fn restored(&mut self) -> Option<P> {
        match std::mem::replace(&mut self.restore, Restore::Hooks) {
            Restore::Parked(p) => Some(p),
            other => {
                self.restore = other;
                None
            }
        }
    }

    /// Whether a `GET /restore/next` waits for [`Machine::restored`].
    pub fn restore_parked(&self) -> bool {
        matches!(self.restore, Restore::Parked(_))
    }

    /// What an `Invoke` gets once the runtime posted `restore/error`.
    fn restore_failure(&mut self) -> Option<InvokeResult> {
        let Restore::Failed {
            error_type,
            payload,
        } = &self.restore
        else {
            return None;
        };
        Some(InvokeResult {
            status: InvokeStatus::RuntimeExited,
            payload: payload.clone(),
            error_type: Some(error_type.clone()),
            log: self.log.take(),
            duration_ms: 0,
        })
    }

    /// `POST /restore/error`: only while the after-restore hooks run.
    /// `header_type` is the `Lambda-Runtime-Function-Error-Type` header.
    pub fn restore_error(
        &mut self,
        header_type: Option<String>,
        body: Vec<u8>,
    ) -> Result<(), ApiError> {
        if self.phase != Phase::Ready || !matches!(self.restore, Restore::Hooks) {
            let msg = format!(
                "restore/error is only allowed after restore/next was answered and before invocation/next (state {:?})",
                self.phase
            );
            return Err(ApiError::new(403, "InvalidStateTransition", msg));
        }
        // As for init/error; Lambda itself falls back to Runtime.Unknown.
        let error_type = header_type
            .or_else(|| body_error_type(&body))
            .unwrap_or_else(|| "Runtime.Unknown".to_string());
        self.restore = Restore::Failed {
            error_type,
            payload: body,
        };
        // An Invoke that waited for the hooks fails now.
        if self.queued.take().is_some() {
            self.outcome = self.restore_failure();
        }
        Ok(())
    }

    /// `Invoke`: [`Dispatch`] says what to send now. Either way the caller
    /// then waits for [`Machine::take_outcome`].
    pub fn invoke(&mut self, ev: InvokeRequest, now: Instant) -> Result<Dispatch<P>, String> {
        if self.busy {
            return Err("another Invoke is in flight; one at a time".into());
        }
        if let Some(failure) = self.restore_failure() {
            // The runtime said it cannot go on (it may have exited since).
            self.busy = true;
            self.outcome = Some(failure);
            return Ok(Dispatch::Wait);
        }
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
        self.busy = true;
        self.outcome = None;
        if let Some(r) = self.restored() {
            self.queued = Some(ev);
            return Ok(Dispatch::Release(r));
        }
        match self.parked.take() {
            Some(p) => {
                self.current = Some(Current {
                    id: ev.request_id.clone(),
                    since: now,
                });
                Ok(Dispatch::Deliver(p, ev))
            }
            None => {
                self.queued = Some(ev);
                Ok(Dispatch::Wait)
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
    /// 1", "signal: killed"). Returns a parked `GET /next` (or
    /// `GET /restore/next`) to drop.
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
                match std::mem::replace(&mut self.restore, Restore::None) {
                    // Nothing was queued: `invoke` releases restore/next.
                    Restore::Parked(p) => return Some(p),
                    failed @ Restore::Failed { .. } => {
                        // An Invoke waiting already has the posted error,
                        // and later ones get it too.
                        self.restore = failed;
                        return self.parked.take();
                    }
                    Restore::None | Restore::Hooks => {}
                }
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

    fn deliver(d: Result<Dispatch<u32>, String>) -> (u32, InvokeRequest) {
        match d {
            Ok(Dispatch::Deliver(p, e)) => (p, e),
            other => panic!("{other:?}"),
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
        let (p, e) = deliver(m.invoke(ev("a"), Instant::now()));
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
        let (p, _) = deliver(m.invoke(ev("a"), Instant::now()));
        assert_eq!(p, 1);
        m.respond("a", vec![], Instant::now()).unwrap();
        m.take_outcome().unwrap();
        // Nobody parked now: the event waits.
        assert_eq!(m.invoke(ev("b"), Instant::now()), Ok(Dispatch::Wait));
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
        let (_, e) = deliver(m.invoke(ev("a"), Instant::now()));
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

    /// Init ended by `GET /restore/next` (request 1), which stays parked.
    fn snap_ready() -> Machine<u32> {
        let mut m = Machine::default();
        m.start().unwrap();
        m.spawned(Instant::now());
        m.log.push(b"before snapshot\n");
        assert_eq!(
            m.restore_next(1, Instant::now()),
            Next::Parked { displaced: None }
        );
        let ready = m.take_init().unwrap().unwrap();
        assert_eq!(ready.log, b"before snapshot\n");
        assert_eq!(m.phase(), Phase::Ready);
        assert!(m.restore_parked());
        m
    }

    #[test]
    fn restore_next_ends_init_and_waits_for_the_restore() {
        let mut m = snap_ready();
        // Asking again (a reconnect) replaces the parked request.
        assert_eq!(
            m.restore_next(2, Instant::now()),
            Next::Parked { displaced: Some(1) }
        );
        // The restore releases it, once.
        assert_eq!(m.restored(), Some(2));
        assert!(!m.restore_parked());
        assert_eq!(m.restored(), None);
        // After-restore hooks run; an Invoke now waits for GET /next.
        assert_eq!(m.invoke(ev("a"), Instant::now()), Ok(Dispatch::Wait));
        m.log.push(b"after restore\n");
        assert!(matches!(m.next(3, Instant::now()), Next::Deliver(3, e) if e.request_id == "a"));
        m.respond("a", b"ok".to_vec(), Instant::now()).unwrap();
        let out = m.take_outcome().unwrap();
        assert_eq!(out.status, InvokeStatus::Success);
        assert_eq!(out.log, b"after restore\n");
        // The handshake is over: no second restore/next, no restore/error.
        assert!(matches!(m.restore_next(4, Instant::now()), Next::Reject(4, e) if e.status == 403));
        assert_eq!(m.restore_error(None, vec![]).unwrap_err().status, 403);
        assert_eq!(m.restored(), None);
        // Parked GET /next then Invoke: the usual path.
        assert_eq!(m.next(5, Instant::now()), Next::Parked { displaced: None });
        assert_eq!(m.restored(), None);
        let (p, _) = deliver(m.invoke(ev("b"), Instant::now()));
        assert_eq!(p, 5);
    }

    #[test]
    fn restore_next_is_refused_outside_init() {
        let mut m = Machine::<u32>::default();
        assert!(matches!(
            m.restore_next(1, Instant::now()),
            Next::Reject(1, _)
        ));
        // Runtimes that never call restore/next: Refresh changes nothing.
        let mut m = ready();
        assert_eq!(m.restored(), None);
        assert!(matches!(m.restore_next(2, Instant::now()), Next::Reject(2, e) if e.status == 403));
        let (p, _) = deliver(m.invoke(ev("a"), Instant::now()));
        assert_eq!(p, 1);
    }

    #[test]
    fn invoke_before_the_restore_releases_restore_next() {
        let mut m = snap_ready();
        assert_eq!(m.invoke(ev("a"), Instant::now()), Ok(Dispatch::Release(1)));
        assert!(!m.restore_parked());
        assert!(m
            .invoke(ev("b"), Instant::now())
            .unwrap_err()
            .contains("in flight"));
        // A late Refresh finds nothing to release.
        assert_eq!(m.restored(), None);
        assert!(matches!(m.next(2, Instant::now()), Next::Deliver(2, e) if e.request_id == "a"));
    }

    #[test]
    fn get_next_while_restore_next_is_parked_abandons_it() {
        let mut m = snap_ready();
        assert_eq!(
            m.next(2, Instant::now()),
            Next::Parked { displaced: Some(1) }
        );
        assert!(!m.restore_parked());
        let (p, _) = deliver(m.invoke(ev("a"), Instant::now()));
        assert_eq!(p, 2);
    }

    #[test]
    fn restore_error_fails_the_waiting_and_later_invokes() {
        let mut m = snap_ready();
        // Not before the restore.
        assert_eq!(m.restore_error(None, vec![]).unwrap_err().status, 403);
        assert_eq!(m.restored(), Some(1));
        assert_eq!(m.invoke(ev("a"), Instant::now()), Ok(Dispatch::Wait));
        assert!(m.take_outcome().is_none());
        m.log.push(b"hook failed\n");
        let body = br#"{"errorMessage":"boom","errorType":"ValueError"}"#.to_vec();
        m.restore_error(Some("Runtime.AfterRestoreError".into()), body.clone())
            .unwrap();
        let out = m.take_outcome().unwrap();
        assert_eq!(out.status, InvokeStatus::RuntimeExited);
        assert_eq!(out.error_type.as_deref(), Some("Runtime.AfterRestoreError"));
        assert_eq!(out.payload, body);
        assert_eq!(out.log, b"hook failed\n");
        // Posting again is a state error; GET /next is refused.
        assert_eq!(m.restore_error(None, vec![]).unwrap_err().status, 403);
        assert!(matches!(m.next(2, Instant::now()), Next::Reject(2, e) if e.status == 403));
        // The runtime exits (awslambdaric: status 65): later Invokes still
        // get the posted error, not Runtime.ExitError.
        assert_eq!(m.exited("exit status 65".into(), Instant::now()), None);
        assert_eq!(m.phase(), Phase::Exited);
        assert!(m.take_outcome().is_none());
        assert_eq!(m.invoke(ev("b"), Instant::now()), Ok(Dispatch::Wait));
        let out = m.take_outcome().unwrap();
        assert_eq!(out.error_type.as_deref(), Some("Runtime.AfterRestoreError"));
        assert_eq!(out.payload, body);
    }

    #[test]
    fn restore_error_type_falls_back_to_the_body_then_unknown() {
        let mut m = snap_ready();
        m.restored();
        m.restore_error(None, br#"{"errorType":"Hook"}"#.to_vec())
            .unwrap();
        m.invoke(ev("a"), Instant::now()).unwrap();
        assert_eq!(
            m.take_outcome().unwrap().error_type.as_deref(),
            Some("Hook")
        );

        let mut m = snap_ready();
        m.restored();
        m.restore_error(None, b"not json".to_vec()).unwrap();
        m.invoke(ev("a"), Instant::now()).unwrap();
        let out = m.take_outcome().unwrap();
        assert_eq!(out.error_type.as_deref(), Some("Runtime.Unknown"));
        assert_eq!(out.payload, b"not json");
    }

    #[test]
    fn exit_around_the_restore() {
        // Exit while restore/next is parked: it is handed back to drop.
        let mut m = snap_ready();
        assert_eq!(m.exited("signal: killed".into(), Instant::now()), Some(1));
        assert!(!m.restore_parked());
        assert!(m
            .invoke(ev("a"), Instant::now())
            .unwrap_err()
            .contains("exited"));
        // Exit during the hooks with an Invoke waiting: Runtime.ExitError.
        let mut m = snap_ready();
        assert_eq!(m.invoke(ev("a"), Instant::now()), Ok(Dispatch::Release(1)));
        assert_eq!(m.exited("exit status 1".into(), Instant::now()), None);
        let out = m.take_outcome().unwrap();
        assert_eq!(out.status, InvokeStatus::RuntimeExited);
        assert_eq!(out.error_type.as_deref(), Some("Runtime.ExitError"));
    }

    #[test]
    fn restore_next_can_fail_init_like_get_next() {
        let mut m = Machine::<u32>::default();
        m.start().unwrap();
        m.init_error(Some("Runtime.BeforeSnapshotError".into()), vec![])
            .unwrap();
        assert!(matches!(
            m.restore_next(1, Instant::now()),
            Next::Reject(1, _)
        ));
        assert_eq!(
            m.take_init().unwrap().unwrap_err().error_type,
            "Runtime.BeforeSnapshotError"
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
