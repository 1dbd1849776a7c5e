//! The source's side: migrate one instance to another host, and drain
//! this host by migrating all of them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ember_lambda::host_client::{HostClient, HostError};
use hyper::Method;
use serde::{Deserialize, Serialize};

use super::incoming::{IncomingAnswer, IncomingRequest, IncomingStatus, Phase, SwitchOverAnswer};
use super::stream::{new_ticket, serve_checked, serve_outgoing, PeerTarget};
use super::{ended, MigrateError, PeerConfig, MIGRATION_TIMEOUT};
use crate::daemon::Daemon;
use crate::pool::{Pools, Restorer, Taking};
use crate::vm::{Instance, InstanceError};

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

fn api_host(destination: &str) -> Result<String, MigrateError> {
    let uri: hyper::Uri = destination
        .parse()
        .map_err(
            |e: hyper::http::uri::InvalidUri| MigrateError::BadDestination {
                destination: destination.to_string(),
                why: e.to_string(),
            },
        )?;
    // Hosts speak mutual TLS only: a plain http:// destination is refused,
    // not downgraded to.
    if uri.scheme_str() != Some("https") {
        return Err(MigrateError::NotTls(destination.to_string()));
    }
    let host = uri
        .host()
        .ok_or_else(|| MigrateError::NoHost(destination.to_string()))?;
    Ok(host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string())
}

/// An instance taken out of service for a migration: its pool's key,
/// it, and how long its invocation was waited for (ms).
type Took<I> = ((String, String), Arc<I>, u64);

/// Takes `id` out of service, waiting (up to `wait`) for its invocation
/// if it runs one.
async fn take<R: Restorer>(
    pools: &Pools<R>,
    id: &str,
    wait: Duration,
) -> Result<Took<R::Instance>, MigrateError> {
    let start = Instant::now();
    loop {
        match pools.take_for_migration(id) {
            Taking::Taken(key, inst) => return Ok((key, inst, start.elapsed().as_millis() as u64)),
            Taking::Busy if start.elapsed() < wait => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Taking::Busy => {
                pools.abandon(id);
                return Err(MigrateError::StillBusy(id.to_string()));
            }
            Taking::InProgress => return Err(MigrateError::AlreadyMigrating(id.to_string())),
            Taking::Gone => return Err(MigrateError::NoInstance(id.to_string())),
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
) -> Result<MigrationReport, MigrateError> {
    let peers = d.cfg.peers.clone().ok_or(MigrateError::NotConfigured(
        "migrations need --listen-tcp, --api-token-file (the hosts' token) and TLS",
    ))?;
    let host = api_host(&input.destination)?;
    let (key, inst, waited) = take(&d.pools, id, BUSY_WAIT).await?;
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
) -> Result<MigrationReport, MigrateError> {
    let f = d.functions.get(&key.0)?;
    let v = f
        .versions
        .get(&key.1)
        .ok_or_else(|| MigrateError::VersionGone(key.0.clone(), key.1.clone()))?;
    // An instance's own /tmp disk is served from here while the
    // destination's copy fills (after the switch-over).
    let mut disk = match inst.disk_dir() {
        Some(dir) => {
            // A disk still arriving here is not whole here to be served.
            if let Ok(st) = inst.tmp_fill_status().await {
                if st["state"] == "Filling" {
                    return Err(MigrateError::DiskArriving(inst.id.clone()));
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
    let body = serde_json::to_value(&req).map_err(|e| MigrateError::Host(e.to_string()))?;
    let r = peer
        .json(dest, Method::POST, "/ember/v1/migrations", &body)
        .await
        .map_err(|e| MigrateError::Failed(format!("destination {dest}: {e}")))?;
    if !r.status.is_success() {
        return Err(MigrateError::Failed(format!(
            "destination {dest} refused the migration ({}): {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        )));
    }
    let answer: IncomingAnswer = serde_json::from_slice(&r.body)
        .map_err(|e| MigrateError::Failed(format!("destination {dest} answered oddly: {e}")))?;
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
    let stream_addr = host_port(host, answer.port);
    let listener = match inst.migration_out_listener() {
        Ok(l) => l,
        Err(e) => {
            abort().await;
            return Err(MigrateError::Failed(format!("migration socket: {e}")));
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
            .map_err(SendFailure::Refused)?;
        let start = Instant::now();
        let mut switched = false;
        loop {
            let st = inst
                .migration_status()
                .await
                .map_err(SendFailure::SourceVmm)?;
            match ended(&st) {
                Some(true) => return Ok(st),
                Some(false) => {
                    return Err(SendFailure::Vmm(
                        st["error"]
                            .as_str()
                            .unwrap_or("the migration failed")
                            .to_string(),
                    ))
                }
                None if start.elapsed() > MIGRATION_TIMEOUT => {
                    let _ = inst.cancel_migration().await;
                    return Err(SendFailure::TimedOut);
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
            return Err(MigrateError::Failed(format!(
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
                return Err(MigrateError::Failed(format!(
                    "the VM moved to {dest} but did not come up there: {}",
                    s.error.unwrap_or_default()
                )))
            }
            _ if start.elapsed() > Duration::from_secs(90) => {
                return Err(MigrateError::Failed(format!(
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

/// `HOST:PORT`, an IPv6 host in brackets.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
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

async fn serve_disk(d: &Daemon, dir: &std::path::Path) -> Result<ServedDisk, MigrateError> {
    let peers = d
        .cfg
        .peers
        .as_ref()
        .ok_or(MigrateError::NotConfigured("migrations need --listen-tcp"))?;
    let ip = peers.stream_ip;
    let export = crate::ephemeral::Export::start(
        &d.cfg.export_bin,
        dir,
        &d.cfg.launch.run_dir.join("exports"),
    )
    .await
    .map_err(|e| MigrateError::Host(format!("serving the instance's disk: {e}")))?;
    let listener = tokio::net::TcpListener::bind((ip, 0))
        .await
        .map_err(|e| MigrateError::Host(format!("a port for the instance's disk: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| MigrateError::Host(e.to_string()))?
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

/// Why the VMMs' migration failed before the switch-over (the instance
/// runs here still).
#[derive(Debug, thiserror::Error)]
enum SendFailure {
    #[error("the VMM refused to migrate: {0}")]
    Refused(#[source] InstanceError),
    #[error("the source VMM: {0}")]
    SourceVmm(#[source] InstanceError),
    /// The VMM's own account of its failure.
    #[error("{0}")]
    Vmm(String),
    #[error("no switch-over within {MIGRATION_TIMEOUT:?}")]
    TimedOut,
    #[error("a manual switch-over without a volume")]
    NoVolume,
    #[error("the volume service or the destination's volume host is missing")]
    NoVolumeHost,
    #[error("moving volume {volume} to {host}: {error}")]
    MoveVolume {
        volume: String,
        host: String,
        #[source]
        error: crate::volumes::VolumeError,
    },
    #[error("destination {dest}: {error}")]
    Unreachable {
        dest: String,
        #[source]
        error: HostError,
    },
    #[error("destination {dest} could not open the volume ({status}): {body}")]
    VolumeRefused {
        dest: String,
        status: hyper::StatusCode,
        body: String,
    },
    #[error("destination {dest} answered oddly: {error}")]
    Odd {
        dest: String,
        #[source]
        error: serde_json::Error,
    },
    #[error("the switch-over: {0}")]
    SwitchOver(#[source] InstanceError),
}

struct Switched {
    /// The attachment left this host (undo with [`volume_back`]).
    moved: bool,
    result: Result<(), SendFailure>,
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
            result: Err(SendFailure::NoVolume),
        };
    };
    let (Some(vs), Some(host)) = (&d.volumes, &answer.volume_host) else {
        return Switched {
            moved: false,
            result: Err(SendFailure::NoVolumeHost),
        };
    };
    if let Err(e) = vs.move_to(volume, host).await {
        return Switched {
            moved: false,
            result: Err(SendFailure::MoveVolume {
                volume: volume.to_string(),
                host: host.clone(),
                error: e,
            }),
        };
    }
    let path = format!("/ember/v1/migrations/{}/switch-over", answer.migration_id);
    let result = async {
        let r = peer
            .json(dest, Method::POST, &path, &serde_json::json!({}))
            .await
            .map_err(|error| SendFailure::Unreachable {
                dest: dest.to_string(),
                error,
            })?;
        if !r.status.is_success() {
            return Err(SendFailure::VolumeRefused {
                dest: dest.to_string(),
                status: r.status,
                body: String::from_utf8_lossy(&r.body).into_owned(),
            });
        }
        let a: SwitchOverAnswer =
            serde_json::from_slice(&r.body).map_err(|error| SendFailure::Odd {
                dest: dest.to_string(),
                error,
            })?;
        inst.switch_over(crate::volumes::DRIVE_ID, &a.volume_uri)
            .await
            .map_err(SendFailure::SwitchOver)
    }
    .await;
    Switched {
        moved: true,
        result,
    }
}

/// After a failed switch-over: the attachment comes back to this host
/// (again a new generation) and the source VMM, running again, reopens it.
async fn volume_back(
    d: &Daemon,
    inst: &Instance,
    volume: Option<&str>,
) -> Result<(), MigrateError> {
    let (Some(volume), Some(vs)) = (volume, &d.volumes) else {
        return Ok(());
    };
    let g = vs.bring_back(volume).await?;
    // The jail's NBD path opens the new grant from now on.
    let sock = inst
        .start_nbd_path(&g)
        .map_err(|e| MigrateError::Host(e.to_string()))?;
    inst.reopen_nbd(crate::volumes::DRIVE_ID, &g.uri_via(&sock))
        .await
        .map_err(|e| MigrateError::Host(e.to_string()))
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
pub async fn drain(d: &Arc<Daemon>, input: &MigrateInput) -> Result<DrainReport, MigrateError> {
    if d.cfg.peers.is_none() {
        return Err(MigrateError::NotConfigured(
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
                    error: e.to_string(),
                }),
            }
        }
    }
    report.remaining = d.pools.instance_ids().len();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::testing::{fake_pools, source, Fake};

    #[test]
    fn destinations_are_https_hosts() {
        assert_eq!(api_host("https://10.0.0.2:7070").unwrap(), "10.0.0.2");
        assert_eq!(api_host("https://[fd00::2]:7070/").unwrap(), "fd00::2");
        assert_eq!(api_host("https://host-b:7070").unwrap(), "host-b");
        match api_host("http://10.0.0.2:7070") {
            Err(MigrateError::NotTls(d)) => assert_eq!(d, "http://10.0.0.2:7070"),
            r => panic!("{r:?}"),
        }
        assert!(matches!(
            api_host("10.0.0.2:7070"),
            Err(MigrateError::NotTls(_))
        ));
        assert!(matches!(
            api_host("https://exa mple"),
            Err(MigrateError::BadDestination { .. })
        ));
        assert!(matches!(
            api_host(""),
            Err(MigrateError::BadDestination { .. })
        ));
    }

    #[test]
    fn stream_addresses_bracket_ipv6_hosts() {
        assert_eq!(host_port("10.0.0.2", 4000), "10.0.0.2:4000");
        assert_eq!(host_port("fd00::2", 4000), "[fd00::2]:4000");
        assert_eq!(host_port("host-b", 1), "host-b:1");
    }

    #[tokio::test]
    async fn an_idle_instance_is_taken_at_once_and_only_once() {
        let p = fake_pools(Fake::default());
        let l = p.acquire("f", "1", &source(1), 10).await.unwrap();
        let id = l.inst.id.clone();
        p.release("f", "1", l, true);
        let (key, inst, waited) = take(&p, &id, Duration::from_secs(5)).await.unwrap();
        assert_eq!(key, ("f".to_string(), "1".to_string()));
        assert_eq!(inst.id, id);
        assert!(waited < 1000);
        let again = take(&p, &id, Duration::from_secs(5)).await.unwrap_err();
        assert!(
            matches!(again, MigrateError::AlreadyMigrating(_)),
            "{again}"
        );
        let gone = take(&p, "nope", Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(gone.to_string(), "no instance nope on this host");
    }

    #[tokio::test]
    async fn a_busy_instance_is_taken_when_its_invocation_ends() {
        let p = Arc::new(fake_pools(Fake::default()));
        let l = p.acquire("f", "1", &source(1), 10).await.unwrap();
        let id = l.inst.id.clone();
        let releaser = {
            let p = p.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(150)).await;
                p.release("f", "1", l, true);
            })
        };
        let (_, inst, waited) = take(&p, &id, Duration::from_secs(5)).await.unwrap();
        releaser.await.unwrap();
        assert_eq!(inst.id, id);
        assert!(waited >= 150, "waited {waited} ms");
        // Meanwhile it served nobody else.
        assert!(p.acquire("f", "1", &source(1), 10).await.unwrap().restored);
    }

    #[tokio::test]
    async fn a_wait_that_runs_out_leaves_the_instance_in_service() {
        let p = fake_pools(Fake::default());
        let l = p.acquire("f", "1", &source(1), 10).await.unwrap();
        let id = l.inst.id.clone();
        let e = take(&p, &id, Duration::from_millis(100)).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("instance {id} is still running an invocation")
        );
        p.release("f", "1", l, true);
        // Back in service: the next invocation gets it.
        let l = p.acquire("f", "1", &source(1), 10).await.unwrap();
        assert_eq!((l.inst.id.as_str(), l.restored), (id.as_str(), false));
    }
}
