//! hostd's requests of the volume service, over its HTTP API on a unix
//! socket.

use bytes::Bytes;
use serde_json::json;

use super::{check_name, VolumeError, Volumes};
use crate::vm::api_client::raw_request;

/// A request about one volume.
#[derive(Debug, Clone, Copy)]
pub enum ServiceCall<'a> {
    /// The attachment to this host.
    Attach,
    /// The attachment to `host`, with a new generation.
    Move {
        host: &'a str,
    },
    Detach,
    /// The volume's record (its account and size).
    Describe,
}

/// The service's answer as it came.
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

/// A request as sent.
struct Wire {
    method: &'static str,
    uri: String,
    body: serde_json::Value,
}

impl Volumes {
    /// The method, path and body of `call` about `volume`.
    fn wire(&self, volume: &str, call: ServiceCall<'_>) -> Wire {
        let account = &self.service.account;
        let (method, uri, body) = match call {
            ServiceCall::Attach => (
                "POST",
                format!("/v1/volumes/{volume}/attach"),
                json!({"Host": self.service.host_id, "Account": account}),
            ),
            ServiceCall::Move { host } => (
                "POST",
                format!("/v1/volumes/{volume}/move"),
                json!({"Host": host, "Account": account}),
            ),
            ServiceCall::Detach => ("POST", format!("/v1/volumes/{volume}/detach"), json!({})),
            ServiceCall::Describe => ("GET", format!("/v1/volumes/{volume}"), json!({})),
        };
        Wire { method, uri, body }
    }

    /// Sends `w`; its answer whatever it says.
    async fn send(&self, w: &Wire) -> Result<Answer, VolumeError> {
        let r = raw_request(
            &self.service.socket,
            w.method,
            &w.uri,
            &[("Content-Type", "application/json")],
            w.body.to_string().into_bytes(),
        )
        .await
        .map_err(VolumeError::Unreachable)?;
        Ok(Answer {
            status: r.status,
            body: r.body,
        })
    }

    /// `call` about `volume`: the body of a successful answer, else why not.
    pub(super) async fn call(
        &self,
        volume: &str,
        call: ServiceCall<'_>,
    ) -> Result<Bytes, VolumeError> {
        let w = self.wire(volume, call);
        let r = self.send(&w).await?;
        if (200..300).contains(&r.status) {
            return Ok(r.body);
        }
        Err(VolumeError::Refused {
            status: r.status,
            method: w.method,
            uri: w.uri,
            body: String::from_utf8_lossy(&r.body).into_owned(),
        })
    }

    /// `call` about `volume` for hostd's own volume API, whose caller gets
    /// the service's answer as it came (the fencing token and the URIs).
    pub async fn relay(&self, volume: &str, call: ServiceCall<'_>) -> Result<Answer, VolumeError> {
        check_name(volume)?;
        self.send(&self.wire(volume, call)).await
    }
}
