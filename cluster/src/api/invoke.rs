//! Invoke: `RequestResponse` proxied to a host, `Event` kept in the
//! cluster's queue and delivered by the leader, `DryRun` checked only.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::{function_ref, Caller, MAX_SYNC_PAYLOAD};
use crate::functions as records;
use crate::queue::{self, AsyncInvocation, MAX_ASYNC_PAYLOAD};
use crate::service::Cluster;
use ember_lambda::error::ApiError;
use ember_lambda::invoke::{header, InvocationType, InvokeRequest};
use ember_lambda::shapes::QualifierQuery;

pub async fn invoke(
    State(c): State<Arc<Cluster>>,
    Extension(who): Extension<Caller>,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (name, from_path) = function_ref(&who, &name)?;
    let qualifier = q.qualifier.or(from_path);
    let InvokeRequest {
        kind,
        tail,
        payload,
    } = InvokeRequest::parse(&headers, body)?;
    let rec = records::get(&c.store, &who.account, &name).await?;
    let v = rec
        .route(qualifier.as_deref(), crate::invoke::roll())
        .cloned()
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "Function not found: {}",
                rec.arn(&c.cfg.region, qualifier.as_deref())
            ))
        })?;
    let request_id = uuid::Uuid::new_v4().to_string();
    let rid = HeaderValue::from_str(&request_id).map_err(|e| ApiError::service(e.to_string()))?;
    match kind {
        InvocationType::Event => {
            if payload.len() > MAX_ASYNC_PAYLOAD {
                return Err(ApiError::too_large(format!(
                    "Request must be smaller than {MAX_ASYNC_PAYLOAD} bytes for the InvokeAsync operation"
                )));
            }
            let inv = AsyncInvocation::queued(request_id, who.account.clone(), name, qualifier);
            queue::enqueue(&c.store, inv, &payload).await?;
            let mut resp = StatusCode::ACCEPTED.into_response();
            resp.headers_mut().insert(header::REQUEST_ID, rid);
            Ok(resp)
        }
        InvocationType::DryRun => Ok(StatusCode::NO_CONTENT.into_response()),
        InvocationType::RequestResponse => {
            if payload.len() > MAX_SYNC_PAYLOAD {
                return Err(ApiError::too_large(format!(
                    "Request must be smaller than {MAX_SYNC_PAYLOAD} bytes for the InvokeFunction operation"
                )));
            }
            let r = crate::invoke::run(&c, &rec, &v, payload, tail).await?;
            if !r.status.is_success() {
                return Err(crate::deploy::host_error(&r));
            }
            let mut resp = (r.status, r.body.clone()).into_response();
            let h = resp.headers_mut();
            h.insert("content-type", HeaderValue::from_static("application/json"));
            h.insert(header::REQUEST_ID, rid);
            if let Ok(ver) = HeaderValue::from_str(&v.version) {
                h.insert(header::EXECUTED_VERSION, ver);
            }
            for name in [header::FUNCTION_ERROR, header::LOG_RESULT] {
                if let Some(val) = r.headers.get(name) {
                    h.insert(name, val.clone());
                }
            }
            Ok(resp)
        }
    }
}

/// Ember: an async invocation's outcome and attempts.
pub async fn get_async(
    State(c): State<Arc<Cluster>>,
    Extension(who): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<AsyncInvocation>, ApiError> {
    Ok(Json(queue::get(&c.store, &who.account, &id).await?))
}
