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
