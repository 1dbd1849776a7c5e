//! A drive whose local file is filled from a remote NBD export while the
//! guest uses it: the disk of a VM that migrated here, its source host
//! still serving the original (`ember-export`).
//!
//! Guest I/O is served from the local (sparse) file. [`ChunkMap`] says
//! which 64 KiB chunks are local. A request whose chunks are all local is
//! done on the VMM thread at once, as for a plain file; any other goes to
//! the fill thread, which fetches its missing chunks from the source
//! first (a write skips the chunks it covers whole), writes them to the
//! file, marks them, then does the request. With no guest request waiting,
//! the same thread copies the next missing chunks in order, so guest
//! requests wait for at most one background fetch. When every chunk is
//! local the connection is closed and the drive is a plain file.
//!
//! Chunks only become present, and only the fill thread writes a missing
//! chunk, so the VMM thread never races it on the same bytes.

mod chunks;
#[cfg(test)]
mod tests;
mod worker;

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use chunks::{ChunkMap, CHUNK_SIZE};

use super::nbd::{Completion, Durability, NbdClient, NbdUri, Op, DEFAULT_TIMEOUT};
use crate::vmm_config::drive::FillFrom;

/// What a snapshot taken during a fill keeps: the chunks already local.
/// The source is the drive configuration's `fill_from`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FillState {
    pub chunk_size: u64,
    /// Present chunks as `[first, count]` runs.
    pub present: Vec<[u64; 2]>,
}

/// `GET /drives/{id}/fill`, as the API answers it.
pub use ember_vmm_api::drive::{FillPhase, FillStatus};

/// A guest request the fill thread does.
struct Job {
    id: u64,
    op: Op,
    offset: u64,
}

struct Inner {
    chunks: ChunkMap,
    bytes_on_demand: u64,
    bytes_background: u64,
    /// Guest requests sent to the fill thread, not yet completed.
    pending: usize,
    completions: Vec<Completion>,
    error: Option<String>,
    started: Instant,
    elapsed: Option<Duration>,
}

struct Shared {
    inner: Mutex<Inner>,
    /// Notified when `pending` drops.
    idle: Condvar,
    done: EventFd,
}

fn lock(shared: &Shared) -> MutexGuard<'_, Inner> {
    shared.inner.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct Fill {
    file: File,
    size: u64,
    source: String,
    timeout: Duration,
    shared: Arc<Shared>,
    /// To the fill thread; dropping it ends the thread.
    jobs: Option<Sender<Job>>,
}

impl Fill {
    /// Opens (or creates, sparse, at the source's size) the local file at
    /// `path` and connects to the source. `saved` continues a fill a
    /// snapshot interrupted, in that file, which must exist. A local file
    /// of another size is refused, except an empty one, which is grown.
    pub fn open(path: &str, from: &FillFrom, saved: Option<&FillState>) -> Result<Fill, String> {
        let uri = NbdUri::parse(&from.nbd_uri).map_err(|e| format!("bad nbd_uri: {e}"))?;
        let timeout = from
            .nbd_timeout_ms
            .map_or(DEFAULT_TIMEOUT, Duration::from_millis);
        // Reads only: nothing is ever written to the source.
        let client = NbdClient::connect(uri, timeout, Durability::None)
            .map_err(|e| format!("fill source {}: {e}", from.nbd_uri))?;
        let size = client.size();
        // A continued fill needs the file its map describes; only a new
        // one may start from a file created here.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(saved.is_none())
            .truncate(false)
            .open(path)
            .map_err(|e| format!("{path}: {e}"))?;
        let local = file
            .seek(SeekFrom::End(0))
            .map_err(|e| format!("{path}: {e}"))?;
        if local == 0 && size > 0 {
            file.set_len(size).map_err(|e| format!("{path}: {e}"))?;
        } else if local != size {
            return Err(format!(
                "{path} has {local} bytes but the fill source {} has {size}",
                from.nbd_uri
            ));
        }
        let chunks = match saved {
            None => ChunkMap::new(size),
            Some(s) if s.chunk_size == CHUNK_SIZE => ChunkMap::from_runs(size, &s.present)
                .ok_or("the snapshot's fill map does not fit the disk")?,
            Some(s) => return Err(format!("unknown fill chunk size {}", s.chunk_size)),
        };
        let done = EventFd::new(EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                chunks,
                bytes_on_demand: 0,
                bytes_background: 0,
                pending: 0,
                completions: Vec::new(),
                error: None,
                started: Instant::now(),
                elapsed: None,
            }),
            idle: Condvar::new(),
            done,
        });
        let (tx, rx) = mpsc::channel();
        let worker_file = file.try_clone().map_err(|e| format!("{path}: {e}"))?;
        worker::start(shared.clone(), worker_file, size, client, rx, from)
            .map_err(|e| format!("cannot start the fill thread: {e}"))?;
        Ok(Fill {
            file,
            size,
            source: from.nbd_uri.clone(),
            timeout,
            shared,
            jobs: Some(tx),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Does `op` at once when its chunks are local (the completion is
    /// returned), else hands it to the fill thread (answered through
    /// `take_completions`).
    pub fn submit(&mut self, id: u64, op: Op, offset: u64) -> Option<Completion> {
        let len = match &op {
            Op::Read(n) => *n as u64,
            Op::Write(d) => d.len() as u64,
            Op::Flush => {
                let result = self.file.sync_data().map(|()| Vec::new());
                return Some(Completion { id, result });
            }
            Op::Trim(_) | Op::WriteZeroes(_) => {
                let result = Err(io::ErrorKind::Unsupported.into());
                return Some(Completion { id, result });
            }
        };
        let mut inner = lock(&self.shared);
        if inner.chunks.covers(offset, len) {
            drop(inner);
            let result = file_io(&self.file, op, offset);
            return Some(Completion { id, result });
        }
        inner.pending += 1;
        drop(inner);
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|tx| tx.send(Job { id, op, offset }).is_ok());
        if sent {
            return None;
        }
        lock(&self.shared).pending -= 1;
        let result = Err(io::Error::other("the fill thread has stopped"));
        Some(Completion { id, result })
    }

    /// Readable when the fill thread completed requests.
    pub fn completion_fd(&self) -> &EventFd {
        &self.shared.done
    }

    pub fn take_completions(&self) -> Vec<Completion> {
        if let Err(e) = self.shared.done.read() {
            if e.kind() != io::ErrorKind::WouldBlock {
                crate::guest_warn!("fill: completion eventfd: {e}");
            }
        }
        std::mem::take(&mut lock(&self.shared).completions)
    }

    /// Waits up to `for_` until the fill thread holds no guest request.
    pub fn wait_idle(&self, for_: Duration) -> bool {
        let deadline = Instant::now() + for_;
        let mut inner = lock(&self.shared);
        while inner.pending > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            inner = self
                .shared
                .idle
                .wait_timeout(inner, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    pub fn is_complete(&self) -> bool {
        lock(&self.shared).chunks.is_complete()
    }

    /// For a snapshot: the chunks local now; `None` once complete.
    pub fn state(&self) -> Option<FillState> {
        let inner = lock(&self.shared);
        (!inner.chunks.is_complete()).then(|| FillState {
            chunk_size: CHUNK_SIZE,
            present: inner.chunks.runs(),
        })
    }

    pub fn status(&self, drive_id: &str) -> FillStatus {
        let inner = lock(&self.shared);
        let complete = inner.chunks.is_complete();
        FillStatus {
            drive_id: drive_id.to_string(),
            state: if complete {
                FillPhase::Complete
            } else {
                FillPhase::Filling
            },
            source: self.source.clone(),
            chunk_size: CHUNK_SIZE,
            chunks_total: inner.chunks.total(),
            chunks_local: inner.chunks.present(),
            bytes_on_demand: inner.bytes_on_demand,
            bytes_background: inner.bytes_background,
            requests_waiting: inner.pending,
            error: inner.error.clone(),
            elapsed_ms: inner
                .elapsed
                .unwrap_or_else(|| inner.started.elapsed())
                .as_millis() as u64,
        }
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        // The fill thread sees the channel closed and ends (after the
        // fetch it is in, if any), closing the source connection.
        self.jobs.take();
    }
}

/// A read or write on the local file.
fn file_io(file: &File, op: Op, offset: u64) -> io::Result<Vec<u8>> {
    match op {
        Op::Read(n) => {
            let mut buf = vec![0; n];
            file.read_exact_at(&mut buf, offset).map(|()| buf)
        }
        Op::Write(d) => file.write_all_at(&d, offset).map(|()| Vec::new()),
        Op::Flush => file.sync_data().map(|()| Vec::new()),
        Op::Trim(_) | Op::WriteZeroes(_) => Err(io::ErrorKind::Unsupported.into()),
    }
}
