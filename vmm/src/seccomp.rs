//! Seccomp filters, one per kind of thread, each allowing what that thread
//! needs, with the arguments of the dangerous calls checked (`clone` only
//! with the flags that start a thread, `socket` only for unix sockets,
//! `ioctl` only with the request numbers in use, `prctl` only with the
//! options in use, `tgkill` only within this process, `mmap`/`mprotect`
//! never with `PROT_EXEC`). A syscall outside the filter raises SIGSYS; the
//! handler logs the syscall number and its first arguments on stderr and
//! ends the process (exit code 148, as Firecracker does), so a violation is
//! never silent.
//!
//! [`table`] is the one description of what each kind may do: the filters
//! are compiled from it, and the tests read it (every call in
//! [`FORBIDDEN`] must be refused by it, and is then tried in the real
//! binary under its real filter, `ember-vmm --seccomp-self-test`).
//!
//! Threads inherit their creator's filter: the API thread is started
//! before the VMM thread installs its own, and vCPU threads (started by the
//! VMM thread) stack their narrower filter on the VMM's (a call must pass
//! both). Other threads started by the VMM thread (an NBD drive's I/O
//! threads, migration, post-copy, disk fill and vhost-user watchdog
//! threads) keep the VMM's filter.
//!
//! `clone3` is answered with ENOSYS (glibc then falls back to `clone`,
//! whose flags a filter can read; `clone3` keeps them in memory).
//!
//! `ember-uffd-handler` (one thread) confines itself with the
//! [`ThreadKind::UffdHandler`] filter once its socket, the VMM's
//! userfaultfd and its mapping of the memory file are set up
//! ([`confine_current_thread`]): from then on it only polls, reads events
//! and copies pages (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`, `UFFDIO_WAKE`); it
//! opens nothing, starts nothing and makes no socket.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

static ENABLED: AtomicBool = AtomicBool::new(false);
static INET: AtomicBool = AtomicBool::new(false);
/// Which program the SIGSYS handler names: 0 `ember-vmm`, 1
/// `ember-uffd-handler`.
static PROGRAM: AtomicU8 = AtomicU8::new(0);

/// Exit code after a seccomp violation.
pub const SECCOMP_VIOLATION_EXIT: i32 = 148;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    Vmm,
    Api,
    Vcpu,
    /// `ember-uffd-handler`'s one thread, once set up.
    UffdHandler,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 4] = [
        ThreadKind::Vmm,
        ThreadKind::Api,
        ThreadKind::Vcpu,
        ThreadKind::UffdHandler,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Api => "api",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::UffdHandler => "uffd-handler",
        }
    }

    pub fn from_name(s: &str) -> Option<ThreadKind> {
        ThreadKind::ALL.into_iter().find(|k| k.name() == s)
    }

    /// The filters a thread of this kind runs under, outermost first.
    fn stack(self) -> &'static [ThreadKind] {
        match self {
            ThreadKind::Vmm => &[ThreadKind::Vmm],
            ThreadKind::Api => &[ThreadKind::Api],
            ThreadKind::Vcpu => &[ThreadKind::Vmm, ThreadKind::Vcpu],
            ThreadKind::UffdHandler => &[ThreadKind::UffdHandler],
        }
    }
}

/// How a syscall's arguments are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Any arguments.
    Any,
    /// Argument `.0` (its low 32 bits, an `int` or an ioctl request) is
    /// one of `.1`.
    OneOf(u8, &'static [u64]),
    /// Argument `.0` (all 64 bits) equals `.1`.
    Eq64(u8, u64),
    /// Argument `.0` has none of the bits of `.1`.
    NoBits(u8, u64),
    /// Argument `.0` is this process's id (the tgid, read when the filter
    /// is built).
    ThisProcess(u8),
    /// `socket`'s domain: `AF_UNIX`, and `AF_INET`/`AF_INET6` only when
    /// [`allow_inet`] was called (a stand-alone VMM migrating over
    /// `tcp://` or opening `nbd://` drives; hostd never does).
    SocketDomain,
    /// Refused with this errno without ending the process.
    Errno(u32),
}

/// What a filter does with one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Errno(u32),
    Kill,
}

// ioctl request numbers (asm-generic/ioctl.h).
const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
}
const fn io(ty: u64, nr: u64) -> u64 {
    ioc(0, ty, nr, 0)
}
const fn iow<T>(ty: u64, nr: u64) -> u64 {
    ioc(1, ty, nr, std::mem::size_of::<T>())
}
const fn ior<T>(ty: u64, nr: u64) -> u64 {
    ioc(2, ty, nr, std::mem::size_of::<T>())
}
const fn iowr<T>(ty: u64, nr: u64) -> u64 {
    ioc(3, ty, nr, std::mem::size_of::<T>())
}

const KVM_TYPE: u64 = 0xAE;
const UFFD_TYPE: u64 = 0xAA;

/// KVM ioctls a vCPU thread makes on its own vCPU: run, save and restore.
pub const KVM_VCPU_IOCTLS: &[(&str, u64)] = {
    use kvm_bindings::*;
    &[
        ("KVM_RUN", io(KVM_TYPE, 0x80)),
        ("KVM_GET_REGS", ior::<kvm_regs>(KVM_TYPE, 0x81)),
        ("KVM_SET_REGS", iow::<kvm_regs>(KVM_TYPE, 0x82)),
        ("KVM_GET_SREGS", ior::<kvm_sregs>(KVM_TYPE, 0x83)),
        ("KVM_SET_SREGS", iow::<kvm_sregs>(KVM_TYPE, 0x84)),
        ("KVM_GET_MSRS", iowr::<kvm_msrs>(KVM_TYPE, 0x88)),
        ("KVM_SET_MSRS", iow::<kvm_msrs>(KVM_TYPE, 0x89)),
        ("KVM_GET_FPU", ior::<kvm_fpu>(KVM_TYPE, 0x8c)),
        ("KVM_SET_FPU", iow::<kvm_fpu>(KVM_TYPE, 0x8d)),
        ("KVM_GET_LAPIC", ior::<kvm_lapic_state>(KVM_TYPE, 0x8e)),
        ("KVM_SET_LAPIC", iow::<kvm_lapic_state>(KVM_TYPE, 0x8f)),
        ("KVM_SET_CPUID2", iow::<kvm_cpuid2>(KVM_TYPE, 0x90)),
        ("KVM_GET_CPUID2", iowr::<kvm_cpuid2>(KVM_TYPE, 0x91)),
        ("KVM_GET_MP_STATE", ior::<kvm_mp_state>(KVM_TYPE, 0x98)),
        ("KVM_SET_MP_STATE", iow::<kvm_mp_state>(KVM_TYPE, 0x99)),
        (
            "KVM_GET_VCPU_EVENTS",
            ior::<kvm_vcpu_events>(KVM_TYPE, 0x9f),
        ),
        (
            "KVM_SET_VCPU_EVENTS",
            iow::<kvm_vcpu_events>(KVM_TYPE, 0xa0),
        ),
        ("KVM_GET_DEBUGREGS", ior::<kvm_debugregs>(KVM_TYPE, 0xa1)),
        ("KVM_SET_DEBUGREGS", iow::<kvm_debugregs>(KVM_TYPE, 0xa2)),
        ("KVM_SET_TSC_KHZ", io(KVM_TYPE, 0xa2)),
        ("KVM_GET_TSC_KHZ", io(KVM_TYPE, 0xa3)),
        ("KVM_GET_XSAVE", ior::<kvm_xsave>(KVM_TYPE, 0xa4)),
        ("KVM_SET_XSAVE", iow::<kvm_xsave>(KVM_TYPE, 0xa5)),
        ("KVM_GET_XCRS", ior::<kvm_xcrs>(KVM_TYPE, 0xa6)),
        ("KVM_SET_XCRS", iow::<kvm_xcrs>(KVM_TYPE, 0xa7)),
        ("KVM_KVMCLOCK_CTRL", io(KVM_TYPE, 0xad)),
    ]
};

/// KVM ioctls on /dev/kvm and the VM that the VMM thread makes to build,
/// snapshot and restore a VM.
pub const KVM_VM_IOCTLS: &[(&str, u64)] = {
    use kvm_bindings::*;
    &[
        ("KVM_GET_API_VERSION", io(KVM_TYPE, 0x00)),
        ("KVM_CREATE_VM", io(KVM_TYPE, 0x01)),
        (
            "KVM_GET_MSR_INDEX_LIST",
            iowr::<kvm_msr_list>(KVM_TYPE, 0x02),
        ),
        ("KVM_CHECK_EXTENSION", io(KVM_TYPE, 0x03)),
        ("KVM_GET_VCPU_MMAP_SIZE", io(KVM_TYPE, 0x04)),
        (
            "KVM_GET_SUPPORTED_CPUID",
            iowr::<kvm_cpuid2>(KVM_TYPE, 0x05),
        ),
        ("KVM_CREATE_VCPU", io(KVM_TYPE, 0x41)),
        ("KVM_GET_DIRTY_LOG", iow::<kvm_dirty_log>(KVM_TYPE, 0x42)),
        (
            "KVM_SET_USER_MEMORY_REGION",
            iow::<kvm_userspace_memory_region>(KVM_TYPE, 0x46),
        ),
        ("KVM_SET_TSS_ADDR", io(KVM_TYPE, 0x47)),
        ("KVM_CREATE_IRQCHIP", io(KVM_TYPE, 0x60)),
        ("KVM_GET_IRQCHIP", iowr::<kvm_irqchip>(KVM_TYPE, 0x62)),
        ("KVM_SET_IRQCHIP", ior::<kvm_irqchip>(KVM_TYPE, 0x63)),
        ("KVM_IRQFD", iow::<kvm_irqfd>(KVM_TYPE, 0x76)),
        ("KVM_CREATE_PIT2", iow::<kvm_pit_config>(KVM_TYPE, 0x77)),
        ("KVM_IOEVENTFD", iow::<kvm_ioeventfd>(KVM_TYPE, 0x79)),
        ("KVM_SET_CLOCK", iow::<kvm_clock_data>(KVM_TYPE, 0x7b)),
        ("KVM_GET_CLOCK", ior::<kvm_clock_data>(KVM_TYPE, 0x7c)),
        ("KVM_GET_PIT2", ior::<kvm_pit_state2>(KVM_TYPE, 0x9f)),
        ("KVM_SET_PIT2", iow::<kvm_pit_state2>(KVM_TYPE, 0xa0)),
    ]
};

/// Everything else the VMM thread asks of ioctl: the tap (/dev/net/tun),
/// userfaultfd (snapshot restore, post-copy), and what std and glibc do
/// with sockets and terminals.
pub const OTHER_VMM_IOCTLS: &[(&str, u64)] = {
    use crate::snapshot::uffd::sys::*;
    &[
        ("TUNSETIFF", 0x4004_54ca),
        ("TUNSETOFFLOAD", 0x4004_54d0),
        ("TUNSETVNETHDRSZ", 0x4004_54d8),
        // if_nametoindex(3), before the tap is opened.
        ("SIOCGIFINDEX", 0x8933),
        ("USERFAULTFD_IOC_NEW", io(UFFD_TYPE, 0x00)),
        ("UFFDIO_API", iowr::<UffdioApi>(UFFD_TYPE, 0x3F)),
        ("UFFDIO_REGISTER", iowr::<UffdioRegister>(UFFD_TYPE, 0x00)),
        ("UFFDIO_UNREGISTER", ior::<UffdioRange>(UFFD_TYPE, 0x01)),
        ("UFFDIO_WAKE", ior::<UffdioRange>(UFFD_TYPE, 0x02)),
        ("UFFDIO_COPY", iowr::<UffdioCopy>(UFFD_TYPE, 0x03)),
        ("UFFDIO_ZEROPAGE", iowr::<UffdioZeropage>(UFFD_TYPE, 0x04)),
        ("FIONBIO", 0x5421),
        ("FIOCLEX", 0x5451),
        ("TCGETS", 0x5401),
    ]
};

/// What `ember-uffd-handler` asks of the VMM's userfaultfd: copy a page
/// in, zero one, wake the threads waiting on a range already filled.
pub const UFFD_HANDLER_IOCTLS: &[(&str, u64)] = {
    use crate::snapshot::uffd::sys::*;
    &[
        ("UFFDIO_COPY", iowr::<UffdioCopy>(UFFD_TYPE, 0x03)),
        ("UFFDIO_ZEROPAGE", iowr::<UffdioZeropage>(UFFD_TYPE, 0x04)),
        ("UFFDIO_WAKE", ior::<UffdioRange>(UFFD_TYPE, 0x02)),
    ]
};

/// Socket and terminal ioctls std and tokio make on the API thread.
pub const API_IOCTLS: &[(&str, u64)] =
    &[("FIONBIO", 0x5421), ("FIOCLEX", 0x5451), ("TCGETS", 0x5401)];

/// The tap's offloads are set when the guest driver activates the
/// network device, on the vCPU that wrote its status.
pub const VCPU_OTHER_IOCTLS: &[(&str, u64)] =
    &[("TUNSETOFFLOAD", 0x4004_54d0), ("FIONBIO", 0x5421)];

const fn numbers<const N: usize>(named: &[(&str, u64)]) -> [u64; N] {
    let mut out = [0u64; N];
    let mut i = 0;
    while i < N {
        out[i] = named[i].1;
        i += 1;
    }
    out
}

const fn concat<const N: usize>(parts: &[&[(&str, u64)]]) -> [u64; N] {
    let mut out = [0u64; N];
    let mut n = 0;
    let mut p = 0;
    while p < parts.len() {
        let mut i = 0;
        while i < parts[p].len() {
            out[n] = parts[p][i].1;
            n += 1;
            i += 1;
        }
        p += 1;
    }
    assert!(n == N, "ioctl list length");
    out
}

const VMM_IOCTL_COUNT: usize = KVM_VCPU_IOCTLS.len() + KVM_VM_IOCTLS.len() + OTHER_VMM_IOCTLS.len();
static VMM_IOCTL_NUMBERS: [u64; VMM_IOCTL_COUNT] =
    concat(&[KVM_VCPU_IOCTLS, KVM_VM_IOCTLS, OTHER_VMM_IOCTLS]);
const VCPU_IOCTL_COUNT: usize = KVM_VCPU_IOCTLS.len() + VCPU_OTHER_IOCTLS.len();
static VCPU_IOCTL_NUMBERS: [u64; VCPU_IOCTL_COUNT] = concat(&[KVM_VCPU_IOCTLS, VCPU_OTHER_IOCTLS]);
static API_IOCTL_NUMBERS: [u64; API_IOCTLS.len()] = numbers(API_IOCTLS);
static UFFD_HANDLER_IOCTL_NUMBERS: [u64; UFFD_HANDLER_IOCTLS.len()] = numbers(UFFD_HANDLER_IOCTLS);

/// glibc's pthread_create: CLONE_VM | CLONE_FS | CLONE_FILES |
/// CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM | CLONE_SETTLS |
/// CLONE_PARENT_SETTID | CLONE_CHILD_CLEARTID, no exit signal.
pub const THREAD_CLONE_FLAGS: u64 = 0x3d_0f00;

/// prctl options in use: thread names (std), no_new_privs (installing a
/// vCPU's filter), naming guest memory (PR_SET_VMA).
const PR_SET_VMA: u64 = 0x5356_4d41;
const VMM_PRCTL: &[u64] = &[
    libc::PR_SET_NAME as u64,
    libc::PR_SET_NO_NEW_PRIVS as u64,
    PR_SET_VMA,
];
const VCPU_PRCTL: &[u64] = &[libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64];
const UNIX_ONLY: &[u64] = &[libc::AF_UNIX as u64];
const UNIX_AND_INET: &[u64] = &[
    libc::AF_UNIX as u64,
    libc::AF_INET as u64,
    libc::AF_INET6 as u64,
];
const USERFAULTFD_FLAGS: &[u64] = &[(libc::O_CLOEXEC | libc::O_NONBLOCK) as u64];
const SECCOMP_SET_MODE_FILTER: &[u64] = &[libc::SECCOMP_SET_MODE_FILTER as u64];
const NO_EXEC: Rule = Rule::NoBits(2, libc::PROT_EXEC as u64);

/// What every Rust thread needs: memory (never executable), locks,
/// signals, time, exit, logs.
const COMMON: &[(libc::c_long, Rule)] = &[
    (libc::SYS_read, Rule::Any),
    (libc::SYS_readv, Rule::Any),
    (libc::SYS_write, Rule::Any),
    (libc::SYS_writev, Rule::Any),
    (libc::SYS_close, Rule::Any),
    (libc::SYS_futex, Rule::Any),
    (libc::SYS_mmap, NO_EXEC),
    (libc::SYS_munmap, Rule::Any),
    (libc::SYS_mprotect, NO_EXEC),
    (libc::SYS_madvise, Rule::Any),
    (libc::SYS_mremap, Rule::Any),
    (libc::SYS_brk, Rule::Any),
    (libc::SYS_rt_sigreturn, Rule::Any),
    (libc::SYS_rt_sigprocmask, Rule::Any),
    (libc::SYS_sigaltstack, Rule::Any),
    (libc::SYS_exit, Rule::Any),
    (libc::SYS_exit_group, Rule::Any),
    (libc::SYS_clock_gettime, Rule::Any),
    (libc::SYS_clock_nanosleep, Rule::Any),
    (libc::SYS_nanosleep, Rule::Any),
    (libc::SYS_sched_yield, Rule::Any),
    (libc::SYS_getrandom, Rule::Any),
    (libc::SYS_gettid, Rule::Any),
    (libc::SYS_getpid, Rule::Any),
    (libc::SYS_fcntl, Rule::Any),
    (libc::SYS_fstat, Rule::Any),
    (libc::SYS_newfstatat, Rule::Any),
    (libc::SYS_statx, Rule::Any),
    (libc::SYS_lseek, Rule::Any),
];

/// The VMM thread builds the VM at InstanceStart (opens files and
/// /dev/kvm, maps memory, starts vCPU threads) and runs devices; the
/// threads it starts (NBD, migration, post-copy, fill) share its filter.
const VMM: &[(libc::c_long, Rule)] = &[
    (libc::SYS_ioctl, Rule::OneOf(1, &VMM_IOCTL_NUMBERS)),
    (libc::SYS_openat, Rule::Any),
    (libc::SYS_pread64, Rule::Any),
    (libc::SYS_pwrite64, Rule::Any),
    (libc::SYS_preadv, Rule::Any),
    (libc::SYS_pwritev, Rule::Any),
    (libc::SYS_fsync, Rule::Any),
    (libc::SYS_fdatasync, Rule::Any),
    (libc::SYS_fallocate, Rule::Any),
    (libc::SYS_ftruncate, Rule::Any),
    (libc::SYS_unlink, Rule::Any),
    (libc::SYS_unlinkat, Rule::Any),
    (libc::SYS_rename, Rule::Any),
    (libc::SYS_renameat, Rule::Any),
    (libc::SYS_epoll_create1, Rule::Any),
    (libc::SYS_epoll_ctl, Rule::Any),
    (libc::SYS_epoll_wait, Rule::Any),
    (libc::SYS_epoll_pwait, Rule::Any),
    (libc::SYS_eventfd2, Rule::Any),
    (libc::SYS_timerfd_create, Rule::Any),
    (libc::SYS_timerfd_settime, Rule::Any),
    (libc::SYS_timerfd_gettime, Rule::Any),
    (libc::SYS_socket, Rule::SocketDomain),
    (libc::SYS_bind, Rule::Any),
    (libc::SYS_listen, Rule::Any),
    (libc::SYS_accept4, Rule::Any),
    (libc::SYS_connect, Rule::Any),
    (libc::SYS_shutdown, Rule::Any),
    (libc::SYS_sendto, Rule::Any),
    (libc::SYS_recvfrom, Rule::Any),
    (libc::SYS_sendmsg, Rule::Any),
    (libc::SYS_recvmsg, Rule::Any),
    (libc::SYS_getsockopt, Rule::Any),
    (libc::SYS_setsockopt, Rule::Any),
    (libc::SYS_getsockname, Rule::Any),
    (libc::SYS_dup, Rule::Any),
    (libc::SYS_dup3, Rule::Any),
    (libc::SYS_memfd_create, Rule::Any),
    // Uffd-backed snapshot restore and post-copy migration (falls back
    // to /dev/userfaultfd where the syscall is not allowed to this uid).
    (libc::SYS_userfaultfd, Rule::OneOf(0, USERFAULTFD_FLAGS)),
    // Starting and stopping threads.
    (libc::SYS_clone, Rule::Eq64(0, THREAD_CLONE_FLAGS)),
    (libc::SYS_clone3, Rule::Errno(libc::ENOSYS as u32)),
    (libc::SYS_set_robust_list, Rule::Any),
    (libc::SYS_rseq, Rule::Any),
    (libc::SYS_prctl, Rule::OneOf(0, VMM_PRCTL)),
    (libc::SYS_seccomp, Rule::OneOf(0, SECCOMP_SET_MODE_FILTER)),
    (libc::SYS_sched_getaffinity, Rule::Any),
    (libc::SYS_rt_sigaction, Rule::Any),
    // Kicking vCPU threads out of KVM_RUN.
    (libc::SYS_tgkill, Rule::ThisProcess(0)),
    (libc::SYS_getcwd, Rule::Any),
    (libc::SYS_readlink, Rule::Any),
    (libc::SYS_uname, Rule::Any),
    (libc::SYS_sysinfo, Rule::Any),
    // The working set's fault count (GET /snapshot/working-set).
    (libc::SYS_getrusage, Rule::Any),
    (libc::SYS_poll, Rule::Any),
    (libc::SYS_ppoll, Rule::Any),
];

/// The API thread: accepts and serves HTTP on its socket and talks to the
/// VMM thread through a channel and an eventfd.
const API: &[(libc::c_long, Rule)] = &[
    (libc::SYS_ioctl, Rule::OneOf(1, &API_IOCTL_NUMBERS)),
    (libc::SYS_accept4, Rule::Any),
    (libc::SYS_recvfrom, Rule::Any),
    (libc::SYS_sendto, Rule::Any),
    (libc::SYS_recvmsg, Rule::Any),
    (libc::SYS_sendmsg, Rule::Any),
    (libc::SYS_shutdown, Rule::Any),
    (libc::SYS_epoll_create1, Rule::Any),
    (libc::SYS_epoll_ctl, Rule::Any),
    (libc::SYS_epoll_wait, Rule::Any),
    (libc::SYS_epoll_pwait, Rule::Any),
    (libc::SYS_eventfd2, Rule::Any),
    (libc::SYS_poll, Rule::Any),
    (libc::SYS_ppoll, Rule::Any),
    (libc::SYS_getsockopt, Rule::Any),
    (libc::SYS_setsockopt, Rule::Any),
    (libc::SYS_unlink, Rule::Any),
    // tokio's signal driver (built in when another workspace member turns
    // on tokio's `signal` feature) makes a socket pair when the runtime
    // starts; it only yields two connected unix sockets.
    (libc::SYS_socketpair, Rule::OneOf(0, UNIX_ONLY)),
    (libc::SYS_rt_sigaction, Rule::Any),
];

/// vCPU threads: KVM_RUN, bus accesses to devices, and the kick signal.
const VCPU: &[(libc::c_long, Rule)] = &[
    (libc::SYS_ioctl, Rule::OneOf(1, &VCPU_IOCTL_NUMBERS)),
    (libc::SYS_tgkill, Rule::ThisProcess(0)),
    (libc::SYS_fsync, Rule::Any),
    (libc::SYS_fdatasync, Rule::Any),
    // A vhost-user device is activated and reset by the driver's Status
    // writes, on the vCPU: those requests go to the backend's socket.
    (libc::SYS_sendmsg, Rule::Any),
    (libc::SYS_recvmsg, Rule::Any),
    // Setting the thread's name and installing this filter.
    (libc::SYS_prctl, Rule::OneOf(0, VCPU_PRCTL)),
    (libc::SYS_seccomp, Rule::OneOf(0, SECCOMP_SET_MODE_FILTER)),
];

/// `ember-uffd-handler` once set up: waits on the userfaultfd and the
/// VMM's socket, reads events (and stray bytes from the VMM), fills pages.
const UFFD_HANDLER: &[(libc::c_long, Rule)] = &[
    (libc::SYS_ioctl, Rule::OneOf(1, &UFFD_HANDLER_IOCTL_NUMBERS)),
    (libc::SYS_poll, Rule::Any),
    (libc::SYS_ppoll, Rule::Any),
    (libc::SYS_recvfrom, Rule::Any),
];

/// The one table: every syscall a kind of thread may make, with its rule
/// (the filter of that kind alone; a vCPU thread also runs under the
/// VMM's, see [`verdict`]).
pub fn table(kind: ThreadKind) -> Vec<(libc::c_long, Rule)> {
    let extra = match kind {
        ThreadKind::Vmm => VMM,
        ThreadKind::Api => API,
        ThreadKind::Vcpu => VCPU,
        ThreadKind::UffdHandler => UFFD_HANDLER,
    };
    COMMON.iter().chain(extra).copied().collect()
}

/// Lets `socket` make AF_INET and AF_INET6 sockets on the VMM's threads
/// (`--allow-inet`: migrating over `tcp://`, `nbd://` drives). Call before
/// the filters are installed.
pub fn allow_inet(on: bool) {
    INET.store(on, Ordering::SeqCst);
}

/// Why this VMM cannot open TCP connections (filters on, without
/// [`allow_inet`]): a clear error instead of a seccomp kill.
pub fn inet_refused() -> Option<std::io::Error> {
    (ENABLED.load(Ordering::SeqCst) && !INET.load(Ordering::SeqCst)).then(|| {
        std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "this VMM's seccomp filter allows unix sockets only (start it with --allow-inet for TCP)",
        )
    })
}

fn this_process() -> u64 {
    // SAFETY: getpid has no preconditions.
    (unsafe { libc::getpid() }) as u64
}

fn rule_matches(rule: Rule, args: &[u64; 6]) -> Verdict {
    let low = |i: u8| args[i as usize] & 0xffff_ffff;
    let ok = match rule {
        Rule::Any => true,
        Rule::OneOf(i, values) => values.contains(&low(i)),
        Rule::Eq64(i, v) => args[i as usize] == v,
        Rule::NoBits(i, mask) => low(i) & mask == 0,
        Rule::ThisProcess(i) => low(i) == this_process(),
        Rule::SocketDomain => socket_domains().contains(&low(0)),
        Rule::Errno(e) => return Verdict::Errno(e),
    };
    if ok {
        Verdict::Allow
    } else {
        Verdict::Kill
    }
}

fn socket_domains() -> &'static [u64] {
    if INET.load(Ordering::SeqCst) {
        UNIX_AND_INET
    } else {
        UNIX_ONLY
    }
}

/// What the filters of a `kind` thread do with syscall `nr` and `args`,
/// read from [`table`] (for vCPU threads: the VMM's filter and their own).
pub fn verdict(kind: ThreadKind, nr: libc::c_long, args: &[u64; 6]) -> Verdict {
    let mut out = Verdict::Allow;
    for k in kind.stack() {
        let v = match table(*k).iter().find(|(n, _)| *n == nr) {
            None => Verdict::Kill,
            Some((_, rule)) => rule_matches(*rule, args),
        };
        out = match (out, v) {
            (Verdict::Kill, _) | (_, Verdict::Kill) => Verdict::Kill,
            (Verdict::Errno(e), _) | (_, Verdict::Errno(e)) => Verdict::Errno(e),
            _ => Verdict::Allow,
        };
    }
    out
}

fn cond(arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, v: u64) -> Result<SeccompRule, String> {
    SeccompCondition::new(arg, len, op, v)
        .and_then(|c| SeccompRule::new(vec![c]))
        .map_err(|e| e.to_string())
}

/// Compiles the filters of a kind of thread (its own, without the VMM's
/// under a vCPU's): the main one, whose rules come from [`table`], and one
/// for the calls refused with an errno.
pub fn filters(kind: ThreadKind) -> Result<Vec<BpfProgram>, String> {
    use SeccompCmpArgLen::{Dword, Qword};
    let mut main: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut errno: BTreeMap<u32, BTreeMap<i64, Vec<SeccompRule>>> = BTreeMap::new();
    for (nr, rule) in table(kind) {
        let rules = match rule {
            Rule::Any => vec![],
            Rule::OneOf(i, values) => values
                .iter()
                .map(|v| cond(i, Dword, SeccompCmpOp::Eq, *v))
                .collect::<Result<_, _>>()?,
            Rule::Eq64(i, v) => vec![cond(i, Qword, SeccompCmpOp::Eq, v)?],
            Rule::NoBits(i, mask) => vec![cond(i, Dword, SeccompCmpOp::MaskedEq(mask), 0)?],
            Rule::ThisProcess(i) => vec![cond(i, Dword, SeccompCmpOp::Eq, this_process())?],
            Rule::SocketDomain => socket_domains()
                .iter()
                .map(|v| cond(0, Dword, SeccompCmpOp::Eq, *v))
                .collect::<Result<_, _>>()?,
            Rule::Errno(e) => {
                // Allowed by the main filter; the errno filter answers.
                errno.entry(e).or_default().insert(nr, vec![]);
                vec![]
            }
        };
        if main.insert(nr, rules).is_some() {
            return Err(format!("syscall {nr} is twice in the {kind:?} table"));
        }
    }
    let compile = |rules, mismatch, matched| {
        SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
            .and_then(BpfProgram::try_from)
            .map_err(|e| format!("seccomp filter for {kind:?}: {e}"))
    };
    let mut out = vec![compile(main, SeccompAction::Trap, SeccompAction::Allow)?];
    for (e, rules) in errno {
        out.push(compile(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(e),
        )?);
    }
    Ok(out)
}

/// Turns filtering on (or off, for debugging) for threads that apply it
/// after this call.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::SeqCst);
    if on {
        install_sigsys_handler();
    }
}

fn apply_filters(kind: ThreadKind) -> Result<(), String> {
    filters(kind).and_then(|progs| {
        progs.iter().try_for_each(|bpf| {
            seccompiler::apply_filter(bpf).map_err(|e| format!("cannot apply seccomp filter: {e}"))
        })
    })
}

/// Installs this thread's filter if filtering is on. A thread that cannot
/// be confined is a fatal error: running unfiltered silently is worse.
pub fn apply_for_current_thread(kind: ThreadKind) {
    if !ENABLED.load(Ordering::SeqCst) {
        return;
    }
    if let Err(e) = apply_filters(kind) {
        log::error!("{e}");
        std::process::exit(1);
    }
}

/// Confines a program other than the VMM (`ember-uffd-handler`, kind
/// [`ThreadKind::UffdHandler`]) now: the SIGSYS handler (violations are
/// logged and exit 148), then the filters. The caller must not go on
/// unconfined after an error.
pub fn confine_current_thread(kind: ThreadKind) -> Result<(), String> {
    if kind == ThreadKind::UffdHandler {
        PROGRAM.store(1, Ordering::SeqCst);
    }
    install_sigsys_handler();
    apply_filters(kind)
}

/// Appends `v` in decimal (or hex) to `buf` at `*len`.
fn put_num(buf: &mut [u8], len: &mut usize, v: u64, hex: bool) {
    let base = if hex { 16 } else { 10 };
    let mut digits = [0u8; 20];
    let mut n = v;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[(n % base) as usize];
        n /= base;
        if n == 0 || i == 0 {
            break;
        }
    }
    if hex {
        put(buf, len, b"0x");
    }
    put(buf, len, &digits[i..]);
}

fn put(buf: &mut [u8], len: &mut usize, s: &[u8]) {
    let n = s.len().min(buf.len() - *len);
    buf[*len..*len + n].copy_from_slice(&s[..n]);
    *len += n;
}

extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // Only async-signal-safe work here: format into a stack buffer, write(2), _exit(2).
    let mut nr: i64 = -1;
    if !info.is_null() {
        // SAFETY: the kernel passes a valid siginfo for SIGSYS; for
        // SYS_SECCOMP, the int at offset 24 (after si_signo, si_errno,
        // si_code and padding, call_addr) is the syscall number.
        nr = i64::from(unsafe { *((info as *const u8).add(24) as *const i32) });
    }
    let mut args = [0u64; 3];
    if !ctx.is_null() {
        // SAFETY: an SA_SIGINFO handler's third argument is the interrupted
        // context (a ucontext_t); its saved registers hold the syscall's
        // first arguments (rdi, rsi, rdx on x86_64).
        let gregs = unsafe { &(*(ctx as *const libc::ucontext_t)).uc_mcontext.gregs };
        args = [
            gregs[libc::REG_RDI as usize] as u64,
            gregs[libc::REG_RSI as usize] as u64,
            gregs[libc::REG_RDX as usize] as u64,
        ];
    }
    let mut buf = [0u8; 160];
    let mut len = 0;
    let program: &[u8] = match PROGRAM.load(Ordering::Relaxed) {
        1 => b"ember-uffd-handler",
        _ => b"ember-vmm",
    };
    put(&mut buf, &mut len, program);
    put(&mut buf, &mut len, b": seccomp violation: syscall ");
    if nr < 0 {
        put(&mut buf, &mut len, b"-");
    }
    put_num(&mut buf, &mut len, nr.unsigned_abs(), false);
    put(&mut buf, &mut len, b" blocked (args ");
    for (i, a) in args.iter().enumerate() {
        if i > 0 {
            put(&mut buf, &mut len, b", ");
        }
        put_num(&mut buf, &mut len, *a, true);
    }
    put(&mut buf, &mut len, b", ...); exiting\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer lives
    // on this stack frame.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(SECCOMP_VIOLATION_EXIT);
    }
}

fn install_sigsys_handler() {
    if let Err(e) = vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, sigsys_handler) {
        log::error!("cannot install the SIGSYS handler: {e}");
    }
}

/// A call that a compromised VMM would make to get out, and that the
/// filters of `kinds` must end the process for.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    pub name: &'static str,
    pub nr: libc::c_long,
    /// The arguments (computed in the thread that makes the call).
    pub args: fn() -> [u64; 6],
    pub kinds: &'static [ThreadKind],
}

const ALL_KINDS: &[ThreadKind] = &ThreadKind::ALL;
const NOT_VMM: &[ThreadKind] = &[ThreadKind::Api, ThreadKind::Vcpu, ThreadKind::UffdHandler];

fn zero() -> [u64; 6] {
    [0; 6]
}

fn another_process() -> [u64; 6] {
    // Signal 0 only checks: harmless if ever allowed.
    [this_process() + 1, this_process() + 1, 0, 0, 0, 0]
}

fn rw_page() -> u64 {
    // SAFETY: an anonymous private mapping; nothing else refers to it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    p as u64
}

macro_rules! attempt {
    ($name:expr, $nr:expr, $kinds:expr, $args:expr) => {
        Attempt {
            name: $name,
            nr: $nr,
            args: $args,
            kinds: $kinds,
        }
    };
    ($name:expr, $nr:expr, $kinds:expr) => {
        attempt!($name, $nr, $kinds, zero)
    };
}

const NS: u64 = (libc::CLONE_NEWUSER | libc::CLONE_NEWNET) as u64;
const SIGCHLD: u64 = libc::SIGCHLD as u64;

/// Escapes and kernel attack paths, refused on every kind of thread (and
/// a few calls refused only on the narrower kinds).
pub const FORBIDDEN: &[Attempt] = &[
    attempt!(
        "unshare(NEWUSER|NEWNET)",
        libc::SYS_unshare,
        ALL_KINDS,
        || [NS, 0, 0, 0, 0, 0]
    ),
    attempt!("setns", libc::SYS_setns, ALL_KINDS),
    attempt!("mount", libc::SYS_mount, ALL_KINDS),
    attempt!("umount2", libc::SYS_umount2, ALL_KINDS),
    attempt!("pivot_root", libc::SYS_pivot_root, ALL_KINDS),
    attempt!("chroot", libc::SYS_chroot, ALL_KINDS),
    attempt!("ptrace(ATTACH)", libc::SYS_ptrace, ALL_KINDS, || {
        [libc::PTRACE_ATTACH as u64, this_process() + 1, 0, 0, 0, 0]
    }),
    attempt!("process_vm_writev", libc::SYS_process_vm_writev, ALL_KINDS),
    attempt!("bpf", libc::SYS_bpf, ALL_KINDS),
    attempt!("perf_event_open", libc::SYS_perf_event_open, ALL_KINDS),
    attempt!("keyctl", libc::SYS_keyctl, ALL_KINDS),
    attempt!("add_key", libc::SYS_add_key, ALL_KINDS),
    attempt!("io_uring_setup", libc::SYS_io_uring_setup, ALL_KINDS),
    attempt!("userfaultfd(0)", libc::SYS_userfaultfd, ALL_KINDS),
    attempt!("clone(fork)", libc::SYS_clone, ALL_KINDS, || [
        SIGCHLD, 0, 0, 0, 0, 0
    ]),
    attempt!("clone(NEWUSER|NEWNET)", libc::SYS_clone, ALL_KINDS, || {
        [NS | SIGCHLD, 0, 0, 0, 0, 0]
    }),
    attempt!("clone(thread|NEWUSER)", libc::SYS_clone, ALL_KINDS, || {
        [
            THREAD_CLONE_FLAGS | libc::CLONE_NEWUSER as u64,
            0,
            0,
            0,
            0,
            0,
        ]
    }),
    attempt!("fork", libc::SYS_fork, ALL_KINDS),
    attempt!("vfork", libc::SYS_vfork, ALL_KINDS),
    attempt!("execve", libc::SYS_execve, ALL_KINDS),
    attempt!("execveat", libc::SYS_execveat, ALL_KINDS),
    attempt!("socket(AF_INET)", libc::SYS_socket, ALL_KINDS, || {
        [libc::AF_INET as u64, libc::SOCK_STREAM as u64, 0, 0, 0, 0]
    }),
    attempt!("socket(AF_INET6)", libc::SYS_socket, ALL_KINDS, || {
        [libc::AF_INET6 as u64, libc::SOCK_DGRAM as u64, 0, 0, 0, 0]
    }),
    attempt!("socket(AF_NETLINK)", libc::SYS_socket, ALL_KINDS, || {
        [libc::AF_NETLINK as u64, libc::SOCK_RAW as u64, 0, 0, 0, 0]
    }),
    attempt!("socket(AF_PACKET)", libc::SYS_socket, ALL_KINDS, || {
        [libc::AF_PACKET as u64, libc::SOCK_RAW as u64, 0, 0, 0, 0]
    }),
    attempt!("socket(AF_UNIX)", libc::SYS_socket, NOT_VMM, || {
        [libc::AF_UNIX as u64, libc::SOCK_STREAM as u64, 0, 0, 0, 0]
    }),
    attempt!("ioctl(TIOCSTI)", libc::SYS_ioctl, ALL_KINDS, || [
        0, 0x5412, 0, 0, 0, 0
    ]),
    attempt!("ioctl(SIOCSIFFLAGS)", libc::SYS_ioctl, ALL_KINDS, || [
        0, 0x8914, 0, 0, 0, 0
    ]),
    attempt!("ioctl(KVM_CREATE_VM)", libc::SYS_ioctl, NOT_VMM, || [
        0,
        io(KVM_TYPE, 0x01),
        0,
        0,
        0,
        0
    ]),
    attempt!("ioctl(TUNSETIFF)", libc::SYS_ioctl, NOT_VMM, || [
        0,
        0x4004_54ca,
        0,
        0,
        0,
        0
    ]),
    attempt!("prctl(SET_DUMPABLE)", libc::SYS_prctl, ALL_KINDS, || {
        [libc::PR_SET_DUMPABLE as u64, 1, 0, 0, 0, 0]
    }),
    attempt!("prctl(CAP_AMBIENT)", libc::SYS_prctl, ALL_KINDS, || {
        [libc::PR_CAP_AMBIENT as u64, 0, 0, 0, 0, 0]
    }),
    attempt!("prctl(SET_PTRACER)", libc::SYS_prctl, ALL_KINDS, || {
        [libc::PR_SET_PTRACER as u64, u64::MAX, 0, 0, 0, 0]
    }),
    attempt!(
        "tgkill(another process)",
        libc::SYS_tgkill,
        ALL_KINDS,
        another_process
    ),
    attempt!("kill", libc::SYS_kill, ALL_KINDS, another_process),
    attempt!("tkill", libc::SYS_tkill, ALL_KINDS, another_process),
    attempt!("mmap(PROT_EXEC)", libc::SYS_mmap, ALL_KINDS, || {
        let anon = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
        let prot = (libc::PROT_READ | libc::PROT_EXEC) as u64;
        [0, 4096, prot, anon, u64::MAX, 0]
    }),
    attempt!("mprotect(PROT_EXEC)", libc::SYS_mprotect, ALL_KINDS, || {
        [
            rw_page(),
            4096,
            (libc::PROT_READ | libc::PROT_EXEC) as u64,
            0,
            0,
            0,
        ]
    }),
    attempt!("pkey_mprotect", libc::SYS_pkey_mprotect, ALL_KINDS),
    attempt!("setuid", libc::SYS_setuid, ALL_KINDS),
    attempt!("capset", libc::SYS_capset, ALL_KINDS),
    attempt!("init_module", libc::SYS_init_module, ALL_KINDS),
    attempt!("finit_module", libc::SYS_finit_module, ALL_KINDS),
    attempt!("kexec_load", libc::SYS_kexec_load, ALL_KINDS),
    attempt!("open_by_handle_at", libc::SYS_open_by_handle_at, ALL_KINDS),
    attempt!("clone3", libc::SYS_clone3, NOT_VMM),
    attempt!("clone(thread)", libc::SYS_clone, NOT_VMM, || [
        THREAD_CLONE_FLAGS,
        0,
        0,
        0,
        0,
        0
    ]),
    attempt!("ioctl(UFFDIO_REGISTER)", libc::SYS_ioctl, NOT_VMM, || {
        use crate::snapshot::uffd::sys::*;
        [0, iowr::<UffdioRegister>(UFFD_TYPE, 0x00), 0, 0, 0, 0]
    }),
    attempt!(
        "ioctl(FIONBIO)",
        libc::SYS_ioctl,
        &[ThreadKind::UffdHandler],
        || [0, 0x5421, 0, 0, 0, 0]
    ),
    attempt!("openat", libc::SYS_openat, NOT_VMM),
    attempt!("connect", libc::SYS_connect, NOT_VMM),
    attempt!("memfd_create", libc::SYS_memfd_create, NOT_VMM),
];

/// Calls a kind may make with these arguments (the other side of the
/// rules above), and clone3, answered with ENOSYS.
pub const PERMITTED: &[Attempt] = &[
    attempt!(
        "socket(AF_UNIX)",
        libc::SYS_socket,
        &[ThreadKind::Vmm],
        || { [libc::AF_UNIX as u64, libc::SOCK_STREAM as u64, 0, 0, 0, 0] }
    ),
    attempt!(
        "tgkill(this process, signal 0)",
        libc::SYS_tgkill,
        &[ThreadKind::Vmm, ThreadKind::Vcpu],
        || {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() } as u64;
            [this_process(), tid, 0, 0, 0, 0]
        }
    ),
    attempt!(
        "mmap(PROT_READ|PROT_WRITE)",
        libc::SYS_mmap,
        ALL_KINDS,
        || {
            let anon = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
            let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
            [0, 4096, prot, anon, u64::MAX, 0]
        }
    ),
    attempt!(
        "prctl(SET_NAME)",
        libc::SYS_prctl,
        &[ThreadKind::Vmm, ThreadKind::Vcpu],
        || {
            [
                libc::PR_SET_NAME as u64,
                c"ember-test".as_ptr() as u64,
                0,
                0,
                0,
                0,
            ]
        }
    ),
    attempt!("clone3", libc::SYS_clone3, &[ThreadKind::Vmm]),
];

/// `ember-vmm --seccomp-self-test KIND:CALL`: installs the filters a
/// `kind` thread runs under, as the VMM does (a vCPU thread is started by
/// a thread under the VMM's filter), makes the call named `call` from
/// [`FORBIDDEN`] or [`PERMITTED`], and prints what it returned. A refused
/// call ends the process through the SIGSYS handler instead.
pub fn self_test(spec: &str) -> Result<String, String> {
    let (kind, call) = spec
        .split_once(':')
        .ok_or_else(|| format!("{spec:?}: want KIND:CALL"))?;
    let kind =
        ThreadKind::from_name(kind).ok_or_else(|| format!("unknown thread kind {kind:?}"))?;
    let a = attempt_named(call)?;
    if kind == ThreadKind::UffdHandler {
        return Err("the uffd-handler filter is tried in ember-uffd-handler itself".into());
    }
    enable(true);
    let run = move || {
        apply_for_current_thread(kind);
        make_call(a, kind)
    };
    let thread = |f: Box<dyn FnOnce() -> String + Send>| {
        std::thread::Builder::new()
            .name(format!("ember_{}", kind.name()))
            .spawn(f)
            .map_err(|e| format!("spawn: {e}"))?
            .join()
            .map_err(|_| "the test thread panicked".to_string())
    };
    match kind {
        ThreadKind::Vmm | ThreadKind::UffdHandler => Ok(run()),
        ThreadKind::Api => thread(Box::new(run)),
        ThreadKind::Vcpu => {
            apply_for_current_thread(ThreadKind::Vmm);
            thread(Box::new(run))
        }
    }
}

fn attempt_named(call: &str) -> Result<Attempt, String> {
    FORBIDDEN
        .iter()
        .chain(PERMITTED)
        .find(|a| a.name == call)
        .copied()
        .ok_or_else(|| format!("unknown call {call:?}"))
}

/// Makes the call `a` on this thread, under whatever filter it runs.
fn make_call(a: Attempt, kind: ThreadKind) -> String {
    let args = (a.args)();
    // SAFETY: a raw syscall with plain integer arguments (null or
    // invalid pointers fail with EFAULT); a fork-like clone that is
    // let through leaves its child, which only exits.
    let r = unsafe { libc::syscall(a.nr, args[0], args[1], args[2], args[3], args[4], args[5]) };
    if r == 0 && matches!(a.nr, libc::SYS_clone | libc::SYS_fork | libc::SYS_vfork) && args[1] == 0
    {
        // SAFETY: the child of a fork-like call leaves at once.
        unsafe { libc::_exit(0) };
    }
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    format!(
        "{} on a {} thread: returned {r} (errno {errno})",
        a.name,
        kind.name()
    )
}

/// `ember-uffd-handler --seccomp-self-test CALL`: once the handler has
/// confined itself ([`confine_current_thread`]), makes the call `call`
/// from [`FORBIDDEN`] or [`PERMITTED`] on its thread and says what it
/// returned (a refused call ends the process instead).
pub fn uffd_handler_self_test(call: &str) -> Result<String, String> {
    Ok(make_call(attempt_named(call)?, ThreadKind::UffdHandler))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_and_differ() {
        for k in ThreadKind::ALL {
            let f = filters(k).unwrap();
            assert!(!f.is_empty() && !f[0].is_empty());
        }
        let has = |k, nr| table(k).iter().any(|(n, _)| *n == nr);
        assert!(has(ThreadKind::Vmm, libc::SYS_openat));
        assert!(!has(ThreadKind::Vcpu, libc::SYS_openat));
        assert!(!has(ThreadKind::Api, libc::SYS_clone));
    }

    #[test]
    fn every_forbidden_call_is_refused_by_the_table() {
        for a in FORBIDDEN {
            for k in a.kinds {
                let v = verdict(*k, a.nr, &(a.args)());
                assert_eq!(v, Verdict::Kill, "{} on {k:?}", a.name);
            }
        }
        for a in PERMITTED {
            for k in a.kinds {
                let v = verdict(*k, a.nr, &(a.args)());
                let want = if a.nr == libc::SYS_clone3 {
                    Verdict::Errno(libc::ENOSYS as u32)
                } else {
                    Verdict::Allow
                };
                assert_eq!(v, want, "{} on {k:?}", a.name);
            }
        }
        // Thread creation passes; the vCPU filter stacks on the VMM's.
        let thread = [THREAD_CLONE_FLAGS, 0, 0, 0, 0, 0];
        assert_eq!(
            verdict(ThreadKind::Vmm, libc::SYS_clone, &thread),
            Verdict::Allow
        );
        assert_eq!(
            verdict(ThreadKind::Vcpu, libc::SYS_clone, &thread),
            Verdict::Kill
        );
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // A few checked against linux/kvm.h values.
        let kvm: std::collections::HashMap<_, _> = KVM_VCPU_IOCTLS
            .iter()
            .chain(KVM_VM_IOCTLS)
            .copied()
            .collect();
        assert_eq!(kvm["KVM_RUN"], 0xae80);
        assert_eq!(kvm["KVM_CREATE_VM"], 0xae01);
        assert_eq!(kvm["KVM_GET_REGS"], 0x8090_ae81);
        assert_eq!(kvm["KVM_SET_SREGS"], 0x4138_ae84);
        assert_eq!(kvm["KVM_SET_USER_MEMORY_REGION"], 0x4020_ae46);
        assert_eq!(kvm["KVM_IRQFD"], 0x4020_ae76);
        assert_eq!(kvm["KVM_GET_XSAVE"], 0x9000_aea4);
        assert_eq!(kvm["KVM_SET_LAPIC"], 0x4400_ae8f);
    }

    #[test]
    fn violation_kills_the_process_with_a_log_line() {
        // Run in a child process so the test harness survives.
        if std::env::var_os("EMBER_SECCOMP_CHILD").is_some() {
            enable(true);
            apply_for_current_thread(ThreadKind::Vcpu);
            // openat is not allowed on a vCPU thread.
            let _ = std::fs::File::open("/dev/null");
            std::process::exit(0);
        }
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "seccomp::tests::violation_kills_the_process_with_a_log_line",
                "--nocapture",
            ])
            .env("EMBER_SECCOMP_CHILD", "1")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(SECCOMP_VIOLATION_EXIT), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("syscall {} blocked", libc::SYS_openat)),
            "{stderr}"
        );
    }
}
