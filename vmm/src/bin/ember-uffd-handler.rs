//! `ember-uffd-handler`: serves the guest page faults of a VMM restoring a
//! snapshot with the `Uffd` memory backend (Firecracker's protocol). It
//! listens on `--socket`, accepts one VMM, receives the guest memory
//! mappings (JSON) with the userfaultfd attached, and copies each faulting
//! page from `--mem-file`. `--prefault` copies all of guest memory first;
//! `--working-set` copies the pages of a saved working set first, in bulk
//! (REAP's prefetch), then serves the rest on demand.
//! It exits 0 when the VMM closes the connection, non-zero on any error.
//!
//! Once it has the VMM's connection, the userfaultfd and its mapping of the
//! memory file, it confines itself with a seccomp filter
//! (`ember_vmm::seccomp`, kind `UffdHandler`): polls, reads, page copies and
//! nothing else; any other call ends it with exit code 148 and the call
//! logged.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use ember_vmm::seccomp;
use ember_vmm::snapshot::uffd::{self, sys, GuestRegionUffdMapping};
use ember_vmm::snapshot::working_set::WorkingSet;
use vm_memory::mmap::MmapRegion;
use vm_memory::FileOffset;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Serves guest page faults from a snapshot memory file.
#[derive(Parser, Debug)]
#[command(name = "ember-uffd-handler", version)]
struct Args {
    /// Unix socket to listen on (the VMM's `mem_backend.backend_path`).
    #[arg(long)]
    socket: PathBuf,
    /// The snapshot's memory file.
    #[arg(long)]
    mem_file: PathBuf,
    /// Copy all guest memory before serving faults.
    #[arg(long)]
    prefault: bool,
    /// Copy these pages first: a working set saved by a recording load
    /// (`PUT /snapshot/working-set`) of the same snapshot.
    #[arg(long, conflicts_with = "prefault")]
    working_set: Option<PathBuf>,
    /// Run without the seccomp filter (debugging only).
    #[arg(long)]
    no_seccomp: bool,
    /// Test hook: once set up and confined, make this call (a name from
    /// ember_vmm::seccomp's FORBIDDEN or PERMITTED tables), print what it
    /// returned and exit.
    #[arg(long, hide = true)]
    seccomp_self_test: Option<String>,
}

macro_rules! log {
    ($($t:tt)*) => { eprintln!("ember-uffd-handler: {}", format!($($t)*)) };
}

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(()) => {
            log!("the VMM closed the connection; exiting");
            ExitCode::SUCCESS
        }
        Err(e) => {
            log!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    if std::fs::symlink_metadata(&args.socket).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(&args.socket);
    }
    let listener = UnixListener::bind(&args.socket)
        .map_err(|e| format!("cannot listen on {}: {e}", args.socket.display()))?;
    log!("listening on {}", args.socket.display());
    let (stream, _) = listener
        .accept()
        .map_err(|e| format!("cannot accept a connection: {e}"))?;
    let (mappings, uffd) = receive(&stream)?;

    let mem = args.mem_file.display();
    let file = File::open(&args.mem_file).map_err(|e| format!("cannot open {mem}: {e}"))?;
    let file_len = file
        .metadata()
        .map_err(|e| format!("cannot stat {mem}: {e}"))?
        .len();
    check_mappings(&mappings, file_len).map_err(|e| format!("{e} (memory file {mem})"))?;
    let working_set = match &args.working_set {
        Some(p) => Some(WorkingSet::read(p, file_len).map_err(|e| e.to_string())?),
        None => None,
    };
    let src = MmapRegion::<()>::build(
        Some(FileOffset::new(file, 0)),
        file_len as usize,
        libc::PROT_READ,
        libc::MAP_PRIVATE,
    )
    .map_err(|e| format!("cannot map {mem}: {e}"))?;
    log!(
        "serving {} region(s), {} bytes, from {mem}",
        mappings.len(),
        mappings.iter().map(|m| m.size).sum::<u64>()
    );
    // Everything is open and mapped: from here on, only page service.
    if !args.no_seccomp {
        seccomp::confine_current_thread(seccomp::ThreadKind::UffdHandler)
            .map_err(|e| format!("cannot confine this process: {e}"))?;
        log!("seccomp filter installed");
    }
    if let Some(call) = &args.seccomp_self_test {
        println!("{}", seccomp::uffd_handler_self_test(call)?);
        return Ok(());
    }

    let mut h = Handler {
        uffd,
        mappings,
        src_base: src.as_ptr() as u64,
        removed: Vec::new(),
        pending: VecDeque::new(),
        faults: 0,
    };
    let mut first = Vec::new();
    for m in &h.mappings {
        match &working_set {
            Some(ws) => first.extend(ws.pieces_in(m.offset, m.size, m.base_host_virt_addr)),
            None if args.prefault => first.push((m.base_host_virt_addr, m.size)),
            None => {}
        }
    }
    if !first.is_empty() {
        let start = Instant::now();
        let total: u64 = first.iter().map(|w| w.1).sum();
        h.pending.extend(first.into_iter().map(|(dst, len)| Work {
            dst,
            len,
            zero: false,
        }));
        loop {
            h.serve_pending()?;
            if h.pending.is_empty() {
                break;
            }
            // Copies wait for pending events (EAGAIN): read them.
            h.read_events()?;
            std::thread::sleep(Duration::from_millis(1));
        }
        log!(
            "prefaulted {total} bytes in {} ms",
            start.elapsed().as_millis()
        );
    }
    h.run(&stream)
}

/// Reads the mappings JSON (possibly in several pieces) and the userfaultfd.
fn receive(stream: &UnixStream) -> Result<(Vec<GuestRegionUffdMapping>, File), String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut uffd = None;
    let mappings = loop {
        let mut chunk = vec![0u8; 64 << 10];
        let (n, fd) = stream
            .recv_with_fd(&mut chunk)
            .map_err(|e| format!("cannot receive the memory mappings: {e}"))?;
        if uffd.is_none() {
            uffd = fd;
        }
        if n == 0 {
            return Err(if buf.is_empty() {
                "the VMM closed the connection without sending the memory mappings".into()
            } else {
                "the VMM closed the connection in the middle of the memory mappings".into()
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        match serde_json::from_slice::<Vec<GuestRegionUffdMapping>>(&buf) {
            Ok(m) => break m,
            Err(e) if e.is_eof() => continue,
            Err(e) => return Err(format!("malformed memory mappings from the VMM: {e}")),
        }
    };
    stream.set_read_timeout(None).map_err(|e| e.to_string())?;
    let uffd = uffd.ok_or("the VMM sent the mappings without a userfaultfd attached")?;
    let link = std::fs::read_link(format!("/proc/self/fd/{}", uffd.as_raw_fd()))
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    if link != "anon_inode:[userfaultfd]" {
        return Err(format!(
            "the descriptor the VMM sent is not a userfaultfd ({link})"
        ));
    }
    Ok((mappings, uffd))
}

fn check_mappings(mappings: &[GuestRegionUffdMapping], file_len: u64) -> Result<(), String> {
    if mappings.is_empty() {
        return Err("the VMM sent no memory mappings".into());
    }
    for (i, m) in mappings.iter().enumerate() {
        let page = m.page_bytes();
        if !page.is_power_of_two() || page < 4096 {
            return Err(format!("mapping {i} has an invalid page size {page}"));
        }
        if m.size == 0 || m.size % page != 0 || m.base_host_virt_addr % page != 0 {
            return Err(format!("mapping {i} ({m:?}) is not page-aligned"));
        }
        if m.offset
            .checked_add(m.size)
            .is_none_or(|end| end > file_len)
        {
            return Err(format!(
                "mapping {i} (offset {:#x}, size {:#x}) lies outside the memory file ({file_len} bytes)",
                m.offset, m.size
            ));
        }
    }
    Ok(())
}

/// A range to fill: from the memory file, or with zeroes where the VMM
/// discarded pages (remove events).
#[derive(Debug, Clone, Copy)]
struct Work {
    dst: u64,
    len: u64,
    zero: bool,
}

struct Handler {
    uffd: File,
    mappings: Vec<GuestRegionUffdMapping>,
    src_base: u64,
    /// Ranges [start, end) the VMM discarded: their pages are zero now.
    removed: Vec<(u64, u64)>,
    /// Work that could not be done yet (EAGAIN), in order.
    pending: VecDeque<Work>,
    faults: u64,
}

impl Handler {
    fn run(&mut self, stream: &UnixStream) -> Result<(), String> {
        loop {
            self.serve_pending()?;
            let timeout = if self.pending.is_empty() { -1 } else { 10 };
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stream.as_raw_fd(),
                    events: libc::POLLIN | libc::POLLRDHUP,
                    revents: 0,
                },
            ];
            // SAFETY: fds is an array of two valid pollfds.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("poll: {e}"));
            }
            if fds[1].revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0 {
                log!("served {} page faults", self.faults);
                return Ok(());
            }
            if fds[1].revents & libc::POLLIN != 0 {
                let mut junk = [0u8; 4096];
                match (&*stream).read(&mut junk) {
                    Ok(0) => return Ok(()),
                    Ok(n) => log!("ignoring {n} unexpected bytes from the VMM"),
                    Err(e) => return Err(format!("connection to the VMM: {e}")),
                }
            }
            if fds[0].revents & libc::POLLERR != 0 {
                return Err("the userfaultfd reported an error".into());
            }
            if fds[0].revents & libc::POLLIN != 0 {
                self.read_events()?;
            }
        }
    }

    fn read_events(&mut self) -> Result<(), String> {
        let mut buf = [0u8; sys::UFFD_MSG_SIZE * 64];
        loop {
            match (&self.uffd).read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    for msg in buf[..n].chunks_exact(sys::UFFD_MSG_SIZE) {
                        self.handle_event(msg)?;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("cannot read the userfaultfd: {e}")),
            }
        }
    }

    /// One `struct uffd_msg`: the event at byte 0, its arguments from byte 8.
    fn handle_event(&mut self, msg: &[u8]) -> Result<(), String> {
        let arg = |i: usize| u64::from_ne_bytes(msg[8 + 8 * i..16 + 8 * i].try_into().unwrap());
        match msg[0] {
            sys::UFFD_EVENT_PAGEFAULT => {
                let addr = arg(1);
                let m = self.mapping_of(addr).ok_or_else(|| {
                    format!("page fault at {addr:#x}, outside every guest region")
                })?;
                let page = m.page_bytes();
                let dst = addr & !(page - 1);
                self.faults += 1;
                let zero = self.removed.iter().any(|&(s, e)| s <= dst && dst < e);
                self.pending.push_back(Work {
                    dst,
                    len: page,
                    zero,
                });
            }
            sys::UFFD_EVENT_REMOVE => self.removed.push((arg(0), arg(1))),
            sys::UFFD_EVENT_UNMAP => {
                let (start, end) = (arg(0), arg(1));
                log!("the VMM unmapped {start:#x}..{end:#x}");
                self.mappings.retain(|m| {
                    !(start <= m.base_host_virt_addr && m.base_host_virt_addr + m.size <= end)
                });
            }
            sys::UFFD_EVENT_REMAP => {
                let (from, to, len) = (arg(0), arg(1), arg(2));
                log!("the VMM moved {from:#x}+{len:#x} to {to:#x}");
                for m in &mut self.mappings {
                    if from <= m.base_host_virt_addr && m.base_host_virt_addr + m.size <= from + len
                    {
                        m.base_host_virt_addr = m.base_host_virt_addr - from + to;
                    }
                }
            }
            sys::UFFD_EVENT_FORK => {
                log!("ignoring a fork event");
                let fd = arg(0) as u32 as i32;
                // SAFETY: the fork event hands us a new userfaultfd we own; close it.
                drop(unsafe { File::from_raw_fd(fd) });
            }
            other => log!("ignoring unknown userfaultfd event {other:#x}"),
        }
        Ok(())
    }

    fn mapping_of(&self, addr: u64) -> Option<&GuestRegionUffdMapping> {
        self.mappings
            .iter()
            .find(|m| m.base_host_virt_addr <= addr && addr - m.base_host_virt_addr < m.size)
    }

    fn serve_pending(&mut self) -> Result<(), String> {
        while let Some(w) = self.pending.pop_front() {
            if let Some(rest) = self.fill(w)? {
                self.pending.push_front(rest);
                break;
            }
        }
        Ok(())
    }

    /// Fills `w`; returns what is left when the kernel says to retry later.
    fn fill(&self, w: Work) -> Result<Option<Work>, String> {
        let Some(m) = self.mapping_of(w.dst) else {
            return Ok(None); // The region went away meanwhile.
        };
        // The source lies in our mapping of the memory file (checked
        // against its size).
        let src = (!w.zero).then(|| self.src_base + m.offset + (w.dst - m.base_host_virt_addr));
        match uffd::fill(self.uffd.as_fd(), w.dst, src, w.len, m.page_bytes()) {
            Ok(uffd::Filled::Done | uffd::Filled::Gone) => Ok(None),
            Ok(uffd::Filled::Retry { dst, len }) => Ok(Some(Work { dst, len, ..w })),
            Err(e) => Err(format!("cannot fill guest page {:#x}: {e}", w.dst)),
        }
    }
}
