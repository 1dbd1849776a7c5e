//! A typed client of `ember-vmm`'s API on its unix socket: hyper, one
//! connection per request (requests are few and the socket is local),
//! every request bounded in time and every answer in size.
//!
//! [`VmmClient`] has a method per route, taking and answering the shapes
//! of this crate; [`raw_request`] is the HTTP/1.1-over-a-unix-socket
//! underneath, for other local APIs and for tests of the wire itself.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

use crate::{
    ActionType, BlockDeviceConfig, BlockDeviceUpdate, BootSourceConfig, CreateSnapshotParams,
    FaultBody, FillStatus, InstanceActionInfo, InstanceInfo, LoadSnapshotParams, MachineConfig,
    MachineConfigUpdate, MetricsConfig, MigrationStatus, NetworkInterfaceConfig,
    NetworkInterfaceUpdate, ReceiveMigrationParams, SaveWorkingSetParams, SendMigrationParams,
    SwitchOverParams, VmResources, VmState, VmStateUpdate, VsockConfig, WorkingSetStatus,
};

/// Why a request to the API failed.
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
    /// The VMM refused: `body` is its answer (`{"fault_message": ...}`,
    /// see [`ApiError::fault_message`]).
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
    #[error("VMM API {method} {uri}: cannot encode the request: {err}")]
    Encode {
        method: String,
        uri: String,
        err: String,
    },
    #[error("VMM API {method} {uri}: unexpected answer: {err}")]
    Decode {
        method: String,
        uri: String,
        err: String,
    },
}

impl ApiError {
    /// The VMM's `fault_message`, when it refused with one.
    pub fn fault_message(&self) -> Option<String> {
        match self {
            ApiError::Status { body, .. } => serde_json::from_str::<FaultBody>(body)
                .ok()
                .map(|f| f.fault_message),
            _ => None,
        }
    }

    /// The HTTP status, when the VMM answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The longest one request may take, answer included: a VMM that stops
/// answering (hung, or taken over by its guest) costs its caller one
/// request, never a task for good. Generous, for snapshots of large guests
/// on slow disks.
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
    request_within(sock, method, uri, headers, body, REQUEST_TIMEOUT).await
}

async fn request_within(
    sock: &Path,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
    timeout: Duration,
) -> Result<RawResponse, ApiError> {
    let http_err = |err: String| ApiError::Http {
        method: method.to_string(),
        uri: uri.to_string(),
        err,
    };
    let exchange = async {
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
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::Timeout {
                method: method.to_string(),
                uri: uri.to_string(),
                timeout,
            })
        })
}

/// The client of one VMM's API socket.
#[derive(Debug, Clone)]
pub struct VmmClient {
    socket: PathBuf,
    timeout: Duration,
}

impl VmmClient {
    /// A client of the API on `socket`, each request within
    /// [`REQUEST_TIMEOUT`].
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        VmmClient {
            socket: socket.into(),
            timeout: REQUEST_TIMEOUT,
        }
    }

    /// The same client with another bound on each request.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends `body` (none: an empty body); a 2xx answer returns its body,
    /// anything else [`ApiError::Status`].
    pub async fn request<B: Serialize + ?Sized>(
        &self,
        method: &str,
        uri: &str,
        body: Option<&B>,
    ) -> Result<Bytes, ApiError> {
        let payload = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| ApiError::Encode {
                method: method.to_string(),
                uri: uri.to_string(),
                err: e.to_string(),
            })?,
            None => Vec::new(),
        };
        let resp = request_within(&self.socket, method, uri, &[], payload, self.timeout).await?;
        if (200..300).contains(&resp.status) {
            Ok(resp.body)
        } else {
            Err(ApiError::Status {
                method: method.to_string(),
                uri: uri.to_string(),
                status: resp.status,
                body: String::from_utf8_lossy(&resp.body).into_owned(),
            })
        }
    }

    async fn put<B: Serialize + ?Sized>(&self, uri: &str, body: &B) -> Result<(), ApiError> {
        self.request("PUT", uri, Some(body)).await.map(drop)
    }

    async fn patch<B: Serialize + ?Sized>(&self, uri: &str, body: &B) -> Result<(), ApiError> {
        self.request("PATCH", uri, Some(body)).await.map(drop)
    }

    async fn get<T: DeserializeOwned>(&self, uri: &str) -> Result<T, ApiError> {
        let body = self.request::<()>("GET", uri, None).await?;
        serde_json::from_slice(&body).map_err(|e| ApiError::Decode {
            method: "GET".to_string(),
            uri: uri.to_string(),
            err: e.to_string(),
        })
    }

    /// Waits until the API answers `GET /` (the VMM binds it early, but
    /// the process may still be starting): [`ApiError::NotReady`] when the
    /// socket cannot be reached within `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), ApiError> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(1);
        loop {
            match self.request::<()>("GET", "/", None).await {
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

    /// `PUT /drives/{drive_id}`.
    pub async fn put_drive(&self, drive: &BlockDeviceConfig) -> Result<(), ApiError> {
        self.put(&format!("/drives/{}", drive.drive_id), drive)
            .await
    }

    /// `PATCH /drives/{drive_id}`.
    pub async fn patch_drive(&self, update: &BlockDeviceUpdate) -> Result<(), ApiError> {
        self.patch(&format!("/drives/{}", update.drive_id), update)
            .await
    }

    /// `GET /drives/{drive_id}/fill`.
    pub async fn drive_fill_status(&self, drive_id: &str) -> Result<FillStatus, ApiError> {
        self.get(&format!("/drives/{drive_id}/fill")).await
    }

    /// `PUT /network-interfaces/{iface_id}`.
    pub async fn put_network_interface(
        &self,
        iface: &NetworkInterfaceConfig,
    ) -> Result<(), ApiError> {
        self.put(&format!("/network-interfaces/{}", iface.iface_id), iface)
            .await
    }

    /// `PATCH /network-interfaces/{iface_id}`.
    pub async fn patch_network_interface(
        &self,
        update: &NetworkInterfaceUpdate,
    ) -> Result<(), ApiError> {
        self.patch(&format!("/network-interfaces/{}", update.iface_id), update)
            .await
    }

    /// `PUT /actions`.
    pub async fn action(&self, action: ActionType) -> Result<(), ApiError> {
        self.put("/actions", &InstanceActionInfo::new(action)).await
    }

    /// `PUT /actions` `InstanceStart`: boots the configured VM.
    pub async fn start(&self) -> Result<(), ApiError> {
        self.action(ActionType::InstanceStart).await
    }

    /// `PATCH /vm` to `state`.
    pub async fn set_vm_state(&self, state: VmState) -> Result<(), ApiError> {
        self.patch("/vm", &VmStateUpdate { state }).await
    }

    /// `PATCH /vm` `Paused`.
    pub async fn pause(&self) -> Result<(), ApiError> {
        self.set_vm_state(VmState::Paused).await
    }

    /// `PATCH /vm` `Resumed`.
    pub async fn resume(&self) -> Result<(), ApiError> {
        self.set_vm_state(VmState::Resumed).await
    }

    /// `PUT /migrate/cancel` (refused once the switch-over has begun).
    pub async fn cancel_migration(&self) -> Result<(), ApiError> {
        self.request::<()>("PUT", "/migrate/cancel", None)
            .await
            .map(drop)
    }
}

/// A method per route at a fixed path that answers a shape.
macro_rules! get_routes {
    ($($path:literal => $name:ident() -> $out:ty;)*) => {
        impl VmmClient {
            $(
                #[doc = concat!("`GET ", $path, "`.")]
                pub async fn $name(&self) -> Result<$out, ApiError> {
                    self.get($path).await
                }
            )*
        }
    };
}

get_routes! {
    "/" => instance_info() -> InstanceInfo;
    "/machine-config" => machine_config() -> MachineConfig;
    "/vm/config" => vm_config() -> VmResources;
    "/migrate" => migration_status() -> MigrationStatus;
    "/snapshot/working-set" => working_set_status() -> WorkingSetStatus;
}

/// A method per route at a fixed path that takes a shape.
macro_rules! send_routes {
    ($($(#[doc = $note:literal])* $verb:ident $path:literal => $name:ident($arg:ident: &$body:ty);)*) => {
        impl VmmClient {
            $(
                #[doc = concat!("`", stringify!($verb), " ", $path, "`.")]
                $(#[doc = $note])*
                pub async fn $name(&self, $arg: &$body) -> Result<(), ApiError> {
                    self.request(stringify!($verb), $path, Some($arg)).await.map(drop)
                }
            )*
        }
    };
}

send_routes! {
    PUT "/boot-source" => put_boot_source(boot: &BootSourceConfig);
    PUT "/machine-config" => put_machine_config(config: &MachineConfig);
    PATCH "/machine-config" => patch_machine_config(update: &MachineConfigUpdate);
    PUT "/vsock" => put_vsock(vsock: &VsockConfig);
    PUT "/metrics" => put_metrics(metrics: &MetricsConfig);
    /// The VM must be paused.
    PUT "/snapshot/create" => create_snapshot(params: &CreateSnapshotParams);
    /// Only in a VMM not configured yet.
    PUT "/snapshot/load" => load_snapshot(params: &LoadSnapshotParams);
    /// Saves a recording clone's working set.
    PUT "/snapshot/working-set" => save_working_set(params: &SaveWorkingSetParams);
    /// Starts a live migration of this VM; follow it with
    /// [`VmmClient::migration_status`].
    PUT "/migrate/send" => migrate(params: &SendMigrationParams);
    /// Only in a VMM not configured yet.
    PUT "/migrate/receive" => receive_migration(params: &ReceiveMigrationParams);
    /// A manual switch-over may go on.
    PUT "/migrate/switch-over" => switch_over(params: &SwitchOverParams);
}

#[cfg(test)]
mod tests;
