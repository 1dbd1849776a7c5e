//! Assembles a running microVM from its configured resources: memory, the
//! KVM VM, the kernel and command line, devices, then the vCPUs.

use std::fs::File;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::IoEventAddress;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{elf::Elf, load_cmdline, KernelLoader};
use vm_memory::{Address, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::{boot, layout, mptable, nested};
use crate::devices::bus::Bus;
use crate::devices::legacy::{
    self, serial::SerialOut, I8042State, SerialConsole, SerialConsoleState, I8042,
};
pub use crate::devices::persist::VirtioDeviceHandle;
use crate::devices::persist::{restore_virtio, RestoreOverrides};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::net::Net;
use crate::devices::virtio::vhost_user_block::VhostUserBlock;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{MmioTransport, MMIO_LEN, NOTIFY_REG_OFFSET};
use crate::snapshot::{self, MicrovmState};
use crate::vmm::{VmState, Vmm};
use crate::vmm_config::machine_config::{HugePages, MemoryBacking};
use crate::vmm_config::snapshot::{LoadHugePages, MemBackendType};
use crate::vmm_config::{BlockDeviceConfig, LoadSnapshotParams, VmResources};
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::vcpu::{Vcpu, VmExitNotifier};
use crate::vstate::{memory, vm::Vm};

pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;
pub type EventMgr = EventManager<Subscriber>;

/// Firecracker's defaults, plus the serial console (a microVM without
/// `boot_args` should still say what it is doing).
pub const DEFAULT_BOOT_ARGS: &str =
    "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.dumbkbd";

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no boot source: PUT /boot-source first")]
    NoBootSource,
    #[error("invalid machine configuration: {0}")]
    MachineConfig(String),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Vm(#[from] crate::vstate::vm::VmError),
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    #[error("cannot open kernel image {path}: {err}")]
    KernelOpen { path: String, err: std::io::Error },
    #[error("cannot load kernel image {path}: {err}")]
    KernelLoad {
        path: String,
        err: linux_loader::loader::Error,
    },
    #[error("cannot open initrd {path}: {err}")]
    Initrd { path: String, err: String },
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    #[error("boot parameters: {0}")]
    Boot(#[from] boot::BootError),
    #[error("MP table: {0}")]
    MpTable(#[from] mptable::MpTableError),
    #[error("device set-up: {0}")]
    Device(String),
    #[error("event loop: {0}")]
    EventLoop(String),
}

fn dev_err(e: impl std::fmt::Display) -> StartError {
    StartError::Device(e.to_string())
}

/// Builds the VM described by `res` and starts its vCPUs.
pub fn build_and_boot(
    res: &VmResources,
    em: &mut EventMgr,
    exit: VmExitNotifier,
    serial_out: SerialOut,
) -> Result<Vmm, StartError> {
    let boot_src = res.boot_source.as_ref().ok_or(StartError::NoBootSource)?;
    let mc = &res.machine_config;
    mc.validate().map_err(StartError::MachineConfig)?;

    // A vhost-user backend maps guest memory itself: it must be shareable.
    let backing = if res.drives.iter().any(|d| d.socket.is_some()) {
        MemoryBacking::Memfd
    } else {
        mc.memory_backing
    };
    let layout = crate::arch::x86_64::layout::arch_memory_regions((mc.mem_size_mib as u64) << 20);
    let mem = memory::create_regions(&layout, mc.huge_pages, backing)?;
    let vm = Vm::new()?;
    vm.register_memory(&mem, mc.track_dirty_pages)?;
    vm.setup_irqchip()?;

    let entry = load_kernel(&mem, &boot_src.kernel_image_path)?;
    let initrd = match &boot_src.initrd_path {
        Some(p) => Some(load_initrd(&mem, p)?),
        None => None,
    };

    let mut cmdline =
        Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(|e| StartError::Cmdline(e.to_string()))?;
    let cmd = |e: linux_loader::cmdline::Error| StartError::Cmdline(e.to_string());
    cmdline
        .insert_str(boot_src.boot_args.as_deref().unwrap_or(DEFAULT_BOOT_ARGS))
        .map_err(cmd)?;

    let (pio, serial, i8042) = legacy_devices(&vm, &exit, serial_out, None)?;
    let mut mmio = Bus::new();
    let virtio = attach_virtio_devices(res, &vm, &mem, &mut mmio, em, &mut cmdline)?;

    let mut vcpus = Vec::new();
    for i in 0..mc.vcpu_count {
        let mut vcpu = Vcpu::new(i, &vm, pio.clone(), mmio.clone(), exit.clone())?;
        vcpu.configure_for_boot(&vm, &mem, entry, mc.vcpu_count)?;
        vcpus.push(vcpu);
    }
    if nested::is_pvm_host() {
        log::info!("nested kvm_pvm host detected: adding guest boot arguments it needs");
        let tsc_khz = vcpus.first().and_then(|v| v.fd().get_tsc_khz().ok());
        cmdline
            .insert_str(nested::pvm_boot_args(tsc_khz))
            .map_err(cmd)?;
    }

    load_cmdline(&mem, GuestAddress(layout::CMDLINE_START), &cmdline)
        .map_err(|e| StartError::Cmdline(e.to_string()))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|e| StartError::Cmdline(e.to_string()))?
        .as_bytes_with_nul()
        .len();
    boot::configure_boot_params(
        &mem,
        GuestAddress(layout::CMDLINE_START),
        cmdline_len,
        initrd,
    )?;
    mptable::setup_mptable(&mem, mc.vcpu_count)?;

    let mut handles = Vec::new();
    for vcpu in vcpus {
        handles.push(vcpu.start(false)?);
    }
    log::info!(
        "microVM started: {} vCPU, {} MiB, cmdline {:?}",
        mc.vcpu_count,
        mc.mem_size_mib,
        cmdline
            .as_cstring()
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    Ok(Vmm::new(
        vm,
        mem,
        handles,
        exit,
        serial,
        i8042,
        virtio,
        res.clone(),
        VmState::Running,
    ))
}

fn load_kernel(mem: &GuestMemoryMmap, path: &str) -> Result<GuestAddress, StartError> {
    let mut f = File::open(path).map_err(|err| StartError::KernelOpen {
        path: path.into(),
        err,
    })?;
    let res =
        Elf::load(mem, None, &mut f, Some(GuestAddress(layout::HIMEM_START))).map_err(|err| {
            StartError::KernelLoad {
                path: path.into(),
                err,
            }
        })?;
    Ok(res.kernel_load)
}

/// Places the initrd page-aligned at the top of low RAM.
fn load_initrd(mem: &GuestMemoryMmap, path: &str) -> Result<(GuestAddress, usize), StartError> {
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
    let err = |e: String| StartError::Initrd {
        path: path.into(),
        err: e,
    };
    let mut f = File::open(path).map_err(|e| err(e.to_string()))?;
    let size = f.metadata().map_err(|e| err(e.to_string()))?.len() as usize;
    let first = mem
        .iter()
        .next()
        .ok_or_else(|| err("no guest memory".into()))?;
    let top = first.start_addr().raw_value() + first.len();
    let addr = top
        .checked_sub(size as u64)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= layout::HIMEM_START)
        .ok_or_else(|| err(format!("{size} bytes do not fit in guest memory")))?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size)
        .map_err(|e| err(e.to_string()))?;
    Ok((GuestAddress(addr), size))
}

type LegacyDevices = (Bus, Arc<Mutex<SerialConsole>>, Arc<Mutex<I8042>>);

/// The serial console and i8042 on the port I/O bus: new, or restored from
/// their saved state.
fn legacy_devices(
    vm: &Vm,
    exit: &VmExitNotifier,
    out: SerialOut,
    saved: Option<(&SerialConsoleState, &I8042State)>,
) -> Result<LegacyDevices, StartError> {
    let irqfd = |gsi: u32| -> Result<EventFd, StartError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(dev_err)?;
        vm.fd().register_irqfd(&evt, gsi).map_err(dev_err)?;
        Ok(evt)
    };
    let serial_irq = irqfd(legacy::SERIAL_IRQ)?;
    let i8042_irq = irqfd(legacy::I8042_IRQ)?;
    let reset = exit.evt().try_clone().map_err(dev_err)?;
    let (serial, i8042) = match saved {
        None => (
            SerialConsole::new(serial_irq, out),
            I8042::new(i8042_irq, reset),
        ),
        Some((s, k)) => (
            SerialConsole::restore(serial_irq, out, s)
                .map_err(|e| dev_err(format!("serial: {e}")))?,
            I8042::restore(i8042_irq, reset, k).map_err(|e| dev_err(format!("i8042: {e}")))?,
        ),
    };
    let serial = Arc::new(Mutex::new(serial));
    let i8042 = Arc::new(Mutex::new(i8042));
    let mut pio = Bus::new();
    pio.insert(
        serial.clone(),
        legacy::SERIAL_PORT_BASE,
        legacy::SERIAL_PORT_LEN,
    )
    .map_err(dev_err)?;
    pio.insert(
        i8042.clone(),
        legacy::I8042_PORT_BASE,
        legacy::I8042_PORT_LEN,
    )
    .map_err(dev_err)?;
    Ok((pio, serial, i8042))
}

/// Where the next virtio-mmio device goes: its MMIO window and GSI.
pub fn mmio_slot(index: usize) -> Option<(u64, u32)> {
    let irq = layout::IRQ_BASE + index as u32;
    (irq <= layout::IRQ_MAX).then(|| (layout::MMIO_MEM_START + index as u64 * MMIO_LEN, irq))
}

/// The virtio devices of a VM in MMIO slot order, kept for runtime control
/// and snapshots.
#[derive(Default)]
pub struct VirtioDevices {
    pub slots: Vec<(VirtioDeviceHandle, Arc<Mutex<MmioTransport>>)>,
}

impl VirtioDevices {
    pub fn vsock(&self) -> Option<&Arc<Mutex<Vsock>>> {
        self.slots.iter().find_map(|(d, _)| match d {
            VirtioDeviceHandle::Vsock(v) => Some(v),
            _ => None,
        })
    }

    pub fn block(&self, drive_id: &str) -> Option<&Arc<Mutex<Block>>> {
        self.slots.iter().find_map(|(d, _)| match d {
            VirtioDeviceHandle::Block(b) if crate::devices::bus::lock(b).id() == drive_id => {
                Some(b)
            }
            _ => None,
        })
    }

    pub fn net(&self, iface_id: &str) -> Option<&Arc<Mutex<Net>>> {
        self.slots.iter().find_map(|(d, _)| match d {
            VirtioDeviceHandle::Net(n) if crate::devices::bus::lock(n).id() == iface_id => Some(n),
            _ => None,
        })
    }
}

/// Puts every configured drive (root first) and the vsock device on the
/// MMIO bus, wires their queue notifications and interrupts to KVM, and
/// tells the guest where they are on the command line.
fn attach_virtio_devices(
    res: &VmResources,
    vm: &Vm,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    em: &mut EventMgr,
    cmdline: &mut Cmdline,
) -> Result<VirtioDevices, StartError> {
    let mut devices = VirtioDevices::default();
    let mut drives: Vec<_> = res.drives.iter().collect();
    // The root device becomes /dev/vda.
    drives.sort_by_key(|d| !d.is_root_device);
    for cfg in drives {
        let (handle, device): (_, Arc<Mutex<dyn crate::devices::virtio::VirtioDevice>>) =
            if cfg.socket.is_some() {
                let dev = Arc::new(Mutex::new(VhostUserBlock::new(cfg).map_err(dev_err)?));
                (VirtioDeviceHandle::VhostUserBlock(dev.clone()), dev)
            } else {
                let dev = Arc::new(Mutex::new(
                    Block::new(cfg).map_err(|e| dev_err(format!("drive {}: {e}", cfg.drive_id)))?,
                ));
                (VirtioDeviceHandle::Block(dev.clone()), dev)
            };
        if cfg.is_root_device && !cmdline_has(cmdline, "root=") {
            let root = match &cfg.partuuid {
                Some(uuid) => format!("root=PARTUUID={uuid}"),
                None => "root=/dev/vda".to_string(),
            };
            cmdline
                .insert_str(root)
                .map_err(|e| StartError::Cmdline(e.to_string()))?;
            cmdline
                .insert_str(if cfg.is_read_only { "ro" } else { "rw" })
                .map_err(|e| StartError::Cmdline(e.to_string()))?;
        }
        let transport = MmioTransport::new(mem.clone(), device).map_err(dev_err)?;
        let subscriber = handle.subscriber();
        let slot = attach_transport(transport, subscriber, devices.slots.len(), vm, mmio, em)?;
        add_cmdline_device(cmdline, &slot)?;
        devices.slots.push((handle, slot.2));
    }
    if let Some(cfg) = &res.vsock {
        let vsock = Arc::new(Mutex::new(
            Vsock::new(cfg).map_err(|e| dev_err(format!("vsock: {e}")))?,
        ));
        let transport = MmioTransport::new(mem.clone(), vsock.clone()).map_err(dev_err)?;
        let slot = attach_transport(transport, vsock.clone(), devices.slots.len(), vm, mmio, em)?;
        add_cmdline_device(cmdline, &slot)?;
        devices
            .slots
            .push((VirtioDeviceHandle::Vsock(vsock), slot.2));
    }
    for cfg in &res.network_interfaces {
        let net = Arc::new(Mutex::new(Net::new(cfg).map_err(dev_err)?));
        let transport = MmioTransport::new(mem.clone(), net.clone()).map_err(dev_err)?;
        let slot = attach_transport(transport, net.clone(), devices.slots.len(), vm, mmio, em)?;
        add_cmdline_device(cmdline, &slot)?;
        devices.slots.push((VirtioDeviceHandle::Net(net), slot.2));
    }
    Ok(devices)
}

fn cmdline_has(cmdline: &Cmdline, key: &str) -> bool {
    cmdline
        .as_cstring()
        .map(|c| c.to_string_lossy().split(' ').any(|w| w.starts_with(key)))
        .unwrap_or(false)
}

/// An attached transport: MMIO base, GSI, and the transport itself.
type AttachedSlot = (u64, u32, Arc<Mutex<MmioTransport>>);

fn add_cmdline_device(cmdline: &mut Cmdline, slot: &AttachedSlot) -> Result<(), StartError> {
    cmdline
        .insert_str(format!("virtio_mmio.device=4K@{:#x}:{}", slot.0, slot.1))
        .map_err(|e| StartError::Cmdline(e.to_string()))
}

/// Wires a transport into MMIO slot `index`: queue ioeventfds, the irqfd,
/// the bus, and the device's events on the event loop.
fn attach_transport(
    transport: MmioTransport,
    subscriber: Subscriber,
    index: usize,
    vm: &Vm,
    mmio: &mut Bus,
    em: &mut EventMgr,
) -> Result<AttachedSlot, StartError> {
    let (base, gsi) = mmio_slot(index)
        .ok_or_else(|| dev_err(format!("too many virtio devices ({})", index + 1)))?;
    for (i, evt) in transport.queue_evts().into_iter().enumerate() {
        vm.fd()
            .register_ioevent(
                evt,
                &IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET),
                i as u32,
            )
            .map_err(|e| dev_err(format!("ioeventfd: {e}")))?;
    }
    vm.fd()
        .register_irqfd(transport.irq_evt(), gsi)
        .map_err(|e| dev_err(format!("irqfd: {e}")))?;
    let transport = Arc::new(Mutex::new(transport));
    mmio.insert(transport.clone(), base, MMIO_LEN)
        .map_err(dev_err)?;
    em.add_subscriber(subscriber);
    Ok((base, gsi, transport))
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Format(#[from] crate::snapshot::format::FormatError),
    #[error(transparent)]
    Memory(#[from] crate::snapshot::memory::MemoryFileError),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(transparent)]
    WorkingSet(#[from] snapshot::working_set::WorkingSetError),
}

/// Builds a microVM from a snapshot: guest memory from the memory file,
/// then the VM, devices and vCPUs each from their saved state, with the
/// per-clone overrides applied. Started paused unless `resume_vm`.
pub fn restore_from_snapshot(
    params: &LoadSnapshotParams,
    em: &mut EventMgr,
    exit: VmExitNotifier,
    serial_out: SerialOut,
) -> Result<Vmm, RestoreError> {
    let backend = params.backend().map_err(RestoreError::Invalid)?;
    let mut state: MicrovmState =
        snapshot::format::read(std::path::Path::new(&params.snapshot_path))?;
    // Before any memory is mapped for it.
    check_vcpu_states(&state)?;
    let backend_path = std::path::Path::new(&backend.backend_path);
    let vhost_user = state.resources.drives.iter().any(|d| d.socket.is_some());
    // What the restored VM's memory is made of: the snapshot's, unless the
    // load says otherwise. A memfd, of either page size, gets a copy of the
    // memory file; so does a VM whose vhost-user backends map its memory.
    let mc = &mut state.resources.machine_config;
    mc.huge_pages = LoadHugePages::resolve(params.huge_pages, mc.huge_pages);
    mc.memory_backing = params.memory_backing.unwrap_or(mc.memory_backing);
    mc.validate().map_err(RestoreError::Invalid)?;
    let hugetlb = mc.huge_pages == HugePages::Hugetlbfs2M;
    let copy_in = vhost_user || hugetlb || mc.memory_backing == MemoryBacking::Memfd;
    let ws_load = params.working_set.clone().unwrap_or_default();
    let mut ws = snapshot::working_set::Loaded {
        faults_at_load: snapshot::working_set::process_faults(),
        ..Default::default()
    };
    if ws_load.record || ws_load.prefetch_path.is_some() {
        if backend.backend_type != MemBackendType::File || copy_in {
            return Err(RestoreError::Invalid(
                "working_set needs the File memory backend mapping the file privately: \
                 anonymous 4 KiB or transparent pages and no vhost-user drive (with Uffd, \
                 the page-fault handler prefetches: ember-uffd-handler --working-set)"
                    .into(),
            ));
        }
        if ws_load.record && ws_load.prefetch_path.is_some() {
            return Err(RestoreError::Invalid(
                "working_set: record or prefetch_path, not both".into(),
            ));
        }
    }
    let (mem, uffd) = match backend.backend_type {
        MemBackendType::File if copy_in => (
            snapshot::memory::load_copy(backend_path, &state.memory, hugetlb)?,
            None,
        ),
        MemBackendType::Uffd if copy_in => {
            return Err(RestoreError::Invalid(
                "the Uffd memory backend serves anonymous 4 KiB memory only: not vhost-user \
                 drives (their memory must be shared), a memfd or 2M huge pages; use the \
                 File backend"
                    .into(),
            ))
        }
        MemBackendType::File if ws_load.record => {
            let (mem, rec) = snapshot::working_set::Recorder::start(backend_path, &state.memory)?;
            ws.recorder = Some(rec);
            (mem, None)
        }
        MemBackendType::File => {
            let mem = snapshot::memory::map_file(backend_path, &state.memory)?;
            ws.file_mapped = Some(state.memory.clone());
            if state.resources.machine_config.huge_pages == HugePages::Transparent {
                crate::vstate::memory::advise_huge_pages(&mem);
            }
            if let Some(p) = &ws_load.prefetch_path {
                let set = snapshot::working_set::WorkingSet::read(
                    std::path::Path::new(p),
                    state.memory.total_size(),
                )?;
                ws.prefetched = snapshot::working_set::prefetch(&mem, &state.memory, &set);
                log::info!(
                    "prefetched {} pages of the working set in {:.1} ms",
                    ws.prefetched.pages,
                    ws.prefetched.ms
                );
            }
            (mem, None)
        }
        MemBackendType::Uffd => {
            let (mem, uffd) = snapshot::uffd::create_uffd_memory(backend_path, &state.memory)
                .map_err(|e| RestoreError::Invalid(e.to_string()))?;
            (mem, Some(uffd))
        }
    };
    let mut vmm = restore_from_state(params, state, mem, uffd, em, exit, serial_out)?;
    vmm.set_working_set(ws);
    Ok(vmm)
}

fn check_vcpu_states(state: &MicrovmState) -> Result<(), RestoreError> {
    let n = state.resources.machine_config.vcpu_count;
    if state.vcpus.len() != usize::from(n) || state.vcpus.is_empty() {
        return Err(RestoreError::Invalid(format!(
            "snapshot has {} vCPU states for vcpu_count {n}",
            state.vcpus.len()
        )));
    }
    Ok(())
}

/// An override (in `list`) must name a `what` the snapshot has.
fn snapshot_has(found: bool, list: &str, what: &str, id: &str) -> Result<(), RestoreError> {
    if found {
        return Ok(());
    }
    Err(RestoreError::Invalid(format!(
        "{list}: the snapshot has no {what} {id:?}"
    )))
}

/// Builds a microVM from saved `state` and guest memory `mem` already
/// holding the guest's pages (mapped from a snapshot's memory file, served
/// by userfaultfd, or received in a migration), with the overrides of
/// `params`.
pub fn restore_from_state(
    params: &LoadSnapshotParams,
    state: MicrovmState,
    mem: GuestMemoryMmap,
    uffd: Option<snapshot::uffd::UffdBackend>,
    em: &mut EventMgr,
    exit: VmExitNotifier,
    serial_out: SerialOut,
) -> Result<Vmm, RestoreError> {
    check_vcpu_states(&state)?;
    let mc = &state.resources.machine_config;
    let vm = Vm::new().map_err(StartError::from)?;
    vm.register_memory(&mem, mc.track_dirty_pages || params.enable_diff_snapshots)
        .map_err(StartError::from)?;
    vm.setup_irqchip().map_err(StartError::from)?;
    state
        .vm
        .restore(vm.fd())
        .map_err(|e| RestoreError::Invalid(format!("VM state: {e}")))?;

    let (pio, serial, i8042) = legacy_devices(
        &vm,
        &exit,
        serial_out,
        Some((&state.devices.serial, &state.devices.i8042)),
    )?;

    let mut resources = state.resources.clone();
    // Dirty tracking is on for this VM (and its Diff snapshots) either way.
    resources.machine_config.track_dirty_pages |= params.enable_diff_snapshots;
    let mut mmio = Bus::new();
    let mut virtio = VirtioDevices::default();
    let overrides = RestoreOverrides {
        drive_paths: params
            .drive_overrides
            .iter()
            .map(|o| (o.drive_id.clone(), o.path_on_host.clone()))
            .collect(),
        vsock_uds_path: params.vsock_override.as_ref().map(|o| o.uds_path.clone()),
        net_tap_names: params
            .network_overrides
            .iter()
            .map(|o| (o.iface_id.clone(), o.host_dev_name.clone()))
            .collect(),
        vhost_user_sockets: params
            .vhost_user_overrides
            .iter()
            .map(|o| (o.drive_id.clone(), o.socket.clone()))
            .collect(),
        drive_fills: params
            .fill_overrides
            .iter()
            .map(|o| (o.drive_id.clone(), o.fill_from.clone()))
            .collect(),
    };
    for o in &params.fill_overrides {
        if let Err(e) = crate::vmm_config::drive::validate_fill_from(&o.fill_from, &o.drive_id) {
            return Err(RestoreError::Invalid(format!("fill_overrides: {e}")));
        }
        let file = |d: &BlockDeviceConfig| d.socket.is_none() && d.nbd_uri.is_none();
        snapshot_has(
            resources
                .drives
                .iter()
                .any(|d| d.drive_id == o.drive_id && file(d)),
            "fill_overrides",
            "file drive",
            &o.drive_id,
        )?;
    }
    for o in &params.vhost_user_overrides {
        snapshot_has(
            resources
                .drives
                .iter()
                .any(|d| d.drive_id == o.drive_id && d.socket.is_some()),
            "vhost_user_overrides",
            "vhost-user drive",
            &o.drive_id,
        )?;
    }
    for o in &params.network_overrides {
        snapshot_has(
            resources
                .network_interfaces
                .iter()
                .any(|n| n.iface_id == o.iface_id),
            "network_overrides",
            "network interface",
            &o.iface_id,
        )?;
    }
    for (index, slot) in state.devices.virtio.iter().enumerate() {
        let (handle, transport) = restore_virtio(&mem, index, slot, &overrides)
            .map_err(|e| RestoreError::Invalid(e.to_string()))?;
        let attached = attach_transport(transport, handle.subscriber(), index, &vm, &mut mmio, em)?;
        virtio.slots.push((handle, attached.2));
    }
    // The configuration reported by the API follows the overrides.
    for d in &mut resources.drives {
        if let Some(p) = overrides.drive_paths.get(&d.drive_id) {
            if d.nbd_uri.is_some() || crate::devices::virtio::block::is_nbd_uri(p) {
                d.nbd_uri = Some(p.clone());
            } else {
                d.path_on_host = p.clone();
            }
        }
        if let Some(s) = overrides.vhost_user_sockets.get(&d.drive_id) {
            d.socket = Some(s.clone());
        }
        if let Some(f) = overrides.drive_fills.get(&d.drive_id) {
            d.fill_from = Some(f.clone());
        }
    }
    for n in &mut resources.network_interfaces {
        if let Some(name) = overrides.net_tap_names.get(&n.iface_id) {
            n.host_dev_name = name.clone();
        }
    }
    if let (Some(p), Some(v)) = (&overrides.vsock_uds_path, resources.vsock.as_mut()) {
        v.uds_path = p.clone();
    }

    let mut vcpus = Vec::new();
    for vs in &state.vcpus {
        let mut vcpu = Vcpu::new(vs.index, &vm, pio.clone(), mmio.clone(), exit.clone())
            .map_err(StartError::from)?;
        vcpu.restore_state(vs).map_err(StartError::from)?;
        vcpus.push(vcpu);
    }
    let paused = !params.resume_vm;
    if uffd.as_ref().is_some_and(|u| u.handler_hung_up()) {
        return Err(RestoreError::Invalid(
            "the userfaultfd page-fault handler closed its connection before the VM started".into(),
        ));
    }
    // Only a VM that is restored gets its handler watched: a failed load
    // must leave the VMM as it was.
    if let Some(u) = &uffd {
        let watch = snapshot::uffd::HandlerWatch::new(u, exit.clone())
            .map_err(|e| RestoreError::Invalid(format!("page-fault handler socket: {e}")))?;
        em.add_subscriber(Arc::new(Mutex::new(watch)));
    }
    let mut handles = Vec::new();
    for vcpu in vcpus {
        handles.push(vcpu.start(paused).map_err(StartError::from)?);
    }
    log::info!(
        "microVM restored from {} ({} vCPU, {} MiB), {}",
        params.snapshot_path,
        mc.vcpu_count,
        mc.mem_size_mib,
        if paused { "paused" } else { "running" }
    );
    let mut vmm = Vmm::new(
        vm,
        mem,
        handles,
        exit,
        serial,
        i8042,
        virtio,
        resources,
        if paused {
            VmState::Paused
        } else {
            VmState::Running
        },
    );
    vmm.set_uffd_backend(uffd);
    Ok(vmm)
}
