//! One microVM: an `ember-vmm` process (jailed or not), its API socket,
//! its vsock socket and the connection to its guest agent.
//!
//! - `process.rs`: the VMM process, jailed or not (uid lease, limits,
//!   binds, its monitor task) and the files it is given;
//! - `half_built.rs`: the one guard that destroys an instance whose
//!   build (boot, restore, receive) fails or is abandoned;
//! - `configure.rs`: the VMM request sequences that boot, restore,
//!   receive and snapshot a VM;
//! - `agent.rs`: the connection to the guest agent;
//! - `forwarders.rs`: sockets in the jail that hostd joins to the
//!   volume service or a peer host (NBD);
//! - `migration.rs`: the VMM's migration requests.

mod agent;
mod configure;
mod forwarders;
mod half_built;
mod migration;
mod process;
pub mod working_set;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::net::{InstanceNet, NetManager};
use ember_agent::{AgentClient, ClientError};
use ember_vmm_api::client::{ApiError, VmmClient};
use tokio::sync::{oneshot, watch};

/// How VMM processes are started.
#[derive(Debug, Clone)]
pub struct LaunchConfig {
    pub vmm_bin: PathBuf,
    /// None: run the VMM directly (development only; see [`JailConfig`]).
    pub jail: Option<JailConfig>,
    /// Working directories of unjailed instances, and VMM logs.
    pub run_dir: PathBuf,
    /// Instances' own disks (`/tmp`), a directory each: on a disk-backed
    /// filesystem, since the page cache of a file on disk is reclaimable
    /// and a tmpfs file's pages are not (they would count, for good,
    /// against the VMM's memory cgroup).
    pub disk_dir: PathBuf,
    /// Guest kernel command line (None: the VMM's default).
    pub boot_args: Option<String>,
    /// Longest wait for a booting guest's agent.
    pub boot_timeout: Duration,
    /// Record each snapshot's working set from its first clone and prefetch
    /// it in later ones.
    pub working_sets: bool,
}

/// Jailing with `ember-jailer`: a chroot per VMM under `chroot_base`, its
/// own mount, PID, IPC and UTS namespaces and cgroup, and a uid from
/// `uid_base..uid_base + uid_count` that no other live VMM has.
#[derive(Debug, Clone)]
pub struct JailConfig {
    pub jailer_bin: PathBuf,
    pub chroot_base: PathBuf,
    pub uid_base: u32,
    pub uid_count: u32,
    pub gid: u32,
}

/// Host files a VM is made of.
#[derive(Debug, Clone)]
pub struct VmFiles {
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    pub code: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("cannot start the VMM: {0}")]
    Spawn(String),
    /// A VM hostd cannot describe to the VMM's API.
    #[error("cannot configure the VMM: {0}")]
    Config(String),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("guest agent: {0}")]
    Agent(#[from] ClientError),
    #[error("the microVM exited: {0}")]
    Exited(String),
    #[error("the guest agent did not say hello within {0:?}")]
    BootTimeout(Duration),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    #[error("working set: {0}")]
    WorkingSet(String),
}

/// Paths as the VMM sees them (inside its jail) for each part of a VM.
mod vm_paths {
    pub const KERNEL: &str = "/vmlinux";
    pub const ROOTFS: &str = "/rootfs.ext4";
    pub const CODE: &str = "/code.ext4";
    pub const SNAPSHOT: &str = "/snap/vm.snap";
    pub const MEM: &str = "/snap/mem";
    /// The snapshot's working set, when it has one.
    pub const WORKING_SET: &str = "/snap/working-set";
    /// Where the VMM writes a working set hostd asks it to save.
    pub const WORKING_SET_OUT: &str = "/run/working-set";
    pub const RUN: &str = "/run";
    pub const API: &str = "/run/api.sock";
    pub const VSOCK: &str = "/run/v.sock";
    pub const SERIAL: &str = "/run/serial.log";
    pub const OUT: &str = "/out";
    /// A destination VMM listens here for the migration stream.
    pub const MIGRATE_IN: &str = "/run/migrate-in.sock";
    /// hostd listens here for a source VMM's migration stream.
    pub const MIGRATE_OUT: &str = "/run/migrate-out.sock";
    /// hostd joins NBD connections made here to the volume service.
    pub const NBD: &str = "/run/nbd.sock";
    /// A volume's placeholder while a snapshot is built (in `/out`).
    pub const VOLUME_PLACEHOLDER: &str = "/out/volume.img";
    /// The instance's `/tmp` disk (its disk directory is `/out`).
    pub const TMP_DISK: &str = "/out/tmp.img";
    /// hostd joins a filling disk's NBD connections made here to the
    /// source host's export.
    pub const FILL: &str = "/run/fill.sock";
}

/// An instance's network namespace and the manager that removes it.
type NetPart = (Arc<NetManager>, InstanceNet);

/// A running VMM process.
pub struct Instance {
    pub id: String,
    /// Where the VMM's `/` is on the host (the jail root), or its working
    /// directory when unjailed.
    host_dir: PathBuf,
    jailed: bool,
    /// uid:gid of a jailed VMM.
    jail_owner: Option<(u32, u32)>,
    chroot_base: Option<PathBuf>,
    log_path: PathBuf,
    kill: Mutex<Option<oneshot::Sender<()>>>,
    exit: watch::Receiver<Option<String>>,
    agent: Arc<Mutex<Option<AgentClient>>>,
    pid: Option<u32>,
    pub started: Instant,
    /// The instance's network namespace, removed by [`Instance::destroy`].
    net: Mutex<Option<NetPart>>,
    /// Its physical address, if it has a network.
    pub physical_address: Option<std::net::Ipv4Addr>,
    /// Tasks serving it (the NBD path to its volume), ended with it.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The one volume export its NBD path opens (once that path exists).
    nbd_pin: crate::volumes::SharedPin,
    nbd_listening: std::sync::atomic::AtomicBool,
    /// Its own disks (`/tmp`), removed with it unless taken.
    disk_dir: Mutex<Option<PathBuf>>,
    /// The snapshot directory it was restored from (with the File backend).
    restored_from: std::sync::OnceLock<PathBuf>,
    /// Whether it has answered an invocation yet.
    answered: std::sync::atomic::AtomicBool,
}

/// A path as the VMM's API carries it: a JSON string, so UTF-8.
fn wire_path(p: &Path) -> Result<String, InstanceError> {
    p.to_str()
        .map(str::to_string)
        .ok_or_else(|| InstanceError::Config(format!("path {} is not UTF-8", p.display())))
}

/// A typed answer of the VMM as a JSON value.
fn as_json<T: serde::Serialize>(answer: &T) -> Result<serde_json::Value, InstanceError> {
    serde_json::to_value(answer)
        .map_err(|e| InstanceError::Config(format!("cannot re-encode the VMM's answer: {e}")))
}

fn new_id() -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("vm-{}", &u[..16])
}

impl Instance {
    /// The path to hand the VMM for the input file `host`, bound at
    /// `vm_path` in a jail and used as is otherwise.
    fn input(&self, vm_path: &str, host: &Path) -> PathBuf {
        if self.jailed {
            PathBuf::from(vm_path)
        } else {
            host.to_path_buf()
        }
    }

    /// Host path of `vm_path` (a path as the VMM sees it).
    fn host(&self, vm_path: &str) -> PathBuf {
        if self.jailed {
            self.host_dir.join(vm_path.trim_start_matches('/'))
        } else {
            self.host_dir
                .join(Path::new(vm_path).file_name().unwrap_or_default())
        }
    }

    /// The path to hand the VMM for `vm_path`.
    fn vm(&self, vm_path: &str) -> PathBuf {
        if self.jailed {
            PathBuf::from(vm_path)
        } else {
            self.host(vm_path)
        }
    }

    /// The VMM's API.
    fn client(&self) -> VmmClient {
        VmmClient::new(self.host(vm_paths::API))
    }

    /// [`Instance::vm`], as the VMM's API carries it.
    fn vm_str(&self, vm_path: &str) -> Result<String, InstanceError> {
        wire_path(&self.vm(vm_path))
    }

    /// [`Instance::input`], as the VMM's API carries it.
    fn input_str(&self, vm_path: &str, host: &Path) -> Result<String, InstanceError> {
        wire_path(&self.input(vm_path, host))
    }

    pub fn vsock_path(&self) -> PathBuf {
        self.host(vm_paths::VSOCK)
    }

    /// The VMM's process id (None once it has been reaped).
    pub fn pid(&self) -> Option<u32> {
        self.pid.filter(|_| self.is_alive())
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// `Some(reason)` once the VMM process has exited.
    pub fn exited(&self) -> Option<String> {
        self.exit.borrow().clone()
    }

    pub fn is_alive(&self) -> bool {
        self.exited().is_none()
    }

    /// The exit reason if the VMM exits within `t`.
    pub async fn exited_within(&self, t: Duration) -> Option<String> {
        tokio::time::timeout(t, self.wait_exit()).await.ok()
    }

    async fn wait_exit(&self) -> String {
        let mut rx = self.exit.clone();
        loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                return r;
            }
            if rx.changed().await.is_err() {
                return "monitor gone".to_string();
            }
        }
    }

    /// `work`'s outcome, or [`InstanceError::Exited`] as soon as the VMM
    /// exits meanwhile.
    async fn unless_exited<T>(
        &self,
        work: impl Future<Output = Result<T, InstanceError>>,
    ) -> Result<T, InstanceError> {
        tokio::select! {
            r = work => r,
            reason = self.wait_exit() => Err(InstanceError::Exited(self.describe_exit(&reason))),
        }
    }

    /// The exit reason plus the end of the VMM's log.
    pub fn describe_exit(&self, reason: &str) -> String {
        let log = std::fs::read(&self.log_path).unwrap_or_default();
        let tail = String::from_utf8_lossy(&log[log.len().saturating_sub(600)..]).into_owned();
        format!(
            "ember-vmm {} ({reason}); log tail: {}",
            self.id,
            tail.trim()
        )
    }

    fn own_disks(&self, dir: Option<PathBuf>) {
        *self.disk_dir.lock().unwrap_or_else(|p| p.into_inner()) = dir;
    }

    /// Its disk directory (host path), if it has disks of its own.
    pub fn disk_dir(&self) -> Option<PathBuf> {
        self.disk_dir
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Takes its disk directory, which then outlives it (a migrated
    /// instance's disk, served until the destination has it all).
    pub fn take_disk_dir(&self) -> Option<PathBuf> {
        self.disk_dir
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Kills the VMM (if still running) without waiting.
    pub fn kill(&self) {
        if let Some(tx) = self.kill.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = tx.send(());
        }
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }

    /// Kills the VMM, waits for it, and removes its files. A VMM that
    /// crashed keeps its log for the operator.
    pub async fn destroy(&self) {
        let crashed = self.exited();
        self.kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.wait_exit()).await;
        if crashed.is_none() {
            let _ = std::fs::remove_file(&self.log_path);
        }
        let net = self.net.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(net) = net {
            teardown_net(net).await;
        }
        if let Some(d) = self.take_disk_dir() {
            let _ = std::fs::remove_dir_all(d);
        }
        if self.jailed {
            if let Some(base) = &self.chroot_base {
                if let Err(e) = crate::jail::cleanup(base, &self.id) {
                    log::warn!("cleaning up jail {}: {e}", self.id);
                }
            }
        } else {
            let _ = std::fs::remove_dir_all(&self.host_dir);
        }
    }
}

/// Removes an instance's network namespace (blocking work, off the
/// runtime's threads).
async fn teardown_net((manager, net): NetPart) {
    let _ = tokio::task::spawn_blocking(move || manager.teardown(&net)).await;
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
        // Not destroyed: its namespace still has to go, off this thread.
        let net = self.net.get_mut().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((m, n)) = net {
            std::thread::spawn(move || m.teardown(&n));
        }
    }
}
