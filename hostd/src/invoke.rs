//! One invocation: resolve the version, lease an instance, hand the event
//! to its runtime under the function's timeout, and shape the outcome as
//! Lambda does (payload, function error, timeout), with the log.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_agent::protocol::MAX_LOG_LEN;
use ember_agent::{InvokeRequest, InvokeResult, InvokeStatus};

use crate::model::{State, VersionRecord};
use crate::pool::{PoolError, Source};
use crate::vm::{Instance, InstanceError};
use crate::{daemon::Daemon, functions::now_rfc3339};
use ember_lambda::error::ApiError;

pub use ember_lambda::limits::MAX_SYNC_PAYLOAD;
/// Lambda returns at most the last 4 KB of the log with `LogType: Tail`.
pub const LOG_TAIL_BYTES: usize = 4096;
/// A function's log file is rotated (one old file kept) beyond this size.
const MAX_LOG_FILE: u64 = 16 << 20;

/// Why an invocation did not run (a function's own failure is no error:
/// it is in the [`Outcome`]).
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    #[error(
        "Request must be smaller than {MAX_SYNC_PAYLOAD} bytes for the InvokeFunction operation"
    )]
    TooLarge,
    #[error("Function not found: {arn}")]
    NoSuchQualifier { arn: String },
    #[error(
        "The operation cannot be performed at this time. The function is currently in the following state: {}. {reason}",
        state.as_str()
    )]
    NotReady { state: State, reason: String },
    #[error("Rate Exceeded: the function's reserved concurrency is 0")]
    NoConcurrency,
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// From the function records (not found).
    #[error(transparent)]
    Records(#[from] crate::functions::FunctionError),
    /// Already in Lambda's terms (no files for the version's runtime).
    #[error(transparent)]
    Function(#[from] ApiError),
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub request_id: String,
    /// The version that ran (`X-Amz-Executed-Version`).
    pub executed_version: String,
    pub payload: Vec<u8>,
    /// `Some("Unhandled")` for a function error (`X-Amz-Function-Error`).
    pub function_error: Option<String>,
    /// `errorType` of a function error (also inside `payload`).
    pub error_type: Option<String>,
    /// The invocation's log: START, output, END, REPORT.
    pub log: Vec<u8>,
    pub duration_ms: u64,
    /// Whether the instance was restored for this invocation.
    pub cold: bool,
}

impl Outcome {
    pub fn log_tail(&self) -> &[u8] {
        &self.log[self.log.len().saturating_sub(LOG_TAIL_BYTES)..]
    }
}

/// The version can serve: it has a snapshot to restore from.
fn check_ready(v: &VersionRecord) -> Result<(), InvokeError> {
    if v.snapshot.is_some() {
        return Ok(());
    }
    Err(InvokeError::NotReady {
        state: v.state,
        reason: v.state_reason.clone().unwrap_or_default(),
    })
}

/// Invocations of the function allowed at once: its reserved concurrency
/// or the host's default; one for a function with a volume (one writer).
fn concurrency_limit(
    reserved: Option<u32>,
    default: u32,
    has_volume: bool,
) -> Result<u32, InvokeError> {
    let limit = reserved.unwrap_or(default);
    let limit = if has_volume { limit.min(1) } else { limit };
    if limit == 0 {
        return Err(InvokeError::NoConcurrency);
    }
    Ok(limit)
}

/// How the instance answered an invocation.
enum Answer {
    Replied(InvokeResult),
    /// The agent connection failed; `died` says why if the VMM exited.
    AgentFailed {
        error: String,
        died: Option<String>,
    },
    /// The VMM exited during the call.
    Exited(String),
    /// The call could not be made.
    Failed(InstanceError),
    /// Past the function's timeout.
    TimedOut,
}

/// Shapes the outcome of an answer as Lambda does; returns whether the
/// instance may serve again, and the function's output for the log.
/// `label` names the version in log lines.
fn shape(out: &mut Outcome, answer: Answer, label: &str, timeout_secs: u32) -> (bool, Vec<u8>) {
    let request_id = out.request_id.clone();
    match answer {
        // The agent keeps to Lambda's limits; one that does not is not
        // trusted with the next invocation either.
        Answer::Replied(r) if r.payload.len() > MAX_SYNC_PAYLOAD || r.log.len() > MAX_LOG_LEN => {
            log::warn!(
                "{label}: the agent answered {request_id} with {} bytes and {} of log, over Lambda's limits",
                r.payload.len(),
                r.log.len()
            );
            set_error(
                out,
                "Function.ResponseSizeTooLarge",
                &format!("Response payload size exceeded maximum allowed payload size ({MAX_SYNC_PAYLOAD} bytes)."),
            );
            (false, Vec::new())
        }
        Answer::Replied(r) => {
            out.duration_ms = r.duration_ms;
            out.payload = r.payload;
            let reusable = match r.status {
                InvokeStatus::Success => true,
                InvokeStatus::FunctionError => {
                    out.function_error = Some("Unhandled".into());
                    out.error_type = r.error_type;
                    true
                }
                InvokeStatus::RuntimeExited => {
                    out.function_error = Some("Unhandled".into());
                    out.error_type = r.error_type.or(Some("Runtime.ExitError".into()));
                    false
                }
            };
            (reusable, r.log)
        }
        Answer::AgentFailed { error, died } => {
            // A dropped connection usually means the VMM died: say so.
            let what = match died {
                Some(reason) => {
                    log::warn!("{label}: microVM died during {request_id}: {reason}");
                    "the microVM running the function exited unexpectedly".to_string()
                }
                None => format!("the guest agent failed: {error}"),
            };
            set_error(
                out,
                "Runtime.ExitError",
                &format!("RequestId: {request_id} Error: {what}"),
            );
            (false, Vec::new())
        }
        Answer::Exited(reason) => {
            log::warn!("{label}: microVM died during {request_id}: {reason}");
            set_error(
                out,
                "Runtime.ExitError",
                &format!("RequestId: {request_id} Error: the microVM running the function exited unexpectedly"),
            );
            (false, Vec::new())
        }
        Answer::Failed(e) => {
            set_error(
                out,
                "Runtime.ExitError",
                &format!("RequestId: {request_id} Error: {e}"),
            );
            (false, Vec::new())
        }
        Answer::TimedOut => {
            set_error(
                out,
                "Sandbox.Timedout",
                &format!(
                    "{} {request_id} Task timed out after {timeout_secs}.00 seconds",
                    now_rfc3339(),
                ),
            );
            out.duration_ms = u64::from(timeout_secs) * 1000;
            (false, Vec::new())
        }
    }
}

/// Runs `payload` through `function`:`qualifier` and waits for the result.
pub async fn invoke(
    d: &Arc<Daemon>,
    function: &str,
    qualifier: Option<&str>,
    payload: Vec<u8>,
    request_id: String,
) -> Result<Outcome, InvokeError> {
    if payload.len() > MAX_SYNC_PAYLOAD {
        return Err(InvokeError::TooLarge);
    }
    let rec = d.functions.get(function)?;
    let v = rec
        .resolve(qualifier)
        .cloned()
        .ok_or_else(|| InvokeError::NoSuchQualifier {
            arn: d.functions.function_arn(function, qualifier),
        })?;
    check_ready(&v)?;
    let source = Source::of(d, &rec, &v)?;
    let limit = concurrency_limit(
        rec.reserved_concurrency,
        d.cfg.default_concurrency,
        v.spec.file_system.is_some(),
    )?;
    let version = v.version.clone();
    let lease = d.pools.acquire(function, &version, &source, limit).await?;
    let timeout = Duration::from_secs(u64::from(v.spec.timeout_secs));
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.as_millis() as u64)
        .unwrap_or(0);
    let req = InvokeRequest {
        request_id: request_id.clone(),
        payload,
        deadline_ms: now_ms + timeout.as_millis() as u64,
        invoked_function_arn: d.functions.function_arn(function, qualifier),
        trace_id: Some(trace_id()),
        client_context: None,
        cognito_identity: None,
    };
    let started = Instant::now();
    let call = lease.inst.with_agent(move |a| a.invoke(&req));
    let result = tokio::time::timeout(timeout, call).await;
    let elapsed = started.elapsed();
    let answer = match result {
        Ok(Ok(Ok(r))) => Answer::Replied(r),
        Ok(Ok(Err(e))) => Answer::AgentFailed {
            error: e.to_string(),
            died: lease.inst.exited_within(Duration::from_millis(500)).await,
        },
        Ok(Err(InstanceError::Exited(reason))) => Answer::Exited(reason),
        Ok(Err(e)) => Answer::Failed(e),
        Err(_) => {
            // Past the timeout: the instance is destroyed, never reused.
            lease.inst.kill();
            Answer::TimedOut
        }
    };
    let mut out = Outcome {
        request_id,
        executed_version: version.clone(),
        payload: Vec::new(),
        function_error: None,
        error_type: None,
        log: Vec::new(),
        duration_ms: elapsed.as_millis() as u64,
        cold: lease.restored,
    };
    if matches!(answer, Answer::Replied(_)) {
        record_working_set(d, &lease.inst);
    }
    let label = format!("{function}:{version}");
    let (reusable, output) = shape(&mut out, answer, &label, v.spec.timeout_secs);
    d.pools.release(function, &version, lease, reusable);
    out.log = format_log(&out, &output, v.spec.memory_mib, &version);
    append_log(&d.store.log_path(function), &out.log, MAX_LOG_FILE);
    Ok(out)
}

/// At a clone's first answer: the working set of the snapshot it was
/// restored from, if that has none yet and no other clone is recording it
/// (in the background: the caller has its answer first).
fn record_working_set(d: &Daemon, inst: &Arc<Instance>) {
    if !d.cfg.launch.working_sets {
        return;
    }
    let Some(dir) = inst.first_answer_of_restore() else {
        return;
    };
    let Some(claim) = crate::vm::working_set::claim(dir) else {
        return;
    };
    let (inst, dir) = (inst.clone(), dir.to_path_buf());
    tokio::spawn(async move {
        match inst.record_working_set(&dir).await {
            Ok(pages) => log::info!("{}: working set of {pages} pages saved", dir.display()),
            Err(e) => {
                log::warn!("{}: no working set recorded: {e}", dir.display());
                claim.keep();
            }
        }
    });
}

fn set_error(out: &mut Outcome, kind: &str, message: &str) {
    out.function_error = Some("Unhandled".into());
    out.error_type = Some(kind.to_string());
    out.payload = serde_json::to_vec(&serde_json::json!({
        "errorType": kind,
        "errorMessage": message,
    }))
    .unwrap_or_default();
}

/// Lambda's log frame around the function's output.
fn format_log(out: &Outcome, output: &[u8], memory_mib: u32, version: &str) -> Vec<u8> {
    let id = &out.request_id;
    let mut log = format!("START RequestId: {id} Version: {version}\n").into_bytes();
    log.extend_from_slice(output);
    if !output.is_empty() && !output.ends_with(b"\n") {
        log.push(b'\n');
    }
    if out.error_type.as_deref() == Some("Sandbox.Timedout") {
        if let Ok(body) = serde_json::from_slice::<serde_json::Value>(&out.payload) {
            if let Some(m) = body["errorMessage"].as_str() {
                log.extend_from_slice(format!("{m}\n").as_bytes());
            }
        }
    }
    let billed = out.duration_ms.max(1);
    log.extend_from_slice(
        format!(
            "END RequestId: {id}\nREPORT RequestId: {id}\tDuration: {:.2} ms\tBilled Duration: {billed} ms\tMemory Size: {memory_mib} MB\t{}\n",
            out.duration_ms as f64,
            if out.cold { "Restore: yes" } else { "Restore: no" }
        )
        .as_bytes(),
    );
    log
}

/// Appends to a function's log file, rotating it past `max` bytes.
fn append_log(path: &Path, log: &[u8], max: u64) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() > max) {
        let _ = std::fs::rename(path, path.with_extension("log.1"));
    }
    let r = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(log));
    if let Err(e) = r {
        log::warn!("cannot append to {}: {e}", path.display());
    }
}

/// An X-Ray style trace header for the runtime (`_X_AMZN_TRACE_ID`).
fn trace_id() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!(
        "Root=1-{secs:08x}-{};Parent={};Sampled=0",
        &u[..24],
        &u[16..32]
    )
}

pub fn new_request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SnapshotRef;

    fn outcome() -> Outcome {
        Outcome {
            request_id: "req-1".into(),
            executed_version: "1".into(),
            payload: Vec::new(),
            function_error: None,
            error_type: None,
            log: Vec::new(),
            duration_ms: 77,
            cold: false,
        }
    }

    fn replied(status: InvokeStatus, payload: &[u8], log: &[u8]) -> Answer {
        Answer::Replied(InvokeResult {
            status,
            payload: payload.to_vec(),
            error_type: None,
            log: log.to_vec(),
            duration_ms: 12,
        })
    }

    /// `errorType` and `errorMessage` of an error payload.
    fn error_body(out: &Outcome) -> (String, String) {
        let v: serde_json::Value = serde_json::from_slice(&out.payload).unwrap();
        (
            v["errorType"].as_str().unwrap().to_string(),
            v["errorMessage"].as_str().unwrap().to_string(),
        )
    }

    #[test]
    fn a_success_keeps_the_instance_and_the_agents_timing() {
        let mut out = outcome();
        let (reusable, output) = shape(
            &mut out,
            replied(InvokeStatus::Success, b"{\"ok\":1}", b"hello\n"),
            "f:1",
            3,
        );
        assert!(reusable);
        assert_eq!(output, b"hello\n");
        assert_eq!(out.payload, b"{\"ok\":1}");
        assert_eq!(out.duration_ms, 12);
        assert_eq!((out.function_error, out.error_type), (None, None));
    }

    #[test]
    fn a_function_error_is_unhandled_and_keeps_the_instance() {
        let mut out = outcome();
        let mut answer = replied(
            InvokeStatus::FunctionError,
            b"{\"errorType\":\"KeyError\"}",
            b"",
        );
        if let Answer::Replied(r) = &mut answer {
            r.error_type = Some("KeyError".into());
        }
        let (reusable, _) = shape(&mut out, answer, "f:1", 3);
        assert!(
            reusable,
            "a function error is the function's, not the instance's"
        );
        assert_eq!(out.function_error.as_deref(), Some("Unhandled"));
        assert_eq!(out.error_type.as_deref(), Some("KeyError"));
        assert_eq!(out.payload, b"{\"errorType\":\"KeyError\"}");
    }

    #[test]
    fn an_exited_runtime_loses_the_instance() {
        let mut out = outcome();
        let (reusable, _) = shape(
            &mut out,
            replied(InvokeStatus::RuntimeExited, b"{}", b""),
            "f:1",
            3,
        );
        assert!(!reusable);
        assert_eq!(out.error_type.as_deref(), Some("Runtime.ExitError"));
        assert_eq!(out.function_error.as_deref(), Some("Unhandled"));
    }

    #[test]
    fn an_answer_over_lambdas_limits_is_refused_and_the_instance_dropped() {
        for (payload, log) in [
            (vec![b'x'; MAX_SYNC_PAYLOAD + 1], Vec::new()),
            (Vec::new(), vec![b'l'; MAX_LOG_LEN + 1]),
        ] {
            let mut out = outcome();
            let (reusable, output) = shape(
                &mut out,
                replied(InvokeStatus::Success, &payload, &log),
                "f:1",
                3,
            );
            assert!(!reusable);
            assert!(output.is_empty(), "its log is not kept either");
            let (kind, message) = error_body(&out);
            assert_eq!(kind, "Function.ResponseSizeTooLarge");
            assert!(message.contains(&MAX_SYNC_PAYLOAD.to_string()), "{message}");
            assert_eq!(out.duration_ms, 77, "no timing from an untrusted agent");
        }
    }

    #[test]
    fn a_lost_agent_says_whether_the_microvm_died() {
        let mut out = outcome();
        let died = Answer::AgentFailed {
            error: "the agent closed the connection".into(),
            died: Some("killed by signal 9".into()),
        };
        assert!(!shape(&mut out, died, "f:1", 3).0);
        let (kind, message) = error_body(&out);
        assert_eq!(kind, "Runtime.ExitError");
        assert_eq!(
            message,
            "RequestId: req-1 Error: the microVM running the function exited unexpectedly"
        );
        let mut out = outcome();
        let alive = Answer::AgentFailed {
            error: "protocol error: bad frame".into(),
            died: None,
        };
        assert!(!shape(&mut out, alive, "f:1", 3).0);
        assert_eq!(
            error_body(&out).1,
            "RequestId: req-1 Error: the guest agent failed: protocol error: bad frame"
        );
    }

    #[test]
    fn an_exited_or_unreachable_microvm_is_a_runtime_exit_error() {
        let mut out = outcome();
        assert!(!shape(&mut out, Answer::Exited("signal 9".into()), "f:1", 3).0);
        assert!(error_body(&out).1.ends_with("exited unexpectedly"));
        let mut out = outcome();
        let failed = Answer::Failed(InstanceError::Spawn("no slot".into()));
        assert!(!shape(&mut out, failed, "f:1", 3).0);
        assert_eq!(
            error_body(&out),
            (
                "Runtime.ExitError".to_string(),
                "RequestId: req-1 Error: cannot start the VMM: no slot".to_string()
            )
        );
    }

    #[test]
    fn a_timeout_bills_the_whole_timeout_and_says_so_in_the_log() {
        let mut out = outcome();
        let (reusable, output) = shape(&mut out, Answer::TimedOut, "f:1", 7);
        assert!(!reusable);
        assert_eq!(out.duration_ms, 7000);
        let (kind, message) = error_body(&out);
        assert_eq!(kind, "Sandbox.Timedout");
        assert!(
            message.ends_with("req-1 Task timed out after 7.00 seconds"),
            "{message}"
        );
        let log = String::from_utf8(format_log(&out, &output, 128, "1")).unwrap();
        assert!(log.contains(&format!("{message}\n")), "{log}");
        assert!(
            log.contains("Duration: 7000.00 ms\tBilled Duration: 7000 ms"),
            "{log}"
        );
    }

    #[test]
    fn the_log_frames_the_output_as_lambda_does() {
        let mut out = outcome();
        out.cold = true;
        out.duration_ms = 0;
        let log = String::from_utf8(format_log(&out, b"no newline", 256, "$LATEST")).unwrap();
        assert_eq!(
            log,
            "START RequestId: req-1 Version: $LATEST\nno newline\nEND RequestId: req-1\n\
             REPORT RequestId: req-1\tDuration: 0.00 ms\tBilled Duration: 1 ms\t\
             Memory Size: 256 MB\tRestore: yes\n"
        );
        out.cold = false;
        let log = String::from_utf8(format_log(&out, b"", 128, "1")).unwrap();
        assert!(
            log.starts_with("START RequestId: req-1 Version: 1\nEND"),
            "{log}"
        );
        assert!(log.ends_with("Restore: no\n"), "{log}");
    }

    #[test]
    fn the_log_tail_is_the_last_4_kb() {
        let mut out = outcome();
        out.log = (0..10_000u32).map(|i| (i % 256) as u8).collect();
        assert_eq!(out.log_tail().len(), LOG_TAIL_BYTES);
        assert_eq!(out.log_tail(), &out.log[10_000 - LOG_TAIL_BYTES..]);
        out.log = b"short".to_vec();
        assert_eq!(out.log_tail(), b"short");
    }

    #[test]
    fn the_log_file_rotates_past_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.log");
        append_log(&path, b"0123456789", 15);
        append_log(&path, b"abcdefghij", 15);
        assert_eq!(std::fs::read(&path).unwrap(), b"0123456789abcdefghij");
        append_log(&path, b"new", 15);
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(
            std::fs::read(path.with_extension("log.1")).unwrap(),
            b"0123456789abcdefghij"
        );
    }

    #[test]
    fn the_concurrency_limit_is_reserved_or_default_and_one_with_a_volume() {
        assert_eq!(concurrency_limit(None, 10, false).unwrap(), 10);
        assert_eq!(concurrency_limit(Some(3), 10, false).unwrap(), 3);
        assert_eq!(concurrency_limit(Some(3), 10, true).unwrap(), 1);
        assert_eq!(concurrency_limit(None, 10, true).unwrap(), 1);
        for (reserved, volume) in [(Some(0), false), (Some(0), true)] {
            let e = concurrency_limit(reserved, 10, volume).unwrap_err();
            assert!(matches!(e, InvokeError::NoConcurrency), "{e}");
        }
        let e = concurrency_limit(None, 0, false).unwrap_err();
        assert!(matches!(e, InvokeError::NoConcurrency));
    }

    #[test]
    fn a_version_without_a_snapshot_is_not_ready_and_says_why() {
        let mut v = crate::model::sample_record("f").latest().clone();
        v.state_reason = Some("The function is being created.".into());
        let e = check_ready(&v).unwrap_err();
        assert_eq!(
            e.to_string(),
            "The operation cannot be performed at this time. The function is currently in \
             the following state: Pending. The function is being created."
        );
        v.snapshot = Some(SnapshotRef {
            dir: "/nonexistent".into(),
            generation: 1,
            init_duration_ms: 0,
            network: None,
        });
        assert!(check_ready(&v).is_ok());
    }
}
