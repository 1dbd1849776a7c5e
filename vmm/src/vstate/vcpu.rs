//! vCPUs: set-up for the boot protocol, and the run loop on a thread of its
//! own that routes I/O exits to the buses and answers pause/resume/exit.

use std::cell::Cell;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_lapic_state, kvm_run};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable};

use crate::arch::x86_64::{cpuid, msr, regs};
use crate::devices::bus::Bus;
use crate::metrics::METRICS;
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM_CREATE_VCPU {0} failed: {1}")]
    Create(u8, kvm_ioctls::Error),
    #[error("vCPU {0}: {1} failed: {2}")]
    Ioctl(u8, &'static str, kvm_ioctls::Error),
    #[error("vCPU {0}: KVM accepted {1} of {2} boot MSRs")]
    Msrs(u8, usize, usize),
    #[error("vCPU {0}: {1}")]
    Setup(u8, String),
    #[error("cannot start vCPU thread: {0}")]
    Spawn(std::io::Error),
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    #[error("vCPU {0} did not answer")]
    NoAnswer(u8),
}

/// How the VM ended, reported once through [`VmExitNotifier`].
pub const EXIT_OK: i32 = 0;
pub const EXIT_ERROR: i32 = 1;

/// Tells the VMM's event loop that the guest is gone (reboot, shutdown or a
/// fatal vCPU error). The first code written wins.
#[derive(Clone)]
pub struct VmExitNotifier {
    evt: Arc<EventFd>,
    code: Arc<AtomicI32>,
}

impl VmExitNotifier {
    pub fn new() -> std::io::Result<Self> {
        Ok(VmExitNotifier {
            evt: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
            code: Arc::new(AtomicI32::new(-1)),
        })
    }

    pub fn notify(&self, code: i32) {
        let _ = self
            .code
            .compare_exchange(-1, code, Ordering::SeqCst, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            log::error!("cannot signal VM exit: {e}");
        }
    }

    pub fn evt(&self) -> &EventFd {
        &self.evt
    }

    /// The exit code, once the VM has ended.
    pub fn code(&self) -> Option<i32> {
        let c = self.code.load(Ordering::SeqCst);
        (c >= 0).then_some(c)
    }
}

pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    pio: Bus,
    mmio: Bus,
    exit: VmExitNotifier,
}

/// LAPIC local vector table registers and delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b = |i: usize| l.regs[off + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, byte) in v.to_le_bytes().iter().enumerate() {
        l.regs[off + i] = *byte as _;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

impl Vcpu {
    pub fn new(
        index: u8,
        vm: &Vm,
        pio: Bus,
        mmio: Bus,
        exit: VmExitNotifier,
    ) -> Result<Vcpu, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|e| VcpuError::Create(index, e))?;
        Ok(Vcpu {
            index,
            fd,
            pio,
            mmio,
            exit,
        })
    }

    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    pub fn index(&self) -> u8 {
        self.index
    }

    /// Puts a saved state into this (fresh) vCPU.
    pub fn restore_state(&mut self, state: &VcpuState) -> Result<(), VcpuError> {
        state
            .restore(&self.fd)
            .map_err(|e| VcpuError::Setup(self.index, e.to_string()))
    }

    /// Sets CPUID, MSRs, registers, FPU and LAPIC for a fresh boot at `entry`.
    pub fn configure_for_boot(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        entry: GuestAddress,
        cpu_count: u8,
    ) -> Result<(), VcpuError> {
        let i = self.index;
        let ioctl = |name| move |e| VcpuError::Ioctl(i, name, e);
        let mut cpuid = vm.supported_cpuid().clone();
        cpuid::normalize(&mut cpuid, i, cpu_count);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(ioctl("KVM_SET_CPUID2"))?;

        let msrs = msr::boot_msrs();
        let set = self.fd.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
        if set != msrs.as_slice().len() {
            return Err(VcpuError::Msrs(i, set, msrs.as_slice().len()));
        }

        self.fd
            .set_regs(&regs::boot_regs(entry))
            .map_err(ioctl("KVM_SET_REGS"))?;
        let mut sregs = self.fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        regs::setup_sregs(mem, &mut sregs).map_err(|e| VcpuError::Setup(i, e.to_string()))?;
        self.fd.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(ioctl("KVM_SET_FPU"))?;

        let mut lapic = self.fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
        let lvt0 = with_delivery_mode(lapic_reg(&lapic, APIC_LVT0), APIC_MODE_EXTINT);
        let lvt1 = with_delivery_mode(lapic_reg(&lapic, APIC_LVT1), APIC_MODE_NMI);
        set_lapic_reg(&mut lapic, APIC_LVT0, lvt0);
        set_lapic_reg(&mut lapic, APIC_LVT1, lvt1);
        self.fd.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
        Ok(())
    }

    /// Starts the run loop on its own thread; `paused` starts it without
    /// entering the guest until a Resume.
    pub fn start(self, paused: bool) -> Result<VcpuHandle, VcpuError> {
        init_kick_signal()?;
        let index = self.index;
        let (req_tx, req_rx) = channel();
        let (resp_tx, resp_rx) = channel();
        let thread = std::thread::Builder::new()
            .name(format!("ember_vcpu{index}"))
            .spawn(move || self.run_thread(req_rx, resp_tx, paused))
            .map_err(VcpuError::Spawn)?;
        Ok(VcpuHandle {
            index,
            requests: req_tx,
            responses: resp_rx,
            thread: Some(thread),
        })
    }

    fn run_thread(
        mut self,
        requests: Receiver<VcpuRequest>,
        responses: Sender<VcpuResponse>,
        mut paused: bool,
    ) {
        crate::seccomp::apply_for_current_thread(crate::seccomp::ThreadKind::Vcpu);
        KICK_TARGET.with(|t| t.set(self.fd.get_kvm_run() as *mut kvm_run));
        loop {
            // Serve requests; while paused, block for them.
            loop {
                let req = if paused {
                    match requests.recv() {
                        Ok(r) => r,
                        Err(_) => return,
                    }
                } else {
                    match requests.try_recv() {
                        Ok(r) => r,
                        Err(std::sync::mpsc::TryRecvError::Empty) => break,
                        Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
                    }
                };
                match req {
                    VcpuRequest::Pause => {
                        paused = true;
                        if let Ok(r) = self.fd.get_regs() {
                            log::debug!("vCPU {} paused at rip={:#x}", self.index, r.rip);
                        }
                        let _ = responses.send(VcpuResponse::Paused);
                    }
                    VcpuRequest::Resume => {
                        paused = false;
                        let _ = responses.send(VcpuResponse::Resumed);
                    }
                    VcpuRequest::SaveState(msr_indices) => {
                        let r = if paused {
                            VcpuState::save(&self.fd, self.index, &msr_indices)
                                .map(Box::new)
                                .map_err(|e| e.to_string())
                        } else {
                            Err(format!("vCPU {} is not paused", self.index))
                        };
                        let _ = responses.send(VcpuResponse::State(r));
                    }
                    VcpuRequest::Exit => {
                        let _ = responses.send(VcpuResponse::Exited);
                        return;
                    }
                }
            }
            if !self.run_once() {
                // The guest is gone; wait to be told to exit.
                paused = true;
            }
        }
    }

    /// Runs the guest until its next exit; false when the VM has ended.
    fn run_once(&mut self) -> bool {
        match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    METRICS.vcpu.exit_io_in.inc();
                    if !self.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                    true
                }
                VcpuExit::IoOut(port, data) => {
                    METRICS.vcpu.exit_io_out.inc();
                    self.pio.write(u64::from(port), data);
                    true
                }
                VcpuExit::MmioRead(addr, data) => {
                    METRICS.vcpu.exit_mmio_read.inc();
                    if !self.mmio.read(addr, data) {
                        data.fill(0xff);
                    }
                    true
                }
                VcpuExit::MmioWrite(addr, data) => {
                    METRICS.vcpu.exit_mmio_write.inc();
                    self.mmio.write(addr, data);
                    true
                }
                VcpuExit::Hlt => {
                    METRICS.vcpu.exit_hlt.inc();
                    true
                }
                VcpuExit::Shutdown => {
                    METRICS.vcpu.exit_shutdown.inc();
                    log::info!(
                        "vCPU {}: guest shut down (triple fault or reset)",
                        self.index
                    );
                    self.exit.notify(EXIT_OK);
                    false
                }
                VcpuExit::SystemEvent(kind, _) => {
                    log::info!("vCPU {}: guest system event {kind}", self.index);
                    self.exit.notify(EXIT_OK);
                    false
                }
                VcpuExit::InternalError => {
                    METRICS.vcpu.exit_internal_error.inc();
                    self.fail(
                        "KVM internal error (KVM_EXIT_INTERNAL_ERROR, e.g. emulation failure)",
                    );
                    false
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    self.fail(&format!(
                        "KVM entry failed: reason {reason:#x} on host cpu {cpu}"
                    ));
                    false
                }
                other => {
                    METRICS.vcpu.exit_other.inc();
                    let what = format!("unexpected exit {other:?}");
                    self.fail(&what);
                    false
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                METRICS.vcpu.kicked.inc();
                true
            }
            Err(e) => {
                self.fail(&format!("KVM_RUN failed: {e}"));
                false
            }
        }
    }

    fn fail(&self, what: &str) {
        let regs = self
            .fd
            .get_regs()
            .map(|r| format!("rip={:#x} rsp={:#x} rflags={:#x}", r.rip, r.rsp, r.rflags))
            .unwrap_or_default();
        log::error!("vCPU {}: {what} {regs}", self.index);
        self.exit.notify(EXIT_ERROR);
    }
}

#[derive(Debug)]
enum VcpuRequest {
    Pause,
    Resume,
    /// Save the vCPU's state, reading these MSRs; only while paused.
    SaveState(Vec<u32>),
    Exit,
}

#[derive(Debug)]
enum VcpuResponse {
    Paused,
    Resumed,
    State(Result<Box<VcpuState>, String>),
    Exited,
}

impl PartialEq for VcpuResponse {
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }
}

/// The VMM thread's handle on a running vCPU thread.
pub struct VcpuHandle {
    index: u8,
    requests: Sender<VcpuRequest>,
    responses: Receiver<VcpuResponse>,
    thread: Option<JoinHandle<()>>,
}

const VCPU_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

impl VcpuHandle {
    fn send(&self, req: VcpuRequest, want: VcpuResponse) -> Result<(), VcpuError> {
        self.requests
            .send(req)
            .map_err(|_| VcpuError::NoAnswer(self.index))?;
        self.kick();
        match self.responses.recv_timeout(VCPU_ANSWER_TIMEOUT) {
            Ok(r) if r == want => Ok(()),
            Ok(_) | Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                Err(VcpuError::NoAnswer(self.index))
            }
        }
    }

    /// Returns once the vCPU is out of KVM_RUN and will stay out.
    pub fn pause(&self) -> Result<(), VcpuError> {
        self.send(VcpuRequest::Pause, VcpuResponse::Paused)
    }

    pub fn resume(&self) -> Result<(), VcpuError> {
        self.send(VcpuRequest::Resume, VcpuResponse::Resumed)
    }

    /// Saves the state of a paused vCPU.
    pub fn save_state(&self, msr_indices: &[u32]) -> Result<VcpuState, VcpuError> {
        self.requests
            .send(VcpuRequest::SaveState(msr_indices.to_vec()))
            .map_err(|_| VcpuError::NoAnswer(self.index))?;
        match self.responses.recv_timeout(VCPU_ANSWER_TIMEOUT) {
            Ok(VcpuResponse::State(Ok(s))) => Ok(*s),
            Ok(VcpuResponse::State(Err(e))) => Err(VcpuError::Setup(self.index, e)),
            _ => Err(VcpuError::NoAnswer(self.index)),
        }
    }

    /// Stops the thread and joins it.
    pub fn exit(mut self) -> Result<(), VcpuError> {
        let r = self.send(VcpuRequest::Exit, VcpuResponse::Exited);
        if r.is_ok() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
        r
    }

    /// Forces the vCPU out of KVM_RUN.
    fn kick(&self) {
        if let Some(t) = &self.thread {
            if let Err(e) = t.kill(vcpu_kick_signal()) {
                log::warn!("cannot kick vCPU {}: {e}", self.index);
            }
        }
    }
}

thread_local! {
    /// The kvm_run page of the vCPU owned by this thread, for the kick handler.
    static KICK_TARGET: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

fn vcpu_kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Setting immediate_exit closes the race where the signal lands just
    // before KVM_RUN: the next KVM_RUN then returns EINTR at once.
    let _ = KICK_TARGET.try_with(|t| {
        let run = t.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set
            // before the first KVM_RUN and valid for the thread's lifetime;
            // a byte store is async-signal-safe.
            unsafe { (*run).immediate_exit = 1 };
        }
    });
}

fn init_kick_signal() -> Result<(), VcpuError> {
    static INIT: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    INIT.get_or_init(|| {
        register_signal_handler(vcpu_kick_signal(), kick_handler).map_err(|e| e.errno())
    })
    .map_err(|errno| VcpuError::Signal(vmm_sys_util::errno::Error::new(errno)))
}
