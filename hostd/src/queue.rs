//! Asynchronous invocations (`InvocationType: Event`): accepted at once,
//! stored, run by workers, retried twice on failure (as Lambda does), and
//! their outcome kept and queryable. Stored on disk so a restart loses
//! nothing: queued items are queued again on start. An item is marked
//! running on disk before it runs; one still running at a start was cut
//! short by the restart, and that attempt counts, so no event runs more
//! than [`MAX_ATTEMPTS`] times however often the daemon restarts. A kept
//! result is cut to [`MAX_KEPT_RESULT`] bytes (flagged), so that finished
//! records cannot fill memory.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::invoke::Outcome;
use crate::store::{load_dir, write_json_atomic};
use crate::{daemon::Daemon, functions::now_rfc3339};
use ember_lambda::error::ApiError;

pub use ember_lambda::limits::MAX_ASYNC_PAYLOAD;
/// One try plus two retries.
pub const MAX_ATTEMPTS: usize = 3;
/// Of a function's answer, this much is kept in the record.
pub const MAX_KEPT_RESULT: usize = 256 * 1024;
/// Finished records kept (oldest dropped beyond this).
const KEEP_FINISHED: usize = 10_000;

/// Why an event was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("Request must be smaller than {MAX_ASYNC_PAYLOAD} bytes for asynchronous invocations")]
    TooLarge,
    #[error("cannot store the async invocation: {0}")]
    Store(#[from] std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Queued,
    Running,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Attempt {
    pub started: String,
    pub duration_ms: u64,
    /// `Success`, `FunctionError`, `Throttled` or `Error`.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AsyncInvocation {
    pub request_id: String,
    pub function_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qualifier: Option<String>,
    /// Base64 of the event.
    pub payload: String,
    pub status: Status,
    pub attempts: Vec<Attempt>,
    pub created: String,
    pub updated: String,
    /// The function's response (Succeeded) or error body (Failed), as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executed_version: Option<String>,
    /// The answer was longer than `result` keeps.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub result_truncated: bool,
}

/// `text` cut to at most `max` bytes on a character boundary, and whether
/// it was cut.
fn cut(mut text: String, max: usize) -> (String, bool) {
    if text.len() <= max {
        return (text, false);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    (text, true)
}

/// Attempts that count against [`MAX_ATTEMPTS`] (throttles do not).
fn counted(item: &AsyncInvocation) -> usize {
    item.attempts
        .iter()
        .filter(|a| a.outcome != "Throttled")
        .count()
}

pub struct AsyncQueue {
    dir: PathBuf,
    /// The records as stored; never held across a disk write.
    items: Mutex<BTreeMap<String, AsyncInvocation>>,
    /// Held by whoever writes a record, from reading it to replacing it.
    writes: Mutex<()>,
    tx: mpsc::UnboundedSender<String>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
}

impl AsyncQueue {
    pub fn open(dir: PathBuf) -> std::io::Result<AsyncQueue> {
        std::fs::create_dir_all(&dir)?;
        let (items, bad): (Vec<AsyncInvocation>, _) = load_dir(&dir)?;
        for b in bad {
            log::error!("skipping unreadable async invocation {b}");
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let mut map = BTreeMap::new();
        for mut item in items {
            if item.status == Status::Running {
                // Cut short by the restart: it may have run, so it counts.
                item.attempts.push(Attempt {
                    started: item.updated.clone(),
                    duration_ms: 0,
                    outcome: "Error".into(),
                    error_type: Some("ServiceException".into()),
                    error_message: Some("the host restarted during the attempt".into()),
                });
                item.status = if counted(&item) >= MAX_ATTEMPTS {
                    Status::Failed
                } else {
                    Status::Queued
                };
                item.updated = now_rfc3339();
                if let Err(e) =
                    write_json_atomic(&dir.join(format!("{}.json", item.request_id)), &item)
                {
                    log::error!("async invocation {}: {e}", item.request_id);
                }
            }
            if item.status == Status::Queued {
                let _ = tx.send(item.request_id.clone());
            }
            map.insert(item.request_id.clone(), item);
        }
        Ok(AsyncQueue {
            dir,
            items: Mutex::new(map),
            writes: Mutex::new(()),
            tx,
            rx: Mutex::new(Some(rx)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, AsyncInvocation>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f`, a write of records, alone among writes and off the async
    /// workers (it waits for the disk).
    fn write<T>(&self, f: impl FnOnce() -> T) -> T {
        ember_store::blocking(|| {
            let _w = self.writes.lock().unwrap_or_else(|p| p.into_inner());
            f()
        })
    }

    fn save(&self, item: &AsyncInvocation) -> Result<(), QueueError> {
        write_json_atomic(&self.dir.join(format!("{}.json", item.request_id)), item)?;
        Ok(())
    }

    /// Accepts an event: stored durably before the caller hears 202.
    pub fn enqueue(
        &self,
        function: &str,
        qualifier: Option<&str>,
        payload: &[u8],
        request_id: String,
    ) -> Result<AsyncInvocation, QueueError> {
        if payload.len() > MAX_ASYNC_PAYLOAD {
            return Err(QueueError::TooLarge);
        }
        let now = now_rfc3339();
        let item = AsyncInvocation {
            request_id: request_id.clone(),
            function_name: function.to_string(),
            qualifier: qualifier.map(str::to_string),
            payload: base64::engine::general_purpose::STANDARD.encode(payload),
            status: Status::Queued,
            attempts: Vec::new(),
            created: now.clone(),
            updated: now,
            result: None,
            executed_version: None,
            result_truncated: false,
        };
        self.write(|| {
            self.save(&item)?;
            self.lock().insert(request_id.clone(), item.clone());
            self.trim();
            Ok::<_, QueueError>(())
        })?;
        let _ = self.tx.send(request_id);
        Ok(item)
    }

    pub fn get(&self, id: &str) -> Option<AsyncInvocation> {
        self.lock().get(id).cloned()
    }

    pub fn list(&self, function: Option<&str>) -> Vec<AsyncInvocation> {
        self.lock()
            .values()
            .filter(|i| function.is_none_or(|f| i.function_name == f))
            .cloned()
            .collect()
    }

    /// Marks a queued item running, on disk, before it runs: None (not
    /// to run now) if it is not queued or that cannot be written.
    fn start(&self, id: &str) -> Option<AsyncInvocation> {
        self.write(|| {
            let mut copy = self.get(id)?;
            if copy.status != Status::Queued {
                return None;
            }
            copy.status = Status::Running;
            copy.updated = now_rfc3339();
            if let Err(e) = self.save(&copy) {
                log::error!("async invocation {id} not started: {e}");
                return None;
            }
            self.lock().insert(id.to_string(), copy.clone());
            Some(copy)
        })
    }

    /// Records what an attempt did. Memory takes it even if the disk
    /// refuses (the attempt ran; after a restart the stored `Running`
    /// counts as a failed attempt, so nothing runs more than its retries).
    fn update(&self, id: &str, f: impl FnOnce(&mut AsyncInvocation)) -> Option<AsyncInvocation> {
        self.write(|| {
            let mut copy = self.get(id)?;
            f(&mut copy);
            copy.updated = now_rfc3339();
            if let Err(e) = self.save(&copy) {
                log::error!("{e}");
            }
            self.lock().insert(id.to_string(), copy.clone());
            Some(copy)
        })
    }

    /// Drops the oldest finished records beyond [`KEEP_FINISHED`].
    fn trim(&self) {
        let mut items = self.lock();
        let finished: Vec<(String, String)> = items
            .values()
            .filter(|i| matches!(i.status, Status::Succeeded | Status::Failed))
            .map(|i| (i.updated.clone(), i.request_id.clone()))
            .collect();
        if finished.len() <= KEEP_FINISHED {
            return;
        }
        let mut finished = finished;
        finished.sort();
        for (_, id) in finished.iter().take(finished.len() - KEEP_FINISHED) {
            items.remove(id);
            let _ = std::fs::remove_file(self.dir.join(format!("{id}.json")));
        }
    }
}

/// Starts the workers that run queued events.
pub fn start_workers(d: Arc<Daemon>) {
    let Some(rx) = d.queue.rx.lock().unwrap_or_else(|p| p.into_inner()).take() else {
        return;
    };
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    for _ in 0..d.cfg.async_workers.max(1) {
        let d = d.clone();
        let rx = rx.clone();
        tokio::spawn(async move {
            loop {
                let next = rx.lock().await.recv().await;
                match next {
                    Some(id) => run_one(&d, &id).await,
                    None => return,
                }
            }
        });
    }
}

async fn run_one(d: &Arc<Daemon>, id: &str) {
    let Some(item) = d.queue.start(id) else {
        // Not written as running (the disk): try again later, nothing ran.
        if d.queue.get(id).is_some_and(|i| i.status == Status::Queued) {
            let tx = d.queue.tx.clone();
            let id = id.to_string();
            let delay = d.cfg.async_retry_delay.max(Duration::from_millis(1));
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = tx.send(id);
            });
        }
        return;
    };
    let payload = base64::engine::general_purpose::STANDARD
        .decode(&item.payload)
        .unwrap_or_default();
    let started = now_rfc3339();
    let t = std::time::Instant::now();
    let result = crate::invoke::invoke(
        d,
        &item.function_name,
        item.qualifier.as_deref(),
        payload,
        id.to_string(),
    )
    .await
    // The record says what a synchronous call would have been told.
    .map_err(ApiError::from);
    let tried = attempt_of(result, started, t.elapsed().as_millis() as u64);
    let throttled = tried.throttled;
    let Some(item) = d.queue.update(id, |i| record(i, tried)) else {
        return;
    };
    if item.status == Status::Queued {
        let delay = retry_delay(d.cfg.async_retry_delay, &item, throttled);
        let tx = d.queue.tx.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(id);
        });
    }
}

/// What one attempt did, to be recorded.
struct Tried {
    attempt: Attempt,
    /// The function's answer as text.
    result: Option<String>,
    executed_version: Option<String>,
    /// Refused for the function's concurrency (does not count as a try).
    throttled: bool,
}

/// The record of an attempt that started at `started` and took
/// `duration_ms` (the function's own duration when it ran).
fn attempt_of(result: Result<Outcome, ApiError>, started: String, duration_ms: u64) -> Tried {
    match result {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.payload).into_owned();
            let outcome = if out.function_error.is_some() {
                "FunctionError"
            } else {
                "Success"
            };
            let message = out.function_error.as_ref().map(|_| {
                serde_json::from_slice::<serde_json::Value>(&out.payload)
                    .ok()
                    .and_then(|v| v["errorMessage"].as_str().map(str::to_string))
                    .unwrap_or_else(|| text.clone())
            });
            Tried {
                attempt: Attempt {
                    started,
                    duration_ms: out.duration_ms,
                    outcome: outcome.into(),
                    error_type: out.error_type.clone(),
                    error_message: message,
                },
                result: Some(text),
                executed_version: Some(out.executed_version),
                throttled: false,
            }
        }
        Err(e) => {
            let throttled = e.kind == "TooManyRequestsException";
            Tried {
                attempt: Attempt {
                    started,
                    duration_ms,
                    outcome: if throttled { "Throttled" } else { "Error" }.into(),
                    error_type: Some(e.kind.to_string()),
                    error_message: Some(e.message),
                },
                result: None,
                executed_version: None,
                throttled,
            }
        }
    }
}

/// Adds an attempt to `i` and decides what comes next: done, failed for
/// good, or queued for another try.
fn record(i: &mut AsyncInvocation, tried: Tried) {
    let succeeded = tried.attempt.outcome == "Success";
    // Missing functions will not come back: no retries for them.
    let permanent = tried.attempt.error_type.as_deref() == Some("ResourceNotFoundException");
    i.attempts.push(tried.attempt);
    i.executed_version = tried.executed_version.or(i.executed_version.take());
    if let Some(text) = tried.result {
        let (kept, truncated) = cut(text, MAX_KEPT_RESULT);
        i.result = Some(kept);
        i.result_truncated = truncated;
    }
    i.status = if succeeded {
        Status::Succeeded
    } else if permanent || counted(i) >= MAX_ATTEMPTS {
        Status::Failed
    } else {
        Status::Queued
    };
}

/// How long a queued-again item waits: Lambda waits 1 then 2 minutes
/// (`base` is configurable); after a throttle, `base`.
fn retry_delay(base: Duration, item: &AsyncInvocation, throttled: bool) -> Duration {
    let delay = if throttled {
        base
    } else {
        base * 2u32.pow((counted(item) as u32).saturating_sub(1))
    };
    delay.max(Duration::from_millis(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_and_running_items_are_queued_again_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let q = AsyncQueue::open(dir.path().to_path_buf()).unwrap();
        let a = q.enqueue("f", None, b"{}", "a".into()).unwrap();
        let b = q.enqueue("f", Some("1"), b"{\"x\":1}", "b".into()).unwrap();
        assert_eq!(q.start("b").unwrap().status, Status::Running);
        assert!(q.start("b").is_none(), "running already");
        q.enqueue("g", None, b"{}", "c".into()).unwrap();
        q.update("c", |i| i.status = Status::Succeeded);
        assert!(q
            .enqueue("f", None, &vec![b'x'; MAX_ASYNC_PAYLOAD + 1], "d".into())
            .is_err());
        drop(q);

        let q = AsyncQueue::open(dir.path().to_path_buf()).unwrap();
        let mut rx = q.rx.lock().unwrap().take().unwrap();
        let mut again = vec![rx.try_recv().unwrap(), rx.try_recv().unwrap()];
        again.sort();
        assert_eq!(again, ["a", "b"]);
        assert!(rx.try_recv().is_err(), "finished items are not run again");
        assert_eq!(q.get("a").unwrap().payload, a.payload);
        assert_eq!(q.get("b").unwrap().status, Status::Queued);
        assert_eq!(q.get("b").unwrap().qualifier, b.qualifier);
        assert_eq!(
            q.get("b").unwrap().attempts.len(),
            1,
            "the attempt cut short by the restart counts"
        );
        assert_eq!(q.get("c").unwrap().status, Status::Succeeded);
        assert_eq!(q.list(Some("f")).len(), 2);
        assert!(q.get("d").is_none());
    }

    /// A daemon that dies during every attempt (the event crashes it, or
    /// the host keeps restarting) still runs the event at most
    /// MAX_ATTEMPTS times: each start is on disk before the run.
    #[test]
    fn restarts_during_attempts_use_them_up() {
        let dir = tempfile::tempdir().unwrap();
        let q = AsyncQueue::open(dir.path().to_path_buf()).unwrap();
        q.enqueue("f", None, b"{}", "e".into()).unwrap();
        drop(q);
        let mut runs = 0;
        for _ in 0..10 {
            let q = AsyncQueue::open(dir.path().to_path_buf()).unwrap();
            let mut rx = q.rx.lock().unwrap().take().unwrap();
            while let Ok(id) = rx.try_recv() {
                if q.start(&id).is_some() {
                    runs += 1;
                }
            }
            // Killed here, mid-run.
        }
        assert_eq!(runs, MAX_ATTEMPTS);
        let q = AsyncQueue::open(dir.path().to_path_buf()).unwrap();
        let e = q.get("e").unwrap();
        assert_eq!((e.status, e.attempts.len()), (Status::Failed, MAX_ATTEMPTS));
    }

    fn item() -> AsyncInvocation {
        AsyncInvocation {
            request_id: "r".into(),
            function_name: "f".into(),
            qualifier: None,
            payload: String::new(),
            status: Status::Running,
            attempts: Vec::new(),
            created: String::new(),
            updated: String::new(),
            result: None,
            executed_version: None,
            result_truncated: false,
        }
    }

    fn ran(payload: &str, function_error: Option<&str>) -> Result<Outcome, ApiError> {
        Ok(Outcome {
            request_id: "r".into(),
            executed_version: "3".into(),
            payload: payload.as_bytes().to_vec(),
            function_error: function_error.map(|_| "Unhandled".to_string()),
            error_type: function_error.map(str::to_string),
            log: Vec::new(),
            duration_ms: 42,
            cold: false,
        })
    }

    fn tried(result: Result<Outcome, ApiError>) -> Tried {
        attempt_of(result, "t0".into(), 1000)
    }

    #[test]
    fn a_success_is_final_with_its_answer_and_version() {
        let mut i = item();
        record(&mut i, tried(ran("{\"ok\":true}", None)));
        assert_eq!(i.status, Status::Succeeded);
        assert_eq!(i.result.as_deref(), Some("{\"ok\":true}"));
        assert_eq!(i.executed_version.as_deref(), Some("3"));
        let a = &i.attempts[0];
        assert_eq!((a.outcome.as_str(), a.duration_ms), ("Success", 42));
        assert_eq!(
            (a.error_type.as_ref(), a.error_message.as_ref()),
            (None, None)
        );
    }

    #[test]
    fn function_errors_are_retried_twice_then_fail() {
        let mut i = item();
        let body = "{\"errorMessage\":\"boom\",\"errorType\":\"ValueError\"}";
        for expect in [Status::Queued, Status::Queued, Status::Failed] {
            record(&mut i, tried(ran(body, Some("ValueError"))));
            assert_eq!(i.status, expect);
        }
        assert_eq!(i.attempts.len(), MAX_ATTEMPTS);
        let a = &i.attempts[2];
        assert_eq!(a.outcome, "FunctionError");
        assert_eq!(a.error_type.as_deref(), Some("ValueError"));
        assert_eq!(a.error_message.as_deref(), Some("boom"));
        assert_eq!(i.result.as_deref(), Some(body), "the error body is kept");
    }

    #[test]
    fn an_error_body_without_a_message_is_its_own_message() {
        let t = tried(ran("not json", Some("Runtime.ExitError")));
        assert_eq!(t.attempt.error_message.as_deref(), Some("not json"));
    }

    #[test]
    fn throttles_do_not_use_up_attempts() {
        let mut i = item();
        for _ in 0..10 {
            let t = tried(Err(ApiError::throttled("Rate Exceeded")));
            assert!(t.throttled);
            record(&mut i, t);
            assert_eq!(i.status, Status::Queued);
        }
        assert_eq!(i.attempts[0].outcome, "Throttled");
        assert_eq!(
            i.attempts[0].duration_ms, 1000,
            "the wall time when nothing ran"
        );
        record(&mut i, tried(Err(ApiError::service("lost"))));
        record(&mut i, tried(Err(ApiError::service("lost"))));
        assert_eq!(i.status, Status::Queued);
        record(&mut i, tried(Err(ApiError::service("lost"))));
        assert_eq!(i.status, Status::Failed);
        assert_eq!(i.attempts.last().unwrap().outcome, "Error");
    }

    #[test]
    fn a_missing_function_fails_at_once() {
        let mut i = item();
        record(
            &mut i,
            tried(Err(ApiError::not_found("Function not found: f"))),
        );
        assert_eq!(i.status, Status::Failed);
        let a = &i.attempts[0];
        assert_eq!(a.error_type.as_deref(), Some("ResourceNotFoundException"));
        assert_eq!(a.error_message.as_deref(), Some("Function not found: f"));
    }

    #[test]
    fn a_long_answer_is_kept_cut() {
        let mut i = item();
        record(&mut i, tried(ran(&"a".repeat(MAX_KEPT_RESULT + 10), None)));
        assert!(i.result_truncated);
        assert_eq!(i.result.unwrap().len(), MAX_KEPT_RESULT);
    }

    #[test]
    fn retries_wait_the_base_delay_then_twice_it() {
        let base = Duration::from_secs(60);
        let mut i = item();
        record(&mut i, tried(Err(ApiError::service("lost"))));
        assert_eq!(retry_delay(base, &i, false), base);
        record(&mut i, tried(Err(ApiError::service("lost"))));
        assert_eq!(retry_delay(base, &i, false), 2 * base);
        // A throttle waits the base delay, however many tries came before.
        assert_eq!(retry_delay(base, &i, true), base);
        assert_eq!(
            retry_delay(Duration::ZERO, &i, false),
            Duration::from_millis(1),
            "never a busy loop"
        );
    }

    #[test]
    fn events_run_in_the_order_they_came_and_each_once() {
        let dir = tempfile::tempdir().unwrap();
        let q = AsyncQueue::open(dir.path().to_path_buf()).unwrap();
        let mut rx = q.rx.lock().unwrap().take().unwrap();
        for id in ["c", "a", "b"] {
            q.enqueue("f", None, id.as_bytes(), id.into()).unwrap();
        }
        let order: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(order, ["c", "a", "b"]);
        let payload = base64::engine::general_purpose::STANDARD
            .decode(q.get("a").unwrap().payload)
            .unwrap();
        assert_eq!(payload, b"a");
        assert!(q.start("c").is_some());
        assert!(
            q.start("c").is_none(),
            "a running event is not started again"
        );
    }

    #[test]
    fn an_oversized_event_is_refused_and_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let q = AsyncQueue::open(dir.path().to_path_buf()).unwrap();
        let e = q
            .enqueue("f", None, &vec![0; MAX_ASYNC_PAYLOAD + 1], "big".into())
            .unwrap_err();
        assert!(matches!(e, QueueError::TooLarge), "{e}");
        assert!(q.get("big").is_none());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(q
            .enqueue("f", None, &vec![0; MAX_ASYNC_PAYLOAD], "ok".into())
            .is_ok());
    }

    #[test]
    fn a_finished_record_survives_a_restart_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let q = AsyncQueue::open(dir.path().to_path_buf()).unwrap();
        q.enqueue("f", Some("live"), b"{}", "r".into()).unwrap();
        q.start("r").unwrap();
        let body = "{\"errorMessage\":\"boom\"}";
        let done = q
            .update("r", |i| {
                for _ in 0..MAX_ATTEMPTS {
                    record(i, tried(ran(body, Some("E"))));
                }
            })
            .unwrap();
        assert_eq!(done.status, Status::Failed);
        drop(q);
        let q = AsyncQueue::open(dir.path().to_path_buf()).unwrap();
        assert_eq!(q.get("r").unwrap(), done);
        let mut rx = q.rx.lock().unwrap().take().unwrap();
        assert!(rx.try_recv().is_err(), "nothing to run");
    }

    #[test]
    fn long_results_are_cut_and_flagged() {
        let (kept, cut_) = cut("é".repeat(10), 5);
        assert_eq!((kept.as_str(), cut_), ("éé", true));
        let (kept, cut_) = cut("abc".into(), 5);
        assert_eq!((kept.as_str(), cut_), ("abc", false));
    }
}
