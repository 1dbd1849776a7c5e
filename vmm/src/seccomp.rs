//! Seccomp filters, one per kind of thread, each allowing what that thread
//! needs. A syscall outside the filter raises SIGSYS; the handler logs the
//! syscall number on stderr and ends the process (exit code 148, as
//! Firecracker does), so a violation is never silent.
//!
//! Threads inherit their creator's filter: the API thread is started
//! before the VMM thread installs its own, and vCPU threads (started by the
//! VMM thread) stack their narrower filter on the VMM's. An NBD drive's I/O
//! threads (started by the VMM thread when it opens the drive) keep the
//! VMM's filter: they connect, read and write sockets, wait on futexes and
//! start the next connection's reply reader (clone3), all in `VMM`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Exit code after a seccomp violation.
pub const SECCOMP_VIOLATION_EXIT: i32 = 148;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    Vmm,
    Api,
    Vcpu,
}

/// What every Rust thread needs: memory, locks, signals, time, exit, logs.
const COMMON: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_ioctl,
];

/// The VMM thread builds the VM at InstanceStart (opens files and
/// /dev/kvm, maps memory, starts vCPU threads) and runs devices.
const VMM: &[libc::c_long] = &[
    libc::SYS_openat,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_socket,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_shutdown,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_memfd_create,
    // Uffd-backed snapshot restore.
    libc::SYS_userfaultfd,
    // Starting and stopping vCPU threads.
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_seccomp,
    libc::SYS_sched_getaffinity,
    libc::SYS_rt_sigaction,
    libc::SYS_tgkill,
    libc::SYS_getcwd,
    libc::SYS_readlink,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// The API thread: accepts and serves HTTP on its socket and talks to the
/// VMM thread through a channel and an eventfd.
const API: &[libc::c_long] = &[
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_unlink,
    // tokio's signal driver (built in when another workspace member turns
    // on tokio's `signal` feature) makes a socket pair when the runtime
    // starts; it only yields two connected unix sockets.
    libc::SYS_socketpair,
    libc::SYS_rt_sigaction,
];

/// vCPU threads: KVM_RUN, bus accesses to devices, and the kick signal.
const VCPU: &[libc::c_long] = &[
    libc::SYS_tgkill,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    // A vhost-user device is activated and reset by the driver's Status
    // writes, on the vCPU: those requests go to the backend's socket.
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
];

fn syscalls(kind: ThreadKind) -> Vec<libc::c_long> {
    let extra = match kind {
        ThreadKind::Vmm => VMM,
        ThreadKind::Api => API,
        ThreadKind::Vcpu => VCPU,
    };
    COMMON.iter().chain(extra).copied().collect()
}

/// Compiles the filter for a kind of thread.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, String> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> =
        syscalls(kind).into_iter().map(|s| (s, vec![])).collect();
    let f = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| format!("seccomp filter for {kind:?}: {e}"))?;
    BpfProgram::try_from(f).map_err(|e| format!("seccomp filter for {kind:?}: {e}"))
}

/// Turns filtering on (or off, for debugging) for threads that apply it
/// after this call.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::SeqCst);
    if on {
        install_sigsys_handler();
    }
}

/// Installs this thread's filter if filtering is on. A thread that cannot
/// be confined is a fatal error: running unfiltered silently is worse.
pub fn apply_for_current_thread(kind: ThreadKind) {
    if !ENABLED.load(Ordering::SeqCst) {
        return;
    }
    let r = filter(kind).and_then(|bpf| {
        seccompiler::apply_filter(&bpf).map_err(|e| format!("cannot apply seccomp filter: {e}"))
    });
    if let Err(e) = r {
        log::error!("{e}");
        std::process::exit(1);
    }
}

extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work here: format into a stack buffer, write(2), _exit(2).
    let mut nr: i64 = -1;
    if !info.is_null() {
        // SAFETY: the kernel passes a valid siginfo for SIGSYS; for
        // SYS_SECCOMP, the int at offset 24 (after si_signo, si_errno,
        // si_code and padding, call_addr) is the syscall number.
        nr = i64::from(unsafe { *((info as *const u8).add(24) as *const i32) });
    }
    let mut digits = [0u8; 20];
    let mut n = nr.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    let prefix: &[u8] = if nr < 0 {
        b"ember-vmm: seccomp violation: syscall -"
    } else {
        b"ember-vmm: seccomp violation: syscall "
    };
    let suffix: &[u8] = b" blocked; exiting\n";
    let mut buf = [0u8; 96];
    let mut len = 0;
    for part in [prefix, &digits[i..], suffix] {
        buf[len..len + part.len()].copy_from_slice(part);
        len += part.len();
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_and_differ() {
        for k in [ThreadKind::Vmm, ThreadKind::Api, ThreadKind::Vcpu] {
            assert!(!filter(k).unwrap().is_empty());
        }
        assert!(syscalls(ThreadKind::Vmm).contains(&libc::SYS_openat));
        assert!(!syscalls(ThreadKind::Vcpu).contains(&libc::SYS_openat));
        assert!(!syscalls(ThreadKind::Api).contains(&libc::SYS_clone));
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
