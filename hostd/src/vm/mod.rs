//! MicroVMs as hostd runs them: one instance, driven through the VMM's
//! typed API client (`ember-vmm-api`).
pub mod instance;
pub mod spawner;

/// The VMM's API client (also hostd's HTTP over other local sockets).
pub use ember_vmm_api::client as api_client;

pub use instance::{working_set, Instance, InstanceError, JailConfig, LaunchConfig, VmFiles};

/// The VMM's default guest kernel arguments (hostd appends its own).
pub const DEFAULT_BOOT_ARGS: &str =
    "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.dumbkbd";

/// Removes what VMMs of an earlier daemon run left behind (their
/// processes died with it: see `PR_SET_PDEATHSIG` in the spawn).
pub fn clean_run_dir(cfg: &LaunchConfig) -> std::io::Result<()> {
    std::fs::create_dir_all(&cfg.run_dir)?;
    // Instance directories, disk exports' sockets, and the /tmp disks of
    // versions before --disk-dir (they were kept in the run directory).
    for sub in ["instances", "exports", "disks"] {
        let p = cfg.run_dir.join(sub);
        if p.exists() {
            std::fs::remove_dir_all(&p)?;
        }
    }
    // No instance is alive at start: every disk directory is a crashed
    // run's.
    let n = crate::ephemeral::clean_base(&cfg.disk_dir, &[])?;
    if n > 0 {
        log::info!(
            "removed {n} /tmp disk(s) a previous run left in {}",
            cfg.disk_dir.display()
        );
    }
    if let Some(jail) = &cfg.jail {
        if let Ok(entries) = std::fs::read_dir(&jail.chroot_base) {
            for e in entries.flatten() {
                let id = e.file_name().to_string_lossy().into_owned();
                if let Err(err) = crate::jail::cleanup(&jail.chroot_base, &id) {
                    log::warn!("stale jail {id}: {err}");
                }
            }
        }
    }
    Ok(())
}
