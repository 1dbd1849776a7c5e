//! The VMM process: spawned directly or under `ember-jailer`, with its
//! own jail uid, resource limits and bind mounts, and watched by a
//! monitor task that reaps it; and the files and sockets a jailed VMM
//! (another uid) is given.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use super::half_built::HalfBuilt;
use super::{new_id, vm_paths, Instance, InstanceError, LaunchConfig};
use crate::net::NetRequest;

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
pub(super) struct UidLease(u32);

impl UidLease {
    pub(super) fn take(uid_base: u32, uid_count: u32) -> Result<UidLease, InstanceError> {
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

    pub(super) fn uid(&self) -> u32 {
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

/// Where a new VMM process lives on the host.
pub(super) struct Placement {
    pub(super) id: String,
    /// Its jail root, or its working directory when unjailed.
    pub(super) host_dir: PathBuf,
    /// The jail's uid:gid and chroot base (None: unjailed).
    pub(super) jail: Option<((u32, u32), PathBuf)>,
    pub(super) log_path: PathBuf,
}

impl HalfBuilt {
    /// Starts this build's VMM: its network namespace (from `net`), then
    /// the process, which it waits for until the API answers. `inputs`
    /// are host files bound (jailed) or referred to (unjailed) under their
    /// VM paths; `out` is a host directory the VMM may write to, seen as
    /// `/out`. The build's disk directory, if any, becomes the instance's
    /// and is given to the VMM.
    pub(super) async fn spawn(
        &mut self,
        cfg: &LaunchConfig,
        inputs: &[(&str, &Path)],
        out: Option<&Path>,
        mem_mib: u32,
        vcpus: u32,
        net: Option<&NetRequest>,
    ) -> Result<&Instance, InstanceError> {
        let id = new_id();
        let lease = match &cfg.jail {
            Some(j) => Some(UidLease::take(j.uid_base, j.uid_count)?),
            None => None,
        };
        let jail_uid = lease.as_ref().map(UidLease::uid);
        if let Some(req) = net {
            let (req, vm_id) = (req.clone(), id.clone());
            let made = tokio::task::spawn_blocking(move || {
                req.setup(&vm_id, jail_uid).map(|n| (req.manager, n))
            })
            .await
            .map_err(|e| InstanceError::Spawn(format!("network setup: {e}")))??;
            self.parts.net = Some(made);
        }
        let netns = self.parts.net.as_ref().map(|(_, n)| n.netns_path());
        let mut inst =
            Instance::start_process(cfg, inputs, out, mem_mib, vcpus, id, lease, netns).await?;
        inst.physical_address = self.parts.net.as_ref().map(|(_, n)| n.physical);
        *inst.net.get_mut().unwrap_or_else(|p| p.into_inner()) = self.parts.net.take();
        inst.own_disks(self.parts.disk_dir.take());
        let inst = self.parts.inst.insert(inst);
        inst.wait_api_ready().await?;
        if let Some(d) = inst.disk_dir() {
            inst.give_disks(&d)?;
        }
        Ok(inst)
    }
}

impl Instance {
    /// Starts the VMM process of instance `id` (not waiting for its API).
    #[allow(clippy::too_many_arguments)]
    async fn start_process(
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
        let mut jail = None;
        let (host_dir, mut cmd) = match &cfg.jail {
            None => {
                let dir = cfg.run_dir.join("instances").join(&id);
                std::fs::create_dir_all(&dir)?;
                let mut cmd = tokio::process::Command::new(&cfg.vmm_bin);
                cmd.arg("--api-sock").arg(dir.join("api.sock"));
                (dir, cmd)
            }
            Some(jail_cfg) => {
                let uid = jail_uid.unwrap_or(jail_cfg.uid_base);
                let mut spec =
                    crate::jail::JailSpec::new(id.clone(), &cfg.vmm_bin, uid, jail_cfg.gid);
                if let Some(ns) = &netns {
                    spec.netns = Some(ns.clone());
                    spec.devices.push(crate::jail::Device::Tun);
                }
                spec.chroot_base = jail_cfg.chroot_base.clone();
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
                jail = Some(((spec.uid, spec.gid), jail_cfg.chroot_base.clone()));
                let root = spec.root();
                (
                    root,
                    tokio::process::Command::from(spec.command(&jail_cfg.jailer_bin)),
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
        let child = crate::vm::spawner::spawn(cmd)
            .await
            .map_err(|e| InstanceError::Spawn(format!("{e}")))?;
        drop(netns_fd);
        let place = Placement {
            id,
            host_dir,
            jail,
            log_path,
        };
        Ok(Instance::of_process(place, child, lease))
    }

    /// The instance of the VMM process `child`, just started at `place`,
    /// and the task that reaps it (and frees its jail uid `lease`).
    pub(super) fn of_process(
        place: Placement,
        child: tokio::process::Child,
        lease: Option<UidLease>,
    ) -> Instance {
        let jailed = place.jail.is_some();
        let pid = child.id();
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let (exit_tx, exit_rx) = watch::channel(None);
        tokio::spawn(async move {
            let reason = reap(child, jailed, kill_rx).await;
            // The jailer exits after the VMM: its uid is free again.
            drop(lease);
            let _ = exit_tx.send(Some(reason));
        });
        let (jail_owner, chroot_base) = match place.jail {
            Some((owner, base)) => (Some(owner), Some(base)),
            None => (None, None),
        };
        Instance {
            id: place.id,
            host_dir: place.host_dir,
            jailed,
            jail_owner,
            chroot_base,
            log_path: place.log_path,
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
            restored_from: Default::default(),
            answered: Default::default(),
        }
    }

    /// Waits until the new VMM's API answers.
    async fn wait_api_ready(&mut self) -> Result<(), InstanceError> {
        let client = self.client();
        self.unless_exited(async { Ok(client.wait_ready(Duration::from_secs(10)).await?) })
            .await?;
        if self.jailed {
            // The jailer stays the VMM's parent: report the VMM's own pid.
            self.pid = self.pid.and_then(crate::jail::jailed_pid).or(self.pid);
        }
        Ok(())
    }

    /// Makes a host file (or socket) this (jailed: other-uid) VMM may
    /// open read-write: the entry itself changes owner, never what a link
    /// there points to (the jail's directories are the VMM's to write).
    pub(super) fn give_to_vmm(&self, host: &Path) -> std::io::Result<()> {
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
    pub(super) fn give_disks(&self, dir: &Path) -> std::io::Result<()> {
        if let Some((uid, gid)) = self.jail_owner {
            let d = crate::beneath::Dir::open(dir)?;
            crate::ephemeral::give_dir(&d, uid, gid)?;
        }
        Ok(())
    }

    /// Makes the file `vm_path` (under `/out`) in the host directory `out`
    /// with `make` on the new, open file (created there without following
    /// links; nothing may be there before), for the VMM to open
    /// read-write; answers the path to hand the VMM.
    pub(super) fn make_out_file(
        &self,
        out: &Path,
        vm_path: &str,
        make: impl FnOnce(&std::fs::File) -> std::io::Result<()>,
    ) -> Result<PathBuf, InstanceError> {
        let rel = Path::new(vm_path)
            .strip_prefix(vm_paths::OUT)
            .unwrap_or(Path::new(vm_path));
        let f = crate::beneath::Dir::open(out)?.create_new(&rel.to_string_lossy(), 0o600)?;
        make(&f)?;
        if let Some((uid, gid)) = self.jail_owner {
            crate::beneath::fchown(&f, uid, gid)?;
        }
        Ok(if self.jailed {
            PathBuf::from(vm_path)
        } else {
            out.join(rel)
        })
    }
}

/// Waits for the VMM process `child` to exit, ending it once `kill`
/// fires; answers how it ended.
async fn reap(
    mut child: tokio::process::Child,
    jailed: bool,
    kill: oneshot::Receiver<()>,
) -> String {
    let pid = child.id();
    let status = tokio::select! {
        s = child.wait() => s,
        _ = kill => {
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
    match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("wait failed: {e}"),
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
