//! The `Uffd` memory backend for snapshot restore, as Firecracker defines it
//! (docs/snapshotting/handling-page-faults-on-snapshot-resume.md): guest
//! memory is anonymous and registered with a userfaultfd; the VMM sends the
//! region layout (a JSON array of [`GuestRegionUffdMapping`]) with the
//! userfaultfd attached (SCM_RIGHTS) to a page-fault handler listening on a
//! unix socket, which then serves every first touch of a guest page from the
//! memory file. `ember-uffd-handler` is such a handler; Firecracker's example
//! handlers work too, and ours works with Firecracker.

use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::vstate::memory::GuestMemoryMmap;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::memory::{check_layout, GuestMemoryState, MemoryFileError};

/// One guest memory region as the page-fault handler sees it (the shape of
/// Firecracker's `GuestRegionUffdMapping`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestRegionUffdMapping {
    /// Where the region starts in the VMM's address space.
    pub base_host_virt_addr: u64,
    /// Its size in bytes.
    pub size: u64,
    /// Where its contents start in the memory file.
    pub offset: u64,
    /// The page size backing it, in bytes.
    #[serde(default)]
    pub page_size: u64,
    /// Older Firecracker versions send the page size in KiB instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size_kib: Option<u64>,
}

impl GuestRegionUffdMapping {
    /// The page size in bytes, from whichever field the sender filled in.
    pub fn page_bytes(&self) -> u64 {
        match (self.page_size, self.page_size_kib) {
            (0, Some(kib)) => kib.saturating_mul(1024),
            (0, None) => 4096,
            (bytes, _) => bytes,
        }
    }
}

/// The kernel's userfaultfd ABI (linux/userfaultfd.h), which `libc` lacks.
pub mod sys {
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

    pub const UFFD_API: u64 = 0xAA;
    pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
    pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
    /// Bit of `ioctls` saying UFFDIO_COPY works on a registered range.
    pub const UFFDIO_COPY_BIT: u64 = 1 << 0x03;

    pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
    pub const UFFD_EVENT_FORK: u8 = 0x13;
    pub const UFFD_EVENT_REMAP: u8 = 0x14;
    pub const UFFD_EVENT_REMOVE: u8 = 0x15;
    pub const UFFD_EVENT_UNMAP: u8 = 0x16;
    /// Size of `struct uffd_msg`, what a read of the userfaultfd returns.
    pub const UFFD_MSG_SIZE: usize = 32;

    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct UffdioApi {
        pub api: u64,
        pub features: u64,
        pub ioctls: u64,
    }

    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct UffdioRange {
        pub start: u64,
        pub len: u64,
    }

    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct UffdioRegister {
        pub range: UffdioRange,
        pub mode: u64,
        pub ioctls: u64,
    }

    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct UffdioCopy {
        pub dst: u64,
        pub src: u64,
        pub len: u64,
        pub mode: u64,
        pub copy: i64,
    }

    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct UffdioZeropage {
        pub range: UffdioRange,
        pub mode: u64,
        pub zeropage: i64,
    }

    const UFFDIO: u32 = 0xAA;
    ioctl_io_nr!(USERFAULTFD_IOC_NEW, UFFDIO, 0x00);
    ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3F, UffdioApi);
    ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
    ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, UffdioRange);
    ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, UffdioRange);
    ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, UffdioCopy);
    ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, UffdioZeropage);
}

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error(transparent)]
    Layout(#[from] MemoryFileError),
    #[error("cannot allocate guest memory: {0}")]
    Memory(String),
    #[error(
        "userfaultfd is unavailable ({0}); the Uffd memory backend needs root or \
         CAP_SYS_PTRACE, or sysctl vm.unprivileged_userfaultfd=1, or read-write \
         access to /dev/userfaultfd"
    )]
    Unavailable(String),
    #[error("userfaultfd API handshake failed: {0}")]
    Api(String),
    #[error("cannot register guest memory at {addr:#x} (+{size:#x}) with userfaultfd: {err}")]
    Register { addr: u64, size: u64, err: String },
    #[error("no page-fault handler socket at {0}")]
    NoHandler(String),
    #[error("page-fault handler at {path} refused the connection (is it listening?): {err}")]
    Refused { path: String, err: String },
    #[error("cannot connect to the page-fault handler at {path}: {err}")]
    Connect { path: String, err: String },
    #[error("cannot send the memory mappings to the page-fault handler at {path}: {err}")]
    Send { path: String, err: String },
}

/// What must live as long as the guest memory: the userfaultfd (closing the
/// last copy would unregister the memory, leaving zeroes where snapshot
/// pages should be) and the connection to the handler.
#[derive(Debug)]
pub struct UffdBackend {
    uffd: OwnedFd,
    socket: UnixStream,
    mappings: Vec<GuestRegionUffdMapping>,
}

impl UffdBackend {
    pub fn uffd(&self) -> BorrowedFd<'_> {
        self.uffd.as_fd()
    }

    /// The connection to the handler: it becomes readable with EOF / HUP
    /// when the handler goes away, after which page faults would hang.
    pub fn socket(&self) -> &UnixStream {
        &self.socket
    }

    /// What was sent to the handler.
    pub fn mappings(&self) -> &[GuestRegionUffdMapping] {
        &self.mappings
    }

    /// Whether the handler has closed its end of the connection (it exited).
    pub fn handler_hung_up(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.socket.as_raw_fd(),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n > 0 && pfd.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0
    }
}

/// Builds anonymous guest memory laid out as `state` says, registers it with
/// a new userfaultfd, and hands the layout and the userfaultfd to the
/// page-fault handler listening at `backend_path`.
pub fn create_uffd_memory(
    backend_path: &Path,
    state: &GuestMemoryState,
) -> Result<(GuestMemoryMmap, UffdBackend), UffdError> {
    let mem = anonymous_memory(state)?;
    let uffd = register_memory(&mem)?;
    let page_size = page_size();
    let mut mappings = Vec::new();
    for (region, r) in mem.iter().zip(&state.regions) {
        let addr = region.as_ptr() as u64;
        mappings.push(GuestRegionUffdMapping {
            base_host_virt_addr: addr,
            size: region.len(),
            offset: r.file_offset,
            page_size,
            page_size_kib: None,
        });
    }

    let socket = connect(backend_path)?;
    let send_err = |e: io::Error| UffdError::Send {
        path: backend_path.display().to_string(),
        err: if matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET)) {
            format!("the handler closed the connection ({e})")
        } else {
            e.to_string()
        },
    };
    send_mappings(&socket, &mappings, Some(uffd.as_fd())).map_err(send_err)?;
    Ok((
        mem,
        UffdBackend {
            uffd,
            socket,
            mappings,
        },
    ))
}

/// Anonymous guest memory laid out as `state` says, every page missing:
/// what a userfaultfd then fills.
pub fn anonymous_memory(state: &GuestMemoryState) -> Result<GuestMemoryMmap, UffdError> {
    check_layout(state)?;
    let mut regions = Vec::new();
    for r in &state.regions {
        // A full-length bitmap, so VMM writes are tracked for Diff snapshots.
        let bitmap = AtomicBitmap::with_len(r.size as usize);
        let mmap = MmapRegionBuilder::new_with_bitmap(r.size as usize, bitmap)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| UffdError::Memory(e.to_string()))?;
        regions.push(
            GuestRegionMmap::new(mmap, GuestAddress(r.base_address))
                .ok_or_else(|| UffdError::Memory("region wraps the address space".into()))?,
        );
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| UffdError::Memory(e.to_string()))
}

/// A new userfaultfd with every region of `mem` registered for missing
/// pages: from now on the first touch of a page not yet present waits
/// until someone fills it (UFFDIO_COPY / UFFDIO_ZEROPAGE, [`fill`]).
/// Closing the userfaultfd unregisters the memory.
pub fn register_memory(mem: &GuestMemoryMmap) -> Result<OwnedFd, UffdError> {
    let uffd = new_userfaultfd()?;
    api_handshake(&uffd)?;
    for region in mem.iter() {
        register(&uffd, region.as_ptr() as u64, region.len())?;
    }
    Ok(uffd)
}

/// Unregisters every region of `mem` (faults on pages still missing then
/// wake and get zero pages, as plain anonymous memory does).
pub fn unregister_memory(uffd: BorrowedFd<'_>, mem_ranges: &[(u64, u64)]) -> io::Result<()> {
    for &(start, len) in mem_ranges {
        let mut range = sys::UffdioRange { start, len };
        // SAFETY: UFFDIO_UNREGISTER reads one UffdioRange we own.
        let r = unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(&uffd, sys::UFFDIO_UNREGISTER(), &mut range)
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// How [`fill`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    /// Every page of the range is present now (some may have been already:
    /// those were left as they were).
    Done,
    /// The kernel asked to retry (EAGAIN: the address space is changing;
    /// its events must be read first): `dst`, `len` is what is left.
    Retry { dst: u64, len: u64 },
    /// The range is no longer mapped (the VMM is going away).
    Gone,
}

/// Fills `len` bytes of registered memory at host address `dst`, with a
/// copy of `src` (a host address, `len` readable bytes) or with zeroes.
/// A page already present (EEXIST: a racing fault, or the guest wrote it
/// after an earlier fill) is kept, its waiters woken, and the rest filled.
pub fn fill(
    uffd: BorrowedFd<'_>,
    mut dst: u64,
    mut src: Option<u64>,
    mut len: u64,
    page: u64,
) -> io::Result<Filled> {
    use vmm_sys_util::ioctl::ioctl_with_mut_ref;
    while len > 0 {
        let (r, done) = match src {
            None => {
                let mut z = sys::UffdioZeropage {
                    range: sys::UffdioRange { start: dst, len },
                    ..Default::default()
                };
                // SAFETY: UFFDIO_ZEROPAGE reads and writes one struct we own.
                let r = unsafe { ioctl_with_mut_ref(&uffd, sys::UFFDIO_ZEROPAGE(), &mut z) };
                (r, z.zeropage)
            }
            Some(s) => {
                let mut c = sys::UffdioCopy {
                    dst,
                    src: s,
                    len,
                    ..Default::default()
                };
                // SAFETY: UFFDIO_COPY reads and writes one struct we own; the
                // caller vouches that src..src+len is readable memory; the
                // kernel checks dst against the registered ranges.
                let r = unsafe { ioctl_with_mut_ref(&uffd, sys::UFFDIO_COPY(), &mut c) };
                (r, c.copy)
            }
        };
        if r == 0 {
            return Ok(Filled::Done);
        }
        let e = io::Error::last_os_error();
        let step = match e.raw_os_error() {
            Some(libc::EAGAIN) if done > 0 => (done as u64).min(len),
            Some(libc::EAGAIN) => return Ok(Filled::Retry { dst, len }),
            Some(libc::EEXIST) => {
                wake(uffd, dst, page);
                page.min(len)
            }
            Some(libc::ENOENT | libc::ESRCH) => return Ok(Filled::Gone),
            _ => return Err(e),
        };
        dst += step;
        len -= step;
        src = src.map(|s| s + step);
    }
    Ok(Filled::Done)
}

/// One `struct uffd_msg`: its event and its first three arguments.
#[derive(Debug, Clone, Copy)]
pub struct Event {
    pub kind: u8,
    pub args: [u64; 3],
}

/// Why [`wait_events`] failed.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("poll on the userfaultfd: {0}")]
    Poll(#[source] io::Error),
    #[error("cannot read the userfaultfd: {0}")]
    Read(#[source] io::Error),
}

/// Waits up to `timeout_ms` for events on a non-blocking userfaultfd and
/// hands each one pending to `each` (none when the wait ran out or a signal
/// interrupted it).
pub fn wait_events(
    uffd: &OwnedFd,
    timeout_ms: i32,
    mut each: impl FnMut(Event),
) -> Result<(), EventError> {
    use std::io::Read;
    let mut pfd = libc::pollfd {
        fd: uffd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::Interrupted => Ok(()),
            _ => Err(EventError::Poll(e)),
        };
    }
    if pfd.revents & libc::POLLIN == 0 {
        return Ok(());
    }
    let mut file = std::fs::File::from(uffd.try_clone().map_err(EventError::Read)?);
    let mut buf = [0u8; sys::UFFD_MSG_SIZE * 64];
    loop {
        let got = match file.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(EventError::Read(e)),
        };
        for msg in buf[..got].chunks_exact(sys::UFFD_MSG_SIZE) {
            let arg = |i: usize| {
                let b: [u8; 8] = msg[8 + 8 * i..16 + 8 * i].try_into().unwrap_or_default();
                u64::from_ne_bytes(b)
            };
            each(Event {
                kind: msg[0],
                args: [arg(0), arg(1), arg(2)],
            });
        }
        if got < buf.len() {
            return Ok(());
        }
    }
}

/// Wakes the threads waiting on faults in `start..start+len`.
pub fn wake(uffd: BorrowedFd<'_>, start: u64, len: u64) {
    let mut range = sys::UffdioRange { start, len };
    // SAFETY: UFFDIO_WAKE reads one UffdioRange we own.
    unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&uffd, sys::UFFDIO_WAKE(), &mut range) };
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as u64
    } else {
        4096
    }
}

/// A non-blocking, close-on-exec userfaultfd that also catches faults taken
/// by the kernel (KVM) on guest memory: from userfaultfd(2), or failing that
/// from /dev/userfaultfd (Linux 6.1+), whose file mode grants access.
fn new_userfaultfd() -> Result<OwnedFd, UffdError> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: userfaultfd(2) takes only flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd >= 0 {
        // SAFETY: fd is a new descriptor that nothing else owns.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    }
    let sys_err = io::Error::last_os_error();
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/userfaultfd")
        .map_err(|e| {
            UffdError::Unavailable(format!("userfaultfd(2): {sys_err}; /dev/userfaultfd: {e}"))
        })?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags by value and returns a new fd or -1.
    let fd = unsafe {
        vmm_sys_util::ioctl::ioctl_with_val(&dev, sys::USERFAULTFD_IOC_NEW(), flags as _)
    };
    if fd < 0 {
        return Err(UffdError::Unavailable(format!(
            "userfaultfd(2): {sys_err}; /dev/userfaultfd: {}",
            io::Error::last_os_error()
        )));
    }
    // SAFETY: fd is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn api_handshake(uffd: &OwnedFd) -> Result<(), UffdError> {
    // Firecracker asks for remove events too (balloon inflation), so its
    // handlers expect them; ours handles them.
    let mut api = sys::UffdioApi {
        api: sys::UFFD_API,
        features: sys::UFFD_FEATURE_EVENT_REMOVE,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes one UffdioApi, which we own.
    let r = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(uffd, sys::UFFDIO_API(), &mut api) };
    if r < 0 {
        return Err(UffdError::Api(io::Error::last_os_error().to_string()));
    }
    Ok(())
}

fn register(uffd: &OwnedFd, addr: u64, size: u64) -> Result<(), UffdError> {
    let mut reg = sys::UffdioRegister {
        range: sys::UffdioRange {
            start: addr,
            len: size,
        },
        mode: sys::UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes one UffdioRegister, which we
    // own; the range is a mapping of ours.
    let r =
        unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(uffd, sys::UFFDIO_REGISTER(), &mut reg) };
    let err = |err: String| UffdError::Register { addr, size, err };
    if r < 0 {
        return Err(err(io::Error::last_os_error().to_string()));
    }
    if reg.ioctls & sys::UFFDIO_COPY_BIT == 0 {
        return Err(err("the kernel does not offer UFFDIO_COPY on it".into()));
    }
    Ok(())
}

fn connect(path: &Path) -> Result<UnixStream, UffdError> {
    let p = path.display().to_string();
    UnixStream::connect(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => UffdError::NoHandler(p),
        io::ErrorKind::ConnectionRefused => UffdError::Refused {
            path: p,
            err: e.to_string(),
        },
        _ => UffdError::Connect {
            path: p,
            err: e.to_string(),
        },
    })
}

/// Sends `mappings` with the `uffd` attached, as [`create_uffd_memory`]
/// does; for tests of handlers.
pub fn send_mappings(
    socket: &UnixStream,
    mappings: &[GuestRegionUffdMapping],
    uffd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let body = serde_json::to_vec(mappings)?;
    let sent = match uffd {
        Some(fd) => socket
            .send_with_fd(&body[..], fd.as_raw_fd())
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?,
        None => 0,
    };
    (&*socket).write_all(&body[sent..])
}

/// Watches the page-fault handler's connection on the VMM's event loop. A
/// handler that exits can no longer serve faults, and vCPUs touching an
/// unserved page would wait forever: the VM is stopped with an error instead.
pub struct HandlerWatch {
    socket: UnixStream,
    exit: crate::vstate::vcpu::VmExitNotifier,
}

impl HandlerWatch {
    pub fn new(
        backend: &UffdBackend,
        exit: crate::vstate::vcpu::VmExitNotifier,
    ) -> std::io::Result<Self> {
        Ok(HandlerWatch {
            socket: backend.socket().try_clone()?,
            exit,
        })
    }
}

impl event_manager::MutEventSubscriber for HandlerWatch {
    fn init(&mut self, ops: &mut event_manager::EventOps) {
        use event_manager::{EventSet, Events};
        let events = EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP;
        if let Err(e) = ops.add(Events::new(&self.socket, events)) {
            log::error!("cannot watch the page-fault handler's connection: {e:?}");
        }
    }

    fn process(&mut self, events: event_manager::Events, ops: &mut event_manager::EventOps) {
        use event_manager::{EventSet, Events};
        use std::io::Read;
        let set = events.event_set();
        let mut gone = set.intersects(EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR);
        if !gone && set.contains(EventSet::IN) {
            // The protocol has no messages from the handler: discard, and
            // treat end-of-stream as the handler leaving.
            let mut buf = [0u8; 256];
            gone = matches!(self.socket.read(&mut buf), Ok(0) | Err(_));
        }
        if gone {
            log::error!(
                "the userfaultfd page-fault handler closed its connection: guest memory can no \
                 longer be served; stopping the VM"
            );
            let _ = ops.remove(Events::new(&self.socket, EventSet::empty()));
            self.exit.notify(crate::vstate::vcpu::EXIT_ERROR);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_json_is_firecrackers_shape() {
        let m = GuestRegionUffdMapping {
            base_host_virt_addr: 0x7f00_0000_0000,
            size: 0x1000,
            offset: 0x2000,
            page_size: 4096,
            page_size_kib: None,
        };
        let s = serde_json::to_string(&[&m]).unwrap();
        assert_eq!(
            s,
            r#"[{"base_host_virt_addr":139637976727552,"size":4096,"offset":8192,"page_size":4096}]"#
        );
        let old: GuestRegionUffdMapping = serde_json::from_str(
            r#"{"base_host_virt_addr":1,"size":4096,"offset":0,"page_size_kib":4}"#,
        )
        .unwrap();
        assert_eq!(old.page_bytes(), 4096);
    }
}
