//! The destination: memory into fresh guest memory, then the state, then
//! resume when the source says so.

use std::io::BufReader;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::protocol::{self, Hello, Kind, StreamError};
use super::transport::{Listener, Stream};
use super::{Phase, Progress, TargetVm};
use crate::snapshot::memory::{check_layout, PAGE_SIZE};

const PAGE: usize = PAGE_SIZE as usize;
/// A source silent this long mid-stream is gone.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("{0}")]
    Refused(String),
    #[error("the source aborted the migration: {0}")]
    Aborted(String),
    #[error("cancelled")]
    Cancelled,
}

impl From<std::io::Error> for ReceiveError {
    fn from(e: std::io::Error) -> Self {
        ReceiveError::Stream(e.into())
    }
}

/// Waits for the source on `listener`, receives the VM and resumes it;
/// records how it ended in `progress`.
pub fn run(target: &mut dyn TargetVm, listener: Listener, progress: &Progress) {
    let start = Instant::now();
    let r = (|| {
        let stream =
            listener
                .accept(&|| progress.cancelled())
                .map_err(|e| match progress.cancelled() {
                    true => ReceiveError::Cancelled,
                    false => e.into(),
                })?;
        progress.set_stream(&stream);
        receive(target, stream, progress)
    })();
    progress.end_stream();
    let total_ms = start.elapsed().as_millis() as u64;
    match r {
        Ok(()) => {
            log::info!("migration received; the VM runs here ({total_ms} ms)");
            progress.update(|s| {
                s.state = Phase::Completed;
                s.total_ms = Some(total_ms);
            });
        }
        Err(e) => {
            target.discard();
            let cancelled = progress.cancelled() || matches!(e, ReceiveError::Cancelled);
            log::warn!("incoming migration failed: {e}");
            progress.update(|s| {
                s.state = if cancelled {
                    Phase::Cancelled
                } else {
                    Phase::Failed
                };
                s.error = (!cancelled).then(|| e.to_string());
                s.total_ms = Some(total_ms);
            });
        }
    }
}

fn receive(
    target: &mut dyn TargetVm,
    stream: Stream,
    progress: &Progress,
) -> Result<(), ReceiveError> {
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    let mut reply = stream.try_clone()?;
    let mut input = Counting {
        inner: BufReader::with_capacity(1 << 20, stream),
        bytes: 0,
    };
    protocol::read_preamble(&mut input)?;
    let hello: Hello = protocol::read_message(&mut input)?
        .expect(Kind::Hello, "Hello")?
        .json()?;
    let refuse = |reply: &mut Stream, why: String| {
        let _ = protocol::write_message(reply, Kind::Refused, why.as_bytes());
        ReceiveError::Refused(why)
    };
    if let Err(e) = check_layout(&hello.memory) {
        return Err(refuse(&mut reply, e.to_string()));
    }
    let mem = match target.create_memory(&hello.memory) {
        Ok(m) => m,
        Err(e) => return Err(refuse(&mut reply, e)),
    };
    progress.update(|s| {
        s.state = Phase::PreCopy;
        s.memory_bytes = hello.memory.total_size();
    });
    let zeros = vec![0u8; protocol::MAX_PAGES_BYTES];
    loop {
        let msg = match protocol::read_message(&mut input) {
            Ok(m) => m,
            // Tell the source why before giving up (it resumes the VM).
            Err(e @ (StreamError::Checksum(_) | StreamError::UnknownKind(_))) => {
                return Err(refuse(&mut reply, e.to_string()))
            }
            Err(e) => return Err(e.into()),
        };
        if progress.cancelled() {
            return Err(ReceiveError::Cancelled);
        }
        match msg.kind {
            Kind::Pages => {
                let runs = protocol::parse_pages(&msg.payload, PAGE)
                    .map_err(|e| refuse(&mut reply, e.to_string()))?;
                let mut pages = 0u64;
                for run in runs {
                    let len = run.npages as usize * PAGE;
                    let at = GuestAddress(run.gpa);
                    if !mem.check_range(at, len, vm_memory::Permissions::Write) {
                        return Err(refuse(
                            &mut reply,
                            format!("pages at {:#x}+{len:#x} are outside guest memory", run.gpa),
                        ));
                    }
                    let r = match run.data {
                        Some(d) => mem.write_slice(d, at),
                        None => (0..len).step_by(zeros.len()).try_for_each(|o| {
                            let n = (len - o).min(zeros.len());
                            mem.write_slice(&zeros[..n], GuestAddress(run.gpa + o as u64))
                        }),
                    };
                    r.map_err(|e| refuse(&mut reply, format!("writing guest memory: {e}")))?;
                    pages += u64::from(run.npages);
                }
                let bytes = input.bytes;
                progress.update(|s| {
                    s.pages += pages;
                    s.bytes = bytes;
                });
            }
            Kind::State => {
                progress.update(|s| s.state = Phase::StopAndCopy);
                if let Err(e) = target.load(&msg.payload, mem.clone()) {
                    return Err(refuse(&mut reply, e));
                }
                protocol::write_message(&mut reply, Kind::Loaded, b"")?;
                break;
            }
            Kind::Overrides => {
                let o = msg.json().map_err(|e| refuse(&mut reply, e.to_string()))?;
                target.add_overrides(o);
            }
            Kind::Abort => return Err(ReceiveError::Aborted(msg.text())),
            other => {
                return Err(refuse(
                    &mut reply,
                    format!("unexpected {other:?} message during the memory copy"),
                ))
            }
        }
    }
    // Loaded and paused: run it once the source has let go.
    let msg = protocol::read_message(&mut input)?;
    match msg.kind {
        Kind::Resume => {
            progress.update(|s| s.state = Phase::SwitchOver);
            target.resume().map_err(ReceiveError::Refused)?;
            // The VM runs here now, whether or not the source hears it.
            if let Err(e) = protocol::write_message(&mut reply, Kind::Resumed, b"") {
                log::warn!("migration: the source did not get \"resumed\": {e}");
            }
            let bytes = input.bytes;
            progress.update(|s| s.bytes = bytes);
            Ok(())
        }
        Kind::Abort => Err(ReceiveError::Aborted(msg.text())),
        other => Err(StreamError::Unexpected {
            expected: "Resume",
            got: other,
        }
        .into()),
    }
}

struct Counting<R> {
    inner: R,
    bytes: u64,
}

impl<R: std::io::Read> std::io::Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}
