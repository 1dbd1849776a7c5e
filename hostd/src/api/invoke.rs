//! Invoke: `RequestResponse` (wait for the result), `Event` (queue it),
//! `DryRun` (check only).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;

use super::{function_ref, version_of};
use crate::daemon::Daemon;
use crate::invoke::new_request_id;
use ember_lambda::error::ApiError;
use ember_lambda::invoke::{header, InvocationType, InvokeRequest};
use ember_lambda::shapes::QualifierQuery;

pub async fn invoke(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (name, from_path) = function_ref(&d, &name)?;
    let qualifier = q.qualifier.or(from_path);
    let InvokeRequest {
        kind,
        tail,
        payload,
    } = InvokeRequest::parse(&headers, body)?;
    let payload = payload.to_vec();
    let request_id = new_request_id();
    let rid = HeaderValue::from_str(&request_id).map_err(|e| ApiError::service(e.to_string()))?;
    match kind {
        InvocationType::RequestResponse => {
            let out =
                crate::invoke::invoke(&d, &name, qualifier.as_deref(), payload, request_id).await?;
            let mut resp = (StatusCode::OK, out.payload.clone()).into_response();
            let h = resp.headers_mut();
            h.insert("content-type", HeaderValue::from_static("application/json"));
            h.insert(header::REQUEST_ID, rid);
            if let Ok(v) = HeaderValue::from_str(&out.executed_version) {
                h.insert(header::EXECUTED_VERSION, v);
            }
            if let Some(fe) = &out.function_error {
                if let Ok(v) = HeaderValue::from_str(fe) {
                    h.insert(header::FUNCTION_ERROR, v);
                }
            }
            if tail {
                let b64 = base64::engine::general_purpose::STANDARD.encode(out.log_tail());
                if let Ok(v) = HeaderValue::from_str(&b64) {
                    h.insert(header::LOG_RESULT, v);
                }
            }
            Ok(resp)
        }
        InvocationType::Event => {
            // The function must exist now; its outcome comes later.
            version_of(&d, &d.functions.get(&name)?, qualifier.as_deref())?;
            d.queue
                .enqueue(&name, qualifier.as_deref(), &payload, request_id)?;
            let mut resp = StatusCode::ACCEPTED.into_response();
            resp.headers_mut().insert(header::REQUEST_ID, rid);
            Ok(resp)
        }
        InvocationType::DryRun => {
            version_of(&d, &d.functions.get(&name)?, qualifier.as_deref())?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
    }
}
