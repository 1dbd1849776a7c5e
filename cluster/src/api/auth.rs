//! The front door: every request but the health check must carry a valid
//! SigV4 signature of an access key in the store; the key's account is
//! the caller. In order, so that a stranger costs little:
//!
//! 1. From the headers alone: the `Authorization` header's form, the date
//!    (within the skew), the payload hash if one is claimed (a SHA-256;
//!    `UNSIGNED-PAYLOAD` and `STREAMING-*` are refused), and that the
//!    access key exists. With a claimed hash the signature itself is
//!    checked here too, and the replay cache consulted.
//! 2. The body's size against the operation's limit (Lambda's): a
//!    declared `Content-Length` over it is refused before a byte is read,
//!    a body that grows past it while read is refused at the limit.
//! 3. Room in the replica's budget for bodies in memory (bytes, for all
//!    requests at once), else a throttling error after a short wait.
//! 4. The body, hashed as it comes; then the signature over its hash (or
//!    the hash checked against the claimed one), and the replay cache.
//!
//! Refusals are AWS's error types (403 for signatures, 413 for sizes,
//! 429 for throttling) and never carry a secret or a stored value.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};

use super::Caller;
use crate::queue::MAX_ASYNC_PAYLOAD;
use crate::replay::Refusal;
use crate::service::Cluster;
use crate::sigv4::{self, AuthError};
use ember_lambda::error::ApiError;
use ember_lambda::operations::Operation;

/// CreateFunction and UpdateFunctionCode: a 50 MB zip, base64, in JSON
/// (the figure Lambda's own refusal names).
pub const MAX_CODE_BODY: usize = 70_167_211;
pub use ember_lambda::limits::MAX_SYNC_PAYLOAD;
/// Every other operation: small JSON.
pub const MAX_CONTROL_BODY: usize = 256 * 1024;
/// How long a request waits for room in the body budget.
const BUDGET_WAIT: Duration = Duration::from_secs(10);
/// How long a body may take to arrive once room is given.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(300);

fn refused(e: AuthError) -> Response {
    ApiError::new(StatusCode::FORBIDDEN, e.code(), e.to_string()).into_response()
}

fn replay_refused(r: Refusal) -> Response {
    let msg = match r {
        Refusal::Replayed => {
            "This request's signature was already used (a replay, or the same request sent twice within one second); sign it again"
        }
        Refusal::Full => "Rate Exceeded: too many signed requests from this access key in the last 15 minutes",
    };
    ApiError::throttled(msg).into_response()
}

/// The size limit of the operation a request is for, and its refusal.
fn body_limit(op: Option<Operation>, headers: &HeaderMap) -> (usize, ApiError) {
    let entity = |op: &str, max: usize| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLargeException",
            format!("Request must be smaller than {max} bytes for the {op} operation"),
        )
    };
    match op {
        Some(Operation::CreateFunction) => (MAX_CODE_BODY, entity("CreateFunction", MAX_CODE_BODY)),
        Some(Operation::UpdateFunctionCode) => {
            (MAX_CODE_BODY, entity("UpdateFunctionCode", MAX_CODE_BODY))
        }
        Some(Operation::Invoke) => {
            let event = headers
                .get(ember_lambda::invoke::header::INVOCATION_TYPE)
                .is_some_and(|v| v.as_bytes() == b"Event");
            let (max, op) = if event {
                (MAX_ASYNC_PAYLOAD, "InvokeAsync")
            } else {
                (MAX_SYNC_PAYLOAD, "InvokeFunction")
            };
            (
                max,
                ApiError::too_large(format!(
                    "Request must be smaller than {max} bytes for the {op} operation"
                )),
            )
        }
        _ => (MAX_CONTROL_BODY, entity("requested", MAX_CONTROL_BODY)),
    }
}

/// An access key id as AWS forms them; anything else is not looked up.
fn plausible_key_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Reads at most `limit` bytes of `body` (`expected` reserved), hashing
/// them; Err(None) when it grows past the limit, Err(Some(text)) when
/// it cannot be read.
async fn read_body(
    body: Body,
    limit: usize,
    expected: usize,
) -> Result<(Bytes, [u8; 32]), Option<String>> {
    let mut body = body;
    // Sized up front when declared (no copies as it grows); else grown.
    let mut buf = Vec::with_capacity(expected.min(limit));
    let mut hash = Sha256::new();
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| Some(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if buf.len() + data.len() > limit {
                return Err(None);
            }
            hash.update(&data);
            buf.extend_from_slice(&data);
        }
        Ok(())
    };
    match tokio::time::timeout(BODY_READ_TIMEOUT, read).await {
        Ok(Ok(())) => Ok((Bytes::from(buf), hash.finalize().into())),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Some(format!(
            "the body did not arrive within {BODY_READ_TIMEOUT:?}"
        ))),
    }
}

pub async fn authenticate(State(c): State<Arc<Cluster>>, req: Request, next: Next) -> Response {
    if req.uri().path() == "/ember/v1/health" {
        return next.run(req).await;
    }
    let (mut parts, body) = req.into_parts();
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let method = parts.method.as_str().to_string();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or("").to_string();
    let signed = sigv4::Request {
        method: &method,
        path: &path,
        query: &query,
        headers: &headers,
        body: b"",
    };
    let now = jiff::Timestamp::now();

    // 1. The headers.
    let pre = match sigv4::check_headers(&headers, now) {
        Ok(p) => p,
        Err(e) => return refused(e),
    };
    if !plausible_key_id(pre.access_key()) {
        return refused(AuthError::UnknownKey);
    }
    let key = match crate::accounts::find_key(&c.store, pre.access_key()).await {
        Ok(Some(k)) if k.access_key_id == pre.access_key() => k,
        Ok(_) => return refused(AuthError::UnknownKey),
        Err(e) => {
            log::warn!("access key lookup: {e}");
            return ApiError::service("the cluster store is unavailable; try again")
                .into_response();
        }
    };
    // Reads change nothing: a replayed GET gains nothing the original's
    // answer did not show, and pollers send identical GETs each second.
    let cached = !matches!(parts.method, Method::GET | Method::HEAD);
    let admit = || {
        if !cached {
            return Ok(());
        }
        c.replay.admit(
            pre.signature(),
            &key.access_key_id,
            pre.signed_at().as_second(),
            now.as_second(),
        )
    };
    if let Some(claimed) = pre.claimed_hash() {
        if let Err(e) = sigv4::verify_signature(&signed, &pre, claimed, &key.secret_access_key) {
            return refused(e);
        }
        if let Err(r) = admit() {
            return replay_refused(r);
        }
    }

    // 2. The size.
    let op = Operation::of(&parts.method, parts.uri.path());
    let (limit, too_large) = body_limit(op, &parts.headers);
    let hint = body.size_hint();
    if hint.lower() > limit as u64 {
        return too_large.into_response();
    }
    let expected = match hint.exact() {
        Some(n) => n as usize,
        None => limit,
    };

    // 3. Room for it.
    let permits = u32::try_from(expected.min(c.body_budget)).unwrap_or(u32::MAX);
    let permit =
        match tokio::time::timeout(BUDGET_WAIT, c.bodies.clone().acquire_many_owned(permits)).await
        {
            Ok(Ok(p)) => p,
            _ => {
                return ApiError::throttled(
                    "Rate Exceeded: too many large requests are in progress; try again",
                )
                .into_response()
            }
        };

    // 4. The body, then what depends on it.
    let capacity = hint.exact().map_or(64 * 1024, |n| n as usize);
    let (body, body_hash) = match read_body(body, limit, capacity).await {
        Ok(b) => b,
        Err(None) => return too_large.into_response(),
        Err(Some(e)) => {
            return ApiError::bad_request(format!("could not read the request body: {e}"))
                .into_response()
        }
    };
    match pre.claimed_hash() {
        Some(claimed) => {
            if !sigv4::body_matches(claimed, &body_hash) {
                return refused(AuthError::Mismatch);
            }
        }
        None => {
            let hash = hex::encode(body_hash);
            if let Err(e) = sigv4::verify_signature(&signed, &pre, &hash, &key.secret_access_key) {
                return refused(e);
            }
            if let Err(r) = admit() {
                return replay_refused(r);
            }
        }
    }
    parts.extensions.insert(Caller {
        account: key.account.clone(),
    });
    let resp = next.run(Request::from_parts(parts, Body::from(body))).await;
    // The budget covers the handler's copies of the body too.
    drop(permit);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_operation() {
        use Operation::*;
        let none = HeaderMap::new();
        let mut event = HeaderMap::new();
        event.insert("x-amz-invocation-type", "Event".parse().unwrap());
        assert_eq!(body_limit(Some(CreateFunction), &none).0, MAX_CODE_BODY);
        assert_eq!(body_limit(Some(UpdateFunctionCode), &none).0, MAX_CODE_BODY);
        assert_eq!(body_limit(Some(Invoke), &none).0, MAX_SYNC_PAYLOAD);
        let (n, e) = body_limit(Some(Invoke), &event);
        assert_eq!((n, e.status.as_u16()), (MAX_ASYNC_PAYLOAD, 413));
        let (n, e) = body_limit(Some(PutFunctionConcurrency), &none);
        assert_eq!(
            (n, e.kind),
            (MAX_CONTROL_BODY, "RequestEntityTooLargeException")
        );
        assert_eq!(body_limit(None, &none).0, MAX_CONTROL_BODY);
    }

    #[test]
    fn key_ids_looked_up() {
        assert!(plausible_key_id("AKIAEXAMPLE0123"));
        assert!(!plausible_key_id(""));
        assert!(!plausible_key_id("../keys/x"));
        assert!(!plausible_key_id(&"A".repeat(129)));
    }
}
