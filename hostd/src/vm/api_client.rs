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
    #[error("VMM API {method} {uri}: no answer within {timeout:?}")]
    Timeout {
        method: String,
        uri: String,
        timeout: Duration,
    },
}

/// The longest one request may take, answer included: a VMM that stops
/// answering (hung, or taken over by its guest) costs an instance, never a
/// task of hostd's. Generous, for snapshots of large guests on slow disks.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// The largest answer read: the API's answers are small JSON documents.
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

/// A raw answer: status, headers, body.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

/// One HTTP/1.1 request over the unix socket `sock`, within
/// [`REQUEST_TIMEOUT`], its answer at most [`MAX_ANSWER_BYTES`].
pub async fn raw_request(
    sock: &Path,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<RawResponse, ApiError> {
    request_within(REQUEST_TIMEOUT, sock, method, uri, headers, body).await
}

async fn request_within(
    timeout: Duration,
    sock: &Path,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<RawResponse, ApiError> {
    tokio::time::timeout(timeout, request_unbounded(sock, method, uri, headers, body))
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::Timeout {
                method: method.to_string(),
                uri: uri.to_string(),
                timeout,
            })
        })
}

async fn request_unbounded(
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
    let body = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|e| http_err(format!("reading the answer: {e}")))?
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server on a unix socket that reads a request and then does `then`.
    async fn server(
        dir: &Path,
        then: impl FnOnce(tokio::net::UnixStream) -> tokio::task::JoinHandle<()> + Send + 'static,
    ) -> std::path::PathBuf {
        let sock = dir.join("api.sock");
        let l = tokio::net::UnixListener::bind(&sock).unwrap();
        tokio::spawn(async move {
            let (mut c, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf).await;
            let _ = then(c).await;
        });
        sock
    }

    #[tokio::test]
    async fn a_silent_vmm_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let sock = server(dir.path(), |c| {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(30)).await;
                drop(c);
            })
        })
        .await;
        let e = request_within(Duration::from_millis(300), &sock, "GET", "/", &[], vec![])
            .await
            .unwrap_err();
        assert!(matches!(e, ApiError::Timeout { .. }), "{e}");
    }

    #[tokio::test]
    async fn an_endless_answer_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let sock = server(dir.path(), |mut c| {
            tokio::spawn(async move {
                let head = "HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n";
                if c.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![b'x'; 64 << 10];
                // Stops when the client hangs up.
                for _ in 0..(1 << 14) {
                    if c.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
            })
        })
        .await;
        let e = request_within(Duration::from_secs(60), &sock, "GET", "/", &[], vec![])
            .await
            .unwrap_err();
        assert!(e.to_string().contains("reading the answer"), "{e}");
    }
}
