//! Carries out API actions on the VMM thread. Before boot, actions edit the
//! VM's resources; after InstanceStart only runtime actions are accepted.

use crate::builder::{self, EventMgr};
use crate::devices::legacy::serial::SerialOut;
use crate::devices::virtio::net::Tap;
use crate::metrics::METRICS;
use crate::rpc_interface::{InstanceInfo, VmmAction, VmmActionError, VmmData, VmmResponse};
use crate::vmm::{SnapshotError, VmState, Vmm};
use crate::vmm_config::net::parse_mac;
use crate::vmm_config::{drive, VmResources};
use crate::vmm_config::{BlockDeviceUpdate, LoadSnapshotParams, NetworkInterfaceUpdate};
use crate::vstate::vcpu::VmExitNotifier;

/// Opens the serial console's output when the VM is built.
pub type SerialOutFactory = Box<dyn FnMut() -> std::io::Result<SerialOut> + Send>;

pub struct Controller {
    id: String,
    resources: VmResources,
    vmm: Option<Vmm>,
    exit: VmExitNotifier,
    serial_out: SerialOutFactory,
    /// How another thread of the VMM gets work done on this one.
    tasks: Option<crate::event_loop::TaskSender>,
    /// The last (or running) live migration, either way.
    migration: Option<crate::migration::Progress>,
    /// This VM was migrated away: the destination runs it now.
    migrated_away: bool,
}

fn not_allowed(what: &str) -> VmmActionError {
    VmmActionError::NotAllowed(format!(
        "{what} is not allowed after the microVM has started"
    ))
}

impl Controller {
    pub fn new(
        id: String,
        resources: VmResources,
        exit: VmExitNotifier,
        serial_out: SerialOutFactory,
    ) -> Self {
        Controller {
            id,
            resources,
            vmm: None,
            exit,
            serial_out,
            tasks: None,
            migration: None,
            migrated_away: false,
        }
    }

    pub fn vmm(&self) -> Option<&Vmm> {
        self.vmm.as_ref()
    }

    pub fn instance_info(&self) -> InstanceInfo {
        InstanceInfo {
            id: self.id.clone(),
            state: match self.vmm.as_ref().map(Vmm::state) {
                None => "Not started",
                Some(VmState::Running) => "Running",
                Some(VmState::Paused) => "Paused",
            }
            .to_string(),
            vmm_version: env!("CARGO_PKG_VERSION").to_string(),
            app_name: "ember".to_string(),
        }
    }

    pub fn handle(&mut self, action: VmmAction, em: &mut EventMgr) -> VmmResponse {
        METRICS.api.actions.inc();
        let r = self.dispatch(action, em);
        if r.is_err() {
            METRICS.api.action_errors.inc();
        }
        r
    }

    fn dispatch(&mut self, action: VmmAction, em: &mut EventMgr) -> VmmResponse {
        use VmmAction::*;
        match action {
            GetInstanceInfo => Ok(VmmData::InstanceInfo(self.instance_info())),
            GetMachineConfig => Ok(VmmData::MachineConfig(
                self.resources.machine_config.clone(),
            )),
            GetVmConfig => serde_json::to_value(&self.resources)
                .map(VmmData::Json)
                .map_err(|e| VmmActionError::Internal(e.to_string())),
            FlushMetrics => crate::metrics::flush()
                .map(|_| VmmData::Empty)
                .map_err(|e| VmmActionError::Internal(format!("cannot write metrics: {e}"))),
            PutMetrics(m) => crate::metrics::set_sink(&m.metrics_path)
                .map(|_| VmmData::Empty)
                .map_err(|e| {
                    VmmActionError::InvalidInput(format!("metrics_path {}: {e}", m.metrics_path))
                }),
            SendCtrlAltDel => match &self.vmm {
                Some(vmm) => {
                    vmm.send_ctrl_alt_del();
                    Ok(VmmData::Empty)
                }
                None => Err(VmmActionError::NotAllowed(
                    "SendCtrlAltDel needs a started microVM".into(),
                )),
            },
            CreateSnapshot(params) => {
                self.refuse_while_migrating("PUT /snapshot/create")?;
                let vmm = self.vmm.as_ref().ok_or_else(|| {
                    VmmActionError::NotAllowed("the microVM is not started".into())
                })?;
                vmm.create_snapshot(&params)
                    .map(|_| VmmData::Empty)
                    .map_err(|e| match e {
                        SnapshotError::NotPaused | SnapshotError::Unsupported(_) => {
                            VmmActionError::NotAllowed(e.to_string())
                        }
                        _ => VmmActionError::InvalidInput(format!("cannot create snapshot: {e}")),
                    })
            }
            LoadSnapshot(params) => {
                self.refuse_while_migrating("PUT /snapshot/load")?;
                self.load_snapshot(&params, em)
            }
            PatchNetworkInterface(update) => self.patch_net(&update),
            PatchDrive(update) => self.patch_drive(&update),
            Pause => self.set_paused(true),
            Resume => self.set_paused(false),
            SendMigration(params) => self.send_migration(&params),
            ReceiveMigration(params) => self.receive_migration(&params),
            GetMigration => serde_json::to_value(
                self.migration
                    .as_ref()
                    .map(|m| m.status())
                    .unwrap_or_default(),
            )
            .map(VmmData::Json)
            .map_err(|e| VmmActionError::Internal(e.to_string())),
            CancelMigration => self.cancel_migration(),
            GetDriveFill(id) => {
                let vmm = self.vmm.as_ref().ok_or_else(|| {
                    VmmActionError::NotAllowed("the microVM is not started".into())
                })?;
                let status = vmm
                    .drive_fill_status(&id)
                    .map_err(VmmActionError::InvalidInput)?;
                serde_json::to_value(status)
                    .map(VmmData::Json)
                    .map_err(|e| VmmActionError::Internal(e.to_string()))
            }
            GetWorkingSet => {
                let vmm = self.vmm.as_ref().ok_or_else(|| {
                    VmmActionError::NotAllowed("the microVM is not started".into())
                })?;
                serde_json::to_value(vmm.working_set_status())
                    .map(VmmData::Json)
                    .map_err(|e| VmmActionError::Internal(e.to_string()))
            }
            SaveWorkingSet(p) => {
                let vmm = self.vmm.as_ref().ok_or_else(|| {
                    VmmActionError::NotAllowed("the microVM is not started".into())
                })?;
                let pages = vmm
                    .save_working_set(std::path::Path::new(&p.working_set_path), p.pages)
                    .map_err(VmmActionError::InvalidInput)?;
                log::info!("saved a working set of {pages} pages to {}", p.working_set_path);
                Ok(VmmData::Empty)
            }
            SwitchOverMigration(p) => match &self.migration {
                Some(m) if m.switch_over(p.drive_overrides) => Ok(VmmData::Empty),
                _ => Err(VmmActionError::NotAllowed(
                    "no migration is waiting for a switch-over (send it with \"switch_over\": \"Manual\")"
                        .into(),
                )),
            },
            InstanceStart => {
                self.refuse_while_migrating("InstanceStart")?;
                self.start(em)
            }
            other => {
                self.refuse_while_migrating("configuration")?;
                self.configure(other)
            }
        }
    }

    fn set_paused(&mut self, paused: bool) -> VmmResponse {
        self.refuse_while_migrating("PATCH /vm")?;
        if self.migrated_away && !paused {
            return Err(VmmActionError::NotAllowed(
                "the microVM migrated to another VMM, which runs it now; it cannot resume here"
                    .into(),
            ));
        }
        let vmm = self
            .vmm
            .as_mut()
            .ok_or_else(|| VmmActionError::NotAllowed("the microVM is not started".into()))?;
        let r = if paused { vmm.pause() } else { vmm.resume() };
        r.map(|_| VmmData::Empty)
            .map_err(|e| VmmActionError::Internal(e.to_string()))
    }

    fn refuse_while_migrating(&self, what: &str) -> Result<(), VmmActionError> {
        match &self.migration {
            Some(m) if m.status().is_active() => Err(VmmActionError::NotAllowed(format!(
                "{what} is not allowed while a migration is in progress (GET /migrate)"
            ))),
            _ => Ok(()),
        }
    }

    pub(crate) fn set_task_sender(&mut self, tasks: crate::event_loop::TaskSender) {
        self.tasks = Some(tasks);
    }

    pub(crate) fn vmm_mut(&mut self) -> Option<&mut Vmm> {
        self.vmm.as_mut()
    }

    pub(crate) fn set_migrated_away(&mut self) {
        self.migrated_away = true;
    }

    /// Drops a VM received but never resumed; the VMM is unconfigured again.
    pub(crate) fn discard_vm(&mut self) {
        if self.vmm.take().is_some() {
            log::info!("dropped the VM of a failed incoming migration");
        }
        self.resources = VmResources::default();
    }

    fn tasks(&self) -> Result<crate::event_loop::TaskSender, VmmActionError> {
        self.tasks
            .clone()
            .ok_or_else(|| VmmActionError::Internal("no VMM task channel".into()))
    }

    /// `PUT /migrate/send`: connects to the destination, then migrates on
    /// a thread of its own while this one keeps running the VM.
    fn send_migration(&mut self, params: &crate::vmm_config::SendMigrationParams) -> VmmResponse {
        use crate::migration::{send, vmm_side::VmmSource, Progress, Role};
        let endpoint = crate::vmm_config::migration::validate_send(params)
            .map_err(VmmActionError::InvalidInput)?;
        self.refuse_while_migrating("PUT /migrate/send")?;
        let vmm = self
            .vmm
            .as_ref()
            .ok_or_else(|| VmmActionError::NotAllowed("the microVM is not started".into()))?;
        if self.migrated_away {
            return Err(VmmActionError::NotAllowed(
                "the microVM has already migrated away".into(),
            ));
        }
        if vmm.state() != VmState::Running {
            return Err(VmmActionError::NotAllowed(
                "only a running microVM migrates (PATCH /vm {\"state\": \"Resumed\"})".into(),
            ));
        }
        if self.resources.drives.iter().any(|d| d.socket.is_some()) {
            return Err(VmmActionError::NotAllowed(
                "a microVM with vhost-user drives cannot migrate: their backends write guest \
                 memory behind the dirty log"
                    .into(),
            ));
        }
        let stream = endpoint
            .connect(std::time::Duration::from_secs(3))
            .map_err(|e| {
                VmmActionError::InvalidInput(format!(
                    "cannot reach the destination {endpoint}: {e}"
                ))
            })?;
        let progress = Progress::new(Role::Source, endpoint.to_string());
        progress.set_stream(&stream);
        let mut source = VmmSource {
            tasks: self.tasks()?,
            mem: vmm.guest_memory().clone(),
        };
        let params = params.clone();
        progress.update(|s| s.state = crate::migration::Phase::PreCopy);
        self.run_migration(progress, move |p| {
            send::run(&mut source, stream, &params, p)
        })?;
        log::info!("migration to {endpoint} started");
        Ok(VmmData::Empty)
    }

    /// `PUT /migrate/receive`: listens, then receives on a thread of its own.
    fn receive_migration(
        &mut self,
        params: &crate::vmm_config::ReceiveMigrationParams,
    ) -> VmmResponse {
        use crate::migration::{receive, vmm_side::VmmTarget, Phase, Progress, Role};
        let endpoint = crate::vmm_config::migration::validate_receive(params)
            .map_err(VmmActionError::InvalidInput)?;
        self.refuse_while_migrating("PUT /migrate/receive")?;
        if self.vmm.is_some() || self.resources != VmResources::default() {
            return Err(VmmActionError::NotAllowed(
                "a migration is received only before any other configuration".into(),
            ));
        }
        let listener = endpoint.listen().map_err(|e| {
            VmmActionError::InvalidInput(format!("cannot listen on {endpoint}: {e}"))
        })?;
        let progress = Progress::new(Role::Destination, listener.local_uri());
        progress.update(|s| s.state = Phase::Listening);
        let mut target = VmmTarget::new(self.tasks()?, params.load_params());
        self.run_migration(progress, move |p| receive::run(&mut target, listener, p))?;
        log::info!("waiting for a migration on {endpoint}");
        Ok(VmmData::Empty)
    }

    /// Runs `work` on a migration thread of its own and keeps its progress
    /// for `GET /migrate`.
    fn run_migration(
        &mut self,
        progress: crate::migration::Progress,
        work: impl FnOnce(&crate::migration::Progress) + Send + 'static,
    ) -> Result<(), VmmActionError> {
        let p = progress.clone();
        std::thread::Builder::new()
            .name("ember-migrate".into())
            .spawn(move || work(&p))
            .map_err(|e| VmmActionError::Internal(format!("migration thread: {e}")))?;
        self.migration = Some(progress);
        Ok(())
    }

    fn cancel_migration(&mut self) -> VmmResponse {
        match &self.migration {
            Some(m) if m.cancel() => Ok(VmmData::Empty),
            Some(m) if m.status().is_active() => Err(VmmActionError::NotAllowed(
                "the switch-over has begun; the migration can no longer be cancelled".into(),
            )),
            _ => Err(VmmActionError::NotAllowed(
                "no migration is in progress".into(),
            )),
        }
    }

    /// The restored guest's console: `path`, else the VMM's own output.
    fn open_serial_out(&mut self, path: Option<&str>) -> Result<SerialOut, String> {
        match path {
            Some(p) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map(|f| Box::new(f) as SerialOut)
                .map_err(|e| format!("serial_out_path {p}: {e}")),
            None => (self.serial_out)().map_err(|e| format!("serial output: {e}")),
        }
    }

    /// Builds the VM a migration brought, paused.
    pub(crate) fn load_migrated(
        &mut self,
        state: crate::snapshot::MicrovmState,
        mem: crate::vstate::memory::GuestMemoryMmap,
        params: &LoadSnapshotParams,
        em: &mut EventMgr,
    ) -> Result<(), String> {
        if self.vmm.is_some() {
            return Err("this VMM already runs a microVM".into());
        }
        let out = self.open_serial_out(params.serial_out_path.as_deref())?;
        let vmm = builder::restore_from_state(params, state, mem, None, em, self.exit.clone(), out)
            .map_err(|e| format!("cannot build the received microVM: {e}"))?;
        self.resources = vmm.resources().clone();
        self.vmm = Some(vmm);
        Ok(())
    }

    /// New rate limiters: on the device of a started VM, else in the
    /// pre-boot configuration.
    fn patch_net(&mut self, update: &NetworkInterfaceUpdate) -> VmmResponse {
        crate::vmm_config::net::validate_limiters(&update.rx_rate_limiter, &update.tx_rate_limiter)
            .map_err(VmmActionError::InvalidInput)?;
        if let Some(vmm) = self.vmm.as_mut() {
            vmm.update_net_rate_limiters(update)
                .map_err(VmmActionError::InvalidInput)?;
            self.resources = vmm.resources().clone();
            return Ok(VmmData::Empty);
        }
        let cfg = self
            .resources
            .network_interfaces
            .iter_mut()
            .find(|n| n.iface_id == update.iface_id)
            .ok_or_else(|| {
                VmmActionError::InvalidInput(format!("no network interface {:?}", update.iface_id))
            })?;
        update.apply_to(cfg);
        Ok(VmmData::Empty)
    }

    /// A drive's backend, size or limits: on the device of a started VM,
    /// else in the pre-boot configuration.
    fn patch_drive(&mut self, update: &BlockDeviceUpdate) -> VmmResponse {
        drive::validate_update(update).map_err(VmmActionError::InvalidInput)?;
        if let Some(vmm) = self.vmm.as_mut() {
            vmm.update_drive(update)
                .map_err(VmmActionError::InvalidInput)?;
            self.resources = vmm.resources().clone();
            return Ok(VmmData::Empty);
        }
        let cfg = self
            .resources
            .drives
            .iter_mut()
            .find(|d| d.drive_id == update.drive_id)
            .ok_or_else(|| {
                VmmActionError::InvalidInput(format!("no drive {:?}", update.drive_id))
            })?;
        let mut new = cfg.clone();
        update.apply_to(&mut new);
        drive::validate_config(&new).map_err(VmmActionError::InvalidInput)?;
        *cfg = new;
        Ok(VmmData::Empty)
    }

    /// Pre-boot configuration.
    fn configure(&mut self, action: VmmAction) -> VmmResponse {
        use VmmAction::*;
        if self.vmm.is_some() {
            return Err(not_allowed(&format!("{action:?}")));
        }
        let r = &mut self.resources;
        match action {
            PutBootSource(b) => {
                if !std::path::Path::new(&b.kernel_image_path).is_file() {
                    return Err(VmmActionError::InvalidInput(format!(
                        "kernel_image_path {} is not a readable file",
                        b.kernel_image_path
                    )));
                }
                r.boot_source = Some(b);
            }
            PutMachineConfig(mc) => {
                mc.validate().map_err(VmmActionError::InvalidInput)?;
                r.machine_config = mc;
            }
            PatchMachineConfig(update) => {
                let mc = update.apply_to(&r.machine_config);
                mc.validate().map_err(VmmActionError::InvalidInput)?;
                r.machine_config = mc;
            }
            PutDrive(d) => {
                drive::validate_config(&d).map_err(VmmActionError::InvalidInput)?;
                if let Some(sock) = &d.socket {
                    check_vhost_user_socket(&d.drive_id, &d.path_on_host, sock)?;
                }
                if d.nbd_uri.is_some() || d.fill_from.is_some() {
                    // Catch unreachable or non-NBD servers now, as a 400,
                    // rather than at InstanceStart.
                    crate::devices::virtio::block::Block::probe(&d)
                        .map_err(|e| VmmActionError::InvalidInput(e.to_string()))?;
                }
                if d.is_root_device
                    && r.drives
                        .iter()
                        .any(|o| o.is_root_device && o.drive_id != d.drive_id)
                {
                    return Err(VmmActionError::InvalidInput(
                        "a root device is already configured".into(),
                    ));
                }
                match r.drives.iter_mut().find(|o| o.drive_id == d.drive_id) {
                    Some(o) => *o = d,
                    None => r.drives.push(d),
                }
            }
            PutNetworkInterface(n) => {
                let mac = n.validate().map_err(VmmActionError::InvalidInput)?;
                for other in r
                    .network_interfaces
                    .iter()
                    .filter(|o| o.iface_id != n.iface_id)
                {
                    if other.host_dev_name == n.host_dev_name {
                        return Err(VmmActionError::InvalidInput(format!(
                            "network interface {}: host_dev_name {} is already used by {}",
                            n.iface_id, n.host_dev_name, other.iface_id
                        )));
                    }
                    let other_mac = other.guest_mac.as_deref().and_then(|m| parse_mac(m).ok());
                    if mac.is_some() && other_mac == mac {
                        return Err(VmmActionError::InvalidInput(format!(
                            "network interface {}: guest_mac {} is already used by {}",
                            n.iface_id,
                            n.guest_mac.as_deref().unwrap_or_default(),
                            other.iface_id
                        )));
                    }
                }
                // Open the tap now, so a missing or unusable one is reported
                // here rather than at InstanceStart.
                Tap::open(&n.host_dev_name).map_err(|e| {
                    VmmActionError::InvalidInput(format!("network interface {}: {e}", n.iface_id))
                })?;
                match r
                    .network_interfaces
                    .iter_mut()
                    .find(|o| o.iface_id == n.iface_id)
                {
                    Some(o) => *o = n,
                    None => r.network_interfaces.push(n),
                }
            }
            PutVsock(v) => {
                if v.guest_cid < 3 {
                    return Err(VmmActionError::InvalidInput(format!(
                        "guest_cid must be 3 or more (0-2 are reserved), got {}",
                        v.guest_cid
                    )));
                }
                r.vsock = Some(v);
            }
            other => {
                return Err(VmmActionError::InvalidInput(format!(
                    "unsupported action {other:?}"
                )))
            }
        }
        Ok(VmmData::Empty)
    }

    /// Restores a snapshot into this (still unconfigured) VMM.
    fn load_snapshot(&mut self, params: &LoadSnapshotParams, em: &mut EventMgr) -> VmmResponse {
        if self.vmm.is_some() || self.resources != VmResources::default() {
            return Err(VmmActionError::NotAllowed(
                "snapshot load is only allowed before any other configuration".into(),
            ));
        }
        let out = self
            .open_serial_out(params.serial_out_path.as_deref())
            .map_err(VmmActionError::InvalidInput)?;
        let vmm = builder::restore_from_snapshot(params, em, self.exit.clone(), out).map_err(
            |e| match e {
                builder::RestoreError::Start(builder::StartError::Vm(_))
                | builder::RestoreError::Start(builder::StartError::Vcpu(_)) => {
                    VmmActionError::Internal(format!("cannot load snapshot: {e}"))
                }
                _ => VmmActionError::InvalidInput(format!("cannot load snapshot: {e}")),
            },
        )?;
        self.resources = vmm.resources().clone();
        self.vmm = Some(vmm);
        Ok(VmmData::Empty)
    }

    fn start(&mut self, em: &mut EventMgr) -> VmmResponse {
        if self.vmm.is_some() {
            return Err(VmmActionError::NotAllowed(
                "the microVM is already started".into(),
            ));
        }
        let out = (self.serial_out)()
            .map_err(|e| VmmActionError::InvalidInput(format!("serial output: {e}")))?;
        let vmm =
            builder::build_and_boot(&self.resources, em, self.exit.clone(), out).map_err(|e| {
                match e {
                    builder::StartError::Vm(_)
                    | builder::StartError::Vcpu(_)
                    | builder::StartError::EventLoop(_) => {
                        VmmActionError::Internal(format!("cannot start microVM: {e}"))
                    }
                    _ => VmmActionError::InvalidInput(format!("cannot start microVM: {e}")),
                }
            })?;
        self.vmm = Some(vmm);
        Ok(VmmData::Empty)
    }
}

/// A vhost-user drive names an existing unix socket and no file.
fn check_vhost_user_socket(drive_id: &str, path: &str, socket: &str) -> Result<(), VmmActionError> {
    use std::os::unix::fs::FileTypeExt;
    let bad = |why: String| {
        Err(VmmActionError::InvalidInput(format!(
            "drive {drive_id}: {why}"
        )))
    };
    if !path.is_empty() {
        return bad("path_on_host and socket are mutually exclusive".into());
    }
    match std::fs::metadata(socket) {
        Ok(m) if m.file_type().is_socket() => Ok(()),
        Ok(_) => bad(format!("socket {socket} is not a unix socket")),
        Err(e) => bad(format!("socket {socket}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm_config::{BootSourceConfig, MachineConfig, VsockConfig};

    fn controller() -> (Controller, EventMgr) {
        let exit = VmExitNotifier::new().unwrap();
        let c = Controller::new(
            "t".into(),
            VmResources::default(),
            exit,
            Box::new(|| Ok(Box::new(std::io::sink()) as SerialOut)),
        );
        (c, EventMgr::new().unwrap())
    }

    #[test]
    fn preboot_validation() {
        let (mut c, mut em) = controller();
        let bad = VmmAction::PutBootSource(BootSourceConfig {
            kernel_image_path: "/nonexistent/vmlinux".into(),
            initrd_path: None,
            boot_args: None,
        });
        assert!(
            matches!(c.handle(bad, &mut em), Err(VmmActionError::InvalidInput(m)) if m.contains("/nonexistent/vmlinux"))
        );
        let mc = MachineConfig {
            vcpu_count: 0,
            ..Default::default()
        };
        assert!(c.handle(VmmAction::PutMachineConfig(mc), &mut em).is_err());
        let vs = VsockConfig {
            vsock_id: None,
            guest_cid: 2,
            uds_path: "/tmp/x".into(),
        };
        assert!(c.handle(VmmAction::PutVsock(vs), &mut em).is_err());
        // Starting without a boot source is refused and changes nothing.
        assert!(matches!(
            c.handle(VmmAction::InstanceStart, &mut em),
            Err(VmmActionError::InvalidInput(m)) if m.contains("boot source")
        ));
        assert_eq!(c.instance_info().state, "Not started");
        assert!(matches!(
            c.handle(VmmAction::SendCtrlAltDel, &mut em),
            Err(VmmActionError::NotAllowed(_))
        ));
    }

    fn net(id: &str, tap: &str, mac: Option<&str>) -> VmmAction {
        VmmAction::PutNetworkInterface(crate::vmm_config::NetworkInterfaceConfig {
            iface_id: id.into(),
            host_dev_name: tap.into(),
            guest_mac: mac.map(String::from),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
            terminate_connections_on_pause: false,
        })
    }

    #[test]
    fn network_interface_errors_leave_the_vmm_usable() {
        let (mut c, mut em) = controller();
        let e = c
            .handle(net("eth0", "embernosuch0", None), &mut em)
            .unwrap_err();
        assert!(e.to_string().contains("no network interface named"), "{e}");
        assert_eq!(e.http_status(), 400);
        let e = c.handle(net("eth0", "lo", None), &mut em).unwrap_err();
        assert_eq!(e.http_status(), 400, "{e}");
        let e = c
            .handle(net("eth0", "tap0", Some("zz:00:00:00:00:00")), &mut em)
            .unwrap_err();
        assert!(e.to_string().contains("invalid MAC"), "{e}");
        let upd = crate::vmm_config::NetworkInterfaceUpdate {
            iface_id: "eth9".into(),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
            terminate_connections_on_pause: None,
        };
        let e = c
            .handle(VmmAction::PatchNetworkInterface(upd), &mut em)
            .unwrap_err();
        assert!(e.to_string().contains("no network interface"), "{e}");
        assert!(c.resources.network_interfaces.is_empty());
        assert!(c.handle(VmmAction::GetVmConfig, &mut em).is_ok());
    }

    #[test]
    fn network_interfaces_with_real_taps() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/dev/net/tun").exists() {
            return;
        }
        std::thread::spawn(|| {
            // SAFETY: unshare only changes this thread's namespaces.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            for t in ["tapc0", "tapc1"] {
                let ok = std::process::Command::new("ip")
                    .args(["tuntap", "add", "dev", t, "mode", "tap"])
                    .status()
                    .unwrap()
                    .success();
                assert!(ok);
            }
            let (mut c, mut em) = controller();
            let mac = Some("06:00:00:00:00:01");
            c.handle(net("eth0", "tapc0", mac), &mut em).unwrap();
            // Same id again: replaced (PUT is idempotent before boot).
            c.handle(net("eth0", "tapc0", mac), &mut em).unwrap();
            let e = c.handle(net("eth1", "tapc0", None), &mut em).unwrap_err();
            assert!(e.to_string().contains("already used by eth0"), "{e}");
            let e = c
                .handle(net("eth1", "tapc1", Some("06:00:00:00:00:01")), &mut em)
                .unwrap_err();
            assert!(e.to_string().contains("guest_mac"), "{e}");
            c.handle(net("eth1", "tapc1", None), &mut em).unwrap();
            assert_eq!(c.resources.network_interfaces.len(), 2);
            let rl = crate::rate_limiter::RateLimiterConfig {
                bandwidth: None,
                ops: Some(crate::rate_limiter::TokenBucketConfig {
                    size: 5,
                    one_time_burst: None,
                    refill_time: 10,
                }),
            };
            let upd = crate::vmm_config::NetworkInterfaceUpdate {
                iface_id: "eth1".into(),
                rx_rate_limiter: Some(rl),
                tx_rate_limiter: None,
                terminate_connections_on_pause: Some(true),
            };
            c.handle(VmmAction::PatchNetworkInterface(upd), &mut em)
                .unwrap();
            assert_eq!(c.resources.network_interfaces[1].rx_rate_limiter, Some(rl));
            assert!(c.resources.network_interfaces[1].terminate_connections_on_pause);
        })
        .join()
        .unwrap();
    }
}
