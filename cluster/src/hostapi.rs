//! The cluster's client for host daemons' APIs (emberd `--listen-tcp`):
//! Lambda's REST shapes, each request with the hosts' bearer token, over
//! mutual TLS only (`https://`; a plain `http://` endpoint is refused, so
//! the token never crosses the network in the clear).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// A host's answer.
#[derive(Debug, Clone)]
pub struct HostReply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl HostReply {
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The Lambda error type a host answered with, if any.
    pub fn error_type(&self) -> Option<&str> {
        self.headers
            .get("x-amzn-errortype")
            .and_then(|v| v.to_str().ok())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The request never reached the host (nothing ran there).
    #[error("cannot reach host: {0}")]
    Connect(String),
    /// Sent, but no (complete) answer: it may have run.
    #[error("host did not answer: {0}")]
    Failed(String),
}

#[derive(Clone)]
pub struct HostClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    token: String,
}

impl HostClient {
    /// A client presenting `tls`'s certificate and checking the hosts'
    /// against its CA.
    pub fn new(token: &str, tls: &ember_tls::Tls) -> HostClient {
        let mut conn = HttpConnector::new();
        conn.set_connect_timeout(Some(Duration::from_secs(5)));
        conn.set_nodelay(true);
        conn.enforce_http(false);
        let conn = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls.client).clone())
            .https_only()
            .enable_http1()
            .wrap_connector(conn);
        HostClient {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(conn),
            token: token.trim().to_string(),
        }
    }

    /// One request to `endpoint` (`https://host:port`) + `path`, answered
    /// within `timeout`.
    pub async fn call(
        &self,
        endpoint: &str,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
        timeout: Duration,
    ) -> Result<HostReply, HostError> {
        let uri = format!("{}{path}", endpoint.trim_end_matches('/'));
        if !uri.starts_with("https://") {
            return Err(HostError::Connect(format!(
                "{uri}: hosts are reached over https:// only (mutual TLS); refusing to send \
                 the token in the clear"
            )));
        }
        let mut req = Request::builder()
            .method(method)
            .uri(&uri)
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| HostError::Connect(format!("{uri}: {e}")))?;
        let call = async {
            let resp = self.client.request(req).await.map_err(|e| {
                if e.is_connect() {
                    HostError::Connect(format!("{uri}: {e}"))
                } else {
                    HostError::Failed(format!("{uri}: {e}"))
                }
            })?;
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| HostError::Failed(format!("{uri}: {e}")))?
                .to_bytes();
            Ok(HostReply {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| HostError::Failed(format!("{uri}: no answer within {timeout:?}")))?
    }

    pub async fn json(
        &self,
        endpoint: &str,
        method: Method,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<HostReply, HostError> {
        self.call(
            endpoint,
            method,
            path,
            &[],
            Bytes::from(body.to_string()),
            Duration::from_secs(120),
        )
        .await
    }

    pub async fn get(&self, endpoint: &str, path: &str) -> Result<HostReply, HostError> {
        self.call(
            endpoint,
            Method::GET,
            path,
            &[],
            Bytes::new(),
            Duration::from_secs(30),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain `http://` host is refused before anything is sent: the
    /// token never leaves in the clear.
    #[tokio::test]
    async fn plain_http_hosts_are_refused_unsent() {
        let dir = tempfile::tempdir().unwrap();
        let files = ember_tls::dev_certs(dir.path(), "cluster", &["localhost".into()]).unwrap();
        let tls = ember_tls::Tls::load(&files).unwrap();
        let client = HostClient::new("a-token-of-some-length", &tls);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        match client.get(&url, "/ember/v1/health").await {
            Err(HostError::Connect(m)) => assert!(m.contains("https://"), "{m}"),
            other => panic!("{other:?}"),
        }
        let nothing = l.accept().map(|_| ()).unwrap_err();
        assert_eq!(nothing.kind(), std::io::ErrorKind::WouldBlock);
    }
}
