//! Post-copy: the destination runs the VM before it has all its memory.
//!
//! Destination ([`Dest`]): the pages it lacks (the source's `PostCopy`
//! bitmap) are dropped and the memory registered with a userfaultfd
//! (`snapshot::uffd`, as the `Uffd` snapshot backend does) before the VM
//! is loaded, so device restore and activation fault like vCPUs do. A
//! fault thread answers a fault on a page the source never had to send
//! with a zero page and asks the source for the others (`PageRequest`);
//! the migration thread installs what arrives (`Pages`, asked for or
//! pushed) with UFFDIO_COPY, which wakes the faulting thread.
//!
//! Source ([`Source`]): paused, so its memory no longer changes; it
//! answers requests first and pushes the remaining pages in between.

use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::protocol::{self, Kind, Message, PageRun, PagesBuilder, StreamError};
use super::transport::Stream;
use super::Progress;
use crate::snapshot::memory::{dirty_runs, PAGE_SIZE};
use crate::snapshot::uffd::{self, sys, Event, Filled};
use crate::vstate::memory::GuestMemoryMmap;

const PAGE: usize = PAGE_SIZE as usize;
/// Pages per pushed `Pages` message: small, so a request waits little
/// behind a push.
const PUSH_PAGES: usize = 64;

/// The stream's write side, shared by the threads that send on it; each
/// message goes out whole.
#[derive(Clone)]
pub struct SharedWriter(Arc<Mutex<Stream>>);

impl SharedWriter {
    pub fn new(s: Stream) -> SharedWriter {
        SharedWriter(Arc::new(Mutex::new(s)))
    }

    pub fn send(&self, kind: Kind, payload: &[u8]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(payload.len() + 17);
        protocol::write_message(&mut buf, kind, payload)?;
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        s.write_all(&buf)?;
        s.flush()
    }
}

/// One guest memory region: guest address, host address, pages.
#[derive(Debug, Clone, Copy)]
struct Region {
    gpa: u64,
    host: u64,
    pages: usize,
}

fn regions(mem: &GuestMemoryMmap) -> Vec<Region> {
    mem.iter()
        .map(|r| Region {
            gpa: r.start_addr().raw_value(),
            host: r.as_ptr() as u64,
            pages: (r.len() / PAGE_SIZE) as usize,
        })
        .collect()
}

fn get(bits: &[u64], p: usize) -> bool {
    bits[p / 64] & (1 << (p % 64)) != 0
}

fn set(bits: &mut [u64], p: usize) -> bool {
    let was = get(bits, p);
    bits[p / 64] |= 1 << (p % 64);
    !was
}

/// Why the destination's post-copy could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum PostCopyError {
    #[error("the post-copy bitmap has {got} regions, guest memory {regions}")]
    BitmapRegions { got: usize, regions: usize },
    #[error("the post-copy bitmap of region {region} has {words} words for {pages} pages")]
    BitmapWords {
        region: usize,
        words: usize,
        pages: usize,
    },
    #[error("the post-copy bitmap of region {0} marks pages past its end")]
    BitmapPastEnd(usize),
    #[error("cannot drop stale guest pages at {addr:#x}: {source}")]
    DropStale { addr: u64, source: io::Error },
    #[error(transparent)]
    Register(#[from] uffd::UffdError),
    #[error("post-copy fault thread: {0}")]
    Thread(#[source] io::Error),
    #[error("pages at {gpa:#x} (+{npages}) are outside guest memory")]
    OutsideMemory { gpa: u64, npages: usize },
    #[error("guest memory is no longer mapped")]
    Unmapped,
    #[error("cannot install guest page {dst:#x}: {source}")]
    Install { dst: u64, source: io::Error },
    #[error("cannot zero guest page {dst:#x}: {source}")]
    Zero { dst: u64, source: io::Error },
    #[error("{0}")]
    Userfaultfd(#[source] io::Error),
    #[error(transparent)]
    Events(#[from] uffd::EventError),
    #[error("cannot ask the source for pages: {0}")]
    AskSource(#[source] io::Error),
}

/// Checks that `needed` has one bitmap per region of the right length and
/// no bit past a region's end; returns how many pages it marks.
pub fn check_needed(mem: &GuestMemoryMmap, needed: &[Vec<u64>]) -> Result<u64, PostCopyError> {
    let rs = regions(mem);
    if needed.len() != rs.len() {
        return Err(PostCopyError::BitmapRegions {
            got: needed.len(),
            regions: rs.len(),
        });
    }
    let mut n = 0;
    for (i, (r, bits)) in rs.iter().zip(needed).enumerate() {
        if bits.len() != r.pages.div_ceil(64) {
            return Err(PostCopyError::BitmapWords {
                region: i,
                words: bits.len(),
                pages: r.pages,
            });
        }
        if !r.pages.is_multiple_of(64) && bits[bits.len() - 1] >> (r.pages % 64) != 0 {
            return Err(PostCopyError::BitmapPastEnd(i));
        }
        n += bits.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
    }
    Ok(n)
}

/// Which pages the destination has, shared by its two threads.
struct Pages {
    needed: Vec<Vec<u64>>,
    have: Vec<Vec<u64>>,
    requested: Vec<Vec<u64>>,
    /// Needed pages not present yet.
    remaining: u64,
    on_demand: u64,
    installed: u64,
}

struct Shared {
    regions: Vec<Region>,
    pages: Mutex<Pages>,
    stop: AtomicBool,
    /// Why the fault thread gave up, if it did.
    error: Mutex<Option<PostCopyError>>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pages> {
        self.pages.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// (region index, page index) of a host address.
    fn by_host(&self, addr: u64) -> Option<(usize, usize)> {
        self.regions.iter().enumerate().find_map(|(i, r)| {
            (addr >= r.host && addr - r.host < (r.pages * PAGE) as u64)
                .then(|| (i, ((addr - r.host) / PAGE_SIZE) as usize))
        })
    }

    fn by_gpa(&self, gpa: u64, npages: usize) -> Option<(usize, usize)> {
        self.regions.iter().enumerate().find_map(|(i, r)| {
            let end = r.gpa + (r.pages * PAGE) as u64;
            (gpa >= r.gpa && gpa < end && (end - gpa) / PAGE_SIZE >= npages as u64)
                .then(|| (i, ((gpa - r.gpa) / PAGE_SIZE) as usize))
        })
    }
}

/// The destination's post-copy: registered memory and its fault thread.
pub struct Dest {
    uffd: Arc<OwnedFd>,
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    started: Mutex<Option<Instant>>,
}

impl Dest {
    /// Drops the pages in `needed` (stale copies from pre-copy rounds),
    /// registers `mem` with a userfaultfd and starts the fault thread,
    /// which asks for pages through `writer`.
    pub fn start(
        mem: &GuestMemoryMmap,
        needed: Vec<Vec<u64>>,
        writer: SharedWriter,
    ) -> Result<Dest, PostCopyError> {
        let total = check_needed(mem, &needed)?;
        let rs = regions(mem);
        for (r, bits) in rs.iter().zip(&needed) {
            for (first, count) in dirty_runs(bits, r.pages) {
                let addr = r.host + (first * PAGE) as u64;
                // SAFETY: the range lies inside a guest memory mapping of
                // ours (anonymous, private); nothing runs on it yet, and
                // its pages come again from the source.
                let rc = unsafe {
                    libc::madvise(addr as *mut libc::c_void, count * PAGE, libc::MADV_DONTNEED)
                };
                if rc != 0 {
                    return Err(PostCopyError::DropStale {
                        addr,
                        source: io::Error::last_os_error(),
                    });
                }
            }
        }
        let uffd = Arc::new(uffd::register_memory(mem)?);
        let shared = Arc::new(Shared {
            pages: Mutex::new(Pages {
                have: needed.iter().map(|b| vec![0; b.len()]).collect(),
                requested: needed.iter().map(|b| vec![0; b.len()]).collect(),
                needed,
                remaining: total,
                on_demand: 0,
                installed: 0,
            }),
            regions: rs,
            stop: AtomicBool::new(false),
            error: Mutex::new(None),
        });
        let (u, s) = (uffd.clone(), shared.clone());
        let thread = std::thread::Builder::new()
            .name("ember-postcopy".into())
            .spawn(move || {
                if let Err(e) = fault_loop(&u, &s, &writer) {
                    log::error!("post-copy fault handling stopped: {e}");
                    *s.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                }
            })
            .map_err(PostCopyError::Thread)?;
        Ok(Dest {
            uffd,
            shared,
            thread: Mutex::new(Some(thread)),
            started: Mutex::new(None),
        })
    }

    /// The VM runs from now on: post-copy's clock starts.
    pub fn resumed(&self) {
        *self.started.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    pub fn elapsed_ms(&self) -> u64 {
        self.started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map_or(0, |t| t.elapsed().as_millis() as u64)
    }

    /// Stops the fault thread and unregisters the memory: every needed
    /// page is present by then, or the VM is stopped. Idempotent.
    pub fn finish(&self) {
        self.shared.stop.store(true, Ordering::Release);
        let t = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = t {
            let _ = t.join();
            let ranges: Vec<_> = self
                .shared
                .regions
                .iter()
                .map(|r| (r.host, (r.pages * PAGE) as u64))
                .collect();
            if let Err(e) = uffd::unregister_memory(self.uffd.as_fd(), &ranges) {
                log::warn!("post-copy: cannot unregister guest memory: {e}");
            }
        }
    }

    /// Whether every needed page is present.
    pub fn complete(&self) -> bool {
        self.shared.lock().remaining == 0
    }

    pub fn remaining(&self) -> u64 {
        self.shared.lock().remaining
    }

    /// (asked for on fault, pushed).
    pub fn counts(&self) -> (u64, u64) {
        let p = self.shared.lock();
        (p.on_demand, p.installed.saturating_sub(p.on_demand))
    }

    /// Why the fault thread gave up, once.
    pub fn take_fault_error(&self) -> Option<PostCopyError> {
        self.shared
            .error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Installs the pages of a `Pages` message; a page already present
    /// (asked for and pushed both, or written by the guest since) is kept.
    pub fn install(&self, runs: &[PageRun<'_>]) -> Result<(), PostCopyError> {
        for run in runs {
            let n = run.npages as usize;
            let (ri, first) =
                self.shared
                    .by_gpa(run.gpa, n)
                    .ok_or(PostCopyError::OutsideMemory {
                        gpa: run.gpa,
                        npages: n,
                    })?;
            let host = self.shared.regions[ri].host + (first * PAGE) as u64;
            // Zero runs map the shared zero page (UFFDIO_ZEROPAGE).
            self.fill(host, run.data, n)?;
            let mut p = self.shared.lock();
            for i in first..first + n {
                if get(&p.needed[ri], i) && set(&mut p.have[ri], i) {
                    p.remaining -= 1;
                    p.installed += 1;
                }
            }
        }
        Ok(())
    }

    fn fill(&self, host: u64, data: Option<&[u8]>, n: usize) -> Result<(), PostCopyError> {
        let (mut dst, mut len) = (host, (n * PAGE) as u64);
        let base = data.map(|d| d.as_ptr() as u64);
        loop {
            let src = base.map(|b| b + (dst - host));
            match uffd::fill(self.uffd.as_fd(), dst, src, len, PAGE_SIZE) {
                Ok(Filled::Done) => return Ok(()),
                Ok(Filled::Gone) => return Err(PostCopyError::Unmapped),
                // The fault thread reads the pending events meanwhile.
                Ok(Filled::Retry { dst: d, len: l }) => {
                    (dst, len) = (d, l);
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(source) => return Err(PostCopyError::Install { dst, source }),
            }
        }
    }
}

impl Drop for Dest {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The fault thread: reads userfaultfd events until told to stop.
fn fault_loop(uffd: &OwnedFd, s: &Shared, writer: &SharedWriter) -> Result<(), PostCopyError> {
    let mut zero_pending: Vec<(u64, u64)> = Vec::new();
    while !s.stop.load(Ordering::Acquire) {
        let timeout = if zero_pending.is_empty() { 50 } else { 1 };
        let mut ask = Vec::new();
        uffd::wait_events(uffd, timeout, |e| {
            event(s, uffd, e, &mut ask, &mut zero_pending)
        })
        .map_err(PostCopyError::Events)?;
        if !ask.is_empty() {
            writer
                .send(Kind::PageRequest, &protocol::encode_page_request(&ask))
                .map_err(PostCopyError::AskSource)?;
        }
        // Zero pages wait here when the kernel says to retry.
        let mut again = Vec::new();
        for (dst, len) in zero_pending.drain(..) {
            match uffd::fill(uffd.as_fd(), dst, None, len, PAGE_SIZE) {
                Ok(Filled::Retry { dst, len }) => again.push((dst, len)),
                Ok(_) => {}
                Err(source) => return Err(PostCopyError::Zero { dst, source }),
            }
        }
        zero_pending = again;
    }
    Ok(())
}

/// One userfaultfd event.
fn event(s: &Shared, uffd: &OwnedFd, e: Event, ask: &mut Vec<u64>, zero: &mut Vec<(u64, u64)>) {
    let arg = |i: usize| e.args[i];
    match e.kind {
        sys::UFFD_EVENT_PAGEFAULT => {
            let addr = arg(1) & !(PAGE_SIZE - 1);
            let Some((ri, p)) = s.by_host(addr) else {
                log::warn!("post-copy: fault at {addr:#x}, outside guest memory");
                return;
            };
            let mut pages = s.lock();
            if !get(&pages.needed[ri], p) {
                // Never sent: zero on both sides.
                zero.push((addr, PAGE_SIZE));
            } else if get(&pages.have[ri], p) {
                // Installed since the fault was queued.
                uffd::wake(uffd.as_fd(), addr, PAGE_SIZE);
            } else if set(&mut pages.requested[ri], p) {
                pages.on_demand += 1;
                ask.push(s.regions[ri].gpa + (p * PAGE) as u64);
            }
        }
        sys::UFFD_EVENT_REMOVE => {
            // Discarded (a balloon): zero now, whatever the source had.
            let (start, end) = (arg(0), arg(1));
            let mut pages = s.lock();
            let mut a = start & !(PAGE_SIZE - 1);
            while a < end {
                if let Some((ri, p)) = s.by_host(a) {
                    if get(&pages.needed[ri], p) && !get(&pages.have[ri], p) {
                        pages.needed[ri][p / 64] &= !(1 << (p % 64));
                        pages.remaining -= 1;
                    }
                }
                a += PAGE_SIZE;
            }
        }
        other => log::debug!("post-copy: ignoring userfaultfd event {other:#x}"),
    }
}

/// What the source's reader thread passes on.
pub type Incoming = Result<Message, StreamError>;

/// Reads the destination's messages on a thread of its own until the
/// stream ends, so requests are seen while the source writes.
pub fn spawn_reader(mut r: Stream) -> io::Result<mpsc::Receiver<Incoming>> {
    let (tx, rx) = mpsc::channel();
    r.set_read_timeout(None)?;
    std::thread::Builder::new()
        .name("ember-postcopy-rx".into())
        .spawn(move || loop {
            let m = protocol::read_message(&mut r);
            let end = m.is_err();
            if tx.send(m).is_err() || end {
                return;
            }
        })?;
    Ok(rx)
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("no answer from the destination within {0:?}")]
    Timeout(Duration),
    #[error("request for {0:#x}, outside guest memory")]
    OutsideMemory(u64),
    #[error("reading guest memory at {gpa:#x}: {source}")]
    ReadMemory {
        gpa: u64,
        source: vm_memory::GuestMemoryError,
    },
    #[error("unexpected {kind:?} during post-copy: {text}")]
    Unexpected { kind: Kind, text: String },
    #[error("expected PostCopyDone, got {kind:?} {text}")]
    NotDone { kind: Kind, text: String },
}

impl From<io::Error> for SourceError {
    fn from(e: io::Error) -> Self {
        SourceError::Stream(e.into())
    }
}

/// The source's post-copy: serves requests and pushes the rest.
pub struct Source {
    mem: GuestMemoryMmap,
    regions: Vec<Region>,
    needed: Vec<Vec<u64>>,
    sent: Vec<Vec<u64>>,
    rx: mpsc::Receiver<Incoming>,
    pub on_demand: u64,
    pub pushed: u64,
    done: bool,
}

impl Source {
    pub fn new(mem: GuestMemoryMmap, needed: Vec<Vec<u64>>, rx: mpsc::Receiver<Incoming>) -> Self {
        Source {
            regions: regions(&mem),
            sent: needed.iter().map(|b| vec![0; b.len()]).collect(),
            mem,
            needed,
            rx,
            on_demand: 0,
            pushed: 0,
            done: false,
        }
    }

    /// Waits for the destination's next message that is not a request,
    /// answering requests meanwhile.
    pub fn wait(
        &mut self,
        out: &mut impl Write,
        timeout: Duration,
    ) -> Result<Message, SourceError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = match self.rx.recv_timeout(left) {
                Ok(m) => m?,
                Err(mpsc::RecvTimeoutError::Timeout) => return Err(SourceError::Timeout(timeout)),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into())
                }
            };
            if m.kind != Kind::PageRequest {
                return Ok(m);
            }
            self.answer(out, &m)?;
        }
    }

    fn answer(&mut self, out: &mut impl Write, m: &Message) -> Result<(), SourceError> {
        let gpas = protocol::parse_page_request(&m.payload, PAGE)?;
        let mut b = PagesBuilder::default();
        let mut page = vec![0u8; PAGE];
        for gpa in gpas {
            let (ri, p) = self.locate(gpa).ok_or(SourceError::OutsideMemory(gpa))?;
            self.mem
                .read_slice(&mut page, GuestAddress(gpa))
                .map_err(|source| SourceError::ReadMemory { gpa, source })?;
            if b.would_overflow(PAGE) {
                protocol::write_message(out, Kind::Pages, &b.take())?;
            }
            if page.iter().all(|&x| x == 0) {
                b.push_zero(gpa, 1);
            } else {
                b.push_data(gpa, &page, PAGE);
            }
            set(&mut self.sent[ri], p);
            self.on_demand += 1;
        }
        if !b.is_empty() {
            protocol::write_message(out, Kind::Pages, &b.take())?;
        }
        out.flush()?;
        Ok(())
    }

    fn locate(&self, gpa: u64) -> Option<(usize, usize)> {
        self.regions.iter().enumerate().find_map(|(i, r)| {
            (gpa >= r.gpa && gpa - r.gpa < (r.pages * PAGE) as u64)
                .then(|| (i, ((gpa - r.gpa) / PAGE_SIZE) as usize))
        })
    }

    /// Answers what is waiting; notes an early `PostCopyDone`.
    fn drain(&mut self, out: &mut impl Write) -> Result<(), SourceError> {
        loop {
            match self.rx.try_recv() {
                Ok(m) => {
                    let m = m?;
                    match m.kind {
                        Kind::PageRequest => self.answer(out, &m)?,
                        Kind::PostCopyDone => self.done = true,
                        other => {
                            return Err(SourceError::Unexpected {
                                kind: other,
                                text: m.text(),
                            })
                        }
                    }
                }
                Err(mpsc::TryRecvError::Empty) => return Ok(()),
                Err(mpsc::TryRecvError::Disconnected) => {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into())
                }
            }
        }
    }

    /// Pushes every needed page not sent yet, answering requests between
    /// messages, then waits for the destination's `PostCopyDone`.
    pub fn push_all(
        &mut self,
        out: &mut impl Write,
        progress: &Progress,
        done_timeout: Duration,
    ) -> Result<(), SourceError> {
        let mut buf = vec![0u8; PUSH_PAGES * PAGE];
        for ri in 0..self.regions.len() {
            let r = self.regions[ri];
            for (first, count) in dirty_runs(&self.needed[ri], r.pages) {
                let mut p = first;
                while p < first + count {
                    self.drain(out)?;
                    if self.done {
                        return Ok(());
                    }
                    let n = (first + count - p).min(PUSH_PAGES);
                    let mut b = PagesBuilder::default();
                    // Runs of pages not yet sent.
                    let mut i = 0;
                    while i < n {
                        if get(&self.sent[ri], p + i) {
                            i += 1;
                            continue;
                        }
                        let mut j = i;
                        while j < n && !get(&self.sent[ri], p + j) {
                            set(&mut self.sent[ri], p + j);
                            j += 1;
                        }
                        let gpa = r.gpa + ((p + i) * PAGE) as u64;
                        let chunk = &mut buf[..(j - i) * PAGE];
                        self.mem
                            .read_slice(chunk, GuestAddress(gpa))
                            .map_err(|source| SourceError::ReadMemory { gpa, source })?;
                        push_pages(&mut b, gpa, chunk);
                        self.pushed += (j - i) as u64;
                        i = j;
                    }
                    if !b.is_empty() {
                        protocol::write_message(out, Kind::Pages, &b.take())?;
                        out.flush()?;
                    }
                    let (d, pu) = (self.on_demand, self.pushed);
                    progress.update(|s| {
                        s.postcopy_pages_on_demand = d;
                        s.postcopy_pages_pushed = pu;
                    });
                    p += n;
                }
            }
        }
        if self.done {
            return Ok(());
        }
        let m = self.wait(out, done_timeout)?;
        match m.kind {
            Kind::PostCopyDone => Ok(()),
            other => Err(SourceError::NotDone {
                kind: other,
                text: m.text(),
            }),
        }
    }
}

/// Adds `chunk` (pages from `gpa`) as runs of data and zero pages.
fn push_pages(b: &mut PagesBuilder, gpa: u64, chunk: &[u8]) {
    let zero: Vec<bool> = chunk
        .chunks(PAGE)
        .map(|p| p.iter().all(|&x| x == 0))
        .collect();
    let mut i = 0;
    while i < zero.len() {
        let mut j = i;
        while j < zero.len() && zero[j] == zero[i] {
            j += 1;
        }
        let at = gpa + (i * PAGE) as u64;
        if zero[i] {
            b.push_zero(at, (j - i) as u32);
        } else {
            b.push_data(at, &chunk[i * PAGE..j * PAGE], PAGE);
        }
        i = j;
    }
}
