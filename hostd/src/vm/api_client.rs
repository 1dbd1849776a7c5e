//! A client for ember-vmm's HTTP API on its unix socket (hyper, one
//! connection per request: requests are few and the socket is local).

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot reach the VMM API at {path}: {err}")]
    Connect { path: String, err: std::io::Error },
    #[error("VMM API {method} {uri}: {err}")]
    Http {
        method: String,
        uri: String,
        err: String,
    },
    #[error("VMM API {method} {uri} answered {status}: {body}")]
    Status {
        method: String,
        uri: String,
        status: u16,
        body: String,
    },
    #[error("the VMM API socket did not appear within {0:?}")]
    NotReady(Duration),
}

/// A raw answer: status, headers, body.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

/// One HTTP/1.1 request over the unix socket `sock`.
pub async fn raw_request(
    sock: &Path,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<RawResponse, ApiError> {
    let http_err = |err: String| ApiError::Http {
        method: method.to_string(),
        uri: uri.to_string(),
        err,
    };
    let stream = UnixStream::connect(sock)
        .await
        .map_err(|err| ApiError::Connect {
            path: sock.display().to_string(),
            err,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| http_err(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("Host", "localhost")
        .header("Content-Type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| http_err(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| http_err(e.to_string()))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| http_err(e.to_string()))?
        .to_bytes();
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

/// Sends one request; a 2xx answer returns its body, anything else an error
/// carrying the VMM's `fault_message`.
pub async fn call(
    sock: &Path,
    method: &str,
    uri: &str,
    body: Option<&serde_json::Value>,
) -> Result<String, ApiError> {
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let resp = raw_request(sock, method, uri, &[], payload.into_bytes()).await?;
    let text = String::from_utf8_lossy(&resp.body).into_owned();
    if (200..300).contains(&resp.status) {
        Ok(text)
    } else {
        Err(ApiError::Status {
            method: method.to_string(),
            uri: uri.to_string(),
            status: resp.status,
            body: text,
        })
    }
}

pub async fn put(sock: &Path, uri: &str, body: serde_json::Value) -> Result<String, ApiError> {
    call(sock, "PUT", uri, Some(&body)).await
}

pub async fn patch(sock: &Path, uri: &str, body: serde_json::Value) -> Result<String, ApiError> {
    call(sock, "PATCH", uri, Some(&body)).await
}

/// Waits until the API answers `GET /` (the VMM binds it early, but the
/// process may still be starting).
pub async fn wait_ready(sock: &Path, timeout: Duration) -> Result<(), ApiError> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(1);
    loop {
        match call(sock, "GET", "/", None).await {
            Ok(_) => return Ok(()),
            Err(ApiError::Connect { .. }) if start.elapsed() < timeout => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(20));
            }
            Err(ApiError::Connect { .. }) => return Err(ApiError::NotReady(timeout)),
            Err(e) => return Err(e),
        }
    }
}
