//! One invocation: resolve the version, lease an instance, hand the event
//! to its runtime under the function's timeout, and shape the outcome as
//! Lambda does (payload, function error, timeout), with the log.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_agent::protocol::MAX_LOG_LEN;
use ember_agent::{InvokeRequest, InvokeStatus};

use crate::daemon::{now_rfc3339, Daemon};
use crate::model::State;
use crate::pool::Source;
use crate::vm::InstanceError;
use ember_lambda::error::ApiError;

pub use ember_lambda::limits::MAX_SYNC_PAYLOAD;
/// Lambda returns at most the last 4 KB of the log with `LogType: Tail`.
pub const LOG_TAIL_BYTES: usize = 4096;
/// A function's log file is rotated (one old file kept) beyond this size.
const MAX_LOG_FILE: u64 = 16 << 20;

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

/// Runs `payload` through `function`:`qualifier` and waits for the result.
pub async fn invoke(
    d: &Arc<Daemon>,
    function: &str,
    qualifier: Option<&str>,
    payload: Vec<u8>,
    request_id: String,
) -> Result<Outcome, ApiError> {
    if payload.len() > MAX_SYNC_PAYLOAD {
        return Err(ApiError::too_large(format!(
            "Request must be smaller than {MAX_SYNC_PAYLOAD} bytes for the InvokeFunction operation"
        )));
    }
    let rec = d.get(function)?;
    let v = rec.resolve(qualifier).cloned().ok_or_else(|| {
        ApiError::not_found(format!(
            "Function not found: {}",
            d.function_arn(function, qualifier)
        ))
    })?;
    if v.snapshot.is_none() {
        let state = match v.state {
            State::Pending => "Pending",
            State::Failed => "Failed",
            State::Active => "Active",
        };
        let reason = v.state_reason.clone().unwrap_or_default();
        return Err(ApiError::conflict(format!(
            "The operation cannot be performed at this time. The function is currently in the following state: {state}. {reason}"
        )));
    }
    let source = Source::of(d, &rec, &v)?;
    let limit = rec
        .reserved_concurrency
        .unwrap_or(d.cfg.default_concurrency);
    // A volume has one writer.
    let limit = if v.spec.file_system.is_some() {
        limit.min(1)
    } else {
        limit
    };
    if limit == 0 {
        return Err(ApiError::throttled(
            "Rate Exceeded: the function's reserved concurrency is 0",
        ));
    }
    let version = v.version.clone();
    let lease = d
        .pools
        .acquire(d, function, &version, &source, limit)
        .await?;
    let timeout = Duration::from_secs(u64::from(v.spec.timeout_secs));
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.as_millis() as u64)
        .unwrap_or(0);
    let req = InvokeRequest {
        request_id: request_id.clone(),
        payload,
        deadline_ms: now_ms + timeout.as_millis() as u64,
        invoked_function_arn: d.function_arn(function, qualifier),
        trace_id: Some(trace_id()),
        client_context: None,
        cognito_identity: None,
    };
    let started = Instant::now();
    let call = lease.inst.with_agent(move |a| a.invoke(&req));
    let result = tokio::time::timeout(timeout, call).await;
    let elapsed = started.elapsed();
    let mut out = Outcome {
        request_id: request_id.clone(),
        executed_version: version.clone(),
        payload: Vec::new(),
        function_error: None,
        error_type: None,
        log: Vec::new(),
        duration_ms: elapsed.as_millis() as u64,
        cold: lease.restored,
    };
    let mut output = Vec::new();
    let reusable = match result {
        // The agent keeps to Lambda's limits; one that does not is not
        // trusted with the next invocation either.
        Ok(Ok(Ok(r))) if r.payload.len() > MAX_SYNC_PAYLOAD || r.log.len() > MAX_LOG_LEN => {
            log::warn!(
                "{function}:{version}: the agent answered {request_id} with {} bytes and {} of log, over Lambda's limits",
                r.payload.len(),
                r.log.len()
            );
            set_error(
                &mut out,
                "Function.ResponseSizeTooLarge",
                &format!("Response payload size exceeded maximum allowed payload size ({MAX_SYNC_PAYLOAD} bytes)."),
            );
            false
        }
        Ok(Ok(Ok(r))) => {
            output = r.log;
            out.duration_ms = r.duration_ms;
            out.payload = r.payload;
            match r.status {
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
            }
        }
        Ok(Ok(Err(e))) => {
            // A dropped connection usually means the VMM died: say so.
            let died = lease.inst.exited_within(Duration::from_millis(500)).await;
            let what = match died {
                Some(reason) => {
                    log::warn!("{function}:{version}: microVM died during {request_id}: {reason}");
                    "the microVM running the function exited unexpectedly".to_string()
                }
                None => format!("the guest agent failed: {e}"),
            };
            set_error(
                &mut out,
                "Runtime.ExitError",
                &format!("RequestId: {request_id} Error: {what}"),
            );
            false
        }
        Ok(Err(InstanceError::Exited(reason))) => {
            log::warn!("{function}:{version}: microVM died during {request_id}: {reason}");
            set_error(
                &mut out,
                "Runtime.ExitError",
                &format!("RequestId: {request_id} Error: the microVM running the function exited unexpectedly"),
            );
            false
        }
        Ok(Err(e)) => {
            set_error(
                &mut out,
                "Runtime.ExitError",
                &format!("RequestId: {request_id} Error: {e}"),
            );
            false
        }
        Err(_) => {
            // Past the timeout: the instance is destroyed, never reused.
            lease.inst.kill();
            set_error(
                &mut out,
                "Sandbox.Timedout",
                &format!(
                    "{} {request_id} Task timed out after {}.00 seconds",
                    now_rfc3339(),
                    v.spec.timeout_secs
                ),
            );
            out.duration_ms = timeout.as_millis() as u64;
            false
        }
    };
    d.pools.release(function, &version, lease, reusable);
    out.log = format_log(&out, &output, v.spec.memory_mib, &version);
    append_log(d, function, &out.log);
    Ok(out)
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

/// Appends to the function's log file, rotating it past [`MAX_LOG_FILE`].
fn append_log(d: &Daemon, function: &str, log: &[u8]) {
    let path = d.store.log_path(function);
    if std::fs::metadata(&path).is_ok_and(|m| m.len() > MAX_LOG_FILE) {
        let _ = std::fs::rename(&path, path.with_extension("log.1"));
    }
    let r = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
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
