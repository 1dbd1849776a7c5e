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

use crate::daemon::{now_rfc3339, Daemon};
use crate::store::{load_dir, write_json_atomic};
use ember_lambda::error::ApiError;

pub use ember_lambda::limits::MAX_ASYNC_PAYLOAD;
/// One try plus two retries.
pub const MAX_ATTEMPTS: usize = 3;
/// Of a function's answer, this much is kept in the record.
pub const MAX_KEPT_RESULT: usize = 256 * 1024;
/// Finished records kept (oldest dropped beyond this).
const KEEP_FINISHED: usize = 10_000;

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

    fn save(&self, item: &AsyncInvocation) -> Result<(), ApiError> {
        write_json_atomic(&self.dir.join(format!("{}.json", item.request_id)), item)
            .map_err(|e| ApiError::service(format!("cannot store the async invocation: {e}")))
    }

    /// Accepts an event: stored durably before the caller hears 202.
    pub fn enqueue(
        &self,
        function: &str,
        qualifier: Option<&str>,
        payload: &[u8],
        request_id: String,
    ) -> Result<AsyncInvocation, ApiError> {
        if payload.len() > MAX_ASYNC_PAYLOAD {
            return Err(ApiError::too_large(format!(
                "Request must be smaller than {MAX_ASYNC_PAYLOAD} bytes for asynchronous invocations"
            )));
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
            Ok::<_, ApiError>(())
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
    .await;
    let duration_ms = t.elapsed().as_millis() as u64;
    let (attempt, result_text, version, throttled) = match result {
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
            (
                Attempt {
                    started,
                    duration_ms: out.duration_ms,
                    outcome: outcome.into(),
                    error_type: out.error_type.clone(),
                    error_message: message,
                },
                Some(text),
                Some(out.executed_version),
                false,
            )
        }
        Err(e) => {
            let throttled = e.kind == "TooManyRequestsException";
            (
                Attempt {
                    started,
                    duration_ms,
                    outcome: if throttled { "Throttled" } else { "Error" }.into(),
                    error_type: Some(e.kind.to_string()),
                    error_message: Some(e.message.clone()),
                },
                None,
                None,
                throttled,
            )
        }
    };
    let succeeded = attempt.outcome == "Success";
    // Missing functions will not come back: no retries for them.
    let permanent = attempt.error_type.as_deref() == Some("ResourceNotFoundException");
    let item = d.queue.update(id, |i| {
        i.attempts.push(attempt);
        i.executed_version = version.or(i.executed_version.take());
        if let Some(text) = result_text {
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
    });
    let Some(item) = item else { return };
    if item.status == Status::Queued {
        let counted = counted(&item) as u32;
        // Lambda waits 1 then 2 minutes; the base delay is configurable.
        let delay = if throttled {
            d.cfg.async_retry_delay
        } else {
            d.cfg.async_retry_delay * 2u32.pow(counted.saturating_sub(1))
        };
        let tx = d.queue.tx.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(delay.max(Duration::from_millis(1))).await;
            let _ = tx.send(id);
        });
    }
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

    #[test]
    fn long_results_are_cut_and_flagged() {
        let (kept, cut_) = cut("é".repeat(10), 5);
        assert_eq!((kept.as_str(), cut_), ("éé", true));
        let (kept, cut_) = cut("abc".into(), 5);
        assert_eq!((kept.as_str(), cut_), ("abc", false));
    }
}
