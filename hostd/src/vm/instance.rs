//! One microVM: an `ember-vmm` process (jailed or not), its API socket,
//! its vsock socket and the connection to its guest agent.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::net::{InstanceNet, NetManager, NetRequest};
use ember_agent::{AgentClient, ClientError, AGENT_PORT};
use ember_vmm_api::client::{ApiError, VmmClient};
use ember_vmm_api::{
    BlockDeviceConfig, BlockDeviceUpdate, BootSourceConfig, CreateSnapshotParams, DriveOverride,
    FillFrom, FillOverride, LoadSnapshotParams, MachineConfig, MemBackend, MemBackendType,
    NetworkInterfaceConfig, ReceiveMigrationParams, SendMigrationParams, SnapshotType, SwitchOver,
    SwitchOverParams, VsockConfig, VsockOverride,
};
use tokio::sync::{oneshot, watch};

/// Longest wait for the agent to close its side of a connection we end.
const AGENT_CLOSE: Duration = Duration::from_secs(5);

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
}

/// Paths as the VMM sees them (inside its jail) for each part of a VM.
mod vm_paths {
    pub const KERNEL: &str = "/vmlinux";
    pub const ROOTFS: &str = "/rootfs.ext4";
    pub const CODE: &str = "/code.ext4";
    pub const SNAPSHOT: &str = "/snap/vm.snap";
    pub const MEM: &str = "/snap/mem";
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
    net: Mutex<Option<(Arc<NetManager>, InstanceNet)>>,
    /// Its physical address, if it has a network.
    pub physical_address: Option<std::net::Ipv4Addr>,
    /// Tasks serving it (the NBD path to its volume), ended with it.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The one volume export its NBD path opens (once that path exists).
    nbd_pin: crate::volumes::SharedPin,
    nbd_listening: std::sync::atomic::AtomicBool,
    /// Its own disks (`/tmp`), removed with it unless taken.
    disk_dir: Mutex<Option<PathBuf>>,
}

/// Host paths a jailed VMM needs besides its own files: the shared
/// libraries of a dynamically linked VMM, and `/sys/module/kvm_pvm`, by
/// which it recognises a nested kvm_pvm host.
fn host_support_binds(vmm_bin: &Path) -> Vec<crate::jail::Bind> {
    let mut binds = Vec::new();
    let dynamic = std::fs::read(vmm_bin)
        .map(|b| {
            let head = &b[..b.len().min(4096)];
            head.windows(3).any(|w| w == b"ld-")
        })
        .unwrap_or(true);
    if dynamic {
        for dir in [
            "/lib/x86_64-linux-gnu",
            "/lib64",
            "/usr/lib/x86_64-linux-gnu",
        ] {
            let p = Path::new(dir);
            // With merged /usr, /lib is a link: bind each real directory once.
            if p.is_dir()
                && !binds.iter().any(|b: &crate::jail::Bind| {
                    std::fs::canonicalize(&b.host).ok() == std::fs::canonicalize(p).ok()
                })
            {
                binds.push(crate::jail::Bind::read_only(p, p));
            }
        }
    }
    let pvm = Path::new("/sys/module/kvm_pvm");
    if pvm.is_dir() {
        binds.push(crate::jail::Bind::read_only(pvm, pvm));
    }
    binds
}

/// Where the search for a free jail uid starts (spreads reuse out).
static NEXT_UID: AtomicU32 = AtomicU32::new(0);
/// Jail uids held by VMM processes that have not exited yet.
static LIVE_UIDS: Mutex<std::collections::BTreeSet<u32>> =
    Mutex::new(std::collections::BTreeSet::new());

/// A jail uid that no other live VMM has; it is free again once dropped,
/// which the VMM's monitor task does after the process has been reaped.
/// (A uid shared by two VMMs would let one signal or ptrace the other.)
#[derive(Debug)]
pub(crate) struct UidLease(u32);

impl UidLease {
    pub(crate) fn take(uid_base: u32, uid_count: u32) -> Result<UidLease, InstanceError> {
        let count = uid_count.max(1);
        let mut live = LIVE_UIDS.lock().unwrap_or_else(|p| p.into_inner());
        let start = NEXT_UID.load(Ordering::Relaxed);
        for i in 0..count {
            let off = start.wrapping_add(i) % count;
            let uid = uid_base.saturating_add(off);
            if live.insert(uid) {
                NEXT_UID.store(off.wrapping_add(1), Ordering::Relaxed);
                return Ok(UidLease(uid));
            }
        }
        Err(InstanceError::Spawn(format!(
            "all {count} jail uids from {uid_base} are held by live VMMs"
        )))
    }

    pub(crate) fn uid(&self) -> u32 {
        self.0
    }
}

impl Drop for UidLease {
    fn drop(&mut self) {
        LIVE_UIDS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.0);
    }
}

/// Resource limits of a jailed VMM with `mem_mib` of guest memory: files
/// up to the larger of its memory (snapshot memory file) and Lambda's
/// largest `/tmp` (10 GiB), plus 1 GiB; descriptors for its devices and
/// vsock connections; its threads (its uid is its own).
fn vmm_limits(mem_mib: u32) -> crate::jail::ResourceLimits {
    crate::jail::ResourceLimits {
        fsize: Some((u64::from(mem_mib.max(10 * 1024)) + 1024) << 20),
        nofile: Some(4096),
        nproc: Some(256),
    }
}

/// A fresh directory (0700, root's until [`Instance::give_disks`]) for
/// an instance's own disks, in the disk directory.
fn new_disk_dir(cfg: &LaunchConfig) -> std::io::Result<(PathBuf, crate::beneath::Dir)> {
    let dir = crate::ephemeral::new_dir(&cfg.disk_dir, &new_id())?;
    Ok((dir.path().to_path_buf(), dir))
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

    fn api(&self) -> PathBuf {
        self.host(vm_paths::API)
    }

    /// The VMM's API.
    fn client(&self) -> VmmClient {
        VmmClient::new(self.api())
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

    /// Starts a VMM. `inputs` are host files bound (jailed) or referred to
    /// (unjailed) under their VM paths; `out` is a host directory the VMM
    /// may write to, seen as `/out`.
    async fn spawn(
        cfg: &LaunchConfig,
        inputs: &[(&str, &Path)],
        out: Option<&Path>,
        mem_mib: u32,
        vcpus: u32,
        net: Option<&NetRequest>,
    ) -> Result<Instance, InstanceError> {
        let id = new_id();
        let lease = match &cfg.jail {
            Some(j) => Some(UidLease::take(j.uid_base, j.uid_count)?),
            None => None,
        };
        let jail_uid = lease.as_ref().map(UidLease::uid);
        let net = match net {
            Some(req) => {
                let (req, vm_id) = (req.clone(), id.clone());
                let made = tokio::task::spawn_blocking(move || {
                    req.setup(&vm_id, jail_uid).map(|n| (req.manager, n))
                })
                .await
                .map_err(|e| InstanceError::Spawn(format!("network setup: {e}")))??;
                Some(made)
            }
            None => None,
        };
        let netns = net.as_ref().map(|(_, n)| n.netns_path());
        let physical_address = net.as_ref().map(|(_, n)| n.physical);
        let spawned = Instance::spawn_vmm(cfg, inputs, out, mem_mib, vcpus, id, lease, netns).await;
        match spawned {
            Ok(mut inst) => {
                inst.physical_address = physical_address;
                *inst.net.lock().unwrap_or_else(|p| p.into_inner()) = net;
                Ok(inst)
            }
            Err(e) => {
                if let Some((m, n)) = net {
                    let _ = tokio::task::spawn_blocking(move || m.teardown(&n)).await;
                }
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn spawn_vmm(
        cfg: &LaunchConfig,
        inputs: &[(&str, &Path)],
        out: Option<&Path>,
        mem_mib: u32,
        vcpus: u32,
        id: String,
        lease: Option<UidLease>,
        netns: Option<PathBuf>,
    ) -> Result<Instance, InstanceError> {
        let jail_uid = lease.as_ref().map(UidLease::uid);
        std::fs::create_dir_all(cfg.run_dir.join("logs"))?;
        let log_path = cfg.run_dir.join("logs").join(format!("{id}.log"));
        let log = std::fs::File::create(&log_path)?;
        let mut jail_owner = None;
        let (host_dir, mut cmd) = match &cfg.jail {
            None => {
                let dir = cfg.run_dir.join("instances").join(&id);
                std::fs::create_dir_all(&dir)?;
                let mut cmd = tokio::process::Command::new(&cfg.vmm_bin);
                cmd.arg("--api-sock").arg(dir.join("api.sock"));
                (dir, cmd)
            }
            Some(jail) => {
                let uid = jail_uid.unwrap_or(jail.uid_base);
                let mut spec = crate::jail::JailSpec::new(id.clone(), &cfg.vmm_bin, uid, jail.gid);
                if let Some(ns) = &netns {
                    spec.netns = Some(ns.clone());
                    spec.devices.push(crate::jail::Device::Tun);
                }
                spec.chroot_base = jail.chroot_base.clone();
                spec.binds = inputs
                    .iter()
                    .map(|(vm, host)| crate::jail::Bind::read_only(*host, *vm))
                    .chain(out.map(|o| crate::jail::Bind::read_write(o, vm_paths::OUT)))
                    .chain(host_support_binds(&cfg.vmm_bin))
                    .collect();
                spec.dirs = vec![PathBuf::from(vm_paths::RUN)];
                // Guest memory plus room for the VMM itself.
                spec.memory_limit = Some((u64::from(mem_mib) + 128) << 20);
                spec.cpus = Some(f64::from(vcpus));
                spec.die_with_parent = true;
                spec.limits = vmm_limits(mem_mib);
                spec.args = vec!["--api-sock".into(), vm_paths::API.into()];
                jail_owner = Some((spec.uid, spec.gid));
                let root = spec.root();
                (
                    root,
                    tokio::process::Command::from(spec.command(&jail.jailer_bin)),
                )
            }
        };
        // An unjailed VMM joins its network namespace in the child, on an
        // fd opened here (a jailed one gets `--netns`).
        let netns_fd = match (&cfg.jail, &netns) {
            (None, Some(ns)) => Some(std::fs::File::open(ns)?),
            _ => None,
        };
        if cfg.jail.is_none() {
            let raw_ns = netns_fd.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
            // SAFETY: the closure runs in the forked child before exec and
            // only makes async-signal-safe syscalls (prctl, setns on an fd
            // that stays open until after the spawn). (A jailed VMM gets
            // PDEATHSIG from the jailer, after its uid change, which clears it.)
            unsafe {
                cmd.pre_exec(move || {
                    // The VMM dies with the daemon instead of lingering unmanaged.
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    if let Some(fd) = raw_ns {
                        if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                })
            };
        }
        crate::oom::neutral(&mut cmd);
        cmd.arg("--id")
            .arg(&id)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        // From the spawner thread: PDEATHSIG follows the forking thread.
        let mut child = super::spawner::spawn(cmd)
            .await
            .map_err(|e| InstanceError::Spawn(format!("{e}")))?;
        drop(netns_fd);
        let pid = child.id();
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let jailed = cfg.jail.is_some();
        let (exit_tx, exit_rx) = watch::channel(None);
        tokio::spawn(async move {
            let status = tokio::select! {
                s = child.wait() => s,
                _ = kill_rx => {
                    // A jailer ends its VMM on SIGTERM and exits once it has
                    // reaped it; SIGKILL if that takes too long (and for an
                    // unjailed VMM).
                    if let (true, Some(p)) = (jailed, pid) {
                        // SAFETY: kill(2) on our own child, not yet reaped
                        // (this task alone waits for it).
                        unsafe { libc::kill(p as i32, libc::SIGTERM) };
                        if let Ok(s) = tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
                            s
                        } else {
                            let _ = child.start_kill();
                            child.wait().await
                        }
                    } else {
                        let _ = child.start_kill();
                        child.wait().await
                    }
                }
            };
            // The jailer exits after the VMM: its uid is free again.
            drop(lease);
            let reason = match status {
                Ok(s) => s.to_string(),
                Err(e) => format!("wait failed: {e}"),
            };
            let _ = exit_tx.send(Some(reason));
        });
        let mut inst = Instance {
            id,
            host_dir,
            jailed: cfg.jail.is_some(),
            jail_owner,
            chroot_base: cfg.jail.as_ref().map(|j| j.chroot_base.clone()),
            log_path,
            kill: Mutex::new(Some(kill_tx)),
            exit: exit_rx,
            agent: Arc::new(Mutex::new(None)),
            pid,
            started: Instant::now(),
            net: Mutex::new(None),
            physical_address: None,
            tasks: Mutex::new(Vec::new()),
            nbd_pin: Default::default(),
            nbd_listening: Default::default(),
            disk_dir: Mutex::new(None),
        };
        let client = inst.client();
        let ready = client.wait_ready(Duration::from_secs(10));
        tokio::select! {
            r = ready => r?,
            reason = inst.wait_exit() => return Err(InstanceError::Exited(inst.describe_exit(&reason))),
        }
        if inst.jailed {
            // The jailer stays the VMM's parent: report the VMM's own pid.
            inst.pid = inst.pid.and_then(crate::jail::jailed_pid).or(inst.pid);
        }
        Ok(inst)
    }

    /// Boots a fresh VM from `files` and waits for its agent's hello.
    /// The VMM may write into `out` (seen as `/out`), for a snapshot.
    /// With `volume_bytes`, the VM gets a read-write drive of that size
    /// for a volume, on a sparse placeholder in `out`: restores open the
    /// volume in its place (see [`Instance::restore`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn boot(
        cfg: &LaunchConfig,
        files: &VmFiles,
        mem_mib: u32,
        vcpus: u32,
        out: &Path,
        net: Option<&NetRequest>,
        volume_bytes: Option<u64>,
        tmp_mib: Option<u32>,
    ) -> Result<Instance, InstanceError> {
        let inputs = [
            (vm_paths::KERNEL, files.kernel.as_path()),
            (vm_paths::ROOTFS, files.rootfs.as_path()),
            (vm_paths::CODE, files.code.as_path()),
        ];
        let inst = Instance::spawn(cfg, &inputs, Some(out), mem_mib, vcpus, net).await?;
        let placeholder = match volume_bytes {
            None => None,
            Some(size) => Some(
                inst.make_out_file(out, vm_paths::VOLUME_PLACEHOLDER, |f| f.set_len(size))
                    .await?,
            ),
        };
        let tmp_disk = match tmp_mib {
            None => None,
            Some(mib) => Some(
                inst.make_out_file(out, vm_paths::TMP_DISK, |f| {
                    crate::ephemeral::format_image(f, mib)
                })
                .await?,
            ),
        };
        // The VMM writes its snapshot there: the directory becomes its
        // uid's (0700) for the build.
        if let Err(e) = inst.give_disks(out) {
            inst.destroy().await;
            return Err(e.into());
        }
        let result = inst
            .configure_and_start(cfg, files, mem_mib, vcpus, tmp_disk, placeholder)
            .await;
        match result {
            Ok(()) => Ok(inst),
            Err(e) => {
                inst.destroy().await;
                Err(e)
            }
        }
    }

    async fn configure_and_start(
        &self,
        cfg: &LaunchConfig,
        files: &VmFiles,
        mem_mib: u32,
        vcpus: u32,
        tmp_disk: Option<PathBuf>,
        volume_placeholder: Option<PathBuf>,
    ) -> Result<(), InstanceError> {
        let api = self.client();
        api.put_boot_source(&BootSourceConfig {
            boot_args: cfg.boot_args.clone(),
            ..BootSourceConfig::new(self.input_str(vm_paths::KERNEL, &files.kernel)?)
        })
        .await?;
        let vcpu_count = u8::try_from(vcpus)
            .map_err(|_| InstanceError::Config(format!("{vcpus} vCPUs is too many")))?;
        api.put_machine_config(&MachineConfig::new(vcpu_count, mem_mib as usize))
            .await?;
        let rootfs = self.input_str(vm_paths::ROOTFS, &files.rootfs)?;
        api.put_drive(&BlockDeviceConfig {
            is_root_device: true,
            is_read_only: true,
            ..BlockDeviceConfig::file("rootfs", rootfs)
        })
        .await?;
        let code = self.input_str(vm_paths::CODE, &files.code)?;
        api.put_drive(&BlockDeviceConfig {
            is_read_only: true,
            ..BlockDeviceConfig::file("code", code)
        })
        .await?;
        // Drive order is guest device order: /tmp's disk, then a volume.
        if let Some(p) = tmp_disk {
            let drive = BlockDeviceConfig::file(crate::ephemeral::DRIVE_ID, wire_path(&p)?);
            api.put_drive(&drive).await?;
        }
        if let Some(p) = volume_placeholder {
            let drive = BlockDeviceConfig::file(crate::volumes::DRIVE_ID, wire_path(&p)?);
            api.put_drive(&drive).await?;
        }
        let iface = self
            .net
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(m, n)| NetworkInterfaceConfig {
                guest_mac: Some(n.logical.mac()),
                terminate_connections_on_pause: m.config().terminate_connections,
                ..NetworkInterfaceConfig::tap(crate::net::GUEST_IFACE, crate::net::TAP_NAME)
            });
        if let Some(iface) = iface {
            api.put_network_interface(&iface).await?;
        }
        api.put_vsock(&VsockConfig {
            vsock_id: None,
            guest_cid: 3,
            uds_path: self.vm_str(vm_paths::VSOCK)?,
        })
        .await?;
        // The hello arrives on <uds>_53; listen before the guest starts.
        let listener = ember_agent::bind_ready_listener(self.vsock_path())?;
        // The jailed VMM (another uid) must be able to connect.
        self.give_to_vmm(&ember_agent::host_port_socket_path(self.vsock_path(), 53))?;
        api.start().await?;
        let timeout = cfg.boot_timeout;
        let hello =
            tokio::task::spawn_blocking(move || ember_agent::wait_ready(&listener, timeout));
        tokio::select! {
            r = hello => match r {
                Ok(Ok(_)) => {}
                Ok(Err(ClientError::Timeout(t))) => return Err(InstanceError::BootTimeout(t)),
                Ok(Err(e)) => return Err(e.into()),
                Err(e) => return Err(InstanceError::Spawn(format!("hello waiter: {e}"))),
            },
            reason = self.wait_exit() => return Err(InstanceError::Exited(self.describe_exit(&reason))),
        }
        self.connect_agent(Duration::from_secs(30)).await
    }

    /// Restores a clone from the snapshot in `snapshot_dir` (running) and
    /// connects to its agent, refreshing its entropy and clock.
    /// With `volume`, the snapshot's volume drive opens that attachment
    /// (through [`Instance::start_nbd_path`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn restore(
        cfg: &LaunchConfig,
        files: &VmFiles,
        snapshot_dir: &Path,
        mem_mib: u32,
        vcpus: u32,
        net: Option<&NetRequest>,
        volume: Option<&crate::volumes::Grant>,
        tmp_golden: Option<&Path>,
    ) -> Result<Instance, InstanceError> {
        let snap = snapshot_dir.join("vm.snap");
        // The clone's own /tmp disk: a copy of the snapshot's.
        let disk_dir = match tmp_golden {
            None => None,
            Some(golden) => {
                let (dir, d) = new_disk_dir(cfg)?;
                if let Err(e) = crate::ephemeral::copy_image(golden, &d) {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(e.into());
                }
                Some(dir)
            }
        };
        let mem = snapshot_dir.join("mem");
        let inputs = [
            (vm_paths::SNAPSHOT, snap.as_path()),
            (vm_paths::MEM, mem.as_path()),
            (vm_paths::ROOTFS, files.rootfs.as_path()),
            (vm_paths::CODE, files.code.as_path()),
        ];
        let inst =
            match Instance::spawn(cfg, &inputs, disk_dir.as_deref(), mem_mib, vcpus, net).await {
                Ok(i) => i,
                Err(e) => {
                    if let Some(d) = &disk_dir {
                        let _ = std::fs::remove_dir_all(d);
                    }
                    return Err(e);
                }
            };
        inst.own_disks(disk_dir.clone());
        if let Some(d) = &disk_dir {
            if let Err(e) = inst.give_disks(d) {
                inst.destroy().await;
                return Err(e.into());
            }
        }
        let load = match inst.load_params(&snap, &mem, disk_dir.as_deref(), volume) {
            Ok(l) => l,
            Err(e) => {
                inst.destroy().await;
                return Err(e);
            }
        };
        let t = Instant::now();
        let result = async {
            inst.client().load_snapshot(&load).await?;
            let loaded = t.elapsed();
            inst.connect_agent(Duration::from_secs(30)).await?;
            let connected = t.elapsed();
            inst.with_agent(|a| a.refresh()).await??;
            log::debug!(
                "restored {}: VMM ready {:?}, loaded +{loaded:?}, agent +{connected:?}, refreshed +{:?}",
                inst.id,
                t.duration_since(inst.started),
                t.elapsed()
            );
            Ok::<(), InstanceError>(())
        }
        .await;
        match result {
            Ok(()) => Ok(inst),
            Err(e) => {
                inst.destroy().await;
                Err(e)
            }
        }
    }

    /// Starts a VMM that waits, on [`Instance::migration_in_socket`], for
    /// a migration stream of a VM made of `files` (bound where the source
    /// had them in its jail; passed as overrides when unjailed).
    /// With `volume`, hostd's NBD path to the volume service is ready in
    /// the jail for the drive override the switch-over brings.
    pub async fn receive(
        cfg: &LaunchConfig,
        files: &VmFiles,
        mem_mib: u32,
        vcpus: u32,
        net: Option<&NetRequest>,
        volume: Option<&crate::volumes::Grant>,
        fill_tmp_from: Option<crate::migrate::stream::PeerTarget>,
    ) -> Result<Instance, InstanceError> {
        let inputs = [
            (vm_paths::ROOTFS, files.rootfs.as_path()),
            (vm_paths::CODE, files.code.as_path()),
        ];
        // A /tmp disk arriving: an empty file the VMM fills from the source.
        let disk_dir = match fill_tmp_from {
            Some(_) => Some(new_disk_dir(cfg)?.0),
            None => None,
        };
        let inst =
            match Instance::spawn(cfg, &inputs, disk_dir.as_deref(), mem_mib, vcpus, net).await {
                Ok(i) => i,
                Err(e) => {
                    if let Some(d) = &disk_dir {
                        let _ = std::fs::remove_dir_all(d);
                    }
                    return Err(e);
                }
            };
        inst.own_disks(disk_dir.clone());
        if let Some(d) = &disk_dir {
            // The VMM makes its disk's file there as it fills it.
            if let Err(e) = inst.give_disks(d) {
                inst.destroy().await;
                return Err(e.into());
            }
        }
        let received = async {
            let mut params = ReceiveMigrationParams::new(format!(
                "unix://{}",
                inst.vm_str(vm_paths::MIGRATE_IN)?
            ));
            params.serial_out_path = Some(inst.vm_str(vm_paths::SERIAL)?);
            if !inst.jailed {
                params.vsock_override = Some(VsockOverride {
                    uds_path: inst.vm_str(vm_paths::VSOCK)?,
                });
                for (drive_id, path) in [("rootfs", &files.rootfs), ("code", &files.code)] {
                    params.drive_overrides.push(DriveOverride {
                        drive_id: drive_id.into(),
                        path_on_host: wire_path(path)?,
                    });
                }
            }
            if let Some(g) = volume {
                inst.start_nbd_path(g)?;
            }
            if let (Some(t), Some(dir)) = (fill_tmp_from, &disk_dir) {
                let sock = inst.start_peer_forwarder(vm_paths::FILL, t)?;
                params.fill_overrides.push(FillOverride {
                    drive_id: crate::ephemeral::DRIVE_ID.into(),
                    fill_from: FillFrom::nbd(format!(
                        "nbd+unix:///disk?socket={}",
                        wire_path(&sock)?
                    )),
                });
                if !inst.jailed {
                    params.drive_overrides.push(DriveOverride {
                        drive_id: crate::ephemeral::DRIVE_ID.into(),
                        path_on_host: wire_path(&dir.join(crate::ephemeral::FILE))?,
                    });
                }
            }
            inst.client().receive_migration(&params).await?;
            Ok::<(), InstanceError>(())
        }
        .await;
        match received {
            Ok(()) => Ok(inst),
            Err(e) => {
                inst.destroy().await;
                Err(e)
            }
        }
    }

    /// `PUT /snapshot/load` of a clone: its memory, its own vsock socket
    /// and /tmp disk (unjailed; in a jail the paths saved are already the
    /// clone's), and the volume's attachment through hostd's NBD path.
    fn load_params(
        &self,
        snap: &Path,
        mem: &Path,
        disk_dir: Option<&Path>,
        volume: Option<&crate::volumes::Grant>,
    ) -> Result<LoadSnapshotParams, InstanceError> {
        let backend = MemBackend {
            backend_type: MemBackendType::File,
            backend_path: self.input_str(vm_paths::MEM, mem)?,
        };
        let mut load = LoadSnapshotParams::new(self.input_str(vm_paths::SNAPSHOT, snap)?, backend);
        load.resume_vm = true;
        load.serial_out_path = Some(self.vm_str(vm_paths::SERIAL)?);
        if !self.jailed {
            // Every clone's vsock socket must differ; in a jail the path
            // recorded in the snapshot is already private to the clone.
            load.vsock_override = Some(VsockOverride {
                uds_path: self.vm_str(vm_paths::VSOCK)?,
            });
        }
        if let (Some(d), false) = (disk_dir, self.jailed) {
            load.drive_overrides.push(DriveOverride {
                drive_id: crate::ephemeral::DRIVE_ID.into(),
                path_on_host: wire_path(&d.join(crate::ephemeral::FILE))?,
            });
        }
        if let Some(g) = volume {
            let sock = self.start_nbd_path(g)?;
            load.drive_overrides.push(DriveOverride {
                drive_id: crate::volumes::DRIVE_ID.into(),
                path_on_host: g.uri_via(&sock),
            });
        }
        Ok(load)
    }

    /// Listens in the jail for the VMM's NBD connections to a volume and
    /// joins each to the export `grant` names, whatever export the VMM
    /// asks for ([`crate::volumes::forward_pinned`]); answers the socket's
    /// path as the VMM sees it. Called again with a new grant (the same
    /// volume granted again), later connections open the new one.
    pub fn start_nbd_path(&self, grant: &crate::volumes::Grant) -> Result<PathBuf, InstanceError> {
        use std::sync::atomic::Ordering;
        let pin = grant.pin()?;
        *self.nbd_pin.lock().unwrap_or_else(|p| p.into_inner()) = Some(pin);
        if !self.nbd_listening.swap(true, Ordering::SeqCst) {
            let l = match self.listen_for_vmm(vm_paths::NBD) {
                Ok(l) => l,
                Err(e) => {
                    self.nbd_listening.store(false, Ordering::SeqCst);
                    return Err(e.into());
                }
            };
            let task = tokio::spawn(crate::volumes::forward_pinned(l, self.nbd_pin.clone()));
            self.tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(task);
        }
        Ok(self.vm(vm_paths::NBD))
    }

    /// Listens at `vm_path` in the jail and joins each connection to the
    /// peer host's port `target` (mutual TLS and its ticket).
    fn start_peer_forwarder(
        &self,
        vm_path: &str,
        target: crate::migrate::stream::PeerTarget,
    ) -> std::io::Result<PathBuf> {
        let l = self.listen_for_vmm(vm_path)?;
        let task = tokio::spawn(crate::migrate::stream::forward_to_peer(l, target));
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
        Ok(self.vm(vm_path))
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

    /// `GET /drives/tmp/fill` of a VM whose /tmp disk is filling, as JSON
    /// (how hostd's migration code reads it).
    pub async fn tmp_fill_status(&self) -> Result<serde_json::Value, InstanceError> {
        let status = self
            .client()
            .drive_fill_status(crate::ephemeral::DRIVE_ID)
            .await?;
        as_json(&status)
    }

    /// Where a receiving VMM's volume drive reaches the volume service (as
    /// the VMM sees it; the source names it in the switch-over's URI).
    pub fn nbd_socket(&self) -> PathBuf {
        self.vm(vm_paths::NBD)
    }

    /// Runs `script` with `sh` as root in the guest; an error unless it
    /// exits 0.
    pub async fn run_in_guest(&self, script: String) -> Result<(), InstanceError> {
        let req = ember_agent::protocol::ExecRequest {
            timeout_ms: Some(60_000),
            ..ember_agent::protocol::ExecRequest::new(["/bin/sh", "-c", &script])
        };
        let r = self.with_agent(move |a| a.exec(&req)).await??;
        if r.exit_code == Some(0) {
            Ok(())
        } else {
            Err(InstanceError::Spawn(format!(
                "in the guest, {script:?} ended with {:?}/{:?}: {}",
                r.exit_code,
                r.signal,
                String::from_utf8_lossy(&r.stderr).trim()
            )))
        }
    }

    /// Host path of the socket a receiving VMM listens on.
    pub fn migration_in_socket(&self) -> PathBuf {
        self.host(vm_paths::MIGRATE_IN)
    }

    /// Listens where this (source) VMM will send its migration stream,
    /// reachable by the jailed VMM's uid.
    pub fn migration_out_listener(&self) -> std::io::Result<tokio::net::UnixListener> {
        self.listen_for_vmm(vm_paths::MIGRATE_OUT)
    }

    /// A unix socket at `vm_path` (as the VMM sees it) that the VMM may
    /// connect to.
    fn listen_for_vmm(&self, vm_path: &str) -> std::io::Result<tokio::net::UnixListener> {
        let host = self.host(vm_path);
        let _ = std::fs::remove_file(&host);
        let l = tokio::net::UnixListener::bind(&host)?;
        self.give_to_vmm(&host)?;
        Ok(l)
    }

    /// Makes a host file (or socket) this (jailed: other-uid) VMM may
    /// open read-write: the entry itself changes owner, never what a link
    /// there points to (the jail's directories are the VMM's to write).
    fn give_to_vmm(&self, host: &Path) -> std::io::Result<()> {
        if let Some((uid, gid)) = self.jail_owner {
            let (Some(parent), Some(name)) = (host.parent(), host.file_name()) else {
                return Err(std::io::Error::other(format!(
                    "{}: no parent",
                    host.display()
                )));
            };
            crate::beneath::Dir::open(parent)?.chown_entry(&name.to_string_lossy(), uid, gid)?;
        }
        Ok(())
    }

    /// Hands the disk directory `dir` (0700) and the `/tmp` image in it,
    /// if any, to this jailed VMM's uid (nothing to do unjailed).
    fn give_disks(&self, dir: &Path) -> std::io::Result<()> {
        if let Some((uid, gid)) = self.jail_owner {
            let d = crate::beneath::Dir::open(dir)?;
            crate::ephemeral::give_dir(&d, uid, gid)?;
        }
        Ok(())
    }

    /// Makes the file `vm_path` (under `/out`) in the host directory `out`
    /// with `make` on the new, open file (created there without following
    /// links; nothing may be there before), for the VMM to open
    /// read-write; answers the path to hand the VMM. On failure the
    /// instance is destroyed.
    async fn make_out_file(
        &self,
        out: &Path,
        vm_path: &str,
        make: impl FnOnce(&std::fs::File) -> std::io::Result<()>,
    ) -> Result<PathBuf, InstanceError> {
        let rel = Path::new(vm_path)
            .strip_prefix(vm_paths::OUT)
            .unwrap_or(Path::new(vm_path));
        let host = out.join(rel);
        let made = (|| {
            let f = crate::beneath::Dir::open(out)?.create_new(&rel.to_string_lossy(), 0o600)?;
            make(&f)?;
            if let Some((uid, gid)) = self.jail_owner {
                crate::beneath::fchown(&f, uid, gid)?;
            }
            Ok::<(), std::io::Error>(())
        })();
        match made {
            Ok(()) if self.jailed => Ok(PathBuf::from(vm_path)),
            Ok(()) => Ok(host),
            Err(e) => {
                self.destroy().await;
                Err(e.into())
            }
        }
    }

    /// `PUT /migrate/send` to the socket of [`Instance::migration_out_listener`].
    /// With `manual`, the source waits paused after the last page for
    /// [`Instance::switch_over`].
    pub async fn send_migration(
        &self,
        downtime_ms: u64,
        manual: bool,
    ) -> Result<(), InstanceError> {
        let uri = format!("unix://{}", self.vm_str(vm_paths::MIGRATE_OUT)?);
        let params = SendMigrationParams {
            downtime_ms,
            switch_over: if manual {
                SwitchOver::Manual
            } else {
                SwitchOver::Auto
            },
            ..SendMigrationParams::new(uri)
        };
        self.client().migrate(&params).await?;
        Ok(())
    }

    /// `PUT /migrate/switch-over`: the destination opens `drive_id` at
    /// `uri` and resumes.
    pub async fn switch_over(&self, drive_id: &str, uri: &str) -> Result<(), InstanceError> {
        let params = SwitchOverParams {
            drive_overrides: vec![DriveOverride {
                drive_id: drive_id.into(),
                path_on_host: uri.into(),
            }],
        };
        self.client().switch_over(&params).await?;
        Ok(())
    }

    /// `PATCH /drives/{id}` to another NBD URI (a volume moved back here).
    pub async fn reopen_nbd(&self, drive_id: &str, uri: &str) -> Result<(), InstanceError> {
        let update = BlockDeviceUpdate {
            drive_id: drive_id.into(),
            nbd_uri: Some(uri.into()),
            ..BlockDeviceUpdate::default()
        };
        self.client().patch_drive(&update).await?;
        Ok(())
    }

    /// `PUT /migrate/cancel` (a migration past its switch-over refuses).
    pub async fn cancel_migration(&self) -> Result<(), InstanceError> {
        self.client().cancel_migration().await?;
        Ok(())
    }

    /// The VMM's `GET /migrate`, as JSON (how hostd's migration code reads
    /// it).
    pub async fn migration_status(&self) -> Result<serde_json::Value, InstanceError> {
        let status = self.client().migration_status().await?;
        as_json(&status)
    }

    /// After a migration here: connects to the agent and refreshes the
    /// guest's entropy and clock, as after a restore.
    pub async fn adopt_migrated(&self) -> Result<(), InstanceError> {
        self.connect_agent(Duration::from_secs(30)).await?;
        self.with_agent(|a| a.refresh()).await??;
        Ok(())
    }

    /// Connects to the agent again (a migration away failed and the VM
    /// runs here still).
    pub async fn reconnect_agent(&self) -> Result<(), InstanceError> {
        self.connect_agent(Duration::from_secs(30)).await
    }

    /// Connects to the agent. After a restore the guest drops connections
    /// made before it handled the vsock reset, so each attempt is short
    /// and proven with a health check; a dropped connection fails at once,
    /// and only a slow answer waits out an attempt, so the attempts grow
    /// (2, 4, 8, then 10 s) for a guest that is merely slow (a loaded host).
    async fn connect_agent(&self, timeout: Duration) -> Result<(), InstanceError> {
        let uds = self.vsock_path();
        let slot = self.agent.clone();
        let task = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + timeout;
            let mut attempt_timeout = Duration::from_secs(2);
            loop {
                let r = AgentClient::connect_retry(
                    &uds,
                    AGENT_PORT,
                    Duration::from_secs(5),
                    attempt_timeout,
                )
                .and_then(|mut a| a.health().map(|_| a));
                attempt_timeout = (attempt_timeout * 2).min(Duration::from_secs(10));
                match r {
                    Ok(a) => {
                        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(a);
                        return Ok(());
                    }
                    Err(e) if Instant::now() >= deadline => return Err(e),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        tokio::select! {
            r = task => r.map_err(|e| InstanceError::Spawn(format!("agent connector: {e}")))?
                .map_err(InstanceError::Agent),
            reason = self.wait_exit() => Err(InstanceError::Exited(self.describe_exit(&reason))),
        }
    }

    /// Runs `f` on the agent connection in a blocking thread. Fails at once
    /// if the VMM exits meanwhile.
    pub async fn with_agent<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut AgentClient) -> T + Send + 'static,
    ) -> Result<T, InstanceError> {
        let slot = self.agent.clone();
        let task = tokio::task::spawn_blocking(move || {
            let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
            guard.as_mut().map(f)
        });
        tokio::select! {
            r = task => match r {
                Ok(Some(v)) => Ok(v),
                Ok(None) => Err(InstanceError::Agent(ClientError::Closed)),
                Err(e) => Err(InstanceError::Spawn(format!("agent call: {e}"))),
            },
            reason = self.wait_exit() => Err(InstanceError::Exited(self.describe_exit(&reason))),
        }
    }

    /// Closes the agent connection cleanly (before a snapshot: clones
    /// would otherwise wake up with a connection whose host end is gone,
    /// which their restore must first end).
    pub async fn close_agent(&self) {
        let slot = self.agent.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let agent = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(agent) = agent {
                if !agent.close(AGENT_CLOSE) {
                    log::debug!("the agent did not close its connection within {AGENT_CLOSE:?}");
                }
            }
        })
        .await;
    }

    /// Pauses the VM and writes a Full snapshot to `dir` (a host path; for
    /// a jailed VMM it must be the `out` directory given to [`boot`]).
    pub async fn snapshot(&self, dir: &Path) -> Result<(), InstanceError> {
        let api = self.client();
        api.pause().await?;
        let base = if self.jailed {
            PathBuf::from(vm_paths::OUT)
        } else {
            dir.to_path_buf()
        };
        api.create_snapshot(&CreateSnapshotParams {
            snapshot_type: SnapshotType::Full,
            snapshot_path: wire_path(&base.join("vm.snap"))?,
            mem_file_path: wire_path(&base.join("mem"))?,
        })
        .await?;
        Ok(())
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
        if let Some((m, n)) = net {
            let _ = tokio::task::spawn_blocking(move || m.teardown(&n)).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Live VMMs never share a jail uid; a uid is free again once its
    /// lease (held until the VMM is reaped) is dropped. (Before, uids were
    /// `uid_base + counter % uid_count`: the fourth VMM of three uids got
    /// the first one's while it still ran.)
    #[test]
    fn jail_uids_are_unique_among_live_vmms() {
        let base = 3_000_000;
        let a = UidLease::take(base, 3).unwrap();
        let b = UidLease::take(base, 3).unwrap();
        let c = UidLease::take(base, 3).unwrap();
        let mut uids = vec![a.uid(), b.uid(), c.uid()];
        uids.sort();
        assert_eq!(uids, vec![base, base + 1, base + 2]);
        let e = UidLease::take(base, 3).unwrap_err();
        assert!(e.to_string().contains("held by live VMMs"), "{e}");
        let freed = b.uid();
        drop(b);
        let d = UidLease::take(base, 3).unwrap();
        assert_eq!(d.uid(), freed);
        drop((a, c, d));
    }
}
