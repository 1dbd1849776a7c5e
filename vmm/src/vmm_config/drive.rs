//! Drives: the shapes are `ember-vmm-api`'s; the checks of a drive's
//! backend (the file exists, the NBD URI parses) need the host and the
//! VMM's NBD client, so they are here.

pub use ember_vmm_api::drive::*;

use crate::devices::virtio::block::nbd::NbdUri;

/// Checks a `fill_from` of the drive `drive_id`.
pub fn validate_fill_from(fill: &FillFrom, drive_id: &str) -> Result<(), String> {
    NbdUri::parse(&fill.nbd_uri)
        .map_err(|e| format!("drive {drive_id}: bad fill_from.nbd_uri: {e}"))?;
    if fill.nbd_timeout_ms == Some(0) {
        return Err(format!(
            "drive {drive_id}: fill_from.nbd_timeout_ms must be > 0"
        ));
    }
    if fill.background_bytes_per_sec == Some(0) {
        return Err(format!(
            "drive {drive_id}: fill_from.background_bytes_per_sec must be > 0"
        ));
    }
    Ok(())
}

/// Shape checks of a `PATCH /drives/{id}` that need no device.
pub fn validate_update(update: &BlockDeviceUpdate) -> Result<(), String> {
    let id = &update.drive_id;
    if update.path_on_host.is_some() && update.nbd_uri.is_some() {
        return Err(format!(
            "drive {id}: give path_on_host or nbd_uri, not both"
        ));
    }
    if let Some(uri) = &update.nbd_uri {
        NbdUri::parse(uri).map_err(|e| format!("drive {id}: bad nbd_uri: {e}"))?;
    }
    if let Some(rl) = &update.rate_limiter {
        rl.validate()
            .map_err(|e| format!("drive {id}: rate_limiter: {e}"))?;
    }
    if let Some(s) = &update.io_scheduler {
        s.validate().map_err(|e| format!("drive {id}: {e}"))?;
    }
    Ok(())
}

/// Checks a drive's backend choice: its NBD URI parses and its file
/// exists, without opening either.
pub fn validate_config(cfg: &BlockDeviceConfig) -> Result<(), String> {
    if cfg.drive_id.is_empty() {
        return Err("drive_id must not be empty".into());
    }
    if let Some(rl) = &cfg.rate_limiter {
        rl.validate()
            .map_err(|e| format!("drive {}: rate_limiter: {e}", cfg.drive_id))?;
    }
    if let Some(s) = &cfg.io_scheduler {
        s.validate()
            .map_err(|e| format!("drive {}: {e}", cfg.drive_id))?;
    }
    if cfg.socket.is_some() {
        if cfg.rate_limiter.is_some() || cfg.io_scheduler.is_some() {
            return Err(format!(
                "drive {}: rate_limiter and io_scheduler apply to file and NBD drives, \
                 not vhost-user (the backend reads the queue itself)",
                cfg.drive_id
            ));
        }
        // The controller checks the socket itself.
        if cfg.nbd_uri.is_some() || !cfg.path_on_host.is_empty() || cfg.fill_from.is_some() {
            return Err(format!(
                "drive {}: path_on_host (and fill_from), nbd_uri and socket are mutually \
                 exclusive",
                cfg.drive_id
            ));
        }
        return Ok(());
    }
    match &cfg.nbd_uri {
        Some(uri) => {
            if cfg.fill_from.is_some() {
                return Err(format!(
                    "drive {}: fill_from fills a local path_on_host, not an nbd_uri drive",
                    cfg.drive_id
                ));
            }
            if !cfg.path_on_host.is_empty() {
                return Err(format!(
                    "drive {}: give path_on_host or nbd_uri, not both",
                    cfg.drive_id
                ));
            }
            NbdUri::parse(uri).map_err(|e| format!("drive {}: bad nbd_uri: {e}", cfg.drive_id))?;
            if cfg.nbd_timeout_ms == Some(0) {
                return Err(format!(
                    "drive {}: nbd_timeout_ms must be > 0",
                    cfg.drive_id
                ));
            }
        }
        None => {
            if cfg.nbd_timeout_ms.is_some() {
                return Err(format!(
                    "drive {}: nbd_timeout_ms needs nbd_uri",
                    cfg.drive_id
                ));
            }
            if let Some(fill) = &cfg.fill_from {
                // The file is created (sparse, the source's size) if absent.
                if cfg.path_on_host.is_empty() {
                    return Err(format!(
                        "drive {}: fill_from needs path_on_host, the local file to fill",
                        cfg.drive_id
                    ));
                }
                return validate_fill_from(fill, &cfg.drive_id);
            }
            if !std::path::Path::new(&cfg.path_on_host).exists() {
                return Err(format!(
                    "drive {}: path_on_host {} does not exist",
                    cfg.drive_id, cfg.path_on_host
                ));
            }
        }
    }
    Ok(())
}
