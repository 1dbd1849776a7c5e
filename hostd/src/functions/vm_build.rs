//! The snapshot builder of the running daemon: a version's guest booted
//! in a microVM (with its network, volume and `/tmp` disk), its runtime
//! initialized, the VM snapshotted, and the files sealed.

use std::path::Path;
use std::sync::Weak;

use super::build::{BuildFailure, BuildFuture, Built, SnapshotBuilder};
use super::machine_for;
use crate::daemon::Daemon;
use crate::model::*;
use crate::vm::Instance;

/// Builds through the daemon it belongs to (held weakly: the daemon owns it).
pub struct VmBuilder {
    daemon: Weak<Daemon>,
}

impl VmBuilder {
    pub fn new(daemon: Weak<Daemon>) -> VmBuilder {
        VmBuilder { daemon }
    }
}

impl SnapshotBuilder for VmBuilder {
    fn build<'a>(&'a self, name: &'a str, v: &'a VersionRecord, dir: &'a Path) -> BuildFuture<'a> {
        Box::pin(async move {
            let Some(d) = self.daemon.upgrade() else {
                return Err(BuildFailure::Internal("the daemon is shutting down".into()));
            };
            let network = d.build_network(name, v);
            let init_duration_ms = build_snapshot(&d, name, v, dir, network.as_ref()).await?;
            Ok(Built {
                init_duration_ms,
                network: network.map(|n| n.logical),
            })
        })
    }
}

/// Boots the version, lets its runtime initialize, snapshots it into
/// `dir`. Returns the init duration.
async fn build_snapshot(
    d: &Daemon,
    name: &str,
    v: &VersionRecord,
    dir: &Path,
    network: Option<&crate::net::NetRequest>,
) -> Result<u64, BuildFailure> {
    let files = d
        .functions
        .vm_files(&v.spec)
        .map_err(|e| BuildFailure::Internal(e.to_string()))?;
    // A directory of this generation is what a build cut short (a
    // crash) left: start it afresh (files are made new, never reused).
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .map_err(|e| BuildFailure::Internal(format!("{}: {e}", dir.display())))?;
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| BuildFailure::Internal(format!("{}: {e}", dir.display())))?;
    // Root's alone until the jailed VMM (its own uid) is given it for
    // the build (Instance::boot); never open to everyone.
    set_mode(dir, 0o700).map_err(|e| BuildFailure::Internal(e.to_string()))?;
    let (vcpus, mem) = machine_for(v.spec.memory_mib);
    let volume_bytes = match (&v.spec.file_system, &d.volumes) {
        (Some(fs), Some(vs)) => Some(vs.size(&fs.volume).await.map_err(|e| {
            BuildFailure::InvalidConfiguration(format!("the function's volume {}: {e}", fs.volume))
        })?),
        (Some(_), None) => {
            return Err(BuildFailure::InvalidConfiguration(
                "the function has a volume but this host no volume service".into(),
            ))
        }
        _ => None,
    };
    let inst = Instance::boot(
        &d.cfg.launch,
        &files,
        mem,
        vcpus,
        dir,
        network,
        volume_bytes,
        v.spec.ephemeral_mib,
    )
    .await
    .map_err(|e| BuildFailure::Internal(format!("booting the microVM: {e}")))?;
    let mut spec = d.functions.runtime_spec(name, v);
    spec.network = network.map(|n| n.logical.guest());
    let with_tmp_disk = v.spec.ephemeral_mib.is_some();
    let result = async {
        if with_tmp_disk {
            // /tmp on its disk before the runtime (and its init) runs.
            let script = crate::ephemeral::mount_script(crate::ephemeral::GUEST_DEVICE);
            inst.run_in_guest(script)
                .await
                .map_err(|e| BuildFailure::Internal(format!("mounting /tmp: {e}")))?;
        }
        // A fresh guest's kernel has no entropy of its own (no RDRAND
        // in nested guests, no virtio-rng): without the host's, a
        // runtime whose start reads getrandom() (node seeds OpenSSL)
        // waits for the kernel's jitter entropy, half a minute here.
        inst.with_agent(|a| a.refresh())
            .await
            .map_err(|e| BuildFailure::Internal(e.to_string()))?
            .map_err(|e| BuildFailure::Internal(format!("seeding the guest: {e}")))?;
        let ready = inst
            .with_agent(move |a| a.start_runtime(&spec))
            .await
            .map_err(|e| BuildFailure::Internal(e.to_string()))?
            .map_err(|e| BuildFailure::Internal(format!("starting the runtime: {e}")))?;
        match ready {
            Ok(r) => {
                inst.close_agent().await;
                inst.snapshot(dir)
                    .await
                    .map_err(|e| BuildFailure::Internal(format!("snapshot: {e}")))?;
                Ok(r.init_duration_ms)
            }
            Err(f) => {
                let body = String::from_utf8_lossy(&f.payload).into_owned();
                let log = String::from_utf8_lossy(&f.log);
                let tail: String = log
                    .chars()
                    .rev()
                    .take(2000)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                Err(BuildFailure::Init(format!(
                    "{}: {body}; log: {tail}",
                    f.error_type
                )))
            }
        }
    }
    .await;
    inst.destroy().await;
    let init_ms = result?;
    seal_snapshot(dir, with_tmp_disk)
        .map_err(|e| BuildFailure::Internal(format!("the snapshot in {}: {e}", dir.display())))?;
    Ok(init_ms)
}

/// After a build, the snapshot's directory and files, which the VMM's uid
/// wrote, become root's again: the snapshot and memory readable by the
/// VMMs that restore from them, the golden `/tmp` image by hostd alone
/// (it copies it). Each must be a regular file of its own: a link or a
/// hard link left there fails the build, and nothing is followed.
pub(crate) fn seal_snapshot(dir: &Path, with_tmp_disk: bool) -> std::io::Result<()> {
    let d = crate::beneath::Dir::open(dir)?;
    let root = nix::unistd::geteuid().is_root();
    let mut files = vec![("vm.snap", 0o644), ("mem", 0o644)];
    if with_tmp_disk {
        files.push((crate::ephemeral::FILE, 0o600));
    }
    for (name, mode) in files {
        let f = d.open_file(name, false)?;
        if root {
            crate::beneath::fchown(&f, 0, 0)?;
        }
        crate::beneath::fchmod(&f, mode)?;
    }
    if root {
        d.chown(0, 0)?;
    }
    d.chmod(0o755)
}

fn set_mode(p: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot directory the building VMM's uid wrote: links or hard
    /// links left for its files fail the seal, and what they point to
    /// keeps its owner and mode; real files become root's (as root).
    #[test]
    fn sealing_a_snapshot_follows_no_link() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let t = tempfile::tempdir().unwrap();
        let secret = t.path().join("shadow");
        std::fs::write(&secret, "s").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let before = std::fs::metadata(&secret).unwrap();
        let mut sealed = 0;
        for (i, plant) in ["vm.snap", "mem", crate::ephemeral::FILE]
            .iter()
            .enumerate()
        {
            for hard in [false, true] {
                let dir = t.path().join(format!("snap-{i}-{hard}"));
                std::fs::create_dir(&dir).unwrap();
                for f in ["vm.snap", "mem", crate::ephemeral::FILE] {
                    if f == *plant {
                        if hard {
                            std::fs::hard_link(&secret, dir.join(f)).unwrap();
                        } else {
                            std::os::unix::fs::symlink(&secret, dir.join(f)).unwrap();
                        }
                    } else {
                        std::fs::write(dir.join(f), "x").unwrap();
                    }
                }
                if seal_snapshot(&dir, true).is_ok() {
                    sealed += 1;
                }
            }
        }
        assert_eq!(sealed, 0);
        let after = std::fs::metadata(&secret).unwrap();
        assert_eq!((after.uid(), after.mode()), (before.uid(), before.mode()));
        let ok = t.path().join("ok");
        std::fs::create_dir(&ok).unwrap();
        for f in ["vm.snap", "mem", crate::ephemeral::FILE] {
            std::fs::write(ok.join(f), "x").unwrap();
        }
        seal_snapshot(&ok, true).unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&ok), 0o755);
        assert_eq!(mode(&ok.join("mem")), 0o644);
        assert_eq!(mode(&ok.join(crate::ephemeral::FILE)), 0o600);
    }
}
