//! The destination's side: `POST /ember/v1/migrations` prepares a VMM in
//! receive mode and a one-use port for the stream; a task then carries
//! the stream, waits for the VM to run here, connects to its agent and
//! puts the instance into the version's pool.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::stream::{new_ticket, serve_incoming};
use super::{ended, MigrateError, MIGRATION_TIMEOUT};
use crate::daemon::Daemon;
use crate::model::State;
use crate::net::LogicalNet;
use crate::pool::Source;
use crate::vm::{Instance, InstanceError};

/// What the source asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct IncomingRequest {
    pub function_name: String,
    pub version: String,
    /// The source's code digest of that version: the destination's must
    /// be the same, or the VM would find other code on its drive.
    pub code_sha256: String,
    /// The guest's logical network as the source set it up (the guest
    /// keeps its address; only the physical one changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logical: Option<LogicalNet>,
    /// `HOST:PORT` where the source serves the instance's `/tmp` disk
    /// (read-only NBD inside mutual TLS) for this host's copy to fill from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_source: Option<String>,
    /// The ticket connections to `disk_source` open with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_ticket: Option<String>,
}

/// The answer: where to send the stream, and the ticket to open it with.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct IncomingAnswer {
    pub migration_id: String,
    pub instance_id: String,
    pub port: u16,
    pub ticket: String,
    /// This host's id to the volume service (where a volume's attachment
    /// moves at the switch-over).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_host: Option<String>,
}

/// `POST /ember/v1/migrations/{id}/switch-over`'s answer: the URI the
/// VM's volume drive opens here (the attachment has moved to this host).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SwitchOverAnswer {
    pub volume_uri: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Waiting for the stream, or receiving it.
    Receiving,
    /// The VM runs here and the instance is in the pool.
    Running,
    /// Nothing runs here (see `Error`).
    Failed,
}

/// `GET /ember/v1/migrations/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct IncomingStatus {
    pub migration_id: String,
    pub function_name: String,
    pub version: String,
    pub instance_id: String,
    pub state: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For an instance with a `/tmp` disk: true once its copy here is
    /// whole (the source may then let its copy go).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_filled: Option<bool>,
}

/// Migrations to this host, by id (kept after they end, for the source
/// and the operator to read).
#[derive(Default)]
pub struct Incoming {
    inner: Mutex<HashMap<String, Entry>>,
}

struct Entry {
    status: IncomingStatus,
    /// The receiving instance, until the migration ends.
    inst: Option<Arc<Instance>>,
    volume: Option<String>,
    /// Aborts a migration still receiving (the source gave up).
    abort: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Incoming {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, id: &str) -> Option<IncomingStatus> {
        self.lock().get(id).map(|e| e.status.clone())
    }

    pub fn list(&self) -> Vec<IncomingStatus> {
        let mut v: Vec<_> = self.lock().values().map(|e| e.status.clone()).collect();
        v.sort_by(|a, b| a.migration_id.cmp(&b.migration_id));
        v
    }

    /// Ends a migration still receiving; false if none is.
    pub fn abort(&self, id: &str) -> bool {
        let tx = self.lock().get_mut(id).and_then(|e| e.abort.take());
        tx.map(|t| t.send(()).is_ok()).unwrap_or(false)
    }

    fn set_disk_filled(&self, id: &str) {
        if let Some(e) = self.lock().get_mut(id) {
            e.status.disk_filled = Some(true);
        }
    }

    fn set(&self, id: &str, state: Phase, error: Option<String>) {
        if let Some(e) = self.lock().get_mut(id) {
            e.status.state = state;
            e.status.error = error;
            e.abort = None;
            e.inst = None;
        }
    }
}

/// Prepares to receive an instance of `req.function_name:req.version`.
pub async fn prepare(
    d: &Arc<Daemon>,
    req: IncomingRequest,
) -> Result<IncomingAnswer, MigrateError> {
    let peers = d.cfg.peers.clone().ok_or(MigrateError::NotConfigured(
        "this host takes no migrations (no --listen-tcp)",
    ))?;
    let f = d.functions.get(&req.function_name)?;
    let v = f.versions.get(&req.version).ok_or_else(|| {
        MigrateError::NoSuchVersion(req.function_name.clone(), req.version.clone())
    })?;
    if v.state != State::Active {
        return Err(MigrateError::NotActive(
            req.function_name.clone(),
            req.version.clone(),
            v.state,
        ));
    }
    if v.spec.code_sha256 != req.code_sha256 {
        return Err(MigrateError::OtherCode {
            function: req.function_name.clone(),
            version: req.version.clone(),
            here: v.spec.code_sha256.clone(),
            there: req.code_sha256.clone(),
        });
    }
    let mut source = Source::of(d, &f, v)?;
    if let (Some(net), Some(logical)) = (source.network.as_mut(), req.logical) {
        net.logical = logical;
    }
    let generation = v.snapshot.as_ref().map(|s| s.generation).unwrap_or(0);
    let volume = v.spec.file_system.as_ref().map(|fs| fs.volume.clone());
    let volume_host = match (&volume, &d.volumes) {
        (None, _) => None,
        (Some(_), Some(vs)) => Some(vs.host_id().to_string()),
        (Some(name), None) => {
            return Err(MigrateError::NoVolumeService(
                req.function_name.clone(),
                req.version.clone(),
                name.clone(),
            ))
        }
    };
    let with_tmp_disk = v.spec.ephemeral_mib.is_some();
    let fill_from = match (with_tmp_disk, &req.disk_source, &req.disk_ticket) {
        (false, _, _) => None,
        (true, Some(addr), Some(ticket)) => Some(super::stream::PeerTarget {
            addr: addr.clone(),
            ticket: ticket.clone(),
            tls: peers.tls.clone(),
        }),
        (true, _, _) => {
            return Err(MigrateError::NoDiskSource(
                req.function_name.clone(),
                req.version.clone(),
            ))
        }
    };
    let listener = tokio::net::TcpListener::bind((peers.stream_ip, 0))
        .await
        .map_err(|e| MigrateError::Host(format!("cannot open a migration port: {e}")))?;
    let port = listener
        .local_addr()
        .map_err(|e| MigrateError::Host(format!("migration port: {e}")))?
        .port();
    let inst = Instance::receive(
        &d.cfg.launch,
        &source.files,
        source.mem_mib,
        source.vcpus,
        source.network.as_ref(),
        None,
        fill_from,
    )
    .await
    .map_err(|e| MigrateError::Host(format!("cannot start a receiving microVM: {e}")))?;
    let inst = Arc::new(inst);
    let migration_id = format!("mig-{}", &new_ticket()[..16]);
    let ticket = new_ticket();
    let answer = IncomingAnswer {
        migration_id: migration_id.clone(),
        instance_id: inst.id.clone(),
        port,
        ticket: ticket.clone(),
        volume_host,
    };
    let (abort_tx, abort_rx) = tokio::sync::oneshot::channel();
    d.incoming.lock().insert(
        migration_id.clone(),
        Entry {
            status: IncomingStatus {
                migration_id: migration_id.clone(),
                function_name: req.function_name.clone(),
                version: req.version.clone(),
                instance_id: inst.id.clone(),
                state: Phase::Receiving,
                error: None,
                disk_filled: with_tmp_disk.then_some(false),
            },
            abort: Some(abort_tx),
            inst: Some(inst.clone()),
            volume,
        },
    );
    log::info!(
        "migration {migration_id}: receiving {}:{} as {} on port {port}",
        req.function_name,
        req.version,
        inst.id
    );
    let d = d.clone();
    tokio::spawn(async move {
        let outcome = receive(&inst, listener, ticket, peers.tls, abort_rx).await;
        let outcome = match outcome {
            Ok(()) => inst
                .adopt_migrated()
                .await
                .map_err(ReceiveError::AgentSilent),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => {
                log::info!("migration {migration_id}: {} runs here", inst.id);
                d.pools
                    .adopt(&req.function_name, &req.version, generation, inst.clone());
                d.incoming.set(&migration_id, Phase::Running, None);
                if with_tmp_disk {
                    watch_fill(&d, &migration_id, &inst).await;
                }
            }
            Err(e) => {
                log::warn!("migration {migration_id} failed: {e}");
                inst.destroy().await;
                d.incoming
                    .set(&migration_id, Phase::Failed, Some(e.to_string()));
            }
        }
    });
    Ok(answer)
}

/// The source has paused the VM and moved its volume's attachment here:
/// the drive's path to the volume service is made ready, and its URI
/// answered for the source's switch-over.
pub async fn switch_over(d: &Arc<Daemon>, id: &str) -> Result<SwitchOverAnswer, MigrateError> {
    let (inst, volume) = {
        let map = d.incoming.lock();
        let e = map
            .get(id)
            .ok_or_else(|| MigrateError::NoMigration(id.to_string()))?;
        match (&e.inst, &e.volume) {
            (Some(i), Some(v)) => (i.clone(), v.clone()),
            (None, _) => return Err(MigrateError::NotReceiving(id.to_string(), e.status.state)),
            (_, None) => return Err(MigrateError::NoVolume(id.to_string())),
        }
    };
    let vs = d
        .volumes
        .as_ref()
        .ok_or(MigrateError::NoVolumeServiceHere)?;
    let grant = vs.attach(&volume).await?;
    let sock = inst
        .start_nbd_path(&grant)
        .map_err(|e| MigrateError::Host(format!("the volume's NBD path: {e}")))?;
    Ok(SwitchOverAnswer {
        volume_uri: grant.uri_via(&sock),
    })
}

/// Follows the filling of a migrated instance's /tmp disk until it is
/// whole here (or the instance is gone).
async fn watch_fill(d: &Daemon, migration_id: &str, inst: &Instance) {
    let start = Instant::now();
    let mut last_error = None;
    while inst.is_alive() {
        match inst.tmp_fill_status().await {
            Ok(st) if st["state"] == "Complete" => {
                log::info!(
                    "migration {migration_id}: /tmp disk whole after {:?} ({} bytes on demand, {} in the background)",
                    start.elapsed(),
                    st["bytes_on_demand"],
                    st["bytes_background"]
                );
                d.incoming.set_disk_filled(migration_id);
                return;
            }
            Ok(st) => {
                let e = st["error"].as_str().map(str::to_string);
                if e.is_some() && e != last_error {
                    log::warn!(
                        "migration {migration_id}: /tmp disk: {}",
                        e.as_deref().unwrap_or("")
                    );
                }
                last_error = e;
            }
            // A drive no longer filling answers 400: it completed.
            Err(crate::vm::InstanceError::Api(crate::vm::api_client::ApiError::Status {
                status: 400,
                ..
            })) => {
                d.incoming.set_disk_filled(migration_id);
                return;
            }
            Err(e) => log::warn!("migration {migration_id}: /tmp disk: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Why an instance did not arrive.
#[derive(Debug, thiserror::Error)]
enum ReceiveError {
    #[error("the receiving VMM: {0}")]
    Vmm(#[source] InstanceError),
    /// The VMM's own account of its failure.
    #[error("{0}")]
    VmmFailed(String),
    #[error("the stream ended but the VMM is still {0}")]
    Unsettled(serde_json::Value),
    #[error("no migration within {MIGRATION_TIMEOUT:?}")]
    TimedOut,
    /// The stream between the hosts failed (the carrier's account).
    #[error("{0}")]
    Stream(#[source] super::stream::StreamError),
    #[error("stream task: {0}")]
    StreamTask(#[source] tokio::task::JoinError),
    #[error("the source gave the migration up")]
    Aborted,
    #[error("the VM runs here but its agent did not answer: {0}")]
    AgentSilent(#[source] InstanceError),
}

/// Carries the stream to the VMM until the VM runs here (Ok) or the
/// migration ends without it.
async fn receive(
    inst: &Instance,
    listener: tokio::net::TcpListener,
    ticket: String,
    tls: ember_tls::Tls,
    mut abort: tokio::sync::oneshot::Receiver<()>,
) -> Result<(), ReceiveError> {
    // Strangers' connections are refused meanwhile; the port waits on for
    // the source's.
    let mut stream = tokio::spawn(serve_incoming(
        listener,
        ticket,
        inst.migration_in_socket(),
        Duration::from_secs(60),
        tls,
    ));
    let start = Instant::now();
    let mut stream_end: Option<Instant> = None;
    loop {
        let status = inst.migration_status().await.map_err(ReceiveError::Vmm)?;
        match ended(&status) {
            Some(true) => return Ok(()),
            Some(false) => {
                return Err(ReceiveError::VmmFailed(
                    status["error"]
                        .as_str()
                        .unwrap_or("the receiving VMM failed")
                        .to_string(),
                ))
            }
            None => {}
        }
        if let Some(at) = stream_end {
            // The stream is over: the VMM settles at once or never.
            if at.elapsed() > Duration::from_secs(30) {
                return Err(ReceiveError::Unsettled(status["state"].clone()));
            }
        }
        if start.elapsed() > MIGRATION_TIMEOUT {
            return Err(ReceiveError::TimedOut);
        }
        tokio::select! {
            r = &mut stream, if stream_end.is_none() => {
                stream_end = Some(Instant::now());
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        // Nothing loaded yet unless the VMM says so.
                        let status = inst.migration_status().await.ok();
                        if status.as_ref().and_then(ended) != Some(true) {
                            return Err(ReceiveError::Stream(e));
                        }
                    }
                    Err(e) => return Err(ReceiveError::StreamTask(e)),
                }
            }
            _ = &mut abort => {
                stream.abort();
                return Err(ReceiveError::Aborted);
            }
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(id: &str) -> IncomingStatus {
        IncomingStatus {
            migration_id: id.into(),
            function_name: "f".into(),
            version: "1".into(),
            instance_id: format!("inst-{id}"),
            state: Phase::Receiving,
            error: None,
            disk_filled: Some(false),
        }
    }

    /// A migration registered as `prepare` does, without a VMM.
    fn register(m: &Incoming, id: &str) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        m.lock().insert(
            id.into(),
            Entry {
                status: status(id),
                inst: None,
                volume: None,
                abort: Some(tx),
            },
        );
        rx
    }

    #[test]
    fn a_receiving_migration_can_be_aborted_once() {
        let m = Incoming::default();
        let mut rx = register(&m, "mig-b");
        assert!(m.abort("mig-b"));
        assert!(rx.try_recv().is_ok(), "the receiving task hears it");
        assert!(!m.abort("mig-b"), "already aborted");
        assert!(!m.abort("mig-x"), "no such migration");
        // A receiver gone (the task ended) cannot be aborted either.
        drop(register(&m, "mig-c"));
        assert!(!m.abort("mig-c"));
    }

    #[test]
    fn an_ended_migration_is_kept_with_its_outcome_and_no_longer_abortable() {
        let m = Incoming::default();
        let _rx = register(&m, "mig-b");
        let _rx2 = register(&m, "mig-a");
        m.set(
            "mig-b",
            Phase::Failed,
            Some("the source gave the migration up".into()),
        );
        let s = m.get("mig-b").unwrap();
        assert_eq!(s.state, Phase::Failed);
        assert_eq!(s.error.as_deref(), Some("the source gave the migration up"));
        assert!(!m.abort("mig-b"));
        m.set("mig-a", Phase::Running, None);
        m.set_disk_filled("mig-a");
        let ids: Vec<(String, Phase, Option<bool>)> = m
            .list()
            .into_iter()
            .map(|s| (s.migration_id, s.state, s.disk_filled))
            .collect();
        assert_eq!(
            ids,
            [
                ("mig-a".to_string(), Phase::Running, Some(true)),
                ("mig-b".to_string(), Phase::Failed, Some(false)),
            ]
        );
        assert!(m.get("mig-z").is_none());
    }

    #[test]
    fn a_request_with_an_unknown_field_is_refused() {
        let ok = r#"{"FunctionName":"f","Version":"1","CodeSha256":"ab"}"#;
        let req: IncomingRequest = serde_json::from_str(ok).unwrap();
        assert_eq!(
            (req.function_name.as_str(), req.disk_source.as_deref()),
            ("f", None)
        );
        let back = serde_json::to_string(&req).unwrap();
        assert_eq!(back, ok, "absent options stay absent");
        let odd = r#"{"FunctionName":"f","Version":"1","CodeSha256":"ab","Memory":1}"#;
        assert!(serde_json::from_str::<IncomingRequest>(odd).is_err());
    }

    #[test]
    fn the_status_round_trips_as_the_source_reads_it() {
        let mut s = status("mig-a");
        s.state = Phase::Failed;
        s.error = Some("no migration within 600s".into());
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains(r#""State":"Failed""#), "{text}");
        let back: IncomingStatus = serde_json::from_str(&text).unwrap();
        assert_eq!((back.state, back.error), (s.state, s.error));
        let no_disk = IncomingStatus {
            disk_filled: None,
            ..status("mig-b")
        };
        let text = serde_json::to_string(&no_disk).unwrap();
        assert!(
            !text.contains("DiskFilled") && !text.contains("Error"),
            "{text}"
        );
    }
}
