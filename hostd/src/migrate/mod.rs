//! Live migration of instances between hosts, and draining a host.
//!
//! The source host asks the destination's API (over TCP, with the hosts'
//! shared token) to prepare: the destination starts a VMM in receive mode,
//! in a jail of its own, with the VM's files and a network of its own
//! (a new physical address), and opens a one-use TCP port guarded by a
//! ticket. Each VMM speaks the migration stream on a unix socket in its
//! jail; each hostd carries it over TCP between them ([`stream`]), so the
//! VMMs, jailed in their own network namespaces, need no route to each
//! other. Every such connection is mutual TLS (both hosts' certificates
//! signed by the cluster's CA) and, on the stream and disk ports, opens
//! with a one-use ticket; a stranger's connection is closed and the port
//! waits on for the right peer. The VMMs' pre-copy moves the VM (`PUT /migrate/send`): the
//! source pauses, its TCP connections are reset (`terminate_connections_on_pause`;
//! the guest's physical address changes), and the destination resumes.
//! The destination then connects to the guest agent and puts the instance
//! into its pool; the source destroys its copy.

pub mod incoming;
pub mod outgoing;
pub mod stream;

pub use incoming::Incoming;

use crate::model::State;
use ember_lambda::error::ApiError;
use incoming::Phase;

/// Why a migration was refused, or did not complete.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// This host is not set up for migrations (the message says what it lacks).
    #[error("{0}")]
    NotConfigured(&'static str),
    #[error("Destination {destination:?}: {why}")]
    BadDestination { destination: String, why: String },
    #[error("Destination {0:?} must be https://HOST:PORT (hosts speak TLS only)")]
    NotTls(String),
    #[error("Destination {0:?} has no host")]
    NoHost(String),
    #[error("no instance {0} on this host")]
    NoInstance(String),
    #[error("instance {0} is already being migrated")]
    AlreadyMigrating(String),
    #[error("instance {0} is still running an invocation")]
    StillBusy(String),
    #[error(
        "instance {0} is still receiving its /tmp disk from its last host; \
         migrate it once that completes"
    )]
    DiskArriving(String),
    #[error("{0}:{1} is gone")]
    VersionGone(String, String),
    #[error("Function not found: {0}:{1} on this host")]
    NoSuchVersion(String, String),
    #[error("{0}:{1} is {2:?} on this host, not Active")]
    NotActive(String, String, State),
    #[error(
        "{function}:{version} has other code on this host (CodeSha256 {here} here, {there} at the source)"
    )]
    OtherCode {
        function: String,
        version: String,
        here: String,
        there: String,
    },
    #[error("{0}:{1} mounts volume {2}, and this host has no volume service")]
    NoVolumeService(String, String, String),
    #[error(
        "{0}:{1} has a /tmp disk: DiskSource and DiskTicket must say where and how the \
         source serves it"
    )]
    NoDiskSource(String, String),
    #[error("no migration {0} to this host")]
    NoMigration(String),
    #[error("migration {0} is {1:?}, no longer receiving")]
    NotReceiving(String, Phase),
    #[error("migration {0} has no volume to switch over")]
    NoVolume(String),
    #[error("this host has no volume service")]
    NoVolumeServiceHere,
    /// This host could not do its part (a port, a disk export, a VMM).
    #[error("{0}")]
    Host(String),
    /// The migration failed: before the switch-over the instance runs
    /// here still; after it, the destination did not take it (the
    /// message says which).
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Volume(#[from] crate::volumes::VolumeError),
    /// Already in Lambda's terms (the function records).
    #[error("{}", .0.message)]
    Api(#[from] ApiError),
    /// From the function records (the function is gone).
    #[error(transparent)]
    Function(#[from] crate::functions::FunctionError),
}

/// What migrations between hosts need of this host.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// The hosts' shared API token (`--api-token-file`): sent to peers,
    /// which check it as their own.
    pub token: String,
    /// Where migration streams to this host are accepted (the address of
    /// `--listen-tcp`; port 0: one port per migration).
    pub stream_ip: std::net::IpAddr,
    /// This host's TLS identity: every connection between hosts (API,
    /// migration streams, disk exports) is mutual TLS with it.
    pub tls: ember_tls::Tls,
}

/// How long a migration may take before it is given up.
pub const MIGRATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// A VMM's `GET /migrate` state: ended, and if so whether the VM moved.
pub(crate) fn ended(status: &serde_json::Value) -> Option<bool> {
    match status["state"].as_str() {
        Some("Completed") => Some(true),
        Some("Failed") | Some("Cancelled") => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_vmm_migration_has_ended_once_completed_failed_or_cancelled() {
        assert_eq!(ended(&json!({"state": "Completed"})), Some(true));
        assert_eq!(
            ended(&json!({"state": "Failed", "error": "x"})),
            Some(false)
        );
        assert_eq!(ended(&json!({"state": "Cancelled"})), Some(false));
        for going in ["Sending", "Receiving", "AwaitingSwitchOver", "Idle"] {
            assert_eq!(ended(&json!({ "state": going })), None, "{going}");
        }
        assert_eq!(ended(&json!({})), None);
        assert_eq!(ended(&json!({"state": 3})), None);
    }
}
