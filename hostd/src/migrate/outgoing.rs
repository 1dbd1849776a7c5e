//! The source's side: migrate one instance to another host, and drain
//! this host by migrating all of them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ember_lambda::host_client::HostClient;
use hyper::Method;
use serde::{Deserialize, Serialize};

use super::incoming::{IncomingAnswer, IncomingRequest, IncomingStatus, Phase, SwitchOverAnswer};
use super::stream::{new_ticket, serve_checked, serve_outgoing, PeerTarget};
use super::{ended, PeerConfig, MIGRATION_TIMEOUT};
use crate::daemon::Daemon;
use crate::pool::Taking;
use crate::vm::Instance;
use ember_lambda::error::ApiError;

/// `POST /ember/v1/instances/{id}/migrate` and `POST /ember/v1/drain`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct MigrateInput {
    /// The destination host's API, `https://HOST:PORT` (its `--listen-tcp`).
    pub destination: String,
    /// The pause the guest may see (the VMM's `downtime_ms`).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
}

/// What one migration did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct MigrationReport {
    pub instance_id: String,
    pub function_name: String,
    pub version: String,
    pub destination: String,
    pub migration_id: String,
    pub destination_instance_id: String,
    /// Time spent waiting for a running invocation to end first.
    pub waited_for_invocation_ms: u64,
    pub downtime_ms: Option<u64>,
    pub total_ms: Option<u64>,
    pub rounds: u64,
    pub bytes: u64,
}

/// Longest wait for a busy instance's invocation (Lambda's longest
/// timeout is 15 minutes).
const BUSY_WAIT: Duration = Duration::from_secs(15 * 60 + 30);

/// The migration did not happen (the instance runs here still), or the
/// destination failed after the switch-over: the status carries which.
fn failed(message: String) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::BAD_GATEWAY,
        "ServiceException",
        message,
    )
}

fn api_host(destination: &str) -> Result<String, ApiError> {
    let uri: hyper::Uri = destination
        .parse()
        .map_err(|e| ApiError::invalid(format!("Destination {destination:?}: {e}")))?;
    // Hosts speak mutual TLS only: a plain http:// destination is refused,
    // not downgraded to.
    if uri.scheme_str() != Some("https") {
        return Err(ApiError::invalid(format!(
            "Destination {destination:?} must be https://HOST:PORT (hosts speak TLS only)"
        )));
    }
    let host = uri
        .host()
        .ok_or_else(|| ApiError::invalid(format!("Destination {destination:?} has no host")))?;
    Ok(host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string())
}

/// Takes `id` out of service, waiting for its invocation if it runs one.
async fn take(d: &Daemon, id: &str) -> Result<((String, String), Arc<Instance>, u64), ApiError> {
    let start = Instant::now();
    loop {
        match d.pools.take_for_migration(id) {
            Taking::Taken(key, inst) => return Ok((key, inst, start.elapsed().as_millis() as u64)),
            Taking::Busy if start.elapsed() < BUSY_WAIT => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Taking::Busy => {
                d.pools.abandon(id);
                return Err(ApiError::conflict(format!(
                    "instance {id} is still running an invocation"
                )));
            }
            Taking::InProgress => {
                return Err(ApiError::conflict(format!(
                    "instance {id} is already being migrated"
                )))
            }
            Taking::Gone => {
                return Err(ApiError::not_found(format!(
                    "no instance {id} on this host"
                )))
            }
        }
    }
}

/// Migrates instance `id` to `input.destination`. On any failure before
/// the destination runs the VM, the instance runs on here, back in its
/// pool, and the answer says why.
pub async fn migrate_instance(
    d: &Arc<Daemon>,
    id: &str,
    input: &MigrateInput,
) -> Result<MigrationReport, ApiError> {
    let peers = d.cfg.peers.clone().ok_or_else(|| {
        ApiError::invalid(
            "migrations need --listen-tcp, --api-token-file (the hosts' token) and TLS",
        )
    })?;
    let host = api_host(&input.destination)?;
    let (key, inst, waited) = take(d, id).await?;
    let r = send(d, &peers, &host, &key, &inst, input).await;
    match r {
        Ok(mut report) => {
            report.waited_for_invocation_ms = waited;
            if let Some(i) = d.pools.migration_ended(id, true) {
                i.destroy().await;
            }
            Ok(report)
        }
        Err(e) => {
            if inst.is_alive() && inst.reconnect_agent().await.is_err() {
                log::warn!("instance {id} stayed here but its agent does not answer");
                inst.kill();
            }
            if let Some(i) = d.pools.migration_ended(id, false) {
                i.destroy().await;
            }
            Err(e)
        }
    }
}

async fn send(
    d: &Daemon,
    peers: &PeerConfig,
    host: &str,
    key: &(String, String),
    inst: &Instance,
    input: &MigrateInput,
) -> Result<MigrationReport, ApiError> {
    let f = d.get(&key.0)?;
    let v = f
        .versions
        .get(&key.1)
        .ok_or_else(|| ApiError::not_found(format!("{}:{} is gone", key.0, key.1)))?;
    // An instance's own /tmp disk is served from here while the
    // destination's copy fills (after the switch-over).
    let mut disk = match inst.disk_dir() {
        Some(dir) => {
            // A disk still arriving here is not whole here to be served.
            if let Ok(st) = inst.tmp_fill_status().await {
                if st["state"] == "Filling" {
                    return Err(ApiError::conflict(format!(
                        "instance {} is still receiving its /tmp disk from its last host; \
                         migrate it once that completes",
                        inst.id
                    )));
                }
            }
            Some(serve_disk(d, &dir).await?)
        }
        None => None,
    };
    let req = IncomingRequest {
        function_name: key.0.clone(),
        version: key.1.clone(),
        code_sha256: v.spec.code_sha256.clone(),
        logical: v.snapshot.as_ref().and_then(|s| s.network),
        disk_source: disk.as_ref().map(|s| s.addr.clone()),
        disk_ticket: disk.as_ref().map(|s| s.ticket.clone()),
    };
    let peer = HostClient::new(&peers.token, &peers.tls);
    let dest = input.destination.trim_end_matches('/');
    let body = serde_json::to_value(&req).map_err(|e| ApiError::service(e.to_string()))?;
    let r = peer
        .json(dest, Method::POST, "/ember/v1/migrations", &body)
        .await
        .map_err(|e| failed(format!("destination {dest}: {e}")))?;
    if !r.status.is_success() {
        return Err(failed(format!(
            "destination {dest} refused the migration ({}): {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        )));
    }
    let answer: IncomingAnswer = serde_json::from_slice(&r.body)
        .map_err(|e| failed(format!("destination {dest} answered oddly: {e}")))?;
    let abort = || async {
        let path = format!("/ember/v1/migrations/{}", answer.migration_id);
        let _ = peer
            .call(
                dest,
                Method::DELETE,
                &path,
                &[],
                Bytes::new(),
                Duration::from_secs(10),
            )
            .await;
    };
    let stream_addr = if host.contains(':') {
        format!("[{host}]:{}", answer.port)
    } else {
        format!("{host}:{}", answer.port)
    };
    let listener = match inst.migration_out_listener() {
        Ok(l) => l,
        Err(e) => {
            abort().await;
            return Err(failed(format!("migration socket: {e}")));
        }
    };
    let target = PeerTarget {
        addr: stream_addr,
        ticket: answer.ticket.clone(),
        tls: peers.tls.clone(),
    };
    let stream = tokio::spawn(serve_outgoing(listener, target, Duration::from_secs(30)));
    // A fresh agent connection is made on whichever host runs the VM.
    inst.close_agent().await;
    let downtime = input.downtime_ms.unwrap_or(300);
    let volume = v.spec.file_system.as_ref().map(|fs| fs.volume.clone());
    let mut moved_volume = false;
    let outcome = async {
        inst.send_migration(downtime, volume.is_some())
            .await
            .map_err(|e| format!("the VMM refused to migrate: {e}"))?;
        let start = Instant::now();
        let mut switched = false;
        loop {
            let st = inst
                .migration_status()
                .await
                .map_err(|e| format!("the source VMM: {e}"))?;
            match ended(&st) {
                Some(true) => return Ok(st),
                Some(false) => {
                    return Err(st["error"]
                        .as_str()
                        .unwrap_or("the migration failed")
                        .to_string())
                }
                None if start.elapsed() > MIGRATION_TIMEOUT => {
                    let _ = inst.cancel_migration().await;
                    return Err(format!("no switch-over within {MIGRATION_TIMEOUT:?}"));
                }
                None if !switched && st["state"] == "AwaitingSwitchOver" => {
                    switched = true;
                    let r = switch_volume(d, &peer, dest, &answer, inst, volume.as_deref()).await;
                    moved_volume = r.moved;
                    if let Err(e) = r.result {
                        let _ = inst.cancel_migration().await;
                        return Err(e);
                    }
                }
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
    .await;
    if outcome.is_err() && moved_volume {
        if let Err(e) = volume_back(d, inst, volume.as_deref()).await {
            log::error!(
                "instance {}: the volume did not come back after a failed migration: {e}",
                inst.id
            );
        }
    }
    let status = match outcome {
        Ok(s) => s,
        Err(e) => {
            stream.abort();
            abort().await;
            return Err(failed(format!(
                "migration to {dest} failed, the instance runs here still: {e}"
            )));
        }
    };
    // The VM runs there now; wait for the destination to take it in.
    let path = format!("/ember/v1/migrations/{}", answer.migration_id);
    let start = Instant::now();
    loop {
        let st = peer
            .get(dest, &path)
            .await
            .ok()
            .and_then(|r| serde_json::from_slice::<IncomingStatus>(&r.body).ok());
        match st {
            Some(s) if s.state == Phase::Running => break,
            Some(s) if s.state == Phase::Failed => {
                return Err(failed(format!(
                    "the VM moved to {dest} but did not come up there: {}",
                    s.error.unwrap_or_default()
                )))
            }
            _ if start.elapsed() > Duration::from_secs(90) => {
                return Err(failed(format!(
                    "the VM moved to {dest}, which does not say it runs"
                )))
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    if let Some(mut served) = disk.take() {
        // The VM is there; its disk stays here until the copy there is
        // whole.
        inst.take_disk_dir();
        served.export.own_dir();
        let (peer, dest, path) = (peer.clone(), dest.to_string(), path.clone());
        tokio::spawn(async move {
            release_when_filled(&peer, &dest, &path).await;
            drop(served);
        });
    }
    let num = |k: &str| status[k].as_u64();
    Ok(MigrationReport {
        instance_id: inst.id.clone(),
        function_name: key.0.clone(),
        version: key.1.clone(),
        destination: dest.to_string(),
        migration_id: answer.migration_id,
        destination_instance_id: answer.instance_id,
        waited_for_invocation_ms: 0,
        downtime_ms: num("downtime_ms"),
        total_ms: num("total_ms"),
        rounds: num("rounds").unwrap_or(0),
        bytes: num("bytes").unwrap_or(0),
    })
}

/// A migrating instance's disk, served to the destination over TCP
/// (mutual TLS, then the ticket).
struct ServedDisk {
    export: crate::ephemeral::Export,
    task: tokio::task::JoinHandle<()>,
    /// `HOST:PORT` for the destination.
    addr: String,
    /// What the destination's connections must open with.
    ticket: String,
}

impl Drop for ServedDisk {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_disk(d: &Daemon, dir: &std::path::Path) -> Result<ServedDisk, ApiError> {
    let peers = d
        .cfg
        .peers
        .as_ref()
        .ok_or_else(|| ApiError::invalid("migrations need --listen-tcp"))?;
    let ip = peers.stream_ip;
    let export = crate::ephemeral::Export::start(
        &d.cfg.export_bin,
        dir,
        &d.cfg.launch.run_dir.join("exports"),
    )
    .await
    .map_err(|e| ApiError::service(format!("serving the instance's disk: {e}")))?;
    let listener = tokio::net::TcpListener::bind((ip, 0))
        .await
        .map_err(|e| ApiError::service(format!("a port for the instance's disk: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| ApiError::service(e.to_string()))?
        .to_string();
    let ticket = new_ticket();
    let task = tokio::spawn(serve_checked(
        listener,
        peers.tls.clone(),
        ticket.clone(),
        export.socket.clone(),
    ));
    Ok(ServedDisk {
        export,
        task,
        addr,
        ticket,
    })
}

/// Waits (up to half an hour) for the destination to say its copy of the
/// disk is whole.
async fn release_when_filled(peer: &HostClient, dest: &str, path: &str) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1800) {
        let st = peer
            .get(dest, path)
            .await
            .ok()
            .and_then(|r| serde_json::from_slice::<IncomingStatus>(&r.body).ok());
        match st {
            Some(s) if s.disk_filled == Some(true) => return,
            Some(s) if s.state == Phase::Failed => return,
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    log::warn!("{dest}{path}: the disk copy did not complete; no longer served");
}

struct Switched {
    /// The attachment left this host (undo with [`volume_back`]).
    moved: bool,
    result: Result<(), String>,
}

/// The source is paused with every page at the destination: the volume's
/// attachment moves there (a new generation, so this host's requests are
/// refused from now on; each request checked before the move lands before
/// it, under the volume service's I/O gate), the destination readies its
/// path to it, and the destination VMM opens it and resumes.
async fn switch_volume(
    d: &Daemon,
    peer: &HostClient,
    dest: &str,
    answer: &IncomingAnswer,
    inst: &Instance,
    volume: Option<&str>,
) -> Switched {
    let Some(volume) = volume else {
        return Switched {
            moved: false,
            result: Err("a manual switch-over without a volume".into()),
        };
    };
    let (Some(vs), Some(host)) = (&d.cfg.volumes, &answer.volume_host) else {
        return Switched {
            moved: false,
            result: Err("the volume service or the destination's volume host is missing".into()),
        };
    };
    if let Err(e) = vs.move_to(volume, host).await {
        return Switched {
            moved: false,
            result: Err(format!("moving volume {volume} to {host}: {}", e.message)),
        };
    }
    let path = format!("/ember/v1/migrations/{}/switch-over", answer.migration_id);
    let result = async {
        let r = peer
            .json(dest, Method::POST, &path, &serde_json::json!({}))
            .await
            .map_err(|e| format!("destination {dest}: {e}"))?;
        if !r.status.is_success() {
            return Err(format!(
                "destination {dest} could not open the volume ({}): {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            ));
        }
        let a: SwitchOverAnswer = serde_json::from_slice(&r.body)
            .map_err(|e| format!("destination {dest} answered oddly: {e}"))?;
        inst.switch_over(crate::volume::DRIVE_ID, &a.volume_uri)
            .await
            .map_err(|e| format!("the switch-over: {e}"))
    }
    .await;
    Switched {
        moved: true,
        result,
    }
}

/// After a failed switch-over: the attachment comes back to this host
/// (again a new generation) and the source VMM, running again, reopens it.
async fn volume_back(d: &Daemon, inst: &Instance, volume: Option<&str>) -> Result<(), String> {
    let (Some(volume), Some(vs)) = (volume, &d.cfg.volumes) else {
        return Ok(());
    };
    let g = vs
        .move_to(volume, &vs.host_id)
        .await
        .map_err(|e| e.message)?;
    // The jail's NBD path opens the new grant from now on.
    let sock = inst.start_nbd_path(&g).map_err(|e| e.to_string())?;
    inst.reopen_nbd(crate::volume::DRIVE_ID, &g.uri_via(&sock))
        .await
        .map_err(|e| e.to_string())
}

/// What a drain did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct DrainReport {
    pub migrated: Vec<MigrationReport>,
    pub failed: Vec<DrainFailure>,
    /// Instances still on this host (none unless some failed).
    pub remaining: usize,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct DrainFailure {
    pub instance_id: String,
    pub error: String,
}

/// Stops warming pools here and migrates every instance to the
/// destination, one at a time; busy ones after their invocation. New
/// instances restored meanwhile (invocations still arrive) go in later
/// passes. The host stays draining until `DELETE /ember/v1/drain`.
pub async fn drain(d: &Arc<Daemon>, input: &MigrateInput) -> Result<DrainReport, ApiError> {
    if d.cfg.peers.is_none() {
        return Err(ApiError::invalid(
            "migrations need --listen-tcp and --api-token-file (the hosts' token)",
        ));
    }
    api_host(&input.destination)?;
    d.set_draining(true);
    let mut report = DrainReport {
        migrated: Vec::new(),
        failed: Vec::new(),
        remaining: 0,
    };
    let mut tried = std::collections::HashSet::new();
    for _pass in 0..5 {
        let ids: Vec<String> = d
            .pools
            .instance_ids()
            .into_iter()
            .filter(|i| !tried.contains(i))
            .collect();
        if ids.is_empty() {
            break;
        }
        for id in ids {
            tried.insert(id.clone());
            match migrate_instance(d, &id, input).await {
                Ok(r) => report.migrated.push(r),
                Err(e) => report.failed.push(DrainFailure {
                    instance_id: id,
                    error: e.message,
                }),
            }
        }
    }
    report.remaining = d.pools.instance_ids().len();
    Ok(report)
}
