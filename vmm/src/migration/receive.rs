//! The destination: memory into fresh guest memory, then the state, then
//! resume when the source says so; in post-copy, the rest of the memory
//! after the resume ([`super::postcopy::Dest`]).

use std::io::{self, BufReader};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::postcopy::{self, PostCopyError, SharedWriter};
use super::protocol::{self, Hello, Kind, Message, PostCopyStart, StreamError};
use super::transport::{Listener, Stream};
use super::{MigratableError, MigrationMode, Phase, Progress, TargetVm};
use crate::snapshot::memory::{check_layout, MemoryFileError, PAGE_SIZE};

const PAGE: usize = PAGE_SIZE as usize;
/// A source silent this long mid-stream is gone.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("the source aborted the migration: {0}")]
    Aborted(String),
    #[error("cancelled")]
    Cancelled,
    #[error(
        "lost the source during post-copy ({why}); {missing} pages of the VM's memory never \
         arrived, so it cannot continue and was stopped"
    )]
    SourceLost { why: PostCopyLost, missing: u64 },
}

/// Why the destination refused the VM; its text goes to the source.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    Layout(#[from] MemoryFileError),
    #[error(transparent)]
    Vm(#[from] MigratableError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    PostCopy(#[from] PostCopyError),
    #[error(
        "post-copy version {got}; this VMM speaks {}",
        protocol::POSTCOPY_VERSION
    )]
    PostCopyVersion { got: u8 },
    #[error("pages at {gpa:#x}+{len:#x} are outside guest memory")]
    OutsideMemory { gpa: u64, len: usize },
    #[error("writing guest memory: {0}")]
    WriteMemory(#[source] vm_memory::GuestMemoryError),
    #[error("unexpected {0:?} message during the memory copy")]
    Unexpected(Kind),
}

/// Why post-copy lost the source after the resume.
#[derive(Debug, thiserror::Error)]
pub enum PostCopyLost {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    PostCopy(#[from] PostCopyError),
    #[error("the source aborted: {0}")]
    Aborted(String),
    #[error("unexpected {0:?} message during post-copy")]
    Unexpected(Kind),
    #[error("no pages from the source for {READ_TIMEOUT:?}")]
    Silent,
    #[error("post-copy without its reader")]
    NoReader,
}

/// Tells the source why the VM is refused before giving up (it resumes
/// the VM then).
fn refuse(reply: &SharedWriter, why: impl Into<Refusal>) -> ReceiveError {
    let why = why.into();
    let _ = reply.send(Kind::Refused, why.to_string().as_bytes());
    ReceiveError::Refused(why)
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
    // Shared: in post-copy the fault thread sends on it too.
    let reply = SharedWriter::new(stream.try_clone()?);
    let mut input = Input::Direct(Counting {
        inner: BufReader::with_capacity(1 << 20, stream),
        bytes: 0,
    });
    let Input::Direct(direct) = &mut input else {
        unreachable!()
    };
    protocol::read_preamble(direct)?;
    let hello: Hello = input.next()?.expect(Kind::Hello, "Hello")?.json()?;
    check_layout(&hello.memory).map_err(|e| refuse(&reply, e))?;
    let mem = target
        .create_memory(&hello.memory)
        .map_err(|e| refuse(&reply, e))?;
    progress.update(|s| {
        s.state = Phase::PreCopy;
        s.memory_bytes = hello.memory.total_size();
    });
    let zeros = vec![0u8; protocol::MAX_PAGES_BYTES];
    let mut pc: Option<Arc<postcopy::Dest>> = None;
    loop {
        let msg = match input.next() {
            Ok(m) => m,
            // Tell the source why before giving up (it resumes the VM).
            Err(e @ (StreamError::Checksum(_) | StreamError::UnknownKind(_))) => {
                return Err(refuse(&reply, e))
            }
            Err(e) => return Err(e.into()),
        };
        if progress.cancelled() {
            return Err(ReceiveError::Cancelled);
        }
        match msg.kind {
            Kind::PostCopy if pc.is_none() => {
                let start: PostCopyStart = msg.json().map_err(|e| refuse(&reply, e))?;
                if start.version != protocol::POSTCOPY_VERSION {
                    return Err(refuse(
                        &reply,
                        Refusal::PostCopyVersion { got: start.version },
                    ));
                }
                // Registered, with its fault thread running, before the VM
                // is loaded: device restore touches guest memory too, on
                // another thread, so the stream is read on a thread of its
                // own from now on (it installs the pages that come).
                let d = postcopy::Dest::start(&mem, start.needed, reply.clone())
                    .map_err(|e| refuse(&reply, e))?;
                let d = Arc::new(d);
                input = input.into_thread(d.clone(), progress.clone())?;
                pc = Some(d);
                progress.update(|s| s.mode = MigrationMode::PostCopy);
            }
            Kind::Pages => {
                let runs =
                    protocol::parse_pages(&msg.payload, PAGE).map_err(|e| refuse(&reply, e))?;
                let mut pages = 0u64;
                for run in runs {
                    let len = run.npages as usize * PAGE;
                    let at = GuestAddress(run.gpa);
                    if !mem.check_range(at, len, vm_memory::Permissions::Write) {
                        return Err(refuse(&reply, Refusal::OutsideMemory { gpa: run.gpa, len }));
                    }
                    let r = match run.data {
                        Some(d) => mem.write_slice(d, at),
                        None => (0..len).step_by(zeros.len()).try_for_each(|o| {
                            let n = (len - o).min(zeros.len());
                            mem.write_slice(&zeros[..n], GuestAddress(run.gpa + o as u64))
                        }),
                    };
                    r.map_err(|e| refuse(&reply, Refusal::WriteMemory(e)))?;
                    pages += u64::from(run.npages);
                }
                let bytes = input.bytes();
                progress.update(|s| {
                    s.pages += pages;
                    s.bytes = bytes;
                });
            }
            Kind::State => {
                progress.update(|s| s.state = Phase::StopAndCopy);
                if let Err(e) = target.load(&msg.payload, mem.clone()) {
                    return Err(refuse(&reply, e));
                }
                reply.send(Kind::Loaded, b"")?;
                break;
            }
            Kind::Overrides => {
                let o = msg.json().map_err(|e| refuse(&reply, e))?;
                target.add_overrides(o);
            }
            Kind::Abort => return Err(ReceiveError::Aborted(msg.text())),
            other => return Err(refuse(&reply, Refusal::Unexpected(other))),
        }
    }
    // Loaded and paused: run it once the source has let go.
    let msg = input.next()?;
    match msg.kind {
        Kind::Resume => {
            progress.update(|s| s.state = Phase::SwitchOver);
            target
                .resume()
                .map_err(|e| ReceiveError::Refused(e.into()))?;
            // The VM runs here now, whether or not the source hears it.
            if let Err(e) = reply.send(Kind::Resumed, b"") {
                log::warn!("migration: the source did not get \"resumed\": {e}");
            }
            if let Some(d) = pc {
                d.resumed();
                progress.update(|s| s.state = Phase::PostCopy);
                let r = input.wait_complete(&d);
                let (on_demand, pushed) = d.counts();
                let ms = d.elapsed_ms();
                progress.update(|s| {
                    s.postcopy_pages_on_demand = on_demand;
                    s.postcopy_pages_pushed = pushed;
                    s.pages += on_demand + pushed;
                    s.postcopy_ms = Some(ms);
                });
                if let Err(why) = r {
                    let missing = d.remaining();
                    // Stopped while the memory is still registered, so no
                    // vCPU ever runs on a page that did not come.
                    target.fail(&why.to_string());
                    d.finish();
                    return Err(ReceiveError::SourceLost { why, missing });
                }
                // Every page is here: the fault thread ends and the memory
                // is unregistered.
                d.finish();
                if let Err(e) = reply.send(Kind::PostCopyDone, b"") {
                    log::warn!("migration: the source did not get \"post-copy done\": {e}");
                }
                log::info!(
                    "migration: post-copy done in {ms} ms ({on_demand} pages on demand, \
                     {pushed} pushed)"
                );
            }
            let bytes = input.bytes();
            progress.update(|s| s.bytes = s.bytes.max(bytes));
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

/// What the post-copy reader thread passes on.
enum Incoming {
    Message(Message),
    /// Every page the destination lacked is here.
    Complete,
    Failed(PostCopyLost),
}

/// The stream's read side: read here, or (post-copy) on a thread that
/// installs pages and passes the other messages on.
enum Input {
    Direct(Counting<BufReader<Stream>>),
    Thread {
        rx: mpsc::Receiver<Incoming>,
        complete: bool,
        bytes: Arc<AtomicU64>,
    },
}

impl Input {
    fn bytes(&self) -> u64 {
        match self {
            Input::Direct(c) => c.bytes,
            Input::Thread { bytes, .. } => bytes.load(Ordering::Relaxed),
        }
    }

    fn next(&mut self) -> Result<Message, StreamError> {
        match self {
            Input::Direct(c) => protocol::read_message(c),
            Input::Thread { rx, complete, .. } => loop {
                match rx.recv_timeout(READ_TIMEOUT) {
                    Ok(Incoming::Message(m)) => return Ok(m),
                    Ok(Incoming::Complete) => *complete = true,
                    Ok(Incoming::Failed(e)) => return Err(io::Error::other(e).into()),
                    Err(_) => return Err(io::Error::from(io::ErrorKind::TimedOut).into()),
                }
            },
        }
    }

    /// Post-copy, after the resume: until every page is here.
    fn wait_complete(&mut self, d: &postcopy::Dest) -> Result<(), PostCopyLost> {
        let Input::Thread {
            rx,
            complete,
            bytes,
        } = self
        else {
            return Err(PostCopyLost::NoReader);
        };
        // A source silent for READ_TIMEOUT is gone; a slow one is not.
        let mut deadline = Instant::now() + READ_TIMEOUT;
        let mut seen = bytes.load(Ordering::Relaxed);
        while !*complete {
            let now = bytes.load(Ordering::Relaxed);
            if now != seen {
                seen = now;
                deadline = Instant::now() + READ_TIMEOUT;
            }
            if let Some(e) = d.take_fault_error() {
                return Err(e.into());
            }
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Incoming::Complete) => *complete = true,
                Ok(Incoming::Failed(e)) => return Err(e),
                Ok(Incoming::Message(m)) if m.kind == Kind::Abort => {
                    return Err(PostCopyLost::Aborted(m.text()))
                }
                Ok(Incoming::Message(m)) => return Err(PostCopyLost::Unexpected(m.kind)),
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(_) => return Err(PostCopyLost::Silent),
            }
        }
        Ok(())
    }

    fn into_thread(self, d: Arc<postcopy::Dest>, progress: Progress) -> io::Result<Input> {
        let Input::Direct(mut c) = self else {
            return Ok(self);
        };
        let (tx, rx) = mpsc::channel();
        let complete = d.complete();
        let bytes = Arc::new(AtomicU64::new(c.bytes));
        let b = bytes.clone();
        std::thread::Builder::new()
            .name("ember-postcopy-rx".into())
            .spawn(move || {
                let mut told = false;
                let out = loop {
                    let msg = match protocol::read_message(&mut c) {
                        Ok(m) => m,
                        Err(e) => break Incoming::Failed(e.into()),
                    };
                    if msg.kind != Kind::Pages {
                        if tx.send(Incoming::Message(msg)).is_err() {
                            return;
                        }
                        continue;
                    }
                    let r = protocol::parse_pages(&msg.payload, PAGE)
                        .map_err(PostCopyLost::from)
                        .and_then(|runs| Ok(d.install(&runs)?));
                    if let Err(e) = r {
                        break Incoming::Failed(e);
                    }
                    b.store(c.bytes, Ordering::Relaxed);
                    let (on_demand, pushed) = d.counts();
                    progress.update(|s| {
                        s.bytes = c.bytes;
                        s.postcopy_pages_on_demand = on_demand;
                        s.postcopy_pages_pushed = pushed;
                    });
                    if !told && d.complete() {
                        told = true;
                        if tx.send(Incoming::Complete).is_err() {
                            return;
                        }
                    }
                };
                let _ = tx.send(out);
            })?;
        Ok(Input::Thread {
            rx,
            complete,
            bytes,
        })
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
