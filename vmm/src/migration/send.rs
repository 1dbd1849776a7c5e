//! The source: pre-copy rounds, then stop-and-copy and the switch-over;
//! or, in post-copy, the pause (after the rounds asked for), the
//! switch-over and then the rest of the memory.

use std::io::{BufWriter, Write};
use std::time::{Duration, Instant};

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::postcopy::{self, SourceError};
use super::protocol::{self, Hello, Kind, Message, PagesBuilder, PostCopyStart, StreamError};
use super::transport::Stream;
use super::MigratableError;
use super::{FinalCopy, MigrationMode, Phase, PostCopyPause, Progress, SourceVm};
use crate::snapshot::memory::{describe, dirty_runs, PAGE_SIZE};
use crate::vmm_config::migration::{SendMigrationParams, SwitchOver};

const PAGE: usize = PAGE_SIZE as usize;
/// How long the destination may take to load the VM (it reconnects
/// network drives and opens taps) and to resume it.
const LOAD_TIMEOUT: Duration = Duration::from_secs(120);
const RESUME_TIMEOUT: Duration = Duration::from_secs(30);
/// A destination that takes nothing for this long is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Post-copy: how long the destination may take to say it has every page
/// once the last one has gone.
const DONE_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("the destination refused the VM: {0}")]
    Refused(String),
    #[error(transparent)]
    Step(#[from] MigratableError),
    #[error("reading guest memory at {gpa:#x}: {source}")]
    ReadMemory {
        gpa: u64,
        source: vm_memory::GuestMemoryError,
    },
    #[error("no PUT /migrate/switch-over within {0:?}")]
    SwitchOverTimeout(Duration),
    #[error(
        "devices wrote {0} pages of guest memory after the pause (network or vsock traffic for \
         the guest); post-copy cannot carry them consistently"
    )]
    WrittenAfterPause(u64),
    #[error(transparent)]
    PostCopy(SourceError),
    #[error("cancelled")]
    Cancelled,
    /// The switch-over began and its outcome is unknown: the destination
    /// may run the VM, so the source must not.
    #[error("lost the destination during the switch-over ({0}); the VM stays paused here")]
    InDoubt(#[source] SwitchOverLost),
    /// Post-copy after the resume: the VM's memory is split between the
    /// hosts, so neither can run it alone.
    #[error(
        "lost the destination during post-copy ({0}); the VM ran there on memory partly \
         still here, so it cannot run on either host; it stays paused here"
    )]
    Split(#[source] SourceError),
}

/// What cut the switch-over short once the destination may run the VM.
#[derive(Debug, thiserror::Error)]
pub enum SwitchOverLost {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    PostCopy(#[from] SourceError),
    #[error("expected Resumed, got {kind:?} {text}")]
    NotResumed { kind: Kind, text: String },
}

impl From<SourceError> for SendError {
    fn from(e: SourceError) -> Self {
        match e {
            SourceError::Stream(e) => SendError::Stream(e),
            e => SendError::PostCopy(e),
        }
    }
}

impl From<std::io::Error> for SendError {
    fn from(e: std::io::Error) -> Self {
        SendError::Stream(e.into())
    }
}

/// Runs a whole migration over `stream` and records how it ended in
/// `progress`. On any failure before the switch-over the VM runs on here.
pub fn run(
    vm: &mut dyn SourceVm,
    stream: Stream,
    params: &SendMigrationParams,
    progress: &Progress,
) {
    let start = Instant::now();
    let mut paused = false;
    let refusal = stream.try_clone().ok();
    let mut r = migrate(vm, stream, params, progress, &mut paused);
    // A destination that refuses mid-stream says why before it hangs up;
    // the source, busy writing, sees only the broken pipe.
    if let (Err(SendError::Stream(StreamError::Io(_))), Some(mut rd)) = (&r, refusal) {
        if !progress.cancelled() && rd.set_read_timeout(Some(Duration::from_secs(2))).is_ok() {
            if let Ok(m) = protocol::read_message(&mut rd) {
                if m.kind == Kind::Refused {
                    r = Err(SendError::Refused(m.text()));
                }
            }
        }
    }
    progress.end_stream();
    let total_ms = start.elapsed().as_millis() as u64;
    match r {
        Ok(()) => {
            vm.handed_over();
            progress.update(|s| {
                s.state = Phase::Completed;
                s.total_ms = Some(total_ms);
            });
            log::info!("migration completed in {total_ms} ms");
        }
        Err(e @ (SendError::InDoubt(_) | SendError::Split(_))) => {
            let e = e.to_string();
            log::error!("migration: {e}");
            progress.update(|s| {
                s.state = Phase::Failed;
                s.error = Some(e);
            });
        }
        Err(e) => {
            let cancelled = progress.cancelled() || matches!(e, SendError::Cancelled);
            let resumed = if paused { vm.resume() } else { Ok(()) };
            let mut why = if cancelled {
                "cancelled".to_string()
            } else {
                e.to_string()
            };
            if let Err(re) = resumed {
                why = format!("{why}; and resuming the VM here failed: {re}");
            }
            log::warn!("migration ended, the VM stays here: {why}");
            progress.update(|s| {
                s.state = if cancelled {
                    Phase::Cancelled
                } else {
                    Phase::Failed
                };
                s.error = (!cancelled).then_some(why);
                s.total_ms = Some(total_ms);
            });
        }
    }
}

fn migrate(
    vm: &mut dyn SourceVm,
    stream: Stream,
    params: &SendMigrationParams,
    progress: &Progress,
    paused: &mut bool,
) -> Result<(), SendError> {
    let mem = vm.memory();
    let layout = describe(&mem);
    progress.update(|s| {
        s.state = Phase::PreCopy;
        s.memory_bytes = layout.total_size();
    });
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut reader = stream.try_clone()?;
    let mut out = Counting::new(BufWriter::with_capacity(1 << 20, stream), progress);

    protocol::write_preamble(&mut out)?;
    protocol::write_json(
        &mut out,
        Kind::Hello,
        &Hello {
            vmm_version: env!("CARGO_PKG_VERSION").to_string(),
            memory: layout,
        },
    )?;

    let budget = Duration::from_millis(params.downtime_ms);
    let rounds = params.precopy_rounds();
    let mut postcopy = params.mode == MigrationMode::PostCopy;
    let mut round = 0u32;
    let mut dirty: Option<Vec<Vec<u64>>> = None;
    if rounds > 0 {
        vm.start_dirty_tracking()?;
    }
    while round < rounds {
        if progress.cancelled() {
            return Err(SendError::Cancelled);
        }
        round += 1;
        let t0 = Instant::now();
        let bytes0 = out.bytes;
        // Round 1 sends every page; the destination's memory starts zeroed,
        // so zero pages need not travel then.
        let pages = send_pages(&mut out, &mem, dirty.as_deref(), progress)?;
        out.flush()?;
        let secs = t0.elapsed().as_secs_f64().max(1e-6);
        let rate = (out.bytes - bytes0) as f64 / secs;
        let next = vm.take_dirty()?;
        let left: u64 = next
            .iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum();
        progress.update(|s| {
            s.rounds = round;
            s.last_dirty_pages = left;
            if pages > 0 {
                s.bandwidth_mib_s = rate / f64::from(1 << 20);
            }
        });
        log::info!(
            "migration round {round}: {pages} pages in {:.0} ms, {left} dirty",
            secs * 1000.0
        );
        let eta = Duration::from_secs_f64((left * PAGE_SIZE) as f64 / rate.max(1.0));
        dirty = Some(next);
        if eta <= budget {
            // Converged: the rest goes in the pause, as pre-copy.
            postcopy = false;
            break;
        }
        if round >= rounds {
            break;
        }
    }
    if postcopy {
        return post_copy(vm, out, reader, params, progress, paused, dirty);
    }

    // Stop-and-copy.
    progress.update(|s| s.state = Phase::StopAndCopy);
    let paused_at = Instant::now();
    // The pages dirty at the end of the last round and those dirtied since
    // are copied at the pause, on the VMM thread, with the state.
    let FinalCopy { pages, state } = vm.pause_and_capture(dirty.unwrap_or_default())?;
    *paused = true;
    let mut b = PagesBuilder::default();
    for (gpa, data) in &pages {
        for (i, piece) in data.chunks(protocol::MAX_PAGES_BYTES).enumerate() {
            let at = gpa + (i * protocol::MAX_PAGES_BYTES) as u64;
            push_chunk(&mut out, &mut b, at, piece, false)?;
        }
    }
    if !b.is_empty() {
        protocol::write_message(&mut out, Kind::Pages, &b.take())?;
    }
    progress.update(|s| {
        s.final_pages = pages.iter().map(|(_, d)| (d.len() / PAGE) as u64).sum();
        s.pages += s.final_pages;
    });
    if params.switch_over == SwitchOver::Manual {
        manual_switch_over(&mut out, params, progress)?;
    }
    protocol::write_message(&mut out, Kind::State, &state)?;
    out.flush()?;

    reader.set_read_timeout(Some(LOAD_TIMEOUT))?;
    loaded(protocol::read_message(&mut reader)?)?;
    begin_switch_over(&mut out, progress)?;
    // From here on the destination may run the VM.
    (|| -> Result<(), SwitchOverLost> {
        send_resume(&mut out)?;
        reader.set_read_timeout(Some(RESUME_TIMEOUT))?;
        resumed(protocol::read_message(&mut reader)?)
    })()
    .map_err(SendError::InDoubt)?;
    let downtime = paused_at.elapsed().as_millis() as u64;
    progress.update(|s| s.downtime_ms = Some(downtime));
    log::info!("migration: destination resumed; downtime {downtime} ms");
    Ok(())
}

/// `switch_over: "Manual"`: waits, paused, for `PUT /migrate/switch-over`
/// and passes its drive overrides on.
fn manual_switch_over(
    out: &mut impl Write,
    params: &SendMigrationParams,
    progress: &Progress,
) -> Result<(), SendError> {
    out.flush()?;
    progress.update(|s| s.state = Phase::AwaitingSwitchOver);
    let timeout = Duration::from_millis(params.switch_over_timeout_ms);
    match progress.wait_switch_over(timeout) {
        Some(overrides) => {
            if !overrides.is_empty() {
                protocol::write_json(out, Kind::Overrides, &overrides)?;
            }
            progress.update(|s| s.state = Phase::StopAndCopy);
            Ok(())
        }
        None if progress.cancelled() => Err(SendError::Cancelled),
        None => Err(SendError::SwitchOverTimeout(timeout)),
    }
}

/// The destination's answer to the state: loaded, or why not.
fn loaded(reply: Message) -> Result<(), SendError> {
    match reply.kind {
        Kind::Loaded => Ok(()),
        Kind::Refused => Err(SendError::Refused(reply.text())),
        other => Err(StreamError::Unexpected {
            expected: "Loaded or Refused",
            got: other,
        }
        .into()),
    }
}

/// Tells the destination to stop, as far as it still hears.
fn abort(out: &mut impl Write, why: &[u8]) {
    let _ = protocol::write_message(out, Kind::Abort, why);
    let _ = out.flush();
}

/// Enters the switch-over unless a cancel came first.
fn begin_switch_over(out: &mut impl Write, progress: &Progress) -> Result<(), SendError> {
    if progress.begin_switch_over() {
        return Ok(());
    }
    abort(out, b"cancelled");
    Err(SendError::Cancelled)
}

fn send_resume(out: &mut impl Write) -> Result<(), SwitchOverLost> {
    protocol::write_message(out, Kind::Resume, b"")?;
    Ok(out.flush()?)
}

/// The destination's answer to `Resume`.
fn resumed(reply: Message) -> Result<(), SwitchOverLost> {
    if reply.kind != Kind::Resumed {
        return Err(SwitchOverLost::NotResumed {
            kind: reply.kind,
            text: reply.text(),
        });
    }
    Ok(())
}

/// Post-copy from the pause on: the state and which pages the destination
/// lacks, the switch-over (answering the destination's page requests
/// meanwhile: loading the VM touches guest memory), then the rest of the
/// memory, pushed, while the destination runs the VM.
fn post_copy<W: Write>(
    vm: &mut dyn SourceVm,
    mut out: Counting<'_, W>,
    reader: Stream,
    params: &SendMigrationParams,
    progress: &Progress,
    paused: &mut bool,
    dirty: Option<Vec<Vec<u64>>>,
) -> Result<(), SendError> {
    progress.update(|s| {
        s.state = Phase::StopAndCopy;
        s.mode = MigrationMode::PostCopy;
    });
    let paused_at = Instant::now();
    let PostCopyPause { needed, state } = vm.pause_for_postcopy(dirty)?;
    *paused = true;
    protocol::write_json(
        &mut out,
        Kind::PostCopy,
        &PostCopyStart {
            version: protocol::POSTCOPY_VERSION,
            needed: needed.clone(),
        },
    )?;
    let mut pc = postcopy::Source::new(vm.memory(), needed, postcopy::spawn_reader(reader)?);
    if params.switch_over == SwitchOver::Manual {
        manual_switch_over(&mut out, params, progress)?;
    }
    protocol::write_message(&mut out, Kind::State, &state)?;
    out.flush()?;
    loaded(pc.wait(&mut out, LOAD_TIMEOUT)?)?;
    // The pause does not hold back devices that deliver into guest memory
    // (net, vsock receive); what they wrote since the state was saved would
    // reach the destination out of step with it. Before the switch-over
    // that is still a failure the source survives.
    let written = vm.written_since_pause();
    if written > 0 {
        let e = SendError::WrittenAfterPause(written);
        abort(&mut out, e.to_string().as_bytes());
        return Err(e);
    }
    begin_switch_over(&mut out, progress)?;
    (|| -> Result<(), SwitchOverLost> {
        send_resume(&mut out)?;
        resumed(pc.wait(&mut out, RESUME_TIMEOUT)?)
    })()
    .map_err(SendError::InDoubt)?;
    let downtime = paused_at.elapsed().as_millis() as u64;
    progress.update(|s| {
        s.downtime_ms = Some(downtime);
        s.state = Phase::PostCopy;
    });
    log::info!("migration: destination resumed (post-copy); downtime {downtime} ms");
    let t0 = Instant::now();
    let r = pc.push_all(&mut out, progress, DONE_TIMEOUT);
    let (d, p, ms) = (pc.on_demand, pc.pushed, t0.elapsed().as_millis() as u64);
    progress.update(|s| {
        s.postcopy_pages_on_demand = d;
        s.postcopy_pages_pushed = p;
        s.pages += d + p;
        s.postcopy_ms = Some(ms);
    });
    r.map_err(SendError::Split)?;
    let late = vm.written_since_pause();
    if late > 0 {
        // Past the switch-over nothing can be done but say so.
        log::error!(
            "migration: devices wrote {late} pages of guest memory here during post-copy; those \
             the destination had not got yet went to it out of step with the saved device state"
        );
    }
    log::info!("migration: post-copy done in {ms} ms ({d} pages on demand, {p} pushed)");
    Ok(())
}

/// Sends the pages `dirty` marks (every page when None) and returns how
/// many went. Reads live memory: a page the guest writes meanwhile is in
/// the next dirty log and goes again.
fn send_pages(
    out: &mut impl Write,
    mem: &crate::vstate::memory::GuestMemoryMmap,
    dirty: Option<&[Vec<u64>]>,
    progress: &Progress,
) -> Result<u64, SendError> {
    let mut b = PagesBuilder::default();
    let mut buf = vec![0u8; protocol::MAX_PAGES_BYTES];
    let mut sent = 0u64;
    for (i, region) in mem.iter().enumerate() {
        let npages = (region.len() / PAGE_SIZE) as usize;
        let runs = match dirty {
            Some(d) => dirty_runs(d.get(i).map_or(&[][..], |v| v), npages),
            None => vec![(0, npages)],
        };
        let skip_zero = dirty.is_none();
        for (first, count) in runs {
            let mut p = first;
            while p < first + count {
                if progress.cancelled() {
                    return Err(SendError::Cancelled);
                }
                let n = (first + count - p).min(buf.len() / PAGE);
                let gpa = region.start_addr().raw_value() + (p * PAGE) as u64;
                let chunk = &mut buf[..n * PAGE];
                mem.read_slice(chunk, GuestAddress(gpa))
                    .map_err(|source| SendError::ReadMemory { gpa, source })?;
                sent += push_chunk(out, &mut b, gpa, chunk, skip_zero)?;
                p += n;
            }
        }
    }
    if !b.is_empty() {
        protocol::write_message(out, Kind::Pages, &b.take())?;
    }
    progress.update(|s| s.pages += sent);
    Ok(sent)
}

/// Adds `chunk` (pages from `gpa`) to the message under construction as
/// runs of data and zero pages; zero pages are left out with `skip_zero`.
fn push_chunk(
    out: &mut impl Write,
    b: &mut PagesBuilder,
    gpa: u64,
    chunk: &[u8],
    skip_zero: bool,
) -> Result<u64, SendError> {
    let pages: Vec<bool> = chunk.chunks(PAGE).map(is_zero).collect();
    let mut sent = 0;
    let mut i = 0;
    while i < pages.len() {
        let zero = pages[i];
        let mut j = i;
        while j < pages.len() && pages[j] == zero {
            j += 1;
        }
        let at = gpa + (i * PAGE) as u64;
        if !zero {
            let data = &chunk[i * PAGE..j * PAGE];
            if b.would_overflow(data.len()) {
                protocol::write_message(out, Kind::Pages, &b.take())?;
            }
            b.push_data(at, data, PAGE);
            sent += (j - i) as u64;
        } else if !skip_zero {
            b.push_zero(at, (j - i) as u32);
            sent += (j - i) as u64;
        }
        i = j;
    }
    Ok(sent)
}

fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(8)
        .all(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")) == 0)
}

/// Counts the bytes written into the stream for the status.
struct Counting<'a, W: Write> {
    inner: W,
    bytes: u64,
    progress: &'a Progress,
    reported: u64,
}

impl<'a, W: Write> Counting<'a, W> {
    fn new(inner: W, progress: &'a Progress) -> Self {
        Counting {
            inner,
            bytes: 0,
            progress,
            reported: 0,
        }
    }
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        if self.bytes - self.reported >= 1 << 20 {
            self.reported = self.bytes;
            let b = self.bytes;
            self.progress.update(|s| s.bytes = b);
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()?;
        let b = self.bytes;
        self.progress.update(|s| s.bytes = b);
        Ok(())
    }
}
