//! Invoke's request as Lambda reads it, and the headers of its answer.

use bytes::Bytes;
use http::HeaderMap;

use crate::error::ApiError;

/// The headers Invoke reads and answers with.
pub mod header {
    pub const INVOCATION_TYPE: &str = "x-amz-invocation-type";
    pub const LOG_TYPE: &str = "x-amz-log-type";
    pub const REQUEST_ID: &str = "x-amzn-requestid";
    pub const EXECUTED_VERSION: &str = "x-amz-executed-version";
    pub const FUNCTION_ERROR: &str = "x-amz-function-error";
    pub const LOG_RESULT: &str = "x-amz-log-result";
}

/// `X-Amz-Invocation-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvocationType {
    RequestResponse,
    Event,
    DryRun,
}

/// An Invoke request: its type, whether the log's tail is asked for, and
/// the payload (`{}` when the body is empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvokeRequest {
    pub kind: InvocationType,
    pub tail: bool,
    pub payload: Bytes,
}

impl InvokeRequest {
    /// Reads the headers and checks the body is JSON, as Lambda does.
    pub fn parse(headers: &HeaderMap, body: Bytes) -> Result<InvokeRequest, ApiError> {
        let get = |name| headers.get(name).and_then(|v| v.to_str().ok());
        let kind = match get(header::INVOCATION_TYPE).unwrap_or("RequestResponse") {
            "RequestResponse" => InvocationType::RequestResponse,
            "Event" => InvocationType::Event,
            "DryRun" => InvocationType::DryRun,
            other => {
                return Err(ApiError::invalid(format!(
                    "InvocationType {other:?} is not RequestResponse, Event or DryRun"
                )))
            }
        };
        let tail = match get(header::LOG_TYPE).unwrap_or("None") {
            "Tail" => true,
            "None" => false,
            other => {
                return Err(ApiError::invalid(format!(
                    "LogType {other:?} is not Tail or None"
                )))
            }
        };
        if !body.is_empty() && serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
            return Err(ApiError::bad_request(
                "Could not parse request body into json",
            ));
        }
        let payload = if body.is_empty() {
            Bytes::from_static(b"{}")
        } else {
            body
        };
        Ok(InvokeRequest {
            kind,
            tail,
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(
        pairs: &[(&'static str, &'static str)],
        body: &'static [u8],
    ) -> Result<InvokeRequest, ApiError> {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        InvokeRequest::parse(&h, Bytes::from_static(body))
    }

    #[test]
    fn headers_and_body_as_lambda_reads_them() {
        let r = req(&[], b"").unwrap();
        assert_eq!(
            (r.kind, r.tail, &r.payload[..]),
            (InvocationType::RequestResponse, false, &b"{}"[..])
        );
        let r = req(
            &[
                (header::INVOCATION_TYPE, "Event"),
                (header::LOG_TYPE, "Tail"),
            ],
            b"[1]",
        )
        .unwrap();
        assert_eq!((r.kind, r.tail), (InvocationType::Event, true));
        assert_eq!(
            req(&[(header::INVOCATION_TYPE, "Later")], b"")
                .unwrap_err()
                .kind,
            "InvalidParameterValueException"
        );
        assert_eq!(
            req(&[(header::LOG_TYPE, "All")], b"").unwrap_err().status,
            400
        );
        assert_eq!(
            req(&[], b"{nope").unwrap_err().kind,
            "InvalidRequestContentException"
        );
    }
}
