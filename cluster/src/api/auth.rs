//! Every request but the health check must carry a valid SigV4 signature
//! of an access key in the store; the key's account is the caller. A bad,
//! missing or stale signature is a 403 with AWS's error type for it.

use std::sync::Arc;

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{Caller, MAX_BODY};
use crate::error::ApiError;
use crate::service::Cluster;
use crate::sigv4::{self, AuthError};

fn refused(e: AuthError) -> Response {
    ApiError::new(StatusCode::FORBIDDEN, e.code(), e.to_string()).into_response()
}

/// The access key named in a SigV4 `Authorization` header.
fn access_key_of(auth: &str) -> Option<&str> {
    let cred = auth.split("Credential=").nth(1)?;
    cred.split('/').next()
}

pub async fn authenticate(State(c): State<Arc<Cluster>>, req: Request, next: Next) -> Response {
    if req.uri().path() == "/ember/v1/health" {
        return next.run(req).await;
    }
    let (mut parts, body) = req.into_parts();
    let body = match to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => {
            return ApiError::too_large(format!("request body: {e}")).into_response();
        }
    };
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
    let key_id = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(access_key_of)
        .map(str::to_string);
    let key = match &key_id {
        Some(id) => match crate::accounts::find_key(&c.store, id).await {
            Ok(k) => k,
            Err(e) => return ApiError::service(format!("cluster store: {e}")).into_response(),
        },
        None => None,
    };
    let signed = sigv4::Request {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or(""),
        headers: &headers,
        body: &body,
    };
    let account = key.as_ref().map(|k| k.account.clone());
    let verified = sigv4::verify(&signed, jiff::Timestamp::now(), |id| {
        key.filter(|k| k.access_key_id == id)
            .map(|k| k.secret_access_key)
    });
    match (verified, account) {
        (Ok(_), Some(account)) => {
            parts.extensions.insert(Caller { account });
            next.run(Request::from_parts(parts, Body::from(body))).await
        }
        (Ok(_), None) => refused(AuthError::UnknownKey),
        (Err(e), _) => refused(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_access_key_comes_from_the_credential() {
        assert_eq!(
            access_key_of("AWS4-HMAC-SHA256 Credential=AKIAX/20240101/us-east-1/lambda/aws4_request, SignedHeaders=host, Signature=00"),
            Some("AKIAX")
        );
        assert_eq!(access_key_of("Basic abc"), None);
    }
}
