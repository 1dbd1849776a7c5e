//! Invoke: `RequestResponse` (wait for the result), `Event` (queue it),
//! `DryRun` (check only).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;

use super::function_ref;
use super::functions::QualifierQuery;
use crate::daemon::Daemon;
use crate::invoke::new_request_id;
use ember_lambda::error::ApiError;

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

pub async fn invoke(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (name, from_path) = function_ref(&d, &name)?;
    let qualifier = q.qualifier.or(from_path);
    let kind = header(&headers, "x-amz-invocation-type").unwrap_or("RequestResponse");
    let tail = match header(&headers, "x-amz-log-type").unwrap_or("None") {
        "Tail" => true,
        "None" => false,
        other => {
            return Err(ApiError::invalid(format!(
                "LogType {other:?} is not Tail or None"
            )))
        }
    };
    if !body.is_empty() && serde_json::from_slice::<serde_json::Value>(&body).is_err() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidRequestContentException",
            "Could not parse request body into json",
        ));
    }
    let payload = if body.is_empty() {
        b"{}".to_vec()
    } else {
        body.to_vec()
    };
    let request_id = new_request_id();
    let rid = HeaderValue::from_str(&request_id).map_err(|e| ApiError::service(e.to_string()))?;
    match kind {
        "RequestResponse" => {
            let out =
                crate::invoke::invoke(&d, &name, qualifier.as_deref(), payload, request_id).await?;
            let mut resp = (StatusCode::OK, out.payload.clone()).into_response();
            let h = resp.headers_mut();
            h.insert("content-type", HeaderValue::from_static("application/json"));
            h.insert("x-amzn-RequestId", rid);
            if let Ok(v) = HeaderValue::from_str(&out.executed_version) {
                h.insert("X-Amz-Executed-Version", v);
            }
            if let Some(fe) = &out.function_error {
                if let Ok(v) = HeaderValue::from_str(fe) {
                    h.insert("X-Amz-Function-Error", v);
                }
            }
            if tail {
                let b64 = base64::engine::general_purpose::STANDARD.encode(out.log_tail());
                if let Ok(v) = HeaderValue::from_str(&b64) {
                    h.insert("X-Amz-Log-Result", v);
                }
            }
            Ok(resp)
        }
        "Event" => {
            // The function must exist now; its outcome comes later.
            let rec = d.get(&name)?;
            if rec.resolve(qualifier.as_deref()).is_none() {
                return Err(ApiError::not_found(format!(
                    "Function not found: {}",
                    d.function_arn(&name, qualifier.as_deref())
                )));
            }
            d.queue
                .enqueue(&name, qualifier.as_deref(), &payload, request_id)?;
            let mut resp = StatusCode::ACCEPTED.into_response();
            resp.headers_mut().insert("x-amzn-RequestId", rid);
            Ok(resp)
        }
        "DryRun" => {
            let rec = d.get(&name)?;
            if rec.resolve(qualifier.as_deref()).is_none() {
                return Err(ApiError::not_found(format!(
                    "Function not found: {}",
                    d.function_arn(&name, qualifier.as_deref())
                )));
            }
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        other => Err(ApiError::invalid(format!(
            "InvocationType {other:?} is not RequestResponse, Event or DryRun"
        ))),
    }
}
