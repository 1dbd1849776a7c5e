//! The fill thread: guest requests that touch missing chunks first, then
//! the background copy, one batch at a time, in order.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{file_io, lock, ChunkMap, Job, Shared, CHUNK_SIZE};
use crate::devices::virtio::block::nbd::{Completion, NbdClient, Op, MAX_REQUEST};
use crate::vmm_config::drive::FillFrom;

/// Chunks per fetch (one NBD request of at most `MAX_REQUEST` bytes): a
/// guest request waits for at most one such fetch of the background copy.
const BATCH: u64 = MAX_REQUEST as u64 / CHUNK_SIZE;
/// After a failed background fetch (the engine has already retried and
/// reconnected for its timeout), wait this long before the next, doubling.
const RETRY_START: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

struct Worker {
    shared: Arc<Shared>,
    file: File,
    size: u64,
    /// `None` once every chunk is local: the source is let go.
    client: Option<NbdClient>,
    rx: Receiver<Job>,
    source: String,
    retry: Duration,
    /// The last failed fetch: within `retry` of it, guest requests that
    /// need the source fail at once rather than each waiting out a
    /// reconnect (the background copy keeps probing).
    failed_at: Option<Instant>,
    /// `background_bytes_per_sec`, and when the next batch may start.
    rate: Option<u64>,
    next_batch: Instant,
}

pub(super) fn start(
    shared: Arc<Shared>,
    file: File,
    size: u64,
    client: NbdClient,
    rx: Receiver<Job>,
    from: &FillFrom,
) -> io::Result<()> {
    let mut w = Worker {
        shared,
        file,
        size,
        client: Some(client),
        rx,
        source: from.nbd_uri.clone(),
        retry: RETRY_START,
        failed_at: None,
        rate: from.background_bytes_per_sec,
        next_batch: Instant::now(),
    };
    if lock(&w.shared).chunks.is_complete() {
        w.finish();
    }
    std::thread::Builder::new()
        .name("blk-fill".into())
        .spawn(move || w.run())?;
    Ok(())
}

impl Worker {
    fn run(&mut self) {
        loop {
            match self.rx.try_recv() {
                Ok(job) => {
                    self.job(job);
                    continue;
                }
                Err(TryRecvError::Disconnected) => return,
                Err(TryRecvError::Empty) => {}
            }
            if self.client.is_none() {
                // Complete: only requests sent before the last chunk came.
                match self.rx.recv() {
                    Ok(job) => self.job(job),
                    Err(_) => return,
                }
                continue;
            }
            let wait = self.next_batch.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                // Paced: guest requests are still taken meanwhile.
                match self.rx.recv_timeout(wait) {
                    Ok(job) => self.job(job),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
                continue;
            }
            let next = lock(&self.shared).chunks.next_missing(BATCH);
            let Some(run) = next else {
                self.finish();
                continue;
            };
            if let Some(rate) = self.rate {
                let bytes = (run.end - run.start) * CHUNK_SIZE;
                self.next_batch =
                    Instant::now() + Duration::from_secs_f64(bytes as f64 / rate as f64);
            }
            if let Err(e) = self.fetch(run, false) {
                self.failed(&e);
                // Guest requests are still taken while waiting.
                match self.rx.recv_timeout(self.retry) {
                    Ok(job) => self.job(job),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
                self.retry = (self.retry * 2).min(RETRY_MAX);
            }
        }
    }

    /// A guest request: fetch the missing chunks it needs, then do it.
    fn job(&mut self, job: Job) {
        let len = match &job.op {
            Op::Read(n) => *n as u64,
            Op::Write(d) => d.len() as u64,
            _ => 0,
        };
        let write = matches!(job.op, Op::Write(_));
        let (offset, size) = (job.offset, self.size);
        // A chunk the write replaces whole needs no fetch.
        let whole = |c: u64| {
            write && c * CHUNK_SIZE >= offset && ((c + 1) * CHUNK_SIZE).min(size) <= offset + len
        };
        let missing: Vec<u64> = {
            let inner = lock(&self.shared);
            ChunkMap::span(offset, len)
                .filter(|&c| !inner.chunks.has(c))
                .collect()
        };
        let fetch: Vec<u64> = missing.iter().copied().filter(|&c| !whole(c)).collect();
        if !fetch.is_empty() && self.failed_at.is_some_and(|t| t.elapsed() < self.retry) {
            let why = lock(&self.shared).error.clone().unwrap_or_default();
            let msg = format!("fill source {} unreachable: {why}", self.source);
            return self.complete(job.id, Err(io::Error::other(msg)));
        }
        for run in runs(&fetch) {
            if let Err(e) = self.fetch(run, true) {
                self.failed(&e);
                let msg = format!("fill source {}: {e}", self.source);
                return self.complete(job.id, Err(io::Error::other(msg)));
            }
        }
        let result = file_io(&self.file, job.op, offset);
        if write && result.is_ok() {
            let mut inner = lock(&self.shared);
            missing.iter().for_each(|&c| inner.chunks.set(c));
        }
        self.complete(job.id, result);
    }

    fn complete(&self, id: u64, result: io::Result<Vec<u8>>) {
        let mut inner = lock(&self.shared);
        inner.completions.push(Completion { id, result });
        inner.pending -= 1;
        drop(inner);
        self.shared.idle.notify_all();
        if let Err(e) = self.shared.done.write(1) {
            crate::guest_warn!("fill: cannot signal completion: {e}");
        }
    }

    /// Copies chunks `run` (at most `BATCH`) from the source to the file
    /// and marks them local (those already local are left alone).
    fn fetch(&mut self, run: Range<u64>, on_demand: bool) -> io::Result<()> {
        let client = self
            .client
            .as_mut()
            .ok_or_else(|| io::Error::other("the fill has completed"))?;
        let start = run.start * CHUNK_SIZE;
        let end = (run.end * CHUNK_SIZE).min(self.size);
        let mut buf = vec![0; (end - start) as usize];
        client.read_at(&mut buf, start)?;
        // Only this thread makes chunks local, so those missing now stay
        // missing until marked below; the file is written unlocked.
        let todo: Vec<u64> = {
            let inner = lock(&self.shared);
            run.filter(|&c| !inner.chunks.has(c)).collect()
        };
        let mut bytes = 0;
        for &c in &todo {
            let at = ((c * CHUNK_SIZE) - start) as usize;
            let piece = &buf[at..(at + CHUNK_SIZE as usize).min(buf.len())];
            store(&self.file, piece, c * CHUNK_SIZE)?;
            bytes += piece.len() as u64;
        }
        let mut inner = lock(&self.shared);
        todo.iter().for_each(|&c| inner.chunks.set(c));
        if on_demand {
            inner.bytes_on_demand += bytes;
        } else {
            inner.bytes_background += bytes;
        }
        if inner.error.take().is_some() {
            log::info!("fill from {}: the source answers again", self.source);
        }
        self.retry = RETRY_START;
        self.failed_at = None;
        Ok(())
    }

    fn failed(&mut self, e: &io::Error) {
        self.failed_at = Some(Instant::now());
        let msg = e.to_string();
        let mut inner = lock(&self.shared);
        if inner.error.as_deref() != Some(msg.as_str()) {
            crate::guest_warn!("fill from {}: {msg}", self.source);
        }
        inner.error = Some(msg);
    }

    /// Every chunk is local: make the file durable, then let the source go.
    fn finish(&mut self) {
        if let Err(e) = self.file.sync_data() {
            crate::guest_warn!(
                "fill from {}: fdatasync of the local file: {e}",
                self.source
            );
        }
        let mut inner = lock(&self.shared);
        let took = inner.started.elapsed();
        inner.elapsed = Some(took);
        drop(inner);
        self.client = None;
        log::info!(
            "fill from {} complete ({} bytes, {took:?}); source released",
            self.source,
            self.size
        );
    }
}

/// Sorted chunk numbers as contiguous runs of at most `BATCH`.
fn runs(chunks: &[u64]) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for &c in chunks {
        match out.last_mut() {
            Some(r) if r.end == c && r.end - r.start < BATCH => r.end += 1,
            _ => out.push(c..c + 1),
        }
    }
    out
}

/// Writes a fetched chunk; an all-zero one becomes a hole, so the local
/// file stays as sparse as the source.
fn store(file: &File, data: &[u8], offset: u64) -> io::Result<()> {
    if data.iter().all(|&b| b == 0) && punch_hole(file, offset, data.len() as u64).is_ok() {
        return Ok(());
    }
    file.write_all_at(data, offset)
}

fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on a file descriptor this thread owns, with plain
    // integer arguments; no memory is passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, n) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_contiguous_and_bounded() {
        assert_eq!(runs(&[1, 2, 3, 7, 8, 20]), vec![1..4, 7..9, 20..21]);
        let long: Vec<u64> = (0..BATCH + 2).collect();
        assert_eq!(runs(&long), vec![0..BATCH, BATCH..BATCH + 2]);
        assert!(runs(&[]).is_empty());
    }
}
