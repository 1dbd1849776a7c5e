//! MicroVMs as hostd runs them: the VMM's API client and one instance.
pub mod api_client;
pub mod instance;

pub use instance::{Instance, InstanceError, JailConfig, LaunchConfig, VmFiles};

/// The VMM's default guest kernel arguments (hostd appends its own).
pub const DEFAULT_BOOT_ARGS: &str =
    "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.dumbkbd";

/// Removes what VMMs of an earlier daemon run left behind (their
/// processes died with it: see `PR_SET_PDEATHSIG` in the spawn).
pub fn clean_run_dir(cfg: &LaunchConfig) -> std::io::Result<()> {
    std::fs::create_dir_all(&cfg.run_dir)?;
    let instances = cfg.run_dir.join("instances");
    if instances.exists() {
        std::fs::remove_dir_all(&instances)?;
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
