//! Async (`Event`) invocations, kept by the cluster: accepted into the
//! store before the 202 (`/ember/async/queued/<account>/<id>`), delivered
//! by the leader through the same path as synchronous ones, retried twice
//! on failure as Lambda does, and their outcome kept under
//! `/ember/async/done/`. The cluster keeps them rather than forwarding to
//! a host, so an event outlives the host it would have run on; delivery
//! is at least once (a new leader retries what the old one had in flight)
//! and at most [`MAX_ATTEMPTS`] times: each attempt is counted in the
//! store before it runs, and a bookkeeping write that fails never buys an
//! event another run. Records stay small whatever the function answers
//! (the answer is cut to [`MAX_KEPT_RESPONSE`], flagged), so etcd never
//! refuses an outcome for its size.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ember_store::{Expect, Store};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::functions;
use crate::service::Cluster;

pub const QUEUED_PREFIX: &str = "/ember/async/queued/";
pub const DONE_PREFIX: &str = "/ember/async/done/";
/// Large payloads, raw, beside their queued record.
pub const PAYLOAD_PREFIX: &str = "/ember/async/payload/";
/// Lambda's limit for an async payload (1 MB since 2025).
pub const MAX_ASYNC_PAYLOAD: usize = 1024 * 1024;
/// Payloads above this are kept under [`PAYLOAD_PREFIX`] rather than in
/// the record, where JSON escaping may double them.
const INLINE_PAYLOAD: usize = 128 * 1024;
/// Of a function's answer, this much is kept (the rest is cut, and
/// `ResponseTruncated` says so).
pub const MAX_KEPT_RESPONSE: usize = 256 * 1024;
/// A record's size at most, well under what etcd takes (~1.5 MiB), so
/// that writing an outcome cannot fail for its size.
pub const MAX_RECORD: usize = 768 * 1024;
/// First try and two retries.
pub const MAX_ATTEMPTS: u32 = 3;
/// Lambda's default maximum event age: throttled events (which do not
/// use up attempts) are given up after this.
const MAX_EVENT_AGE_MS: u64 = 6 * 3600 * 1000;
/// Deliveries running at once on the leader, and per account of them.
const PARALLEL: usize = 16;
const PARALLEL_PER_ACCOUNT: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Queued,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AsyncInvocation {
    pub request_id: String,
    pub account: String,
    pub function_name: String,
    pub qualifier: Option<String>,
    /// The event (empty when kept under [`PAYLOAD_PREFIX`]).
    pub payload: String,
    pub status: Status,
    /// Attempts started; each is counted in the store before it runs.
    pub attempts: u32,
    /// Not before this (ms since the epoch): the retry delay, or while an
    /// attempt runs, when it may be taken up again if its outcome was
    /// never written (a leader that died).
    pub not_before_ms: u64,
    #[serde(default)]
    pub executed_version: Option<String>,
    #[serde(default)]
    pub function_error: Option<String>,
    /// The last answer (the function's payload or the error), at most
    /// [`MAX_KEPT_RESPONSE`] bytes of it.
    #[serde(default)]
    pub response: Option<String>,
    /// The answer was longer than what `response` keeps.
    #[serde(default)]
    pub response_truncated: bool,
    /// The answer's full size in bytes.
    #[serde(default)]
    pub response_size: Option<u64>,
    /// The payload is under [`PAYLOAD_PREFIX`], not in `payload`.
    #[serde(default)]
    pub payload_stored: bool,
    /// When it was accepted (ms since the epoch; 0 in older records).
    #[serde(default)]
    pub created_ms: u64,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn store_err(e: ember_store::StoreError) -> ApiError {
    ApiError::service(format!("cluster store: {e}"))
}

fn queued_key(account: &str, id: &str) -> String {
    format!("{QUEUED_PREFIX}{account}/{id}")
}

fn done_key(account: &str, id: &str) -> String {
    format!("{DONE_PREFIX}{account}/{id}")
}

fn payload_key(account: &str, id: &str) -> String {
    format!("{PAYLOAD_PREFIX}{account}/{id}")
}

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl AsyncInvocation {
    /// A new event, queued, not yet attempted (its payload is enqueued
    /// beside it, see [`enqueue`]).
    pub fn queued(
        request_id: String,
        account: String,
        function_name: String,
        qualifier: Option<String>,
    ) -> AsyncInvocation {
        AsyncInvocation {
            request_id,
            account,
            function_name,
            qualifier,
            payload: String::new(),
            status: Status::Queued,
            attempts: 0,
            not_before_ms: 0,
            executed_version: None,
            function_error: None,
            response: None,
            response_truncated: false,
            response_size: None,
            payload_stored: false,
            created_ms: 0,
        }
    }

    /// Records `answer` as the last response, cut to what is kept.
    pub fn set_response(&mut self, answer: &[u8]) {
        let text = String::from_utf8_lossy(answer);
        let kept = cut(&text, MAX_KEPT_RESPONSE);
        self.response_truncated = kept.len() < text.len();
        self.response_size = Some(answer.len() as u64);
        self.response = Some(kept.to_string());
    }

    /// The record as stored: cut further if it would still be larger
    /// than [`MAX_RECORD`] (JSON escapes a control byte as six).
    pub fn to_record(&mut self) -> Vec<u8> {
        if let Some(e) = &self.function_error {
            self.function_error = Some(cut(e, 256).to_string());
        }
        loop {
            let body = serde_json::to_vec(&*self).expect("serialisable");
            if body.len() <= MAX_RECORD {
                return body;
            }
            match &self.response {
                Some(r) if !r.is_empty() => {
                    self.response = Some(cut(r, r.len() / 2).to_string());
                    self.response_truncated = true;
                }
                // Only the payload can be left: kept inline only when
                // small, so this is not reached; refuse to grow anyway.
                _ => {
                    self.response = None;
                    self.payload = String::new();
                    return serde_json::to_vec(&*self).expect("serialisable");
                }
            }
        }
    }
}

/// Accepts an event: its payload (under its own key when large), then the
/// record, before the caller hears 202.
pub async fn enqueue(
    store: &Store,
    mut inv: AsyncInvocation,
    payload: &[u8],
) -> Result<(), ApiError> {
    inv.created_ms = now_ms();
    if payload.len() > INLINE_PAYLOAD {
        store
            .compare_and_swap(
                &payload_key(&inv.account, &inv.request_id),
                Expect::Absent,
                payload,
                None,
            )
            .await
            .map_err(store_err)?
            .ok_or_else(|| ApiError::conflict("request id already queued"))?;
        inv.payload = String::new();
        inv.payload_stored = true;
    } else {
        inv.payload = String::from_utf8_lossy(payload).into_owned();
    }
    let body = inv.to_record();
    store
        .compare_and_swap(
            &queued_key(&inv.account, &inv.request_id),
            Expect::Absent,
            &body,
            None,
        )
        .await
        .map_err(store_err)?
        .ok_or_else(|| ApiError::conflict("request id already queued"))?;
    Ok(())
}

/// The invocation, queued or done, if it is the account's.
pub async fn get(store: &Store, account: &str, id: &str) -> Result<AsyncInvocation, ApiError> {
    for k in [done_key(account, id), queued_key(account, id)] {
        if let Some(v) = store.get(&k).await.map_err(store_err)? {
            if let Ok(inv) = serde_json::from_slice(&v.value) {
                return Ok(inv);
            }
        }
    }
    Err(ApiError::not_found(format!(
        "async invocation {id} not found"
    )))
}

/// Starts delivering queued invocations that are due (leader only): at
/// most [`PARALLEL`] at once and [`PARALLEL_PER_ACCOUNT`] of one account,
/// taken in turn across accounts, so that one account's events (slow,
/// failing or many) cannot hold delivery up for the others.
pub async fn deliver_due(c: &Arc<Cluster>) {
    let queued = match c.store.list(QUEUED_PREFIX).await {
        Ok(q) => q,
        Err(e) => {
            log::warn!("async queue: {e}");
            return;
        }
    };
    let now = now_ms();
    // Due events per account, in key order.
    let mut due: BTreeMap<String, Due<(AsyncInvocation, i64)>> = BTreeMap::new();
    for (key, v) in queued {
        let Ok(inv) = serde_json::from_slice::<AsyncInvocation>(&v.value) else {
            continue;
        };
        if inv.not_before_ms > now {
            continue;
        }
        due.entry(inv.account.clone())
            .or_default()
            .push_back((key, (inv, v.version)));
    }
    let start = {
        let mut busy = c.delivering.lock().unwrap_or_else(|p| p.into_inner());
        pick(due, &mut busy)
    };
    for (key, (inv, version)) in start {
        let c = c.clone();
        tokio::spawn(async move {
            deliver(&c, inv, version).await;
            c.delivering
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
        });
    }
}

/// An account's due events: `(queued key, item)`, in key order.
type Due<T> = VecDeque<(String, T)>;

/// Which of `due` (per account, each `(queued key, item)`) start now,
/// given the keys `busy` already: round robin across accounts, one of
/// each in turn, at most [`PARALLEL`] busy in all and
/// [`PARALLEL_PER_ACCOUNT`] of one account. The chosen go into `busy`.
fn pick<T>(mut due: BTreeMap<String, Due<T>>, busy: &mut HashSet<String>) -> Vec<(String, T)> {
    let mut running: HashMap<String, usize> = HashMap::new();
    for k in busy.iter() {
        if let Some(acct) = k
            .strip_prefix(QUEUED_PREFIX)
            .and_then(|r| r.split('/').next())
        {
            *running.entry(acct.to_string()).or_default() += 1;
        }
    }
    let mut start = Vec::new();
    while busy.len() < PARALLEL && !due.is_empty() {
        let mut emptied = Vec::new();
        for (acct, list) in due.iter_mut() {
            if busy.len() >= PARALLEL {
                break;
            }
            let n = running.entry(acct.clone()).or_default();
            let Some((key, item)) = list.pop_front().filter(|_| *n < PARALLEL_PER_ACCOUNT) else {
                emptied.push(acct.clone());
                continue;
            };
            if busy.insert(key.clone()) {
                *n += 1;
                start.push((key, item));
            }
        }
        for a in emptied {
            due.remove(&a);
        }
    }
    start
}

/// The event's payload.
async fn payload_of(c: &Cluster, inv: &AsyncInvocation) -> Result<Vec<u8>, ApiError> {
    if !inv.payload_stored {
        return Ok(inv.payload.clone().into_bytes());
    }
    match c
        .store
        .get(&payload_key(&inv.account, &inv.request_id))
        .await
        .map_err(store_err)?
    {
        Some(v) => Ok(v.value),
        None => Err(ApiError::not_found("the event's payload is gone")),
    }
}

/// One attempt of `inv` (read at `version`), counted before it runs.
async fn deliver(c: &Arc<Cluster>, mut inv: AsyncInvocation, version: i64) {
    let key = queued_key(&inv.account, &inv.request_id);
    let now = now_ms();
    // An outcome written only to the queue, or a run whose outcome was
    // never written with no attempts left: finished, not run again.
    if inv.status != Status::Queued || inv.attempts >= MAX_ATTEMPTS {
        if inv.status == Status::Queued {
            inv.status = Status::Failed;
            if inv.response.is_none() {
                inv.response = Some(
                    "the outcome of the last attempt was not recorded; no attempts are left".into(),
                );
            }
        }
        finish(c, inv, version).await;
        return;
    }
    if inv.created_ms > 0 && now.saturating_sub(inv.created_ms) > MAX_EVENT_AGE_MS {
        inv.status = Status::Failed;
        inv.response = Some(format!(
            "EventAgeExceeded: {}; the event is older than its maximum age",
            inv.response.as_deref().unwrap_or("not delivered")
        ));
        finish(c, inv, version).await;
        return;
    }
    let target = async {
        let rec = functions::get(&c.store, &inv.account, &inv.function_name).await?;
        let v = rec
            .route(inv.qualifier.as_deref(), crate::invoke::roll())
            .cloned()
            .ok_or_else(|| ApiError::not_found("the function's qualifier is gone"))?;
        let payload = payload_of(c, &inv).await?;
        Ok::<_, ApiError>((rec, v, payload))
    }
    .await;
    let (rec, v, payload) = match target {
        Ok(t) => t,
        // Gone: nothing to retry.
        Err(e) if e.status == 404 => {
            inv.response = Some(e.message);
            inv.status = Status::Failed;
            finish(c, inv, version).await;
            return;
        }
        // The store: nothing ran; the next tick tries again.
        Err(e) => {
            log::warn!("async {}: {e}", inv.request_id);
            return;
        }
    };
    // The attempt is counted, in the store, before it runs; until it
    // ends (or its outcome is lost), no one else takes the event up.
    inv.attempts += 1;
    let hold = Duration::from_secs(u64::from(v.spec.timeout) + 360);
    inv.not_before_ms = now + hold.as_millis() as u64;
    let version = match c
        .store
        .compare_and_swap(&key, Expect::Version(version), &inv.to_record(), None)
        .await
    {
        Ok(Some(v)) => v,
        // Changed since listed (another leader has it): leave it.
        Ok(None) => return,
        Err(e) => {
            log::warn!(
                "async {}: cannot count the attempt, not running it: {e}",
                inv.request_id
            );
            return;
        }
    };
    let outcome = crate::invoke::run(c, &rec, &v, payload.into(), false).await;
    let mut throttled = false;
    let retry = match outcome {
        Ok(r) => {
            inv.executed_version = Some(v.version.clone());
            inv.set_response(&r.body);
            inv.function_error = r
                .headers
                .get("x-amz-function-error")
                .and_then(|h| h.to_str().ok())
                .map(str::to_string);
            if r.status.is_success() && inv.function_error.is_none() {
                inv.status = Status::Succeeded;
                false
            } else {
                true
            }
        }
        Err(e) if e.status == 404 => {
            inv.set_response(e.message.as_bytes());
            inv.status = Status::Failed;
            false
        }
        Err(e) => {
            // A throttle is not the function's failure: nothing ran, and
            // it does not count.
            if e.status == 429 {
                inv.attempts -= 1;
                throttled = true;
            }
            inv.set_response(format!("{}: {}", e.kind, e.message).as_bytes());
            true
        }
    };
    if retry && inv.attempts < MAX_ATTEMPTS {
        let delay = if throttled {
            c.cfg.async_retry_delay
        } else {
            c.cfg.async_retry_delay * inv.attempts.max(1)
        };
        inv.not_before_ms = now_ms() + delay.as_millis() as u64;
        // If this fails, the counted attempt and its hold stand: the
        // event is taken up again after the hold, within its attempts.
        if let Err(e) = c
            .store
            .compare_and_swap(&key, Expect::Version(version), &inv.to_record(), None)
            .await
        {
            log::warn!("async {}: {e}", inv.request_id);
        }
        return;
    }
    if retry {
        inv.status = Status::Failed;
    }
    finish(c, inv, version).await;
}

/// Records a final outcome and takes the event out of the queue. The
/// outcome goes first: if it cannot be written, it is written into the
/// queued record instead (so the event is not run again), and moved on a
/// later tick.
async fn finish(c: &Arc<Cluster>, mut inv: AsyncInvocation, version: i64) {
    let body = inv.to_record();
    let key = queued_key(&inv.account, &inv.request_id);
    match c
        .store
        .put(&done_key(&inv.account, &inv.request_id), &body, None)
        .await
    {
        Ok(_) => {
            let _ = c
                .store
                .compare_and_delete(&key, Expect::Version(version))
                .await;
            if inv.payload_stored {
                let pk = payload_key(&inv.account, &inv.request_id);
                if let Ok(Some(p)) = c.store.get(&pk).await {
                    let _ = c
                        .store
                        .compare_and_delete(&pk, Expect::Version(p.version))
                        .await;
                }
            }
        }
        Err(e) => {
            log::warn!("async {}: cannot record the outcome: {e}", inv.request_id);
            inv.not_before_ms = now_ms() + c.cfg.async_retry_delay.as_millis() as u64;
            let body = inv.to_record();
            if let Err(e) = c
                .store
                .compare_and_swap(&key, Expect::Version(version), &body, None)
                .await
            {
                log::warn!("async {}: {e}", inv.request_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn due(of: &[(&str, usize)]) -> BTreeMap<String, Due<()>> {
        of.iter()
            .map(|(acct, n)| {
                let list = (0..*n)
                    .map(|i| (queued_key(acct, &format!("e{i:03}")), ()))
                    .collect();
                (acct.to_string(), list)
            })
            .collect()
    }

    fn of(picked: &[(String, ())], acct: &str) -> usize {
        let prefix = format!("{QUEUED_PREFIX}{acct}/");
        picked
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .count()
    }

    /// Many events of one account (bad ones, say) take at most their
    /// share; another account's event starts in the same round.
    #[test]
    fn one_account_cannot_take_every_slot() {
        let mut busy = HashSet::new();
        let picked = pick(due(&[("111111111111", 50), ("222222222222", 1)]), &mut busy);
        assert_eq!(of(&picked, "111111111111"), PARALLEL_PER_ACCOUNT);
        assert_eq!(of(&picked, "222222222222"), 1);
        // Next tick, with those still running: nothing more for the first.
        let picked = pick(due(&[("111111111111", 50), ("333333333333", 2)]), &mut busy);
        assert_eq!(of(&picked, "111111111111"), 0, "{picked:?}");
        assert_eq!(of(&picked, "333333333333"), 2);
        // Many accounts: never more than PARALLEL at once.
        let many: Vec<(String, usize)> = (0..40).map(|i| (format!("{i:012}"), 3)).collect();
        let many: Vec<(&str, usize)> = many.iter().map(|(a, n)| (a.as_str(), *n)).collect();
        let mut busy = HashSet::new();
        assert_eq!(pick(due(&many), &mut busy).len(), PARALLEL);
        assert_eq!(busy.len(), PARALLEL);
    }

    /// Whatever a function answers, the record stays storable.
    #[test]
    fn records_stay_small() {
        let mut inv = AsyncInvocation {
            payload: "\"".repeat(INLINE_PAYLOAD),
            status: Status::Failed,
            attempts: 3,
            executed_version: Some("1".into()),
            function_error: Some("x".repeat(10_000)),
            created_ms: 1,
            ..AsyncInvocation::queued("r".into(), "111111111111".into(), "f".into(), None)
        };
        // Control bytes: six bytes each once escaped.
        inv.set_response(&vec![1u8; 2 << 20]);
        assert!(inv.response_truncated);
        assert_eq!(inv.response_size, Some(2 << 20));
        let rec = inv.to_record();
        assert!(rec.len() <= MAX_RECORD, "{}", rec.len());
        let back: AsyncInvocation = serde_json::from_slice(&rec).unwrap();
        assert!(back.response_truncated && !back.response.as_deref().unwrap_or("").is_empty());
        assert_eq!(back.payload, inv.payload, "the payload is kept whole");
        let mut small = back.clone();
        small.set_response(b"{\"ok\":1}");
        assert!(!small.response_truncated);
        assert_eq!(cut("\u{e9}\u{e9}", 3), "\u{e9}");
    }

    fn cluster(dir: &std::path::Path) -> Arc<Cluster> {
        let store = embedded_store(dir);
        let files = ember_tls::dev_certs(&dir.join("tls"), "cluster", &["localhost".into()])
            .expect("dev certificates");
        let tls = ember_tls::Tls::load(&files).expect("TLS settings");
        Cluster::new(
            store,
            crate::hostapi::HostClient::new("t", &tls),
            crate::service::Config {
                replica_id: "r".into(),
                region: "us-east-1".into(),
                leader_ttl: Duration::from_secs(6),
                async_retry_delay: Duration::from_millis(10),
                body_budget: 0,
                replay_cache_entries: 0,
            },
        )
    }

    fn embedded_store(dir: &std::path::Path) -> Store {
        Store::Embedded(ember_store::EmbeddedStore::open(dir).unwrap())
    }

    /// An event whose attempts were all counted but whose last outcome was
    /// never written (its leader died, or the store refused the write) is
    /// finished as failed, not run again; and an outcome that was written
    /// only into the queued record is moved, not run again.
    #[tokio::test]
    async fn lost_outcomes_do_not_buy_runs() {
        let dir = tempfile::tempdir().unwrap();
        let c = cluster(dir.path());
        let base = AsyncInvocation {
            payload: "{}".into(),
            attempts: MAX_ATTEMPTS,
            created_ms: now_ms(),
            ..AsyncInvocation::queued("spent".into(), "111111111111".into(), "nosuch".into(), None)
        };
        let mut done = base.clone();
        done.request_id = "recorded".into();
        done.attempts = 1;
        done.status = Status::Succeeded;
        done.response = Some("{}".into());
        for inv in [&base, &done] {
            c.store
                .put(
                    &queued_key(&inv.account, &inv.request_id),
                    &serde_json::to_vec(inv).unwrap(),
                    None,
                )
                .await
                .unwrap();
        }
        deliver_due(&c).await;
        for _ in 0..200 {
            if c.store.list(QUEUED_PREFIX).await.unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(c.store.list(QUEUED_PREFIX).await.unwrap().is_empty());
        let spent = get(&c.store, &base.account, "spent").await.unwrap();
        assert_eq!(
            (spent.status, spent.attempts),
            (Status::Failed, MAX_ATTEMPTS)
        );
        assert!(spent.response.unwrap().contains("not recorded"));
        let recorded = get(&c.store, &base.account, "recorded").await.unwrap();
        assert_eq!((recorded.status, recorded.attempts), (Status::Succeeded, 1));
    }
}
