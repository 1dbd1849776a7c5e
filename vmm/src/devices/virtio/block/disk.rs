//! What backs a block device: a host file or an NBD export.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::nbd::{Durability, NbdClient, NbdUri, DEFAULT_TIMEOUT};
use super::{BlockError, SECTOR_SIZE};
use crate::vmm_config::drive::BlockDeviceConfig;

/// Firecracker's `cache_type`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// No flush feature is offered and flush requests are no-ops: guest
    /// writes reach the host page cache but are never forced to stable
    /// storage (fast; data may be lost if the host crashes).
    #[default]
    Unsafe,
    /// VIRTIO_BLK_F_FLUSH is offered and a flush request does fdatasync.
    Writeback,
}

impl CacheType {
    pub fn parse(drive_id: &str, value: Option<&str>) -> Result<CacheType, BlockError> {
        match value {
            None | Some("Unsafe") => Ok(CacheType::Unsafe),
            Some("Writeback") => Ok(CacheType::Writeback),
            Some(other) => Err(BlockError::CacheType {
                drive_id: drive_id.to_string(),
                value: other.to_string(),
            }),
        }
    }
}

enum Backend {
    File(File),
    Nbd(Box<NbdClient>),
}

pub(crate) struct Disk {
    backend: Backend,
    /// Usable size in bytes: the file size rounded down to whole sectors.
    size: u64,
    pub(crate) read_only: bool,
    pub(crate) cache_type: CacheType,
    /// Reported by VIRTIO_BLK_T_GET_ID; zero-padded, not NUL-terminated at 20.
    pub(crate) id: [u8; 20],
}

impl Disk {
    pub(crate) fn open(config: &BlockDeviceConfig) -> Result<Disk, BlockError> {
        let drive_id = &config.drive_id;
        let cache_type = CacheType::parse(drive_id, config.cache_type.as_deref())?;
        let (backend, file_size) = match &config.nbd_uri {
            Some(uri) => {
                let client = open_nbd(config, uri, cache_type)?;
                let size = client.size();
                (Backend::Nbd(Box::new(client)), size)
            }
            None => open_file(config)?,
        };
        if !file_size.is_multiple_of(SECTOR_SIZE) {
            log::warn!(
                "drive {drive_id}: size {file_size} is not a multiple of \
                 {SECTOR_SIZE}; the last partial sector is not accessible"
            );
        }
        let serial = config.serial.as_deref().unwrap_or(drive_id);
        let mut id = [0u8; 20];
        let n = serial.len().min(id.len());
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Ok(Disk {
            backend,
            size: file_size - file_size % SECTOR_SIZE,
            read_only: config.is_read_only,
            cache_type,
            id,
        })
    }

    /// Capacity in 512-byte sectors.
    pub(crate) fn sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    /// Whether `len` bytes at `sector` lie within the disk.
    pub(crate) fn in_range(&self, sector: u64, len: u64) -> bool {
        sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|start| start.checked_add(len))
            .is_some_and(|end| end <= self.size)
    }

    pub(crate) fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let m = &crate::metrics::METRICS.block;
        m.read_ops.inc();
        m.read_bytes.add(buf.len() as u64);
        match &mut self.backend {
            Backend::File(f) => f.read_exact_at(buf, offset),
            Backend::Nbd(c) => c.read_at(buf, offset),
        }
        .inspect_err(|_| m.io_errors.inc())
    }

    pub(crate) fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let m = &crate::metrics::METRICS.block;
        m.write_ops.inc();
        m.write_bytes.add(buf.len() as u64);
        match &mut self.backend {
            Backend::File(f) => f.write_all_at(buf, offset),
            Backend::Nbd(c) => c.write_at(buf, offset),
        }
        .inspect_err(|_| m.io_errors.inc())
    }

    /// The backend can discard ranges (NBD TRIM).
    pub(crate) fn can_discard(&self) -> bool {
        matches!(&self.backend, Backend::Nbd(c) if c.can_trim())
    }

    /// The backend can zero ranges without data (NBD WRITE_ZEROES).
    pub(crate) fn can_write_zeroes(&self) -> bool {
        matches!(&self.backend, Backend::Nbd(c) if c.can_write_zeroes())
    }

    pub(crate) fn discard(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        match &mut self.backend {
            Backend::Nbd(c) => c.trim(offset, len),
            Backend::File(_) => Err(std::io::ErrorKind::Unsupported.into()),
        }
    }

    pub(crate) fn write_zeroes(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        crate::metrics::METRICS.block.write_ops.inc();
        match &mut self.backend {
            Backend::Nbd(c) => c.write_zeroes(offset, len),
            Backend::File(_) => Err(std::io::ErrorKind::Unsupported.into()),
        }
    }

    pub(crate) fn flush(&mut self) -> std::io::Result<()> {
        crate::metrics::METRICS.block.flush_ops.inc();
        match self.cache_type {
            CacheType::Unsafe => Ok(()),
            CacheType::Writeback => match &mut self.backend {
                Backend::File(f) => f.sync_data(),
                Backend::Nbd(c) => c.flush(),
            },
        }
    }
}

fn open_file(config: &BlockDeviceConfig) -> Result<(Backend, u64), BlockError> {
    let drive_id = &config.drive_id;
    let path = &config.path_on_host;
    if path.is_empty() {
        return Err(BlockError::EmptyPath {
            drive_id: drive_id.clone(),
        });
    }
    let mut file = OpenOptions::new()
        .read(true)
        .write(!config.is_read_only)
        .open(path)
        .map_err(|source| BlockError::Open {
            drive_id: drive_id.clone(),
            path: path.clone(),
            source,
        })?;
    // Seeking also works for block devices, whose metadata length is 0.
    let size = file
        .seek(SeekFrom::End(0))
        .map_err(|source| BlockError::Size {
            drive_id: drive_id.clone(),
            path: path.clone(),
            source,
        })?;
    Ok((Backend::File(file), size))
}

/// Connects to the export; a read-only export needs `is_read_only`.
pub(crate) fn open_nbd(
    config: &BlockDeviceConfig,
    uri: &str,
    cache_type: CacheType,
) -> Result<NbdClient, BlockError> {
    let drive_id = &config.drive_id;
    let nbd_err = |reason: String| BlockError::Nbd {
        drive_id: drive_id.clone(),
        uri: uri.to_string(),
        reason,
    };
    let parsed = NbdUri::parse(uri).map_err(&nbd_err)?;
    let timeout = config
        .nbd_timeout_ms
        .map_or(DEFAULT_TIMEOUT, Duration::from_millis);
    let durability = match cache_type {
        CacheType::Unsafe => Durability::None,
        CacheType::Writeback => Durability::OnFlush,
    };
    let client =
        NbdClient::connect(parsed, timeout, durability).map_err(|e| nbd_err(e.to_string()))?;
    if client.read_only() && !config.is_read_only {
        return Err(nbd_err(
            "the export is read-only; set is_read_only to attach it".into(),
        ));
    }
    Ok(client)
}
