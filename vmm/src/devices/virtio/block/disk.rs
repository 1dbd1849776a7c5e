//! What backs a block device: a host file, an NBD export, or a host file
//! being filled from an NBD export.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use vmm_sys_util::eventfd::EventFd;

use super::fill::{Fill, FillState, FillStatus};
use super::nbd::{
    probe, Completion, Durability, NbdEngine, NbdUri, Op, DEFAULT_TIMEOUT, TFLAG_READ_ONLY,
    TFLAG_SEND_TRIM, TFLAG_SEND_WRITE_ZEROES,
};
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
    Nbd(Box<NbdEngine>),
    Fill(Box<Fill>),
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
    /// Opens the backend `config` names; `fill` continues a fill that a
    /// snapshot interrupted.
    pub(crate) fn open(
        config: &BlockDeviceConfig,
        fill: Option<&FillState>,
    ) -> Result<Disk, BlockError> {
        let drive_id = &config.drive_id;
        let cache_type = CacheType::parse(drive_id, config.cache_type.as_deref())?;
        let (backend, file_size) = match (&config.nbd_uri, &config.fill_from) {
            (Some(uri), _) => {
                let engine = open_nbd(config, uri, cache_type)?;
                let size = engine.info().size;
                (Backend::Nbd(Box::new(engine)), size)
            }
            (None, Some(from)) => {
                let f = Fill::open(&config.path_on_host, from, fill).map_err(|reason| {
                    BlockError::Fill {
                        drive_id: drive_id.clone(),
                        reason,
                    }
                })?;
                let size = f.size();
                (Backend::Fill(Box::new(f)), size)
            }
            (None, None) => open_file(config)?,
        };
        let serial = config.serial.as_deref().unwrap_or(drive_id);
        let mut id = [0u8; 20];
        let n = serial.len().min(id.len());
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        let mut disk = Disk {
            backend,
            size: 0,
            read_only: config.is_read_only,
            cache_type,
            id,
        };
        disk.set_size(drive_id, file_size);
        Ok(disk)
    }

    fn set_size(&mut self, drive_id: &str, bytes: u64) {
        if !bytes.is_multiple_of(SECTOR_SIZE) {
            crate::guest_warn!(
                "drive {drive_id}: size {bytes} is not a multiple of \
                 {SECTOR_SIZE}; the last partial sector is not accessible"
            );
        }
        self.size = bytes - bytes % SECTOR_SIZE;
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

    /// The backend can discard ranges (NBD TRIM).
    pub(crate) fn can_discard(&self) -> bool {
        matches!(&self.backend, Backend::Nbd(e) if e.info().has(TFLAG_SEND_TRIM))
    }

    /// The backend can zero ranges without data (NBD WRITE_ZEROES).
    pub(crate) fn can_write_zeroes(&self) -> bool {
        matches!(&self.backend, Backend::Nbd(e) if e.info().has(TFLAG_SEND_WRITE_ZEROES))
    }

    pub(crate) fn is_nbd(&self) -> bool {
        matches!(self.backend, Backend::Nbd(_))
    }

    /// Starts `op`. A file answers at once (the completion is returned); an
    /// NBD export later, through `take_completions`.
    pub(crate) fn submit(&mut self, id: u64, op: Op, offset: u64) -> Option<Completion> {
        let m = &crate::metrics::METRICS.block;
        match &op {
            Op::Read(n) => {
                m.read_ops.inc();
                m.read_bytes.add(*n as u64);
            }
            Op::Write(d) => {
                m.write_ops.inc();
                m.write_bytes.add(d.len() as u64);
            }
            Op::WriteZeroes(_) => m.write_ops.inc(),
            Op::Flush => m.flush_ops.inc(),
            Op::Trim(_) => {}
        }
        if matches!(op, Op::Flush) && self.cache_type == CacheType::Unsafe {
            return Some(Completion {
                id,
                result: Ok(Vec::new()),
            });
        }
        match &mut self.backend {
            Backend::Fill(f) => {
                let c = f.submit(id, op, offset);
                if c.as_ref().is_some_and(|c| c.result.is_err()) {
                    m.io_errors.inc();
                }
                c
            }
            Backend::File(f) => {
                let result = match op {
                    Op::Read(n) => {
                        let mut buf = vec![0; n];
                        f.read_exact_at(&mut buf, offset).map(|()| buf)
                    }
                    Op::Write(d) => f.write_all_at(&d, offset).map(|()| Vec::new()),
                    Op::Flush => f.sync_data().map(|()| Vec::new()),
                    Op::Trim(_) | Op::WriteZeroes(_) => Err(std::io::ErrorKind::Unsupported.into()),
                };
                if result.is_err() {
                    m.io_errors.inc();
                }
                Some(Completion { id, result })
            }
            Backend::Nbd(e) => {
                e.submit(id, op, offset);
                None
            }
        }
    }

    /// Readable when NBD completions are waiting.
    pub(crate) fn completion_fd(&self) -> Option<&EventFd> {
        match &self.backend {
            Backend::Nbd(e) => Some(e.completion_fd()),
            Backend::Fill(f) => Some(f.completion_fd()),
            Backend::File(_) => None,
        }
    }

    pub(crate) fn take_completions(&self) -> Vec<Completion> {
        let done = match &self.backend {
            Backend::Nbd(e) => e.take_completions(),
            Backend::Fill(f) => f.take_completions(),
            Backend::File(_) => Vec::new(),
        };
        let errors = done.iter().filter(|c| c.result.is_err()).count();
        crate::metrics::METRICS.block.io_errors.add(errors as u64);
        done
    }

    /// Waits up to `for_` for every NBD operation to complete.
    pub(crate) fn wait_idle(&self, for_: Duration) -> bool {
        match &self.backend {
            Backend::Nbd(e) => e.wait_idle(for_),
            Backend::Fill(f) => f.wait_idle(for_),
            Backend::File(_) => true,
        }
    }

    /// The per-request timeout of an NBD drive.
    pub(crate) fn timeout(&self) -> Duration {
        match &self.backend {
            Backend::Nbd(e) => e.timeout(),
            Backend::Fill(f) => f.timeout(),
            Backend::File(_) => Duration::ZERO,
        }
    }

    /// A filling drive's progress; `None` for other drives.
    pub(crate) fn fill_status(&self, drive_id: &str) -> Option<FillStatus> {
        match &self.backend {
            Backend::Fill(f) => Some(f.status(drive_id)),
            _ => None,
        }
    }

    /// What a snapshot keeps of a fill in progress (`None` when none is).
    pub(crate) fn fill_state(&self) -> Option<FillState> {
        match &self.backend {
            Backend::Fill(f) => f.state(),
            _ => None,
        }
    }

    /// `PATCH /drives`: reopens `config`'s backend where it now points (a
    /// file re-read, an NBD export probed again, possibly on another
    /// server) and takes its current size. Returns the new capacity in
    /// sectors. An NBD export may grow, never shrink.
    pub(crate) fn reopen(&mut self, config: &BlockDeviceConfig) -> Result<u64, BlockError> {
        let drive_id = &config.drive_id;
        match (&mut self.backend, &config.nbd_uri) {
            (Backend::Nbd(engine), Some(uri)) => {
                let nbd_err = |reason: String| BlockError::Nbd {
                    drive_id: drive_id.clone(),
                    uri: uri.clone(),
                    reason,
                };
                let parsed = NbdUri::parse(uri).map_err(nbd_err)?;
                let info = probe(&parsed, engine.timeout()).map_err(|e| nbd_err(e.to_string()))?;
                if info.size < self.size {
                    return Err(nbd_err(format!(
                        "the export has {} bytes, fewer than the drive's {}: volumes only grow",
                        info.size, self.size
                    )));
                }
                if info.has(TFLAG_READ_ONLY) && !self.read_only {
                    return Err(nbd_err("the export is read-only".into()));
                }
                engine.reattach(parsed, info);
                self.set_size(drive_id, info.size);
            }
            (Backend::Fill(f), None) if !f.is_complete() => {
                return Err(BlockError::Fill {
                    drive_id: drive_id.clone(),
                    reason: "its file cannot change until the fill completes \
                             (GET /drives/{id}/fill)"
                        .into(),
                });
            }
            (Backend::File(_) | Backend::Fill(_), None) => {
                // A completed fill is a plain file from here on.
                let (backend, size) = open_file(config)?;
                self.backend = backend;
                self.set_size(drive_id, size);
            }
            _ => {
                return Err(BlockError::Nbd {
                    drive_id: drive_id.clone(),
                    uri: config.nbd_uri.clone().unwrap_or_default(),
                    reason: "a drive cannot change between a file and an NBD export".into(),
                })
            }
        }
        Ok(self.sectors())
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
) -> Result<NbdEngine, BlockError> {
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
    let engine =
        NbdEngine::connect(parsed, timeout, durability).map_err(|e| nbd_err(e.to_string()))?;
    if engine.info().has(TFLAG_READ_ONLY) && !config.is_read_only {
        return Err(nbd_err(
            "the export is read-only; set is_read_only to attach it".into(),
        ));
    }
    Ok(engine)
}
